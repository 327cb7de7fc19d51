"""Test-session settings: one intra-op thread (tiny models run much faster without thread
hand-offs, and CI shares two cores), fixed default seed, and the ``tiny``
fixture (tiny real-model runs from tests/support/tiny_runs.py; tests/ is on sys.path, so test modules
import ``support.*``).

``FVG_TEST_THREADS=N`` runs the session (and the worker processes the tests start) with N intra-op
threads instead of 1: one of the alternative math settings of ``make test-mathpaths``
(docs/reproducibility.md), which shows whether an assertion silently relies on a thread count.
"""

import pytest
import torch

from support.threads import TEST_THREADS


@pytest.fixture(autouse=True, scope="session")
def _test_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """family -> (model folder, model kwargs, manifest path) of a tiny real-model run, built once per
    session (tests/support/tiny_runs.py)."""
    from support.tiny_runs import build_tiny_run

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build_tiny_run(tmp_path_factory.mktemp(f"tiny_{name}"), name)
        return cache[name]

    return get
