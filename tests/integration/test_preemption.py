"""Graceful stop and "a rerun finishes what the run promised" (training/preemption.py, docs/reliability.md).

The toy entry point (train_scripts/train_toy_grpo.py, tiny sizes, 4 iterations, an evaluation every 2) is stopped
mid-run by SIGTERM, in one process (a real signal from this test, sent when the run prints that it waits at
iteration 2) and in two under torchrun (rank 1 alone signals itself after training iteration 2:
the ranks must agree to stop together). Each time: exit 0, the line, a checkpoint at iteration 2; the same command
then resumes and ends with exit 0 and the outputs of an uninterrupted run. Equal bitwise: every non-timing number
of summary.json and metrics.jsonl, the evaluations, the curves and the before / after grid (PNG bytes), the exported
and policy weights: the resumed run has the same process count, thread count (1) and shapes as the uninterrupted
one, so the same kernels see the same inputs (the existing resume tests rely on the same). In-process runs of the
tiny DiT check the stop file, the time budget (which also stops at the last iteration, leaving the end to the
rerun) and a run whose export failed (a full disk) finishing it when rerun with resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.training.metrics import wall_clock_metric

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_preempt_worker.py"
SCRIPT = ROOT / "train_scripts" / "train_toy_grpo.py"
ARGS = ["--no-progress", "--train.num_iterations=4", "--train.eval_every=2", "--train.num_eval_prompts=4",
        "--grpo.prompts_per_iteration=2", "--grpo.group_size=4", "--sampling.num_steps=3",
        "--sampling.eval_num_steps=3", "--sampling.eta_schedule=[1.0, 1.0, 0.0]", "--grpo.timestep_window=[0, 2]",
        "--eval.samples_per_prompt=2", "--eval.batch_size=8", "--log.curve_every=1",
        # a continuous reward too: the barely pretrained model's geneval ties within groups (zero advantages)
        "--rewards=[{name: toy_geneval}, {name: toy_colour_fidelity, weight: 0.5}]",
        "--extra.pretrain.steps=3", "--extra.pretrain.num_images=32", "--extra.pretrain.batch_size=8",
        "--extra.pretrain.model={hidden: 32, depth: 1, heads: 2}",
        "--extra.pretrain.autoencoder={image_size: 16, hidden: 16, steps: 3}"]
# timings, and iterations_run: the iterations of this call only
TIMING = {"wall_time_s", "pretrain_time_s", "grpo_time_s", "eval_time_s", "iterations_run",
          "throughput"}  # the summary's throughput: frames per second and MFU over the run's wall-clock


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("PREEMPT_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _command(out, nproc):
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    return launch + [str(WORKER), str(SCRIPT)] + ARGS + [f"--train.output_dir={out}"]


def _run(cwd, out, nproc=1, **hooks):
    r = subprocess.run(_command(out, nproc), cwd=cwd, env=_env(**hooks), capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if k not in TIMING and not wall_clock_metric(k)}
    return obj


def _outputs(out: Path):
    """What the run reports at its end, with its own folder's name replaced and timings dropped."""
    summary = json.loads((out / "summary.json").read_text().replace(str(out), "<out>"))
    rows = [_strip(json.loads(x)) for x in (out / "metrics.jsonl").read_text().splitlines()]
    files = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.suffix in (".json", ".png") and p.name != "summary.json"}
    return _strip(summary), rows, files


