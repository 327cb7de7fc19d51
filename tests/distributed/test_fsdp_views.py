"""FSDP2 modules return no view tensors (their pre-backward hook would be lost to an in-place op), for the toy DiT
and every model family, and sharding over 2 gloo ranks leaves the gradients equal to one process's within a derived
rounding bound (workers/w_fsdp_views.py says how it is derived)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _launch import torchrun  # noqa: E402

pytest.importorskip("diffusers")


def test_no_view_outputs_and_two_rank_gradients_equal_one_process():
    from support.tiny_models import FAMILIES

    out = torchrun("w_fsdp_views.py").stdout
    for name in ("toy (patch size 1)",) + tuple(FAMILIES):
        assert f"{name}: gradients equal one process's" in out, out
