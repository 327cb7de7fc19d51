"""DanceGRPO and its successors side by side on the toy task at equal compute (``make algorithms``).

Each algorithm is the demo config (configs/toy_cpu.yaml) plus the overrides in ``ALGORITHMS``
(docs/algorithms.md explains the options), trained from the same cached pretrained toy model for every
seed. Compute is counted, not assumed: the trainer records each iteration's model passes
(``passes/forward`` and ``passes/backward``, per sample; fastvideo_grpo/algorithms/passes.py). A one-iteration
calibration run per algorithm measures its passes per iteration; every algorithm then gets the same
budget of forward + backward passes (``--iterations`` iterations of the first algorithm named), i.e.
``round(budget / passes per iteration)`` iterations, and is evaluated ``--evals`` times on the way.

Per algorithm and seed it records, at every evaluation: the iteration, cumulative forward and backward
passes, cumulative training seconds (the iterations' own wall-clock; evaluation and model loading
excluded), the held-out ``toy_geneval`` reward, the success rate (every check passed) and the
background brightness (texture: reward hacking). Outputs in ``--out``: results.json (the runs; resumable),
algorithms.json (printed), algorithms.md (the table) and reward_vs_passes.png / reward_vs_time.png.

    python bench/algorithms.py --out outputs/algorithms [--iterations 40] [--seeds 0 1 2] [--evals 4]
                               [--only dance_grpo,mixgrpo,...] [--jobs 1]
"""

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablations import VARIANTS  # noqa: E402
from toy_runs import config_tag, load_results, mean, run_variant, save_results  # noqa: E402
from fastvideo_grpo.utils.io import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from fastvideo_grpo.training.metrics import read_jsonl  # noqa: E402

