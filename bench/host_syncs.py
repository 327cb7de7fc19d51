"""Where the package's code makes the host wait for the device: an audit on any machine, the CUDA report on a GPU.

A GPU runs ahead of the Python that queues its work only while nothing on the host asks for a device value.
Every such request -- ``.item()``, ``float(t)``, ``bool(t)`` (an ``if`` on a tensor), ``.tolist()``,
``torch.nonzero`` or indexing with a boolean mask, a blocking copy to the host, or a blocking copy from
pageable host memory to the GPU -- makes the host wait for everything queued so far; in the middle of an
update it leaves the GPU idle while the next kernels are being queued. The project promises one such wait
per optimiser step (the gradient norm and the finiteness flags, algorithms/update.py) and a few per
iteration (metrics, rewards); none per micro-step or per sampling step.

``HostSyncAudit`` (CPU or GPU) is a ``TorchFunctionMode`` that records each of those requests made *directly
by the package's code* (the first frame above torch's own Python wrappers is in ``fastvideo_grpo/``), with
its file and line, the operation, the tensor's device and the *region* it happened in (``region`` /
``watch``: e.g. one micro-step, one model forward). On a CPU nothing actually waits -- host and device are
one -- so the audit lists what *would* wait if the tensor lived on a GPU: a scalar read of a tensor kept on
the host by design (a step index) is listed too, and read accordingly. Copies made with
``utils.transfer.to_device`` (pinned, asynchronous) are not requests and are not listed.

``cuda_sync_report(fn)`` (GPU only) runs ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")``, which
warns at every synchronising CUDA call PyTorch makes -- inside diffusers and torch too -- and attributes
each warning to the innermost frame of the package (and of any other library) on the stack.

    python bench/host_syncs.py                          # the toy iteration on the CPU: one JSON line
    python bench/host_syncs.py --case flux_tiny         # a bench/iteration.py case (random-init diffusers model)
    python bench/host_syncs.py --case flux_small --device cuda --trace out/trace.json   # on a GPU: + CUDA report,
                                                        # + a torch.profiler trace of one iteration

The JSON holds the audit's events, the count inside the hot regions (one micro-step's loss, a model forward,
an SDE step: the promise is 0), the update driver's reads per optimiser step, and on a GPU the CUDA sync
report and the iteration's seconds with and without the audit.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parents[1] / "fastvideo_grpo")
TORCH = str(Path(torch.__file__).resolve().parent)
# torch's own Python wrappers around tensor methods: the caller above them is the one that asked
_WRAPPERS = tuple(str(Path(TORCH) / f) for f in ("_tensor.py", "functional.py", "overrides.py", "_jit_internal.py"))

#: operations that return host values computed from a tensor's data
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "__complex__", "numpy", "nonzero",
         "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal", "allclose",
         "is_nonzero"}
#: operations that copy between devices (recorded when blocking)
TRANSFERS = {"to", "cpu", "cuda", "copy_"}


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


def _transfer(op: str, args, kwargs) -> Optional[Dict]:
    """(source device, target device) of a blocking device copy, None when the call is not one."""
    kwargs = kwargs or {}
    if kwargs.get("non_blocking") or (op == "to" and any(a is True for a in args[1:])):
        return None
    src = args[0].device if args and isinstance(args[0], torch.Tensor) else None
    if op == "cpu":
        return {"source": str(src), "target": "cpu"}
    if op == "cuda":
        return {"source": str(src), "target": "cuda"}
    if op == "copy_":
        other = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        if other is None or src is None:
            return None
        return {"source": str(other.device), "target": str(src)} if other.device != src or src.type == "cpu" \
            else None
    target = kwargs.get("device")
    if target is None:
        for a in args[1:]:
            if isinstance(a, torch.Tensor):
                target = a.device
                break
            if isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool)):
                target = a
                break
    if target is None:
        return None  # a dtype-only conversion
    return {"source": str(src), "target": str(torch.device(target) if not isinstance(target, torch.device)
                                                else target)}


def _bool_mask(args) -> bool:
    """Indexing with a boolean tensor (an implicit nonzero: the result's size depends on the data)."""
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.ndim > 0 for i in items)


