"""The one training loop, ``fit``: every entry point (the train scripts, the toy demo, the distributed
toy script) runs its GRPO iterations through it (runner.py assembles what it runs on).

``fit`` calls ``trainer.train_iteration()`` until ``total`` iterations, averages the metrics over ranks,
and hands them to its components, each of which decides its own timing from the iteration number:

* ``EMAUpdate``: the trainer's weight EMA (``train.ema_decay``, ema.py) after every iteration;
* ``NaNGuard``: a non-finite loss, gradient or reward stops the run (``TrainingStopped``, exit status 3)
  before anything is saved for that iteration, naming the last good checkpoint;
* ``Evaluator``: held-out ODE evaluation before training (fresh runs), every ``train.eval_every``
  iterations and after the last;
* ``SampleWriter``: sample grids every ``train.sample_every`` iterations;
* ``Logger``: metrics.jsonl / TensorBoard / wandb every ``train.log_every`` iterations,
  reward_curve.png, the progress bar;
* ``Checkpointer``: a DCP checkpoint every ``train.save_every`` iterations and at the end;
* ``Exporter``: the trained weights in diffusers' formats at the end (export.py; the EMA weights when the run
  keeps one);
* ``watchdog.Watchdog`` (with ``train.watchdog``): gold rewards and diversity at each evaluation, the
  reward-hacking alarm and the ``best`` export.

A component may set ``state.stop_requested`` (a reason): the loop ends after that iteration, which the
checkpointer saves first, and the summary's ``stopped`` holds the reason; with ``state.defer_end`` too (a graceful
stop at the last iteration, preemption.py) the end of the run is left to the rerun.

A rerun finishes what the run promised: ``on_end`` (final evaluation, export, reports, the final row) runs
whenever the run is complete, also when it was resumed at its last iteration (killed, stopped or out of disk
during its end): those outputs are rebuilt from the run folder and the weights, so they equal an uninterrupted
run's. ``prepare_metrics_file`` drops the earlier attempt's end row first.

A component implements any of ``on_start`` (returns metrics for a row at the starting step),
``on_iteration`` (may add metrics to the iteration's row), ``on_end`` (returns metrics for a final
row), ``on_row`` (a row was completed), ``on_error`` (may turn an exception into another), ``close``
and ``summary``. They run in list order, so an evaluator placed before the logger has its metrics
logged in the same row.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..distributed import heartbeat
from ..distributed.collectives import reduce_metrics
from ..distributed.heartbeat import EXIT_STALLED  # noqa: F401  (the documented exit codes live here)
from . import throughput
from .state import TrainState

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_OOM = 4
EXIT_WATCHDOG = 5  # the reward-hacking watchdog stopped the run (train.watchdog.stop; watchdog.py)
# EXIT_STALLED = 6: a rank stopped answering or fell behind (parallel.train_timeout_s; distributed/heartbeat.py)
EXIT_NO_SPACE = 7  # the disk of the output folder is full (the last whole checkpoint is kept)
FIRST_IMAGES = "iter_000000_images.safetensors"  # the samples of the evaluation before training (Evaluator)


class TrainingStopped(RuntimeError):
    """The run was stopped on purpose (divergence, OOM); ``exit_code`` says why. ``announced``: the message was
    printed already (a graceful stop, preemption.py), so ``run_cli`` exits without repeating it."""

    def __init__(self, message: str, exit_code: int, announced: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.announced = announced


def run_cli(main: Callable, *args) -> None:
    """``main(*args)`` for a command line: a user error (FileNotFoundError / ValueError) prints one
    ``error:`` line and exits 2, a ``TrainingStopped`` exits with its code; no traceback for either."""
    import sys

    try:
        main(*args)
    except TrainingStopped as e:
        if not e.announced:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


@dataclass
class LoopState:
    """What components see: the trainer (its train state), where the run writes, and how far it is."""

    trainer: TrainState
    total: int
    out: Path
    is_main: bool = True
    start_iteration: int = 0
    history: List[Dict] = field(default_factory=list)
    last_checkpoint: Optional[str] = None  # set by the Checkpointer (or the resumed checkpoint)
    stop_requested: Optional[str] = None  # a component's reason to stop after this iteration (it is saved first)
    defer_end: bool = False  # with stop_requested at the last iteration: leave on_end to the rerun

    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    @property
    def fresh(self) -> bool:
        return self.start_iteration == 0

    @property
    def completed(self) -> bool:
        return self.trainer.iteration >= self.total


class Component:
    """Hooks of the loop (all optional); see the module docstring."""

    def on_start(self, state: LoopState) -> Dict:
        return {}

    def on_iteration(self, state: LoopState, it: int, metrics: Dict) -> None:
        pass

    def on_end(self, state: LoopState) -> Dict:
        return {}

    def on_row(self, state: LoopState, step: int, row: Dict, iteration_row: bool) -> None:
        pass

    def on_error(self, state: LoopState, it: int, error: BaseException) -> Optional[BaseException]:
        return None

    def close(self, state: LoopState) -> None:
        pass

    def summary(self) -> Dict:
        return {}


def fit(trainer: TrainState, components: Sequence[Component], *, total: int, out, is_main: bool = True,
        last_checkpoint: Optional[str] = None, stop_after: Optional[int] = None,
        reduce: Callable[[Dict], Dict] = reduce_metrics, per_iteration: Optional[Callable[[Dict], None]] = None
        ) -> Dict:
    """Train until ``trainer.iteration == total`` (or ``stop_after``); returns a summary dict (every rank).

    ``reduce`` averages an iteration's metrics over ranks (collective); ``per_iteration`` adds entries to
    each iteration's metrics before the components see them (e.g. the world size).
    """
    t_start = time.perf_counter()
    state = LoopState(trainer, int(total), Path(out), is_main, trainer.iteration, last_checkpoint=last_checkpoint)
    comps = list(components)
    try:
        if state.fresh and state.total > 0:
            _row(state, comps, 0, _merged(c.on_start(state) for c in comps), iteration_row=False)
        while trainer.iteration < state.total:
            it = trainer.iteration + 1
            t0 = time.perf_counter()
            try:
                m = trainer.train_iteration()
            except Exception as e:  # a component may turn it into a clean stop (NaNGuard)
                for c in comps:
                    replacement = c.on_error(state, it, e)
                    if replacement is not None:
                        raise replacement from e
                raise
            m = reduce(m)
            m["time/iteration"] = time.perf_counter() - t0
            if per_iteration is not None:
                per_iteration(m)
            state.history.append(m)
            for c in comps:
                c.on_iteration(state, it, m)
            _row(state, comps, it, m, iteration_row=True)
            if (stop_after is not None and it >= stop_after) or state.stop_requested is not None:
                break
        final: Dict = {}
        if state.completed and state.total > 0 and not state.defer_end:  # also when resumed at the end: a rerun
            final = _merged(c.on_end(state) for c in comps)          # finishes what the run promised
            _row(state, comps, trainer.iteration, final, iteration_row=False)
    finally:
        for c in comps:
            c.close(state)
    summary = {
        "iteration": trainer.iteration,
        "iterations_run": len(state.history),
        "last_checkpoint": state.last_checkpoint,
        "final_eval": final,
        "last_metrics": state.history[-1] if state.history else {},
        "wall_time_s": time.perf_counter() - t_start,
        "stopped": state.stop_requested,
        "throughput": throughput.summarise(state.history),  # frames per GPU per second and MFU, warm iterations
    }
    for c in comps:
        summary.update(c.summary())
    return summary


def _merged(parts) -> Dict:
    out: Dict = {}
    for p in parts:
        out.update(p or {})
    return out


def _row(state: LoopState, comps, step: int, row: Dict, iteration_row: bool) -> None:
    if row or iteration_row:
        for c in comps:
            c.on_row(state, step, row, iteration_row)


def _due(it: int, every: int) -> bool:
    return bool(every) and it % every == 0


# ----------------------------------------------------------------------------- components


class NaNGuard(Component):
    """Stops the run cleanly on a non-finite loss / gradient (FloatingPointError) or reward (ValueError
    saying so), naming the last good checkpoint. Other errors pass through unchanged."""

    def on_error(self, state, it, error):
        if not isinstance(error, (FloatingPointError, ValueError)):
            return None
        if isinstance(error, ValueError) and not re.search(r"non-finite|\b(nan|inf)\b", str(error).lower()):
            return None  # a user error (e.g. a prompt without embeddings), not a divergence
        hint = ("check the reward model and what it is given: the samples named above" if isinstance(error, ValueError)
                else "see the possible causes above")
        return TrainingStopped(
            f"iteration {it} stopped: {str(error).rstrip('.')}. Nothing was saved for this iteration; the last good "
            f"checkpoint is {state.last_checkpoint or '(none: no checkpoint was written yet)'}. Fix the cause ({hint}) "
            f"and resume with --resume latest.", EXIT_DIVERGED)


class EMAUpdate(Component):
    """Updates the trainer's weight EMA (``trainer.ema``, ema.py) after every iteration; placed before the
    components that evaluate, export or save, so that they see this iteration's average."""

    def on_iteration(self, state, it, metrics):
        if state.trainer.ema is not None:
            state.trainer.ema.update()


