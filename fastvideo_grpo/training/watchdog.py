"""The reward-hacking watchdog (``train.watchdog``, docs/watchdog.md): a loop component beside the evaluator.

At every held-out evaluation (``train.eval_every``) it also measures *gold* rewards the run never trains
on and the *diversity* of the samples (diversity.py), and compares them with the trained reward (the
evaluation's ``eval/reward``: the held-out mean of the evaluation rewards, by default the training
rewards). The rule (``AlarmRule``, pure, tested on synthetic series):

    for each watched value s (every gold reward, each diversity statistic), at evaluation k:
      p      = the evaluation so far where s was highest (the earliest of equal ones)
      drop   = s[p] - s[k]                  (divided by |s[p]| with ``relative``)
      rise   = trained[k] - trained[p]
      met(k) = drop > threshold and rise > min_rise
    the alarm fires at the first evaluation where met() held at ``patience`` consecutive evaluations.

When it fires it prints one line starting with ``WATCHDOG ALARM`` and puts it in that evaluation's
metrics row (``watchdog/alarm_message``, and ``watchdog/alarm`` = 1 from then on); with ``stop`` the loop
stops after that iteration, once the checkpointer has saved it, and the run exits with status 5
(``loop.EXIT_WATCHDOG``). Independently, every evaluation where the ``best_by`` gold reward reaches a new
maximum writes the policy (its EMA when the run keeps one) to ``<output_dir>/best/`` (an export, as
``export/``, with ``best.json``), so the run keeps the weights a human judge would have picked rather
than those the trained reward liked most. ``watchdog.json`` holds every evaluation's values and the
alarm; ``watchdog_curve.png`` plots trained vs gold rewards (and diversity) with the alarm and the best
evaluation marked. The decision is made on the main rank and broadcast, so every rank acts alike.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .loop import Component

GOLD = "gold/"  # prefix of the gold rewards inside the evaluation's reward dict
DIVERSITY = "diversity/"


# ----------------------------------------------------------------------------- the rule (pure)


@dataclass
class AlarmRule:
    threshold: float = 0.05
    relative: bool = False
    min_rise: float = 0.0
    patience: int = 2

    @classmethod
    def from_config(cls, w) -> "AlarmRule":
        return cls(float(w.threshold), bool(w.relative), float(w.min_rise), int(w.patience))

    def drop(self, best: float, now: float) -> float:
        d = best - now
        return d / abs(best) if self.relative and best != 0 else d

    def met(self, trained: Sequence[float], watched: Sequence[Optional[float]], k: int) -> Tuple[bool, float, int]:
        """(condition at evaluation k, the drop there, the index p of the best evaluation up to k)."""
        seen = [(v, i) for i, v in enumerate(watched[:k + 1]) if v is not None]
        if watched[k] is None or not seen:
            return False, 0.0, k
        best_v = max(v for v, _ in seen)
        p = min(i for v, i in seen if v == best_v)
        d = self.drop(best_v, watched[k])
        return (d > self.threshold and trained[k] - trained[p] > self.min_rise), d, p

    def streak(self, trained: Sequence[float], watched: Sequence[Optional[float]]) -> int:
        """How many evaluations in a row, ending at the last one, met the condition."""
        n = 0
        for k in range(len(watched) - 1, -1, -1):
            if not self.met(trained, watched, k)[0]:
                break
            n += 1
        return n


@dataclass
class AlarmTracker:
    """The rule applied evaluation after evaluation: ``update`` returns the watched names whose streak
    reached ``patience`` at this evaluation (only the first time the alarm fires: ``fired`` is then set)."""

    rule: AlarmRule
    steps: List[int] = field(default_factory=list)
    trained: List[float] = field(default_factory=list)
    watched: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    fired: Optional[Dict] = None

    def update(self, step: int, trained: float, watched: Dict[str, Optional[float]]) -> Dict[str, Dict]:
        n = len(self.steps)
        self.steps.append(int(step))
        self.trained.append(float(trained))
        for name in set(self.watched) | set(watched):
            self.watched.setdefault(name, [None] * n).append(watched.get(name))
        status = {}
        for name, series in self.watched.items():
            met, drop, p = self.rule.met(self.trained, series, n)
            status[name] = {"met": met, "drop": drop, "value": series[n], "best_step": self.steps[p],
                            "best": series[p], "streak": self.rule.streak(self.trained, series)}
        firing = {k: s for k, s in status.items() if s["streak"] >= self.rule.patience}
        if firing and self.fired is None:
            self.fired = {"step": int(step), "signals": sorted(firing)}
        return status


@dataclass
class BestTracker:
    """The evaluation with the highest gold reward so far (the earliest of equal ones)."""

    step: Optional[int] = None
    value: float = -math.inf

    def update(self, step: int, value: Optional[float]) -> bool:
        if value is None or not value > self.value:
            return False
        self.step, self.value = int(step), float(value)
        return True


def alarm_message(step: int, trained: float, status: Dict[str, Dict], names: Sequence[str], rule: AlarmRule) -> str:
    parts = []
    for n in names:
        s = status[n]
        unit = " of its best" if rule.relative else ""
        parts.append(f"{n} {s['best']:.4f} (iteration {s['best_step']}) -> {s['value']:.4f} "
                     f"(drop {s['drop']:.4f}{unit} > {rule.threshold})")
    return (f"WATCHDOG ALARM at iteration {step}: the trained reward rose to {trained:.4f} while " + "; ".join(parts)
            + f", {rule.patience} evaluation(s) in a row: likely reward hacking (docs/watchdog.md)")


# ----------------------------------------------------------------------------- the component


class Watchdog(Component):
    """See the module docstring. ``wrap(evaluate)`` gives the evaluator the evaluation to call: it adds the
    gold rewards' and the diversity's measurements and hands the evaluator only its own rewards' results.

    ``diversity(images, groups) -> {name: value}`` (None: off); ``export_best(step, record)`` writes the
    ``best`` export (collective; None: no best export)."""

    def __init__(self, rule: AlarmRule, out, *, gold_keys: Sequence[str], best_by: Optional[str], stop: bool,
                 samples_per_prompt: int, diversity: Optional[Callable] = None,
                 export_best: Optional[Callable[[int, Dict], None]] = None, is_main: bool = True,
                 prior: Sequence[Dict] = ()):
        self.rule, self.out, self.stop, self.is_main = rule, Path(out), bool(stop), is_main
        self.gold_keys, self.best_by = list(gold_keys), best_by
        self.spp, self.diversity, self.export_best = int(samples_per_prompt), diversity, export_best
        self.tracker, self.best = AlarmTracker(rule), BestTracker()
        self.history: List[Dict] = []
        self.pending: Optional[Dict] = None
        for rec in prior:  # a resumed run: its evaluations up to the resumed iteration
            self._decide(rec)

    # -- evaluation
    def wrap(self, evaluate: Callable[[bool], Dict]) -> Callable[[bool], Dict]:
        def watched(images: bool) -> Dict:
            ev = evaluate(images or self.diversity is not None)
            if ev and ev.get("mean") is not None:
                self.pending = self._measure(ev)
                if not images:
                    ev.pop("images", None)
            return ev

        return watched

    def _measure(self, ev: Dict) -> Dict:
        """Takes the gold rewards out of ``ev`` (the evaluator sees only its own rewards) and measures."""
        gold = {k[len(GOLD):]: ev["mean"].pop(k) for k in list(ev["mean"]) if k.startswith(GOLD)}
        for part in ("per_sample", "extras_mean"):
            for k in [k for k in ev.get(part, {}) if k.startswith(GOLD)]:
                ev[part].pop(k)
        own = ev["mean"]
        rec = {"trained": sum(own.values()) / max(1, len(own)), "gold": gold, "diversity": {}}
        if self.diversity is not None and self.is_main and ev.get("images") is not None:
            groups = [i // self.spp for i in range(len(ev["images"]))]
            rec["diversity"] = self.diversity(ev["images"], groups)
        return rec

    # -- decisions
    def _watched(self, rec: Dict) -> Dict[str, Optional[float]]:
        out = {f"{GOLD}{k}": v for k, v in rec["gold"].items()}
        out.update({f"{DIVERSITY}{k}": v for k, v in rec["diversity"].items()})
        return out

    def _decide(self, rec: Dict) -> Dict:
        """Main rank: update the trackers with one evaluation; returns the decision."""
        status = self.tracker.update(rec["step"], rec["trained"], self._watched(rec))
        fired_now = self.tracker.fired is not None and self.tracker.fired["step"] == rec["step"] \
            and not any(h.get("alarm_message") for h in self.history)
        key = self.best_by or (self.gold_keys[0] if self.gold_keys else None)
        improved = key not in (None, "off") and self.best.update(rec["step"], rec["gold"].get(key))
        metrics = {f"eval/{k}": v for k, v in self._watched(rec).items() if v is not None}
        for name, s in status.items():
            metrics[f"watchdog/drop/{name}"] = s["drop"]
            metrics[f"watchdog/streak/{name}"] = s["streak"]
        metrics["watchdog/alarm"] = int(self.tracker.fired is not None)
        if self.best.step is not None:
            metrics["watchdog/best_step"] = self.best.step
        message = None
        if fired_now:
            message = alarm_message(rec["step"], rec["trained"], status, self.tracker.fired["signals"], self.rule)
            metrics["watchdog/alarm_message"] = message
        self.history.append({**rec, "status": status, "alarm_message": message, "best_step": self.best.step})
        return {"metrics": metrics, "message": message, "improved": improved}

    def _process(self, state, step: int) -> Dict:
        if self.pending is None:
            return {}
        rec, self.pending = {**self.pending, "step": int(step)}, None
        decision = self._decide(rec) if self.is_main else None
        decision = _broadcast(decision)
        if decision["improved"] and self.export_best is not None:
            self.export_best(step, {"iteration": step, "best_by": self.best_by or self.gold_keys[0],
                                    "gold": rec["gold"], "trained": rec["trained"]})
        if self.is_main:
            self._write()
            if decision["message"]:
                print(decision["message"], flush=True)
        if decision["message"] and self.stop:
            state.stop_requested = decision["message"] + " (train.watchdog.stop: stopped after saving)"
        return decision["metrics"]

    def _write(self) -> None:
        from ..utils.io import atomic_write_json

        atomic_write_json(self.out / "watchdog.json", self.record())
        plot_watchdog(self.history, self.out / "watchdog_curve.png", self.tracker.fired, self.best.step)

    def record(self) -> Dict:
        r = self.rule
        return {"rule": {"threshold": r.threshold, "relative": r.relative, "min_rise": r.min_rise,
                         "patience": r.patience}, "stop": self.stop,
                "alarm": self.tracker.fired, "best": {"step": self.best.step, "value": self.best.value
                                                      if self.best.step is not None else None,
                                                      "by": self.best_by or (self.gold_keys or [None])[0]},
                "evaluations": [{k: v for k, v in h.items() if k != "status"} for h in self.history]}

    # -- loop hooks
    def on_start(self, state):
        return self._process(state, 0)

    def on_iteration(self, state, it, metrics):
        metrics.update(self._process(state, it))

    def on_end(self, state):
        return self._process(state, state.iteration)

    def summary(self):
        if not self.is_main:
            return {}
        rec = self.record()
        ends = {}
        for name, h in (("first", self.history[:1]), ("last", self.history[-1:])):
            if h:
                ends[name] = {k: h[0][k] for k in ("step", "trained", "gold", "diversity")}
        return {"watchdog": {"alarm": rec["alarm"], "best": rec["best"], "rule": rec["rule"], **ends}}


def _broadcast(obj):
    """The main rank's ``obj`` on every rank (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prior_evaluations(out, resumed_at: Optional[int], total: Optional[int] = None) -> List[Dict]:
    """A resumed run's watchdog evaluations up to the resumed iteration (from watchdog.json); resumed at the run's
    end (``resumed_at >= total``), without the final evaluation, which the rerun's end does again (loop.py)."""
    path = Path(out) / "watchdog.json"
    if resumed_at is None or not path.is_file():
        return []
    last = resumed_at - 1 if total is not None and resumed_at >= total else resumed_at
    return [{k: e[k] for k in ("step", "trained", "gold", "diversity")}
            for e in json.loads(path.read_text()).get("evaluations", []) if e["step"] <= last]


