"""Start-up checks (preflight.py) walk what adapters and rewards declare: unknown keys are refused with
the accepted ones, declared paths must exist (also inside a wrapping reward), and nothing is guessed
from parameter names."""

from __future__ import annotations

import pytest

from fastvideo_grpo.config import load_config
from fastvideo_grpo.models import ADAPTERS
from fastvideo_grpo.training.preflight import preflight
from fastvideo_grpo.utils.registry import Registry, accepted_parameters
from fastvideo_grpo.rewards import REWARDS


def _cfg(tmp_path, *overrides):
    (tmp_path / "model").mkdir(exist_ok=True)
    return load_config(None, ["--model.name=flux", f"--model.kwargs.model_path={tmp_path / 'model'}",
                              f"--data.manifest={tmp_path / 'emb'}", *overrides])


def test_unknown_model_key_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match=r"model.kwargs: model adapter 'flux' does not take \['guidance_sacle'\].*"
                                         r"accepted: \[.*'guidance_scale'"):
        preflight(_cfg(tmp_path, "--model.kwargs.guidance_sacle=3.0"))


def test_unknown_reward_key_and_wrapped_reward_paths(tmp_path):
    with pytest.raises(ValueError, match=r"rewards\[0\] \(hps\).kwargs: reward 'hps' does not take \['model_pth'\]"):
        preflight(_cfg(tmp_path, "--rewards=[{name: hps, kwargs: {model_pth: x}}]"))
    # binary wraps another reward: the inner reward's declared paths are checked too
    with pytest.raises(FileNotFoundError) as e:
        preflight(_cfg(tmp_path, "--rewards=[{name: binary, kwargs: {reward: clip_score, model_path: nowhere/clip}}]"))
    assert "rewards[0] (binary).kwargs.model_path = 'nowhere/clip' does not exist" in str(e.value)


def test_declared_paths_not_names(tmp_path):
    """A path-looking key that is not declared is no path (no guessing); a declared one is checked."""
    reg = Registry("thing")

    @reg.register("a", paths=("weights",))
    def a(weights=None, cache_dir=None):
        return None

    assert reg.check_kwargs("a", {"weights": "w", "cache_dir": "c"}, "x") == {"x.weights": "w"}
    with pytest.raises(ValueError, match=r"does not take \['extra'\]"):
        reg.check_kwargs("a", {"extra": 1}, "x")


def test_model_folder_and_manifest_problems_are_listed_together(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        preflight(_cfg(tmp_path))
    msg = str(e.value)
    assert "transformer/config.json" in msg and "vae/config.json" in msg and "data.manifest" in msg


def test_every_registered_adapter_declares_what_it_accepts():
    for name in ADAPTERS.names():
        accepted = accepted_parameters(ADAPTERS.signature_of(name))
        if name != "toy":  # the toy factory forwards **model_cfg to TinyDiTConfig
            assert accepted and "model_path" in accepted and ADAPTERS.declared_paths(name) == ("model_path",), name
    for name in ("hps", "clip_score", "pickscore", "aesthetic", "video_align"):
        assert "model_path" in REWARDS.declared_paths(name)