class Evaluator(Component):
    """Held-out evaluation with the ODE sampler: before training (fresh run), every ``every`` iterations
    (not at the last, which the final evaluation covers) and after the last iteration.

    ``evaluate(return_images)`` runs one evaluation (collective) and returns ``distributed_evaluate``'s
    dict. Results are written to ``eval/iter_N.json`` and eval_curve.png on the main rank.
    ``keep_images_at_ends``: keep the first and last evaluations' samples (``first`` / ``last``); the first's are
    also written (``eval/iter_000000_images.safetensors``, uint8 as gathered), so that a resumed run gets ``first``
    back from the run folder, images included, at its end.
    """

    def __init__(self, evaluate: Callable[[bool], Dict], every: int, *, keep_images_at_ends: bool = False,
                 prior_rows: Sequence[Dict] = ()):
        self.evaluate, self.every, self.keep_images = evaluate, int(every), keep_images_at_ends
        self.rows: List[Dict] = [r for r in prior_rows if "eval/reward" in r]
        self.first: Optional[Dict] = None
        self.last: Optional[Dict] = None
        self.seconds: List[float] = []  # wall time of each evaluation

    def _run(self, state, step: int, images: bool = False) -> Optional[Tuple[Dict, Dict]]:
        """(row metrics, the evaluation) or None when there is nothing to evaluate."""
        t0 = time.perf_counter()
        heartbeat.mark("eval", step)
        ev = self.evaluate(images)
        if not ev or not ev.get("mean"):
            return None
        self.seconds.append(time.perf_counter() - t0)
        m = {f"eval/{k}": v for k, v in ev["mean"].items()}
        m["eval/reward"] = sum(ev["mean"].values()) / max(1, len(ev["mean"]))
        if state.is_main:
            from ..utils.io import atomic_write_json
            from .metrics import plot_reward_curves

            atomic_write_json(state.out / "eval" / f"iter_{step:06d}.json",
                              {"iteration": step, **{k: v for k, v in ev.items() if k != "images"}})
            self.rows.append({"step": step, **m})
            keys = [f"eval/{k}" for k in ev["mean"]]
            plot_reward_curves(self.rows, keys if len(keys) == 1 else ["eval/reward"] + keys,
                               state.out / "eval_curve.png", window=1, title="held-out reward (ODE sampler)")
        return m, ev

    def on_start(self, state):
        res = self._run(state, 0, images=self.keep_images)
        if not res:
            return {}
        m, self.first = res
        if state.is_main and self.keep_images and self.first.get("images") is not None:
            from safetensors.torch import save_file

            from ..utils.io import atomic_path

            uint8 = (self.first["images"] * 255.0).round().to(torch.uint8)  # exact: gathered as uint8 / 255
            with atomic_path(state.out / "eval" / FIRST_IMAGES) as tmp:
                save_file({"images": uint8.contiguous()}, str(tmp))
        return m

    def _restore_first(self, state) -> None:
        """A resumed run: the evaluation before training, from ``eval/iter_000000.json`` (+ its images)."""
        path = state.out / "eval" / "iter_000000.json"
        if self.first is not None or state.fresh or not path.is_file():
            return
        first = {k: v for k, v in json.loads(path.read_text()).items() if k != "iteration"}
        images = state.out / "eval" / FIRST_IMAGES
        if self.keep_images and images.is_file():
            from safetensors.torch import load_file

            first["images"] = load_file(str(images))["images"].float() / 255.0
        self.first = first

    def on_iteration(self, state, it, metrics):
        if _due(it, self.every) and it < state.total:
            res = self._run(state, it)
            if res:
                metrics.update(res[0])

    def on_end(self, state):
        self._restore_first(state)
        res = self._run(state, state.iteration, images=self.keep_images)
        if not res:
            return {}
        m, self.last = res
        return m


