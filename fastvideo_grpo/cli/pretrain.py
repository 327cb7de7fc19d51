"""Short pretraining of the toy model on rendered shapes (cached under outputs/).

Two stages when ``autoencoder`` settings are given (the demo): the per-cell autoencoder learns to
reconstruct the rendered images, then the DiT learns rectified flow on its normalised latents; without
them the DiT learns rectified flow on the pixels. Deliberately short so the pretrained model is imperfect
(missing objects, wrong counts and shapes) and GRPO has room to improve it. The checkpoint's file name
carries a hash of the pretraining settings, the model configs and a few rendered training images
(``task_fingerprint``), so a changed setting or renderer retrains instead of silently reusing a stale model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..models.toy import TinyDiT, TinyDiTConfig, load_toy_autoencoder, load_toy_model, save_toy_model, tokenize
from ..models.toy_autoencoder import GRID, CellAutoencoder, CellAutoencoderConfig
from ..toy.shapes import all_prompts, make_dataset

AUTOENCODER_DEFAULTS = {"image_size": 32, "channels": 3, "hidden": 128, "steps": 1000, "batch_size": 512,
                        "lr": 3e-3, "noise": 0.1}


def pretrain_settings(extra: Dict) -> Dict:
    """The pretraining settings over their defaults; ``autoencoder`` (None = a pixel model) over its own."""
    defaults = {"steps": 600, "batch_size": 64, "lr": 1e-3, "num_images": 6000, "seed": 0, "model": {},
                "autoencoder": None}
    unknown = set(extra) - set(defaults)
    if unknown:
        raise ValueError(f"unknown pretraining setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    out = {**defaults, **extra}
    if out["autoencoder"] is not None:
        unknown = set(out["autoencoder"]) - set(AUTOENCODER_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown autoencoder setting(s) {sorted(unknown)}; known: {sorted(AUTOENCODER_DEFAULTS)}")
        out["autoencoder"] = {**AUTOENCODER_DEFAULTS, **out["autoencoder"]}
    return out


def model_configs(settings: Dict) -> Tuple[TinyDiTConfig, Optional[CellAutoencoderConfig]]:
    """The DiT's config and the autoencoder's (None for a pixel model). A latent DiT denoises the
    autoencoder's (channels, 4, 4) grid with patch size 1; ``model`` may not say otherwise."""
    ae = settings.get("autoencoder")
    if ae is None:
        return TinyDiTConfig(**settings["model"]), None
    ae_cfg = CellAutoencoderConfig(image_size=ae["image_size"], channels=ae["channels"], hidden=ae["hidden"])
    latent = {"image_size": GRID, "patch_size": 1, "channels": ae_cfg.channels}
    clash = {k: v for k, v in settings["model"].items() if k in latent and v != latent[k]}
    if clash:
        raise ValueError(f"pretraining model settings {clash} contradict the autoencoder's latent grid {latent}: "
                         "leave them out (they follow from the autoencoder) or set autoencoder: null for pixels")
    return TinyDiTConfig(**{**settings["model"], **latent}), ae_cfg


def render_size(settings: Dict) -> int:
    dit, ae = model_configs(settings)
    return ae.image_size if ae is not None else dit.image_size


