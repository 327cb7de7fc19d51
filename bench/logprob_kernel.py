"""Benchmark: eager SDE-step log-prob (research-code formula) vs the fused kernel (fastvideo_grpo.sde.ops).

Times, on the same inputs in one run, the flow-matching re-scoring step as research code writes it
(x_hat, score, mean, Gaussian log-prob, mean over dims: ~15 elementwise passes) against
``fused_sde_step`` (one pass forward, one pass backward), for the latent sizes of FLUX at 1024 px
(16x128x128) and HunyuanVideo 480p x 53 frames (16x14x60x60), batch 1 and 8, forward and
forward+backward. A plain ``dst.copy_(src)`` of the same latent size gives the memory-bandwidth
ceiling, and ``torch.compile`` of the eager formula (what a user would otherwise pick) is timed in the
same run (``--no-compile`` skips it). Prints one JSON line with ``--json`` (a table otherwise).

    python bench/logprob_kernel.py --json [--device cuda] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from fastvideo_grpo.sde.ops import extension_available, flow_coefficients, fused_sde_step, kernel_supports
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


def fused_logprob(u, z, prev, sigma, sigma_next, eta):
    A, C, S = flow_coefficients(sigma, sigma_next, eta, batch_size=z.shape[0], device=z.device)
    return fused_sde_step(u, z, A, C, S, prev_sample=prev)[1]


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
        t_comp = timeit(make(compiled_logprob()), device, reps, warmup=2) if compiled else None
        # fused traffic: forward reads u, z, prev; backward reads u, z, prev and writes grad_u
        bytes_moved = numel * elt * (3 if pass_ == "fwd" else 7)
        out.append({
            "case": name, "shape": list(full), "batch": batch, "pass": pass_, "dtype": str(dtype).replace("torch.", ""),
            "eager_ms": round(t_eager * 1e3, 3), "fused_ms": round(t_fused * 1e3, 3),
            "speedup_vs_eager": round(t_eager / t_fused, 2),
            "compiled_ms": round(t_comp * 1e3, 3) if compiled else None,
            "speedup_vs_compiled": round(t_comp / t_fused, 2) if compiled else None,
            "fused_bytes_per_s": round(bytes_moved / t_fused), "copy_bytes_per_s": round(copy_bw),
            "fraction_of_copy_bw": round(bytes_moved / t_fused / copy_bw, 3),
        })
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
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise ValueError("--reps must be >= 1")
    set_num_threads(args.threads, "--threads")  # the trainer's rule; a negative count is a ValueError
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    cases = []
    for name, shape in SHAPES.items():
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
        "cases": cases,
        "min_speedup_vs_eager": min(c["speedup_vs_eager"] for c in cases),
        "geomean_speedup_vs_eager": _geomean(c["speedup_vs_eager"] for c in cases),
        "geomean_speedup_vs_compiled": (None if args.no_compile else _geomean(c["speedup_vs_compiled"] for c in cases)),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for c in cases:
            comp = f"  compiled {c['compiled_ms']:9.2f} ms" if c["compiled_ms"] is not None else ""
            print(f"{c['case']:>18} B={c['batch']} {c['pass']:>7}: eager {c['eager_ms']:9.2f} ms{comp}  fused "
                  f"{c['fused_ms']:9.2f} ms  x{c['speedup_vs_eager']:.2f}  {c['fraction_of_copy_bw']:.2f} of copy bw")
    return result


if __name__ == "__main__":
    main()
