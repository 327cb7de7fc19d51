"""Fused numerical kernels (compiled in ``fastvideo_grpo._C`` when built, PyTorch reference otherwise)."""

from .fused import ddim_coefficients, extension_available, flow_coefficients, fused_sde_step, kernel_supports
from .reference import reference_sde_step

__all__ = [
    "fused_sde_step",
    "flow_coefficients",
    "ddim_coefficients",
    "extension_available",
    "kernel_supports",
    "reference_sde_step",
]
