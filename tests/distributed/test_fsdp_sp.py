"""2-process CPU (gloo) tests: FSDP2 update == 1-process update, Ulysses attention == local attention,
per-rank seeding and group-preserving prompt assignment."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import torchrun  # noqa: E402


def test_fsdp_grpo_update_matches_single_process():
    out = torchrun("w_fsdp_update.py").stdout
    assert "ac=0.0" in out and "ac=0.5" in out, out
    assert "differing metric keys reduce over the ranks that report them" in out, out


def test_ulysses_attention_and_sp_update_match_single_rank():
    out = torchrun("w_ulysses.py").stdout
    assert "ulysses attention equals" in out and "sp=2 model update equals" in out, out


def test_ranks_draw_different_noise_sp_peers_the_same():
    out = torchrun("w_seeding.py").stdout
    assert "sp=1" in out and "sp=2" in out and "global advantage over dp ranks ok" in out, out


def test_fsdp_in_one_process_matches_the_unsharded_trainer():
    out = torchrun("w_one_process_fsdp.py", nproc=1).stdout
    assert "ONE_PROCESS_FSDP_OK" in out and "REFUSED_OK" in out


def test_weight_ema_is_sharded_like_the_parameters(tmp_path):
    """train.ema_decay under FSDP2 (2 ranks): DTensor averages with the parameters' placements, equal to the
    closed form; the 2-rank checkpoint's average loads into an unsharded model in one process."""
    import torch

    from fastvideo_grpo.training.checkpoint import load_ema_weights

    sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
    from common import tiny_adapter

    out = torchrun("w_ema.py", tmp_path).stdout
    assert "EMA_SHARDED_OK" in out, out
    want = torch.load(tmp_path / "ema_full.pt", weights_only=True)
    ad = tiny_adapter()
    assert load_ema_weights(tmp_path / "checkpoints" / "step_00000003", ad.model)
    for name, p in ad.model.named_parameters():
        assert torch.equal(p.detach(), want[name]), name


def test_kl_to_the_reference_under_fsdp_matches_single_process(tmp_path):
    """grpo.kl_coef > 0 runs sharded: full fine-tuning (a sharded copy of the weights) and LoRA (the adapter
    switched off), each equal to the 1-process update on the whole batch (KL, loss, weights)."""
    out = torchrun("w_kl_fsdp.py", tmp_path).stdout
    assert "full: kl" in out and "lora: kl" in out, out
