"""HPSv3 reward (Ma et al. 2025, MizzenAI/HPSv3): Qwen2-VL-7B-Instruct fine-tuned on human preferences;
a small MLP on the hidden state of a ``<|Reward|>`` token gives (mu, sigma); the score is mu.

Registry name ``hpsv3``. Everything runs through transformers' ``Qwen2VLForConditionalGeneration``;
the HPSv3 package (and qwen-vl-utils, torchvision, trl) is not needed.

Checkpoint. The release is one file, ``HPSv3.safetensors`` (huggingface.co/MizzenAI/HPSv3): the
state dict of the whole reward model in transformers' pre-5.0 Qwen2-VL key layout (``visual.*``,
``model.*``, ``lm_head.weight``) plus the head ``rm_head.{0,3,5}.*`` (Linear(hidden, 1024) - ReLU -
Dropout - Linear(1024, 16) - ReLU - Linear(16, 2), HPSv3's "ranknet" head, run in float32). The
backbone keys load through ``from_pretrained`` (transformers >= 5 maps the old layout itself), the
head is read from the same file(s). ``model_path`` is a folder holding that file (any
``*.safetensors`` name, or shards with an index) next to Qwen2-VL-7B-Instruct's ``config.json`` and
tokenizer files; ``python -m fastvideo_grpo.rewards.hpsv3 --base <Qwen2-VL-7B-Instruct folder>
--checkpoint HPSv3.safetensors --out <folder>`` assembles it (files copied, the checkpoint linked).
The embedding rows are read from the checkpoint (HPSv3 resized them after adding its token), and
``<|Reward|>`` is added to the tokenizer when missing (id = the tokenizer's length, as in training).

Scoring, as HPSv3's inference: the image is resized so that its sides are multiples of 28 and its
area is ``pixels`` = 256 * 28 * 28 (``min_pixels = max_pixels`` in the release; bicubic, antialiased,
on the floats), CLIP-normalised, repeated to Qwen2-VL's 2-frame temporal patch and patchified; the
text is Qwen2-VL's chat format (default system prompt, the image then HPSv3's instruction with the
prompt and ``<|Reward|>``, generation prompt). The language model runs on the embeddings with the
image features scattered in and **sequential** positions (the release calls the text model directly,
without Qwen2-VL's multimodal rotary positions), right-padded. Differences kept: the release resizes
an 8-bit PIL image with PIL's bicubic; here the decoded floats are resized in torch.

Input contract: floats in [0, 1], (B, 3, H, W) images, any size with an aspect ratio under 200;
(B, F, 3, H, W) videos are scored frame by frame against the video's prompt and averaged. Scores:
mu, roughly 0-15 on real images; ``info["sigma"]`` is the model's uncertainty.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .base import REWARDS, check_scores, validate_reward_inputs

REWARD_TOKEN = "<|Reward|>"
HPSV3_PIXELS = 256 * 28 * 28

#: HPSv3's INSTRUCTION and prompt_with_special_token, verbatim (data, not code): MizzenAI/HPSv3,
#: hpsv3/dataset/data_collator_qwen.py. Four lines end in spaces and keep them. ``{text_prompt}`` is the field.
INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the "
    "worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense "
    "of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, "
    "or adult material. If such content is present, the image quality and satisfaction score should be the "
    "lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the "
    "image logically fit the scenario described in the prompt. The environment should support and enhance the "
    "subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in "
    "the image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
PROMPT_WITH_SPECIAL_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"

#: Qwen2-VL's chat template for one user turn (image, then text), default system prompt, generation prompt.
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>{image}<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")

HINT = ("Download HPSv3.safetensors (huggingface.co/MizzenAI/HPSv3) and Qwen/Qwen2-VL-7B-Instruct, then "
        "`python -m fastvideo_grpo.rewards.hpsv3 --base <Qwen2-VL-7B-Instruct dir> --checkpoint "
        "HPSv3.safetensors --out ckpts/hpsv3` and pass model_path=ckpts/hpsv3.")
_BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
               "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
               "chat_template.jinja", "preprocessor_config.json")


def build_prompt(prompt: str, n_image_tokens: int) -> str:
    """The full text HPSv3 scores, with ``n_image_tokens`` image placeholders."""
    text = INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN
    return CHAT.format(image="<|image_pad|>" * n_image_tokens, text=text)


def ranknet_head(hidden: int, out: int = 2) -> nn.Sequential:
    """HPSv3's head (``rm_head_type: ranknet`` without kwargs); keys 0, 3, 5 as in the checkpoint."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, out))


