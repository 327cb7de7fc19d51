"""GRPO on the embedded toy task (tiny rectified-flow DiT, rule-based rewards): the CPU demo.

Single process (what `make demo` runs):
    python train_scripts/train_toy_grpo.py --config configs/toy_cpu.yaml
Any config field can be overridden:
    python train_scripts/train_toy_grpo.py --config configs/toy_cpu.yaml --train.num_iterations=50 --grpo.tau=1.0
Check the settings and the output folder only (nothing is pretrained or trained):
    python train_scripts/train_toy_grpo.py --check
The same flags as every train script: --output-dir, --resume latest|auto|<folder>, --overwrite, --no-progress,
--print-config (the resolved config, each value with where it came from); --pretrain-cache DIR: where the
pretrained toy model is cached (default: toy_pretrained/ beside the output folder; extra.pretrain_cache).

Writes to train.output_dir (default outputs/demo): summary.json, reward_curve.png, eval_curve.png,
samples_before_after.png, metrics.jsonl, config.yaml, policy.pt.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.cli.common import cli_entry, config_parser, parse_config  # noqa: E402
from fastvideo_grpo.cli.demo import check_toy_run, pretrain_cache, run_demo  # noqa: E402
from fastvideo_grpo.cli.train import recipe_path  # noqa: E402


def build_parser():
    p = config_parser(None, __doc__, recipe_path("configs/toy_cpu.yaml"))
    p.add_argument("--pretrain-cache", default=None,
                   help="folder of the cached pretrained toy model (sets extra.pretrain_cache; default: "
                        "toy_pretrained/ beside the output folder)")
    return p


def main(argv=None):
    parser = build_parser()
    args, cfg, _ = parse_config(parser, argv)
    if args.print_config:
        return {"printed": True}
    if args.pretrain_cache:
        cfg.extra["pretrain_cache"] = args.pretrain_cache
    if args.check:
        print(check_toy_run(cfg), flush=True)
        return {"checked": True}
    summary = run_demo(cfg, progress=cfg.log.progress)
    keys = ["reward_before", "reward_after", "improvement_abs", "improvement_rel", "per_reward_before",
            "per_reward_after", "extras_before", "extras_after", "success_rate_before", "success_rate_after",
            "background_before", "background_after", "wall_time_s"]
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    if "reward_before" in summary:
        print(_closing_lines(summary))
    if summary.get("watchdog"):
        print(_watchdog_lines(summary["watchdog"]))
    print(f"outputs in {cfg.train.output_dir}/ (summary.json, reward_curve.png, samples_before_after.png); "
          f"pretrained toy model cached in {pretrain_cache(cfg)}/")
    return summary


def _closing_lines(s) -> str:
    """The demo's headline numbers: held-out reward, success rate and background brightness, before -> after."""
    lines = [f"held-out reward: {s['reward_before']:.3f} -> {s['reward_after']:.3f} ({s['improvement_rel']:+.0%})"]
    if s.get("success_rate_before") is not None:
        b, a = s["success_rate_before"], s["success_rate_after"]
        ratio = f" ({a / b:.1f}x)" if b > 0 else ""
        lines.append(f"success rate (every check passed): {b:.3f} -> {a:.3f}{ratio}")
    if s.get("background_before") is not None:
        lines.append(f"background brightness: {s['background_before']:.4f} -> {s['background_after']:.4f}")
    return "\n".join(lines)


def _watchdog_lines(w) -> str:
    """The watchdog's outcome (train.watchdog): when the alarm fired, and the gold reward at best vs at the end."""
    alarm = w.get("alarm")
    fired = f"iteration {alarm['step']} ({', '.join(alarm['signals'])})" if alarm else "did not fire"
    lines = [f"watchdog alarm: {fired} (threshold {w['rule']['threshold']}, patience {w['rule']['patience']})"]
    best, last = w.get("best") or {}, w.get("last") or {}
    if best.get("step") is not None and last:
        key = best["by"]
        lines.append(f"gold {key}: best {best['value']:.4f} at iteration {best['step']} (kept in best/), "
                     f"{last['gold'].get(key, float('nan')):.4f} at the end (iteration {last['step']}); trained reward "
                     f"{last['trained']:.4f} at the end")
    return "\n".join(lines)


if __name__ == "__main__":  # a user error exits 2, a stop (divergence, train.watchdog.stop) 3 / 5, no traceback
    cli_entry(main)
