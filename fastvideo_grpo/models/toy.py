"""The embedded default model: a tiny conditional rectified-flow DiT (no downloads).

It denoises either pixels (3 x S x S in [-1, 1], 8x8 patches) or, as the demo does, the latents of the
toy autoencoder (``toy_autoencoder.py``: a ``channels`` x 4 x 4 grid, one latent vector per layout cell,
patch size 1), as FLUX denoises a VAE latent; ``decode`` then runs the frozen decoder. The network
predicts the clean sample x_hat; the adapter turns it into the rectified-flow velocity the sampler needs,
u = (z_t - x_hat) / t (from z_t = (1 - t) x + t eps and u = eps - x), with t floored at ``min_sigma`` so
the conversion stays bounded. Prompt words are tokens of a fixed vocabulary (the toy task's grammar),
embedded by the model and attended to jointly with the patches (in-context conditioning); the timestep
enters through adaLN modulation. It sits behind the same ``PolicyAdapter`` protocol as the big models,
so the demo exercises the real rollout / trainer code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import rng
from ..sde import FlowSchedule
from ..toy.shapes import COLOURS, COUNT_WORDS, PLURAL, SHAPES
from .base import ADAPTERS, Cond, PolicyAdapter
from .toy_autoencoder import GRID, CellAutoencoder, CellAutoencoderConfig

VOCAB = ["<pad>", "a", "left", "of"] + list(COUNT_WORDS) + list(COLOURS) + list(SHAPES) + list(PLURAL.values())
MAX_TOKENS = 8


def tokenize(prompts: List[str]) -> torch.Tensor:
    """Word-level tokens of the toy grammar, padded to MAX_TOKENS: (B, MAX_TOKENS) int64."""
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for p in prompts:
        words = p.lower().split()
        unknown = [w for w in words if w not in index]
        if unknown or len(words) > MAX_TOKENS:
            raise ValueError(f"prompt {p!r} has words outside the toy vocabulary {unknown} or is too long")
        rows.append([index[w] for w in words] + [0] * (MAX_TOKENS - len(words)))
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class TinyDiTConfig:
    image_size: int = 32
    patch_size: int = 8
    hidden: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 3.0
    vocab_size: int = len(VOCAB)
    text_len: int = MAX_TOKENS
    channels: int = 3        # 3 = RGB pixels; a latent model (``toy_autoencoder``) has the autoencoder's channels
    pos_std: float = 0.02    # init std of the patch and word position embeddings (the demo uses 1.0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of timesteps in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, mask):
        s1, b1, g1, s2, b2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        B, N, D = h.shape
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + g1 * self.proj(a.transpose(1, 2).reshape(B, N, D))
        h = self.norm2(x) * (1 + s2) + b2
        return x + g2 * self.mlp(h)


class TinyDiT(nn.Module):
    """~0.6M-parameter DiT: patches + prompt tokens in one sequence, adaLN timestep conditioning."""

    def __init__(self, cfg: TinyDiTConfig):
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.hidden
        if cfg.image_size % p:
            raise ValueError("image_size must be a multiple of patch_size")
        self.num_patches = (cfg.image_size // p) ** 2
        self.patch_in = nn.Linear(cfg.channels * p * p, d)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, d) * cfg.pos_std)
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.text_len, d) * cfg.pos_std)
        self.t_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.patch_out = nn.Linear(d, cfg.channels * p * p)
        for m in (self.ada_out, self.patch_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.cfg.patch_size
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        h = torch.cat([self.patch_in(patches) + self.pos, self.tok(tokens) + self.tok_pos], dim=1)
        keep = torch.cat([torch.ones(B, self.num_patches, dtype=torch.bool, device=x.device), tokens != 0], dim=1)
        mask = keep[:, None, None, :]  # attend to patches and real (non-pad) words
        c = self.t_mlp(timestep_embedding(timestep, self.cfg.hidden))
        for blk in self.blocks:
            h = blk(h, c, mask)
        shift, scale = self.ada_out(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        out = self.patch_out(self.norm_out(h[:, : self.num_patches]) * (1 + scale) + shift)
        g = H // p
        return out.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def velocity_from_clean(x_hat: torch.Tensor, latents: torch.Tensor, timestep_B: torch.Tensor,
                        min_sigma: float = 0.02) -> torch.Tensor:
    """u = (z_t - x_hat) / t with t = timestep / 1000 floored at ``min_sigma``."""
    t = (timestep_B.float() / 1000.0).clamp(min=min_sigma).reshape(-1, *([1] * (latents.ndim - 1)))
    return (latents - x_hat) / t


class ToyAdapter(PolicyAdapter):
    prediction_type = "flow"

    def __init__(self, model: TinyDiT, shift: float = 1.0, min_sigma: float = 0.02, balance_grad: bool = False,
                 frozen: Sequence[str] = (), frozen_below: float = 0.0,
                 autoencoder: Optional[CellAutoencoder] = None):
        """``autoencoder``: the model denoises its latents and ``decode`` runs its frozen decoder (the toy's
        VAE); without it the model denoises pixels in [-1, 1].

        ``frozen``: names of the model's submodules kept at their current weights (``requires_grad``
        off), e.g. ``["patch_out", "ada_out"]``, the pixel decoder.

        ``frozen_below``: a model timestep in (0, 1000]; below it a frozen copy of the model as it is now
        denoises (a low-noise expert, as Wan 2.2's two experts), and only the high-noise steps run the
        trained weights. For the toy demo, which trains the first half of the steps (where the layout
        is decided): the last steps, which render the pixels and have no log-probs, otherwise run
        weights that GRPO moves with no reward signal for them, and paint a texture into every patch."""
        if frozen_below < 0:
            raise ValueError(f"toy model.kwargs.frozen_below is a timestep in [0, 1000] (0 = off), got {frozen_below}")
        self.frozen_below = float(frozen_below)
        self.low_noise_expert = None
        if self.frozen_below > 0:
            self.low_noise_expert = copy.deepcopy(model).requires_grad_(False).eval()
        if autoencoder is not None and (model.cfg.channels, model.cfg.image_size) != (autoencoder.cfg.channels, GRID):
            raise ValueError(f"a latent toy model must denoise the autoencoder's ({autoencoder.cfg.channels}, {GRID}, "
                             f"{GRID}) latents: its config has channels={model.cfg.channels}, image_size="
                             f"{model.cfg.image_size}")
        if autoencoder is None and model.cfg.channels != 3:
            raise ValueError(f"a toy model with {model.cfg.channels} channels denoises latents: give its autoencoder")
        self.autoencoder = autoencoder.requires_grad_(False).eval() if autoencoder is not None else None
        self.model = model
        self.shift = shift
        self.min_sigma = min_sigma
        self.balance_grad = balance_grad
        modules = dict(model.named_modules())
        unknown = [n for n in frozen if n not in modules or not n]
        if unknown:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"toy model.kwargs.frozen: {unknown} are not submodules of the toy DiT (e.g. {top})")
        for n in frozen:
            modules[n].requires_grad_(False)

    def trainable_module(self) -> nn.Module:
        return self.model

    def attention_shape(self):
        """(heads, head dim, attention layers), for the FLOP counts (models/tokens.py)."""
        c = self.model.cfg
        return c.heads, c.hidden // c.heads, c.depth

    def token_counts(self, cond=None):
        """(patches, prompt tokens) one sample puts through the attention (models/tokens.py)."""
        tokens = (cond or {}).get("tokens")
        return self.model.num_patches, int(tokens.shape[1]) if isinstance(tokens, torch.Tensor) else 0

    def make_schedule(self, num_steps: int, eta=0.0) -> FlowSchedule:
        return FlowSchedule.create(num_steps, eta=eta, shift=self.shift)

    def initial_noise(self, num_samples, generator, device=None, cond=None):
        s = self.model.cfg.image_size
        return rng.randn((num_samples, self.model.cfg.channels, s, s), generator, device=device or self.device)

    def predict(self, latents, timestep_B, cond: Cond):
        """Velocity (z - x_hat) / t. With ``balance_grad`` the value is unchanged but the gradient
        flows as if the network predicted the velocity directly (du/d(output) = -1 instead of -1/t).

        Departure for the toy only: with x-prediction, d mean / d x_hat grows like 1/t^2, so the last
        steps' log-probs would outweigh the early, layout-deciding steps by ~30x in every update; a
        velocity-predicting model (FLUX, HunyuanVideo) has uniform sensitivity across steps, which
        this restores. Sampled values and log-probs are exactly those of the plain conversion.
        Off by default: in 100-iteration demo runs it did not measurably change the held-out reward.
        """
        x_hat = self._denoise(latents, timestep_B, cond["tokens"])
        u = velocity_from_clean(x_hat, latents, timestep_B, self.min_sigma)
        if self.balance_grad and x_hat.requires_grad:
            u = u.detach() - (x_hat - x_hat.detach())
        return u

    def _denoise(self, latents, timestep_B, tokens):
        if self.low_noise_expert is None:
            return self.model(latents, timestep_B, tokens)
        low = (timestep_B.float() < self.frozen_below).to(latents.device)
        if bool(low.all()):
            return self.low_noise_expert(latents, timestep_B, tokens)
        if not bool(low.any()):
            return self.model(latents, timestep_B, tokens)
        both = self.model(latents, timestep_B, tokens), self.low_noise_expert(latents, timestep_B, tokens)
        return torch.where(low.view(-1, *([1] * (latents.ndim - 1))), both[1], both[0])

    def decode(self, latents):
        if self.autoencoder is not None:
            ae = self.autoencoder.to(latents.device)
            return ae.decode(latents.float())
        return ((latents.float().clamp(-1, 1) + 1) / 2).clamp(0, 1)

    def encode_prompts(self, prompts) -> Cond:
        return {"tokens": tokenize(list(prompts)).to(self.device)}


def save_toy_model(model: TinyDiT, path, autoencoder: Optional[CellAutoencoder] = None,
                   state_dict: Optional[dict] = None) -> None:
    """One file with the DiT (and the autoencoder of a latent model), written atomically. ``state_dict``: the
    weights to write instead of ``model.state_dict()`` (a sharded model's, gathered in full)."""
    from ..utils.io import atomic_torch_save

    blob = {"config": asdict(model.cfg), "state_dict": model.state_dict() if state_dict is None else state_dict}
    if autoencoder is not None:
        blob["autoencoder"] = {"config": asdict(autoencoder.cfg), "state_dict": autoencoder.state_dict()}
    atomic_torch_save(blob, path)


def _load_blob(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"toy checkpoint {path} not found (the demo pretrains one when it is missing)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_toy_model(path) -> TinyDiT:
    blob = _load_blob(path)
    model = TinyDiT(TinyDiTConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model


def load_toy_autoencoder(path) -> Optional[CellAutoencoder]:
    """The checkpoint's autoencoder (a latent model), or None (a pixel model)."""
    blob = _load_blob(path).get("autoencoder")
    if blob is None:
        return None
    ae = CellAutoencoder(CellAutoencoderConfig(**blob["config"]))
    ae.load_state_dict(blob["state_dict"])
    return ae.eval()


@ADAPTERS.register("toy", paths=("checkpoint",))
def build_toy(checkpoint: Optional[str] = None, shift: float = 1.0, device: str = "cpu",
              balance_grad: bool = False, frozen: Sequence[str] = (), frozen_below: float = 0.0,
              **model_cfg) -> ToyAdapter:
    if checkpoint:
        model, autoencoder = load_toy_model(checkpoint), load_toy_autoencoder(checkpoint)
    else:
        model, autoencoder = TinyDiT(TinyDiTConfig(**model_cfg)), None
    return ToyAdapter(model.to(device), shift=shift, balance_grad=balance_grad, frozen=frozen,
                      frozen_below=frozen_below, autoencoder=autoencoder)
