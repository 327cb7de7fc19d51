"""The output folder of a run: who holds it, whether it holds a run already, and its config record.

* ``RunLock``: one run per folder. The main rank creates ``.run.lock`` (host, pid, start time)
  exclusively; a second run refuses, naming the holder. A lock left by a crashed run on this host (its
  pid is gone) is stale and taken over; one from another host cannot be checked and is refused with
  the command that removes it.
* ``check_fresh_start``: a fresh run refuses a folder that holds a run (config.yaml, metrics.jsonl,
  checkpoints, summary.json) unless ``--resume`` or ``--overwrite`` is given; ``clear_run`` is what
  ``--overwrite`` deletes.
* ``remove_leftovers``: the temporary files and unfinished checkpoint folders of a killed run are deleted by
  the next run in the folder (under its lock).
* ``record_config``: config.yaml is written only once the run has been built (a start that fails
  earlier leaves the previous record intact), atomically; a resumed run keeps the earlier record as
  config.1.yaml, config.2.yaml, ...; settings that cannot change on resume are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import List, Optional

import yaml

LOCK = ".run.lock"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "eval", "samples", "export",
               "tensorboard", "reward_curve.png", "eval_curve.png", "samples_before_after.png", "policy.pt",
               "stopped.json", "exports", "wandb_run_id.txt")
#: settings a resumed run cannot change: its random streams, prompt order and weights continue
FIXED_ON_RESUME = (("train", "seed"), ("model", "name"), ("data", "manifest"), ("data", "eval_manifest"),
                   ("data", "eval_fraction"), ("data", "split_salt"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive hold of a run folder (see the module docstring); a no-op when ``enabled`` is False."""

    def __init__(self, folder, enabled: bool = True):
        self.path = Path(folder) / LOCK
        self.enabled = enabled
        self.held = False

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                where = f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                extra = "" if holder.get("host") == me["host"] else (
                    f"; if that run is gone, remove the lock: rm {self.path}")
                raise ValueError(f"{self.path.parent} is in use by another run ({where}): two runs in one folder "
                                 f"would mix their metrics and checkpoints. Wait for it, or use another "
                                 f"--output-dir{extra}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ValueError(f"could not take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "started": "?"}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holds_run(folder) -> bool:
    folder = Path(folder)
    return any((folder / m).exists() for m in RUN_MARKERS)


def check_fresh_start(folder, resuming: bool, overwrite: bool) -> None:
    """ValueError when a fresh run would write into a folder that holds another run."""
    if resuming or overwrite or not holds_run(folder):
        return
    found = [m for m in RUN_MARKERS if (Path(folder) / m).exists()]
    raise ValueError(f"{folder} holds a run already ({', '.join(found)}). Resume it with --resume latest (or "
                     f"auto), start over with --overwrite (deletes its checkpoints, metrics, evaluations and "
                     f"export), or choose another --output-dir")


def clear_run(folder) -> None:
    """What ``--overwrite`` deletes: the previous run's outputs (not other files the user put there)."""
    folder = Path(folder)
    for name in RUN_OUTPUTS:
        p = folder / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in folder.glob("config.*.yaml"):
        p.unlink()


#: the folders of a run where its writes leave temporary files (io.atomic_path: ".<name>.<random>.tmp"; a
#: checkpoint being written: checkpoints/step_N.tmp/)
TEMP_FOLDERS = (".", "eval", "samples", "checkpoints", "export")


def remove_leftovers(folder) -> List[Path]:
    """Delete the temporary files and unfinished checkpoint folders a killed run left in ``folder`` (call with
    the run's lock held: no other run writes there). Returns what was removed."""
    folder, gone = Path(folder), []
    for sub in TEMP_FOLDERS:
        d = folder / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                gone.append(p)
            elif sub == "checkpoints" and p.is_dir() and p.name.startswith("step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


def record_config(cfg, folder, resumed: bool) -> Optional[Path]:
    """Write ``config.yaml`` (atomically); on resume keep the previous one as the next config.N.yaml.
    Returns the path the previous record was moved to, if any."""
    from ..config import save_config, to_dict

    folder = Path(folder)
    path = folder / "config.yaml"
    kept = None
    if resumed and path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        if old != to_dict(cfg):
            n = 1
            while (folder / f"config.{n}.yaml").exists():
                n += 1
            kept = folder / f"config.{n}.yaml"
            os.replace(path, kept)
    save_config(cfg, path)
    return kept


def check_resume_settings(cfg, folder) -> None:
    """ValueError when a resumed run changes a setting that cannot change mid-run (FIXED_ON_RESUME)."""
    from ..config import to_dict

    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = to_dict(cfg)
    changed = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {new[s][k]!r}" for s, k in FIXED_ON_RESUME
               if s in old and k in old.get(s, {}) and old[s][k] != new[s][k]]
    if changed:
        raise ValueError(f"a resumed run cannot change {'; '.join(changed)} (its random streams, prompt order and "
                         f"weights continue from the checkpoint); start a new run (another --output-dir) instead")
