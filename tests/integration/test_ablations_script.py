"""bench/ablations.py end to end on a tiny config: rows per variant and seed, resumable, per-seed column."""

import json

from fastvideo_grpo.config import load_config, save_config
from support.scripts import ROOT, TINY_TOY_PRETRAIN, load_script


def test_ablation_table_is_written_and_runs_are_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo caches its pretrained model under ./outputs
    cfg = load_config(str(ROOT / "configs" / "toy_cpu.yaml"), [
        "--train.num_eval_prompts=3", "--grpo.prompts_per_iteration=2", "--grpo.group_size=4",
        "--extra.eval_samples_per_prompt=2", *TINY_TOY_PRETRAIN,
    ])
    config = tmp_path / "tiny.yaml"
    save_config(cfg, config)
    ab = load_script("bench", "ablations")
    args = ["--config", str(config), "--out", str(tmp_path / "abl"), "--iterations", "1", "--seeds", "0", "1",
            "--only", "baseline,sde_every_step"]
    ab.main(args)
    results = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert len(results) == 4 and {k.split("/")[0] for k in results} == {"baseline", "sde_every_step"}
    table = (tmp_path / "abl" / "ablations.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| baseline") or line.startswith("| sde_every")]
    assert len(rows) == 2
    base = [r for k, r in results.items() if k.startswith("baseline/")]
    per_seed = ", ".join(f"{r['per_reward_after']['toy_geneval'] - r['per_reward_before']['toy_geneval']:+.3f}"
                         for r in base)
    assert per_seed in rows[0]
    # a rerun (a comment added to the config) reuses every result instead of training again
    config.write_text("# a comment\n" + config.read_text())
    ab.main(args)
    assert json.loads((tmp_path / "abl" / "results.json").read_text()) == results
