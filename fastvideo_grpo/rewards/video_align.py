"""VideoAlign / VideoReward reward (Liu et al. 2025): a Qwen2-VL model with a linear reward head
scoring visual quality (VQ), motion quality (MQ) and text alignment (TA) of a video for its prompt.

Registry name ``video_align``. Everything runs through transformers' Qwen2-VL classes; the video
pre-processing (frame sampling, resize to multiples of 28, CLIP normalisation, Qwen2-VL patch
layout) is done here in torch, batched, without the video processor (which needs torchvision).

Assumed checkpoint layout (``model_path``), i.e. the released VideoReward checkpoint after merging
its LoRA into Qwen2-VL-2B-Instruct (see docs/rewards.md for the steps):

* ``config.json`` + ``model.safetensors`` (or shards): a ``Qwen2VLForConditionalGeneration``
  whose embeddings include the added tokens;
* tokenizer files holding the special tokens ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``
  (plus Qwen2-VL's ``<|vision_start|>``, ``<|video_pad|>``, ``<|vision_end|>``);
* ``rm_head.safetensors``: the reward head, a bias-free ``nn.Linear(hidden_size, output_dim)``,
  key ``weight`` (override with ``head_path=`` / ``head_key=``);
* optional ``reward_config.json``: ``{"VQ_mean":..., "VQ_std":..., "MQ_mean":..., ...}`` and optionally
  ``"prompt_template"``; kwargs override it.

Scoring: the last hidden state (after the final norm) goes through the head; with
``pooling="special"`` the head output is read at the 3 special tokens (in the order VQ, MQ, TA) and,
when ``output_dim == 3``, the k-th output at the k-th token (the diagonal) - VideoReward's layout;
``output_dim == 1`` reads the single output at each token. ``pooling="last"`` reads the last
non-padding token and needs ``output_dim == 3``. With ``normalize=True`` each dimension becomes
``(raw - mean) / std`` with the checkpoint's statistics. The score is the sum over ``dimensions``
(default VQ and MQ: the paper left TA out as unstable); every dimension is in ``info``.
A prompt whose special tokens are missing (e.g. truncated) is an error, never a constant reward.

Prompt: by default VideoAlign's own ``DETAILED_PROMPT_WITH_SPECIAL_TOKEN`` (``build_prompt(prompt, dims,
"detailed_special")``, the template the VideoReward checkpoint was trained with: its model_config.json has
``prompt_template_type: detailed_special``) inside Qwen2-VL's chat format with the video before the
text, as VideoAlign's inference builds it with ``apply_chat_template`` and as the released DanceGRPO
code queries it. Other wordings put the VQ / MQ / TA tokens off the training distribution.

Frames (``frame_sampling="uniform"``, default): VideoAlign's inference sampling. A video of F frames
written at ``video_fps`` lasts F / video_fps seconds; it is sampled at ``sample_fps`` (the checkpoint's
2.0), n = F / video_fps * sample_fps frames clamped to [4, min(768, F)] (or ``max_frames``) and
rounded to an even count, at ``linspace(0, F - 1, n).round()``. Each frame is resized (bicubic,
antialiased) so that its sides are multiples of 28 and its area lies in [``min_pixels``,
``max_pixels``] = [128 * 28 * 28, 448 * 448] (VideoAlign's video minimum; the checkpoint's
``max_frame_pixels``). The released DanceGRPO code writes HunyuanVideo / SkyReels samples as 8 fps
mp4 files (``--fps 8``) and lets VideoAlign read them: 53 frames -> 14 frames of 448 x 448 from
480 x 480. Differences kept: the frames here are the decoded floats, not an 8-bit, lossy-compressed
mp4 read back. ``frame_sampling="stride"`` is the earlier sampling (every video_fps / sample_fps-th
frame from the first, at most ``max_frames`` spread evenly). An image is one frame shown twice
(VideoAlign itself cannot score a single frame).
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import REWARDS, check_scores, validate_reward_inputs

DIMS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
HINT = ("Download KwaiVGI/VideoReward and Qwen/Qwen2-VL-2B-Instruct, merge the LoRA into the base model "
        "(docs/rewards.md, 'VideoAlign') and put config.json, model.safetensors, the tokenizer files and "
        "rm_head.safetensors in one folder passed as model_path.")

#: VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN, verbatim (data, not code): KwaiVGI/VideoAlign,
#: prompt_template.py (commit 94236c2, 2025-02-09), the same text as the released DanceGRPO copy
#: fastvideo/models/videoalign/prompt_template.py. ``{text_prompt}`` is the only field. Its 5 lines that
#: end in spaces keep them (sha256 of the text: fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700).
DETAILED_PROMPT_WITH_SPECIAL_TOKEN = (
    "\n"
    "You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, "
    "Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three "
    "categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of "
    "the others.\n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the video, with a focus on static factors. The following "
    "sub-dimensions should be considered:\n"
    "- **Reasonableness:** The video should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
    "convey a sense of harmony and balance.\n"
    "- **Safety:** The video should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "\n"
    "Please provide the ratings of Visual Quality: <|VQ_reward|>\n"
    "END\n"
    "\n"
    "**Motion Quality:**  \n"
    "Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following "
    "sub-dimensions:\n"
    "- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, "
    "unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, "
    "textures, or missing body parts).\n"
    "- **Naturalness:** The movement should align with physical laws and be realistic. For example, "
    "clothing should flow naturally with motion, and facial expressions should change appropriately "
    "(e.g., blinking, mouth movements).\n"
    "- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different "
    "motions or camera angles should be seamless, and the overall dynamic feel should be visually "
    "pleasing.\n"
    "- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend "
    "naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.\n"
    "- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas "
    "where the video might have blurry or unsteady sections that hinder visual continuity.\n"
    "- **Amplitude:** If the video is largely static or has little movement, assign a low score for "
    "motion quality.\n"
    "\n"
    "Please provide the ratings of Motion Quality: <|MQ_reward|>\n"
    "END\n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the video matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions "
    "like talking or blinking) align with the described prompt. The motion should match the prompt in "
    "terms of type, scale, and direction.\n"
    "- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes "
    "checking if real-world locations or scenes are accurately represented, though some stylistic "
    "adaptation is acceptable.  \n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
    "how well the video adheres to this style.\n"
    "- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus "
    "shifts) are consistent with the expected behavior from the prompt.\n"
    "\n"
    "Textual prompt - {text_prompt}\n"
    "Please provide the ratings of Text Alignment: <|TA_reward|>\n"
    "END\n"
)

#: Qwen2-VL's chat format for one user turn holding a video then a text (its chat template with the default
#: system prompt and add_generation_prompt=True), around the detailed prompt; ``{prompt}`` is the video's prompt.
DEFAULT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|video_pad|><|vision_end|>"
                    + DETAILED_PROMPT_WITH_SPECIAL_TOKEN.replace("{text_prompt}", "{prompt}")
                    + "<|im_end|>\n<|im_start|>assistant\n")

FRAME_SAMPLINGS = ("uniform", "stride")
VIDEO_MIN_PIXELS = 128 * 28 * 28  # VideoAlign's (qwen-vl-utils') minimum area of a video frame
VIDEO_MAX_FRAMES = 768  # its default cap on the number of frames


def _round_to(x: float, factor: int) -> int:
    return int(round(x / factor)) * factor


def videoalign_frame_indices(num_frames: int, video_fps: float, sample_fps: float = 2.0,
                             max_frames: Optional[int] = None, min_frames: int = 4, temporal_patch: int = 2) -> List[int]:
    """VideoAlign's ``uniform`` frame sampling (its vision_process.smart_nframes, then
    ``linspace(0, F - 1, n).round()``): n = F / video_fps * sample_fps, clamped to
    [min_frames, max_frames or min(768, F)] (each bound taken to a multiple of 2), rounded to a multiple of
    2, at most F. A single frame (an image) is shown twice."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    if video_fps <= 0 or sample_fps <= 0:
        raise ValueError(f"video_fps and sample_fps must be > 0, got {video_fps}, {sample_fps}")
    if num_frames < temporal_patch:
        return [0] * temporal_patch
    lo = math.ceil(min_frames / temporal_patch) * temporal_patch
    cap = max_frames if max_frames is not None else min(VIDEO_MAX_FRAMES, num_frames)
    hi = math.floor(cap / temporal_patch) * temporal_patch
    n = _round_to(min(max(num_frames / video_fps * sample_fps, lo), hi), temporal_patch)
    n = min(n, num_frames)
    if n < temporal_patch:
        raise ValueError(f"video_align: {n} frames to sample from {num_frames}; max_frames must be >= {temporal_patch}")
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def sample_frame_indices(num_frames: int, video_fps: float, sample_fps: float, max_frames: Optional[int] = None,
                         temporal_patch: int = 2) -> List[int]:
    """``frame_sampling="stride"``: the frames seen at ``sample_fps`` (uniform in time, first frame included),
    at most ``max_frames`` (spread uniformly), padded by repeating the last to a multiple of ``temporal_patch``."""
    if num_frames < 1:
        raise ValueError("video has no frames")
    if video_fps <= 0 or sample_fps <= 0:
        raise ValueError(f"video_fps and sample_fps must be > 0, got {video_fps}, {sample_fps}")
    step = video_fps / sample_fps
    idx = [min(num_frames - 1, int(math.floor(i * step + 1e-6))) for i in range(max(1, math.ceil(num_frames / step - 1e-6)))]
    if max_frames is not None and len(idx) > max_frames:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        pick = torch.linspace(0, len(idx) - 1, max_frames).round().long().tolist()
        idx = [idx[i] for i in pick]
    while len(idx) % temporal_patch:
        idx.append(idx[-1])
    return idx


