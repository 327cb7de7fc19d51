"""The stall watch of a multi-process run: every rank says where it is, every rank watches the others, and a
rank that stops answering or falls behind is named within ``parallel.train_timeout_s``.

Each rank publishes, in the process group's key-value store (torchrun's rendezvous store: reachable from every
node, and alive while a worker is stopped), its iteration, its phase (``PHASES``: start, rollout, reward,
update, eval, samples, save, log, export, end), a counter and how long it may stay silent (its *tolerance*:
``parallel.init_timeout_s`` until its first iteration is done and during checkpoint saves and the export, when
one rank may write for long while the others wait; ``parallel.train_timeout_s`` otherwise). The main thread
publishes at each phase change (``mark``); a daemon thread publishes every few seconds and reads every rank's
entry. A rank is *stalled* when

* its counter has not moved for longer than its tolerance (the process is stopped, dead, or holds the
  interpreter lock), or
* it is behind another rank still training (an earlier iteration, or an earlier step of the same iteration:
  rollout < reward < update < the rest) and has not moved for longer than its tolerance (it is stuck: a reward
  server that never answers, a hung filesystem).

Then the lowest-numbered rank that is not stalled prints one line naming the stalled ranks (host, pid, phase,
iteration, for how long) and every watching rank exits with status ``EXIT_STALLED`` (6) at once, without
waiting for the collective it may be blocked in. A collective that fails first (the same timeout, or a peer
that died) is described the same way by ``Heartbeat.describe_failure``. torchrun then ends the job; the same
command with ``--resume latest`` continues from the last checkpoint.

With one process there is nothing to watch: ``start_heartbeat`` returns None and ``mark`` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

#: the exit status of a rank that saw another stall (documented in docs/reliability.md)
EXIT_STALLED = 6
PHASES = ("start", "rollout", "reward", "update", "eval", "samples", "save", "log", "export", "end")
#: order inside an iteration: the trainer's steps, then the loop's components (which run in one order on every
#: rank, but whose names need not be compared); "start" before everything, "end" after
_ORDER = {"start": 0, "rollout": 1, "reward": 2, "update": 3, "end": 5}
_KEY = "fvg_heartbeat/"

_ACTIVE: Optional["Heartbeat"] = None


@dataclass
class Seen:
    """What this rank knows of another: its last entry and when (on this rank's clock) it last changed."""

    entry: Dict
    ticked_at: float  # when its counter last moved
    moved_at: float  # when its (iteration, phase) last changed


def _progress(entry: Dict):
    return int(entry.get("it", 0)), _ORDER.get(entry.get("phase"), 4)


class Heartbeat:
    """One rank's side of the stall watch (see the module docstring). ``store``: any torch.distributed Store
    shared by the ranks; ``clock``: seconds (monotonic); ``exit``: what ends the process on a stall."""

    def __init__(self, store, rank: int, world_size: int, *, init_timeout_s: float, train_timeout_s: float,
                 interval_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 exit: Callable[[int], None] = os._exit, resume_hint: Callable[[], str] = lambda: ""):
        self.store, self.rank, self.world_size = store, int(rank), int(world_size)
        self.init_timeout_s, self.train_timeout_s = float(init_timeout_s), float(train_timeout_s)
        self.interval_s = interval_s or max(0.5, min(5.0, self.train_timeout_s / 5))
        self.clock, self._exit, self.resume_hint = clock, exit, resume_hint
        self.tolerance = self.init_timeout_s  # until the first iteration is done
        self._relaxed = 0
        self._entry = {"it": 0, "phase": "start", "seq": 0, "host": socket.gethostname(), "pid": os.getpid(),
                       "tolerance": self.tolerance}
        self._lock = threading.Lock()
        self._seen: Dict[int, Seen] = {}
        self._present: set = set()  # store keys known to exist
        self._started_at = clock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.stalled: Optional[str] = None  # the report, once a stall was seen
        self.before_exit: List[Callable[[], None]] = []  # run before a stall ends the process (e.g. a lock release)

    # ------------------------------------------------------------------ this rank

    def publish(self) -> None:
        with self._lock:  # held over the set: the main thread's and the watcher's entries land in order
            self._entry["seq"] += 1
            self._entry["tolerance"] = self.init_timeout_s if self._relaxed else self.tolerance
            self.store.set(f"{_KEY}{self.rank}", json.dumps(self._entry))

    def mark(self, phase: str, iteration: int) -> None:
        """This rank enters ``phase`` of ``iteration`` (published at once)."""
        assert phase in PHASES, phase
        with self._lock:
            self._entry.update(phase=phase, it=int(iteration))
        self.publish()

    def first_iteration_done(self) -> None:
        """From now on the tighter timeout: for this rank's silence and for its collectives."""
        if self.tolerance != self.train_timeout_s:
            self.tolerance = self.train_timeout_s
            _set_collective_timeout(self.train_timeout_s)
            self.publish()

    @contextlib.contextmanager
    def relaxed(self):
        """A phase where one rank may work alone for long (checkpoint save, export): the start-up timeout for
        collectives and for this rank's silence, inside the block."""
        self._relaxed += 1
        _set_collective_timeout(self.init_timeout_s)
        self.publish()
        try:
            yield
        finally:
            self._relaxed -= 1
            if not self._relaxed:
                _set_collective_timeout(self.tolerance)
                self.publish()

    # ------------------------------------------------------------------ the others

    def _read(self) -> Dict[int, Dict]:
        """Every published entry: one ``multi_get`` once all ranks have published (``check`` only for those
        not seen yet: a get of a missing key would block)."""
        keys = [f"{_KEY}{r}" for r in range(self.world_size)]
        for k in keys:
            if k not in self._present and self.store.check([k]):
                self._present.add(k)
        present = [k for k in keys if k in self._present]
        values = self.store.multi_get(present) if present else []
        return {int(k[len(_KEY):]): json.loads(bytes(v).decode()) for k, v in zip(present, values)}

    def observe(self, entries: Dict[int, Dict]) -> None:
        now = self.clock()
        for r, e in entries.items():
            old = self._seen.get(r)
            if old is None:
                self._seen[r] = Seen(e, now, now)
                continue
            if e.get("seq") != old.entry.get("seq"):
                old.ticked_at = now
            if (e.get("it"), e.get("phase")) != (old.entry.get("it"), old.entry.get("phase")):
                old.moved_at = now
            old.entry = e

    def find_stalls(self) -> Dict[int, str]:
        """Rank -> why it is stalled, from what was observed so far (no store access)."""
        now, out = self.clock(), {}
        training = [s.entry for s in self._seen.values() if s.entry.get("phase") != "end"]
        lead = max((_progress(e) for e in training), default=None)
        for r in range(self.world_size):
            s = self._seen.get(r)
            if s is None:  # never published: stuck before its first mark, or dead
                if now - self._started_at > self.init_timeout_s:
                    out[r] = f"rank {r} never reported (no heartbeat for {now - self._started_at:.0f} s since start-up)"
                continue
            e, tol = s.entry, float(s.entry.get("tolerance", self.tolerance))
            if e.get("phase") == "end":
                continue
            where = (f"rank {r} ({e.get('host')}, pid {e.get('pid')}) was last seen in phase '{e.get('phase')}' of "
                     f"iteration {e.get('it')}")
            if now - s.ticked_at > tol:
                out[r] = f"{where}, {now - s.moved_at:.0f} s ago, and has not answered for {now - s.ticked_at:.0f} s"
            elif _progress(e) < lead and now - s.moved_at > tol:
                out[r] = f"{where} {now - s.moved_at:.0f} s ago and is still there while other ranks went on"
        return out

    def poll(self) -> Dict[int, str]:
        """Publish, read every rank, and return the stalled ranks (see ``find_stalls``)."""
        self.publish()
        self.observe(self._read())
        return self.find_stalls()

    def report(self, stalls: Dict[int, str]) -> str:
        """The one line naming ``stalls`` (``find_stalls``'s result)."""
        return self._report(stalls, f"no progress within its timeout ({self._timeout_words()})")

    def _timeout_words(self) -> str:
        return (f"parallel.train_timeout_s = {self.train_timeout_s:g} s; parallel.init_timeout_s = "
                f"{self.init_timeout_s:g} s at start-up, in the first iteration, saves and the export")

    def _report(self, stalls: Dict[int, str], why: str) -> str:
        me = self._entry
        hint = self.resume_hint()
        return (f"stalled rank{'s' if len(stalls) > 1 else ''} {', '.join(map(str, sorted(stalls)))}: "
                f"{'; '.join(stalls[r] for r in sorted(stalls))} ({why}; rank {self.rank} was in phase "
                f"'{me['phase']}' of iteration {me['it']}). Exiting with status {EXIT_STALLED}"
                + (f"; {hint}" if hint else ""))

    def describe_failure(self, error: BaseException) -> str:
        """One line for a collective that failed (timed out, or a peer went away): which rank the heartbeats
        point at (a stalled one, else the one heard from longest ago)."""
        with contextlib.suppress(Exception):
            self.observe(self._read())
        stalls = self.find_stalls()
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
        cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)[:200]  # gloo's "[.../unbound_buffer.cc:129] " prefix
        if not stalls and self._seen:
            now = self.clock()
            r, s = max(((r, s) for r, s in self._seen.items() if r != self.rank and s.entry.get("phase") != "end"),
                       key=lambda rs: now - rs[1].ticked_at, default=(None, None))
            if r is not None:
                e = s.entry
                stalls = {r: f"rank {r} ({e.get('host')}, pid {e.get('pid')}) was heard from longest ago, "
                             f"{now - s.ticked_at:.0f} s, in phase '{e.get('phase')}' of iteration {e.get('it')}, "
                             "stopped or died (see its log)"}
        if not stalls:
            return f"a collective failed ({cause}); exiting with status {EXIT_STALLED}"
        return self._report(stalls, f"a collective failed: {cause}")

    # ------------------------------------------------------------------ the watching thread

    def start(self) -> "Heartbeat":
        global _ACTIVE
        self.publish()
        self._thread = threading.Thread(target=self._watch, name="fvg-heartbeat", daemon=True)
        self._thread.start()
        _ACTIVE = self
        return self

    def stop(self) -> None:
        global _ACTIVE
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s * 4)
        if _ACTIVE is self:
            _ACTIVE = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                stalls = self.poll()
            except Exception:  # the store is unreachable (its host is gone): the collectives will say so
                continue
            if stalls and not self._stop.is_set():
                self.on_stall(stalls)
                return

    def on_stall(self, stalls: Dict[int, str]) -> None:
        """Print the report (on the lowest-numbered rank not stalled) and end this process at once: its main
        thread may be blocked in a collective that only the stalled rank could complete."""
        self.stalled = self.report(stalls)
        if self.rank == min((r for r in range(self.world_size) if r not in stalls), default=self.rank):
            print(f"error: {self.stalled}", file=sys.stderr, flush=True)
        for hook in self.before_exit:
            with contextlib.suppress(Exception):
                hook()
        sys.stdout.flush()
        self._exit(EXIT_STALLED)


