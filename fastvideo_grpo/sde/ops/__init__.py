"""Fused numerical kernels (compiled in ``fastvideo_grpo._C`` when built, PyTorch reference otherwise)."""

from .fused import (
    CoefficientTable,
    cps_coefficients,
    ddim_coefficient_table,
    ddim_coefficients,
    extension_available,
    flow_coefficient_table,
    flow_coefficients,
    fused_sde_step,
    kernel_supports,
    sde_step_at,
)
from .reference import reference_sde_step

__all__ = [
    "fused_sde_step",
    "sde_step_at",
    "flow_coefficients",
    "cps_coefficients",
    "ddim_coefficients",
    "flow_coefficient_table",
    "ddim_coefficient_table",
    "CoefficientTable",
    "extension_available",
    "kernel_supports",
    "reference_sde_step",
]
