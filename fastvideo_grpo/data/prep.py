"""Offline prompt-embedding preprocessing: prompts -> sharded safetensors + manifest (core of data_prep/).

``python data_prep/prep_embeddings.py --family sd --model-path ... --prompts p.txt --out dir`` runs
``main``; under ``torchrun --nproc_per_node=N`` each rank encodes the shards ``k`` with
``k % N == rank`` (torch.distributed with gloo only when WORLD_SIZE > 1) and rank 0 merges the
per-shard sidecars into ``manifest.json`` after a barrier. Shard boundaries and encoder batches are
fixed by the prompt order and ``--shard-size`` / ``--batch-size`` only, so 1 and N processes write
byte-identical files.

Resume: a shard is skipped when its sidecar exists, was written with the same settings (fingerprint),
lists the same prompts, and the shard file's sha256 matches; otherwise it is (re)encoded. All writes go
through a temporary file and ``os.replace``. No timestamps are written: the same inputs give
byte-identical shards and manifest. See docs/data_prep.md and manifest.py for the layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import __version__
from .encoders import family_names, load_family_encoder
from ..models import encoding_for
from .manifest import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, NEG, NEGATIVE_FILE, atomic_write_bytes, dtype_name,
                       file_sha256, hash_tensors, json_bytes)
from .prompts import PromptRecord, find_duplicates, prompt_file, read_prompts

SHARD_DIR = "shards"
from ..utils.dtypes import parse_dtype  # noqa: E402,F401


def shard_name(k: int) -> str:
    return f"{SHARD_DIR}/shard-{k:05d}.safetensors"


def _sidecar(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"shard-{k:05d}.json"


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


def _safetensors_bytes(tensors: Dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


class PrepJob:
    """One preprocessing run (all ranks construct the same job; each encodes its own shards).

    ``encoder``: a family's ``PromptEncoding`` (models/encoding.py), or anything with its ``family``,
    ``ids``, ``tensor_sources()``, ``settings()`` and ``encode_text()`` (``image_inputs`` /
    ``text_needs_image`` / ``encode()`` for reference images)."""

    def __init__(self, encoder, records: List[PromptRecord], out, *, dtype="float32",
                 shard_size: int = 256, batch_size: int = 16, negative_prompt: Optional[str] = None,
                 source: Optional[dict] = None, progress: bool = True):
        if shard_size < 1 or batch_size < 1:
            raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
        if not records:
            raise ValueError("no prompts to encode")
        self.image_inputs = bool(getattr(encoder, "image_inputs", False))
        if negative_prompt is not None and getattr(encoder, "text_needs_image", False):
            raise ValueError(f"family {encoder.family!r} encodes each prompt together with its reference image, so "
                             "there is no single negative embedding: drop --negative-prompt (its recipe runs "
                             "without CFG)")
        if self.image_inputs and any(r.image is None for r in records):
            raise ValueError(f"family {encoder.family!r} needs a reference image per prompt (an image field)")
        missing = [r.image for r in records if r.image is not None and not Path(r.image).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} reference image(s) do not exist, e.g. {missing[:3]}; fix the "
                                    "paths in the prompt file (relative paths are resolved from its folder)")
        self.enc = encoder
        self.records = records
        self.out = Path(out).expanduser()
        self.dtype = parse_dtype(dtype)
        self.shard_size = int(shard_size)
        self.batch_size = int(batch_size)
        self.negative_prompt = negative_prompt
        self.source = source or {}
        self.progress = progress
        self.num_shards = (len(records) + self.shard_size - 1) // self.shard_size
        self.stats = {"written": 0, "skipped": 0}
        self.header = self._header()
        self.fingerprint = hashlib.sha256(json.dumps(self.header, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ header

    def _header(self) -> dict:
        srcs = self.enc.tensor_sources()
        return {
            "family": self.enc.family,
            "tool": "fastvideo_grpo.data.prep",
            "tool_version": __version__,
            "dtype": dtype_name(self.dtype),
            "settings": self.enc.settings(),
            "encoders": self.enc.ids,
            "tensors": {n: {"encoder": s} for n, s in srcs.items()},
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "num_prompts": len(self.records),
            "negative_prompt": self.negative_prompt,
        }

    # ------------------------------------------------------------------ encoding

    def _encode(self, recs: List[PromptRecord]) -> Dict[str, torch.Tensor]:
        prompts = [r.prompt for r in recs]
        if self.image_inputs:  # text and reference images (encoded together where the text needs them)
            out = self.enc.encode(prompts, [r.image for r in recs])
        else:
            out = self.enc.encode_text(prompts)
        return {k: _cast(v, self.dtype) for k, v in out.items()}

    def shard_records(self, k: int) -> List[PromptRecord]:
        return self.records[k * self.shard_size:(k + 1) * self.shard_size]

    def _shard_is_done(self, k: int) -> bool:
        side = _sidecar(self.out, k)
        if not side.is_file():
            return False
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        recs = self.shard_records(k)
        if meta.get("fingerprint") != self.fingerprint or \
                [(r["prompt"], r.get("image")) for r in meta.get("records", [])] != [r.key() for r in recs]:
            return False
        p = self.out / meta["shard"]["file"]
        return p.is_file() and file_sha256(p) == meta["shard"]["sha256"]

    def _write_shard(self, k: int, bar=None) -> None:
        recs = self.shard_records(k)
        tensors, rec_meta = {}, []
        srcs = self.enc.tensor_sources()
        for b in range(0, len(recs), self.batch_size):
            batch = recs[b:b + self.batch_size]
            enc = self._encode(batch)
            for j, r in enumerate(batch):
                i = b + j
                row = {n: v[j].clone() for n, v in enc.items()}
                for n, t in row.items():
                    tensors[f"{i}/{n}"] = t
                m = {"prompt": r.prompt}
                if r.image is not None:
                    m["image"] = r.image
                m.update(shard=shard_name(k), index=i, sha256=hash_tensors(row),
                         tensors={n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype), "encoder": srcs[n]}
                                  for n, t in row.items()})
                rec_meta.append(m)
            if bar is not None:
                bar.update(len(batch))
        data = _safetensors_bytes(tensors)
        (self.out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out / shard_name(k), data)
        side = {"fingerprint": self.fingerprint,
                "shard": {"file": shard_name(k), "sha256": hashlib.sha256(data).hexdigest(), "num_records": len(recs)},
                "records": rec_meta}
        atomic_write_bytes(_sidecar(self.out, k), json_bytes(side))
        self.stats["written"] += 1

    def write_negative(self) -> None:
        """Rank 0: the negative prompt's embedding (and removes a killed run's temporary negative / manifest)."""
        for final in (self.out / NEGATIVE_FILE, self.out / MANIFEST_NAME):
            for p in final.parent.glob(f".{final.name}.tmp*"):
                p.unlink(missing_ok=True)
        if self.negative_prompt is None:
            return
        enc = {k: _cast(v[0], self.dtype) for k, v in self.enc.encode_text([self.negative_prompt]).items()}
        tensors = {NEG + k: v.clone() for k, v in enc.items()}
        data = _safetensors_bytes(tensors)
        self.out.mkdir(parents=True, exist_ok=True)
        p = self.out / NEGATIVE_FILE
        if not (p.is_file() and file_sha256(p) == hashlib.sha256(data).hexdigest()):
            atomic_write_bytes(p, data)

    def remove_leftovers(self, shards) -> List[Path]:
        """Delete the temporary files (``.<name>.tmp<PID>``, manifest.atomic_write_bytes) a killed run left for
        ``shards``; a shard belongs to one rank, so no other process of this job writes them."""
        gone = []
        for k in shards:
            for final in (self.out / shard_name(k), _sidecar(self.out, k)):
                for p in final.parent.glob(f".{final.name}.tmp*"):
                    p.unlink(missing_ok=True)
                    gone.append(p)
        return gone

    def run_shards(self, rank: int = 0, world_size: int = 1) -> None:
        """Encode this rank's shards (k % world_size == rank), skipping finished ones; a killed run's temporary
        files for them are removed first."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        mine = [k for k in range(self.num_shards) if k % world_size == rank]
        self.remove_leftovers(mine)
        total = sum(len(self.shard_records(k)) for k in mine)
        bar = tqdm(total=total, desc=f"[rank {rank}] {self.enc.family} prompts", unit="prompt",
                   disable=None if self.progress else True, position=rank, leave=rank == 0)
        try:
            for k in mine:
                if self._shard_is_done(k):
                    self.stats["skipped"] += 1
                    bar.update(len(self.shard_records(k)))
                    continue
                self._write_shard(k, bar)
        finally:
            bar.close()

    def merge_manifest(self) -> dict:
        """Rank 0: the sidecars -> manifest.json (raises if a shard is missing)."""
        shards, records = [], []
        for k in range(self.num_shards):
            side = _sidecar(self.out, k)
            if not side.is_file():
                raise FileNotFoundError(f"shard sidecar {str(side)!r} is missing: a rank failed; rerun to resume")
            meta = json.loads(side.read_text(encoding="utf-8"))
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError(f"{side} was written with other settings; rerun to redo it")
            shards.append(meta["shard"])
            records += meta["records"]
        header = dict(self.header)
        header["source"] = self.source
        neg = None
        if self.negative_prompt is not None:
            from safetensors import safe_open

            p = self.out / NEGATIVE_FILE
            srcs = self.enc.tensor_sources()
            with safe_open(str(p), framework="pt") as f:
                tens = {n: f.get_tensor(n) for n in f.keys()}
            neg = {"file": NEGATIVE_FILE, "prompt": self.negative_prompt, "sha256": file_sha256(p),
                   "tensors": {n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                                   "encoder": srcs[n[len(NEG):]]} for n, t in sorted(tens.items())}}
        header["negative"] = neg
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "header": header, "shards": shards,
                    "records": records}
        atomic_write_bytes(self.out / MANIFEST_NAME, json_bytes(manifest))
        return manifest


