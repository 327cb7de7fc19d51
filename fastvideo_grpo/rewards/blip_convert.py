"""ImageReward's released checkpoint (BLIP layout) -> transformers' BLIP classes, key by key.

The released ``ImageReward.pt`` (huggingface.co/THUDM/ImageReward) is the state dict of a BLIP
ViT-L/16 image encoder (timm-style blocks), a BERT-base text encoder whose layers cross-attend to
the image tokens (BLIP's ``med.py``), and a 5-layer MLP on the text encoder's first token. The
image tower maps onto ``BlipVisionModel`` and the text tower onto ``BlipTextModel`` (built with
``is_decoder=True`` in its config, which is what creates the cross-attention layers, and called
with ``is_decoder=False``, i.e. bidirectional self-attention as in BLIP's encoder):

===============================================  ==================================================
released key                                     transformers key
===============================================  ==================================================
blip.visual_encoder.cls_token      (1, 1, D)     vision.embeddings.class_embedding
blip.visual_encoder.pos_embed      (1, N+1, D)   vision.embeddings.position_embedding
blip.visual_encoder.patch_embed.proj.*           vision.embeddings.patch_embedding.*
blip.visual_encoder.blocks.N.norm1.*             vision.encoder.layers.N.layer_norm1.*
blip.visual_encoder.blocks.N.attn.qkv.*          vision.encoder.layers.N.self_attn.qkv.* (same fused order)
blip.visual_encoder.blocks.N.attn.proj.*         vision.encoder.layers.N.self_attn.projection.*
blip.visual_encoder.blocks.N.norm2.*             vision.encoder.layers.N.layer_norm2.*
blip.visual_encoder.blocks.N.mlp.fc{1,2}.*       vision.encoder.layers.N.mlp.fc{1,2}.*
blip.visual_encoder.norm.*                       vision.post_layernorm.*
blip.text_encoder.<rest>                         text.<rest> (BLIP's med.py names: embeddings.{word,
                                                 position}_embeddings, embeddings.LayerNorm,
                                                 encoder.layer.N.{attention, crossattention}.{self.
                                                 {query,key,value}, output.{dense,LayerNorm}},
                                                 encoder.layer.N.{intermediate,output}.dense, ...)
mlp.layers.{0,2,4,6,7}.*                         head.layers.{0,2,4,6,7}.* (no activations between)
===============================================  ==================================================

Dropped: ``*.position_ids`` buffers and the BLIP parts ImageReward never runs (``blip.vision_proj``,
``blip.text_proj`` and any other ``blip.*`` outside the two encoders); any other key is an error.
Sizes are read from the tensors; head counts are not in the shapes: ``vision_head_width`` and
``text_head_width`` (64 for ViT-L and BERT-base) give them. The ViT uses LayerNorm eps 1e-6 and
exact GELU, BERT eps 1e-12. The reward is ``(head(text[:, 0]) - mean) / std`` with the released
constants below.
"""

from __future__ import annotations

import math
import re
from typing import Dict

import torch
from torch import nn

RELEASED_MEAN = 0.16717362830052426
RELEASED_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35  # the released scoring pads/truncates prompts to 35 BERT tokens

_VIS = "blip.visual_encoder."
_TXT = "blip.text_encoder."
_VIS_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_VIS_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_TEXT_KEY = re.compile(r"^(embeddings\.(word_embeddings|position_embeddings|LayerNorm)\.(weight|bias)"
                       r"|encoder\.layer\.\d+\.(attention|crossattention)\."
                       r"(self\.(query|key|value)|output\.(dense|LayerNorm))"
                       r"\.(weight|bias)"
                       r"|encoder\.layer\.\d+\.(intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias))$")