def _site(frame) -> Optional[str]:
    """``relative/path.py:line (function)`` of the first frame above torch's wrappers when it is the package's."""
    while frame is not None and frame.f_code.co_filename.startswith(_WRAPPERS):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    rel = Path(frame.f_code.co_filename).relative_to(Path(PACKAGE).parent)
    return f"{rel}:{frame.f_lineno} ({frame.f_code.co_name})"


class HostSyncAudit(TorchFunctionMode):
    """Records the package's host-waiting requests (module docstring); ``events()`` summarises them."""

    def __init__(self):
        super().__init__()
        self._regions: List[str] = ["iteration"]
        self.counts: Dict[tuple, int] = collections.Counter()
        self._patched: List[tuple] = []

    # ---------------------------------------------------------------- regions

    @contextlib.contextmanager
    def region(self, name: str):
        self._regions.append(name)
        try:
            yield
        finally:
            self._regions.pop()

    def watch(self, obj, attr: str, region: str) -> None:
        """Wrap ``obj.attr`` (a callable) so that what it does is recorded under ``region``; undone by ``close``."""
        fn = getattr(obj, attr)
        own = obj.__dict__.get(attr, None) if hasattr(obj, "__dict__") else None

        def wrapped(*a, **k):
            with self.region(region):
                return fn(*a, **k)

        setattr(obj, attr, wrapped)
        self._patched.append((obj, attr, own))

    def close(self) -> None:
        for obj, attr, own in reversed(self._patched):
            if own is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)
        self._patched.clear()

    # ---------------------------------------------------------------- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = _name(func)
        what = None
        if op in READS:
            what = {"kind": "read"}
        elif op == "repeat_interleave" and (isinstance((kwargs or {}).get("repeats"), torch.Tensor) or (
                len(args) > 1 and isinstance(args[1], torch.Tensor))):
            what = {"kind": "read", "note": "repeats given as a tensor"}
        elif op in TRANSFERS:
            t = _transfer(op, args, kwargs)
            if t is not None:
                what = {"kind": "transfer", **t}
        elif op in ("__getitem__", "__setitem__") and _bool_mask(args):
            what = {"kind": "read", "note": "boolean-mask index"}
        if what is not None:
            site = _site(sys._getframe(1))
            if site is not None:
                dev = args[0].device if args and isinstance(args[0], torch.Tensor) else None
                key = (self._regions[-1], site, op, what["kind"], str(dev), what.get("source"), what.get("target"))
                self.counts[key] += 1
        return func(*args, **(kwargs or {}))

    def events(self) -> List[Dict]:
        """One entry per (region, site, operation, device), most frequent first."""
        out = []
        for (region, site, op, kind, dev, src, tgt), n in self.counts.items():
            e = {"region": region, "site": site, "op": op, "kind": kind, "device": dev, "count": n}
            if kind == "transfer":
                e.update(source=src, target=tgt)
            out.append(e)
        return sorted(out, key=lambda e: (-e["count"], e["site"]))


def audit(fn: Callable, watches=()) -> tuple:
    """``fn()`` under a ``HostSyncAudit`` with ``watches`` = [(obj, attr, region)]; returns (result, events)."""
    a = HostSyncAudit()
    for obj, attr, region in watches:
        a.watch(obj, attr, region)
    try:
        with a:
            out = fn()
    finally:
        a.close()
    return out, a.events()


def _innermost(stack, prefix: str) -> Optional[str]:
    for fr in reversed(stack):
        if fr.filename.startswith(prefix):
            rel = Path(fr.filename)
            try:
                rel = rel.relative_to(Path(prefix).parent)
            except ValueError:
                pass
            return f"{rel}:{fr.lineno} ({fr.name})"
    return None


