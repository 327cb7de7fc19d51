"""CPU intra-op thread count: one rule for the training runner (every entry point), the benches and
the reward server.

``num_threads > 0`` sets torch's intra-op thread count; ``0`` means torch's default for the process
(``OMP_NUM_THREADS`` when set, else the number of cores) -- the meaning of ``train.num_threads``.

The count is a per-OS-thread setting: OpenMP keeps it per thread, and torch copies its last
``set_num_threads`` value into a new thread only lazily, on that thread's first parallel op. The
number of threads decides how a reduction is split, so float results can differ in the last bits
between thread counts. Code that computes on worker threads (the reward server's handler threads)
therefore applies the count explicitly in each thread, with :func:`thread_count`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def resolve_num_threads(num_threads: int, what: str = "num_threads") -> int:
    """The concrete count ``num_threads`` stands for here: itself when > 0, else the calling
    thread's current torch count (torch's default unless something changed it). ``what`` names
    the setting in the error message."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"{what} must be an integer >= 0 (0 = torch's default), got {num_threads!r}")
    return num_threads or torch.get_num_threads()


def set_num_threads(num_threads: int, what: str = "num_threads") -> int:
    """Apply the rule in the calling thread; returns the count now in effect."""
    n = resolve_num_threads(num_threads, what)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextmanager
def thread_count(num_threads: int):
    """Run the body with ``num_threads`` (resolved as above) in the calling thread, then restore."""
    prev = torch.get_num_threads()
    try:
        yield set_num_threads(num_threads)
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)
