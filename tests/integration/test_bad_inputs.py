"""Bad inputs met during a run (issue 39): a non-finite reward is caught on its raw scores, before a threshold
hides it; a full disk ends the run with one line and keeps the last whole checkpoint; a killed run's temporary
files are removed by the rerun. Through the real loop (runner.run) on the tiny toy DiT."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch

from fastvideo_grpo.config import RewardConfig
from fastvideo_grpo.rewards.base import REWARDS
from fastvideo_grpo.training.loop import EXIT_DIVERGED, TrainingStopped
from fastvideo_grpo.training.runner import PromptSets, run

WORKERS = Path(__file__).resolve().parents[1] / "distributed" / "workers"
sys.path.insert(0, str(WORKERS))
from common import PROMPTS, redness, run_config, tiny_adapter  # noqa: E402

CALLS = {"n": 0, "prompts": None}


def _nan_on_second_call(**_):
    def score(images, prompts, **meta):
        CALLS["n"] += 1
        s, _ = redness(images, prompts)
        if CALLS["n"] == 2:  # iteration 2: one sample's score is NaN (NaN >= threshold is False: it would become 0)
            s = s.clone()
            s[2] = float("nan")
            CALLS["prompts"] = list(prompts)
        return s, {}

    return score


if "test_nan_second_call" not in REWARDS.names():
    REWARDS.register("test_nan_second_call")(_nan_on_second_call)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


@pytest.mark.filterwarnings("ignore:iteration 1. every group")  # the binary reward is 0 for all at first
def test_a_nan_score_of_a_thresholded_reward_stops_the_run_naming_reward_sample_and_prompt(tmp_path):
    CALLS.update(n=0, prompts=None)
    out = tmp_path / "run"
    cfg = run_config(out, num_iterations=3, save_every=1)
    cfg.rewards = [RewardConfig(name="test_nan_second_call", threshold=0.99, weight=1.0)]
    with pytest.raises(TrainingStopped) as e:
        run(cfg.validate(), tiny_adapter, PromptSets(PROMPTS))
    msg = str(e.value)
    assert e.value.exit_code == EXIT_DIVERGED
    assert msg.startswith("iteration 2 stopped: reward 'test_nan_second_call_bin' returned a non-finite score for 1 "
                          "of 4 samples: sample 2 = nan"), msg
    assert f"(prompt {CALLS['prompts'][2]!r})" in msg and "before the threshold 0.99" in msg
    assert "the last good checkpoint is" in msg and "step_00000001" in msg
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (out / "checkpoints" / "step_00000002").exists()


def test_a_reward_that_checks_itself_still_names_the_prompts():
    from fastvideo_grpo.rewards.base import check_scores, compute_rewards

    def own_check(images, prompts, **_):  # as the built-in rewards do: check_scores without the prompts
        return check_scores("own", torch.tensor([0.1, float("inf"), 0.3]), 3), {}

    with pytest.raises(ValueError) as e:
        compute_rewards({"own": own_check}, torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    assert str(e.value).startswith("reward 'own' returned a non-finite score for 1 of 3 samples: sample 1 = inf "
                                   "(prompt 'b')"), str(e.value)


def test_a_non_finite_loss_names_the_possible_causes():
    from fastvideo_grpo.algorithms.update import NONFINITE_LOSS_CAUSES
    from fastvideo_grpo.training.loop import LoopState, NaNGuard

    state = LoopState(trainer=None, total=3, out=Path("."), last_checkpoint="ck/step_00000002")
    stop = NaNGuard().on_error(state, 3, FloatingPointError(f"non-finite GRPO loss at kept step 1; optimiser step "
                                                            f"skipped. {NONFINITE_LOSS_CAUSES}"))
    msg = str(stop)
    for cause in ("optim.lr", "sampling.eta", "train.autocast", "checkpoint", "embeddings"):
        assert cause in msg, msg
    assert "ck/step_00000002" in msg and stop.exit_code == EXIT_DIVERGED


# ----------------------------------------------------------------------------- a full disk


def _files(folder: Path):
    """Every file under ``folder`` with its bytes (to show a checkpoint untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resumed_run_hits(out, monkeypatch, patch, kept="step_00000001"):
    """A run of 1 iteration (checkpoint step 1), then its resume to 2 with ``patch`` applied: the stop, which
    keeps the checkpoint ``kept`` (step 1, or step 2 when the failing write comes after its save)."""
    from fastvideo_grpo.training.loop import EXIT_NO_SPACE

    from fastvideo_grpo.training.checkpoint import state_bytes
    from fastvideo_grpo.utils.diskspace import folder_bytes

    built = {}
    run(run_config(out, num_iterations=1, save_every=1), tiny_adapter, PromptSets(PROMPTS),
        reward_fns={"red": redness}, reward_weights={"red": 1.0}, on_built=lambda parts: built.update(p=parts))
    step1 = out / "checkpoints" / "step_00000001"
    # the estimate of a first checkpoint (no earlier one to measure): its tensors' bytes plus 4 KB of DCP framing
    # for each (about 2 KB measured): an upper bound that exceeds the file sizes by less than the framing allowed
    est, size = state_bytes(built["p"].trainer), folder_bytes(step1)
    entries = 4 * len(list(built["p"].trainer.adapter.trainable_module().parameters()))  # weight, Adam step, m, v
    assert size <= est <= size + 4096 * entries, (est, size)
    before = _files(step1)
    last = out / "checkpoints" / kept
    patch()
    with pytest.raises(TrainingStopped) as e:
        run(run_config(out, num_iterations=2, save_every=1, resume="latest"), tiny_adapter, PromptSets(PROMPTS),
            reward_fns={"red": redness}, reward_weights={"red": 1.0})
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.exit_code == EXIT_NO_SPACE and "\n" not in msg, msg
    assert f"The last whole checkpoint, {last}, is kept" in msg, msg
    assert "free there" in msg and "rerun with --resume latest" in msg, msg
    # the last checkpoint is whole and still the one resumed from; no partial folder is left
    assert (out / "checkpoints" / "latest").read_text().strip() == kept
    assert _files(step1) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted({"latest", "step_00000001", kept})
    return msg, step1


def test_a_short_write_during_a_checkpoint_save_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path,
                                                                                               monkeypatch):
    from fastvideo_grpo.training import checkpoint
    from fastvideo_grpo.utils.diskspace import folder_bytes, human_bytes

    out = tmp_path / "run"

    def patch():  # torch.save of the trainer state comes up short, as on a full disk (issue 39's traceback)
        def short_write(obj, f, *a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

        monkeypatch.setattr(checkpoint.torch, "save", short_write)

    msg, step1 = _resumed_run_hits(out, monkeypatch, patch)
    assert msg.startswith(f"out of disk space in {out}: a write into it failed (a short write in torch.save)"), msg
    assert f"needs about {human_bytes(folder_bytes(step1))} (the size of the last one)" in msg, msg


def test_enospc_from_the_checkpoint_writer_and_from_the_metrics_file_name_the_folder(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from fastvideo_grpo.training import metrics

    def dcp_full():
        def full(state, checkpoint_id):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(checkpoint_id) / "__0_0.distcp"))

        monkeypatch.setattr(dcp, "save", full)

    msg, _ = _resumed_run_hits(tmp_path / "a", monkeypatch, dcp_full)
    assert msg.startswith(f"out of disk space in {tmp_path / 'a' / 'checkpoints' / 'step_00000002.tmp'}: a write "
                          "into it failed (No space left on device)"), msg

    def metrics_full():
        def full(path, line):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(metrics, "append_line", full)

    msg, _ = _resumed_run_hits(tmp_path / "b", monkeypatch, metrics_full, kept="step_00000002")
    assert msg.startswith(f"out of disk space in {tmp_path / 'b'}: a write into it failed"), msg