_HEAD = re.compile(r"^mlp\.layers\.(0|2|4|6|7)\.(weight|bias)$")


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def imagereward_to_hf_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the released state dict to :class:`ImageRewardModel` keys (see the module docstring)."""
    out = {}
    for k, v in _strip(sd).items():
        if k.endswith("position_ids"):
            continue
        if k.startswith(_VIS):
            rest = k[len(_VIS):]
            if rest in _VIS_TOP:
                out["vision." + _VIS_TOP[rest]] = v
                continue
            m = _BLOCK.match(rest)
            if not m or m.group(2) not in _VIS_BLOCK:
                raise ValueError(f"unknown ImageReward image-encoder key {k!r}: not a BLIP ViT checkpoint?")
            out[f"vision.encoder.layers.{m.group(1)}.{_VIS_BLOCK[m.group(2)]}.{m.group(3)}"] = v
        elif k.startswith(_TXT):
            rest = k[len(_TXT):]
            if not _TEXT_KEY.match(rest):
                raise ValueError(f"unknown ImageReward text-encoder key {k!r}: not BLIP's BERT with cross-attention?")
            out["text." + rest] = v
        elif _HEAD.match(k):
            out["head." + k[len("mlp."):]] = v
        elif k.startswith("blip."):
            continue  # vision_proj / text_proj / ITM parts: ImageReward's score does not use them
        else:
            raise ValueError(f"unknown ImageReward key {k!r}: expected blip.visual_encoder.*, blip.text_encoder.* "
                             "and mlp.layers.*")
    return out


def _n_layers(sd, pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    if not idx:
        raise ValueError(f"ImageReward checkpoint has no layers matching {pattern!r}")
    return max(idx) + 1


def imagereward_configs(sd: Dict[str, torch.Tensor], vision_head_width: int = 64, text_head_width: int = 64):
    """(BlipVisionConfig, BlipTextConfig, head input width) for a released-layout state dict."""
    from transformers import BlipTextConfig, BlipVisionConfig

    sd = _strip(sd)
    try:
        vw = sd[_VIS + "cls_token"].shape[-1]
        patch = sd[_VIS + "patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(sd[_VIS + "pos_embed"].shape[1] - 1)
        vocab, tw = sd[_TXT + "embeddings.word_embeddings.weight"].shape
        max_pos = sd[_TXT + "embeddings.position_embeddings.weight"].shape[0]
        enc_width = sd[_TXT + "encoder.layer.0.crossattention.self.key.weight"].shape[1]
        v_inter = sd[_VIS + "blocks.0.mlp.fc1.weight"].shape[0]
        t_inter = sd[_TXT + "encoder.layer.0.intermediate.dense.weight"].shape[0]
        head_in = sd["mlp.layers.0.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not an ImageReward checkpoint: it lacks {e.args[0]!r}") from None
    if vw % vision_head_width or tw % text_head_width:
        raise ValueError(f"head widths {vision_head_width}/{text_head_width} do not divide the widths {vw}/{tw}")
    vision = BlipVisionConfig(hidden_size=vw, intermediate_size=v_inter,
                              num_hidden_layers=_n_layers(sd, r"^blip\.visual_encoder\.blocks\.(\d+)\."),
                              num_attention_heads=vw // vision_head_width, image_size=grid * patch, patch_size=patch,
                              hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    text = BlipTextConfig(vocab_size=vocab, hidden_size=tw, encoder_hidden_size=enc_width, intermediate_size=t_inter,
                          num_hidden_layers=_n_layers(sd, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\."),
                          num_attention_heads=tw // text_head_width, max_position_embeddings=max_pos,
                          hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True, pad_token_id=0)
    return vision, text, head_in


class ImageRewardModel(nn.Module):
    """ImageReward on transformers' BLIP towers: ``vision`` (BlipVisionModel), ``text`` (BlipTextModel
    with cross-attention, no pooler), ``head`` (the MLP), and the released normalisation."""

    def __init__(self, vision_config, text_config, head_in: int, mean: float = RELEASED_MEAN,
                 std: float = RELEASED_STD):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        from .aesthetic import AestheticHead  # the same 5-Linear MLP, same key names

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(head_in)
        self.mean, self.std = float(mean), float(std)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised reward (B,) for (already pre-processed) images and tokenised prompts."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, is_decoder=False)
        raw = self.head(out.last_hidden_state[:, 0].float())
        return (raw - self.mean) / self.std


def load_imagereward_checkpoint(checkpoint, vision_head_width: int = 64, text_head_width: int = 64,
                                mean: float = RELEASED_MEAN, std: float = RELEASED_STD) -> ImageRewardModel:
    """The released checkpoint (a path or a state dict) -> :class:`ImageRewardModel` (eval, fp32).
    Every parameter of the model must be filled by the checkpoint (ValueError naming what is not)."""
    if not isinstance(checkpoint, dict):
        from ._clip_utils import require_file

        path = require_file(str(checkpoint), "ImageReward checkpoint",
                            "Get ImageReward.pt from huggingface.co/THUDM/ImageReward.")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    sd = _strip(checkpoint)
    vision, text, head_in = imagereward_configs(sd, vision_head_width, text_head_width)
    model = ImageRewardModel(vision, text, head_in, mean=mean, std=std)
    missing, unexpected = model.load_state_dict(imagereward_to_hf_state_dict(sd), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"ImageReward checkpoint does not fit the BLIP architecture: missing {missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    return model.eval().requires_grad_(False)


def hf_to_imagereward_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse mapping (an :class:`ImageRewardModel` state dict in the released layout)."""
    inv_top = {v: k for k, v in _VIS_TOP.items()}
    inv_block = {v: k for k, v in _VIS_BLOCK.items()}
    layer = re.compile(r"^vision\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k.startswith("vision."):
            rest = k[len("vision."):]
            if rest in inv_top:
                out[_VIS + inv_top[rest]] = v
            elif (m := layer.match(k)):
                out[f"{_VIS}blocks.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"] = v
            else:
                raise ValueError(f"unexpected ImageRewardModel key {k!r}")
        elif k.startswith("text."):
            out[_TXT + k[len("text."):]] = v
        elif k.startswith("head."):
            out["mlp." + k[len("head."):]] = v
        else:
            raise ValueError(f"unexpected ImageRewardModel key {k!r}")
    return out

