"""LAION aesthetic predictor (v2): an MLP head on L2-normalised CLIP ViT-L/14 image embeddings.

Registry name ``aesthetic``; prompts are ignored (but still validated). The head is the
``sac+logos+ava1-l14-linearMSE.pth`` file of github.com/christophschuhmann/improved-aesthetic-predictor
(keys ``layers.{0,2,4,6,7}.{weight,bias}``: Linear(768,1024) - Linear(1024,128) - Linear(128,64) -
Linear(64,16) - Linear(16,1), dropout between the first four); a ``.safetensors`` with the same keys
also works. The CLIP model is ``openai/clip-vit-large-patch14`` (a transformers folder). Scores are
roughly on a 1-10 scale. The head's input width is read from the file, so other CLIP sizes work.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import REWARDS, check_scores, validate_reward_inputs

HINT = ("Put `openai/clip-vit-large-patch14` (config.json, model.safetensors) in model_path and the "
        "head file sac+logos+ava1-l14-linearMSE.pth (improved-aesthetic-predictor) at head_path.")


class AestheticHead(nn.Module):
    """The LAION MLP; module names match the released state dict."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x).squeeze(-1)


def load_head(path: str) -> AestheticHead:
    from ._clip_utils import require_file

    path = require_file(path, "aesthetic head", HINT)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    if "layers.0.weight" not in sd:
        raise ValueError(f"aesthetic head {path!r} has no 'layers.0.weight'; keys: {sorted(sd)[:10]}")
    head = AestheticHead(sd["layers.0.weight"].shape[1])
    head.load_state_dict(sd)
    return head.eval().requires_grad_(False)


@REWARDS.register("aesthetic", paths=("model_path", "head_path"))
def aesthetic(model_path=None, head_path=None, device=None, dtype="float32", batch_size=32):
    from ._clip_utils import ClipScorer, to_frames

    head = load_head(head_path)
    scorer = ClipScorer(model_path, "aesthetic", HINT, device=device, dtype=dtype, batch_size=batch_size,
                        need_text=False)
    head.to(scorer.device)
    proj_dim = scorer.model.config.projection_dim
    if head.layers[0].in_features != proj_dim:
        raise ValueError(f"aesthetic head expects {head.layers[0].in_features}-d embeddings but the CLIP model "
                         f"in {model_path!r} gives {proj_dim}-d; use the CLIP the head was trained on")

    @torch.no_grad()
    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        frames, nf = to_frames(images)
        s = head(scorer.image_features(frames)).view(-1, nf).mean(-1).cpu()
        s = check_scores("aesthetic", s, images.shape[0])
        return s, {"aesthetic_mean": float(s.mean())}

    fn.scorer, fn.head = scorer, head
    fn.modules, fn.device = [scorer.model, head], scorer.device
    return fn
