"""Graceful stop: SIGTERM / SIGINT, a stop file or a time budget end the run at an iteration's end, saved.

What a cluster does to a job (SLURM: SIGTERM, then SIGKILL after ``KillWait`` / the preemption
``GraceTime``; Kubernetes: SIGTERM, then SIGKILL after ``terminationGracePeriodSeconds``; a user: Ctrl-C)
becomes a request, never a kill mid-write:

* ``StopSignals`` (a context around ``loop.fit``, main thread only): the first SIGTERM or SIGINT is
  recorded (name, time) and said in one line on stderr; later ones are noted and ignored (SLURM sends
  SIGTERM twice on preemption, and torchrun forwards the terminal's Ctrl-C to workers that got it
  already), so a second signal cannot cut the checkpoint save short. Outside the loop (start-up) the
  previous handlers apply: nothing trained is lost by stopping there.
* ``GracefulStop`` (a loop component, before the checkpointer): at the end of every iteration each rank
  states its reason to stop (a signal, ``train.stop_file`` present, or ``train.max_wall_time`` about to be
  passed), the reasons are all-reduced (one small collective), and when any rank has one every rank
  stops after that same iteration: the checkpointer saves it collectively (the usual barriers), the loop
  ends, the main rank writes ``stopped.json`` and the line "stopped by SIGTERM at iteration N; checkpoint
  saved ...; rerun the same command to resume", and the process exits with ``train.stop_exit_code`` (0).

The unit is the iteration: the current one is finished, never cut. A checkpoint holds the state between
iterations (weights, optimiser, the random streams, the prompt position); part of an iteration (its
rollouts, the optimiser steps done) cannot be saved and resumed bit for bit, so stopping mid-iteration
would only throw that work away. Where an iteration is longer than the grace period, give the job
more (``torchrun --shutdown-timeout``, SLURM ``--signal=TERM@<s>`` before the time limit) or set
``train.max_wall_time``. A stop requested at the last iteration leaves the end of the run (final
evaluation, export, reports) to the rerun, which does it.

The same command resumes: a folder holding ``stopped.json`` is resumed from its newest checkpoint by a run
without ``--resume`` (even with ``--overwrite`` / ``train.overwrite``; delete the file to start over), and the
file is removed once the run has finished its end. It is also written when the last iteration is done and the
end begins, so that a run killed, crashed or out of disk during its final evaluation or export is finished by
the same command (loop.py: a rerun finishes what the run promised). ``train.max_wall_time`` counts from the
start of ``runner.run``: the run stops after the iteration where the time so far, plus the longest iteration
so far (evaluations and saves included), plus the longest checkpoint save so far (before the first save: one
more such iteration) would pass it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .loop import Component, TrainingStopped

STOP_RECORD = "stopped.json"
SIGNALS = ("SIGTERM", "SIGINT")
#: the reasons a rank can have to stop, by priority (the all-reduce keeps the highest of every rank's)
REASONS = (None, "train.max_wall_time", "train.stop_file", "SIGINT", "SIGTERM")


class RunStopped(TrainingStopped):
    """The run stopped on request (a signal, the stop file, the time budget) after saving; ``exit_code`` is
    ``train.stop_exit_code`` (0 by default). The main rank has printed ``str(self)`` already."""


_ACTIVE: Optional["StopSignals"] = None


def active() -> Optional["StopSignals"]:
    """The ``StopSignals`` handling signals now, if any (tests wait on its ``signal_name``)."""
    return _ACTIVE


def _say(text: str) -> None:
    """One line on stderr from a signal handler: one unbuffered write (``print`` could re-enter the buffer
    that the interrupted code was writing to)."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class StopSignals:
    """Records the first SIGTERM / SIGINT while active (``with StopSignals(rank):``); see the module docstring.
    A no-op outside the main thread, where Python cannot install signal handlers."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.signal_name: Optional[str] = None
        self.received_at: Optional[float] = None
        self.repeats = 0
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                num = getattr(signal, name)
                self._previous[num] = signal.signal(num, self._handle)
            _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        who = f"[rank {self.rank}] " if dist.is_available() and dist.is_initialized() else ""
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.monotonic()
            _say(f"{who}{name} received: finishing this iteration, then saving a checkpoint and stopping (further "
                 "SIGTERM / SIGINT are ignored; SIGKILL stops at once, keeping the last checkpoint)")
        else:
            self.repeats += 1
            if self.repeats == 1:
                _say(f"{who}{name} received again: ignored, the run already stops after this iteration's checkpoint")


def wall_time_exceeded(elapsed: float, periods: Sequence[float], saves: Sequence[float], budget: float) -> bool:
    """Whether one more iteration and a checkpoint save may end past ``budget`` seconds: ``elapsed`` so far, plus
    the longest iteration so far (``periods``: from one iteration's end to the next, evaluations and saves
    included), plus the longest save so far (none yet: one more longest iteration). Pure."""
    if budget <= 0 or not periods:
        return False
    step = max(periods)
    save = max(saves) if saves else step
    return elapsed + step + save > budget


def _gather_codes(code: int) -> List[int]:
    """Every rank's reason code, in rank order (collective; ``[code]`` in one process). One small all-reduce: each
    rank fills its own slot of a zero vector."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [code]
    t = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    t[dist.get_rank()] = code
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _ranks_text(codes: Sequence[int], code: int) -> str:
    ranks = [r for r, c in enumerate(codes) if c == code]
    if len(codes) == 1 or len(ranks) == len(codes):
        return ""
    return f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"