# ----------------------------------------------------------------------------- CLI


def build_parser(family: Optional[str] = None) -> argparse.ArgumentParser:
    """The CLI; a per-family wrapper (data_prep/prep_<family>.py) passes its ``family``, which is then
    neither asked for nor listed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if family is None:
        p.add_argument("--family", required=True, choices=family_names(),
                       help="the model family (its manifests' name, or a model name that declares one)")
    else:
        p.set_defaults(family=family)
    p.add_argument("--model-path", required=True, help="local diffusers-format model folder (see docs/data_prep.md)")
    p.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl or .csv prompt file, or a prompt-set "
                   "folder holding <split>.txt or <split>_metadata.jsonl (released Flow-GRPO: dataset/pickscore, "
                   "dataset/geneval, dataset/ocr)")
    p.add_argument("--split", default="train", help="with a prompt-set folder: the split to encode (train or test)")
    p.add_argument("--out", "--output-dir", dest="out", required=True,
                   help="output folder (manifest.json, shards/, negative.safetensors); rerunning resumes it")
    p.add_argument("--prompt-field", default="prompt", help="jsonl field / csv column holding the prompt")
    p.add_argument("--image-field", default="image", help="jsonl field / csv column with the reference image (I2V)")
    p.add_argument("--blank-lines", default="skip", choices=["skip", "error"])
    p.add_argument("--duplicates", default="error", choices=["error", "dedupe", "keep"],
                   help="repeated prompts: fail, drop later repeats (reported), or keep them")
    p.add_argument("--shard-size", type=int, default=256, help="prompts per shard")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per encoder forward")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype of floating tensors")
    p.add_argument("--encoder-dtype", default=None, help="dtype the encoders run in (default: float32 on CPU, "
                   "bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt encoded once for CFG (default: '' for CFG families, none otherwise)")
    p.add_argument("--no-negative", action="store_true", help="do not save a negative embedding")
    p.add_argument("--clip-max-length", type=int, default=77)
    p.add_argument("--t5-max-length", type=int, default=None,
                   help="T5/UMT5 max length (default: flux 512, wan 512, sd3 256)")
    p.add_argument("--llama-max-length", type=int, default=256, help="HunyuanVideo text length after the crop")
    p.add_argument("--qwen-max-length", type=int, default=None,
                   help="Qwen-Image(-Edit) text length after the template crop (default: qwen_image 512, the pipeline's "
                        "max_sequence_length; qwen_image_edit 2048, the reference image's vision tokens + the "
                        "instruction, never truncated)")
    p.add_argument("--crop-start", default="default",
                   help="template tokens to crop (HunyuanVideo, Qwen-Image, -Edit): 'default' (diffusers' 95 / 34 / 64), "
                        "'auto' or an int")
    p.add_argument("--height", type=int, default=None, help="I2V: target image height; qwen_image_edit: the "
                   "reference image's height (default 1024)")
    p.add_argument("--width", type=int, default=None, help="I2V: target image width; qwen_image_edit: the "
                   "reference image's width (default 1024)")
    p.add_argument("--num-frames", type=int, default=None, help="wan_i2v: video frames (4k + 1)")
    p.add_argument("--no-image-embeds", action="store_true", help="wan_i2v: skip the CLIP image embeddings")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="encode every shard again (removes the folder's manifest, shards and negative embedding first)")
    p.add_argument("--check", action="store_true",
                   help="only read the prompts and check the model folder (no encoder is loaded), then exit")
    return p


def check_job(args, encoding, records) -> str:
    """``--check``: the model folder holds what the family encodes with; a line saying what would be written."""
    from .encoders import encoder_subfolders

    root = Path(args.model_path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--model-path {args.model_path!r} is not a folder (a local diffusers-format model "
                                "folder, see docs/data_prep.md)")
    missing = [s for s in encoder_subfolders(encoding) if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"--model-path {args.model_path!r} lacks {missing} (family {args.family!r} encodes "
                                "with them)")
    out = Path(args.out).expanduser()
    state = "exists: rerunning resumes it" if (out / MANIFEST_NAME).is_file() or (out / SHARD_DIR).is_dir() else "new"
    return (f"prompts and model folder OK: {len(records)} prompt(s) of {args.prompts} -> {out} ({state}), "
            f"{(len(records) + args.shard_size - 1) // args.shard_size} shard(s)")


def _clear_outputs(out: Path) -> None:
    """What ``--overwrite`` removes: this tool's files in ``out``, nothing else."""
    import shutil

    shutil.rmtree(out / SHARD_DIR, ignore_errors=True)
    for name in (MANIFEST_NAME, NEGATIVE_FILE):
        (out / name).unlink(missing_ok=True)


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def main(argv=None, family: Optional[str] = None) -> dict:
    """CLI entry point; returns {"manifest": path or None (ranks > 0), "written": n, "skipped": n}."""
    args = build_parser(family).parse_args(argv)
    rank, world, local = _dist_info()
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        if args.device:
            device = torch.device(args.device)
        else:
            device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        enc_dtype = parse_dtype(args.encoder_dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        encoding = encoding_for(args.family)
        image_field = args.image_field if encoding.vae_class is not None else None
        args.prompts = str(prompt_file(args.prompts, args.split))
        records = read_prompts(args.prompts, field=args.prompt_field, image_field=image_field,
                               blank_lines=args.blank_lines)
        dups = find_duplicates(records)
        if dups and args.duplicates == "error":
            ex = "; ".join(f"entries {a + 1} and {b + 1}: {r.prompt!r}" for a, b, r in dups[:3])
            raise ValueError(f"{args.prompts}: {len(dups)} duplicated prompt(s) ({ex}); remove them or pass "
                             "--duplicates dedupe (drop repeats) / keep")
        if dups and args.duplicates == "dedupe":
            drop = {b for _, b, _ in dups}
            records = [r for i, r in enumerate(records) if i not in drop]
            if rank == 0:
                print(f"dropped {len(drop)} duplicated prompt(s)", file=sys.stderr)
        negative = None
        if not args.no_negative:
            negative = args.negative_prompt if args.negative_prompt is not None else (
                "" if encoding.cfg_by_default else None)
        if args.check:
            if rank == 0:
                print(check_job(args, encoding, records), flush=True)
            return {"checked": True}
        if args.overwrite and rank == 0:
            _clear_outputs(Path(args.out).expanduser())
        if dist is not None:
            dist.barrier()
        torch.manual_seed(0)
        encoder = load_family_encoder(
            args.family, args.model_path, dtype=enc_dtype, device=device, image_embeds=not args.no_image_embeds,
            clip_max_length=args.clip_max_length, t5_max_length=args.t5_max_length,
            llama_max_length=args.llama_max_length, qwen_max_length=args.qwen_max_length,
            crop_start=args.crop_start, height=args.height,
            width=args.width, num_frames=args.num_frames)
        src = Path(args.prompts).expanduser()
        job = PrepJob(encoder, records, args.out, dtype=args.dtype, shard_size=args.shard_size,
                      batch_size=args.batch_size, negative_prompt=negative,
                      source={"file": src.name, "sha256": file_sha256(src), "prompt_field": args.prompt_field},
                      progress=not args.no_progress)
        if rank == 0:
            job.write_negative()
        job.run_shards(rank, world)
        if dist is not None:
            dist.barrier()
        path = None
        if rank == 0:
            job.merge_manifest()
            path = str(job.out / MANIFEST_NAME)
            print(f"wrote {path}: {len(records)} prompts in {job.num_shards} shard(s) "
                  f"({job.stats['written']} encoded, {job.stats['skipped']} already done on rank 0)", file=sys.stderr)
        if dist is not None:
            dist.barrier()
        return {"manifest": path, **job.stats}
    finally:
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()
