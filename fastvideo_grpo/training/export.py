"""Exports that plain diffusers loads as they are: the trained weights of a run in diffusers' own formats.

``export_weights(adapter, out_dir)`` (collective: the full state dict is gathered to rank 0, which writes):

* **LoRA** (the model has trainable ``lora_`` weights): ``pytorch_lora_weights.safetensors`` written by
  diffusers' own LoRA saving (the base pipeline's ``save_lora_weights``, named by the base folder's
  model_index.json; diffusers' ``write_lora_layers`` when the folder has none) with the adapter metadata
  (peft's LoraConfig: rank, alpha, target modules, ...), so ``pipe.load_lora_weights(export)`` rebuilds the
  same adapter at any alpha (without it diffusers assumes alpha = rank). ``lora_fused``: the LoRA merged
  into the base weights (W + alpha / r * B A) and exported as a full fine-tune instead.
* **A full fine-tune** of a diffusers model: a pipeline folder ``DiffusionPipeline.from_pretrained`` opens:
  ``<subfolder>/`` (``transformer/`` or ``unet/``) holds the trained denoiser (``save_pretrained``), and the
  base model's other components and model_index.json are taken from the base folder as ``components``
  says: ``link`` (hard links: no extra space, and the export does not depend on the base folder staying
  where it is; a file that cannot be hard-linked, e.g. on another file system, is copied), ``copy``, or
  ``symlink`` (one link per component folder: nothing copied, but the export breaks when the base folder
  moves). Only the components model_index.json names are taken (not, e.g., the single-file checkpoints
  some repositories keep at top level); without a model_index.json, every subfolder.
* **Other models** (the toy DiT): ``model.safetensors``.

Every export is written to ``<out_dir>.tmp`` and then swapped in, so ``out_dir`` always holds one whole
export (an interrupted export leaves the previous one). ``card`` (a callable ``folder -> None``, e.g.
``model_card.write_model_card``) adds the model card (README.md) before the swap.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ..distributed.init import barrier, get_rank

MODEL_INDEX = "model_index.json"
FLAT_FILE = "model.safetensors"
#: files at the top of a base folder that travel with a pipeline export besides model_index.json
_LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt")


def plain_class(module: nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass named FSDP<Name>)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(module)
    for cls in type(module).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls
    return type(module)


def lora_config(module: nn.Module, adapter_name: str = "default"):
    """The peft ``LoraConfig`` of a model with LoRA layers (diffusers' ``add_adapter`` keeps it in
    ``peft_config``), or None."""
    configs = getattr(module, "peft_config", None) or {}
    return configs.get(adapter_name)


def lora_metadata(config) -> Dict:
    """The adapter metadata diffusers' training scripts store with a LoRA (``LoraConfig.to_dict()``, JSON-ready):
    what ``load_lora_weights`` rebuilds the LoraConfig from (rank, alpha, targets, ...)."""
    meta = config.to_dict()
    out = {}
    for k, v in meta.items():
        if isinstance(v, set):
            v = sorted(v)
        try:
            json.dumps(v)
        except TypeError:
            v = str(v)
        out[k] = v
    return out


def lora_scale(config) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA): the factor of B A in the adapted weight."""
    r = config.r
    return float(config.lora_alpha) / (r ** 0.5 if getattr(config, "use_rslora", False) else r)


@torch.no_grad()
def merge_lora_state(full: Dict[str, torch.Tensor], config, adapter_name: str = "default") -> Dict[str, torch.Tensor]:
    """A LoRA model's full state dict with each layer's ``W + scale * B A`` in place of ``base_layer.weight`` and
    the LoRA entries dropped: the plain model's state dict (keys as without LoRA). Works on a gathered state
    dict (FSDP) as on a plain one."""
    if getattr(config, "use_dora", False) or getattr(config, "rank_pattern", None) or \
            getattr(config, "alpha_pattern", None):
        raise ValueError("merging a LoRA with DoRA or per-module rank / alpha patterns is not supported: export the "
                         "adapter as it is (without --lora-fused)")
    scale = lora_scale(config)
    out = {k.replace(".base_layer.", "."): v for k, v in full.items() if ".lora_" not in k}
    suffix_a = f".lora_A.{adapter_name}.weight"
    for k, a in full.items():
        if not k.endswith(suffix_a):
            continue
        stem = k[: -len(suffix_a)]
        b = full[f"{stem}.lora_B.{adapter_name}.weight"]
        w = out[f"{stem}.weight"]
        delta = (b.flatten(1).double() @ a.flatten(1).double()).reshape(w.shape)
        out[f"{stem}.weight"] = (w.double() + scale * delta).to(w.dtype)
    return out


