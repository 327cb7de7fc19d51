"""Qwen-Image-Edit's prompt encoding: the instruction and the reference image through Qwen2.5-VL together.

As QwenImageEditPipeline._get_qwen_prompt_embeds: the instruction goes inside the edit chat template,
whose user turn starts with the image placeholder ``<|vision_start|><|image_pad|><|vision_end|>``; the
reference image (already resized to the size it is VAE-encoded at) goes through the Qwen2-VL image
processor (patches + ``image_grid_thw``) and the placeholder is expanded to one ``<|image_pad|>`` per
merged patch (grid t * h * w / merge_size^2), as Qwen2VLProcessor does; Qwen2.5-VL's last hidden state
is taken over each sequence's valid tokens and the template's first 64 tokens (the system turn, up to
the user turn's image) are dropped, so the embedding holds the image's vision tokens then the
instruction's. Nothing is truncated (the pipeline does not truncate either): a sequence longer than
``max_length`` is an error naming the length needed; shorter ones are zero-padded with a mask.

The processor's own class is not used: in transformers 5 Qwen2VLProcessor cannot be built without a
video processor, which needs torchvision; the tokenizer and image processor it wraps are used directly
(tests compare against the real Qwen2VLProcessor inside the diffusers pipeline).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

QWEN_IMAGE_EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWEN_IMAGE_EDIT_CROP_START = 64  # diffusers' prompt_template_encode_start_idx for the template above
QWEN_IMAGE_EDIT_MAX_LENGTH = 2048  # stored length: ~1370 vision tokens of a 1024 x 1024 reference + the instruction
IMAGE_TOKEN = "<|image_pad|>"
#: the template text before this marker is what ``crop_start='auto'`` counts
CROP_MARKER = "<|vision_start|>"
_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN, "<|video_pad|>")


def expand_image_tokens(texts: Sequence[str], grid_thw: torch.Tensor, merge_size: int) -> List[str]:
    """One ``<|image_pad|>`` per merged vision patch: text i (holding one placeholder) gets
    prod(grid_thw[i]) // merge_size^2 of them."""
    out = []
    for i, t in enumerate(texts):
        if t.count(IMAGE_TOKEN) != 1:
            raise AssertionError(f"expected one image placeholder in the edit template, found {t.count(IMAGE_TOKEN)}")
        n = int(grid_thw[i].prod()) // (merge_size ** 2)
        out.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * n))
    return out


def check_instructions(prompts: Sequence[str]) -> None:
    bad = [p for p in prompts if any(v in p for v in _VISION_TOKENS)]
    if bad:
        raise ValueError(f"edit instructions must not contain Qwen2-VL vision tokens {_VISION_TOKENS}: {bad[0]!r}")


def encode_edit_prompts(tokenizer, image_processor, text_encoder, prompts: Sequence[str], images, *, drop: int,
                        max_length: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, max_length, D), prompt_attention_mask (B, max_length) int64) for instructions
    ``prompts`` and RGB PIL ``images`` (one per prompt, at the size they are VAE-encoded at)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} instructions but {len(images)} reference images")
    check_instructions(prompts)
    vision = image_processor(images=list(images), return_tensors="pt")
    grid = vision["image_grid_thw"]
    texts = expand_image_tokens([QWEN_IMAGE_EDIT_PROMPT_TEMPLATE.format(p) for p in prompts], grid,
                                int(image_processor.merge_size))
    tok = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    h = text_encoder(input_ids=ids, attention_mask=mask, pixel_values=vision["pixel_values"].to(device),
                     image_grid_thw=grid.to(device), output_hidden_states=True).hidden_states[-1]
    emb = h.new_zeros(len(texts), max_length, h.shape[-1])
    out_mask = torch.zeros(len(texts), max_length, dtype=torch.int64, device=h.device)
    for i in range(len(texts)):
        valid = h[i][mask[i].bool()][drop:]  # works for either padding side
        if valid.shape[0] > max_length:
            raise ValueError(f"prompt {i} of this batch ({prompts[i][:60]!r}) with its reference image's "
                             f"{int(grid[i].prod()) // int(image_processor.merge_size) ** 2} vision tokens needs "
                             f"{valid.shape[0]} embedding positions, more than --qwen-max-length {max_length}: "
                             "raise it (or encode smaller reference images)")
        emb[i, :valid.shape[0]] = valid
        out_mask[i, :valid.shape[0]] = 1
    return emb, out_mask
