"""The reward protocol and registry.

A reward is a callable ``fn(images, prompts, **metadata) -> (scores_B, info)``:

* ``images``: float tensor in [0, 1], (B, 3, H, W) for images or (B, F, 3, H, W) for videos;
* ``prompts``: list of B strings, one per sample (each sample is scored against ITS OWN prompt);
* ``scores_B``: float32 CPU tensor of shape (B,), finite; ``info``: a dict of extra per-batch values
  for logging (never needed by the trainer).

Group-level rewards score a whole group at once (a sample's score depends on the other samples of its
prompt's group, e.g. Pref-GRPO's win rate within the group): such a reward sets ``fn.group_level = True``
and is called with the group structure, ``fn(images, prompts, group_size=G, **metadata)``: the B samples are
B / G groups of G consecutive samples of one prompt (the rollout's layout). They train only: a within-group
score says nothing about a held-out sample on its own, so evaluation leaves them out (rewards/build.py).

Factories are registered by name with ``@REWARDS.register("name")`` and receive their config
fields as keyword arguments; heavy imports (transformers, open_clip) happen inside the factory.
A reward backed by models exposes them as ``fn.modules`` (frozen ``nn.Module``s) and where they compute
as ``fn.device``, so that ``ConfiguredReward`` can keep them in host memory between calls.

Memory (docs/performance.md): ``ConfiguredReward`` applies a reward config's ``batch_size`` (the
decoded batch is scored ``batch_size`` samples per call; per-sample scores are concatenated, so they
depend on it only through the reward model's batch-shape rounding) and ``offload`` (models copied to the device for each call, in host memory between).
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils import residency
from ..utils.registry import Registry

RewardOutput = Tuple[torch.Tensor, Dict]
RewardFn = Callable[..., RewardOutput]

REWARDS: Registry[RewardFn] = Registry("reward")


def validate_reward_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Clear ValueErrors for the mistakes users make most often."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim not in (4, 5) or images.shape[-3] != 3:
        raise ValueError(
            f"images must be (B, 3, H, W) or (B, F, 3, H, W) floats in [0, 1]; got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype} (divide uint8 by 255)")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, one per image, not a single string")
    if len(prompts) == 0:
        raise ValueError("prompt list is empty")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf (the sampler diverged?)")


class NonFiniteScores(ValueError):
    """A reward returned NaN or inf: names the reward, the samples (index in the scored batch, value) and, once
    known, their prompts. The training loop stops on it (exit status 3) before anything is saved."""

    def __init__(self, name: str, scores: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                 before: str = "any threshold, weight or advantage"):
        self.name, self.scores, self.before = name, scores, before
        self.bad = [i for i, ok in enumerate(torch.isfinite(scores).tolist()) if not ok]
        self.prompts = list(prompts) if prompts is not None else None
        shown = []
        for i in self.bad[:3]:
            about = f" (prompt {self.prompts[i]!r})" if self.prompts is not None and i < len(self.prompts) else ""
            shown.append(f"sample {i} = {scores[i].item()}{about}")
        more = f", and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
        super().__init__(f"reward {name!r} returned a non-finite score for {len(self.bad)} of {scores.numel()} "
                         f"samples: {'; '.join(shown)}{more} (caught on the raw scores, before {before})")

    def with_prompts(self, prompts: Sequence[str]) -> "NonFiniteScores":
        """The same error, naming the samples' prompts (for a check made where they were not known)."""
        return self if self.prompts is not None else NonFiniteScores(self.name, self.scores, prompts, self.before)


def check_scores(name: str, scores: torch.Tensor, batch: int, prompts: Optional[Sequence[str]] = None,
                 before: str = "any threshold, weight or advantage") -> torch.Tensor:
    """Scores must be (B,) and finite: a failing reward is an error, never a silent constant
    (``NonFiniteScores`` names the samples, and their prompts when ``prompts`` is given; ``before``: the
    transforms the check comes before, for the message)."""
    scores = torch.as_tensor(scores).detach().to(torch.float32).cpu().reshape(-1)
    if scores.numel() != batch:
        raise ValueError(f"reward {name!r} returned {scores.numel()} scores for a batch of {batch}")
    if not torch.isfinite(scores).all():
        raise NonFiniteScores(name, scores, prompts, before)
    return scores


def is_group_level(fn: RewardFn) -> bool:
    """Whether ``fn`` scores whole groups (``fn.group_level``; see the module docstring)."""
    return bool(getattr(fn, "group_level", False))


def check_groups(name: str, batch: int, group_size) -> int:
    """``group_size`` as an int dividing ``batch``: what a group-level reward needs (ValueError otherwise)."""
    if group_size is None:
        raise ValueError(f"reward {name!r} scores whole groups (group-level) but got no group structure: it is a "
                         "training reward only (not for eval.rewards or train.watchdog.gold)")
    if int(group_size) < 1 or batch % int(group_size):
        raise ValueError(f"reward {name!r} scores whole groups: a batch of {batch} samples is not a whole number of "
                         f"groups of {group_size}")
    return int(group_size)