# ----------------------------------------------------------------------------- the best export


def save_best(adapter, folder, record: Dict, **options) -> None:
    """Collective: the trainable weights to ``folder`` (an export like ``export/``) with ``best.json``.
    Written to ``<folder>.tmp`` first, then swapped in, so ``folder`` always holds one whole export."""
    import torch.distributed as dist

    from .checkpoint import export_weights
    from ..utils.io import atomic_write_json

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    written = export_weights(adapter, tmp, **options)  # options: components, model card (training/export.py)
    if main and written is not None:
        atomic_write_json(tmp / "best.json", record)
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the plot


def plot_watchdog(history: Sequence[Dict], path, alarm: Optional[Dict], best_step: Optional[int]) -> None:
    """Trained vs gold rewards per evaluation (left axis), diversity (right axis, dashed), the alarm
    (red line) and the best evaluation (green line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_path

    if not history:
        return
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [h["trained"] for h in history], "o-", color="C0", linewidth=2, label="trained reward (eval/reward)")
    for i, k in enumerate(sorted({k for h in history for k in h["gold"]})):
        pts = [(h["step"], h["gold"][k]) for h in history if h["gold"].get(k) is not None]
        ax.plot(*zip(*pts), "s-", color=f"C{i + 1}", linewidth=2, label=f"gold: {k}")
    div = sorted({k for h in history for k in h["diversity"]})
    if div:
        ax2 = ax.twinx()
        for i, k in enumerate(div):
            pts = [(h["step"], h["diversity"][k]) for h in history if h["diversity"].get(k) is not None]
            if pts:
                ax2.plot(*zip(*pts), "--", color=f"C{i + 5}", linewidth=1.2, label=f"diversity: {k}")
        ax2.set_ylabel("diversity (mean pairwise distance)")
        ax2.legend(fontsize=7, loc="lower right")
    if alarm is not None:
        ax.axvline(alarm["step"], color="red", linestyle="--", linewidth=1.5, label=f"alarm (iteration {alarm['step']})")
    if best_step is not None:
        ax.axvline(best_step, color="green", linestyle=":", linewidth=1.5, label=f"best by gold (iteration {best_step})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out reward")
    ax.set_title("reward-hacking watchdog: trained vs gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- assembly (runner.py)


def enabled(cfg) -> bool:
    return cfg.train.watchdog.enabled


def check_watchdog(cfg) -> None:
    """The watchdog's checks against the other sections (its own fields check themselves in config.py):
    it needs held-out evaluations to watch, several samples per prompt to measure a spread, and gold rewards
    the run never trains on. Run by preflight and by ``build_watchdog``."""
    w, where = cfg.train.watchdog, "train.watchdog"
    if not w.enabled:
        return
    if cfg.train.eval_every < 1:
        raise ValueError(f"{where} watches the held-out evaluations, but train.eval_every is 0 (before and after "
                         "only); set train.eval_every to the iterations between evaluations")
    if w.diversity != "off" and cfg.eval.samples_per_prompt < 2:
        raise ValueError(f"{where}.diversity measures the spread of each prompt's samples: set "
                         f"eval.samples_per_prompt >= 2 (got {cfg.eval.samples_per_prompt})")
    trained = {(rc.key or rc.name) for rc in cfg.rewards} | {rc.name for rc in cfg.rewards}
    for i, rc in enumerate(w.gold):
        key = rc.key or rc.name
        if key in trained or any(t.name == rc.name and t.kwargs == rc.kwargs for t in cfg.rewards):
            raise ValueError(f"{where}.gold[{i}] ({key!r}) is a reward the run trains on (rewards:); a gold reward "
                             "must be one it never trains on")


def build_watchdog(cfg, trainer, out, is_main: bool, resumed_at: Optional[int]) -> Tuple[Watchdog, Dict]:
    """(the component, the gold reward functions keyed ``gold/<key>`` for the evaluation's reward dict)."""
    from .ema import weights_for_eval
    from ..rewards.build import build_reward_fns

    check_watchdog(cfg)
    w = cfg.train.watchdog
    gold = build_reward_fns(w.gold)[0] if w.gold else {}
    diversity = None
    if w.diversity != "off":
        from ..rewards.diversity import EmbeddingFeatures, sample_diversity

        embed = EmbeddingFeatures(**w.diversity_model) if (w.diversity == "embedding" and is_main) else None

        def diversity(images, groups):
            return sample_diversity(images, groups, w.diversity, w.diversity_size, embed)

    best_by = w.best_by or (next(iter(gold)) if gold else None)
    export_best = None
    if best_by not in (None, "off"):
        def export_best(step: int, record: Dict) -> None:
            from .export import export_options

            with weights_for_eval(trainer.ema):  # the EMA weights when the run keeps one, as evaluated
                save_best(trainer.adapter, Path(out) / "best", record, **export_options(
                    cfg, trainer.adapter, out, step, "ema" if trainer.ema is not None else "raw",
                    extra_card=f"Kept by the reward-hacking watchdog: the best held-out gold reward {best_by} "
                               f"(best.json; docs/watchdog.md)."))

    dog = Watchdog(AlarmRule.from_config(w), out, gold_keys=list(gold), best_by=best_by, stop=w.stop,
                   samples_per_prompt=cfg.eval.samples_per_prompt, diversity=diversity, export_best=export_best,
                   is_main=is_main,
                   prior=prior_evaluations(out, resumed_at, cfg.train.num_iterations) if is_main else ())
    return dog, {f"{GOLD}{k}": fn for k, fn in gold.items()}
