"""The embedding manifest: format, hashing, loading and ``validate_manifest``.

Layout written by data_prep (``<out>/``)::

    manifest.json                  header + shard list + one record per prompt
    shards/shard-00000.safetensors tensors "<index in shard>/<name>" for up to shard_size prompts
    shards/shard-00000.json        the shard's sidecar: its records and sha256 (used to resume)
    negative.safetensors           optional: the negative / empty-prompt conditioning, saved once

manifest.json::

    {"format": "fastvideo_grpo.prompt_embeddings", "format_version": 1,
     "header": {"family", "tool_version", "dtype", "settings" (max lengths, crop, resolution...),
                "encoders": {component: {"class", "path", "config_sha256"}},
                "tensors": {name: {"encoder", "dtype"}}, "shard_size", "num_prompts", "source", "negative"},
     "shards": [{"file", "sha256", "num_records"}],
     "records": [{"prompt", "image"?, "shard", "index", "sha256",
                  "tensors": {name: {"shape", "dtype", "encoder"}}}]}

A record's ``sha256`` hashes its tensors (name, dtype, shape and raw bytes, names sorted); a shard's
``sha256`` is the hash of the file. ``validate_manifest`` checks a manifest against what a model adapter
expects and raises a ValueError / FileNotFoundError listing every mismatch; nothing is silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

FORMAT = "fastvideo_grpo.prompt_embeddings"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
NEGATIVE_FILE = "negative.safetensors"
NEG = "negative_"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, names sorted."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def load_manifest(path) -> dict:
    """Read a manifest (a manifest.json path or the folder holding it); adds ``_root`` (the folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"manifest {str(p)!r} does not exist; run data_prep first (see docs/data_prep.md)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {str(p)!r} is not valid JSON ({e}); rerun data_prep to rewrite it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{p} is not a prompt-embedding manifest (format {FORMAT!r} expected)")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: manifest format_version {m.get('format_version')} is not supported "
                         f"(this code reads {FORMAT_VERSION}); rerun data_prep")
    m["_root"] = str(p.parent)
    return m


def _as_manifest(manifest: Union[dict, str, os.PathLike]) -> dict:
    return manifest if isinstance(manifest, dict) else load_manifest(manifest)


def _norm_expected(expected) -> Dict[str, dict]:
    out = {}
    for name, spec in dict(expected).items():
        if isinstance(spec, Mapping):
            d = dict(spec)
        else:
            d = {"shape": spec}
        if d.get("shape") is not None:
            d["shape"] = tuple(d["shape"])
        if isinstance(d.get("dtype"), torch.dtype):
            d["dtype"] = dtype_name(d["dtype"])
        out[name] = d
    return out


def _shape_ok(shape, expected) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))


def _encoder_matches(want: str, source: str, encoders: dict) -> bool:
    """``want`` names the encoder by class, by path, by folder name, or by component name."""
    for comp in source.split("+"):
        info = encoders.get(comp, {})
        names = {comp, info.get("class", ""), info.get("path", ""), os.path.basename(info.get("path", "").rstrip("/")),
                 os.path.basename(os.path.dirname(info.get("path", "").rstrip("/")))}
        if want in names:
            return True
    return False


def describe_tensor_info(manifest: dict) -> Dict[str, dict]:
    """name -> {"shape" (of the first record / the negative), "dtype", "encoder"} over records and negative."""
    header = manifest["header"]
    info = {}
    recs = manifest.get("records") or []
    if recs:
        for name, t in recs[0]["tensors"].items():
            info[name] = dict(t)
    neg = header.get("negative") or {}
    for name, t in (neg.get("tensors") or {}).items():
        info[name] = dict(t)
    return info