def _weight_files(folder: str):
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"hpsv3: no *.safetensors in {folder!r}. {HINT}")
    return files


def read_checkpoint_parts(folder: str):
    """(rm_head state dict, embedding rows) from the folder's safetensors files, without loading the rest."""
    from safetensors import safe_open

    head, rows = {}, None
    for path in _weight_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k.startswith("rm_head."):
                    head[k[len("rm_head."):]] = f.get_tensor(k)
                elif k.endswith("embed_tokens.weight"):
                    rows = f.get_slice(k).get_shape()[0]
    if not head:
        raise ValueError(f"hpsv3: no rm_head.* tensors in {folder!r}: is HPSv3.safetensors the weights file there? "
                         f"{HINT}")
    return head, rows


def load_head(sd: Dict[str, torch.Tensor]) -> nn.Sequential:
    if "0.weight" not in sd:
        raise ValueError(f"hpsv3: rm_head has keys {sorted(sd)}, not HPSv3's ranknet head (0, 3, 5)")
    head = ranknet_head(sd["0.weight"].shape[1], sd["5.weight"].shape[0] if "5.weight" in sd else 2)
    missing, unexpected = head.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"hpsv3: rm_head does not fit the ranknet head: missing {missing}, unexpected {unexpected}")
    return head.eval().requires_grad_(False)


