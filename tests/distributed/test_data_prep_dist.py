"""Distributed prompt-embedding preprocessing: ``torchrun --nproc_per_node=2`` (gloo, CPU) writes the same
manifest and shards, byte for byte, as one process; a one-process rerun over the 2-process output resumes
it (redoes only a corrupted shard).

The single-process run calls the CLI's ``main`` in this interpreter (WORLD_SIZE unset); the 2-process runs
spawn ``python -m torch.distributed.run --standalone --nproc_per_node=2 data_prep/prep_embeddings.py``
exactly as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from fastvideo_grpo.data import load_manifest, validate_manifest  # noqa: E402
from fastvideo_grpo.data.prep import main as prep_main  # noqa: E402
from support.threads import TEST_THREADS  # noqa: E402
from support.tiny_encoders import build_tiny_components  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle", "two blue squares on the left", "the cat and the dog", "a photo of a star",
           "three green triangles"]


def _env():
    env = dict(os.environ)
    # the workers compute with the test session's thread count: with the same batches (one shard of 2 prompts
    # per encoder call on either side) that makes the 2-process shards bit-identical to the 1-process ones
    env.update(OMP_NUM_THREADS=str(TEST_THREADS), MKL_NUM_THREADS=str(TEST_THREADS), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd):
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.numerics
def test_two_processes_match_one(tmp_path):
    folder = tmp_path / "tiny_sd"
    build_tiny_components("sd", folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    common = ["--model-path", str(folder), "--prompts", str(prompts), "--shard-size", "2", "--batch-size", "2",
              "--dtype", "bfloat16", "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    prep_main(["--family", "sd", "--out", str(one), *common])  # one process, in this interpreter
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "data_prep/prep_embeddings.py", "--family", "sd", "--out", str(two), *common])
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert {"manifest.json", "negative.safetensors", "shards/shard-00002.safetensors"} <= set(a)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    m = validate_manifest(two, {"prompt_embeds": {"shape": (77, 16), "dtype": "bfloat16"},
                                "negative_prompt_embeds": (77, 16)}, family="sd")
    assert [r["prompt"] for r in m["records"]] == PROMPTS

    # resume across world sizes: a shard written by rank 1 is corrupted, one process redoes only that one
    shard1 = two / "shards" / "shard-00001.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:100])
    mtimes = {p: p.stat().st_mtime_ns for p in (two / "shards").glob("*.safetensors") if p != shard1}
    res = prep_main(["--family", "sd", "--out", str(two), *common])
    assert res["written"] == 1 and res["skipped"] == 2
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert _files(two) == a
    assert load_manifest(two)["header"]["num_prompts"] == len(PROMPTS)
