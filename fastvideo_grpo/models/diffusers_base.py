"""Shared base for adapters over diffusers models (a denoiser + a VAE loaded from one local folder).

Each family file (sd.py, flux.py, ...) only says which diffusers classes to load, how one forward
pass of the denoiser is called, the latent shape and how latents are decoded. This base does the
rest the same way for all of them:

* loading with ``from_pretrained(<folder>, subfolder=..., local_files_only=True)`` and a
  FileNotFoundError naming the expected subfolders when the folder is incomplete;
* freezing: the VAE (and any text encoder, which is never loaded: prompt embeddings come
  precomputed) has ``requires_grad=False``; the denoiser is fully trainable, or frozen with peft
  LoRA layers added when ``lora_rank > 0`` (see lora.py);
* classifier-free guidance: with a CFG scale s > 1 the policy output is
  ``uncond + s * (cond - uncond)``, computed in ONE batched forward over [uncond; cond] so both
  branches are differentiable and trained together (docs/method.md section 4). Negative conditioning
  comes in ``cond`` under the same names prefixed with ``negative_``;
* ``cond_spec()`` / ``validate_cond()``: the expected conditioning names and trailing shapes;
* the sigma grid (``sigma_grid``, flow families): "linspace" (the family's own ``_make_schedule``: DanceGRPO's
  shift applied to linspace(1, 0, T + 1)) or "scheduler" (what the family's diffusers pipeline samples with:
  ``FlowMatchEulerDiscreteScheduler.set_timesteps(T)`` of the folder's scheduler/scheduler_config.json, or of
  the adapter's ``shift`` where the folder has none; Flow-GRPO's and DiffusionNFT's grid);
* training-side guidance (``guidance(mode)``, ``grpo.train_guidance``): "both" branches differentiable,
  "detach_uncond" (the unconditional branch detached, released Flow-GRPO) or "none" (the conditional one alone);
* VAE memory: ``vae_tiling`` / ``vae_slicing`` switch on diffusers' tiled decoding (overlapping
  spatial tiles, blended: changes pixels slightly, docs/performance.md gives the measured size) and
  sliced decoding (one sample per decoder call: same pixels). ``None`` = the family's default
  (``default_vae_tiling`` / ``default_vae_slicing``: on for the video VAEs, off for the image VAEs);
  ``vae_tiling`` may also be a dict of the VAE's ``enable_tiling`` arguments (tile sizes, strides).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..utils import rng
from ..utils.registry import accepted_parameters
from . import lora as lora_lib
from .base import Cond, PolicyAdapter

NEG = "negative_"
SIGMA_GRIDS = ("linspace", "scheduler")

from ..utils.dtypes import parse_dtype  # noqa: E402,F401  (re-exported for adapters)
from ..config import TRAIN_GUIDANCE  # noqa: E402


def require_subfolders(model_path, subfolders: Sequence[str]) -> Path:
    """The model folder as a Path, after checking each ``subfolder/config.json`` exists."""
    if model_path is None or str(model_path) == "":
        raise ValueError("model_path is required: a local diffusers-format folder")
    root = Path(model_path).expanduser()
    expected = ", ".join(f"{s}/" for s in subfolders)
    if not root.is_dir():
        raise FileNotFoundError(
            f"model_path {str(root)!r} is not a folder. Expected a local diffusers-format model folder with "
            f"subfolders {expected} each holding config.json and weights (download it first, e.g. "
            f"`huggingface-cli download <repo> --local-dir {root}`)"
        )
    missing = [s for s in subfolders if not (root / s / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"model folder {str(root)!r} lacks {', '.join(m + '/config.json' for m in missing)}; a diffusers-format "
            f"folder with subfolders {expected} is expected"
        )
    return root


def load_component(class_name: str, root: Path, subfolder: str, dtype: torch.dtype):
    """diffusers.<class_name>.from_pretrained(root, subfolder=...) from local files only."""
    import diffusers

    cls = getattr(diffusers, class_name)
    return cls.from_pretrained(str(root), subfolder=subfolder, torch_dtype=dtype, local_files_only=True)


def component_from_config(class_name: str, config: Dict) -> nn.Module:
    """diffusers.<class_name>.from_config(config): the module without weights (config -> module, the step
    loading does before reading weights). Built on the current default device (``torch.device("meta")``
    for a module of any size in no time)."""
    import diffusers

    return getattr(diffusers, class_name).from_config(config)


def resolve_size(resolution, height, width, default: Tuple[int, int]) -> Tuple[int, int]:
    """(height, width) from explicit height/width, else ``resolution`` (int or [h, w]), else default."""
    if resolution is not None:
        if isinstance(resolution, (list, tuple)):
            if len(resolution) != 2:
                raise ValueError(f"resolution must be an int or [height, width], got {resolution!r}")
            rh, rw = int(resolution[0]), int(resolution[1])
        else:
            rh = rw = int(resolution)
    else:
        rh, rw = default
    h = int(height) if height is not None else rh
    w = int(width) if width is not None else rw
    if h <= 0 or w <= 0:
        raise ValueError(f"height and width must be positive, got {h}x{w}")
    return h, w


def build_adapter(cls, kwargs):
    """``cls(**kwargs)`` with a ValueError naming unknown keys (config typos) and the accepted ones."""
    accepted = accepted_parameters(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {unknown} (check model.kwargs in the config); "
                         f"accepted: {sorted(accepted)}")
    return cls(**kwargs)


def configure_vae_memory(vae, tiling: Union[bool, Dict], slicing: bool) -> Tuple[bool, bool]:
    """Switch on diffusers' tiled (``tiling``: True or a dict of ``enable_tiling`` arguments) and sliced
    decoding of ``vae``; returns (tiling on, slicing on). A VAE without the method is a ValueError."""
    name = type(vae).__name__
    if not isinstance(tiling, (bool, dict)):
        raise ValueError(f"model.kwargs.vae_tiling must be true, false or a dict of tile sizes, got {tiling!r}")
    if not isinstance(slicing, bool):
        raise ValueError(f"model.kwargs.vae_slicing must be true or false, got {slicing!r}")
    if isinstance(tiling, dict) or tiling:
        if not callable(getattr(vae, "enable_tiling", None)):
            raise ValueError(f"{name} has no tiled decoding: set model.kwargs.vae_tiling: false")
        args = dict(tiling) if isinstance(tiling, dict) else {}
        accepted = [p for p in inspect.signature(vae.enable_tiling).parameters if p != "self"]
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise ValueError(f"model.kwargs.vae_tiling: {name}.enable_tiling does not take {unknown}; "
                             f"accepted: {accepted or 'nothing (use true)'}")
        vae.enable_tiling(**args)
    if slicing:
        if not callable(getattr(vae, "enable_slicing", None)):
            raise ValueError(f"{name} has no sliced decoding: set model.kwargs.vae_slicing: false")
        vae.enable_slicing()
    return bool(isinstance(tiling, dict) or tiling), bool(slicing)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1] -> float32 in [0, 1]."""
    return ((pixels.float() + 1.0) * 0.5).clamp(0.0, 1.0)


