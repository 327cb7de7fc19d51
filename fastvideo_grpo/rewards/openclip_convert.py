"""OpenCLIP (ViT) <-> transformers CLIPModel conversion, used by the HPS-v2.1 reward (see hps.py
for the key table). CLI::

    python -m fastvideo_grpo.rewards.openclip_convert --checkpoint HPS_v2.1_compressed.pt \
        --tokenizer <folder with CLIP tokenizer files> --out ckpts/hps_v2.1_hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Dict, Optional

import torch

HINT = ("Get HPS_v2.1_compressed.pt from huggingface.co/xswu/HPSv2 and a CLIP tokenizer (tokenizer.json or "
        "vocab.json+merges.txt, e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K); convert with "
        "`python -m fastvideo_grpo.rewards.openclip_convert --checkpoint HPS_v2.1_compressed.pt --tokenizer <dir> "
        "--out <dir>` and pass model_path=<out dir>, or pass checkpoint= and tokenizer_path= directly.")

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RES = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def _strip(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def openclip_to_hf_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map an OpenCLIP (ViT) state dict to transformers CLIPModel keys (see the module docstring)."""
    sd = _strip(sd)
    out = {}
    for k, v in sd.items():
        if k.endswith("attn_mask"):
            continue
        if k in _TOP:
            out[_TOP[k]] = v
        elif k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()
        elif (m := _RES.match(k)):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                mod, _, param = rest.rpartition(".")
                if mod not in _BLOCK:
                    raise ValueError(f"unknown OpenCLIP key {k!r}: only ViT CLIP towers are supported")
                out[f"{prefix}{_BLOCK[mod]}.{param}"] = v
        else:
            raise ValueError(f"unknown OpenCLIP key {k!r}: only ViT CLIP towers are supported")
    return out


def hf_to_openclip_state_dict(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`openclip_to_hf_state_dict` (used to test the mapping)."""
    inv_top = {v: k for k, v in _TOP.items()}
    inv_tr = {v: k for k, v in _TRANSPOSED.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    layer = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
    out, qkv = {}, {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k in inv_top:
            out[inv_top[k]] = v
        elif k in inv_tr:
            out[inv_tr[k]] = v.t().contiguous()
        elif (m := layer.match(k)):
            prefix = ("visual." if m.group(1) == "vision_model" else "") + f"transformer.resblocks.{m.group(2)}."
            mod, _, param = m.group(3).rpartition(".")
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, param), {})[mod[10]] = v
            else:
                out[prefix + inv_block[mod] + "." + param] = v
        else:
            raise ValueError(f"unexpected transformers CLIP key {k!r}")
    for (prefix, param), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openclip_config(sd: Dict[str, torch.Tensor], vision_head_width: int = 80, text_head_width: int = 64,
                    hidden_act: str = "gelu", layer_norm_eps: float = 1e-5):
    """A transformers CLIPConfig for an OpenCLIP ViT state dict; sizes are read from the tensors.

    Head counts cannot be read from shapes: ``vision_head_width`` (80 for ViT-H-14, 64 for B/L) and
    ``text_head_width`` (64) give them. ``hidden_act``: "gelu" for OpenCLIP-trained models
    (ViT-H-14, HPS), "quick_gelu" for OpenAI-trained ones.
    """
    from transformers import CLIPConfig

    sd = _strip(sd)

    def n_layers(prefix):
        idx = {int(m.group(2)) for k in sd if (m := _RES.match(k)) and bool(m.group(1)) == (prefix == "visual.")}
        return max(idx) + 1

    vw, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    vocab, tw = sd["token_embedding.weight"].shape
    vision = dict(hidden_size=vw, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=n_layers("visual."), num_attention_heads=vw // vision_head_width,
                  image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, layer_norm_eps=layer_norm_eps)
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=n_layers(""), num_attention_heads=tw // text_head_width,
                max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=hidden_act,
                layer_norm_eps=layer_norm_eps, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["visual.proj"].shape[1])


def load_openclip_checkpoint(checkpoint, **arch):
    """An OpenCLIP ViT checkpoint (path or state dict) -> a transformers CLIPModel (eval, fp32)."""
    from transformers import CLIPModel

    if isinstance(checkpoint, (str, os.PathLike)):
        from ._clip_utils import require_file

        path = require_file(str(checkpoint), "OpenCLIP checkpoint", HINT)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        sd = checkpoint
    sd = _strip(sd)
    model = CLIPModel(openclip_config(sd, **arch))
    mapped = openclip_to_hf_state_dict(sd)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"OpenCLIP checkpoint does not fit the CLIP architecture: missing {missing[:8]}, "
                         f"unexpected {list(unexpected)[:8]}")
    return model.eval()


def convert_openclip_checkpoint(checkpoint, out_dir: str, tokenizer_path: Optional[str] = None, **arch) -> str:
    """Write a transformers CLIPModel folder (config.json, model.safetensors, preprocessor_config.json,
    tokenizer files when ``tokenizer_path`` is given) from an OpenCLIP checkpoint."""
    from ._clip_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = load_openclip_checkpoint(checkpoint, **arch)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    size = model.config.vision_config.image_size
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": size},
                   "crop_size": {"height": size, "width": size}, "do_center_crop": True, "resample": 3,
                   "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}, f, indent=2)
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True).save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert an OpenCLIP ViT checkpoint (e.g. HPS v2.1) to a transformers CLIP folder")
    p.add_argument("--checkpoint", required=True, help="OpenCLIP .pt/.bin/.safetensors (e.g. HPS_v2.1_compressed.pt)")
    p.add_argument("--tokenizer", default=None, help="folder with CLIP tokenizer files to copy into --out")
    p.add_argument("--out", required=True)
    p.add_argument("--vision-head-width", type=int, default=80)
    p.add_argument("--text-head-width", type=int, default=64)
    p.add_argument("--hidden-act", default="gelu", choices=["gelu", "quick_gelu"])
    a = p.parse_args(argv)
    out = convert_openclip_checkpoint(a.checkpoint, a.out, a.tokenizer, vision_head_width=a.vision_head_width,
                                      text_head_width=a.text_head_width, hidden_act=a.hidden_act)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
