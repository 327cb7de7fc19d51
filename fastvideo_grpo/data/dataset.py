"""Datasets over preprocessed prompt embeddings (manifest + safetensors shards written by data_prep).

``PromptEmbeddingDataset`` is map-style: item i is ``{"prompt", "index", "cond"}`` with ``cond`` a dict
of per-prompt tensors (no batch dim), plus the saved ``negative_*`` conditioning when requested. Shards
are opened lazily with ``safetensors.safe_open`` and at most ``max_open_shards`` stay open (LRU), so a
large prompt set never sits in memory; open handles are not pickled (DataLoader workers reopen them).

``split``: a held-out evaluation split chosen by the prompt's hash (sha256 of salt + prompt), so a
prompt stays on the same side whatever the file order or the other prompts; ``eval_fraction`` sets the
expected share. ``collate_prompt_embeddings`` stacks items into a batch with a leading batch dim, padding
variable-length sequences (and their attention masks with 0) where a family has masks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .manifest import NEG, load_manifest, validate_manifest

SPLITS = ("all", "train", "eval")


def is_eval_prompt(prompt: str, eval_fraction: float, salt: str = "") -> bool:
    """True when ``prompt`` belongs to the held-out split (deterministic by hash)."""
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1], got {eval_fraction}")
    h = hashlib.sha256((salt + prompt).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64 < eval_fraction


class PromptEmbeddingDataset(Dataset):
    """Map-style dataset over a manifest (path to manifest.json or its folder, or a loaded dict)."""

    def __init__(self, manifest, *, split: str = "all", eval_fraction: float = 0.0, split_salt: str = "",
                 include_negative: bool = True, names: Optional[Sequence[str]] = None, max_open_shards: int = 4,
                 expected=None, verify_hashes: bool = False, dedupe: bool = False, verify_on_read: bool = True):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if max_open_shards < 1:
            raise ValueError(f"max_open_shards must be >= 1, got {max_open_shards}")
        m = manifest if isinstance(manifest, dict) else load_manifest(manifest)
        # always: files exist, headers readable, no silent duplicates; hashes on request (reads every byte)
        m = validate_manifest(m, expected, check_files=True, verify_hashes=verify_hashes, dedupe=dedupe)
        self.manifest = m
        self.root = Path(m["_root"])
        self.family = m["header"]["family"]
        recs = m["records"]
        if split != "all":
            want_eval = split == "eval"
            recs = [r for r in recs if is_eval_prompt(r["prompt"], eval_fraction, split_salt) == want_eval]
        self.records = recs
        self.names = list(names) if names is not None else None
        self.max_open_shards = int(max_open_shards)
        self._open: "OrderedDict[str, object]" = OrderedDict()
        # a shard whose bytes changed but whose header is intact would be read silently: its sha256 is
        # checked the first time this process opens it (docs/data_prep.md gives the cost)
        self.verify_on_read = bool(verify_on_read)
        self._sha = {s["file"]: s.get("sha256") for s in m.get("shards", [])}
        self._verified: set = set()
        self._negative: Optional[Dict[str, torch.Tensor]] = None
        neg = m["header"].get("negative")
        self.include_negative = bool(include_negative and neg)
        self._neg_file = neg["file"] if neg else None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> List[str]:
        return [r["prompt"] for r in self.records]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def _handle(self, rel: str):
        from safetensors import safe_open

        f = self._open.get(rel)
        if f is not None:
            self._open.move_to_end(rel)
            return f
        p = self.root / rel
        if not p.is_file():
            raise FileNotFoundError(f"shard {str(p)!r} is missing; rerun data_prep with the same arguments")
        if self.verify_on_read and rel not in self._verified and self._sha.get(rel):
            from .manifest import file_sha256

            if file_sha256(p) != self._sha[rel]:
                raise ValueError(f"shard {str(p)!r} changed since data_prep wrote it (its sha256 differs from the "
                                 f"manifest's): rerun data_prep with the same arguments, or set "
                                 f"data.verify_on_read: false to use it anyway")
            self._verified.add(rel)
        try:
            f = safe_open(str(p), framework="pt")
        except Exception as e:
            raise ValueError(f"shard {str(p)!r} is corrupt ({e}); rerun data_prep with the same arguments") from None
        self._open[rel] = f
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return f

    @property
    def num_open_shards(self) -> int:
        return len(self._open)

    def negative_cond(self) -> Dict[str, torch.Tensor]:
        if self._negative is None:
            from safetensors.torch import load_file

            p = self.root / self._neg_file
            if not p.is_file():
                raise FileNotFoundError(f"negative conditioning {str(p)!r} is missing; rerun data_prep")
            self._negative = load_file(str(p))
        return self._negative

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        f = self._handle(r["shard"])
        names = self.names if self.names is not None else list(r["tensors"])
        cond = {}
        for n in names:
            if n.startswith(NEG) and self.include_negative:
                continue
            key = f"{r['index']}/{n}"
            try:
                cond[n] = f.get_tensor(key)
            except Exception as e:
                raise ValueError(f"shard {str(self.root / r['shard'])!r} has no readable tensor {key!r} ({e}); "
                                 "the shard does not match the manifest: rerun data_prep") from None
        if self.include_negative:
            for n, t in self.negative_cond().items():
                if self.names is None or n in self.names:
                    cond[n] = t
        return {"prompt": r["prompt"], "index": i, "cond": cond}


def _mask_name(name: str) -> Optional[str]:
    if name.endswith("_attention_mask"):
        return name
    if name.endswith("_embeds"):
        return name[: -len("_embeds")] + "_attention_mask"
    return None


def collate_prompt_embeddings(items: Sequence[dict]) -> dict:
    """Items -> {"prompts": [...], "indices": (B,), "cond": {name: (B, ...)}}.

    Tensors of one name with different sequence lengths (dim 0 per item) are zero-padded to the longest
    when the family has an attention mask for them (``X_embeds`` with ``X_attention_mask``, or the mask
    itself: padded with 0 = masked out); otherwise differing shapes are an error.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    names = list(items[0]["cond"])
    for it in items[1:]:
        if list(it["cond"]) != names:
            raise ValueError(f"items have different conditioning names: {names} vs {list(it['cond'])}")
    cond = {}
    for n in names:
        ts = [it["cond"][n] for it in items]
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) > 1:
            mask = _mask_name(n)
            rest = {s[1:] for s in shapes}
            if mask is None or mask not in names or len(rest) != 1 or any(len(s) == 0 for s in shapes):
                raise ValueError(f"cannot batch {n}: shapes {sorted(shapes)} differ and it has no attention mask "
                                 "to pad with; preprocess with one max length")
            L = max(s[0] for s in shapes)
            ts = [torch.cat([t, t.new_zeros((L - t.shape[0],) + tuple(t.shape[1:]))]) if t.shape[0] < L else t
                  for t in ts]
        cond[n] = torch.stack(ts)
    return {"prompts": [it["prompt"] for it in items], "indices": torch.tensor([it["index"] for it in items]),
            "cond": cond}