class DiffusersAdapter(PolicyAdapter):
    """A diffusers denoiser (``model_class`` in ``model_subfolder``) + VAE (``vae_class`` in vae/)."""

    model_class: str = ""
    model_subfolder: str = "transformer"
    vae_class: str = "AutoencoderKL"
    #: conditioning names given per CFG branch (negatives carry the ``negative_`` prefix)
    branch_keys: Tuple[str, ...] = ("prompt_embeds",)
    #: conditioning names shared by both branches (e.g. an I2V reference-image latent)
    shared_keys: Tuple[str, ...] = ()
    default_num_steps: int = 25
    #: the latent patch size the adapter packs into tokens before the transformer (FLUX: 2x2 packing over a
    #: patch_size-1 transformer); 0 = the transformer's own patch_size (the planner counts tokens with it)
    packed_patch_size: int = 0
    #: VAE tiling / slicing when the config does not say (``vae_tiling`` / ``vae_slicing`` = None)
    default_vae_tiling: bool = False
    default_vae_slicing: bool = False

    def __init__(self, model_path, *, cfg_scale: float = 1.0, dtype="float32", device=None,
                 lora_rank: int = 0, lora_alpha: Optional[float] = None, lora_target_modules=None,
                 lora_dropout: float = 0.0, lora_init: str = "default", gradient_checkpointing: bool = False,
                 vae_tiling: Union[None, bool, Dict] = None, vae_slicing: Optional[bool] = None,
                 sigma_grid: str = "linspace", components: Optional[Tuple[nn.Module, nn.Module]] = None):
        """``components``: an already built (denoiser, VAE) pair instead of loading ``model_path`` -- the
        planner builds them from architecture configs on the meta device (``component_from_config``)."""
        self.cfg_scale = float(cfg_scale)
        if self.cfg_scale < 1.0:
            raise ValueError(f"the CFG scale must be >= 1 (1 disables CFG), got {cfg_scale}")
        self.dtype = parse_dtype(dtype)
        if sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"model.kwargs.sigma_grid must be one of {SIGMA_GRIDS}, got {sigma_grid!r}")
        self.sigma_grid = sigma_grid
        self.guidance_mode = "both"
        if components is None:
            self.root = require_subfolders(model_path, (self.model_subfolder, "vae"))
            self.model: nn.Module = load_component(self.model_class, self.root, self.model_subfolder, self.dtype)
            self.vae: nn.Module = load_component(self.vae_class, self.root, "vae", self.dtype)
        else:
            self.root = None
            self.model, self.vae = components
        self.vae.requires_grad_(False).eval()
        self.vae_tiling, self.vae_slicing = configure_vae_memory(
            self.vae, self.default_vae_tiling if vae_tiling is None else vae_tiling,
            self.default_vae_slicing if vae_slicing is None else vae_slicing)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.lora_rank = int(lora_rank or 0)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
        if self.lora_rank:
            lora_lib.add_lora(self.model, self.lora_rank, lora_alpha, lora_target_modules, lora_dropout, lora_init)
        else:
            self.model.requires_grad_(True)
        if device is not None:
            self.model.to(device)
            self.vae.to(device)

    @classmethod
    def missing_model_files(cls, kwargs) -> "list[str]":
        """The subfolders this family loads (``model_subfolder`` and ``vae``), each with a config.json."""
        try:
            require_subfolders(kwargs.get("model_path"), (cls.model_subfolder, "vae"))
        except (FileNotFoundError, ValueError) as e:
            return [str(e)]
        return []

    # ------------------------------------------------------------------ what subclasses provide

    @abc.abstractmethod
    def _forward(self, latents: torch.Tensor, timestep_B: torch.Tensor, c: Cond) -> torch.Tensor:
        """One denoiser forward; ``c`` holds the branch keys (no prefix) and the shared keys."""

    @abc.abstractmethod
    def latent_shape(self, cond: Optional[Cond] = None) -> Tuple[int, ...]:
        """Per-sample latent shape (no batch dim)."""

    @abc.abstractmethod
    def _branch_spec(self) -> Dict[str, Tuple[Optional[int], ...]]:
        """Trailing shapes (after the batch dim) of the per-branch conditioning; None = any length."""

    def _shared_spec(self) -> Dict[str, Tuple[Optional[int], ...]]:
        return {}

    # ------------------------------------------------------------------ the protocol

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def trainable_module(self) -> nn.Module:
        return self.model

    def decoder_modules(self):
        return [self.vae]

    def cond_spec(self) -> Dict[str, Tuple[Optional[int], ...]]:
        """Names -> trailing shapes of the conditioning this adapter consumes (None = variable)."""
        branch = self._branch_spec()
        spec = dict(branch)
        if self.uses_cfg:
            spec.update({NEG + k: v for k, v in branch.items()})
        spec.update(self._shared_spec())
        return spec

    def validate_cond(self, cond: Cond, batch_size: Optional[int] = None) -> None:
        """Raise ValueError naming what is missing or mis-shaped in ``cond``."""
        problems = []
        for name, trailing in self.cond_spec().items():
            v = cond.get(name)
            if not isinstance(v, torch.Tensor):
                problems.append(f"{name} is missing")
                continue
            shape = tuple(v.shape[1:])
            if len(shape) != len(trailing) or any(e is not None and e != s for e, s in zip(trailing, shape)):
                problems.append(f"{name} has trailing shape {shape}, expected {trailing}")
            if batch_size is not None and v.shape[0] != batch_size:
                problems.append(f"{name} has {v.shape[0]} rows, expected {batch_size}")
        if problems:
            hint = " (CFG is on: negative_* embeddings are needed)" if self.uses_cfg else ""
            raise ValueError(f"{type(self).__name__} conditioning: " + "; ".join(problems) + hint)

    def make_schedule(self, num_steps: Optional[int] = None, eta=0.0):
        n = int(num_steps or self.default_num_steps)
        schedule = self._make_schedule(n, eta)
        if self.sigma_grid == "scheduler":
            if getattr(schedule, "prediction_type", None) != "flow":
                raise ValueError(f"model.kwargs.sigma_grid: scheduler is for flow-matching families; "
                                 f"{type(self).__name__} already samples its scheduler's own timesteps (remove the key)")
            sigmas, shift = self.scheduler_sigmas(n)
            schedule = dataclasses.replace(schedule, sigmas=sigmas, shift=shift)
        return schedule

    def scheduler_sigmas(self, num_steps: int):
        """(sigmas (T + 1,) float64, static shift): ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps)`` of
        the folder's scheduler config (or, without one, of ``shift=self.shift``), as the family's pipeline calls it
        without explicit sigmas. ValueError for a scheduler with a dynamic (resolution-dependent) shift."""
        import diffusers

        cls = diffusers.FlowMatchEulerDiscreteScheduler
        path = self.root / "scheduler" / "scheduler_config.json" if self.root is not None else None
        if path is not None and path.is_file():
            sched = cls.from_pretrained(str(self.root), subfolder="scheduler", local_files_only=True)
        else:
            sched = cls(shift=float(getattr(self, "shift", 1.0)))
        if sched.config.get("use_dynamic_shifting", False):
            raise ValueError(f"model.kwargs.sigma_grid: scheduler: {path} shifts dynamically (mu from the image size), "
                             "which this grid does not follow; use sigma_grid: linspace")
        sched.set_timesteps(num_steps)
        return sched.sigmas.to(torch.float64).cpu(), float(sched.config.get("shift", 1.0))

    @abc.abstractmethod
    def _make_schedule(self, num_steps: int, eta):
        ...

    def initial_noise(self, num_samples, generator, device=None, cond=None):
        return rng.randn((num_samples,) + tuple(self.latent_shape(cond)), generator,
                         device=device if device is not None else self.device)

    def predict(self, latents, timestep_B, cond):
        self.validate_cond(cond, latents.shape[0])
        shared = {k: cond[k] for k in self.shared_keys}
        pos = {k: cond[k] for k in self.branch_keys}
        pos.update(shared)
        if not self.uses_cfg:
            return self._forward(latents, timestep_B, pos)
        if self.guidance_mode == "none":  # training forwards without guidance (grpo.train_guidance: none)
            return self._forward(latents, timestep_B, pos)
        neg = {k: cond[NEG + k] for k in self.branch_keys}
        neg.update(shared)
        both = _cat_branches(neg, pos)
        out = self._forward(torch.cat([latents, latents]), torch.cat([timestep_B, timestep_B]), both)
        uncond, c = out.float().chunk(2)
        if self.guidance_mode == "detach_uncond":
            uncond = uncond.detach()
        return self._combine_cfg(uncond, c)

    def lora_adapter_off(self):
        """The base model (LoRA layers switched off, diffusers' ``disable_adapters``) for the block; None without
        LoRA. The starting policy of a LoRA run, with no second copy of any weight (released Flow-GRPO and
        DiffusionNFT: ``disable_adapter()``)."""
        if not self.lora_rank:
            return None

        @contextlib.contextmanager
        def off():
            self.model.disable_adapters()
            try:
                yield
            finally:
                self.model.enable_adapters()

        return off()

    @contextlib.contextmanager
    def guidance(self, mode: str):
        """Within the block, ``predict`` guides as ``mode`` says (``grpo.train_guidance``; see the module
        docstring): the update driver wraps the training forwards in it. The rollout guides with both branches."""
        if mode not in TRAIN_GUIDANCE:
            raise ValueError(f"grpo.train_guidance must be one of {TRAIN_GUIDANCE}, got {mode!r}")
        prev, self.guidance_mode = self.guidance_mode, mode
        try:
            yield
        finally:
            self.guidance_mode = prev

    def _combine_cfg(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The guided output from the two branches' outputs: ``uncond + s * (cond - uncond)``; a family
        whose pipeline post-processes the combination (e.g. Qwen-Image's norm rescaling) overrides this."""
        return uncond + self.cfg_scale * (cond - uncond)

    # ------------------------------------------------------------------ export

    def state_dict_for_export(self) -> Dict[str, torch.Tensor]:
        """Plain diffusers state dict of the denoiser (LoRA merged into the base weights)."""
        if self.lora_rank:
            return lora_lib.merged_state_dict(self.model)
        return self.model.state_dict()

    def save_pretrained(self, path) -> Path:
        """Write the (merged) denoiser as a diffusers folder ``path/<model_subfolder>``; returns it."""
        out = Path(path) / self.model_subfolder
        if self.lora_rank:
            lora_lib.save_merged(self.model, out)
        else:
            self.model.save_pretrained(str(out))
        return out

    # ------------------------------------------------------------------ helpers for subclasses

    def _to_model(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Floating tensors to the model's dtype (masks and ints untouched)."""
        if x is None or not x.is_floating_point():
            return x
        return x.to(self.dtype)


def _cat_branches(neg: Cond, pos: Cond) -> Cond:
    """Concatenate [uncond; cond] per key. ``X_embeds`` of different lengths are zero-padded when a
    matching ``X_attention_mask`` exists (mask padded with 0); otherwise lengths must agree."""
    out = {}
    for k in pos:
        a, b = neg[k], pos[k]
        if a.shape[1:] != b.shape[1:]:
            mask_key = k.replace("_embeds", "_attention_mask")
            is_mask = k.endswith("_attention_mask")
            if not (is_mask or mask_key in pos) or a.ndim != b.ndim:
                raise ValueError(
                    f"negative_{k} has shape {tuple(a.shape[1:])} but {k} has {tuple(b.shape[1:])}; pad both to "
                    "one sequence length in data preparation"
                )
            n = max(a.shape[1], b.shape[1])
            a, b = _pad_dim1(a, n), _pad_dim1(b, n)
        out[k] = torch.cat([a, b])
    return out


def _pad_dim1(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[1] == n:
        return x
    pad = torch.zeros((x.shape[0], n - x.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], dim=1)
