"""Benchmark: eager SDE-step log-prob (research-code formula) vs the fused kernel (fastvideo_grpo.sde.ops).

Times, on the same inputs in one run, the flow-matching re-scoring step as research code writes it
(x_hat, score, mean, Gaussian log-prob, mean over dims: ~15 elementwise passes) against the fused op
(one pass forward, one pass backward) as the schedules call it: coefficients from a table made once,
rows named by a step index (``sde_step_at``; ``fused_ms``), and, for comparison, with per-sample
coefficients computed on every call (``flow_coefficients`` + ``fused_sde_step``; ``fused_percall_coef_ms``),
for the latent sizes of FLUX at 1024 px
(16x128x128) and HunyuanVideo 480p x 53 frames (16x14x60x60), batch 1 and 8, forward and
forward+backward. A plain ``dst.copy_(src)`` of the same latent size gives the memory-bandwidth
ceiling, and ``torch.compile`` of the eager formula (what a user would otherwise pick) is timed in the
same run (``--no-compile`` skips it). ``host_cost`` times the step at a tiny latent (batch 1, 16x8x8) in
units of one ``torch.mul`` on the same tensor: the per-call host work in ATen calls. Prints one JSON
line with ``--json`` (a table otherwise).

    python bench/logprob_kernel.py --json [--device cuda] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from fastvideo_grpo.sde.ops import (extension_available, flow_coefficient_table, flow_coefficients, fused_sde_step,
                                kernel_supports, sde_step_at)
from fastvideo_grpo.utils.threads import set_num_threads

SHAPES = {"flux_1024px": (16, 128, 128), "hunyuan_480p_53f": (16, 14, 60, 60)}
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def eager_logprob(u, z, prev, sigma, sigma_next, eta):
    """The research-code re-scoring step: every intermediate materialised."""
    view = (-1,) + (1,) * (z.ndim - 1)
    s, s_next, e = sigma.view(view), sigma_next.view(view), eta.view(view)
    dt = s_next - s
    x_hat = z - s * u
    score = -(z - (1.0 - s) * x_hat) / (s * s)
    mean = z + (u - 0.5 * e * e * score) * dt
    std = e * torch.sqrt(-dt)
    lp = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def fused_logprob_percall_coefs(u, z, prev, sigma, sigma_next, eta):
    """The fused op with per-sample coefficients computed on every call (the pre-table way)."""
    A, C, S = flow_coefficients(sigma, sigma_next, eta, batch_size=z.shape[0], device=z.device)
    return fused_sde_step(u, z, A, C, S, prev_sample=prev)[1]


def table_logprob(table, index):
    """The fused op as the schedules call it: a (T, 3) coefficient table made once, rows by step index."""
    def fn(u, z, prev, sigma, sigma_next, eta):
        return sde_step_at(u, z, table, index, prev_sample=prev)[1]
    return fn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):  # best of reps: least disturbed by other load on the machine
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


_COMPILED = {}


def compiled_logprob():
    """``torch.compile`` of the eager formula: what a user would reach for instead of a custom kernel.
    Dynamic shapes, so one compilation per pass (no-grad / grad) serves every case."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(eager_logprob, dynamic=True)
    return _COMPILED["fn"]