class SampleWriter(Component):
    """A grid of samples (fixed prompts and noise) at step 0 and every ``every`` iterations (and the last);
    with ``at_evaluations`` (an image logger is on) also at each held-out evaluation (step 0, every
    ``eval_every`` iterations, the last)."""

    def __init__(self, write: Callable[[int], None], every: int, *, at_evaluations: bool = False, eval_every: int = 0):
        self.write, self.every = write, int(every)
        self.at_evaluations, self.eval_every = at_evaluations, int(eval_every)

    def on_start(self, state):
        if self.every or self.at_evaluations:
            heartbeat.mark("samples", 0)
            self.write(0)
        return {}

    def on_iteration(self, state, it, metrics):
        due = self.every and (it % self.every == 0 or it == state.total)
        if due or (self.at_evaluations and (_due(it, self.eval_every) or it == state.total)):
            heartbeat.mark("samples", it)
            self.write(it)

    def on_end(self, state):
        if self.every and not state.history:  # resumed at the end: the last grid may be missing
            self.write(state.iteration)
        return {}


class Logger(Component):
    """Rows to metrics.jsonl (+ TensorBoard / wandb) on the main rank, every ``log_every`` iterations and
    at the last; reward_curve.png every ``curve_every`` iterations (0: at the end); a progress bar."""

    def __init__(self, out, *, enabled: bool, reward_keys: Sequence[str], log_every: int = 1, curve_every: int = 1,
                 curve_window: int = 10, tensorboard: Optional[bool] = False, wandb_project: Optional[str] = None,
                 progress: bool = False, total: int = 0, initial: int = 0, prior_rows: Sequence[Dict] = (),
                 run_name: Optional[str] = None, config: Optional[Dict] = None):
        from .metrics import MetricsLogger

        self.out = Path(out)
        self.enabled = enabled
        self.logger = MetricsLogger(out, enabled=enabled, tensorboard=tensorboard, wandb_project=wandb_project,
                                    run_name=run_name, config=config, resumed=initial > 0)
        self.reward_keys = list(reward_keys)
        self.log_every, self.curve_every, self.curve_window = max(1, int(log_every)), int(curve_every), curve_window
        self.prior_rows = list(prior_rows)
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when the output is not a terminal (a log file), as tqdm's users expect
            self.bar = tqdm(total=total, initial=initial, desc="GRPO", dynamic_ncols=True, unit="it", disable=None)

    @property
    def history(self) -> List[Dict]:
        return self.logger.history

    def log_image(self, tag: str, image, step: int) -> None:
        """A picture (a sample grid) to TensorBoard / wandb, when they are on."""
        self.logger.log_image(tag, image, step)

    def on_row(self, state, step, row, iteration_row):
        heartbeat.mark("log", step)
        if not iteration_row:
            if row:
                self.logger.log(row, step=step)
            return
        if step % self.log_every == 0 or step == state.total:
            self.logger.log(row, step=step)
        if self.enabled and self.curve_every and (step % self.curve_every == 0 or step == state.total):
            self._curve()
        if self.bar is not None:
            shown = {k.split("/")[1][:10]: f"{row[k]:.4f}" for k in self.reward_keys if k in row}
            self.bar.set_postfix({**shown, "clip": f"{row.get('train/clipfrac', 0):.3f}",
                                  "kl": f"{row.get('train/approx_kl', 0):.1e}"})
            self.bar.update(1)

    def on_end(self, state):
        if self.enabled and self.curve_every and not state.history:  # resumed at the end: the curve may be missing
            self._curve()
        return {}

    def _curve(self):
        from .metrics import plot_reward_curves

        plot_reward_curves(self.prior_rows + self.logger.history, self.reward_keys, self.out / "reward_curve.png",
                           window=self.curve_window)

    def close(self, state):
        if self.bar is not None:
            self.bar.close()
        if self.enabled and self.curve_every == 0 and self.logger.history:
            self._curve()
        self.logger.close()