def task_fingerprint(settings: Dict) -> str:
    """What else decides the pretrained weights: the resolved model configs and a few rendered training
    images (a changed renderer, e.g. a new shape, changes them)."""
    dit, ae = model_configs(settings)
    images, names = make_dataset(all_prompts(), 24, render_size(settings), seed=0)
    h = hashlib.sha256(json.dumps(asdict(dit), sort_keys=True).encode())
    if ae is not None:
        h.update(json.dumps(asdict(ae), sort_keys=True).encode())
    h.update(json.dumps(names).encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()


def checkpoint_path(root, settings: Dict) -> Path:
    """The cache file for these settings: its name hashes them and ``task_fingerprint``."""
    key = json.dumps(settings, sort_keys=True) + task_fingerprint(settings)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(root) / f"tinydit_{digest}.pt"


def train_autoencoder(images: torch.Tensor, cfg: CellAutoencoderConfig, settings: Dict, seed: int,
                      progress: bool = True) -> CellAutoencoder:
    """Per-cell reconstruction (MSE) of ``images`` in [0, 1], with Gaussian noise of std ``noise`` added to
    the latents while training (so nearby latents decode to similar cells: a smooth space to denoise in)
    and a 1e-3 penalty on their size, then the latent normalisation from the encoder's statistics."""
    torch.manual_seed(seed)
    ae = CellAutoencoder(cfg)
    cells = ae.to_cells(images).reshape(-1, ae.encoder[0].in_features)
    opt = torch.optim.AdamW(ae.parameters(), lr=settings["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 2)
    bar = tqdm(range(settings["steps"]), desc="pretrain toy autoencoder", disable=None if progress else True,
               dynamic_ncols=True)
    for _ in bar:
        x = cells[torch.randint(0, cells.shape[0], (settings["batch_size"],), generator=g)]
        z = ae.encoder(x)
        z = z + settings["noise"] * torch.randn(z.shape, generator=g)
        # the small penalty keeps the latents from growing until the noise no longer matters
        loss = (ae.decoder(z) - x).square().mean() + 1e-3 * z.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    ae.set_latent_statistics(images)
    return ae.requires_grad_(False).eval()


def pretrain(prompts, settings: Dict, progress: bool = True) -> Tuple[TinyDiT, Optional[CellAutoencoder]]:
    """Rectified-flow noising z_t = (1 - t) x + t eps, t ~ U(0, 1), of the pixels (in [-1, 1]) or of the
    autoencoder's latents; the network regresses the clean x (the adapter converts its output to the
    velocity u = eps - x = (z_t - x) / t). Returns (DiT, autoencoder or None)."""
    s = settings
    dit_cfg, ae_cfg = model_configs(s)
    torch.manual_seed(s["seed"])
    model = TinyDiT(dit_cfg)
    images, names = make_dataset(prompts, s["num_images"], render_size(s), seed=s["seed"])
    autoencoder = None
    if ae_cfg is not None:
        autoencoder = train_autoencoder(images, ae_cfg, s["autoencoder"], s["seed"], progress)
        with torch.no_grad():
            data = torch.cat([autoencoder.encode(images[i:i + 1024]) for i in range(0, images.shape[0], 1024)])
    else:
        data = images * 2 - 1
    tokens = tokenize(names)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=s["steps"], pct_start=0.1)
    g = torch.Generator().manual_seed(s["seed"] + 1)
    bar = tqdm(range(s["steps"]), desc="pretrain toy DiT", disable=None if progress else True, dynamic_ncols=True)
    ema = None
    for _ in bar:
        idx = torch.randint(0, data.shape[0], (s["batch_size"],), generator=g)
        x, tok = data[idx], tokens[idx]
        eps = torch.randn(x.shape, generator=g)
        t = torch.rand(x.shape[0], generator=g)
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
        loss = (model(z, t * 1000, tok) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        bar.set_postfix(loss=f"{ema:.4f}")
    return model.eval(), autoencoder


def pretrained_toy_model(prompts, settings: Dict, cache_dir="outputs/toy_pretrained", progress=True) -> tuple:
    """Load the cached pretrained model for these settings, or pretrain and cache it.

    Returns (model, autoencoder or None, checkpoint_path, seconds_spent_pretraining).
    """
    settings = pretrain_settings(settings)
    path = checkpoint_path(cache_dir, settings)
    if path.is_file():
        return load_toy_model(path), load_toy_autoencoder(path), path, 0.0
    t0 = time.perf_counter()
    model, autoencoder = pretrain(prompts, settings, progress)
    save_toy_model(model, path, autoencoder)
    return model, autoencoder, path, time.perf_counter() - t0