def compute_rewards(reward_fns: Dict[str, RewardFn], images: torch.Tensor, prompts: List[str],
                    group_size: Optional[int] = None, **metadata) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Run every named reward on one batch; returns ({name: scores_B}, {name: info}).

    ``group_size``: the batch is groups of that many consecutive samples of one prompt (the rollout's layout);
    group-level rewards receive it and need it. Rewards built from a config (``trainer.build_reward_fns``)
    score in chunks of their ``batch_size`` and move their models in and out of the device themselves
    (``ConfiguredReward``)."""
    validate_reward_inputs(images, prompts)
    scores, infos = {}, {}
    for name, fn in reward_fns.items():
        groups = {"group_size": check_groups(name, images.shape[0], group_size)} if is_group_level(fn) else {}
        try:
            s, info = fn(images, prompts, **groups, **metadata)
            scores[name] = check_scores(name, s, images.shape[0], prompts)
        except NonFiniteScores as e:  # a reward's own check does not know the prompts: name them
            raise e.with_prompts(prompts) from None
        infos[name] = info
    return scores, infos


# ----------------------------------------------------------------------------- chunked scoring, residency


def _rows(value, start: int, end: int, batch: int):
    """``value[start:end]`` for per-sample metadata (a tensor or list with ``batch`` rows), else ``value``."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value[start:end]
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return value[start:end]
    return value


def merge_infos(infos: List[Dict], sizes: List[int]) -> Dict:
    """One info dict from the infos of consecutive chunks of sizes ``sizes``: per-sample values (tensors
    or lists with one row per sample of their chunk) are concatenated, numbers are averaged weighted by
    chunk size (rewards report batch means such as ``hps_mean``), anything else becomes the list of the
    chunks' values."""
    if len(infos) == 1:
        return infos[0]
    out = {}
    for key in infos[0] or {}:
        vals = [(i or {}).get(key) for i in infos]
        if all(isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n for v, n in zip(vals, sizes)):
            out[key] = torch.cat([v.to(vals[0].device) for v in vals])
        elif all(isinstance(v, list) and len(v) == n for v, n in zip(vals, sizes)):
            out[key] = [x for v in vals for x in v]
        elif all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in vals):
            out[key] = sum(float(v) * n for v, n in zip(vals, sizes)) / sum(sizes)
        else:
            out[key] = vals
    return out


def score_in_chunks(fn: RewardFn, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 0,
                    **metadata) -> RewardOutput:
    """``fn`` on ``batch_size`` samples at a time (0 = all at once); scores concatenated, infos merged
    (``merge_infos``). Per-sample metadata (one row per sample) is cut along with the images."""
    b = images.shape[0]
    if not batch_size or batch_size >= b:
        return fn(images, prompts, **metadata)
    scores, infos, sizes = [], [], []
    for s in range(0, b, batch_size):
        e = min(b, s + batch_size)
        meta = {k: _rows(v, s, e, b) for k, v in metadata.items()}
        sc, info = fn(images[s:e], list(prompts[s:e]), **meta)
        scores.append(torch.as_tensor(sc).detach().reshape(-1))
        infos.append(info)
        sizes.append(e - s)
    return torch.cat([x.to(scores[0].device) for x in scores]), merge_infos(infos, sizes)


class ConfiguredReward:
    """A reward with a config's memory settings (``RewardConfig.batch_size`` / ``offload``).

    ``batch_size``: samples per call of the wrapped reward (0 = the whole batch). ``offload``: the
    reward's ``fn.modules`` live in host memory (pinned on a GPU machine) and are copied to ``fn.device``
    for each call, dropped after it (residency.py). A reward without ``fn.modules`` (rules, remote
    servers) has nothing to offload. Other attributes (``scorer``, ``model``) are the wrapped reward's.
    """

    def __init__(self, fn: RewardFn, batch_size: int = 0, offload: bool = False):
        if batch_size < 0:
            raise ValueError(f"reward batch_size must be >= 0 (0 = the whole batch), got {batch_size}")
        self.fn, self.batch_size, self.offload = fn, int(batch_size), bool(offload)
        self.modules = [m for m in (getattr(fn, "modules", None) or []) if m is not None]
        self.device = torch.device(getattr(fn, "device", None) or "cpu")
        if self.offload and self.modules:
            residency.to_host(self.modules, pin=self.device.type == "cuda")

    def __getattr__(self, name):
        if name == "fn":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, images, prompts, **metadata) -> RewardOutput:
        group = metadata.get("group_size")
        if self.batch_size and is_group_level(self.fn) and group and self.batch_size % int(group):
            raise ValueError(f"a group-level reward scores whole groups: its batch_size {self.batch_size} (rewards[*]."
                             f"batch_size) must be a multiple of grpo.group_size = {group}")
        resident = residency.on_device(self.modules, self.device) if self.offload else contextlib.nullcontext()
        with resident:
            return score_in_chunks(self.fn, images, prompts, self.batch_size, **metadata)