class Checkpointer(Component):
    """A DCP checkpoint (``checkpoint.save_trainer_checkpoint``) every ``every`` iterations, at the end and at an
    iteration after which a component asked to stop (``state.stop_requested``), each after a check that it fits
    on the disk (``checkpoint.ensure_room_for_checkpoint``: a clear shortage stops the run before writing),
    keeping the newest ``keep_last`` (0: all) of this run's own checkpoints: those it writes and, when
    resumed, the ones up to the resumed step. Nothing else in the folder is ever deleted."""

    def __init__(self, root, every: int, keep_last: int = 0, resumed_at: Optional[int] = None):
        from .checkpoint import checkpoints_up_to

        self.root, self.every, self.keep_last = Path(root), int(every), int(keep_last)
        self.last_saved = resumed_at if resumed_at is not None else -1
        self.own = checkpoints_up_to(self.root, resumed_at) if resumed_at is not None else []
        self.seconds: List[float] = []  # wall time of each save

    def _save(self, state):
        from .checkpoint import ensure_room_for_checkpoint, prune_checkpoints, save_trainer_checkpoint

        t0 = time.perf_counter()
        with heartbeat.phase("save", state.iteration, long=True):  # rank 0 renames alone: the start-up timeout
            needed = ensure_room_for_checkpoint(state.trainer, self.root)  # NoSpace when it clearly cannot fit
            try:
                path = save_trainer_checkpoint(state.trainer, self.root)
            except BaseException as e:  # a full disk anyway: the run's one line reports the estimate
                e.checkpoint_bytes = needed
                raise
        self.seconds.append(time.perf_counter() - t0)
        state.last_checkpoint = str(path)
        self.own = prune_checkpoints(self.own + [path], self.keep_last)
        self.last_saved = state.iteration

    def on_iteration(self, state, it, metrics):
        if _due(it, self.every) or it == state.total or state.stop_requested is not None:
            self._save(state)

    def on_end(self, state):
        if state.completed and self.last_saved != state.iteration and state.total > 0:
            self._save(state)
        return {}


