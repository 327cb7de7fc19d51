"""fastvideo-grpo: GRPO (DanceGRPO) alignment of diffusion and rectified-flow image/video generators."""

__version__ = "0.1.0"
