"""What VAE tiling and slicing do to decoded pixels and to decode time; prints ONE JSON line.

For each VAE kind the adapters use (``AutoencoderKL``: SD / FLUX / SD3; ``AutoencoderKLHunyuanVideo``;
``AutoencoderKLWan``), a narrow random-init VAE (bench/iteration.py's builders; 8 channels, real
down-sampling factors) decodes the same N(0, 1) latents four ways: plain, sliced (one sample per
decoder call), tiled at diffusers' default tile geometry (video VAEs: 256 px tiles, stride 192;
AutoencoderKL: ``sample_size`` tiles, 25 % overlap) and both. Frames are larger than one tile so
tiling really cuts them. The decoder's last convolution is rescaled so that the plain decode spreads
over the pixel range (std 0.25 in [0, 1] units) -- a default-initialised decoder is almost constant
grey, which would hide any difference.

Each kind runs twice: as built (with the decoder's mid-block self-attention, which sees the whole
frame, or only one tile when tiled) and with that attention removed (``no_mid_attention``: only the
convolutions' finite receptive field is cut at the seams). Reported: max and mean |difference|
against the plain decode in [0, 1] pixel units, the share of pixels that move by more than one 8-bit
level (1/255), and decode seconds (CPU, one thread: noisy on a shared machine).

A random VAE is not a trained one: these numbers bound nothing for a trained VAE. ``--vae-folder``
runs the same comparison on a real diffusers VAE folder (e.g. ckpts/HunyuanVideo/vae) with real
latents' statistics approximated by N(0, 1) / scaling_factor -- what a GPU machine with the weights
should run to state the real effect.

    python bench/vae_tiling.py                 # ~3 min on 2 CPU cores
    python bench/vae_tiling.py --quick         # one-frame videos, two kinds (CI: tests/integration/test_bench_iteration.py)
    python bench/vae_tiling.py --vae-folder ckpts/HunyuanVideo/vae --device cuda --size 480 --frames 53
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def _vae_wan(diffusers, width=8):
    """A narrow Wan 2.1 VAE (z_dim 16, 8x spatial / 4x temporal compression as the real one)."""
    return diffusers.AutoencoderKLWan(base_dim=width, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True])


def build(kind: str, diffusers):
    from iteration import vae_arch

    from fastvideo_grpo.models.diffusers_base import component_from_config

    torch.manual_seed(0)
    if kind == "autoencoder_kl":
        vae = component_from_config(*vae_arch("flux", latent_channels=16, width=8, levels=4))
        vae.tile_sample_min_size = 256  # the config's sample_size (1024 for FLUX's VAE, 512 for SD's)
        vae.tile_latent_min_size = 256 // 8
        return vae
    if kind == "hunyuan_video":
        return component_from_config(*vae_arch("hunyuan_t2v", latent_channels=16, width=8))
    if kind == "wan":
        return _vae_wan(diffusers)
    raise KeyError(kind)


def latents_for(kind: str, vae, batch: int, size: int, frames: int, g):
    h = size // 8
    if kind == "autoencoder_kl":
        return torch.randn(batch, vae.config.latent_channels, h, h, generator=g)
    lf = (frames - 1) // 4 + 1
    c = vae.config.latent_channels if kind == "hunyuan_video" else vae.config.z_dim
    return torch.randn(batch, c, lf, h, h, generator=g)


@torch.no_grad()
def decode(vae, z, tiling: bool, slicing: bool):
    vae.use_tiling, vae.use_slicing = tiling, slicing
    t0 = time.perf_counter()
    x = vae.decode(z, return_dict=False)[0]
    return ((x.float() + 1) / 2).clamp(0, 1), time.perf_counter() - t0


def drop_mid_attention(vae):
    """Remove the decoder's mid-block self-attention (the blocks skip a None attention)."""
    mid = vae.decoder.mid_block
    mid.attentions = torch.nn.ModuleList([None] * len(mid.attentions))


@torch.no_grad()
def condition(vae, z, target_std=0.5):
    """Rescale the decoder's conv_out so the plain decode has std ``target_std`` in [-1, 1] units."""
    vae.use_tiling = vae.use_slicing = False
    std = float(vae.decode(z, return_dict=False)[0].float().std())
    conv = vae.decoder.conv_out
    conv = getattr(conv, "conv", conv)  # Hunyuan / Wan wrap a causal Conv3d
    conv.weight.mul_(target_std / max(std, 1e-6))
    if conv.bias is not None:
        conv.bias.zero_()


def run(kind: str, size: int, frames: int, batch: int = 2, mid_attention: bool = True, folder=None,
        device="cpu") -> dict:
    import diffusers

    if folder is not None:
        cls = getattr(diffusers, json.loads((Path(folder) / "config.json").read_text())["_class_name"])
        vae = cls.from_pretrained(str(folder), local_files_only=True).to(device).eval().requires_grad_(False)
        kind = {"AutoencoderKL": "autoencoder_kl", "AutoencoderKLHunyuanVideo": "hunyuan_video",
                "AutoencoderKLWan": "wan"}[cls.__name__]
        z = latents_for(kind, vae, batch, size, frames, torch.Generator().manual_seed(1))
        z = (z / getattr(vae.config, "scaling_factor", 1.0)).to(device)
    else:
        vae = build(kind, diffusers).eval().requires_grad_(False)
        if not mid_attention:
            drop_mid_attention(vae)
        z = latents_for(kind, vae, batch, size, frames, torch.Generator().manual_seed(1))
        condition(vae, z)
    if hasattr(vae, "enable_tiling") and kind != "autoencoder_kl":
        vae.enable_tiling()  # diffusers' defaults: 256 px tiles, stride 192
    out = {"kind": kind, "vae_class": type(vae).__name__, "weights": str(folder) if folder else "random",
           "mid_attention": mid_attention, "latent_shape": list(z.shape), "frame_px": size,
           "frames": frames if kind != "autoencoder_kl" else None}
    ref, out["plain_s"] = decode(vae, z, False, False)
    out["pixel_std"] = float(ref.std())
    for name, tiling, slicing in (("sliced", False, True), ("tiled", True, False), ("tiled_sliced", True, True)):
        x, secs = decode(vae, z, tiling, slicing)
        d = (x - ref).abs()
        out[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                     "share_over_1_of_255": float((d > 1 / 255).float().mean()), "seconds": secs}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="frames of 288 px (still two tiles), one-frame videos, "
                                                           "two kinds (CI smoke)")
    ap.add_argument("--size", type=int, default=384, help="frame side in pixels (> 256 so tiling cuts it)")
    ap.add_argument("--frames", type=int, default=5, help="video frames (4k + 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-folder", default=None, help="a trained diffusers VAE folder instead of random VAEs")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = 288 if args.quick else args.size
    t0 = time.perf_counter()
    if args.vae_folder:
        cases = [run("", size, args.frames, folder=args.vae_folder, device=args.device)]
    else:
        kinds = ["autoencoder_kl", "hunyuan_video"] if args.quick else ["autoencoder_kl", "hunyuan_video", "wan"]
        attention = (True,) if args.quick else (True, False)
        cases = [run(k, size, 1 if args.quick else args.frames, mid_attention=a) for k in kinds for a in attention]
    res = {"bench": "vae_tiling", "torch": torch.__version__, "threads": args.threads,
           "units": "pixels in [0, 1]", "cases": cases}
    res["wall_s"] = time.perf_counter() - t0
    print(json.dumps(res))


if __name__ == "__main__":
    main()
