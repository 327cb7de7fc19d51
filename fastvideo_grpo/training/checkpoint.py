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

``export_weights`` gathers the full state dict to rank 0 and writes diffusers-format safetensors:
``save_pretrained`` of the model class when it has one (a fresh instance built from its config),
else ``model.safetensors``; for LoRA only the adapter weights (``pytorch_lora_weights.safetensors``).
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


def _plain_class(module: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Name>)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(module)
    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(module)


def export_weights(adapter, out_dir: Union[str, Path], lora_only: Optional[bool] = None) -> Optional[Path]:
    """Collective: gather the trainable module's full state dict to rank 0 and write it there.

    ``lora_only`` (default: whether the module has trainable ``lora_`` parameters) writes only the
    LoRA weights, diffusers naming (``<subfolder>.<module>.lora_A.weight``). Returns the written
    folder on rank 0, None on the other ranks.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = adapter.trainable_module()
    if lora_only is None:
        lora_only = any("lora_" in n and p.requires_grad for n, p in module.named_parameters())
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    written = None
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        full = {k: v.detach().contiguous().clone() for k, v in full.items()}
        if lora_only:
            from ..models.lora import LORA_FILE, to_file_keys

            lora = to_file_keys(full, getattr(adapter, "model_subfolder", None))
            if not lora:
                raise ValueError("lora_only export but the model has no lora_ weights")
            save_file(lora, str(out / LORA_FILE))
        else:
            cls = _plain_class(module)
            if hasattr(cls, "save_pretrained") and hasattr(cls, "from_config") and hasattr(module, "config"):
                with torch.device("meta"):
                    fresh = cls.from_config(module.config)
                fresh.load_state_dict(full, strict=True, assign=True)
                fresh.save_pretrained(str(out))
            else:
                save_file(full, str(out / "model.safetensors"))
        written = out
    barrier()
    return written
