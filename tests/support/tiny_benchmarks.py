"""Tiny random-init models for the benchmark suites' tests, built from configs and saved as local folders:
CLIP (colour classifier, CLIPScore, background consistency), BLIP VQA (T2I-CompBench's attribute binding) and
a DINO-style ViT (VBench's subject consistency)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

WORDS = ["a", "an", "the", "photo", "of", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
         "black", "white", "colored", "object", "square", "circle", "triangle", "squares", "circles", "triangles",
         "one", "two", "three", "left", "bench", "car", "bowl", "cup", "and", "yes", "no", "-", "?", "cat", "dog"]


def clip_dir(folder: Path) -> str:
    """A tiny CLIPModel + a character-level CLIP tokenizer (every letter is a token)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz-?"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(str(folder))
    n = len(vocab)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=n - 1, bos_token_id=n - 2,
                         pad_token_id=n - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(str(folder))
    return str(folder)


def blip_vqa_dir(folder: Path) -> str:
    """A tiny BlipForQuestionAnswering with a word-level BERT tokenizer whose vocabulary has 'yes' and 'no'."""
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    tok.save_pretrained(str(folder))
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=40, encoder_hidden_size=16,
                         bos_token_id=vocab.index("[DEC]"), pad_token_id=0, sep_token_id=vocab.index("[SEP]")),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.5), initializer_range=0.5)
    cfg.text_config.initializer_range = 0.5  # large random weights: answers that depend on the image and question
    torch.manual_seed(0)
    BlipForQuestionAnswering(cfg).save_pretrained(str(folder))
    return str(folder)


def dino_dir(folder: Path) -> str:
    """A tiny ViTModel (DINO's architecture in transformers) saved without a pooling layer."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                    patch_size=8, initializer_range=0.5)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


VA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>",
               "<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
VA_TEMPLATE = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>rate the video of {prompt} "
               "<|VQ_reward|> <|MQ_reward|> <|TA_reward|><|im_end|>")


def video_align_dir(folder: Path, words=("a", "red", "cat", "blue", "dog", "green", "photo", "city", "white")) -> str:
    """A tiny Qwen2-VL with VideoReward's three reward tokens and an rm_head (rewards/video_align.py's layout)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    folder = Path(folder)
    vocab = ["[UNK]", "<|endoftext|>", "rate", "the", "video", "of", "user"] + [w for w in words if w not in
                                                                                 ("rate", "the", "video", "of")]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": VA_SPECIALS})
    tok.save_pretrained(str(folder))
    ids = {s: tok.convert_tokens_to_ids(s) for s in VA_SPECIALS}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         pad_token_id=1, bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(str(folder))
    save_file({"weight": torch.randn(3, 32)}, str(folder / "rm_head.safetensors"))
    (folder / "reward_config.json").write_text(json.dumps({"prompt_template": VA_TEMPLATE}))
    return str(folder)
