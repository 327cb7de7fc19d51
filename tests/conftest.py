"""Test-session settings: one intra-op thread (tiny models run much faster without thread
hand-offs, and CI shares two cores), fixed default seed."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
