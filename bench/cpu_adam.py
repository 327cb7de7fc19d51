"""AdamW step time on the CPU, as FSDP2's CPU offload runs it: torch's default (foreach) and fused kernels,
and DeepSpeed's CPUAdam when deepspeed is importable (it is not a dependency: this is the measurement that
says it buys nothing over torch's fused kernel). Prints JSON.

    python bench/cpu_adam.py [--params 50000000] [--threads 1] [--steps 3]
"""

import argparse
import json
import time

import torch


def _time_steps(make, n: int, steps: int) -> float:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = make([p])
    opt.step()  # state allocation (and DeepSpeed's one-off JIT build) outside the timing
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=50_000_000, help="float32 parameters in the shard")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args(argv)
    if a.params < 1 or a.steps < 1 or a.threads < 1:
        raise ValueError("--params, --steps and --threads must be positive")
    torch.set_num_threads(a.threads)
    kw = dict(lr=1e-5, weight_decay=1e-4)
    makers = {"torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
              "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw)}
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        makers["deepspeed_cpu_adam"] = lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **kw)
    except ImportError:
        pass
    out = {"params": a.params, "threads": a.threads, "seconds_per_step": {}}
    for name, make in makers.items():
        out["seconds_per_step"][name] = _time_steps(make, a.params, a.steps)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