_ODE = ["--sampling.eta_schedule=null"]  # the demo's per-step eta off; the algorithm sets its own
# name -> (settings in words, overrides of the demo config)
ALGORITHMS = {
    "dance_grpo": ("the demo: SDE (eta 1) on steps 0-4 of 10, all 5 trained, the last 5 by the frozen "
                   "pretrained expert", []),
    "dance_grpo_sde_every_step": ("DanceGRPO's own sampler: SDE (eta 0.7) at steps 0-8, "
                                  "int(0.6 x 9) = 5 random steps trained per sample",
                                  VARIANTS["sde_every_step"][1]),
    "mixgrpo": ("SDE (eta 1) and training in a window of 2 of steps 0-4, moving 1 step every 4 iterations "
                "(rolling back to step 0), ODE (Euler) elsewhere",
                ["--grpo.sde_window={mode: sliding, size: 2, start: 0, stride: 1, shift_every: 4, roll_back: true}"]),
    "mixgrpo_flash": ("as mixgrpo, with MixGRPO-Flash's released post strategy: Euler before the window, "
                      "DPM-Solver++(2M) after it on a grid compressed by 0.4",
                      ["--grpo.sde_window={mode: sliding, size: 2, start: 0, stride: 1, shift_every: 4, roll_back: true}",
                       "--sampling.ode_solver=dpmpp_2m", "--sampling.dpm_apply=post",
                       "--sampling.dpm_post_compress_ratio=0.4"]),
    "flow_grpo": ("Flow-GRPO's noise level (a = 0.7) at every step, the last one too, 6 steps for training "
                  "rollouts (10 for evaluation); steps 0-2 (the trained expert's) all trained; the released trainer's "
                  "per-prompt mean over the batch's std (+ 1e-4), zero-advantage samples dropped, 2 optimiser "
                  "steps over halves of the samples",
                  _ODE + ["--sampling.num_steps=6", "--sampling.eta=0.7", "--sampling.eta_form=flow_grpo",
                          "--sampling.deterministic_last_step=false", "--grpo.timestep_window=[0, 3]",
                          "--grpo.advantage=group_global_std", "--grpo.advantage_std=population",
                          "--grpo.advantage_eps=1e-4", "--grpo.drop_zero_advantage=true",
                          "--grpo.micro_batch_size=64", "--grpo.update_split=samples"]),
    "flow_grpo_fast": ("Flow-GRPO's noise level (a = 0.7) at 2 random consecutive steps of 0-4, both trained; "
                       "ODE elsewhere", _ODE + ["--sampling.eta=0.7", "--sampling.eta_form=flow_grpo",
                                                "--grpo.sde_window={mode: random, size: 2}"]),
    "diffusion_nft": ("the released objective: DPM-Solver++(2M) ODE rollouts sampled with the old policy (an EMA, "
                      "decay type 1), independent noise per sample, the adaptively weighted NFT loss (beta 1, "
                      "adv_clip_max 5) at the times of steps 0-4, all 5, per-prompt mean over the batch's std; no KL",
                      _ODE + ["--sampling.eta=0.0", "--sampling.ode_solver=dpmpp_2m", "--grpo.objective=nft",
                              "--grpo.nft_beta=1.0", "--grpo.shared_noise=false", "--grpo.adv_clip_max=5.0",
                              "--grpo.objective_kwargs={weighting: adaptive, decay_type: 1}",
                              "--grpo.advantage=group_global_std", "--grpo.advantage_std=population",
                              "--grpo.advantage_eps=1e-4"]),
    "grpo_guard": ("the demo's sampler; GRPO-Guard's objective: the per-step ratio normalised (RatioNorm), each "
                   "step's loss weighted by 1 / |dt|, clip 1e-3 (the demo's 3e-3 times the step std, 0.32)",
                   ["--grpo.objective=grpo_guard", "--grpo.objective_kwargs={reweight: dt}", "--grpo.clip_range=1e-3"]),
    "awm": ("ODE rollouts, independent noise per sample, the advantage-weighted flow-matching loss (ghuber, power "
            "0.25; advantages clipped to +-1) at the times of steps 0-4, one optimiser step per iteration",
            _ODE + ["--sampling.eta=0.0", "--grpo.objective=awm", "--grpo.shared_noise=false",
                    "--grpo.objective_kwargs={weighting: ghuber, ghuber_power: 0.25}", "--grpo.adv_clip_max=1.0",
                    "--grpo.num_updates_per_iteration=1"]),
    "cps": ("the demo with CPS steps (noise level 0.8) instead of the SDE at steps 0-4, all 5 trained",
            ["--sampling.eta_schedule=[0.8, 0.8, 0.8, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0]", "--sampling.eta_form=cps"]),
    "pref_grpo": ("the demo with the continuous toy_geneval reward replaced by its win rate within the group "
                  "(every pair of the 8 compared by toy_geneval); the binary reward kept",
                  ["--rewards=[{name: win_rate, key: toy_geneval_win, weight: 1.0, kwargs: {judge: toy_geneval}}, "
                   "{name: toy_geneval, threshold: 0.99, weight: 0.5}]", "--eval.rewards=[{name: toy_geneval}]"]),
    "dgpo": ("ODE rollouts (DPM-Solver++(2M), as released), independent noise per sample; DGPO's group-preference "
             "loss (beta 100, clip 1e-2, velocity KL 0.02: the released values) at 4 of the times of steps 0-4, "
             "shared by the batch", _ODE + ["--sampling.eta=0.0", "--sampling.ode_solver=dpmpp_2m",
                                             "--grpo.objective=dgpo", "--grpo.shared_noise=false", "--grpo.tau=0.8",
                                             "--grpo.objective_kwargs={beta: 100.0}", "--grpo.clip_range=1e-2",
                                             "--grpo.kl_coef=0.02"]),
    "tree_grpo": ("the demo's sampler as a tree: each group's 8 samples share their prefix and branch into 2 at "
                  "steps 0, 2 and 4; every edge of steps 0-4 trained once with its node's depth-normalised mean "
                  "reward (BranchGRPO)", ["--sampling.rollout=tree",
                                          "--sampling.rollout_kwargs={branch_steps: [0, 2, 4], branch_factor: 2}"]),
    "flow_dppo": ("the demo's sampler; Flow-DPPO's objective: the ratio unclipped, masked where the exact step "
                  "divergence passes 1e-5 (the released value) and the update moves away; 2 epochs per rollout",
                  ["--grpo.objective=flow_dppo", "--grpo.objective_kwargs={divergence_threshold: 1.0e-5}",
                   "--grpo.num_epochs=2"]),
}
# algorithms whose passes per iteration change with the iteration (MixGRPO-Flash: the compressed grid after a
# moving window): calibrated over this many iterations (a whole cycle of the window) and averaged
CALIBRATION_ITERATIONS = {"mixgrpo_flash": 16}
REWARD = "toy_geneval"
# one iteration, a one-sample evaluation: enough to read the passes per iteration
_CALIBRATION = ["--train.num_iterations=1", "--train.eval_every=0", "--train.num_eval_prompts=1",
                "--eval.samples_per_prompt=1", "--eval.batch_size=1"]


def _passes(row: Dict) -> int:
    return int(row["passes/forward"]) + int(row["passes/backward"])


