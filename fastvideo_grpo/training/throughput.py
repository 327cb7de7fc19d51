"""Throughput figures logged with every iteration: frames per GPU per second and model-FLOPs utilisation.

Counting (docs/performance.md, "Throughput metrics"), as verl-omni counts its diffusion MFU:

* dense: ``2 N S`` FLOPs per forward of one sample, ``6 N S`` per trained forward + backward, with N the
  denoiser's parameter count (LoRA layers included, frozen base weights too: they compute) and S the tokens one
  sample puts through the transformer (image / video tokens + text tokens, ``models/tokens.py``);
* attention: ``4 L H d S^2`` per forward (QK^T and PV over the joint sequence, 2 FLOPs per multiply-add),
  ``12 L H d S^2`` per forward + backward, with L attention layers of H heads of width d;
* the forwards and backwards are those the iteration ran (``passes/*``: rollout forwards and the update's
  no-grad forwards at ``2 N S``, trained forwards at ``6 N S``), times 2 with classifier-free guidance (two
  network passes per policy evaluation);
* not counted: the recomputation of activation checkpointing (this is MFU, not hardware FLOPs utilisation),
  the VAE decode, the rewards, the optimiser.

``6 N S`` is exact for a single-stream transformer; where a block keeps separate weights per stream (FLUX's and
HunyuanVideo's double blocks), or text enters by cross-attention (Wan), a token meets fewer than N weights and
the count is above the work done: the planner's op-by-op count of the same iteration is 1/1.50 of it for
``configs/flux_hps.yaml`` and 1/1.25 for ``configs/hunyuan_t2v_videoalign.yaml``; for Wan 2.1 1.3B
(``configs/wan_t2v.yaml``, where the planner also counts the cross-attention's text projections and the VAE)
it is 0.92 of the planner's. Use it to compare runs and trainers that count the same way;
``python -m fastvideo_grpo.cli.plan --json`` prints both (``throughput.verl_over_planner_flops``).

MFU = those FLOPs / (iteration seconds x peak FLOP/s x GPUs per sample). The peak is ``log.peak_tflops`` when set,
else the dense bf16 datasheet value of the GPU's name (``PEAK_TFLOPS``); on a CPU, or a GPU not in the table, a
nominal ``NOMINAL_TFLOPS`` (``throughput/peak_nominal`` = 1: the MFU is then not comparable to anything).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

#: dense bf16 tensor-core peak of one GPU, TFLOP/s (datasheets), matched by the longest name contained in the
#: device's name (so "H200" is not read as "H20")
PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "H200": 989.0, "H20": 148.0, "B200": 2250.0, "GB200": 2500.0,
               "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L20": 119.5, "A40": 149.7}
#: the stand-in peak on a CPU or an unknown GPU: a round number, not a measurement
NOMINAL_TFLOPS = 1.0


def peak_tflops(device, configured: float = 0.0) -> Tuple[float, bool]:
    """(peak TFLOP/s of one ``device``, whether it is the nominal stand-in). ``configured``: ``log.peak_tflops``."""
    if configured < 0:
        raise ValueError(f"log.peak_tflops must be >= 0 (0 = from the GPU's name), got {configured}")
    if configured > 0:
        return float(configured), False
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key], False
        warnings.warn(f"no peak FLOP/s known for the GPU {name!r}: throughput/mfu uses a nominal {NOMINAL_TFLOPS} "
                      "TFLOP/s; set log.peak_tflops to the card's dense bf16 peak", stacklevel=2)
    return NOMINAL_TFLOPS, True


@dataclass(frozen=True)
class ModelShape:
    """What the count needs of the denoiser: parameters, tokens per sample, attention shape, CFG branches."""

    params: int
    image_tokens: int
    text_tokens: int
    heads: int = 0
    head_dim: int = 0
    layers: int = 0
    branches: int = 1  # network passes per policy evaluation (2 with classifier-free guidance)

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens

    def forward_flops(self) -> Tuple[float, float]:
        """(dense, attention) FLOPs of one network forward of one sample."""
        S = self.tokens
        return 2.0 * self.params * S, 4.0 * self.layers * self.heads * self.head_dim * float(S) ** 2


def model_flops(shape: ModelShape, rollout_forwards: int, update_forwards: int, backwards: int) -> Dict[str, float]:
    """FLOPs of an iteration (module docstring) from its sample-passes (``passes/*``: a forward of a batch of B
    samples counts B) of rollout forwards, update forwards (trained ones included) and backwards. Returns the
    dense and attention parts and their total."""
    if min(rollout_forwards, update_forwards, backwards) < 0 or backwards > update_forwards:
        raise ValueError(f"pass counts must be >= 0 with backwards <= update forwards: {rollout_forwards}, "
                         f"{update_forwards}, {backwards}")
    dense, attn = shape.forward_flops()
    forward_only = rollout_forwards + update_forwards - backwards  # 1x a forward
    units = shape.branches * (forward_only + 3 * backwards)  # a trained forward + backward is 3x a forward
    out = {"dense": units * dense, "attention": units * attn}
    out["total"] = out["dense"] + out["attention"]
    return out


def model_shape(adapter, cond=None) -> Optional[ModelShape]:
    """The ``ModelShape`` of an adapter (and of one batch's conditioning, for the text length); None for an
    adapter that cannot say its tokens (neither ``latent_shape`` nor ``token_counts``: a hand-written test
    double), whose FLOPs are then not counted."""
    from ..models.tokens import attention_shape, token_counts

    if not any(callable(getattr(adapter, hook, None)) for hook in ("latent_shape", "token_counts")):
        return None

    params = sum(p.numel() for p in adapter.trainable_module().parameters())  # a DTensor counts its full size
    img, txt = token_counts(adapter, cond)
    heads, hd, layers = attention_shape(adapter)
    return ModelShape(params, img, txt, heads, hd, layers, 2 if getattr(adapter, "uses_cfg", False) else 1)


def frames_per_sample(pixels: Optional[torch.Tensor]) -> int:
    """Frames of one decoded sample: (B, F, 3, H, W) videos have F, (B, 3, H, W) images 1."""
    return int(pixels.shape[1]) if pixels is not None and pixels.ndim == 5 else 1


class ThroughputMeter:
    """The ``throughput/*`` metrics of one iteration. ``gpus_per_sample``: GPUs that share one sample's work
    (the sequence-parallel degree; the runner sets it), so the figures are per GPU."""

    def __init__(self, configured_peak_tflops: float = 0.0, gpus_per_sample: int = 1):
        peak_tflops(torch.device("cpu"), configured_peak_tflops)  # a negative value fails at start-up
        self.configured = float(configured_peak_tflops)
        self.gpus_per_sample = int(gpus_per_sample)
        self._peak: Optional[Tuple[float, bool]] = None
        self._shape: Optional[ModelShape] = None

    def metrics(self, adapter, cond, seconds: float, samples: int, frames: int, passes: Dict[str, int]
                ) -> Dict[str, float]:
        if self._peak is None:
            self._peak = peak_tflops(adapter.device, self.configured)
        shape = model_shape(adapter, cond)
        self._shape = shape
        gpu_s = max(seconds, 1e-12) * self.gpus_per_sample
        if shape is None:  # FLOPs unknown: frames only
            return {"throughput/frames_per_gpu_s": samples * frames / gpu_s}
        flops = model_flops(shape, passes["passes/forward_rollout"], passes["passes/forward_update"],
                            passes["passes/backward"])["total"]
        peak, nominal = self._peak
        achieved = flops / gpu_s / 1e12
        return {"throughput/frames_per_gpu_s": samples * frames / gpu_s,
                "throughput/model_tflops_per_gpu_s": achieved, "throughput/mfu": achieved / peak,
                "throughput/peak_tflops": peak, "throughput/peak_nominal": int(nominal)}


def summarise(history) -> Dict[str, float]:
    """The run summary's throughput: the mean of each ``throughput/*`` metric over the iterations run, the first
    left out when there are more (it holds one-time work: kernel selection, allocator growth, compilation)."""
    rows = [m for m in history if "throughput/frames_per_gpu_s" in m]
    rows = rows[1:] if len(rows) > 1 else rows
    keys = sorted({k for m in rows for k in m if k.startswith("throughput/")})
    out = {k.split("/", 1)[1]: sum(float(m[k]) for m in rows) / len(rows) for k in keys}
    if rows:
        out["iterations_averaged"] = len(rows)
    return out
