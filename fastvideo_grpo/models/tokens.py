"""What one sample puts through a denoiser's attention: tokens and attention shape, read from the adapter.

The planner (cli/plan.py) and the throughput metrics (training/throughput.py) count FLOPs from these, so both
count the same way. No model-name branches: an adapter whose model does not use diffusers' config names
declares hooks -- ``attention_shape()`` (heads, head dim, attention layers), ``token_counts(cond)`` (image and
text tokens per sample), ``packed_patch_size`` (latent patches packed into tokens before the transformer),
``extra_image_tokens`` (e.g. an edit model's reference image), ``attention_tokens`` (the self-attention tokens of
a latent that is not an image or video grid, e.g. the packed tokens of two streams).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def attention_shape(adapter) -> Tuple[int, int, int]:
    """(heads, head dim, attention layers) of the full model: the adapter's ``attention_shape()`` when it has one
    (a family whose config names them otherwise), else diffusers' usual config names; 0s when unknown."""
    hook = getattr(adapter, "attention_shape", None)
    if callable(hook):
        return tuple(int(v) for v in hook())
    c = getattr(adapter.model, "config", None)
    heads = getattr(c, "num_attention_heads", 0)
    hd = getattr(c, "attention_head_dim", 0)
    layers = sum(int(getattr(c, k, 0) or 0) for k in ("num_layers", "num_single_layers"))
    return (heads if isinstance(heads, int) else 0), (hd if isinstance(hd, int) else 0), layers


def image_tokens(adapter) -> int:
    """Image / video tokens of one sample: the latent cut into the transformer's patches (FLUX packs 2 x 2 over
    a patch-1 transformer: ``packed_patch_size``), plus ``extra_image_tokens``. An adapter whose latent is not an
    image or video grid declares its count of self-attention tokens, ``attention_tokens``."""
    declared = getattr(adapter, "attention_tokens", None)
    if declared is not None:
        return int(declared) + int(getattr(adapter, "extra_image_tokens", 0))
    shape = adapter.latent_shape()
    c = adapter.model.config
    p = getattr(c, "patch_size", 1)
    ps = p if isinstance(p, int) else int(p[-1])
    pt = int(getattr(c, "patch_size_t", 1) or 1) if isinstance(p, int) else int(p[0])
    if len(shape) == 4:  # video (C, F, h, w)
        img = (shape[1] // pt) * (shape[2] // ps) * (shape[3] // ps)
    else:  # image (C, h, w)
        pack = int(getattr(adapter, "packed_patch_size", 0) or ps)
        img = (shape[1] // pack) * (shape[2] // pack)
    return img + int(getattr(adapter, "extra_image_tokens", 0))


def text_tokens(adapter, cond) -> int:
    """Text tokens of one sample in ``cond`` (the batch's conditioning): the longest variable-length dimension
    among the per-branch entries the adapter's ``cond_spec()`` declares (prompt embeddings; their masks have
    the same length), 0 when it declares none."""
    spec = getattr(adapter, "cond_spec", None)
    if not callable(spec):
        return 0
    n = 0
    for key, trailing in spec().items():
        v = cond.get(key) if cond is not None else None
        if None in trailing and isinstance(v, torch.Tensor):
            n = max(n, int(v.shape[1 + list(trailing).index(None)]))
    return n


def token_counts(adapter, cond=None) -> Tuple[int, int]:
    """(image tokens, text tokens) of one sample: the adapter's ``token_counts(cond)`` when it has one, else
    ``image_tokens`` and ``text_tokens``."""
    hook = getattr(adapter, "token_counts", None)
    if callable(hook):
        img, txt = hook(cond)
        return int(img), int(txt)
    return image_tokens(adapter), text_tokens(adapter, cond)


def attention_tokens(adapter, cond=None) -> Optional[int]:
    """Tokens one sample puts through the joint attention: image + text."""
    img, txt = token_counts(adapter, cond)
    return img + txt
