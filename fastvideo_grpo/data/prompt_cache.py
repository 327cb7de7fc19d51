"""Prompts straight in: ``data.prompts: FILE`` (or ``hf:NAME[:split]``) -> embeddings computed on first use.

``prepare_prompt_embeddings(cfg)`` reads the prompts (a .txt / .jsonl / .csv file through data/prompts.py, or
a Hugging Face dataset through ``datasets.load_dataset`` when that package is installed), and looks for their
embeddings in the cache: ``<data.embedding_cache or <output_dir>/embeddings>/<family>-<key>/``, where the key
hashes what decides the numbers (the family, the prompts and reference images in order, the encoders'
config hashes, the ``data.encoding`` options, the negative prompt). On a miss it loads the family's encoders
(its ``PromptEncoding``, data/encoders.py) and writes the manifest with data_prep's own ``PrepJob``
(data/prep.py): the same code, the same files, resumable shard by shard; under torchrun every rank encodes
its share of the shards. Then ``data.manifest`` (and ``data.eval_manifest`` for ``data.eval_prompts``) point
at the cached manifests, and the run reads them as it reads any data_prep output. The explicit data_prep
step stays the way for big encoders on many GPUs (docs/data_prep.md).
"""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import RunConfig
from .manifest import MANIFEST_NAME, file_sha256
from .prompts import PromptRecord, find_duplicates, read_prompts

HF_PREFIX = "hf:"
#: data.encoding keys besides the family's PromptEncoding options: where the encoders are, and the prep's own
PREP_OPTIONS = {"model_path": None, "dtype": "bfloat16", "encoder_dtype": None, "batch_size": 16, "shard_size": 256,
                "negative_prompt": "<family default>", "image_field": "image"}
ENCODING_OPTIONS = ("clip_max_length", "t5_max_length", "llama_max_length", "qwen_max_length", "crop_start",
                    "num_hidden_layers_to_skip", "height", "width", "num_frames", "image_embeds")


# ----------------------------------------------------------------------------- reading the prompts


def read_prompt_source(spec: str, *, field: str = "prompt", image_field: Optional[str] = None,
                       key: str = "data.prompts") -> Tuple[List[PromptRecord], dict]:
    """(records, a description of the source for the manifest) of a prompt file or ``hf:NAME[:split]``."""
    if spec.startswith(HF_PREFIX):
        return _hf_records(spec, field, image_field, key)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ValueError(f"{key} = {spec!r} is a folder; give a prompt file (.txt, .jsonl or .csv) or hf:NAME[:split]")
    if not path.exists():
        raise FileNotFoundError(f"{key} = {spec!r} does not exist (a .txt / .jsonl / .csv prompt file, or "
                                "hf:NAME[:split] for a Hugging Face dataset)")
    records = read_prompts(path, field=field, image_field=image_field)
    return records, {"file": path.name, "sha256": file_sha256(path), "prompt_field": field}


def _hf_records(spec: str, field: str, image_field: Optional[str], key: str) -> Tuple[List[PromptRecord], dict]:
    parts = spec[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 2:
        raise ValueError(f"{key} = {spec!r}: expected hf:NAME or hf:NAME:SPLIT (e.g. hf:org/prompts:train)")
    name, split = parts[0], (parts[1] if len(parts) == 2 and parts[1] else "train")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{key} = {spec!r} needs the Hugging Face `datasets` package, which is not installed: "
                         "pip install datasets (or save the prompts to a .txt / .jsonl / .csv file)") from None
    if image_field:
        raise ValueError(f"{key} = {spec!r}: reference images are read from prompt files only; save the dataset as "
                         f".jsonl with a {image_field!r} field")
    ds = datasets.load_dataset(name, split=split)
    columns = list(getattr(ds, "column_names", None) or [])
    if field not in columns:
        raise ValueError(f"{key} = {spec!r}: the dataset has no column {field!r} (columns: {columns}); set "
                         "data.prompt_field")
    records = []
    for i, p in enumerate(ds[field]):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{key} = {spec!r}: row {i} of column {field!r} is not a non-empty string: {p!r}")
        records.append(PromptRecord(p.strip()))
    if not records:
        raise ValueError(f"{key} = {spec!r}: split {split!r} holds no rows")
    return records, {"dataset": name, "split": split, "prompt_field": field,
                     "fingerprint": str(getattr(ds, "_fingerprint", ""))}


# ----------------------------------------------------------------------------- the cache key


def encoding_options(cfg: RunConfig) -> Tuple[Dict, Dict]:
    """(prep options over their defaults, the PromptEncoding's options) from ``data.encoding``."""
    opts = dict(cfg.data.encoding)
    unknown = sorted(set(opts) - set(PREP_OPTIONS) - set(ENCODING_OPTIONS))
    if unknown:
        raise ValueError(f"data.encoding does not take {unknown}; accepted: {sorted(PREP_OPTIONS)} and the prompt "
                         f"encoding's {list(ENCODING_OPTIONS)} (data_prep's flags, docs/data_prep.md)")
    prep = {k: opts.get(k, v) for k, v in PREP_OPTIONS.items()}
    enc = {k: opts[k] for k in ENCODING_OPTIONS if k in opts}
    for k in ("batch_size", "shard_size"):
        if not isinstance(prep[k], int) or prep[k] < 1:
            raise ValueError(f"data.encoding.{k} must be an integer >= 1, got {prep[k]!r}")
    return prep, enc