class GracefulStop(Component):
    """Turns a stop request into a stop after this iteration, on every rank alike (see the module docstring).

    ``stop_file``: a path (None: off); ``max_wall_time``: seconds from ``started`` (0: off); ``save_seconds()``:
    the durations of the checkpoint saves so far (the checkpointer's); ``clock``: ``time.monotonic``."""

    def __init__(self, signals: StopSignals, *, stop_file: Optional[Path] = None, max_wall_time: float = 0.0,
                 started: Optional[float] = None, save_seconds: Callable[[], Sequence[float]] = lambda: (),
                 exit_code: int = 0, clock: Callable[[], float] = time.monotonic):
        self.signals, self.stop_file, self.budget = signals, stop_file, float(max_wall_time)
        self.clock, self.save_seconds, self.exit_code = clock, save_seconds, int(exit_code)
        self.started = clock() if started is None else started
        self.periods: List[float] = []
        self._last = clock()
        self.request: Optional[Dict] = None  # what stopped the run: reason, ranks, iteration, message

    def _local_reason(self, now: float) -> Optional[str]:
        if self.signals.signal_name is not None:
            return self.signals.signal_name
        if self.stop_file is not None and self.stop_file.exists():
            return "train.stop_file"
        if wall_time_exceeded(now - self.started, self.periods, list(self.save_seconds()), self.budget):
            return "train.max_wall_time"
        return None

    def on_iteration(self, state, it, metrics):
        now = self.clock()
        self.periods.append(now - self._last)
        codes = _gather_codes(REASONS.index(self._local_reason(now)))  # collective: every rank, every iteration
        self._last = self.clock()
        code = max(codes)
        if code == 0 and it >= state.total and state.is_main:
            # the end (final evaluation, export, reports) starts: until it is done (then the record goes), a kill,
            # a crash or a full disk leave a folder that the same command resumes to finish it
            write_stop_record(state.out, {"reason": "end", "iteration": it,
                                          "stopped": "before finishing its end (final evaluation, export, reports)"})
        if code == 0 or self.request is not None:
            return
        reason = REASONS[code]
        what = {"SIGTERM": "SIGTERM", "SIGINT": "SIGINT (Ctrl-C)",
                "train.stop_file": f"the stop file {self.stop_file} (train.stop_file)",
                "train.max_wall_time": f"train.max_wall_time ({self.budget:g} s: one more iteration and a save "
                                       f"would pass it)"}[reason]
        self.request = {"reason": reason, "ranks": [r for r, c in enumerate(codes) if c == code], "iteration": it,
                        "what": what + _ranks_text(codes, code), "exit_code": self.exit_code}
        if state.stop_requested is None:
            state.stop_requested = f"stopped by {self.request['what']} at iteration {it}"
        if it >= state.total:
            state.defer_end = True  # the final evaluation / export may not fit in the grace period: the rerun does them

    def summary(self):
        return {"stop_request": self.request}


# ----------------------------------------------------------------------------- the run folder's record


def read_stop_record(out) -> Optional[Dict]:
    """The record a graceful stop left in ``out`` (None when there is none or it cannot be read)."""
    path = Path(out) / STOP_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resume_after_stop(resume: Optional[str], out, is_main: bool) -> Optional[str]:
    """``train.resume`` as the run should use it: a run without one, in a folder a graceful stop left, resumes from
    that folder's newest checkpoint ("latest"), the same command resuming what it started."""
    if resume not in (None, ""):
        return resume
    record = read_stop_record(out)
    if record is None:
        return resume
    if is_main:
        print(f"resuming the run stopped {record.get('stopped', 'on request')} ({Path(out) / STOP_RECORD}; delete "
              "that file to start over instead)", flush=True)
    return "latest"


def write_stop_record(out, record: Dict) -> None:
    """``stopped.json`` (main rank): the folder holds an unfinished run that the same command resumes."""
    from ..utils.io import atomic_write_json

    atomic_write_json(Path(out) / STOP_RECORD, {**record, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def finish(request: Optional[Dict], summary: Dict, out, *, is_main: bool, total: int,
           stop_file: Optional[Path] = None) -> Optional[str]:
    """After the loop: a stopped run gets ``stopped.json`` (and its stop file removed) on the main rank, which says
    the line; returns the line on every rank. A run that finished its end loses the record. None when not stopped."""
    out = Path(out)
    if request is None:
        if is_main and summary.get("iteration", 0) >= total:  # the end ran (a stop would have deferred it)
            (out / STOP_RECORD).unlink(missing_ok=True)
        return None
    it = request["iteration"]
    end = " (before the final evaluation and export, which the rerun does)" if it >= total else ""
    line = (f"stopped by {request['what']} at iteration {it} of {total}{end}; checkpoint saved "
            f"({summary.get('last_checkpoint')}); rerun the same command to resume")
    if is_main:
        write_stop_record(out, {**{k: v for k, v in request.items() if k != "what"},
                                "stopped": f"by {request['what']} at iteration {it}",
                                "checkpoint": summary.get("last_checkpoint")})
        if request["reason"] == "train.stop_file" and stop_file is not None:
            stop_file.unlink(missing_ok=True)  # else the rerun would stop again after one iteration
        print(line, flush=True)
    return line