def cuda_sync_report(fn: Callable) -> tuple:
    """(result, report) of ``fn()`` under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA
    call, counted by the innermost package frame on its stack (``package``) and by the innermost frame outside
    torch (``caller``: diffusers, peft, ... or the package). GPU only (ValueError elsewhere)."""
    if not torch.cuda.is_available():
        raise ValueError("cuda_sync_report needs a CUDA device (torch.cuda.set_sync_debug_mode)")
    counts: Dict[tuple, int] = collections.Counter()
    messages: Dict[tuple, str] = {}
    prev_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return prev_show(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        outside = [fr for fr in stack if not fr.filename.startswith(TORCH) and fr.filename != __file__]
        key = (_innermost(stack, PACKAGE), _innermost(outside, str(Path(outside[-1].filename).parent))
               if outside else None)
        counts[key] += 1
        messages.setdefault(key, str(message)[:200])

    prev_mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev_mode)
            warnings.showwarning = prev_show
    report = [{"package": k[0], "caller": k[1], "count": n, "message": messages[k]}
              for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return out, {"total": sum(counts.values()), "sites": report}


HOT = ("micro_step", "forward", "sde_step")


def _watches(trainer):
    """The regions of one iteration: the objective's micro-step loss, the model forward, the SDE step."""
    return [(trainer.objective, "loss", "micro_step"), (trainer.adapter, "predict", "forward"),
            (trainer.schedule, "step", "sde_step"), (trainer.schedule, "model_timestep", "sde_step")]


def toy_trainer(device="cpu"):
    """A small toy trainer: 2 prompts x 4 samples, 5 steps (3 trained), 2 optimiser steps of 2 micro-batches."""
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.trainer import Trainer

    cfg = load_config(None, [
        "--model.name=toy", "--sampling.num_steps=5", "--sampling.eta=0.7", "--grpo.group_size=4",
        "--grpo.prompts_per_iteration=2", "--grpo.tau=0.8", "--grpo.num_updates_per_iteration=2",
        "--grpo.micro_batch_size=4", "--sampling.rollout_batch_size=4", "--rewards=[{name: toy_colour_fidelity}]"])
    torch.manual_seed(0)
    adapter = ToyAdapter(TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=1, heads=2)).to(device))
    fns, weights = build_reward_fns(cfg.rewards)
    return Trainer(cfg, adapter, fns, weights, PromptSource(split_prompts(seed=0)[0], adapter.encode_prompts, seed=1))


def _timed(fn, device) -> tuple:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="toy", help="toy, or a bench/iteration.py case name (flux_tiny, flux_small, ...)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trace", default="", help="GPU: write a torch.profiler Chrome trace of one iteration here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.case == "toy":
        trainer = toy_trainer(device)
    else:
        import tempfile

        import iteration as it  # bench/iteration.py

        if args.case not in it.CASES:
            raise ValueError(f"--case {args.case!r} is not toy or one of bench/iteration.py's {sorted(it.CASES)}")
        trainer, _ = it.make_trainer(it.CASES[args.case], Path(tempfile.mkdtemp(prefix="host_syncs_")), device=device)
    trainer.train_iteration()  # warm: nothing set up lazily inside the measured iterations
    _, plain_s = _timed(trainer.train_iteration, device)
    (metrics, events), audited_s = _timed(lambda: audit(trainer.train_iteration, _watches(trainer)), device)
    update_reads = collections.Counter()
    for e in events:
        if "algorithms/update.py" in e["site"]:
            update_reads[e["site"].split(" ")[1].strip("()")] += e["count"]
    out = {"bench": "host_syncs", "case": args.case, "device": str(device), "torch": torch.__version__,
           "iteration_s": plain_s, "iteration_s_audited": audited_s,
           "optimizer_steps": metrics.get("train/num_updates"), "micro_steps_backward": metrics.get("passes/backward"),
           "hot_region_requests": sum(e["count"] for e in events if e["region"] in HOT),
           "update_driver_reads": dict(update_reads), "events": events}
    if device.type == "cuda":
        _, out["cuda_sync_report"] = cuda_sync_report(trainer.train_iteration)
        if args.trace:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                _timed(trainer.train_iteration, device)
            Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(args.trace)
            out["trace"] = args.trace
            out["profile_top"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
