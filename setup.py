"""Packaging for fastvideo-grpo.

``pip install -e .`` builds the optional C++ (and, with a CUDA torch and nvcc, CUDA) extension
``fastvideo_grpo._C`` from csrc/ when those sources exist. Set ``FVG_SKIP_CUDA_BUILD=1`` to skip
the CUDA part and ``FVG_SKIP_EXT_BUILD=1`` to skip every compiled part (pure-Python install; the
kernels then fall back to their PyTorch reference). Install with ``--no-build-isolation`` so the
build sees the torch already installed instead of pulling a new one.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _truthy(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def extension_modules():
    """The compiled kernels, or nothing when skipped or when the sources are absent."""
    if _truthy("FVG_SKIP_EXT_BUILD"):
        return [], {}
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not cpu_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # torch missing at build time: install pure-Python
        return [], {}
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    want_cuda = (
        cuda_sources
        and not _truthy("FVG_SKIP_CUDA_BUILD")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    cxx = ["-O3", "-std=c++17"]
    if want_cuda:
        ext = CUDAExtension(
            "fastvideo_grpo._C",
            cpu_sources + cuda_sources,
            define_macros=[("FVG_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
        )
    else:
        ext = CppExtension("fastvideo_grpo._C", cpu_sources, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fastvideo-grpo",
    version="0.1.0",
    description="GRPO (DanceGRPO) trainer for diffusion and rectified-flow image and video generators",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastvideo_grpo", "fastvideo_grpo.*"]),
    # torch is deliberately a range that the CPU wheel (2.13.0) satisfies: install torch first.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "diffusers>=0.32",
        "transformers>=4.46",
        "safetensors",
        "tqdm",
        "pyyaml",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "peft"],
        "lora": ["peft"],
        "logging": ["tensorboard"],
        # parallel.attention_backend: flash (FlashAttention 2 through diffusers' attention dispatcher)
        "gpu": ["flash-attn"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
