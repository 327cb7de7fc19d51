"""Counts of model passes per training iteration: forwards and backwards, per sample, by phase.

``PassCounter.watch(adapter, ...)`` wraps each adapter's ``predict`` for the duration of one iteration,
so every call into the model in the loop is counted where it happens (the rollout's forwards, the
old-policy / reference forwards of the update, the trained forwards) and nothing is inferred from the
config. Units: one pass is one ``predict`` on one sample (a call on a batch of n samples counts n).
A ``predict`` that runs the network twice internally (classifier-free guidance batched or not) counts
once: the counts are policy evaluations. A backward is counted when a gradient reaches the output of a
counted forward (a hook on that output), i.e. when the loss is back-propagated through it, so a forward
whose output carries no gradient (a frozen expert's step, ``torch.no_grad``) adds a forward only.

The trainer records the counts of each iteration in its metrics (``passes/forward``,
``passes/forward_rollout``, ``passes/forward_update``, ``passes/backward``; per rank). Held-out
evaluation and rewards are not counted.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch


class PassCounter:
    """Per-sample forward counts by phase (``phase``) and backward counts, reset by ``reset``."""

    PHASES = ("rollout", "update")

    def __init__(self):
        self._phase = "update"
        self.on_forward = None  # optional callback (phase, samples) after each counted forward (a progress bar)
        self.reset()

    def reset(self) -> None:
        self.forward: Dict[str, int] = {p: 0 for p in self.PHASES}
        self.backward = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.PHASES:
            raise ValueError(f"unknown phase {name!r} (known: {self.PHASES})")
        prev, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = prev

    def _count_backward(self, n: int) -> None:
        self.backward += n

    def _wrap(self, predict):
        def counted(latents, timestep_B, cond, *args, **kwargs):
            out = predict(latents, timestep_B, cond, *args, **kwargs)
            n = int(latents.shape[0])
            self.forward[self._phase] += n
            if self.on_forward is not None:
                self.on_forward(self._phase, n)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda _grad, n=n: self._count_backward(n))
            return out

        return counted

    @contextlib.contextmanager
    def watch(self, *adapters):
        """Count the ``predict`` calls of the given adapters (None entries skipped) inside the block; the
        adapters' own ``predict`` is restored afterwards."""
        patched = []
        try:
            for ad in adapters:
                if ad is None or any(ad is p[0] for p in patched):
                    continue
                own = ad.__dict__.get("predict")
                ad.predict = self._wrap(ad.predict)
                patched.append((ad, own))
            yield self
        finally:
            for ad, own in patched:
                if own is None:
                    del ad.predict
                else:
                    ad.predict = own

    def metrics(self) -> Dict[str, int]:
        return {
            "passes/forward": sum(self.forward.values()),
            "passes/forward_rollout": self.forward["rollout"],
            "passes/forward_update": self.forward["update"],
            "passes/backward": self.backward,
        }
