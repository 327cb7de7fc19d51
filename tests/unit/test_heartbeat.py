"""The stall watch's rule on a shared in-process store and a hand-driven clock (distributed/heartbeat.py): a rank
that stops answering, or that stays behind the others, is named with its phase and iteration once its tolerance
is exceeded, and not before; a rank that finished, or one saving or exporting alone, is not."""

from __future__ import annotations

import torch.distributed as dist

from fastvideo_grpo.distributed.heartbeat import EXIT_STALLED, Heartbeat, is_collective_failure


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _ranks(n=2, init=60.0, train=10.0):
    store, clock, exits = dist.HashStore(), Clock(), []
    hbs = [Heartbeat(store, r, n, init_timeout_s=init, train_timeout_s=train, clock=clock, exit=exits.append)
           for r in range(n)]
    for hb in hbs:
        hb.publish()
    return hbs, clock, exits


def test_a_rank_that_stops_answering_is_named_after_its_tolerance():
    (a, b), clock, exits = _ranks()
    for hb in (a, b):
        hb.mark("rollout", 1)
        hb.first_iteration_done()  # both: the train timeout (10 s) from now on
    a.poll()
    b.mark("reward", 2)  # rank 1 reaches the reward of iteration 2, then stops (SIGSTOP): no more publishing
    a.mark("update", 2)
    a.poll()  # rank 0's watch reads it (every few seconds; the silence is counted from when it saw the last change)
    clock.t = 9.0
    assert a.poll() == {}  # 9 s < 10 s: not yet
    clock.t = 11.0
    stalls = a.poll()
    assert list(stalls) == [1]
    assert "rank 1 (" in stalls[1] and "phase 'reward' of iteration 2" in stalls[1] and "not answered for 11 s" in \
        stalls[1]
    a.on_stall(stalls)  # rank 0 (not stalled) reports and exits with the documented status
    assert exits == [EXIT_STALLED] and a.stalled.startswith("stalled rank 1: rank 1 (")
    assert "rank 0 was in phase 'update' of iteration 2" in a.stalled and "parallel.train_timeout_s = 10 s" in a.stalled


def test_a_rank_that_answers_but_stays_behind_is_named_and_one_working_ahead_is_not():
    (a, b, c), clock, _ = _ranks(3)
    for hb in (a, b, c):
        hb.first_iteration_done()
        hb.mark("rollout", 4)
    a.poll()
    c.mark("reward", 4)  # rank 2 hangs inside its reward (a server that never answers) but keeps ticking
    for t in range(1, 13):
        clock.t = float(t)
        a.mark("update", 4)
        b.mark("update", 4)
        c.publish()  # its watching thread still publishes
        stalls = a.poll()
        if t <= 10:
            assert stalls == {}, (t, stalls)
    assert list(stalls) == [2] and "phase 'reward' of iteration 4 11 s ago and is still there" in stalls[2]


def test_saving_alone_for_long_and_finishing_early_are_not_stalls():
    (a, b), clock, _ = _ranks(init=100.0, train=10.0)
    for hb in (a, b):
        hb.first_iteration_done()
    a.poll()
    with b.relaxed():  # rank 1 writes the export alone; its interpreter may not tick for a while
        b.mark("export", 5)
        a.mark("export", 5)
        a.poll()
        clock.t = 50.0
        assert a.poll() == {}  # 50 s of silence < the start-up tolerance (100 s) of a save / export
        clock.t = 120.0
        assert list(a.poll()) == [1]
    b.mark("end", 5)  # done: its watching thread stops, it is silent for good
    clock.t = 1000.0
    assert a.poll() == {}


def test_the_first_iteration_has_the_start_up_tolerance():
    (a, b), clock, _ = _ranks(init=60.0, train=10.0)
    a.poll()
    clock.t = 30.0
    assert a.poll() == {}  # rank 1 silent for 30 s while loading its model: fine until 60 s
    clock.t = 61.0
    assert list(a.poll()) == [1]


def test_a_failed_collective_is_described_by_the_heartbeats():
    (a, b), clock, _ = _ranks()
    a.poll()
    clock.t = 3.0
    a.mark("update", 1)
    line = a.describe_failure(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore"))
    assert line.startswith("stalled rank 1: rank 1 (") and "heard from longest ago, 3 s" in line, line
    assert "(a collective failed: Connection closed by peer" in line, line
    assert "\n" not in line
    assert is_collective_failure(RuntimeError("Timed out waiting 15000ms for recv operation to complete"))
    assert is_collective_failure(dist.DistBackendError("x"))
    assert not is_collective_failure(ValueError("grpo.tau must be ..."))
