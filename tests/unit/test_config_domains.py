"""Every numeric config value has a declared domain, checked at load: NaN and a value outside the domain are
refused naming the key and the domain; the special spellings (null / off) mean what they say."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

from fastvideo_grpo.config import RunConfig, load_config


def _numeric(tp):
    """(int or float, list?, nullable?) for a numeric type hint, else None (written here, not imported)."""
    nullable = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            return None
        tp = args[0]
    is_list = typing.get_origin(tp) is list
    if is_list:
        tp = typing.get_args(tp)[0]
    return (tp, is_list, nullable) if tp in (int, float) else None


def _numeric_fields(cls=RunConfig, prefix=""):
    """(override path, how to set a value there, field, kind) of every numeric field, sections included. A list of
    sections (rewards, eval.rewards, train.watchdog.gold) is set as a one-entry list holding the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, path + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            for sub, _, g, kind in _numeric_fields(typing.get_args(tp)[0]):
                yield f"{path}[0].{sub}", (path, sub), g, kind
        elif _numeric(tp) is not None:
            yield path, None, f, _numeric(tp)


FIELDS = list(_numeric_fields())


def _override(path, section, value) -> str:
    """One command-line override setting ``value`` (a YAML literal) at ``path``."""
    if section is None:
        return f"--{path}={value}"
    listed, sub = section
    return f"--{listed}=[{{name: toy_geneval, {sub}: {value}}}]"


def _outside(meta, integer):
    """A value just outside the declared range that is not one of its special values (None: the range is open on
    both sides, so only NaN / inf are outside)."""
    specials = {v for v, _ in meta["special"]}
    step = 1 if integer else 0.5
    cands = []
    if "low" in meta:
        cands += [meta["low"]] if meta["low_open"] else []
        cands += [meta["low"] - step, meta["low"] - 2 * step]
    if "high" in meta:
        cands += [meta["high"]] if meta["high_open"] else []
        cands += [meta["high"] + step]
    cands = [c for c in cands if c not in specials]
    if not cands:
        return None
    return int(cands[0]) if integer else cands[0]


def test_the_walk_sees_every_section():
    keys = [p for p, *_ in FIELDS]
    for must in ("sampling.num_steps", "grpo.sde_window.size", "grpo.clip_range", "optim.betas", "rewards[0].weight",
                 "eval.rewards[0].batch_size", "train.watchdog.gold[0].threshold", "train.watchdog.patience",
                 "parallel.train_timeout_s", "data.eval_fraction", "log.curve_window"):
        assert must in keys, must
    assert len(keys) > 50


