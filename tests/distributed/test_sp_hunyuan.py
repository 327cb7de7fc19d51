"""2-process CPU (gloo) tests: Ulysses sequence parallelism with image tokens sharded and text tokens
replicated (HunyuanVideo, FLUX, FLUX.2 joint attention), or the whole joined sequence sharded (Z-Image), equals
single-rank computation, forward and backward."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import torchrun  # noqa: E402

pytest.importorskip("diffusers")


def test_ulysses_joint_attention_hunyuan_flux_match_single_rank():
    out = torchrun("w_ulysses_hunyuan.py", timeout=300.0).stdout
    assert "joint ulysses attention equals" in out, out
    assert "tiny HunyuanVideo with sp=2 equals single rank" in out, out
    assert "tiny FLUX with sp=2 equals single rank" in out, out
    assert "tiny FLUX.2 (with and without checkpointing) and Z-Image with sp=2 equal single rank" in out, out
    for name in ("hunyuan_t2v", "hunyuan_t2i", "hunyuan_i2v", "flux", "flux2_klein", "z_image"):
        assert f"{name} adapter with parallelize(sp=2, FSDP) equals single process" in out, out


def test_ulysses_with_a_diffusers_attention_backend_matches_single_rank():
    """parallel.attention_backend with sp=2: the attention after the all-to-all runs the chosen backend."""
    out = torchrun("w_ulysses_backend.py", timeout=300.0).stdout
    assert "tiny FLUX with sp=2 and attention_backend=_native_math equals single rank" in out, out
    assert "flux adapter with parallelize(sp=2, FSDP, attention_backend=_native_math) equals single process" in out, out
