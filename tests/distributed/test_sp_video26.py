"""2-process CPU (gloo) tests: the 2026 video families (Wan 2.2 A14B with its frozen second expert, TI2V-5B
with per-token timesteps, ...) under sequence parallelism (sp = 2) and FSDP2 equal one process."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import torchrun  # noqa: E402

pytest.importorskip("diffusers")

FAMILIES = ["wan22_a14b", "wan22_5b_i2v", "hunyuan15_t2v"]


def test_video26_adapters_with_sequence_parallelism_match_one_process():
    out = torchrun("w_ulysses_video26.py", *FAMILIES, timeout=300.0).stdout
    for name in FAMILIES:
        assert f"{name} adapter with parallelize(sp=2, FSDP) equals single process" in out, out
