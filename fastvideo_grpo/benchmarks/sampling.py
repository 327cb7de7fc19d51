"""Sampling and scoring a suite's prompts, data-parallel over ranks, with the same noise whatever the world size.

The items are cut into fixed batches of ``batch_size // samples_per_prompt`` prompts; batch j is sampled with
the ODE sampler from noise seed ``seed + j`` (as ``evaluate.distributed_evaluate`` does, so a suite sees the
same samples as a held-out evaluation with the same settings), batches go round-robin to the ranks, each rank
scores its own samples with the suite's scorer, and the per-sample values are gathered on every rank in item
order. With ``save_images`` every image is also written as PNG in GenEval's folder layout
(``<dir>/<item:05d>/samples/<k:04d>.png`` with the item's ``metadata.jsonl``), which GenEval's own scripts read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .base import Item, Scorer


def batches_of(items: Sequence[Item], samples_per_prompt: int, batch_size: int) -> List[List[int]]:
    """Item indices of each fixed batch."""
    per = max(1, batch_size // samples_per_prompt)
    return [list(range(i, min(i + per, len(items)))) for i in range(0, len(items), per)]


def generate_and_score(adapter, items: Sequence[Item], encode: Callable, scorer: Scorer, *, num_steps: int,
                       samples_per_prompt: int, batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                       autocast_dtype=None, memory: Optional[Dict] = None, progress: Optional[bool] = None,
                       save_images: Optional[Path] = None) -> List[Dict[str, Optional[float]]]:
    """Per-sample values (``samples_per_prompt`` consecutive samples per item, in item order) on every rank
    (collective when distributed). ``progress``: a tqdm bar on rank 0 (None: only when stderr is a TTY)."""
    from ..training.evaluate import evaluate_policy

    spp = int(samples_per_prompt)
    plan = batches_of(items, spp, batch_size)
    mine = [j for j in range(len(plan)) if j % dp_size == dp_rank]
    show = (sys.stderr.isatty() if progress is None else progress) and dp_rank == 0
    from tqdm.auto import tqdm

    bar = tqdm(total=len(plan), desc="benchmark batches", unit="batch", disable=not show, dynamic_ncols=True)
    local = []
    for j in mine:
        batch = [items[i] for i in plan[j]]
        ev = evaluate_policy(adapter, [it.prompt for it in batch], {}, num_steps, encode=encode,
                             samples_per_prompt=spp, seed=seed + j, batch_size=len(batch) * spp, return_images=True,
                             autocast_dtype=autocast_dtype, **(memory or {}))
        images = ev["images"]
        expanded = [it for it in batch for _ in range(spp)]
        values = scorer(images, expanded)
        rows = [{k: (None if v[s] is None else float(v[s])) for k, v in values.items()} for s in range(len(expanded))]
        if save_images is not None:
            _save(save_images, plan[j], batch, images, spp)
        local.append((j, rows))
        bar.update(dp_size if dp_size > 1 else 1)
    bar.close()
    if dp_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: List = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        parts = {j: rows for part in gathered for j, rows in part}
    else:
        parts = dict(local)
    missing = [j for j in range(len(plan)) if j not in parts]
    assert not missing, f"batches {missing} were not computed by any rank"
    return [row for j in range(len(plan)) for row in parts[j]]


def _save(root: Path, indices: Sequence[int], batch: Sequence[Item], images: torch.Tensor, spp: int) -> None:
    from ..utils.io import atomic_path, atomic_write_text

    if images.ndim != 4:  # videos: not written (no video encoder is required by the package)
        return
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for b, (idx, it) in enumerate(zip(indices, batch)):
        folder = Path(root) / f"{idx:05d}"
        atomic_write_text(folder / "metadata.jsonl", json.dumps(it.meta or {"prompt": it.prompt,
                                                                            "category": it.category}) + "\n")
        for k in range(spp):
            with atomic_path(folder / "samples" / f"{k:04d}.png") as tmp:
                Image.fromarray(arr[b * spp + k]).save(tmp, format="PNG")