class HPSv3Scorer:
    """Pre-processing, the Qwen2-VL forward with sequential positions, and the head at ``<|Reward|>``."""

    def __init__(self, model, tokenizer, head: nn.Module, *, device, dtype=torch.float32, pixels: int = HPSV3_PIXELS,
                 batch_size: int = 4):
        from ._clip_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if int(batch_size) < 1 or int(pixels) < 28 * 28:
            raise ValueError(f"hpsv3: need batch_size >= 1 and pixels >= 784, got {batch_size}, {pixels}")
        self.model, self.tokenizer, self.head = model, tokenizer, head
        tokenizer.padding_side = "right"  # as the release; positions are sequential from the first token
        self.device, self.dtype, self.pixels, self.batch_size = device, dtype, int(pixels), int(batch_size)
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        vcfg = model.config.vision_config
        self.patch, self.merge, self.tp = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
        self.image_token_id = model.config.image_token_id
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        inner = model.model
        self.visual = getattr(inner, "visual", None) or model.visual           # transformers >= 5 / 4.x
        self.language_model = getattr(inner, "language_model", inner)

    def image_inputs(self, frames: torch.Tensor):
        """(N, 3, H, W) in [0, 1] -> (patches, grid_thw (N, 3), image tokens per frame)."""
        import torch.nn.functional as F

        from .video_align import frame_size, patchify

        n, _, h, w = frames.shape
        nh, nw = frame_size(h, w, self.patch * self.merge, self.pixels, self.pixels)
        x = frames.to(self.device, torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
        patches, grids = [], []
        for i in range(n):  # an image is its frame repeated over the temporal patch
            p, g = patchify(x[i:i + 1].expand(self.tp, -1, -1, -1), self.patch, self.merge, self.tp)
            patches.append(p)
            grids.append(g)
        grid = torch.tensor(grids, dtype=torch.long, device=self.device)
        return torch.cat(patches).to(self.dtype), grid, grids[0][1] * grids[0][2] // (self.merge ** 2)

    @torch.no_grad()
    def raw(self, frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(N, 3, H, W) frames and N prompts -> (N, 2) [mu, sigma], float32 on CPU."""
        out = []
        for s in range(0, frames.shape[0], self.batch_size):
            e = min(frames.shape[0], s + self.batch_size)
            pix, grid, n_tok = self.image_inputs(frames[s:e])
            tok = self.tokenizer([build_prompt(p, n_tok) for p in prompts[s:e]], padding=True, return_tensors="pt")
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            where = ids == self.reward_id
            if not bool((where.sum(1) == 1).all()):
                raise ValueError(f"hpsv3: every text must hold exactly one {REWARD_TOKEN} (id {self.reward_id}); "
                                 f"counts {where.sum(1).tolist()} - check the tokenizer in model_path")
            emb = self.model.get_input_embeddings()(ids)
            feats = self.visual(pix, grid_thw=grid)
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            img = (ids == self.image_token_id).unsqueeze(-1).expand_as(emb)
            if int(img.sum()) != feats.numel():
                raise RuntimeError(f"hpsv3: {int(img.sum()) // emb.shape[-1]} image tokens but "
                                   f"{feats.shape[0]} image features")
            emb = emb.masked_scatter(img, feats.to(emb.dtype))
            pos = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
            hidden = self.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                         use_cache=False, return_dict=True).last_hidden_state
            out.append(self.head(hidden[where].float()).cpu())
        return torch.cat(out)


@REWARDS.register("hpsv3", paths=("model_path",))
def hpsv3(model_path=None, device=None, dtype="bfloat16", batch_size=4, pixels=HPSV3_PIXELS,
          attn_implementation="sdpa"):
    """``model_path``: Qwen2-VL-7B-Instruct's config + tokenizer with HPSv3.safetensors (see the module doc)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLForConditionalGeneration

    from ._clip_utils import require_files, resolve_device, resolve_dtype, to_frames

    folder = require_files(model_path, [["config.json"], ["tokenizer.json", "vocab.json"]], "hpsv3", HINT)
    head_sd, rows = read_checkpoint_parts(folder)
    head = load_head(head_sd)
    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if rows is not None:
        text_cfg.vocab_size = rows
        if hasattr(cfg, "vocab_size"):
            cfg.vocab_size = rows
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
    rid = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if rows is not None and rid >= rows:
        raise ValueError(f"hpsv3: {REWARD_TOKEN} has id {rid} but the checkpoint has {rows} embedding rows; "
                         "use Qwen2-VL-7B-Instruct's tokenizer files")
    if head[0].in_features != text_cfg.hidden_size:
        raise ValueError(f"hpsv3: head expects hidden size {head[0].in_features}, "
                         f"the config has {text_cfg.hidden_size}")
    dev, tdtype = resolve_device(device), resolve_dtype(dtype)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, config=cfg, local_files_only=True,
                                                            attn_implementation=attn_implementation,
                                                            **{dtype_kw: tdtype})
    model = model.to(dev).eval().requires_grad_(False)
    scorer = HPSv3Scorer(model, tokenizer, head.to(dev), device=dev, dtype=tdtype, pixels=pixels,
                         batch_size=batch_size)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        frames, nf = to_frames(images)
        raw = scorer.raw(frames, [p for p in prompts for _ in range(nf)])
        raw = raw.view(images.shape[0], nf, raw.shape[-1]).mean(1)
        scores = check_scores("hpsv3", raw[:, 0], images.shape[0])
        info = {"hpsv3_mean": float(scores.mean())}
        if raw.shape[1] > 1:
            info["sigma"] = raw[:, 1].tolist()
        return scores, info

    fn.scorer, fn.model, fn.modules, fn.device = scorer, model, [model, scorer.head], dev
    return fn


def prepare_folder(base: str, checkpoint: str, out: str, copy: bool = False) -> str:
    """``out`` = Qwen2-VL-7B-Instruct's config and tokenizer files from ``base`` + the HPSv3 checkpoint
    (a symbolic link, or a copy with ``copy=True``) as ``model.safetensors``."""
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(f"hpsv3: {base!r} has no config.json; pass the Qwen2-VL-7B-Instruct folder as --base")
    if not os.path.isfile(checkpoint) or not checkpoint.endswith(".safetensors"):
        raise FileNotFoundError(f"hpsv3: checkpoint {checkpoint!r} is not a .safetensors file. {HINT}")
    os.makedirs(out, exist_ok=True)
    for name in _BASE_FILES:
        if os.path.isfile(os.path.join(base, name)):
            shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
    target = os.path.join(out, "model.safetensors")
    if os.path.lexists(target):
        os.remove(target)
    if copy:
        shutil.copyfile(checkpoint, target)
    else:
        os.symlink(os.path.abspath(checkpoint), target)
    return out


def main(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description="Assemble an HPSv3 folder for the hpsv3 reward")
    p.add_argument("--base", required=True, help="Qwen/Qwen2-VL-7B-Instruct folder (config + tokenizer)")
    p.add_argument("--checkpoint", required=True, help="HPSv3.safetensors from MizzenAI/HPSv3")
    p.add_argument("--out", required=True)
    p.add_argument("--copy", action="store_true", help="copy the checkpoint instead of linking it")
    a = p.parse_args(argv)
    print(json.dumps({"wrote": prepare_folder(a.base, a.checkpoint, a.out, a.copy)}))


if __name__ == "__main__":
    main()
