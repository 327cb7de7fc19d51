"""The intra-op thread count of the test session and of the worker processes tests start: 1, or
``FVG_TEST_THREADS`` when set (the 2-thread setting of ``make test-mathpaths``,
docs/reproducibility.md)."""

from __future__ import annotations

import os

TEST_THREADS = int(os.environ.get("FVG_TEST_THREADS", "1"))
if TEST_THREADS < 1:
    raise ValueError(f"FVG_TEST_THREADS must be an integer >= 1, got {TEST_THREADS}")