def calibrate(config: str, names: List[str], out: Path, results: Dict, tag: str) -> Dict[str, Dict]:
    """Forward and backward passes per iteration of each algorithm (seed 0), measured: one iteration, or the mean
    over ``CALIBRATION_ITERATIONS`` of them where the count changes with the iteration."""
    per = {}
    for name in names:
        n = CALIBRATION_ITERATIONS.get(name, 1)
        key = f"calibration/{name}/{tag}/{config_tag(config, *ALGORITHMS[name][1], n)}"
        if key not in results:
            extra = [a for a in _CALIBRATION if not a.startswith("--train.num_iterations")]
            run_dir = out / "calibration" / name
            run_variant(config, ALGORITHMS[name][1], run_dir, 0, extra=extra + [f"--train.num_iterations={n}",
                                                                                  "--train.log_every=1"])
            rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "passes/forward" in r][-n:]
            avg = {k: mean([float(r[f"passes/{k}"]) for r in rows]) for k in ("forward", "backward", "forward_rollout")}
            results[key] = {**avg, "iteration_s": mean([float(r["time/iteration"]) for r in rows]),
                            "iterations": len(rows)}
            save_results(out, results)
        per[name] = results[key]
    return per


def plan(per: Dict[str, Dict], names: List[str], iterations: int, evals: int) -> Dict[str, Dict]:
    """Equal budget: ``iterations`` iterations of ``names[0]``, in passes; each algorithm's iteration count
    and evaluation interval."""
    budget = iterations * (per[names[0]]["forward"] + per[names[0]]["backward"])
    out = {}
    for name in names:
        its = max(1, round(budget / (per[name]["forward"] + per[name]["backward"])))
        out[name] = {"iterations": its, "eval_every": max(1, its // max(1, evals)), "budget_passes": budget}
    return out


def curve(run_dir: Path) -> List[Dict]:
    """The run's evaluations with the compute spent before each: cumulative passes and training seconds."""
    rows = [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if "passes/forward" in r]
    points = []
    for f in sorted((Path(run_dir) / "eval").glob("iter_*.json")):
        ev = json.loads(f.read_text())
        it = int(ev["iteration"])
        before = [r for r in rows if r["step"] <= it]
        x = ev.get("extras_mean", {})
        points.append({
            "iteration": it,
            "forward": sum(int(r["passes/forward"]) for r in before),
            "backward": sum(int(r["passes/backward"]) for r in before),
            "train_s": sum(float(r["time/iteration"]) for r in before),
            "reward": ev["mean"][REWARD],
            "success_rate": x.get(f"{REWARD}/all_correct"),
            "background": x.get(f"{REWARD}/background"),
        })
    return points


def _train(job):
    """One run (in this process or a worker); returns its results entry."""
    config, name, run_dir, seed, p = job
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_variant(config, ALGORITHMS[name][1], run_dir, seed, p["iterations"],
                    extra=[f"--train.eval_every={p['eval_every']}", "--train.log_every=1"])
    return {"curve": curve(run_dir), "iterations": s["iteration"], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0}


def summarise(results: Dict, names: List[str], seeds: List[int], tag: str, plans: Dict, per: Dict) -> Dict:
    """Per algorithm: per-seed runs and the means of their final points."""
    out = {}
    for name in names:
        runs = {s: results[f"{name}/seed{s}/{tag}"] for s in seeds if f"{name}/seed{s}/{tag}" in results}
        if not runs:
            continue
        finals = [r["curve"][-1] for r in runs.values()]
        out[name] = {
            "settings": ALGORITHMS[name][0], "overrides": ALGORITHMS[name][1], **plans[name],
            "passes_per_iteration": per[name],
            "final_mean": {k: mean([f[k] for f in finals]) for k in ("reward", "success_rate", "background",
                                                                    "train_s", "forward", "backward")},
            "runs": {str(s): r for s, r in runs.items()},
        }
    return out


def table(summary: Dict, seeds: List[int]) -> str:
    lines = ["| algorithm | iterations | passes fwd + bwd | seeds | held-out toy_geneval (mean; per seed) "
             "| success rate (mean; per seed) | background (mean; per seed) | training s (mean) | CPU s per run (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    start = None
    for name, a in summary.items():
        finals = [r["curve"][-1] for r in a["runs"].values()]
        start = start or next(iter(a["runs"].values()))["curve"][0]
        f = a["final_mean"]
        per_seed = lambda k, d: ", ".join(f"{x[k]:.{d}f}" for x in finals)  # noqa: E731
        lines.append(
            f"| {name} | {a['iterations']} | {f['forward']:.0f} + {f['backward']:.0f} "
            f"| {', '.join(a['runs'])} "
            f"| **{f['reward']:.3f}**; {per_seed('reward', 3)} | **{f['success_rate']:.3f}**; {per_seed('success_rate', 3)} "
            f"| **{f['background']:.4f}**; {per_seed('background', 4)} | {f['train_s']:.0f} "
            f"| {mean([r['cpu_s'] for r in a['runs'].values()]):.0f} |")
    if start:
        lines += ["", f"Pretrained model (iteration 0, every run): toy_geneval {start['reward']:.3f}, success rate "
                      f"{start['success_rate']:.3f}, background {start['background']:.4f}. Seeds asked: {seeds}. "
                      "Held-out: the demo's prompts and ODE sampler (10 Euler steps), the same initial noise throughout. "
                      "Training s: the iterations' wall-clock (evaluation excluded); CPU s: the whole run's process CPU "
                      "time (evaluations and model loading included). Settings: algorithms.json."]
    return "\n".join(lines) + "\n"


def plot(summary: Dict, path: Path, x_key: str, xlabel: str) -> None:
    """Held-out reward against ``x_key`` (mean over seeds, shaded between the lowest and highest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    colors = plt.get_cmap("tab20").colors  # one colour per algorithm (the default cycle repeats after 10)
    for i, (name, a) in enumerate(summary.items()):
        color, style = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], ("-", "--", ":")[i % 3]
        curves = [r["curve"] for r in a["runs"].values()]
        n = min(len(c) for c in curves)
        xs = [mean([_x(c[j], x_key) for c in curves]) for j in range(n)]
        ys = [[c[j]["reward"] for c in curves] for j in range(n)]
        ax.plot(xs, [mean(y) for y in ys], color=color, linestyle=style, marker="o", markersize=3, linewidth=1.6,
                label=name)
        if len(curves) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"held-out {REWARD}")
    ax.set_title("toy task, equal pass budget: mean over seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _x(point: Dict, key: str) -> float:
    return point["forward"] + point["backward"] if key == "passes" else point[key]


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy_cpu.yaml")
    ap.add_argument("--out", default="outputs/algorithms")
    ap.add_argument("--iterations", type=int, default=40,
                    help="the pass budget, as iterations of the first algorithm (dance_grpo by default)")
    ap.add_argument("--evals", type=int, default=4, help="evaluations during training (plus before and after)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", default="", help="comma-separated algorithm names, in the order to run")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time (separate processes if > 1)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(ALGORITHMS)
    unknown = [n for n in names if n not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; known: {list(ALGORITHMS)}")
    if args.iterations < 1 or args.jobs < 1:
        raise ValueError("--iterations and --jobs must be >= 1")
    out = Path(args.out)
    tag = config_tag(args.config, "algorithms", args.iterations, args.evals, names[0])
    results = load_results(out)
    per = calibrate(args.config, names, out, results, config_tag(args.config))
    plans = plan(per, names, args.iterations, args.evals)
    # seed-major: an interrupted run still has every algorithm on the first seeds; finished runs are kept
    jobs = [(args.config, n, out / n / f"seed{s}", s, plans[n]) for s in args.seeds for n in names
            if f"{n}/seed{s}/{tag}" not in results]

    def record(job, entry):
        results[f"{job[1]}/seed{job[3]}/{tag}"] = entry
        save_results(out, results)
        c = entry["curve"][-1]
        print(f"{job[1]} seed {job[3]}: reward {entry['curve'][0]['reward']:.3f} -> {c['reward']:.3f}, "
              f"{c['forward'] + c['backward']} passes, {c['train_s']:.0f} s", flush=True)

    if args.jobs == 1:
        for job in jobs:
            record(job, _train(job))
    else:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for job, entry in zip(jobs, pool.map(_train, jobs)):
                record(job, entry)
    summary = summarise(results, names, args.seeds, tag, plans, per)
    report = {"budget_passes": plans[names[0]]["budget_passes"], "budget_reference": names[0],
              "seeds": args.seeds, "evals": args.evals, "algorithms": summary}
    atomic_write_json(out / "algorithms.json", report)
    atomic_write_text(out / "algorithms.md", table(summary, args.seeds))
    plot(summary, out / "reward_vs_passes.png", "passes", "model passes (forward + backward, per sample)")
    plot(summary, out / "reward_vs_time.png", "train_s", "training wall-clock (s; evaluation excluded)")
    print(json.dumps(report, indent=1))
    print((out / "algorithms.md").read_text())
    return report


if __name__ == "__main__":
    main()