class Exporter(Component):
    """The trained weights written once training completes (``checkpoint.export_weights``), inside the
    context ``weights()`` returns (the runner passes the EMA swap when ``train.ema_decay`` is set)."""

    def __init__(self, out_dir, weights: Optional[Callable[[], object]] = None,
                 options: Optional[Callable[[LoopState], Dict]] = None):
        self.out_dir = Path(out_dir)
        self.weights = weights
        self.options = options  # the export's options for this state (training/export.py: components, model card)
        self.written: Optional[str] = None

    def on_end(self, state):
        import contextlib

        from .checkpoint import export_weights

        if state.completed and state.total > 0:
            with heartbeat.phase("export", state.iteration, long=True), \
                    (self.weights() if self.weights is not None else contextlib.nullcontext()):
                w = export_weights(state.trainer.adapter, self.out_dir,
                                   **(self.options(state) if self.options is not None else {}))
            self.written = str(w) if w else None
        return {}

    def summary(self):
        return {"export": self.written}


def prepare_metrics_file(out: Path, resumed_iteration: Optional[int], total: Optional[int] = None) -> List[Dict]:
    """Fresh run: drop an old metrics.jsonl; resumed: keep only rows up to the resumed iteration. Resumed at the
    run's end (``resumed_iteration >= total``), the end is redone, so its earlier row goes: the rows at that step
    other than the iteration's (which alone has ``time/iteration``). Returns the rows kept."""
    from ..utils.io import atomic_write_text
    from .metrics import read_jsonl

    path = Path(out) / "metrics.jsonl"
    if resumed_iteration is None:
        path.unlink(missing_ok=True)
        return []
    at_end = total is not None and resumed_iteration >= total
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= resumed_iteration
            and not (at_end and r.get("step", 0) == resumed_iteration and "time/iteration" not in r)]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows
