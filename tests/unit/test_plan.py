"""The real-scale planner (python -m fastvideo_grpo.cli.plan), validated against independent numbers:

* parameter counts of the real architectures (built at full size on the meta device through the adapters)
  against the published ones;
* the activation estimate (one block per kind under fake tensors, scaled) against torch's own MemTracker
  on a small model run with real tensors;
* the per-GPU peak against the memory an H200 measured for a 1.14B FLUX-like run (bench/gpu_check.py,
  recorded in docs/gpu_runs/);
* every recipe in configs/ plans without error (each adapter at its real dimensions and sp degree).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from fastvideo_grpo.cli import plan as P  # noqa: E402
from fastvideo_grpo.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# published sizes (rounded names of the models): within 10%
PUBLISHED = {"flux1_dev.json": 11.9e9, "hunyuanvideo.json": 12.8e9, "wan2.1_t2v_14b.json": 14e9,
             "wan2.1_t2v_1.3b.json": 1.3e9, "sd3.5_large.json": 8.1e9, "sd1.4.json": 860e6,
             "qwen_image.json": 20e9, "qwen_image_edit.json": 20e9,
             "wan2.2_t2v_a14b.json": 14e9, "wan2.2_ti2v_5b.json": 5e9, "hunyuanvideo1.5_480p_t2v.json": 8.3e9,
             "ltx2.json": 19e9, "flux2_klein_4b.json": 4e9,
             "flux2_klein_base_4b.json": 4e9, "flux2_klein_9b.json": 9e9, "flux2_dev.json": 32e9,
             "z_image_turbo.json": 6e9, "z_image.json": 6e9}
RECIPE_FOR = {"flux1_dev.json": "flux_hps.yaml", "hunyuanvideo.json": "hunyuan_t2v_videoalign.yaml",
              "wan2.1_t2v_14b.json": "wan_t2v.yaml", "wan2.1_t2v_1.3b.json": "wan_t2v.yaml",
              "sd3.5_large.json": "sd3_hps.yaml", "sd1.4.json": "sd_hps.yaml",
              "qwen_image.json": "qwen_image_hps.yaml", "qwen_image_edit.json": "qwen_image_edit_hps.yaml",
              "wan2.2_t2v_a14b.json": "wan22_a14b_t2v.yaml", "wan2.2_ti2v_5b.json": "wan22_5b_t2v.yaml",
              "hunyuanvideo1.5_480p_t2v.json": "hunyuan15_t2v_videoalign.yaml", "ltx2.json": "ltx2_t2v_pickscore.yaml",
              "flux2_klein_4b.json": "flux2_klein_base_pickscore.yaml",
              "flux2_klein_base_4b.json": "flux2_klein_base_pickscore.yaml",
              "flux2_klein_9b.json": "flux2_klein_pickscore.yaml", "flux2_dev.json": "flux2_dev_pickscore.yaml",
              "z_image_turbo.json": "z_image_turbo_pickscore.yaml", "z_image.json": "z_image_pickscore.yaml"}


@pytest.mark.parametrize("arch_file", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(arch_file):
    cfg = load_config(str(ROOT / "configs" / RECIPE_FOR[arch_file]))
    arch = P.load_arch(ROOT / "configs" / "arch" / arch_file)
    with torch.device("meta"):
        adapter = P.build_adapter(cfg, arch)
    n = P.parameter_counts(adapter, arch)["total"]
    assert abs(n - PUBLISHED[arch_file]) / PUBLISHED[arch_file] < 0.10, (arch_file, n)


def test_wan22_a14b_counts_both_experts():
    """Wan2.2-T2V-A14B: 14B per expert (the trained high-noise one), 27B in all with the frozen low-noise one,
    whose FSDP shards the plan adds to every GPU's memory."""
    cfg = load_config(str(ROOT / "configs" / "wan22_a14b_t2v.yaml"))
    arch = P.load_arch(ROOT / "configs" / "arch" / "wan2.2_t2v_a14b.json")
    with torch.device("meta"):
        adapter = P.build_adapter(cfg, arch)
    n = P.parameter_counts(adapter, arch)
    assert n["frozen_denoisers"] == n["total"] == n["trainable"]  # two experts of one architecture
    assert abs(n["total"] + n["frozen_denoisers"] - 27e9) / 27e9 < 0.10
    p = P.plan(cfg, 32, 80, arch=arch, measured=P.Measured())  # no activations measured: the static part only
    assert p.settings["fsdp_degree"] == 32
    assert p.memory_gib["frozen_denoisers_shard"] * P.GIB == pytest.approx(n["frozen_denoisers"] * 4 / 32)
    assert p.memory_gib["peak_rollout"] >= p.memory_gib["frozen_denoisers_shard"] + p.memory_gib["params_shard"]


def _small_flux():
    arch = {"name": "small FLUX", "_path": "",
            "blocks": {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"},
            "transformer": {"class": "FluxTransformer2DModel", "config": dict(
                patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=64,
                num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                axes_dims_rope=[16, 24, 24])},
            "vae": {"class": "AutoencoderKL", "config": dict(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8], layers_per_block=1,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)}}
    cfg = load_config(None, ["--model.name=flux", "--model.kwargs={model_path: x, resolution: 256}",
                             "--grpo.group_size=2", "--grpo.prompts_per_iteration=1", "--grpo.micro_batch_size=2",
                             "--rewards=[{name: toy_geneval}]", "--parallel.activation_checkpointing=0.0"])
    return cfg, arch


def test_activation_estimate_agrees_with_real_tensors():
    from torch.distributed._tools.mem_tracker import MemTracker

    cfg, arch = _small_flux()
    planned = P.plan(cfg, 1, 80, arch=arch, text_len=64).memory_gib["train_activations"] * P.GIB
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        ad = P.build_adapter(cfg, arch, dtype="bfloat16")  # all 5 blocks, real tensors
    finally:
        torch.set_default_dtype(prev)
    z = torch.randn((2,) + tuple(ad.latent_shape()))
    cond = {k: torch.randn((2,) + tuple(64 if d is None else d for d in tr)) for k, tr in ad.cond_spec().items()}
    mt = MemTracker()
    mt.track_external(ad.model)
    with mt:
        u = ad.predict(z, ad.make_schedule(2, 0.3).model_timestep(0, z), cond)
        u.float().square().mean().backward()
    peak = next(iter(mt.get_tracker_snapshot("peak").values()))
    real = sum(v for k, v in peak.items() if str(k) in ("_MemRefType.ACT", "_MemRefType.TEMP"))
    assert abs(planned - real) / real < 0.20, (planned / 2**20, real / 2**20)


def test_peak_agrees_with_the_h200_measurement():
    """bench/iteration.py's flux_1b_720px under FSDP2 on one H200 (docs/gpu_runs/2026-11-28_h200_run3.json):
    torch.cuda.max_memory_allocated 30.0 GiB; the plan must be within 15%."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import iteration as it

    planned = it.plan_case(it.CASES["flux_1b_720px"], 141).memory_gib["peak"]
    run = json.loads((ROOT / "docs" / "gpu_runs" / "2026-11-28_h200_run3.json").read_text())
    measured = run["checks"]["grpo_flux"]["peak_mem_mib"] / 1024
    assert abs(planned - measured) / measured < 0.15, (planned, measured)


def test_every_recipe_plans_and_the_verdict_follows_the_budget(capsys):
    recipes = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if "toy" not in p.name]
    assert len(recipes) >= 9
    for path in recipes:
        cfg = load_config(str(path))
        p = P.plan(cfg, 8, 80)
        assert p.params["total"] > 5e8 and p.flops["total"] > 0 and p.memory_gib["peak"] > 0, path.name
        assert p.fits == (p.memory_gib["peak"] <= 80 - P.RESERVE_GIB), path.name
        assert p.fits or p.suggestions, path.name
        big = P.plan(cfg, 8, 10_000, measured=p._measured)
        assert big.fits and big.memory_gib["peak"] == pytest.approx(p.memory_gib["peak"])


def test_sp_must_divide_the_heads():
    cfg = load_config(str(ROOT / "configs" / "flux_hps.yaml"), ["--parallel.sp=5"])
    with pytest.raises(ValueError, match="does not divide the model's 24 attention heads"):
        P.plan(cfg, 10, 80)


def test_replayed_tile_calls_count_what_running_them_counts():
    """The planner replays a repeated sub-module call (a tiled decode's per-tile decoder) instead of re-running
    it under fake tensors; FLOPs, peak live bytes and output shapes must equal running every call, also when
    the calls fill a cache list that decides the next call's output shape (as Wan's causal decoder does)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from fastvideo_grpo.cli.repeat_memo import RepeatedCallMemo

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.Conv2d(16, 3, 3, padding=1)

        def forward(self, x, cache):
            h = self.a(x).relu()  # a temporary larger than the output: the peak rise must be replayed too
            out = self.b(h if not cache else torch.cat([cache[-1], h], dim=-1))  # wider once the cache is filled
            cache.append(h[..., -2:].clone())
            return out, len(cache)

    class Tiled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def forward(self, z):  # rows of tiles, each row with a fresh cache (as Wan's tiled decode clears it)
            outs = []
            for rows in (z[..., :8, :], z[..., 8:, :], z[..., :8, :]):
                cache = []
                for cols in (slice(0, 8), slice(8, 16), slice(16, 24)):
                    out, n = self.decoder(rows[..., cols], cache)
                    outs.append(out.sum(dim=(-1, -2)) * n)
            return torch.stack(outs)

    def measure(memo: bool):
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.manual_seed(0)
            model = Tiled()
            z = torch.zeros(2, 4, 13, 24)
            with FlopCounterMode(display=False) as fc, P.LivePeak() as lp, torch.no_grad():  # as the planner decodes
                if memo:
                    with RepeatedCallMemo({"decoder": model.decoder}, fc, lp) as m:
                        out = model(z)
                    replayed = m.replayed
                else:
                    out, replayed = model(z), 0
            return fc.get_total_flops(), lp.peak, tuple(out.shape), replayed, model

    flops, peak, shape, _, _ = measure(False)
    flops_m, peak_m, shape_m, replayed, model = measure(True)
    assert replayed == 3  # row 3 repeats row 1; within a row the cache grows, so every call there is new
    assert (flops_m, peak_m, shape_m) == (flops, peak, shape) and flops > 0 and peak > 0
    assert "forward" not in model.decoder.__dict__  # nothing left patched


def test_sp_check_reads_a_familys_own_attention_shape():
    """Z-Image names its heads n_heads (30): the adapter's attention_shape() gives them to the planner."""
    cfg = load_config(str(ROOT / "configs" / "z_image_turbo_pickscore.yaml"), ["--parallel.sp=4"])
    with pytest.raises(ValueError, match="does not divide the model's 30 attention heads"):
        P.plan(cfg, 8, 80)
