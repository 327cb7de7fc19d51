"""Prompt strings -> batched conditioning, read from the precomputed embeddings of data_prep, and
the training / held-out prompt sets of a run (``data.*``) checked against the adapter's ``cond_spec()``."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .dataset import PromptEmbeddingDataset, collate_prompt_embeddings


class EmbeddingLookup:
    """prompt strings -> batched conditioning on ``device``, read from a ``PromptEmbeddingDataset``."""

    def __init__(self, datasets: Sequence, device):
        self.datasets = list(datasets)
        self.device = torch.device(device)
        self.where: Dict[str, Tuple[int, int]] = {}
        for d, ds in enumerate(self.datasets):
            for i, p in enumerate(ds.prompts):
                self.where.setdefault(p, (d, i))

    def __call__(self, prompts: Sequence[str]):
        missing = [p for p in prompts if p not in self.where]
        if missing:
            raise ValueError(f"no precomputed embeddings for prompt(s) {missing[:3]}; rerun data_prep with them")
        items = [self.datasets[d][i] for d, i in (self.where[p] for p in prompts)]
        cond = collate_prompt_embeddings(items)["cond"]
        return {k: v.to(self.device, non_blocking=True) for k, v in cond.items()}


def build_prompt_sets(cfg, adapter, manifest: Optional[dict], device):
    """(train prompts, held-out prompts, encode fn) from ``data.*``; validated against ``cond_spec()``."""
    spec = adapter.cond_spec() if hasattr(adapter, "cond_spec") else None
    names = list(spec) if spec is not None else None
    common = dict(names=names, expected=spec, max_open_shards=cfg.data.max_open_shards, dedupe=cfg.data.dedupe,
                  verify_on_read=cfg.data.verify_on_read)
    d = cfg.data
    if d.eval_manifest:
        train = PromptEmbeddingDataset(manifest, split="all", **common)
        held = PromptEmbeddingDataset(d.eval_manifest, split="all", **common)
    else:
        train = PromptEmbeddingDataset(manifest, split="train", eval_fraction=d.eval_fraction, split_salt=d.split_salt,
                                       **common)
        held = PromptEmbeddingDataset(manifest, split="eval", eval_fraction=d.eval_fraction, split_salt=d.split_salt,
                                      **common)
    if len(train) == 0:
        raise ValueError(f"no training prompts left in {d.manifest} after holding out data.eval_fraction="
                         f"{d.eval_fraction}; lower it")
    encode = EmbeddingLookup([train, held], device)
    return train.prompts, held.prompts, encode
