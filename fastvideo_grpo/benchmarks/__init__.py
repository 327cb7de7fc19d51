"""Benchmark suites for ``python -m fastvideo_grpo.cli.evaluate --suite NAME`` (docs/benchmarks.md); importing this
package registers them all in ``SUITES``. One module per suite; base.py (what a suite is), sampling.py (the
data-parallel sampling and scoring), tables.py (the papers' tables) and cli.py (the command) are shared."""

from .base import SUITES, Item, Metric, Suite  # noqa: F401
from . import drawbench, geneval, hpdv2, t2i_compbench, toy, vbench, videoalign  # noqa: F401