def run_case(name, shape, batch, device, dtype, reps, compiled=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    full = (batch,) + shape
    z = torch.randn(full, generator=g).to(device, dtype)
    u = torch.randn(full, generator=g).to(device, dtype)
    sigma = torch.rand(batch, generator=g, dtype=torch.float64) * 0.7 + 0.2
    sigma_next, eta = sigma - 0.05, torch.full((batch,), 0.7, dtype=torch.float64)
    # the schedules' table: one row per sample here (each sample at its own step), made once, on the CPU
    table = torch.stack(flow_coefficients(sigma, sigma_next, eta), dim=1)
    index = torch.arange(batch)
    fused_logprob = table_logprob(table, index)
    sigma, sigma_next, eta = (t.to(device, torch.float32) for t in (sigma, sigma_next, eta))
    prev = (z + 0.05 * torch.randn(full, generator=g).to(device, dtype)).contiguous()
    numel = z.numel()
    elt = z.element_size()

    src, dst = torch.randn(full, generator=g).to(device, dtype), torch.empty(full, device=device, dtype=dtype)
    t_copy = timeit(lambda: dst.copy_(src), device, reps=max(6 * reps, 30))  # cheap: many reps, best kept
    copy_bw = 2 * numel * elt / t_copy

    out = []
    for pass_ in ("fwd", "fwd+bwd"):
        def make(fn):
            if pass_ == "fwd":
                def f():
                    with torch.no_grad():
                        fn(u, z, prev, sigma, sigma_next, eta)
            else:
                uu = u.clone().requires_grad_()

                def f():
                    uu.grad = None
                    fn(uu, z, prev, sigma, sigma_next, eta).sum().backward()
            return f

        t_eager = timeit(make(eager_logprob), device, reps)
        t_fused = timeit(make(fused_logprob), device, reps)
        t_percall = timeit(make(fused_logprob_percall_coefs), device, reps)
        t_comp = timeit(make(compiled_logprob()), device, reps, warmup=2) if compiled else None
        # fused traffic: forward reads u, z, prev; backward reads u, z, prev and writes grad_u
        bytes_moved = numel * elt * (3 if pass_ == "fwd" else 7)
        out.append({
            "case": name, "shape": list(full), "batch": batch, "pass": pass_, "dtype": str(dtype).replace("torch.", ""),
            "eager_ms": round(t_eager * 1e3, 3), "fused_ms": round(t_fused * 1e3, 3),
            "speedup_vs_eager": round(t_eager / t_fused, 2), "fused_percall_coef_ms": round(t_percall * 1e3, 3),
            "compiled_ms": round(t_comp * 1e3, 3) if compiled else None,
            "speedup_vs_compiled": round(t_comp / t_fused, 2) if compiled else None,
            "fused_bytes_per_s": round(bytes_moved / t_fused), "copy_bytes_per_s": round(copy_bw),
            "fraction_of_copy_bw": round(bytes_moved / t_fused / copy_bw, 3),
        })
    return out


TINY_SHAPE = (1, 16, 8, 8)  # batch 1, a 16x8x8 latent: the op's host cost dominates its time


def _per_call(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def host_cost(device, dtype, rounds=9, calls=2000):
    """Per-call time of the SDE step at TINY_SHAPE in units of one elementwise ``torch.mul`` on the same tensor.

    At this size the arithmetic is negligible, so the ratio is the host cost (Python, dispatch, small
    tensor work, allocations) in units of one ATen call. Three entries:

    * ``schedule_step`` (the headline): what the trainer calls to re-score a stored transition,
      ``FlowSchedule.step(index_B, u, z, prev_sample=prev, need_mean=False)`` under no_grad, schedule
      values looked up by step index;
    * ``op_table``: the op alone, ``sde_step_at`` with the schedule's table (made beforehand);
    * ``op_per_sample_coefs``: ``fused_sde_step`` with per-sample coefficient tensors made beforehand;
    * ``schedule_step_fwd_bwd``: the schedule step with grad + ``lp.sum().backward()``, against
      ``(u * z).sum().backward()``.

    Rounds interleave the op and its yardstick (a shared machine's load hits both alike); the minimum
    and the median over rounds are reported."""
    from fastvideo_grpo.sde import FlowSchedule

    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(TINY_SHAPE, generator=g).to(device, dtype)
    u = torch.randn(TINY_SHAPE, generator=g).to(device, dtype)
    sched = FlowSchedule.create(16, eta=0.7, shift=3.0)
    idx = torch.tensor([5])
    prev = sched.step(idx, u, z, generator=g)[0].to(dtype)
    A, C, S = flow_coefficients(sched.sigmas[idx], sched.sigmas[idx + 1], sched.eta[idx], batch_size=1, device=device)
    uu = u.clone().requires_grad_()

    def mul():
        torch.mul(u, z)

    def step():
        sched.step(idx, u, z, prev_sample=prev, need_mean=False)

    def op():
        fused_sde_step(u, z, A, C, S, prev_sample=prev)

    table = flow_coefficient_table(sched.sigmas, sched.eta)

    def op_table():
        sde_step_at(u, z, table, idx, prev_sample=prev)

    def mul_bwd():
        uu.grad = None
        torch.mul(uu, z).sum().backward()

    def step_bwd():
        uu.grad = None
        sched.step(idx, uu, z, prev_sample=prev, need_mean=False)[1].sum().backward()

    pairs = {"schedule_step": (step, mul, True), "op_table": (op_table, mul, True),
             "op_per_sample_coefs": (op, mul, True), "schedule_step_fwd_bwd": (step_bwd, mul_bwd, False)}
    out = {"shape": list(TINY_SHAPE), "dtype": str(dtype).replace("torch.", ""), "rounds": rounds, "calls": calls}
    for name, (fn, ref, no_grad) in pairs.items():
        ratios, t_fn, t_ref = [], [], []
        with torch.set_grad_enabled(not no_grad):
            for f in (fn, ref):
                _per_call(f, max(calls // 10, 10))  # warm-up
            _sync(device)
            for r in range(rounds):
                order = (fn, ref) if r % 2 == 0 else (ref, fn)
                t = {}
                for f in order:
                    t[f] = _per_call(f, calls)
                    _sync(device)
                t_fn.append(t[fn])
                t_ref.append(t[ref])
                ratios.append(t[fn] / t[ref])
        ratios.sort()
        out[name] = {"us_per_call_min": round(min(t_fn) * 1e6, 2), "ref_us_per_call_min": round(min(t_ref) * 1e6, 2),
                     "aten_calls_min_over_min": round(min(t_fn) / min(t_ref), 2),
                     "aten_calls_median": round(ratios[len(ratios) // 2], 2)}
    out["host_cost_aten_calls"] = out["schedule_step"]["aten_calls_min_over_min"]
    return out


def _geomean(values):
    v = list(values)
    return round(math.exp(sum(math.log(x) for x in v) / len(v)), 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per case (best is reported)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    ap.add_argument("--no-compile", action="store_true", help="skip timing torch.compile of the eager formula")
    ap.add_argument("--host-cost-only", action="store_true",
                    help="only the tiny-shape host cost (seconds, not minutes)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise ValueError("--reps must be >= 1")
    set_num_threads(args.threads, "--threads")  # the trainer's rule; a negative count is a ValueError
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    hc = host_cost(device, dtype)
    cases = []
    for name, shape in ({} if args.host_cost_only else SHAPES).items():
        for batch in (int(b) for b in args.batches.split(",")):
            cases += run_case(name, shape, batch, device, dtype, args.reps, compiled=not args.no_compile)
    result = {
        "bench": "logprob_kernel",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "extension": extension_available(),
        "kernel_used": kernel_supports(torch.empty(0, device=device)),
        "host_cost_aten_calls": hc["host_cost_aten_calls"],
        "host_cost": hc,
        "cases": cases,
        "min_speedup_vs_eager": min((c["speedup_vs_eager"] for c in cases), default=None),
        "geomean_speedup_vs_eager": _geomean(c["speedup_vs_eager"] for c in cases) if cases else None,
        "geomean_speedup_vs_compiled": (None if args.no_compile or not cases
                                        else _geomean(c["speedup_vs_compiled"] for c in cases)),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k in ("schedule_step", "op_table", "op_per_sample_coefs", "schedule_step_fwd_bwd"):
            h = hc[k]
            print(f"host cost {k:>22} at {TINY_SHAPE}: {h['us_per_call_min']:7.2f} us = "
                  f"{h['aten_calls_min_over_min']:.2f} x torch.mul (median {h['aten_calls_median']:.2f})")
        for c in cases:
            comp = f"  compiled {c['compiled_ms']:9.2f} ms" if c["compiled_ms"] is not None else ""
            print(f"{c['case']:>18} B={c['batch']} {c['pass']:>7}: eager {c['eager_ms']:9.2f} ms{comp}  fused "
                  f"{c['fused_ms']:9.2f} ms  x{c['speedup_vs_eager']:.2f}  {c['fraction_of_copy_bw']:.2f} of copy bw")
    return result


if __name__ == "__main__":
    main()
