"""The training prompt stream: whole prompts (hence whole groups) per data-parallel rank.

One class serves one process and many: a single process is ``dp_size = 1``. See ``PromptSource``.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from ..models.base import Cond


class PromptSource:
    """Whole prompts (hence whole groups) per data-parallel rank, without replacement, reshuffled per epoch.

    Every rank walks the same global shuffled order (same seed); each call takes the next
    ``n * dp_size`` prompts and rank ``dp_rank`` keeps the r-th contiguous run of n, so a prompt goes
    to exactly one dp rank and group-relative advantages need no communication. The state is the
    position in the global stream, independent of the world size (resumable on any number of ranks).
    A single process is ``dp_size = 1``.
    """

    def __init__(self, prompts: Sequence[str], encode: Callable[[List[str]], Cond], seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if not prompts:
            raise ValueError("the training prompt list is empty")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.prompts = list(prompts)
        self.encode = encode
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order: List[int] = []
        self.position = 0  # prompts handed out so far, summed over all dp ranks

    def _draw(self, n: int) -> List[int]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            out.append(self._order.pop())
        return out

    def next_indices(self, n: int) -> List[int]:
        """Prompt indices of this rank's next ``n`` prompts (advances the global stream by n * dp_size)."""
        if n < 1:
            raise ValueError(f"prompts per rank must be >= 1, got {n}")
        stream = self._draw(n * self.dp_size)
        self.position += n * self.dp_size
        return stream[self.dp_rank * n:(self.dp_rank + 1) * n]

    def next_batch(self, n: int) -> Tuple[List[str], Cond]:
        batch = [self.prompts[i] for i in self.next_indices(n)]
        return batch, self.encode(batch)

    def state_dict(self):
        return {"rng": self.generator.get_state(), "order": list(self._order), "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["rng"])
        self._order = list(state["order"])
        self.position = state["position"]
