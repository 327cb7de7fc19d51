"""Repository scripts as modules, and the tiny toy pretraining that script tests run.

``load_script("bench", "ablations")`` imports ``bench/ablations.py`` (not a package) so a test can call its
``main``. ``TINY_TOY_PRETRAIN``: overrides of configs/toy_cpu.yaml that pretrain a tiny latent toy model in
about a second (16 px renders, a 1-block DiT, a few steps each).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY_TOY_PRETRAIN = [
    "--extra.pretrain.steps=3", "--extra.pretrain.num_images=32", "--extra.pretrain.batch_size=8",
    "--extra.pretrain.model={hidden: 32, depth: 1, heads: 2}",
    "--extra.pretrain.autoencoder={image_size: 16, hidden: 16, steps: 3}",
]


def load_script(folder: str, name: str):
    """``<repo>/<folder>/<name>.py`` imported as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", ROOT / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
