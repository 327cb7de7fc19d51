"""The toy task: the rule reward agrees with the renderer (an independent source of truth)."""

import random

import pytest
import torch

from fastvideo_grpo.rewards import rules
from fastvideo_grpo.toy import shapes


def test_prompt_grammar_split_is_disjoint_and_complete():
    train, held = shapes.split_prompts(seed=0)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(shapes.all_prompts())
    assert any(" left of " in p for p in held) and any(" left of " not in p for p in held)


def test_parse_errors_are_clear():
    with pytest.raises(ValueError, match="not in the grammar"):
        shapes.parse_prompt("four purple hexagons")


def test_rule_reward_is_one_on_exact_renders():
    prompts = shapes.all_prompts()
    imgs, chosen = shapes.make_dataset(prompts, 120, 32, seed=3)
    scores, info = rules.toy_geneval()(imgs, chosen)
    assert torch.all(scores == 1.0), [p for p, s in zip(chosen, scores) if s < 1]
    assert torch.all(info["all_correct"] == 1.0)
    fid, _ = rules.toy_colour_fidelity()(imgs, chosen)
    torch.testing.assert_close(fid, torch.ones_like(fid))


def test_rule_reward_penalises_wrong_count_colour_position_and_is_prompt_aligned():
    rng = random.Random(0)
    two_red = shapes.render(shapes.parse_prompt("two red circles"), 32, rng)
    left = shapes.render(shapes.parse_prompt("a blue square left of a green triangle"), 32, rng)
    fn = rules.toy_geneval()
    imgs = torch.stack([two_red, two_red, left, left.flip(-1), two_red])
    prompts = ["two red circles", "three red circles", "a blue square left of a green triangle",
               "a blue square left of a green triangle", "two blue circles"]
    s, info = fn(imgs, prompts)
    assert s[0] == 1.0 and s[2] == 1.0
    assert s[1] < 1.0  # wrong count
    assert s[3] < 1.0  # mirrored: relation (and triangle orientation still fine) fails
    assert s[4] < 0.5  # wrong colour
    # each image is scored against its own prompt: permuting the batch permutes the scores
    perm = torch.tensor([4, 2, 0, 1, 3])
    s_perm, _ = fn(imgs[perm], [prompts[i] for i in perm])
    torch.testing.assert_close(s_perm, s[perm])


def test_colour_fidelity_is_smooth_in_noise():
    rng = random.Random(1)
    img = shapes.render(shapes.parse_prompt("one yellow square"), 32, rng)
    fn = rules.toy_colour_fidelity()
    g = torch.Generator().manual_seed(0)
    vals = [fn((img + a * torch.randn(img.shape, generator=g)).clamp(0, 1)[None], ["one yellow square"])[0].item()
            for a in (0.0, 0.05, 0.1, 0.2)]
    assert vals[0] == pytest.approx(1.0)
    assert vals == sorted(vals, reverse=True)


def test_connected_components_counts_separate_blobs():
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 0:2, 0:2] = True
    m[0, 5:7, 5:8] = True
    m[0, 0, 7] = True
    lab = rules.connected_components(m)
    assert len(torch.unique(lab[lab > 0])) == 3
    # diagonal neighbours are not 4-connected
    d = torch.eye(4, dtype=torch.bool)[None]
    assert len(torch.unique(rules.connected_components(d)[0][d[0]])) == 4


def test_reward_input_validation():
    fn = rules.toy_geneval()
    with pytest.raises(ValueError, match="prompts"):
        fn(torch.zeros(2, 3, 32, 32), ["one red square"])
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.full((1, 3, 32, 32), float("nan")), ["one red square"])
    with pytest.raises(ValueError, match="floating"):
        fn(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["one red square"])


def test_shapes_are_told_apart_by_the_reward():
    """Each shape rendered for each prompt is scored as that shape, and as no other."""
    rng = random.Random(2)
    fn = rules.toy_geneval()
    for shape in shapes.SHAPES:
        img = shapes.render(shapes.parse_prompt(f"one red {shape}"), 32, rng)
        prompts = [f"one red {s}" for s in shapes.SHAPES]
        _, info = fn(img.expand(3, -1, -1, -1), prompts)
        assert info["all_correct"].tolist() == [float(s == shape) for s in shapes.SHAPES], shape


def test_background_check_fails_a_faint_texture_the_prompt_checks_cannot_see():
    rng = random.Random(4)
    prompt = "a blue square left of a green triangle"
    clean = shapes.render(shapes.parse_prompt(prompt), 32, rng)
    bg = clean.amax(0) == 0
    imgs = [clean]
    for level in (0.008, 0.015, 0.03):  # texture darker than any object colour: still background
        img = clean.clone()
        img[:, bg] = level
        imgs.append(img)
    s, info = rules.toy_geneval(max_background=0.01)(torch.stack(imgs), [prompt] * 4)
    # the brightness is the background pixels' mean brightness (max over RGB)
    torch.testing.assert_close(info["background"], torch.tensor([0.0, 0.008, 0.015, 0.03]))
    # 6 prompt checks + the background check (1 up to 0.01, 0.5 at 0.015, 0 from 0.02 on)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 6.5 / 7, 6 / 7]))
    assert info["all_correct"].tolist() == [1.0, 1.0, 0.0, 0.0]
    s_off, info_off = rules.toy_geneval(max_background=0)(torch.stack(imgs), [prompt] * 4)
    assert torch.all(s_off == 1.0) and torch.all(info_off["all_correct"] == 1.0)
    with pytest.raises(ValueError, match="max_background"):
        rules.toy_geneval(max_background=-1)


def test_pretrained_cache_key_follows_the_renderer(monkeypatch, tmp_path):
    from fastvideo_grpo.cli import pretrain

    s = pretrain.pretrain_settings({})
    path = pretrain.checkpoint_path(tmp_path, s)
    assert pretrain.checkpoint_path(tmp_path, dict(s)) == path
    assert pretrain.checkpoint_path(tmp_path, {**s, "steps": 601}) != path
    assert pretrain.checkpoint_path(tmp_path, {**s, "model": {"hidden": 64}}) != path
    monkeypatch.setitem(shapes.COLOURS, "red", (0.9, 0.1, 0.1))  # a changed renderer retrains
    assert pretrain.checkpoint_path(tmp_path, s) != path