def test_a_checkpoint_that_clearly_cannot_fit_stops_the_run_before_writing(tmp_path, monkeypatch):
    """Free space below the last checkpoint's size (a fake statvfs: 1000 bytes free) stops the run before the
    save touches anything."""
    real = os.statvfs

    def patch():
        def nearly_full(path):
            st = real(path)
            return os.statvfs_result((st.f_bsize, 1, st.f_blocks, 1000, 1000, st.f_files, st.f_ffree, st.f_favail,
                                      st.f_flag, st.f_namemax))

        monkeypatch.setattr(os, "statvfs", nearly_full)

    out = tmp_path / "run"
    msg, step1 = _resumed_run_hits(out, monkeypatch, patch)
    from fastvideo_grpo.utils.diskspace import folder_bytes, human_bytes

    assert msg.startswith(f"out of disk space in {out / 'checkpoints'}: stopped before writing the next checkpoint; "
                          f"1.0 KB free there, and a checkpoint of this run needs about "
                          f"{human_bytes(folder_bytes(step1))} (the size of the last one)"), msg


def test_what_counts_as_a_full_disk():
    from torch.distributed.checkpoint.api import CheckpointException

    from fastvideo_grpo.utils.diskspace import is_out_of_space

    enospc = OSError(errno.ENOSPC, "No space left on device")
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert is_out_of_space(enospc) and is_out_of_space(short) and is_out_of_space(OSError(errno.EDQUOT, "quota"))
    assert is_out_of_space(CheckpointException("save failed", {1: (enospc, None)}))  # DCP: rank 1's error inside
    try:
        try:
            raise short
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert is_out_of_space(outer)
    assert not is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not is_out_of_space(RuntimeError("shape mismatch"))


