"""The toy model's autoencoder: images <-> a 4 x 4 grid of small latent vectors (the toy "VAE").

The toy task draws each object centred in one cell of a 4 x 4 grid (``toy/shapes.py``), so one latent
vector per cell is enough: a per-cell MLP encodes the cell's pixels to ``channels`` numbers and another
decodes them back. The toy DiT then denoises a (channels, 4, 4) latent instead of 3 x 32 x 32 pixels, as
FLUX or Stable Diffusion denoise a VAE latent: the stochastic sampler's noise (the policy's action space)
shrinks from 3072 to 48 numbers, almost all of which decide what is drawn where, and the decoder can only
draw what it learned from clean renders (no texture to paint into the background).

Latents are normalised per channel with the encoder's statistics on the training images (the SD / FLUX
``scaling_factor`` and ``shift_factor``), so the diffusion model sees zero-mean, unit-variance latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GRID = 4  # cells per side: the renderer's layout grid


@dataclass
class CellAutoencoderConfig:
    image_size: int = 32  # pixels per side; a multiple of GRID
    channels: int = 3     # latent numbers per cell
    hidden: int = 128     # width of the encoder's and decoder's hidden layer

    def __post_init__(self):
        if self.image_size % GRID or self.image_size < GRID:
            raise ValueError(f"autoencoder image_size {self.image_size} must be a positive multiple of the "
                             f"{GRID}-cell layout grid")
        if self.channels < 1 or self.hidden < 1:
            raise ValueError(f"autoencoder channels and hidden must be >= 1, got {self.channels}, {self.hidden}")

    @property
    def cell(self) -> int:
        return self.image_size // GRID


class CellAutoencoder(nn.Module):
    """Per-cell MLP encoder / decoder. ``encode``: images in [0, 1], (B, 3, S, S) -> normalised latents
    (B, channels, GRID, GRID); ``decode``: the inverse map back to images in [0, 1]."""

    def __init__(self, cfg: CellAutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        pixels = 3 * cfg.cell * cfg.cell
        self.encoder = nn.Sequential(nn.Linear(pixels, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.channels))
        self.decoder = nn.Sequential(nn.Linear(cfg.channels, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, pixels))
        self.register_buffer("latent_mean", torch.zeros(cfg.channels))
        self.register_buffer("latent_std", torch.ones(cfg.channels))

    def to_cells(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, GRID, GRID, 3 * cell * cell) in [-1, 1]."""
        B, C, H, W = images.shape
        if C != 3 or H != self.cfg.image_size or W != self.cfg.image_size:
            raise ValueError(f"the toy autoencoder takes (B, 3, {self.cfg.image_size}, {self.cfg.image_size}) "
                             f"images, got {tuple(images.shape)}")
        c = self.cfg.cell
        x = images * 2 - 1
        return x.reshape(B, 3, GRID, c, GRID, c).permute(0, 2, 4, 1, 3, 5).reshape(B, GRID, GRID, 3 * c * c)

    def from_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_cells``, clamped to [0, 1]."""
        B, c = cells.shape[0], self.cfg.cell
        x = cells.reshape(B, GRID, GRID, 3, c, c).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, GRID * c, GRID * c)
        return ((x + 1) / 2).clamp(0, 1)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised per-cell latents, (B, GRID, GRID, channels)."""
        return self.encoder(self.to_cells(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = (self.encode_raw(images) - self.latent_mean) / self.latent_std
        return z.permute(0, 3, 1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1:] != (self.cfg.channels, GRID, GRID):
            raise ValueError(f"the toy autoencoder decodes (B, {self.cfg.channels}, {GRID}, {GRID}) latents, "
                             f"got {tuple(latents.shape)}")
        z = latents.permute(0, 2, 3, 1).to(self.latent_std.dtype) * self.latent_std + self.latent_mean
        return self.from_cells(self.decoder(z))

    @torch.no_grad()
    def set_latent_statistics(self, images: torch.Tensor, batch_size: int = 1024) -> None:
        """Per-channel mean and std of the raw latents of ``images`` (the normalisation)."""
        raw = torch.cat([self.encode_raw(images[i:i + batch_size]).reshape(-1, self.cfg.channels)
                         for i in range(0, images.shape[0], batch_size)])
        self.latent_mean.copy_(raw.mean(0))
        self.latent_std.copy_(raw.std(0).clamp(min=1e-6))