@pytest.mark.parametrize("path,section,f,kind", FIELDS, ids=[p for p, *_ in FIELDS])
def test_every_numeric_field_refuses_nan_and_out_of_domain_values_naming_key_and_domain(path, section, f, kind):
    assert "domain" in f.metadata, f"{path} declares no domain: define it with config.num(default, '<domain>')"
    meta = f.metadata["domain"]
    tp, is_list, nullable = kind
    integer = tp is int
    name = path.replace("[0]", "[0]")  # the key as the message names it: rewards[0].weight, grpo.tau
    kind_words = "an integer" if integer else "a finite number"

    def refused(value, *extra):
        literal = f"[{value}]" if is_list else value
        with pytest.raises(ValueError) as e:
            load_config(None, [_override(path, section, literal)])
        msg = str(e.value)
        assert name in msg and kind_words in msg, msg
        for bound in ("low", "high"):
            if bound in meta:
                assert f"{meta[bound]:g}" in msg, msg
        for special, meaning in meta["special"]:
            assert f"{special:g} ({meaning})" in msg, msg
        for word in extra:
            assert word in msg, msg

    refused(".nan")
    if not integer:
        refused(".inf")
    bad = _outside(meta, integer)
    if bad is not None:
        refused(repr(bad), "got")
    # null: accepted exactly where the domain gives it a meaning
    if meta["null"] is not None:
        cfg = load_config(None, [_override(path, section, "null")])
        obj = cfg
        for part in path.replace("[0]", ".0").split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        assert obj is None and nullable
    else:
        with pytest.raises(ValueError, match=path.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_config(None, [_override(path, section, "null")])
    # the default lies in its own domain (every section checks itself at load)
    assert load_config(None, [])


@pytest.mark.parametrize("override,match", [
    # issue 39's four values: silently trained on garbage, or failed later with the wrong cause
    ("--grpo.adv_clip_max=-1", r"^grpo.adv_clip_max must be a finite number > 0, or null / off \(no clamp\), got -1"),
    ("--grpo.adv_clip_max=0", r"^grpo.adv_clip_max must be a finite number > 0, or null / off \(no clamp\), got 0"),
    ("--optim.warmup_iterations=-5", r"^optim.warmup_iterations must be an integer >= 0, got -5$"),
    ("--grpo.clip_range=.inf", r"^grpo.clip_range must be a finite number > 0, or null / off \(no clipping\), got inf"),
    ("--grpo.clip_range=.nan", r"^grpo.clip_range must be a finite number > 0, or null / off \(no clipping\), got nan"),
])
def test_the_issue_values_are_refused_with_their_key_and_domain(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_no_clipping_is_spelled_null_or_off_and_trains_on_the_plain_ratio():
    from fastvideo_grpo.algorithms.grpo import ppo_clip_loss

    for spelling in ("null", "off", "false", "none"):
        cfg = load_config(None, [f"--grpo.clip_range={spelling}", f"--grpo.adv_clip_max={spelling}"])
        assert cfg.grpo.clip_range is None and cfg.grpo.adv_clip_max is None
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(16, generator=g) * 0.3, torch.randn(16, generator=g) * 0.3
    adv = torch.randn(16, generator=g) * 4
    loss, st = ppo_clip_loss(logp, old, adv, None, None)
    # the unclipped surrogate, written out: mean over samples of -A * exp(log pi - log pi_old)
    want = sum(-a * math.exp(lp - lo) for a, lp, lo in zip(adv.tolist(), logp.tolist(), old.tolist())) / 16
    assert abs(loss.item() - want) <= 16 * 1e-6 * max(1.0, abs(want))
    assert st.clipfrac.item() == 0.0
    # a tiny clip range changes it: the two spellings are not the same computation
    clipped, _ = ppo_clip_loss(logp, old, adv, 1e-3, None)
    assert abs(clipped.item() - want) > 1e-3
    with pytest.raises(ValueError, match="clip_range must be a finite number > 0 or None"):
        ppo_clip_loss(logp, old, adv, float("inf"), None)


def test_logged_advantages_are_those_trained_on_after_the_clamp():
    """adv/* statistics after grpo.adv_clip_max's clamp: with a clamp of 0.5 no logged advantage exceeds it, and
    the logged std is that of the clamped values (the issue: it was taken before the clamp)."""
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.training.trainer import Trainer

    cfg = load_config(None, ["--model.name=toy", "--sampling.num_steps=3", "--grpo.group_size=4",
                             "--grpo.prompts_per_iteration=2", "--grpo.num_updates_per_iteration=1",
                             "--grpo.adv_clip_max=0.5", "--rewards=[{name: toy_colour_fidelity}]"])
    torch.manual_seed(0)
    model = TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=16, depth=1, heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    adapter = ToyAdapter(model)
    fns, weights = build_reward_fns(cfg.rewards)
    trainer = Trainer(cfg, adapter, fns, weights, PromptSource(split_prompts(seed=0)[0], adapter.encode_prompts, seed=0))
    seen = {}
    est = trainer.advantages

    def keep(rewards, group):
        seen["adv"] = est(rewards, group)
        return seen["adv"]

    trainer.advantages = keep
    m = trainer.train_iteration()
    raw = seen["adv"]
    assert raw.abs().max() > 0.5  # normalised advantages of 4 samples: some exceed the clamp
    clamped = raw.clamp(-0.5, 0.5)
    assert m["adv/abs_max"] == pytest.approx(0.5)
    assert m["adv/std"] == pytest.approx(float(clamped.std(unbiased=False)), rel=1e-6)
    assert m["adv/std"] < float(raw.std(unbiased=False))


def test_a_numeric_field_without_a_domain_cannot_be_checked():
    from fastvideo_grpo.config import check_fields

    @dataclasses.dataclass
    class Section:
        steps: int = 3  # a new key added without config.num(...)

    with pytest.raises(TypeError, match=r"Section.steps is numeric but declares no domain"):
        check_fields(Section(), "section")