# ----------------------------------------------------------------------------- leftovers of a killed run


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tmp_path):
    out = tmp_path / "run"
    run(run_config(out, num_iterations=1, save_every=1), tiny_adapter, PromptSets(PROMPTS),
        reward_fns={"red": redness}, reward_weights={"red": 1.0})
    left = [out / ".summary.json.k2j4a.tmp", out / "checkpoints" / ".latest.x81.tmp",
            out / "checkpoints" / "step_00000002.tmp" / "__0_0.distcp"]
    mine = [out / "notes.tmp", out / ".my_settings"]  # the user's files: not the run's temporaries
    for p in left + mine:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    run(run_config(out, num_iterations=2, save_every=1, resume="latest"), tiny_adapter, PromptSets(PROMPTS),
        reward_fns={"red": redness}, reward_weights={"red": 1.0})
    assert not any(p.exists() for p in left) and not (out / "checkpoints" / "step_00000002.tmp").exists()
    assert all(p.read_text() == "x" for p in mine)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def test_a_data_prep_rerun_removes_a_killed_runs_shard_temporaries(tmp_path):
    from fastvideo_grpo.data.prep import PrepJob
    from fastvideo_grpo.data.prompts import PromptRecord
    from support.tiny_runs import SyntheticEncoder

    def job():
        return PrepJob(SyntheticEncoder({"prompt_embeds": (None, 4)}), [PromptRecord(f"p{i}") for i in range(6)],
                       tmp_path / "emb", shard_size=4, batch_size=2, progress=False)

    first = job()
    first.run_shards()
    first.merge_manifest()
    files = {p.name: p.read_bytes() for p in (tmp_path / "emb").rglob("*") if p.is_file()}
    shards = tmp_path / "emb" / "shards"
    orphans = [shards / ".shard-00001.safetensors.tmp4242", shards / ".shard-00001.json.tmp4242",
               tmp_path / "emb" / ".manifest.json.tmp4242"]
    for p in orphans:
        p.write_bytes(b"half")
    again = job()
    again.write_negative()
    again.run_shards()
    again.merge_manifest()
    assert not any(p.exists() for p in orphans)
    assert again.stats == {"written": 0, "skipped": 2}
    assert {p.name: p.read_bytes() for p in (tmp_path / "emb").rglob("*") if p.is_file()} == files
