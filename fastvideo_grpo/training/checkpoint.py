"""Resumable checkpoints through torch.distributed.checkpoint (DCP), and weight export.

Layout under a checkpoint root (``<output_dir>/checkpoints``)::

    step_00000010/          one checkpoint (DCP shards + .metadata, written by all ranks)
        extra/rank_0.pt     per-rank trainer state: iteration, LR scheduler, prompt sampler
                            position, RNG states (torch CPU / CUDA + the trainer's generator)
    latest                  text file naming the newest complete checkpoint folder

Atomicity: every rank writes into ``step_N.tmp/``; after a barrier rank 0 renames it to ``step_N/``
and then rewrites ``latest`` atomically (io.atomic_write_text). A crash at any point leaves the
previous ``latest`` pointing at a complete checkpoint; stale ``*.tmp`` folders are ignored.

The trainer's weight EMA (``train.ema_decay``, ema.py), when it keeps one, is a third DCP entry
(``ema``), sharded like the parameters; ``load_ema_weights`` puts it into a model for evaluation. Tensors an
objective keeps across iterations (``Objective.state_tensors``: DiffusionNFT's old policy) are a fourth
(``objective``), sharded the same way.

Model and optimiser go through ``get_model_state_dict`` / ``get_optimizer_state_dict`` (FQN-keyed,
the same for FSDP2 and plain modules, checkpoint-wrapper prefixes removed), so DCP reshards on load:
a checkpoint written by 2 ranks resumes on 1 (or 8). RNG states are per rank; when the world size
changed they cannot be matched to ranks, so ``load_trainer_checkpoint`` reports it and the caller
reseeds the generators deterministically from (seed, iteration, dp rank).

``export_weights`` gathers the full state dict to rank 0 and writes what diffusers loads as it is
(training/export.py: a pipeline folder, or the LoRA file with its adapter metadata).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..distributed.init import barrier, get_rank, get_world_size
from ..utils.diskspace import NoSpace, failed_folder, folder_bytes, free_bytes, human_bytes, out_of_space_error
from ..utils.io import atomic_write_text
from .state import TrainState

LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step_{int(step):08d}"


# ----------------------------------------------------------------------------- resolving --resume


def resolve_resume(resume: Optional[Union[str, Path]], root: Union[str, Path]) -> Optional[Path]:
    """The checkpoint folder named by ``resume``.

    None / "" -> None (fresh start). "latest" -> the folder named by ``root/latest`` (FileNotFoundError
    when there is none). "auto" -> like "latest", but None when no checkpoint exists yet (restart
    scripts). A path -> that checkpoint folder, or a checkpoint root holding a ``latest`` file.
    """
    if resume is None or str(resume) == "":
        return None
    root = Path(root)
    if str(resume) in ("latest", "auto"):
        pointer = root / LATEST
        if not pointer.is_file():
            if str(resume) == "auto":
                return None
            raise FileNotFoundError(
                f"--resume latest: no checkpoint found ({pointer} does not exist); train first with "
                f"train.save_every > 0, point --resume at a checkpoint folder, or use --resume auto"
            )
        return _checked(root / pointer.read_text().strip())
    path = Path(resume)
    if (path / LATEST).is_file() and not (path / ".metadata").is_file():
        return _checked(path / (path / LATEST).read_text().strip())
    return _checked(path)


def _checked(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist (expected a folder like "
                                f"<output_dir>/checkpoints/step_00000010 or 'latest')")
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete DCP checkpoint (no .metadata file); an interrupted "
                                f"save leaves only a *.tmp folder -- resume from the previous checkpoint")
    return path


# ----------------------------------------------------------------------------- model + optimiser (DCP)


def _state(model: nn.Module, optimizer=None, ema: Optional[Dict[str, torch.Tensor]] = None,
           objective: Optional[Dict[str, torch.Tensor]] = None):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    if ema is not None:
        state["ema"] = ema
    if objective:
        state["objective"] = objective
    return state


def _has_entry(path: Union[str, Path], entry: str) -> bool:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith(entry + ".") for k in keys)


def has_ema(path: Union[str, Path]) -> bool:
    """Whether the DCP checkpoint at ``path`` holds a weight EMA (``train.ema_decay`` was set)."""
    return _has_entry(path, "ema")


def rng_state() -> Dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: Union[str, Path], step: int, model: nn.Module, optimizer=None,
                    extra: Optional[Dict] = None, ema: Optional[Dict[str, torch.Tensor]] = None,
                    objective: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Collective: write model / optimizer / ``ema`` / ``objective`` (DCP) + this rank's ``extra`` dict; returns
    the folder.

    A failed write (a full disk) removes its partial ``step_N.tmp`` folder before re-raising, so that
    it does not keep the disk full; ``latest`` still names the previous complete checkpoint."""
    import torch.distributed.checkpoint as dcp

    root = Path(root)
    final = root / step_dirname(step)
    tmp = root / (final.name + ".tmp")
    if get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "extra").mkdir(parents=True)
    barrier()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(_state(model, optimizer, ema, objective), checkpoint_id=str(tmp))
        blob = dict(extra or {}, rank=get_rank(), world_size=get_world_size(), rng=rng_state())
        torch.save(blob, tmp / "extra" / f"rank_{get_rank()}.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
    barrier()
    return final


# ----------------------------------------------------------------------------- disk space


def latest_complete(root: Union[str, Path]) -> Optional[Path]:
    """The checkpoint ``root/latest`` names when it is complete (None: none yet, or not readable)."""
    pointer = Path(root) / LATEST
    try:
        path = Path(root) / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return path if (path / ".metadata").is_file() else None


#: what DCP adds per stored tensor beyond its bytes (its serialisation framing: about 2.1 KB measured on the toy
#: DiT's 132 entries, torch 2.13), counted twice so that the estimate of a first checkpoint is an upper bound
DCP_BYTES_PER_TENSOR = 4096


def state_bytes(trainer: TrainState) -> int:
    """About how many bytes this rank's share of a checkpoint takes: the trainable module's parameters and
    buffers, the optimiser's state tensors and the EMA (local shards under FSDP2), plus DCP's framing of each."""

    def size(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() + DCP_BYTES_PER_TENSOR if isinstance(t, torch.Tensor) else 0

    module = trainer.adapter.trainable_module()
    total = sum(size(p) for p in module.parameters()) + sum(size(b) for b in module.buffers())
    for st in trainer.optimizer.state.values():
        total += sum(size(v) for v in st.values())
    if trainer.ema is not None:
        total += sum(size(v) for v in trainer.ema.state_dict().values())
    return total


def next_checkpoint_bytes(trainer: TrainState, root: Union[str, Path]) -> int:
    """Collective: about how many bytes the next checkpoint takes: the size of the last complete one under
    ``root``, else the checkpointed tensors summed over ranks."""
    from ..distributed.collectives import reduce_metrics

    tensors = int(reduce_metrics({"bytes": float(state_bytes(trainer))}, op="sum")["bytes"])  # every rank calls it
    last = latest_complete(root)
    return folder_bytes(last) if last is not None else tensors


def ensure_room_for_checkpoint(trainer: TrainState, root: Union[str, Path]) -> int:
    """Collective: ``NoSpace`` on every rank, before anything is written, when the next checkpoint clearly
    cannot fit on the filesystem of ``root`` (its estimated size exceeds the free space on some rank).
    Returns the estimate."""
    from ..distributed.collectives import any_rank

    needed, free = next_checkpoint_bytes(trainer, root), free_bytes(root)
    if any_rank(needed > free):
        raise NoSpace(root, needed, free)
    return needed


def no_space_message(error: BaseException, out_dir: Union[str, Path]) -> str:
    """The one line a run ends with when a write found the disk full (or ``NoSpace`` refused it first): which
    folder, how much a checkpoint of this run needs (the last one's size), how much is free, and which
    checkpoint is kept."""
    root = Path(out_dir) / "checkpoints"
    latest = latest_complete(root)
    if isinstance(error, NoSpace):
        folder, needed, free = error.folder, error.needed, free_bytes(error.folder)
        what = "stopped before writing the next checkpoint"
        basis = "the size of the last one" if latest is not None else "its weights and optimiser state"
    else:
        cause = out_of_space_error(error)
        folder = failed_folder(error, out_dir)
        needed, basis = folder_bytes(latest) if latest is not None else None, "the size of the last one"
        if needed is None and getattr(error, "checkpoint_bytes", None):  # a first save: the Checkpointer's estimate
            needed, basis = error.checkpoint_bytes, "its weights and optimiser state"
        free = free_bytes(folder)
        short = "a short write in torch.save" if isinstance(cause, RuntimeError) else \
            (getattr(cause, "strerror", None) or "no space left on device")
        what = f"a write into it failed ({short})"
    need = f"about {human_bytes(needed)} ({basis})" if needed is not None else "an unknown amount (none written yet)"
    kept = f"the last whole checkpoint, {latest}, is kept" if latest is not None else "no checkpoint was written yet"
    return (f"out of disk space in {folder}: {what}; {human_bytes(free)} free there, and a checkpoint of this run "
            f"needs {need}. {kept[0].upper() + kept[1:]}: free space (or set train.output_dir elsewhere) and rerun "
            "with --resume latest")


def checkpoints_up_to(root: Union[str, Path], step: int) -> List[Path]:
    """Complete checkpoint folders under ``root`` at or before ``step``, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / ".metadata").is_file() and int(p.name.split("_")[1]) <= step)


def prune_checkpoints(own: Sequence[Path], keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` of ``own`` (0: keep all) on rank 0; returns what is kept.
    Only the folders passed in are ever touched: another run's checkpoints in the same root are not."""
    own = sorted(set(Path(p) for p in own), key=lambda p: p.name)
    if keep_last <= 0 or len(own) <= keep_last:
        return own
    if get_rank() == 0:
        for old in own[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return own[-keep_last:]


def load_checkpoint(path: Union[str, Path], model: nn.Module, optimizer=None,
                    ema: Optional[Dict[str, torch.Tensor]] = None,
                    objective: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
    """Collective: load model / optimizer (and ``ema`` / ``objective``, in place, when the checkpoint has them)
    resharding as needed; returns this rank's extra dict with ``rng_matches`` True when it was written by this
    rank at the same world size, ``ema_loaded`` and ``objective_loaded``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = _checked(Path(path))
    ema_loaded = ema is not None and has_ema(path)
    objective_loaded = bool(objective) and _has_entry(path, "objective")
    state = _state(model, optimizer, ema if ema_loaded else None, objective if objective_loaded else None)
    with warnings.catch_warnings():  # single process: DCP warns that it assumes a non-distributed load
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    own = path / "extra" / f"rank_{get_rank()}.pt"
    f = own if own.is_file() else path / "extra" / "rank_0.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{path} lacks extra/rank_0.pt (trainer state); it was not written by save_checkpoint")
    extra = torch.load(f, map_location="cpu", weights_only=True)
    extra["rng_matches"] = f == own and extra.get("world_size") == get_world_size()
    extra["ema_loaded"] = ema_loaded
    extra["objective_loaded"] = objective_loaded
    return extra


def load_ema_weights(path: Union[str, Path], model: nn.Module, decay: float = 0.5) -> bool:
    """Collective: put the EMA stored in the checkpoint at ``path`` into ``model``'s trainable parameters
    (whose trained weights should be loaded first). Returns False, changing nothing, when it has none."""
    import torch.distributed.checkpoint as dcp

    from .ema import WeightEMA

    path = _checked(Path(path))
    if not has_ema(path):
        return False
    ema = WeightEMA(model, decay)  # the decay does not matter: only its tensors are filled
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"ema": ema.state_dict()}, checkpoint_id=str(path))
    with torch.no_grad():
        for name, p in ema.params:
            p.copy_(ema.shadow[name].to(p.dtype))
    return True


# ----------------------------------------------------------------------------- the trainer


def save_trainer_checkpoint(trainer: TrainState, root: Union[str, Path]) -> Path:
    """Everything the ``Trainer`` needs to continue bit-for-bit (collective): model and optimiser through
    DCP, ``trainer.state_dict()`` in this rank's extra file."""
    ema = trainer.ema
    return save_checkpoint(root, trainer.iteration, trainer.adapter.trainable_module(), trainer.optimizer,
                           trainer.state_dict(), ema=ema.state_dict() if ema is not None else None,
                           objective=_objective_tensors(trainer))


def _objective_tensors(trainer) -> Optional[Dict[str, torch.Tensor]]:
    objective = getattr(trainer, "objective", None)
    return (objective.state_tensors() or None) if objective is not None else None


def load_trainer_checkpoint(trainer: TrainState, path: Union[str, Path]) -> bool:
    """Restore ``trainer`` from ``path`` (collective). Returns True when the RNG states were restored
    exactly; False when the world size changed and the caller must reseed (see module docstring).
    A trainer keeping an EMA restores it too; from a checkpoint without one (written with
    ``train.ema_decay: 0``) the average restarts at the loaded weights, with a warning."""
    ema = trainer.ema
    own = _objective_tensors(trainer)
    extra = load_checkpoint(path, trainer.adapter.trainable_module(), trainer.optimizer,
                            ema=ema.state_dict() if ema is not None else None, objective=own)
    if ema is not None and not extra["ema_loaded"]:
        warnings.warn(f"checkpoint {path} holds no weight EMA (written with train.ema_decay: 0); the EMA restarts "
                      "at the loaded weights", stacklevel=2)
        ema.reset()
    if own and not extra["objective_loaded"]:
        warnings.warn(f"checkpoint {path} holds no tensors of the objective (e.g. DiffusionNFT's old policy, written "
                      "by another objective or decay type); they keep their start values", stacklevel=2)
    trainer.load_state_dict(extra, restore_generator=bool(extra["rng_matches"]))
    if extra["rng_matches"]:
        set_rng_state(extra["rng"])
    return bool(extra["rng_matches"])


# ----------------------------------------------------------------------------- export


def export_weights(adapter, out_dir: Union[str, Path], lora_only: Optional[bool] = None, **options) -> Optional[Path]:
    """Collective: the trained weights in diffusers' formats (training/export.py, where ``options`` are
    described); returns the written folder on rank 0, None on the other ranks."""
    from .export import export_weights as export

    return export(adapter, out_dir, lora_only, **options)
