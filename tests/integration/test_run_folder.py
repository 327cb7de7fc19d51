"""Run folders are safe and resume always works (issue: reliability), through the real entry points on the
toy model (runner.run) and the FLUX train script: a used folder is refused without --resume / --overwrite,
two runs cannot share a folder, config.yaml records what runs, checkpoint clean-up touches only the run's own
checkpoints, a cut-off metrics line and a corrupt newest checkpoint do not block resume, a failed save leaves
no partial folder, and groups without signal are reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from fastvideo_grpo.training.runner import PromptSets, run

WORKERS = Path(__file__).resolve().parents[1] / "distributed" / "workers"
sys.path.insert(0, str(WORKERS))
from common import PROMPTS, redness, run_config, tiny_adapter  # noqa: E402

RF = dict(reward_fns={"red": redness}, reward_weights={"red": 1.0})


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def _run(out, iters=2, **kw):
    cfg = run_config(out, iters, save_every=kw.pop("save_every", 1), resume=kw.pop("resume", None))
    for key, value in kw.pop("set", {}).items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return run(cfg.validate(), tiny_adapter, PromptSets(PROMPTS), **RF, **kw)


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def test_a_used_folder_is_refused_then_overwritten_on_request(tmp_path):
    out = tmp_path / "run"
    _run(out, 2)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds a run already .*--resume latest.*--overwrite"):
        _run(out, 1)
    assert (out / "metrics.jsonl").read_text() == before and _steps(out) == ["step_00000001", "step_00000002"]
    s = _run(out, 1, set={"train.overwrite": True})
    assert s["iteration"] == 1 and _steps(out) == ["step_00000001"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert Path(s["last_checkpoint"]).is_dir()


def test_clean_up_keeps_the_checkpoints_of_another_lineage(tmp_path):
    """Resuming from step 2 of a 4-step run with keep_last 1: the newly written step 3 survives (the old code
    sorted every step_* folder, deleted step 3 and left `latest` naming a missing folder)."""
    out = tmp_path / "run"
    _run(out, 4)
    s = _run(out, 3, resume=str(out / "checkpoints" / "step_00000002"), set={"train.keep_last_checkpoints": 1})
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert _steps(out) == ["step_00000003", "step_00000004"] and Path(s["last_checkpoint"]).is_dir()


def test_a_second_run_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    from fastvideo_grpo.training.run_folder import LOCK, RunLock

    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(ValueError, match=rf"in use by another run \(process {os.getpid()} on "):
            _run(out, 1)
    # a lock left by a crashed process (its pid is gone) is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": "x"}))
    assert _run(out, 1)["iteration"] == 1 and not (out / LOCK).exists()


def test_config_yaml_records_what_runs(tmp_path):
    out = tmp_path / "run"
    _run(out, 1)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    # a start that fails while building leaves the record alone
    with pytest.raises(RuntimeError, match="broken model"):
        run(run_config(out, 2, resume="latest"), lambda d: (_ for _ in ()).throw(RuntimeError("broken model")),
            PromptSets(PROMPTS), **RF)
    assert yaml.safe_load((out / "config.yaml").read_text()) == recorded
    # a resume with a new lr trains at that lr and records it; the earlier record is kept
    seen = []
    from fastvideo_grpo.training.loop import Component

    class Lr(Component):
        def on_iteration(self, state, it, m):
            seen.append(state.trainer.optimizer.param_groups[0]["lr"])

    _run(out, 2, resume="latest", set={"optim.lr": 0.5, "optim.warmup_iterations": 0},
         extra_components=lambda parts: [Lr()])
    assert seen == [0.5]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5
    assert yaml.safe_load((out / "config.1.yaml").read_text()) == recorded
    with pytest.raises(ValueError, match=r"cannot change train.seed: 3 -> 4"):
        _run(out, 3, resume="latest", set={"train.seed": 4})


def test_cut_off_metrics_line_and_corrupt_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    _run(out, 3)
    with open(out / "metrics.jsonl", "a") as f:  # a crash (or a full disk) mid-write
        f.write('{"step": 4, "train/loss": 0.1, "rew')
    torch.save({"truncated": True}, out / "checkpoints" / "step_00000003" / "extra" / "rank_0.pt")
    data = (out / "checkpoints" / "step_00000003" / "extra" / "rank_0.pt").read_bytes()
    (out / "checkpoints" / "step_00000003" / "extra" / "rank_0.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"step_00000003 cannot be read .*previous checkpoint is .*step_00000002"):
        _run(out, 4, resume="latest")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s = _run(out, 4, resume="auto")
    msgs = " ".join(str(x.message) for x in w)
    assert "step_00000003 cannot be read" in msgs and "falls back to" in msgs and "cut-off last line" in msgs
    assert s["iterations_run"] == 2  # from iteration 2 to 4
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4 and steps.count(3) == 1


def test_a_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from fastvideo_grpo.training.loop import TrainingStopped

    out = tmp_path / "run"
    real = dcp.save

    def full_disk(state, checkpoint_id):
        real(state, checkpoint_id=checkpoint_id)
        raise OSError(28, "No space left on device")

    _run(out, 1)
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(TrainingStopped, match="out of disk space .*No space left on device"):  # the one line
        _run(out, 2, resume="latest")
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"


def test_iterations_without_signal_are_reported(tmp_path):
    from fastvideo_grpo.training.loop import Component

    rows = []

    class Rows(Component):
        def on_iteration(self, state, it, m):
            rows.append(m)

    const = {"reward_fns": {"c": lambda images, prompts, **_: (torch.zeros(len(prompts)), {})},
             "reward_weights": {"c": 1.0}}
    cfg = run_config(tmp_path / "run", 1, save_every=0)
    with pytest.warns(UserWarning, match="identical rewards, so every advantage is 0"):
        run(cfg, tiny_adapter, PromptSets(PROMPTS), extra_components=lambda parts: [Rows()], **const)
    assert rows[0]["adv/zero_groups"] == 1.0
    _run(tmp_path / "run2", 1, extra_components=lambda parts: [Rows()])
    assert rows[1]["adv/zero_groups"] == 0.0


def test_outputs_respect_the_umask(tmp_path):
    from fastvideo_grpo.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.txt", "hi")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644
