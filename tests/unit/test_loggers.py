"""The loggers as the ecosystem's trainers use them, with fake wandb / TensorBoard modules that record every call
(neither is installed on CI; the fakes are put in ``sys.modules``, so the test does not depend on that):
wandb gets the resolved config, the run name, a sample grid at each evaluation and ``finish()``, and a resumed
run continues the same wandb run; TensorBoard gets scalars, the config, hyperparameters and images. A
requested logger that is missing is an error before anything is written; TensorBoard by default warns."""

from __future__ import annotations

import sys
import types

import pytest

from fastvideo_grpo.config import load_config
from fastvideo_grpo.training.metrics import LoggerWarning
from fastvideo_grpo.training.runner import PromptSets, run
from support.tiny_models import tiny_toy_adapter


class _FakeWandb(types.ModuleType):
    """``import wandb``: init -> a run recording log() / finish(); Image keeps what it was given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs, self.finished = [], [], 0
        fake = self

        class Image:
            def __init__(self, data, caption=None):
                self.data, self.caption = data, caption

        class Run:
            id = "run-abc"

            def log(self, row, step=None):
                fake.logs.append((step, row))

            def finish(self):
                fake.finished += 1

        self.Image, self._run = Image, Run

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self._run()


class _FakeTensorBoard(types.ModuleType):
    """``torch.utils.tensorboard``: a SummaryWriter recording its calls."""

    def __init__(self):
        super().__init__("torch.utils.tensorboard")
        self.calls = []
        fake = self

        class SummaryWriter:
            def __init__(self, logdir):
                fake.calls.append(("init", logdir))

            def __getattr__(self, name):
                return lambda *a, **k: fake.calls.append((name, a, k))

        self.SummaryWriter = SummaryWriter

    def of(self, name):
        return [c for c in self.calls if c[0] == name]


def _bright(images, prompts, **_):
    return images.mean(dim=(1, 2, 3)), {}


def _cfg(out, *extra):
    return load_config(None, [f"--train.output_dir={out}", "--train.num_iterations=2", "--train.eval_every=1",
                              "--train.save_every=1", "--train.device=cpu", "--grpo.prompts_per_iteration=1",
                              "--grpo.group_size=2", "--sampling.num_steps=2", "--log.progress=false",
                              "--eval.num_sample_prompts=2"] + list(extra))


def _run(cfg):
    prompts = PromptSets(["one red square", "two blue circles"], ["one blue square", "a green circle"])
    return run(cfg, lambda device: tiny_toy_adapter(), prompts, reward_fns={"b": _bright}, reward_weights={"b": 1.0},
               eval_fns={"b": _bright})


def test_wandb_and_tensorboard_get_config_name_images_and_finish(tmp_path, monkeypatch):
    wandb, tb = _FakeWandb(), _FakeTensorBoard()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tb)
    out = tmp_path / "run"
    cfg = _cfg(out, "--log.wandb_project=proj", "--log.run_name=first try")
    _run(cfg)
    (init,) = wandb.inits
    assert init["project"] == "proj" and init["name"] == "first try" and init["dir"] == str(out)
    assert init["config"]["optim"]["lr"] == cfg.optim.lr and init["config"]["train"]["output_dir"] == str(out)
    assert "resume" not in init and (out / "wandb_run_id.txt").read_text().strip() == "run-abc"
    # a sample grid at each evaluation (before training, after iterations 1 and 2), as an image
    image_steps = [s for s, row in wandb.logs if any(isinstance(v, wandb.Image) for v in row.values())]
    assert image_steps == [0, 1, 2]
    grid = next(row["samples"].data for s, row in wandb.logs if "samples" in row)
    assert grid.size[0] > 0 and grid.mode == "RGB"
    metric_steps = [s for s, row in wandb.logs if "train/loss" in row]
    assert metric_steps == [1, 2] and wandb.finished == 1
    # TensorBoard: scalars, the config as text, images at each evaluation, the hyperparameters at the end
    assert tb.of("init")[0][1] == str(out / "tensorboard")
    assert {c[1][0] for c in tb.of("add_scalar")} >= {"train/loss", "eval/b"}
    assert [c[1][2] for c in tb.of("add_image")] == [0, 1, 2]
    assert "lr: " in tb.of("add_text")[0][1][1]
    (hp,) = tb.of("add_hparams")
    assert hp[1][0]["optim.lr"] == cfg.optim.lr and "eval/b" in hp[1][1] and len(tb.of("close")) == 1
    # resumed: the same wandb run continues
    _run(_cfg(out, "--log.wandb_project=proj", "--train.num_iterations=3", "--train.resume=latest"))
    assert wandb.inits[-1]["id"] == "run-abc" and wandb.inits[-1]["resume"] == "allow"
    assert wandb.inits[-1]["name"] == "run"  # the output folder's name by default


def test_a_missing_logger_is_an_error_when_asked_for_and_a_warning_by_default(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"log.wandb_project = 'proj' but wandb is not installed: pip install wandb"):
        _run(_cfg(tmp_path / "a", "--log.wandb_project=proj"))
    with pytest.raises(ValueError, match="log.tensorboard is true but tensorboard is not installed"):
        _run(_cfg(tmp_path / "b", "--log.tensorboard=true"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.warns(LoggerWarning, match="tensorboard is not installed.*log.tensorboard: false"):
        _run(_cfg(tmp_path / "c", "--train.num_iterations=1"))
    assert (tmp_path / "c" / "metrics.jsonl").is_file()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", LoggerWarning)  # log.tensorboard: false asks for none: no warning
        _run(_cfg(tmp_path / "d", "--train.num_iterations=1", "--log.tensorboard=false"))
