"""Short rectified-flow pretraining of the toy DiT on rendered shapes (cached under outputs/).

Deliberately short so the pretrained model is imperfect (wrong counts, stray colours, blurry
shapes) and GRPO has room to improve it. The checkpoint's file name carries a hash of the
pretraining settings, the model config and a few rendered training images (``task_fingerprint``),
so a changed setting or renderer retrains instead of silently reusing a stale model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from ..models.toy import TinyDiT, TinyDiTConfig, load_toy_model, save_toy_model, tokenize
from .shapes import all_prompts, make_dataset


def pretrain_settings(extra: Dict) -> Dict:
    defaults = {"steps": 600, "batch_size": 64, "lr": 1e-3, "num_images": 6000, "seed": 0, "model": {}}
    unknown = set(extra) - set(defaults)
    if unknown:
        raise ValueError(f"unknown pretraining setting(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **extra}


def task_fingerprint(settings: Dict) -> str:
    """What else decides the pretrained weights: the resolved model config and a few rendered training
    images (a changed renderer, e.g. a new shape, changes them)."""
    cfg = TinyDiTConfig(**settings["model"])
    images, names = make_dataset(all_prompts(), 24, cfg.image_size, seed=0)
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(json.dumps(names).encode())
    h.update(images.numpy().tobytes())
    return h.hexdigest()


def checkpoint_path(root, settings: Dict) -> Path:
    """The cache file for these settings: its name hashes them and ``task_fingerprint``."""
    key = json.dumps(settings, sort_keys=True) + task_fingerprint(settings)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(root) / f"tinydit_{digest}.pt"


def pretrain(prompts, settings: Dict, progress: bool = True) -> TinyDiT:
    """Rectified-flow noising z_t = (1 - t) x + t eps, t ~ U(0, 1); the network regresses the clean x
    (the adapter converts its output to the velocity u = eps - x = (z_t - x) / t)."""
    s = settings
    torch.manual_seed(s["seed"])
    model = TinyDiT(TinyDiTConfig(**s["model"]))
    size = model.cfg.image_size
    images, names = make_dataset(prompts, s["num_images"], size, seed=s["seed"])
    data = images * 2 - 1
    tokens = tokenize(names)
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=s["steps"], pct_start=0.1)
    g = torch.Generator().manual_seed(s["seed"] + 1)
    bar = tqdm(range(s["steps"]), desc="pretrain toy DiT", disable=not progress, dynamic_ncols=True)
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
    return model.eval()


def pretrained_toy_model(prompts, settings: Dict, cache_dir="outputs/toy_pretrained", progress=True) -> tuple:
    """Load the cached pretrained model for these settings, or pretrain and cache it.

    Returns (model, checkpoint_path, seconds_spent_pretraining).
    """
    settings = pretrain_settings(settings)
    path = checkpoint_path(cache_dir, settings)
    if path.is_file():
        return load_toy_model(path), path, 0.0
    t0 = time.perf_counter()
    model = pretrain(prompts, settings, progress)
    save_toy_model(model, path)
    return model, path, time.perf_counter() - t0