# ----------------------------------------------------------------------------- the base model's components


def base_components(root: Path, subfolder: str):
    """(component folders of the base pipeline other than ``subfolder``, whether it has a model_index.json)."""
    index = root / MODEL_INDEX
    if index.is_file():
        names = [k for k, v in json.loads(index.read_text()).items()
                 if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None]
        return [n for n in names if n != subfolder and (root / n).exists()], True
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != subfolder
                  and not p.name.startswith(".")), False


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # follows a symlink (HF cache snapshots): links the blob itself
    except OSError:
        shutil.copy2(src, dst)
    return dst


def place(src: Path, dst: Path, mode: str) -> None:
    """``src`` (a file or folder of the base model) at ``dst``: hard-linked (copied where that fails), copied,
    or symlinked (``mode``: link / copy / symlink)."""
    if mode == "symlink":
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy if mode == "link" else shutil.copy2)
    elif mode == "link":
        _link_or_copy(str(src), str(dst))
    else:
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- writing


def _write_lora(tmp: Path, lora: Dict[str, torch.Tensor], meta: Dict, subfolder: Optional[str],
                root: Optional[Path]) -> None:
    """The LoRA file through diffusers: the base pipeline's ``save_lora_weights`` (``<subfolder>_lora_layers``
    with ``<subfolder>_lora_adapter_metadata``), else its generic ``write_lora_layers``."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    from ..models.lora import LORA_FILE

    pipeline_cls = None
    if root is not None and (root / MODEL_INDEX).is_file():
        import diffusers

        pipeline_cls = getattr(diffusers, json.loads((root / MODEL_INDEX).read_text()).get("_class_name", ""), None)
    layers_kw, meta_kw = f"{subfolder}_lora_layers", f"{subfolder}_lora_adapter_metadata"
    save = getattr(pipeline_cls, "save_lora_weights", None)
    if subfolder and save is not None and {layers_kw, meta_kw} <= set(inspect.signature(save).parameters):
        save(save_directory=str(tmp), weight_name=LORA_FILE, **{layers_kw: lora, meta_kw: meta})
        return
    prefixed = {f"{subfolder}.{k}" if subfolder else k: v for k, v in lora.items()}
    packed = {f"{subfolder}.{k}" if subfolder else k: v for k, v in meta.items()}
    LoraBaseMixin.write_lora_layers(state_dict=prefixed, save_directory=str(tmp), is_main_process=True,
                                    weight_name=LORA_FILE, save_function=None, safe_serialization=True,
                                    lora_adapter_metadata=packed)


def _write_pipeline(tmp: Path, module: nn.Module, state: Dict[str, torch.Tensor], subfolder: Optional[str],
                    root: Optional[Path], components: str) -> None:
    """The trained denoiser as ``<subfolder>/`` (``save_pretrained`` of a fresh instance) beside the base
    model's other components; ``model.safetensors`` for a model without diffusers' ``save_pretrained``."""
    from safetensors.torch import save_file

    cls = plain_class(module)
    if not (hasattr(cls, "save_pretrained") and hasattr(cls, "from_config") and hasattr(module, "config")):
        save_file(state, str(tmp / FLAT_FILE))
        return
    with torch.device("meta"):
        fresh = cls.from_config(module.config)
    fresh.load_state_dict(state, strict=True, assign=True)
    if subfolder is None or root is None:  # no base pipeline folder to complete: the model folder alone
        fresh.save_pretrained(str(tmp))
        return
    fresh.save_pretrained(str(tmp / subfolder))
    names, indexed = base_components(root, subfolder)
    for name in names:
        place(root / name, tmp / name, components)
    if indexed:
        shutil.copy2(root / MODEL_INDEX, tmp / MODEL_INDEX)
    else:
        import warnings

        final = tmp.with_name(tmp.name[: -len(".tmp")])
        warnings.warn(f"the base model folder {root} has no {MODEL_INDEX}, so the export {final} is not a whole "
                      f"pipeline: load it with <Pipeline>.from_pretrained(<base>, {subfolder}=<Model>.from_pretrained("
                      f"'{final}/{subfolder}'))", stacklevel=3)
    for lic in _LICENSE_NAMES:
        if (root / lic).is_file():
            place(root / lic, tmp / lic, "copy" if components == "symlink" else components)


def export_weights(adapter, out_dir: Union[str, Path], lora_only: Optional[bool] = None, *, lora_fused: bool = False,
                   components: str = "link", card: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
    """Collective: gather the trainable module's full state dict to rank 0 and write the export there (module
    docstring). ``lora_only`` (default: whether the module has trainable ``lora_`` weights) writes the adapter
    alone; ``lora_fused`` merges it and writes a full model instead. Returns the folder on rank 0, None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..config import EXPORT_COMPONENTS

    if components not in EXPORT_COMPONENTS:
        raise ValueError(f"train.export_components must be one of {EXPORT_COMPONENTS}, got {components!r}")
    module = adapter.trainable_module()
    has_lora = any("lora_" in n and p.requires_grad for n, p in module.named_parameters())
    if lora_only is None:
        lora_only = has_lora and not lora_fused
    peft_cfg = lora_config(module)
    if (lora_only or lora_fused) and peft_cfg is None:
        raise ValueError("a LoRA export was asked for, but the model has no LoRA layers (model.kwargs.lora_rank: 0)")
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = Path(out_dir)
    subfolder = getattr(adapter, "model_subfolder", None)
    root = getattr(adapter, "root", None)
    root = Path(root) if root is not None else None
    written = None
    if get_rank() == 0:
        full = {k: v.detach().contiguous().clone() for k, v in full.items()}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if lora_only:
            from ..models.lora import to_file_keys

            lora = to_file_keys(full, None)
            if not lora:
                raise ValueError("lora_only export but the model has no lora_ weights")
            _write_lora(tmp, lora, lora_metadata(peft_cfg), subfolder, root)
        else:
            state = merge_lora_state(full, peft_cfg) if peft_cfg is not None else full
            _write_pipeline(tmp, module, state, subfolder, root, components)
        if card is not None:
            card(tmp)
        _swap_in(tmp, out)
        written = out
    barrier()
    return written