def validate_manifest(manifest, expected=None, *, family: Optional[str] = None, check_files: bool = True,
                      verify_hashes: bool = True, dedupe: bool = False) -> dict:
    """Check ``manifest`` (dict, manifest.json path or folder) against ``expected`` and the files on disk.

    ``expected``: name -> trailing shape tuple (None = any size; e.g. an adapter's ``cond_spec()``), or
    name -> {"shape": ..., "dtype": "bfloat16" | torch.dtype, "encoder": class / path / folder name}.
    Names with the ``negative_`` prefix are looked up in the saved negative conditioning.
    ``check_files``: every shard (and the negative file) exists and has a readable safetensors header
    holding the record's tensors; ``verify_hashes``: each file's sha256 equals the manifest's.
    Duplicated prompts are an error unless ``dedupe`` (then later duplicates are dropped, reported in
    the returned manifest's ``_dropped_duplicates``). Returns the (possibly deduplicated) manifest.
    """
    m = _as_manifest(manifest)
    header = m["header"]
    root = Path(m.get("_root", "."))
    problems = []
    if family is not None and header.get("family") != family:
        problems.append(f"family is {header.get('family')!r}, expected {family!r}")
    records = m.get("records") or []
    if not records:
        problems.append("the manifest has no records")
    encoders = header.get("encoders", {})
    info = describe_tensor_info(m)
    for name, spec in _norm_expected(expected or {}).items():
        if name not in info:
            where = "negative conditioning (rerun data_prep with --negative-prompt)" if name.startswith(NEG) else "records"
            problems.append(f"{name} is missing from the {where}; present: {sorted(info)}")
            continue
        src = info[name].get("encoder", "")
        if spec.get("encoder") and not _encoder_matches(str(spec["encoder"]), src, encoders):
            got = [encoders.get(c, {}).get("path") or c for c in src.split("+")]
            problems.append(f"{name} was encoded by {got} ({[encoders.get(c, {}).get('class') for c in src.split('+')]}), "
                            f"expected encoder {spec['encoder']!r}")
        if spec.get("dtype") and info[name]["dtype"] != spec["dtype"]:
            problems.append(f"{name} has dtype {info[name]['dtype']}, expected {spec['dtype']}")
        if spec.get("shape") is not None:
            if name.startswith(NEG) and name in (header.get("negative") or {}).get("tensors", {}):
                shapes = {tuple(info[name]["shape"])}
            else:
                shapes = {tuple(r["tensors"][name]["shape"]) for r in records if name in r["tensors"]}
                if any(name not in r["tensors"] for r in records):
                    problems.append(f"{name} is missing from some records")
            bad = sorted(s for s in shapes if not _shape_ok(s, spec["shape"]))
            if bad:
                problems.append(f"{name} has trailing shape {bad[0]}, expected {spec['shape']} "
                                "(None = any); were the embeddings made for another model or max length?")
    # duplicates
    seen, dups = {}, []
    for i, r in enumerate(records):
        k = (r["prompt"], r.get("image"))
        if k in seen:
            dups.append((seen[k], i, r["prompt"]))
        else:
            seen[k] = i
    if dups and not dedupe:
        ex = "; ".join(f"records {a} and {b}: {p!r}" for a, b, p in dups[:3])
        problems.append(f"{len(dups)} duplicated prompt(s) ({ex}); deduplicate the prompt file or pass dedupe=True")
    if check_files:
        problems += _check_files(m, root, verify_hashes)
    if problems:
        raise ValueError(f"manifest {str(root / MANIFEST_NAME)!r} does not match:\n  - " + "\n  - ".join(problems))
    if dups and dedupe:
        drop = {b for _, b, _ in dups}
        m = dict(m)
        m["records"] = [r for i, r in enumerate(records) if i not in drop]
        m["_dropped_duplicates"] = len(drop)
    return m


def _check_files(m: dict, root: Path, verify_hashes: bool):
    from safetensors import safe_open

    problems = []
    files = [(s["file"], s.get("sha256")) for s in m.get("shards", [])]
    neg = m["header"].get("negative")
    if neg:
        files.append((neg["file"], neg.get("sha256")))
    keys_by_file = {}
    for rel, sha in files:
        p = root / rel
        if not p.is_file():
            problems.append(f"shard file {str(p)!r} is missing; rerun data_prep with the same arguments to recreate it")
            continue
        if verify_hashes and sha and file_sha256(p) != sha:
            problems.append(f"shard file {str(p)!r} is corrupt or truncated (sha256 differs from the manifest); "
                            "rerun data_prep with the same arguments to redo it")
            continue
        try:
            with safe_open(str(p), framework="pt") as f:
                keys_by_file[rel] = set(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            problems.append(f"shard file {str(p)!r} has an unreadable safetensors header ({e}); rerun data_prep")
    shard_files = {s["file"] for s in m.get("shards", [])}
    for i, r in enumerate(m.get("records", [])):
        if r["shard"] not in shard_files:
            problems.append(f"record {i} ({r['prompt']!r}) points to shard {r['shard']!r} not listed in the manifest")
            break
        keys = keys_by_file.get(r["shard"])
        if keys is None:
            continue
        missing = [n for n in r["tensors"] if f"{r['index']}/{n}" not in keys]
        if missing:
            problems.append(f"shard {r['shard']!r} lacks tensors {missing} of record {i} ({r['prompt']!r})")
            break
    return problems