def frame_size(h: int, w: int, factor: int = 28, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = 448 * 448):
    """(h, w) rounded to multiples of ``factor`` with min_pixels <= h*w <= max_pixels, aspect kept."""
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"frame aspect ratio {h}x{w} is too extreme")
    nh, nw = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if nh * nw > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        nh, nw = max(factor, math.floor(h / beta / factor) * factor), max(factor, math.floor(w / beta / factor) * factor)
    elif nh * nw < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        nh, nw = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return nh, nw


def patchify(frames: torch.Tensor, patch: int = 14, merge: int = 2, temporal_patch: int = 2):
    """(T, 3, H, W) normalised frames -> (grid_t*grid_h*grid_w, 3*tp*p*p) patches in Qwen2-VL's order
    (merge x merge neighbourhoods contiguous), and the grid (t, h, w)."""
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal_patch, h // patch, w // patch
    x = frames.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal_patch * patch * patch), (gt, gh, gw)


class VideoAlignScorer:
    """Frame sampling + prompt building + Qwen2-VL forward + reward head + normalisation.

    ``backbone(input_ids, attention_mask, pixel_values_videos, video_grid_thw) -> (B, L, D)`` last
    hidden states and ``tokenizer`` are injectable (the factory loads them from ``model_path``).
    """

    def __init__(self, backbone, tokenizer, head: torch.nn.Module, *, device, dtype=torch.float32,
                 video_fps: float = 8.0, sample_fps: float = 2.0, max_frames: Optional[int] = None,
                 max_pixels: int = 448 * 448, min_pixels: int = VIDEO_MIN_PIXELS, patch_size: int = 14,
                 merge_size: int = 2, temporal_patch_size: int = 2, mean=None, std=None,
                 prompt_template: str = DEFAULT_TEMPLATE, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                 pooling: str = "special", normalize: bool = False, norm_stats: Optional[Dict] = None,
                 dimensions: Sequence[str] = ("VQ", "MQ"), weights: Optional[Sequence[float]] = None,
                 batch_size: int = 2, frame_sampling: str = "uniform"):
        from ._clip_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        if frame_sampling not in FRAME_SAMPLINGS:
            raise ValueError(f"video_align: frame_sampling must be one of {FRAME_SAMPLINGS}, got {frame_sampling!r}")
        self.frame_sampling = frame_sampling

        self.backbone, self.tokenizer, self.head = backbone, tokenizer, head
        self.device, self.dtype = device, dtype
        self.video_fps, self.sample_fps, self.max_frames = float(video_fps), float(sample_fps), max_frames
        self.max_pixels, self.min_pixels = int(max_pixels), int(min_pixels)
        self.patch, self.merge, self.tp = int(patch_size), int(merge_size), int(temporal_patch_size)
        self.mean = tuple(mean or OPENAI_CLIP_MEAN)
        self.std = tuple(std or OPENAI_CLIP_STD)
        if "{prompt}" not in prompt_template or prompt_template.count("<|video_pad|>") != 1:
            raise ValueError("video_align: prompt_template must contain '{prompt}' and exactly one <|video_pad|>")
        self.template = prompt_template
        self.special_ids = tokenizer.convert_tokens_to_ids(list(special_tokens))
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in self.special_ids):
            raise ValueError(f"video_align: tokenizer lacks the special tokens {list(special_tokens)}; "
                             "use the VideoReward tokenizer (tokens added during its training)")
        if pooling not in ("special", "last"):
            raise ValueError(f"video_align: pooling must be 'special' or 'last', got {pooling!r}")
        self.pooling = pooling
        out_dim = head.out_features
        if pooling == "special" and out_dim not in (1, len(self.special_ids)):
            raise ValueError(f"video_align: head has {out_dim} outputs; special pooling needs 1 or {len(self.special_ids)}")
        if pooling == "last" and out_dim != 3:
            raise ValueError(f"video_align: pooling='last' needs a head with 3 outputs (VQ, MQ, TA), got {out_dim}")
        bad = [d for d in dimensions if d not in DIMS]
        if bad or not dimensions:
            raise ValueError(f"video_align: dimensions must be a non-empty subset of {DIMS}, got {list(dimensions)}")
        self.dimensions = list(dimensions)
        self.weights = [1.0] * len(self.dimensions) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.dimensions):
            raise ValueError("video_align: weights must have one value per dimension")
        self.normalize = bool(normalize)
        self.norm = torch.zeros(3), torch.ones(3)
        if self.normalize:
            stats = norm_stats or {}
            missing = [f"{d}_{k}" for d in DIMS for k in ("mean", "std") if f"{d}_{k}" not in stats]
            if missing:
                raise ValueError(f"video_align: normalize=True needs {missing} (from the checkpoint's "
                                 "reward_config.json or the norm_stats= config field)")
            self.norm = (torch.tensor([float(stats[f"{d}_mean"]) for d in DIMS]),
                         torch.tensor([float(stats[f"{d}_std"]) for d in DIMS]))
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("video_align: batch_size must be >= 1")

    # -- inputs
    def video_inputs(self, videos: torch.Tensor):
        """(B, F, 3, H, W) or (B, 3, H, W) in [0, 1] -> (pixel_values_videos, video_grid_thw, tokens per video)."""
        if videos.ndim == 4:
            videos = videos.unsqueeze(1)
        b, f, _, h, w = videos.shape
        sample = videoalign_frame_indices if self.frame_sampling == "uniform" else sample_frame_indices
        idx = sample(f, self.video_fps, self.sample_fps, self.max_frames, temporal_patch=self.tp)
        x = videos[:, idx].to(self.device, torch.float32)                 # (B, T, 3, H, W)
        t = x.shape[1]
        nh, nw = frame_size(h, w, self.patch * self.merge, self.min_pixels, self.max_pixels)
        x = x.reshape(b * t, 3, h, w)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = ((x - m) / s).reshape(b, t, 3, nh, nw)
        patches, grids = [], []
        for i in range(b):
            p, g = patchify(x[i], self.patch, self.merge, self.tp)
            patches.append(p)
            grids.append(g)
        grid = torch.tensor(grids, dtype=torch.long, device=self.device)
        n_tokens = grids[0][0] * grids[0][1] * grids[0][2] // (self.merge ** 2)
        return torch.cat(patches).to(self.dtype), grid, n_tokens

    def text_inputs(self, prompts: Sequence[str], n_video_tokens: int):
        texts = [self.template.replace("<|video_pad|>", "<|video_pad|>" * n_video_tokens).replace("{prompt}", p)
                 for p in prompts]
        tok = self.tokenizer(texts, padding=True, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    # -- scoring
    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> raw (B, 3) [VQ, MQ, TA]."""
        logits = self.head(hidden.to(self.head.weight.dtype)).float()      # (B, L, out)
        b = logits.shape[0]
        if self.pooling == "last":
            last = attention_mask.long().sum(-1) - 1
            if self.tokenizer.padding_side == "left":
                last = torch.full_like(last, attention_mask.shape[1] - 1)
            return logits[torch.arange(b, device=logits.device), last]
        rows = []
        for i in range(b):
            pos = []
            for k, sid in enumerate(self.special_ids):
                where = (input_ids[i] == sid).nonzero().flatten()
                if where.numel() != 1:
                    raise ValueError(f"video_align: sample {i} has {where.numel()} copies of special token "
                                     f"#{k} (id {sid}); expected exactly 1 - check prompt_template / truncation")
                pos.append(int(where[0]))
            vals = logits[i, pos]                                          # (3, out)
            rows.append(vals.diagonal() if vals.shape[1] == len(pos) else vals[:, 0])
        return torch.stack(rows)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]):
        b = images.shape[0]
        raws = []
        for s in range(0, b, self.batch_size):
            e = min(b, s + self.batch_size)
            pix, grid, n_tok = self.video_inputs(images[s:e])
            ids, mask = self.text_inputs(prompts[s:e], n_tok)
            try:
                hidden = self.backbone(input_ids=ids, attention_mask=mask, pixel_values_videos=pix,
                                       video_grid_thw=grid)
            except Exception as err:
                raise RuntimeError(f"video_align: Qwen2-VL forward failed for samples {s}:{e} (input_ids "
                                   f"{tuple(ids.shape)}, video patches {tuple(pix.shape)}, grid "
                                   f"{grid[0].tolist()}): {type(err).__name__}: {err}") from err
            raws.append(self.pool(hidden, ids, mask).cpu())
        raw = torch.cat(raws)                                             # (B, 3)
        norm = (raw - self.norm[0]) / self.norm[1] if self.normalize else raw
        sel = [DIMS.index(d) for d in self.dimensions]
        score = (norm[:, sel] * torch.tensor(self.weights)).sum(-1)
        info = {d: norm[:, k].tolist() for k, d in enumerate(DIMS)}
        info["raw"] = raw.tolist()
        return score, info


def _hf_backbone(model):
    """Qwen2VLForConditionalGeneration -> callable returning the last hidden state (after the final norm)."""
    import inspect

    inner = getattr(model, "model", model)
    # transformers >= 5 wants the modality of every token (0 text, 1 image, 2 video) for M-RoPE.
    wants_types = "mm_token_type_ids" in inspect.signature(inner.forward).parameters
    video_id = model.config.video_token_id

    def run(**inputs):
        if wants_types:
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == video_id).long() * 2
        out = inner(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state

    return run


def load_head(path: str, key: str = "weight") -> torch.nn.Linear:
    from ._clip_utils import require_file

    path = require_file(path, "video_align reward head", HINT)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd
    if key not in sd:  # e.g. VideoReward's non-LoRA state dict: accept a unique "...rm_head.weight"
        cands = [k for k in sd if k.endswith("rm_head.weight")]
        if len(cands) != 1:
            raise ValueError(f"video_align: head file {path!r} has no key {key!r} and no unique '*rm_head.weight' "
                             f"(keys: {sorted(sd)[:10]}); set head_key=")
        key = cands[0]
    w = sd[key]
    if w.ndim != 2:
        raise ValueError(f"video_align: head weight {key!r} must be (output_dim, hidden), got {tuple(w.shape)}")
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    head.weight.data.copy_(w.float())
    return head.eval().requires_grad_(False)


#: frozen backbones already loaded in this process, by (folder, device, dtype, attention implementation)
_LOADED: dict = {}


@REWARDS.register("video_align", paths=("model_path", "head_path"))
def video_align(model_path=None, head_path=None, head_key="weight", device=None, dtype="bfloat16",
                video_fps=8.0, sample_fps=2.0, max_frames=None, max_pixels=448 * 448, min_pixels=VIDEO_MIN_PIXELS,
                prompt_template=None, pooling="special", normalize=False, norm_stats=None,
                dimensions=("VQ", "MQ"), weights=None, batch_size=2, attn_implementation="sdpa",
                frame_sampling="uniform"):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from ._clip_utils import require_files, resolve_device, resolve_dtype

    folder = require_files(model_path, [["config.json"], ["model.safetensors", "pytorch_model.bin"],
                                        ["tokenizer.json", "vocab.json"]], "video_align", HINT)
    head = load_head(head_path or os.path.join(folder, "rm_head.safetensors"), head_key)
    cfg_file = os.path.join(folder, "reward_config.json")
    file_cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else {}
    stats = dict(file_cfg)
    stats.update(norm_stats or {})
    device, tdtype = resolve_device(device), resolve_dtype(dtype)
    key = (os.path.realpath(folder), str(device), str(tdtype), attn_implementation)
    model = _LOADED.get(key)
    if model is None:  # VQ / MQ / TA as separate reward entries share one copy of the 2B model
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                attn_implementation=attn_implementation)
        model = _LOADED[key] = model.to(device=device, dtype=tdtype).eval().requires_grad_(False)
    hidden = model.config.get_text_config().hidden_size
    if head.in_features != hidden:
        raise ValueError(f"video_align: head expects hidden size {head.in_features}, model has {hidden}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vcfg = model.config.vision_config
    scorer = VideoAlignScorer(
        _hf_backbone(model), tokenizer, head.to(device), device=device, dtype=tdtype, video_fps=video_fps,
        sample_fps=sample_fps, max_frames=max_frames, max_pixels=max_pixels, min_pixels=min_pixels,
        patch_size=vcfg.patch_size, merge_size=vcfg.spatial_merge_size, temporal_patch_size=vcfg.temporal_patch_size,
        prompt_template=prompt_template or file_cfg.get("prompt_template", DEFAULT_TEMPLATE), pooling=pooling,
        normalize=normalize, norm_stats=stats, dimensions=tuple(dimensions), weights=weights, batch_size=batch_size,
        frame_sampling=frame_sampling)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        score, info = scorer(images, list(prompts))
        return check_scores("video_align", score, images.shape[0]), info

    fn.scorer, fn.model = scorer, model
    fn.modules, fn.device = [model, scorer.head], device
    return fn