def _swap_in(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; the previous ``out`` is removed only once the new one is in place."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def export_kind(folder: Union[str, Path]) -> Optional[str]:
    """What an export folder holds: "lora", "pipeline" (a denoiser subfolder, with or without the base's
    components), "model" (a diffusers model folder or ``model.safetensors``), or None when it is none."""
    from ..models.lora import LORA_FILE

    p = Path(folder)
    if not p.is_dir():
        return None
    if (p / LORA_FILE).is_file():
        return "lora"
    if (p / MODEL_INDEX).is_file() or any(p.glob("*/diffusion_pytorch_model*.safetensors")):
        return "pipeline"
    if any(p.glob("*.safetensors")):
        return "model"
    return None


def export_options(cfg, adapter, run_dir, step: int, weights: str, *, lora_fused: bool = False,
                   extra_card: Optional[str] = None) -> Dict:
    """``export_weights`` options of a run's export: ``train.export_components`` and its model card (README.md
    from the run folder ``run_dir``; ``weights``: "ema" or "raw")."""
    subfolder = getattr(adapter, "model_subfolder", None)
    root = getattr(adapter, "root", None)

    def card(folder: Path) -> None:
        from .model_card import write_model_card

        write_model_card(folder, run_dir, cfg, step=step, weights=weights, kind=export_kind(folder) or "model",
                         subfolder=subfolder, base_root=Path(root) if root is not None else None, extra=extra_card)

    return {"components": cfg.train.export_components, "lora_fused": lora_fused, "card": card}
