"""Where frozen modules (the VAE, reward models) live between uses: device memory or host memory.

``sampling.offload_vae`` and ``rewards[*].offload`` keep such modules in host memory and copy them to
the GPU only for the call that needs them (a decode, a reward's scoring). Because the modules are
frozen, nothing is ever copied back: on entry each parameter / buffer gets a device copy of its host
tensor, on exit the host tensor is put back and the device copy is freed (its memory returns to the
caching allocator, stream-ordered). The swap replaces the tensor objects in the modules' parameter
and buffer tables and puts the originals back, so it works between any two devices. Host copies are
pinned when the device is a GPU, so the copy in is asynchronous and the host does not wait for it.

Not verified on a GPU yet: on CPU-only machines the tests check the moves with the ``meta`` device
(docs/performance.md, "Memory at real sizes").
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List, Sequence

import torch
from torch import nn


def _tensors(modules: Iterable[nn.Module]) -> Iterator[torch.Tensor]:
    seen = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                yield t


def _check_frozen(modules: Sequence[nn.Module]) -> None:
    trainable = [type(m).__name__ for m in modules if any(p.requires_grad for p in m.parameters())]
    if trainable:
        raise ValueError(f"only frozen modules can be offloaded (their device copies are dropped, never copied "
                         f"back); {trainable} have parameters with requires_grad=True")


def to_host(modules: Sequence[nn.Module], pin: bool = False) -> None:
    """Move every parameter and buffer of ``modules`` to host memory (pinned with ``pin``: set it when
    the modules will be copied to a GPU). Tensors already on the host are left alone (pinned if asked)."""
    modules = [m for m in modules if m is not None]
    _check_frozen(modules)
    for t in _tensors(modules):
        if t.device.type != "cpu":
            host = t.data.to("cpu")
            t.data = host.pin_memory() if pin else host
        elif pin and not t.data.is_pinned():
            t.data = t.data.pin_memory()


@contextlib.contextmanager
def on_device(modules: Sequence[nn.Module], device) -> Iterator[None]:
    """Inside the block, every parameter and buffer of ``modules`` is on ``device``: tensors elsewhere
    are replaced by device copies (non-blocking from pinned memory), and the original tensor objects
    are put back on exit, so the device copies are freed. Tensors already on ``device`` are untouched;
    with nothing to move this is free."""
    device = torch.device(device)
    modules = [m for m in modules if m is not None]
    swapped: List = []  # (dict of a module, name, original tensor)
    copies = {}  # id(original) -> device copy (tied weights stay tied)
    try:
        for mod in modules:
            for sub in mod.modules():
                for table in (sub._parameters, sub._buffers):
                    for name, t in list(table.items()):
                        if t is None or _same_device(t.device, device):
                            continue
                        if not copies:
                            _check_frozen(modules)
                        new = copies.get(id(t))
                        if new is None:
                            data = t.detach().to(device, non_blocking=t.is_pinned())
                            new = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
                            copies[id(t)] = new
                        swapped.append((table, name, t))
                        table[name] = new
        yield
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``a`` (a tensor's device) is ``b`` (a target such as "cuda", meaning the current device, or "cuda:1")."""
    return a.type == b.type and (b.index is None or a.index == b.index)