def cache_key(family: str, records: List[PromptRecord], identities: Dict[str, str], prep: Dict, enc: Dict,
              negative: Optional[str]) -> str:
    """sha256 of what decides the embeddings: family, prompts (and reference images' bytes), encoders, options."""
    h = hashlib.sha256()
    h.update(json.dumps({"family": family, "encoders": identities, "dtype": prep["dtype"],
                         "shard_size": prep["shard_size"], "batch_size": prep["batch_size"], "options": enc,
                         "negative": negative}, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps([r.prompt, Path(r.image).name if r.image else None]).encode())
        if r.image is not None and Path(r.image).is_file():
            h.update(file_sha256(r.image).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- preparing


def prepare_prompt_embeddings(cfg: RunConfig, *, check_only: bool = False, progress: Optional[bool] = None) -> Dict:
    """Point ``cfg.data.manifest`` (and ``eval_manifest``) at the cached embeddings of ``data.prompts`` (and
    ``data.eval_prompts``), computing them first when missing (collective under torchrun). ``check_only``:
    check the prompts, the family and the encoder folders, and use a cache that exists; encode nothing.
    Returns {"train": {...}, "eval": {...}}: each set's cache folder and whether it was encoded now."""
    from ..models import encoding_for
    from .encoders import encoder_subfolders

    d = cfg.data
    if not d.prompts:
        return {}
    try:
        encoding = encoding_for(cfg.model.name)
    except ValueError as e:
        raise ValueError(f"data.prompts needs a model family with a prompt encoding; model.name = "
                         f"{cfg.model.name!r}: {e}") from None
    prep, enc = encoding_options(cfg)
    model_path = prep["model_path"] or cfg.model.kwargs.get("model_path")
    if not model_path:
        raise ValueError("data.prompts: no folder to load the text encoders from: set model.kwargs.model_path (or "
                         "data.encoding.model_path)")
    root = Path(str(model_path)).expanduser()
    missing = [s for s in encoder_subfolders(encoding) if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"data.prompts: the model folder {str(root)!r} lacks {missing}, which family "
                                f"{encoding.family!r} encodes prompts with; point data.encoding.model_path at a folder "
                                "holding them, or run data_prep elsewhere and set data.manifest (docs/data_prep.md)")
    from ..models.encoding import config_sha

    identities = {s: config_sha(root / s) for s in encoder_subfolders(encoding)}
    negative = prep["negative_prompt"]
    if negative == PREP_OPTIONS["negative_prompt"]:
        negative = "" if encoding.cfg_by_default else None
    cache_root = Path(d.embedding_cache).expanduser() if d.embedding_cache else Path(cfg.train.output_dir) / "embeddings"
    image_field = prep["image_field"] if encoding.vae_class is not None else None
    out = {}
    for name, spec, target in (("train", d.prompts, "manifest"), ("eval", d.eval_prompts, "eval_manifest")):
        if not spec:
            continue
        key_name = "data.prompts" if name == "train" else "data.eval_prompts"
        records, source = read_prompt_source(spec, field=d.prompt_field, image_field=image_field, key=key_name)
        records = _deduplicated(records, d.dedupe, key_name)
        key = cache_key(encoding.family, records, identities, prep, enc, negative)
        folder = cache_root / f"{encoding.family}-{key[:16]}"
        encoded = False
        if not (folder / MANIFEST_NAME).is_file():
            if check_only:  # not embedded yet: nothing to check in place of the manifest
                setattr(d, target, None)
                out[name] = {"folder": str(folder), "encoded": False, "cached": False}
                continue
            _encode(cfg, encoding.family, root, records, folder, prep, enc, negative, source, progress)
            encoded = True
        setattr(d, target, str(folder / MANIFEST_NAME))
        out[name] = {"folder": str(folder), "encoded": encoded, "cached": True, "num_prompts": len(records)}
    return out


def _deduplicated(records: List[PromptRecord], dedupe: bool, key: str) -> List[PromptRecord]:
    dups = find_duplicates(records)
    if not dups:
        return records
    if not dedupe:
        ex = "; ".join(f"entries {a + 1} and {b + 1}: {r.prompt!r}" for a, b, r in dups[:3])
        raise ValueError(f"{key}: {len(dups)} repeated prompt(s) ({ex}); remove them or set data.dedupe: true")
    drop = {b for _, b, _ in dups}
    return [r for i, r in enumerate(records) if i not in drop]


def _encode(cfg: RunConfig, family: str, root: Path, records, folder: Path, prep: Dict, enc: Dict,
            negative: Optional[str], source: dict, progress: Optional[bool]) -> None:
    """data_prep's PrepJob over ``records`` into ``folder`` (every rank its shards; rank 0 writes the manifest)."""
    from ..distributed.init import barrier, init_distributed
    from ..utils.dtypes import parse_dtype
    from .encoders import load_family_encoder
    from .prep import PrepJob

    env = init_distributed(cfg.train.device, timeout_s=cfg.parallel.init_timeout_s)
    enc_dtype = parse_dtype(prep["encoder_dtype"] or ("bfloat16" if env.device.type == "cuda" else "float32"))
    if env.is_main:
        print(f"data.prompts: encoding {len(records)} prompt(s) with the {family} text encoders into {folder} "
              "(once; later runs read the cache)", flush=True)
    torch.manual_seed(0)
    encoder = load_family_encoder(family, root, dtype=enc_dtype, device=env.device, **enc)
    job = PrepJob(encoder, records, folder, dtype=prep["dtype"], shard_size=prep["shard_size"],
                  batch_size=prep["batch_size"], negative_prompt=negative, source=source,
                  progress=(cfg.log.progress if progress is None else progress) and env.is_main)
    if env.is_main:
        job.write_negative()
    job.run_shards(env.rank, env.world_size)
    barrier()
    if env.is_main:
        job.merge_manifest()
    barrier()
    del encoder, job
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