def _assert_same_end(a: Path, b: Path):
    from safetensors.torch import load_file

    sa, ra, fa = _outputs(a)
    sb, rb, fb = _outputs(b)
    assert sb == sa, "summary.json differs from the uninterrupted run's"
    assert rb == ra and [r["step"] for r in ra] == [0, 1, 2, 3, 4, 4], "metrics.jsonl differs"
    assert sorted(fb) == sorted(fa) and {k for k in fa if k.endswith(".png")} >= {
        "reward_curve.png", "eval_curve.png", "samples_before_after.png"}
    for name in fa:
        assert fb[name] == fa[name], f"{name} differs from the uninterrupted run's"
    wa, wb = (load_file(str(o / "export" / "model.safetensors")) for o in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = (torch.load(o / "policy.pt", weights_only=True) for o in (a, b))  # the bytes hold the temp file's name
    assert pa["config"] == pb["config"] and pa["state_dict"].keys() == pb["state_dict"].keys()
    assert all(torch.equal(pa["state_dict"][k], pb["state_dict"][k]) for k in pa["state_dict"])
    assert sa["stop_request"] is None and sa["reward_before"] == sb["reward_before"]
    assert not (b / "stopped.json").exists()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The working folder of the script runs (its pretrained-model cache is shared) and the uninterrupted run."""
    cwd = tmp_path_factory.mktemp("preempt")
    rc, log = _run(cwd, cwd / "whole")
    assert rc == 0, log[-4000:]
    return cwd


def test_sigterm_saves_and_the_same_command_resumes_to_the_same_end(work):
    """One process, a real SIGTERM from outside while the run waits at iteration 2, then SIGTERM and SIGINT again
    during the checkpoint save (ignored); the rerun of the same command (the demo config's train.overwrite: true
    included) resumes from iteration 2 and prints the before / after headline."""
    out = work / "stopped"
    proc = subprocess.Popen(_command(out, 1), cwd=work, env=_env(PREEMPT_WAIT_AT="2", PREEMPT_AGAIN_IN_SAVE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:  # the worker waits for the signal at most 120 s, then goes on (and the test fails)
        log.append(line)
        if line.startswith("READY "):
            os.kill(int(line.split()[1]), signal.SIGTERM)
            break
    log += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 0, "".join(log)[-4000:]
    text = "".join(log)
    assert "stopped by SIGTERM at iteration 2 of 4; checkpoint saved" in text, text[-3000:]
    assert "rerun the same command to resume" in text and "received again: ignored" in text
    assert "Traceback" not in text
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    record = json.loads((out / "stopped.json").read_text())
    assert record["reason"] == "SIGTERM" and record["iteration"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

    rc, log = _run(work, out, PREEMPT_WAIT_AT="2", PREEMPT_AGAIN_IN_SAVE="1")  # the same command
    assert rc == 0, log[-4000:]
    assert "resuming the run stopped by SIGTERM at iteration 2" in log and "held-out reward:" in log, log[-3000:]
    _assert_same_end(work / "whole", out)


def test_two_ranks_stop_together_when_one_gets_sigterm(work):
    """torchrun, 2 gloo processes: rank 1 alone gets SIGTERM after training iteration 2; both stop after it (the
    reduced flag), save one checkpoint collectively and exit 0; the same command resumes to the uninterrupted end."""
    whole, out = work / "whole2", work / "stopped2"
    rc, log = _run(work, whole, nproc=2)
    assert rc == 0, log[-4000:]
    rc, log = _run(work, out, nproc=2, PREEMPT_KILL_AT="2:1")
    assert rc == 0, log[-4000:]
    assert "stopped by SIGTERM (rank 1) at iteration 2 of 4; checkpoint saved" in log, log[-3000:]
    step = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (step / "extra").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    rc, log = _run(work, out, nproc=2, PREEMPT_KILL_AT="2:1")  # the same command
    assert rc == 0, log[-4000:]
    _assert_same_end(whole, out)


# ----------------------------------------------------------------------------- in process: the tiny DiT


@pytest.fixture()
def tiny_run(monkeypatch):
    sys.path.insert(0, str(ROOT / "tests" / "distributed" / "workers"))
    from common import PROMPTS, redness, run_config, tiny_adapter

    from fastvideo_grpo.training.runner import PromptSets, run

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)

    def go(out, resume=None, components=(), **train):
        cfg = run_config(out, 3, save_every=0, resume=resume)
        for k, v in train.items():
            setattr(cfg.train, k, v)
        return run(cfg.validate(), tiny_adapter, PromptSets(PROMPTS), reward_fns={"red": redness},
                   reward_weights={"red": 1.0}, extra_components=lambda parts: list(components))

    return go


def _rows(out):
    from fastvideo_grpo.training.metrics import read_jsonl

    return [_strip(r) for r in read_jsonl(out / "metrics.jsonl")]


def _same_run(a: Path, b: Path):
    from safetensors.torch import load_file

    assert _rows(b) == _rows(a)
    sa, sb = (_strip(json.loads((o / "summary.json").read_text().replace(str(o), "<out>"))) for o in (a, b))
    assert sb == sa and sa["export"] and sa["last_metrics"]
    wa, wb = (load_file(str(o / "export" / "model.safetensors")) for o in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (b / "reward_curve.png").read_bytes() == (a / "reward_curve.png").read_bytes()


def test_stop_file_time_budget_and_an_unfinished_end(tiny_run, tmp_path, monkeypatch):
    from fastvideo_grpo.training import checkpoint
    from fastvideo_grpo.training.loop import EXIT_NO_SPACE, Component, TrainingStopped
    from fastvideo_grpo.training.preemption import RunStopped

    whole = tmp_path / "whole"
    tiny_run(whole)

    # train.stop_file: created during iteration 1's components, after the decision: the run stops after iteration 2
    class Touch(Component):
        def on_iteration(self, state, it, metrics):
            if it == 1:
                (state.out / "STOP").touch()

    out = tmp_path / "file"
    with pytest.raises(RunStopped, match=r"stopped by the stop file .*STOP .* at iteration 2 of 3") as e:
        tiny_run(out, components=[Touch()], stop_file="STOP")
    assert e.value.exit_code == 0 and not (out / "STOP").exists()  # removed: the rerun does not stop again
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    tiny_run(out, components=[Touch()], stop_file="STOP")  # the same call: resumes (stopped.json), then finishes
    _same_run(whole, out)
    assert not (out / "stopped.json").exists()

    # train.max_wall_time shorter than any iteration: every call trains one iteration and stops saved (exit code as
    # configured); the third stops at the last iteration, before the end, which the fourth call then does alone
    out = tmp_path / "budget"
    for it in (1, 2, 3):
        with pytest.raises(RunStopped, match=rf"train.max_wall_time .* at iteration {it} of 3") as e:
            tiny_run(out, max_wall_time=1e-3, stop_exit_code=75)
        assert e.value.exit_code == 75
    assert not (out / "export").exists() and "before the final evaluation and export" in str(e.value)
    s = tiny_run(out, max_wall_time=1e-3, stop_exit_code=75)
    assert s["iterations_run"] == 0 and s["export"]
    _same_run(whole, out)

    # a full disk during the final export: the run fails after its last checkpoint; the same call (stopped.json,
    # written as the end began) resumes and exports; --resume latest would do the same
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    out = tmp_path / "disk"
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "export_weights", full_disk)
        with pytest.raises(TrainingStopped, match="out of disk space .*No space left on device") as e:  # one line
            tiny_run(out)
    assert e.value.exit_code == EXIT_NO_SPACE and "step_00000003, is kept" in str(e.value)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert json.loads((out / "stopped.json").read_text())["reason"] == "end"
    s = tiny_run(out)
    assert s["iterations_run"] == 0 and s["export"]
    _same_run(whole, out)


def test_signals_are_recorded_once_and_handlers_restored():
    from fastvideo_grpo.training.preemption import StopSignals, active, wall_time_exceeded

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        assert active() is s and s.signal_name is None
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.signal_name == "SIGINT" and s.repeats == 1
    assert active() is None and signal.getsignal(signal.SIGTERM) is before
    # the budget: time so far + the longest iteration + the longest save (before one: another longest iteration)
    assert not wall_time_exceeded(50.0, [10.0, 20.0], [5.0], 80.0)
    assert wall_time_exceeded(56.0, [10.0, 20.0], [5.0], 80.0)
    assert wall_time_exceeded(41.0, [10.0, 20.0], [], 80.0) and not wall_time_exceeded(39.0, [10.0, 20.0], [], 80.0)
    assert not wall_time_exceeded(1e9, [10.0], [], 0.0)  # 0: no budget