def _set_collective_timeout(seconds: float) -> None:
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _set_pg_timeout

        with contextlib.suppress(Exception):  # a backend without settable timeouts keeps its own
            _set_pg_timeout(timedelta(seconds=seconds))


def start_heartbeat(rank: int, world_size: int, *, init_timeout_s: float, train_timeout_s: float,
                    resume_hint: Callable[[], str] = lambda: "") -> Optional[Heartbeat]:
    """The heartbeat of this rank over the default process group's store (None in one process)."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    with contextlib.suppress(Exception):
        store = store.clone()  # a connection of its own for the watching thread
    return Heartbeat(store, rank, world_size, init_timeout_s=init_timeout_s, train_timeout_s=train_timeout_s,
                     resume_hint=resume_hint).start()


def active() -> Optional[Heartbeat]:
    return _ACTIVE


def mark(phase: str, iteration: int) -> None:
    """This process enters ``phase`` of ``iteration`` (nothing without a running heartbeat)."""
    if _ACTIVE is not None:
        _ACTIVE.mark(phase, iteration)


@contextlib.contextmanager
def phase(name: str, iteration: int, *, long: bool = False):
    """``mark(name, iteration)``; ``long``: one rank may work alone for long in it (``Heartbeat.relaxed``)."""
    hb = _ACTIVE
    if hb is None:
        yield
        return
    hb.mark(name, iteration)
    with hb.relaxed() if long else contextlib.nullcontext():
        yield


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) is a failed collective: a timeout or a peer gone (gloo / NCCL / store)."""
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
                s in text for s in ("Timed out waiting", "Connection closed by peer", "Connection reset by peer",
                                    "Broken pipe", "collective operation timeout", "NCCL communicator was aborted"))):
            return True
        e = e.__cause__ or e.__context__
    return False
