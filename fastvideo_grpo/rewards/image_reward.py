"""ImageReward (v1.0): a BLIP reward model; the prompt's BERT encoding cross-attends to the image's
ViT-L tokens and an MLP on the first token gives the score, normalised with the released mean/std.

Registry name ``image_reward``. The released checkpoint runs on transformers' BLIP classes after a
key mapping (table and model in blip_convert.py); the ImageReward package (and its timm /
torchvision / fairscale dependencies) is not needed.

Input contract: floats in [0, 1], (B, 3, H, W) images or (B, F, 3, H, W) videos (every frame is
scored against the video's prompt and the scores are averaged), any resolution: the shortest side
is resized to the model's 224 pixels (bicubic, antialiased), center-cropped and normalised with the
CLIP mean/std, as the released ``Resize(224, BICUBIC) + CenterCrop(224)`` transform. Prompts are
lower-cased, padded and truncated to 35 BERT tokens as in the released scoring. Scores are roughly
standard-normal over the model's training set (about -2 to 2).
"""

from __future__ import annotations

import torch

from .base import REWARDS, check_scores, validate_reward_inputs
from .blip_convert import RELEASED_MEAN, RELEASED_STD, TEXT_MAX_LENGTH

HINT = ("Get ImageReward.pt from huggingface.co/THUDM/ImageReward and the bert-base-uncased tokenizer files "
        "(vocab.txt or tokenizer.json, from huggingface.co/google-bert/bert-base-uncased) into a folder; pass "
        "checkpoint=<ImageReward.pt> and tokenizer_path=<folder>.")


@REWARDS.register("image_reward", paths=("checkpoint", "tokenizer_path"))
def image_reward(checkpoint=None, tokenizer_path=None, device=None, dtype="float32", batch_size=16,
                 vision_head_width=64, text_head_width=64, mean=RELEASED_MEAN, std=RELEASED_STD):
    """``checkpoint``: the released ImageReward.pt; ``tokenizer_path``: a bert-base-uncased tokenizer folder."""
    from transformers import AutoTokenizer

    from ._clip_utils import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess, require_files, resolve_device,
                              resolve_dtype, to_frames)
    from .blip_convert import load_imagereward_checkpoint

    if checkpoint is None:
        raise FileNotFoundError(f"image_reward: no checkpoint given. {HINT}")
    if int(batch_size) < 1:
        raise ValueError(f"image_reward: batch_size must be >= 1, got {batch_size}")
    if not float(std) > 0:
        raise ValueError(f"image_reward: std must be > 0, got {std}")
    tp = require_files(tokenizer_path, [["vocab.txt", "tokenizer.json"]], "image_reward tokenizer", HINT)
    tokenizer = AutoTokenizer.from_pretrained(tp, local_files_only=True)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    model = load_imagereward_checkpoint(checkpoint, vision_head_width, text_head_width, mean=mean, std=std)
    model = model.to(dt).to(dev)
    model.head.float()  # the MLP runs in float32 on float32 features, as the released code
    size, bs = model.image_size, int(batch_size)

    @torch.no_grad()
    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        frames, nf = to_frames(images)
        tok = tokenizer([p for p in prompts for _ in range(nf)], padding="max_length", truncation=True,
                        max_length=TEXT_MAX_LENGTH, return_tensors="pt")
        out = []
        for i in range(0, frames.shape[0], bs):
            px = preprocess(frames[i:i + bs].to(dev), size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(dt)
            out.append(model(px, tok["input_ids"][i:i + bs].to(dev),
                             tok["attention_mask"][i:i + bs].to(dev)).float().cpu())
        scores = check_scores("image_reward", torch.cat(out).view(-1, nf).mean(-1), images.shape[0])
        return scores, {"image_reward_mean": float(scores.mean())}

    fn.model, fn.tokenizer, fn.modules, fn.device = model, tokenizer, [model], dev
    return fn
