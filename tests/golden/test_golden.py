"""Golden runs: fixed-seed training whose metrics must not change unless the maths does.

Two runs, 5 iterations each, on one CPU thread:
* ``toy``: ``GRPOTrainer`` on a tiny random-init toy DiT (the trainer and everything under it);
* ``flux``: ``train_scripts/train_flux_grpo.py`` end to end on a tiny random-init FLUX folder with
  synthetic embeddings (config, data, the outer loop, held-out evaluation, checkpoints).

Every numeric metric except wall-clock ones is compared with the stored values in this folder, within
``RTOL`` (float32 results can differ in the last bits between CPU instruction sets; a refactor that does
not change the maths changes nothing). A deliberate change of the maths regenerates the files:

    FVG_REGEN_GOLDEN=1 python -m pytest tests/golden -q

and the commit says why the numbers moved.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
RTOL, ATOL = 1e-4, 1e-12
NOT_COMPARED = ("time/", "samples_per_s", "wall")
REGEN = os.environ.get("FVG_REGEN_GOLDEN", "0") == "1"


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(s in k for s in NOT_COMPARED)}


def _compare(name: str, rows: list) -> None:
    path = HERE / f"{name}.json"
    rows = [_numbers(r) for r in rows]
    if REGEN:
        path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {path.name}")
    want = json.loads(path.read_text())
    assert len(rows) == len(want), f"{len(rows)} rows, golden has {len(want)}"
    for i, (got, exp) in enumerate(zip(rows, want)):
        assert sorted(got) == sorted(exp), f"row {i}: keys {sorted(set(got) ^ set(exp))} differ"
        for k, v in exp.items():
            g = got[k]
            ok = (math.isnan(v) and math.isnan(g)) or math.isclose(g, v, rel_tol=RTOL, abs_tol=ATOL)
            assert ok, f"row {i} ({name}) {k}: got {g!r}, golden {v!r}"


def test_toy_trainer_golden():
    from fastvideo_grpo.config import load_config
    from fastvideo_grpo.models.toy import TinyDiT, TinyDiTConfig, ToyAdapter
    from fastvideo_grpo.rewards import rules  # noqa: F401  (registers the toy rewards)
    from fastvideo_grpo.toy.shapes import split_prompts
    from fastvideo_grpo.data.prompt_source import PromptSource
    from fastvideo_grpo.rewards.build import build_reward_fns
    from fastvideo_grpo.training.trainer import GRPOTrainer

    cfg = load_config(None, [
        "--model.name=toy", "--sampling.num_steps=6", "--sampling.eta=0.7", "--grpo.group_size=4",
        "--grpo.prompts_per_iteration=3", "--grpo.tau=0.6", "--grpo.num_updates_per_iteration=2",
        "--grpo.clip_range=1e-3", "--optim.lr=1e-3", "--train.seed=11",
        "--rewards=[{name: toy_geneval}, {name: toy_geneval, threshold: 0.99}, {name: toy_colour_fidelity}]",
    ])
    torch.manual_seed(0)
    model = TinyDiT(TinyDiTConfig(image_size=16, patch_size=4, hidden=32, depth=2, heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    adapter = ToyAdapter(model)
    fns, weights = build_reward_fns(cfg.rewards)
    train_prompts, _ = split_prompts(seed=0)
    trainer = GRPOTrainer(cfg, adapter, fns, weights, PromptSource(train_prompts, adapter.encode_prompts, seed=11))
    rows = [trainer.train_iteration() for _ in range(5)]
    _compare("toy", rows)


def test_flux_train_script_golden(tiny, tmp_path):
    pytest.importorskip("diffusers")
    from support.tiny_runs import ROOT, run_overrides, train_script

    folder, kw, manifest = tiny("flux")
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/flux_hps.yaml")] + run_overrides(folder, kw, manifest, out) + [
        "--train.num_iterations=5", "--train.eval_every=2", "--train.save_every=5", "--train.sample_every=0",
        "--sampling.num_steps=4", "--sampling.eval_num_steps=3", "--train.seed=5"]
    train_script("train_flux_grpo").main(args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    _compare("flux", rows)
