"""Replay repeated sub-module calls under the planner's fake tensors instead of re-running them.

A tiled or chunked VAE decode (HunyuanVideo, Wan, Qwen-Image, AutoencoderKL with tiling) calls its
``decoder`` once per tile or latent frame, with inputs of the same few shapes. Under fake tensors
(``plan.measure``) each call costs its full op count in dispatch overhead while producing nothing new:
the FLOPs, the transient memory and the output shapes of a call depend only on the shapes, dtypes and
non-tensor arguments it gets. :class:`RepeatedCallMemo` runs the first call of each distinct signature,
records what it added to the FLOP counter, how far it raised live memory above its start, and its
outputs' shapes; a later call with the same signature adds the same FLOPs, raises the peak the same way
and returns fresh (fake) tensors of the recorded shapes. Only calls under ``torch.no_grad()`` are replayed (a
replayed output carries no autograd graph). Nothing global is patched: the memo wraps the
``forward`` of the given module instances while it is active and restores them on exit.

A call may also change the lists and dicts it is given (Wan's causal decoder fills a feature cache that
decides how many frames its next call returns). The memo keys a call by the shapes of every tensor it is
given, lists and dicts included, records what each list or dict argument holds after the first call, and
a replay leaves them holding the same: fresh tensors of the recorded shapes, the same other values.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree


def call_signature(args, kwargs) -> Tuple:
    """What decides a call's shapes and cost: each tensor's shape, dtype, device and strides; every other leaf
    by its value (or its type, when it cannot be hashed)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append(("T", tuple(x.shape), x.dtype, str(x.device), tuple(x.stride())))
        else:
            try:
                hash(x)
                key.append(("V", x))
            except TypeError:
                key.append(("O", type(x).__name__))
    return str(spec), tuple(key)


def _layout(tree):
    """A tree's structure and its leaves as (tensor shape, dtype, device) or the value itself."""
    leaves, spec = pytree.tree_flatten(tree)
    return spec, [("T", tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else ("V", t)
                  for t in leaves]


def _rebuild(layout):
    spec, leaves = layout
    return pytree.tree_unflatten([torch.empty(x[1], dtype=x[2], device=x[3]) if x[0] == "T" else x[1]
                                  for x in leaves], spec)


def _containers(args, kwargs):
    """The list and dict arguments a call may fill (positional and keyword, top level)."""
    return [a for a in list(args) + list(kwargs.values()) if isinstance(a, (list, dict))]


class _Recorded:
    """One call's effect: FLOPs per op, the peak rise over the live bytes at its start, its outputs' layout and
    what its list / dict arguments held afterwards."""

    def __init__(self, flops: Dict, peak_rise: int, out, containers):
        self.flops, self.peak_rise = flops, peak_rise
        self.out = _layout(out)
        self.after = [_layout(c) for c in containers]

    def outputs(self):
        return _rebuild(self.out)

    def refill(self, containers) -> None:
        for c, layout in zip(containers, self.after):
            new = _rebuild(layout)
            if isinstance(c, list):
                c[:] = new
            else:
                c.clear()
                c.update(new)


class RepeatedCallMemo:
    """Context: calls of ``modules`` with a signature seen before are replayed (see the module docstring).
    ``flop_counter``: the active ``FlopCounterMode`` (its ``Global`` counts receive replayed FLOPs);
    ``live``: the planner's ``LivePeak`` (``live`` / ``peak`` bytes)."""

    def __init__(self, modules: Dict[str, nn.Module], flop_counter=None, live=None):
        self.modules, self.fc, self.live = modules, flop_counter, live
        self.records: Dict[Tuple, _Recorded] = {}
        self.replayed = 0

    def __enter__(self) -> "RepeatedCallMemo":
        for name, module in self.modules.items():
            module.forward = self._wrap(name, module.forward)  # instance attribute: shadows the class's
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            module.__dict__.pop("forward", None)

    def _flops(self) -> Dict:
        return dict(self.fc.flop_counts["Global"]) if self.fc is not None else {}

    def _wrap(self, name: str, forward):
        def call(*args, **kwargs):
            if torch.is_grad_enabled():  # a replayed output has no autograd graph (nor the activations it keeps)
                return forward(*args, **kwargs)
            key = (name, call_signature(args, kwargs))
            rec = self.records.get(key)
            if rec is not None:
                return self._replay(rec, _containers(args, kwargs))
            before, start_live = self._flops(), self.live.live if self.live is not None else 0
            saved_peak = None
            if self.live is not None:  # measure this call's own rise above its starting live bytes
                saved_peak, self.live.peak = self.live.peak, self.live.live
            out = forward(*args, **kwargs)
            rise = 0
            if self.live is not None:
                rise = self.live.peak - start_live
                self.live.peak = max(saved_peak, self.live.peak)
            after = self._flops()
            flops = {op: n - before.get(op, 0) for op, n in after.items() if n != before.get(op, 0)}
            self.records[key] = _Recorded(flops, rise, out, _containers(args, kwargs))
            return out

        return call

    def _replay(self, rec: _Recorded, containers):
        self.replayed += 1
        start = self.live.live if self.live is not None else 0
        rec.refill(containers)  # what the call leaves in its list / dict arguments (a feature cache)
        if self.fc is not None:
            counts = self.fc.flop_counts["Global"]
            for op, n in rec.flops.items():
                counts[op] += n
        if self.live is not None:
            self.live.peak = max(self.live.peak, start + rec.peak_rise)
        return rec.outputs()  # allocated through the dispatcher: the live-bytes tracker sees them


def vae_children(vae: Optional[nn.Module]) -> Dict[str, nn.Module]:
    """The direct sub-modules of a VAE (its decoder, post-quant conv, ...): what a tiled decode calls per tile."""
    if vae is None:
        return {}
    return {name: child for name, child in vae.named_children()}
