"""Tiny random-init text encoders / tokenizers / VAEs in a diffusers-format folder, for the tests.

``build_tiny_family_folder(family, path)`` writes the subfolders ``load_family_encoder`` reads
(``tokenizer*/``, ``text_encoder*/``, ``vae/``, ``image_encoder/`` + ``image_processor/``) with the
real transformers / diffusers classes at toy sizes (hidden sizes 8-32, 2-3 layers), so data prep runs
through the genuine ``from_pretrained(local_path, local_files_only=True)`` code without any download.
Tokenizers: a CLIP BPE tokenizer from a tiny vocab.json + merges.txt over a small word list, and a
word-level ``tokenizers`` tokenizer (appending ``</s>``) standing in for the T5 / UMT5 / LLaMA ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from support.tiny_models import tiny_hunyuan_vae, tiny_qwen_vae, tiny_wan22_vae, tiny_wan_vae

WORDS = ("a an the of on in and with left right above below photo video cat dog red green blue yellow purple "
         "orange white black circle square triangle star one two three four small big bright dark sky sea forest "
         "city man woman running flying cinematic").split()
CLIP_MAX = 77
CLIP_DIMS = {"clip_l": (16, 8), "clip_g": (24, 12)}  # hidden, projection
T5_DIM = 48
LLAMA_DIM = 32
QWEN_VL_DIM = 32
# the words of Qwen-Image's prompt template, so the word-level stand-in tokenizes it into known tokens
QWEN_TEMPLATE_WORDS = ("<|im_start|> <|im_end|> system user assistant Describe image by detailing color shape size "
                       "texture quantity text spatial relationships objects background , :").split()
# Qwen-Image-Edit's template adds the vision placeholder tokens (special, as in Qwen2-VL's tokenizer)
QWEN_EDIT_TEMPLATE_WORDS = QWEN_TEMPLATE_WORDS + ("<|vision_start|> <|image_pad|> <|vision_end|> <|video_pad|> key "
                                                  "features input instruction alter modify new").split()


def clip_tokenizer(folder: Path):
    """A real CLIPTokenizer over a tiny BPE vocabulary (every letter + the words in WORDS)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(set("".join(WORDS)) | set("0123456789,.!?'-")):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges, seen = [], set()
    for w in WORDS:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            pair = (toks[0], toks[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(f"{pair[0]} {pair[1]}")
            toks = [toks[0] + toks[1]] + toks[2:]
            vocab.setdefault(toks[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CLIP_MAX)
    tok.save_pretrained(str(folder))
    return tok


def word_tokenizer(folder: Path, *, bos: bool = False, max_length: int = 512, extra_words=(), plain: bool = False,
                   specials=(), chat_template=None):
    """A fast word-level tokenizer appending ``</s>`` (T5 / UMT5 style), prepending ``<s>`` (LLaMA style) or
    adding nothing (``plain``: Qwen style); ``extra_words`` join the vocabulary (kept whole by the splitter), as
    do ``specials`` (special tokens, e.g. a chat template's markers); ``chat_template``: a Jinja chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}
    for w in WORDS + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "system", "user"] + list(extra_words) \
            + list(specials):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = [w for w in extra_words if w.startswith("<|")] + list(specials)
    if specials:
        tk.add_special_tokens(specials)
    if plain:
        pass
    elif bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    else:
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  bos_token="<s>", model_max_length=max_length)
    if chat_template is not None:
        tok.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok, len(vocab)


def _clip_model(cls_name: str, vocab_size: int, kind: str = "clip_l"):
    import transformers

    hidden, proj = CLIP_DIMS[kind]
    cfg = transformers.CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX,
                                      projection_dim=proj, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return getattr(transformers, cls_name)(cfg)


def _t5(cls_name: str, vocab_size: int):
    import transformers

    cfg_cls = transformers.UMT5Config if cls_name == "UMT5EncoderModel" else transformers.T5Config
    cfg = cfg_cls(vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return getattr(transformers, cls_name)(cfg)


def _llama(vocab_size: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=LLAMA_DIM, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=1024, pad_token_id=0, bos_token_id=3, eos_token_id=1)
    return transformers.LlamaModel(cfg)


# Qwen3's chat template for one user turn (its markers, the generation prompt and the enable_thinking switch)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")
QWEN3_SPECIALS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
QWEN3_DIM = 16
# Mistral Small 3.1's chat template for a system and a user turn (content as lists of typed parts)
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + "
    "message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}{%- elif message['role'] == 'user' %}{{- '[INST]' + "
    "message['content'][0]['text'] + '[/INST]' }}{%- endif %}{%- endfor %}")
MISTRAL3_SPECIALS = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]")
MISTRAL3_DIM = 16


def _qwen3(cls_name: str, vocab_size: int, layers: int):
    """Qwen3 at toy size; ``layers``: 28 so that FLUX.2 [klein]'s hidden states 9, 18, 27 exist."""
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=QWEN3_DIM, intermediate_size=32,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=1024, pad_token_id=0)
    return getattr(transformers, cls_name)(cfg)


def _mistral3(tokenizer):
    """Mistral3ForConditionalGeneration (FLUX.2 [dev]'s text encoder) at toy size: 31 text layers (hidden states
    10, 20, 30 exist) and a one-block Pixtral vision tower."""
    import transformers

    text = dict(vocab_size=len(tokenizer), hidden_size=MISTRAL3_DIM, intermediate_size=32, num_hidden_layers=31,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=32, patch_size=8)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision,
                                      image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return transformers.Mistral3ForConditionalGeneration(cfg)


def _qwen2_5_vl(vocab_size: int, tokenizer=None):
    """Qwen2.5-VL (the class QwenImagePipeline loads) at toy size: 2 text layers, 1 vision block (14-pixel
    patches, 2x2 merge: Qwen2-VL's image processor defaults). ``tokenizer``: take the vision token ids from it."""
    import transformers

    ids = dict(image_token_id=vocab_size - 3, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 1)
    if tokenizer is not None:
        ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"))}

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=QWEN_VL_DIM, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_VL_DIM,
                           fullatt_block_indexes=[0]),
        vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, **ids)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


# Qwen2.5's chat format (system turn, user turn, generation prompt) as a Jinja template for the word-level
# stand-in, so apply_chat_template renders what the real Qwen2.5-VL tokenizer's template renders
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen2_5_vl_text(vocab_size: int):
    """Qwen2.5-VL's text model alone (the class HunyuanVideo15Pipeline loads) at toy size."""
    import transformers

    cfg = transformers.Qwen2_5_VLTextConfig(
        vocab_size=vocab_size, hidden_size=QWEN_VL_DIM, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    return transformers.Qwen2_5_VLTextModel(cfg)


GEMMA_DIM = 16  # the tiny Gemma 3 text model's width = LTX-2's connector width (tests/support/tiny_models.py)


def _gemma3(vocab_size: int):
    """Gemma 3 (the class LTX2Pipeline loads: the vision-language model) at toy size: 2 text layers, a 1-block SigLIP."""
    import transformers

    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=vocab_size, hidden_size=GEMMA_DIM, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                         sliding_window=64, pad_token_id=0, bos_token_id=3, eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        mm_tokens_per_image=4, image_token_index=vocab_size - 1, boi_token_index=vocab_size - 2,
        eoi_token_index=vocab_size - 3)
    return transformers.Gemma3ForConditionalGeneration(cfg)


def build_tiny_components(family: str, path) -> Dict[str, object]:
    """Write a tiny ``family`` encoder folder at ``path``; returns the in-memory components (seed 0)."""
    import transformers

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    c: Dict[str, object] = {}
    base = family.replace("_i2v", "") if family != "hunyuan_i2v" else "hunyuan"
    if family == "qwen_image_edit":
        base = "qwen_image_edit"
    if base == "sd":
        c["tokenizer"] = clip_tokenizer(root / "tokenizer")
        c["text_encoder"] = _clip_model("CLIPTextModel", len(c["tokenizer"]))
    elif base == "flux":
        c["tokenizer"] = clip_tokenizer(root / "tokenizer")
        c["text_encoder"] = _clip_model("CLIPTextModel", len(c["tokenizer"]))
        c["tokenizer_2"], n = word_tokenizer(root / "tokenizer_2")
        c["text_encoder_2"] = _t5("T5EncoderModel", n)
    elif base == "hunyuan":
        c["tokenizer"], n = word_tokenizer(root / "tokenizer", bos=True, max_length=1024)
        c["text_encoder"] = _llama(n)
        c["tokenizer_2"] = clip_tokenizer(root / "tokenizer_2")
        c["text_encoder_2"] = _clip_model("CLIPTextModel", len(c["tokenizer_2"]))
    elif base in ("wan", "wan22_5b"):  # Wan 2.2 keeps Wan 2.1's UMT5 encoder
        c["tokenizer"], n = word_tokenizer(root / "tokenizer")
        c["text_encoder"] = _t5("UMT5EncoderModel", n)
    elif base == "qwen_image":
        c["tokenizer"], n = word_tokenizer(root / "tokenizer", max_length=2048, extra_words=QWEN_TEMPLATE_WORDS,
                                           plain=True)
        c["text_encoder"] = _qwen2_5_vl(n + 3)
    elif base == "qwen_image_edit":  # tokenizer + Qwen2-VL image processor in processor/, as the pipeline's
        c["processor"], n = word_tokenizer(root / "processor", max_length=4096, extra_words=QWEN_EDIT_TEMPLATE_WORDS,
                                           plain=True)
        c["text_encoder"] = _qwen2_5_vl(n, tokenizer=c["processor"])
        # min / max pixels: a 32 x 32 reference -> 56 x 56 -> a 4 x 4 patch grid -> 4 vision tokens
        c["image_processor"] = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
        c["image_processor"].save_pretrained(str(root / "processor"))
        c["vae"] = tiny_qwen_vae()
    elif base == "hunyuan15":  # Qwen2.5-VL text model with a chat template + ByT5 (byte-level, no vocab file)
        c["tokenizer"], n = word_tokenizer(root / "tokenizer", max_length=4096, extra_words=QWEN_TEMPLATE_WORDS,
                                           plain=True)
        c["tokenizer"].chat_template = QWEN_CHAT_TEMPLATE
        c["tokenizer"].save_pretrained(str(root / "tokenizer"))
        c["text_encoder"] = _qwen2_5_vl_text(n)
        c["tokenizer_2"] = transformers.ByT5Tokenizer()
        c["tokenizer_2"].save_pretrained(str(root / "tokenizer_2"))
        c["text_encoder_2"] = _t5("T5EncoderModel", len(c["tokenizer_2"]))
    elif base == "ltx2":  # Gemma 3 with a BOS-prepending tokenizer + the text connectors (a diffusers module)
        c["tokenizer"], n = word_tokenizer(root / "tokenizer", bos=True, max_length=2048)
        c["text_encoder"] = _gemma3(n + 3)
        from support.tiny_models import tiny_ltx2_connectors

        c["connectors"] = tiny_ltx2_connectors(GEMMA_DIM, encoder_layers=2)
    elif base in ("flux2_klein", "z_image"):  # Qwen3 (klein: its causal-LM class, 28 layers; Z-Image: the base model)
        c["tokenizer"], n = word_tokenizer(root / "tokenizer", max_length=2048, plain=True, specials=QWEN3_SPECIALS,
                                           chat_template=QWEN3_CHAT_TEMPLATE)
        c["text_encoder"] = (_qwen3("Qwen3ForCausalLM", n, 28) if base == "flux2_klein" else _qwen3("Qwen3Model", n, 3))
    elif base == "flux2_dev":  # tokenizer/ with the chat template (the real folder adds a PixtralProcessor there,
        # which needs torchvision: not installed here, so the tokenizer stands for it; see models/flux2.py)
        c["tokenizer"], _ = word_tokenizer(root / "tokenizer", max_length=2048, plain=True, specials=MISTRAL3_SPECIALS,
                                           chat_template=MISTRAL3_CHAT_TEMPLATE)
        c["text_encoder"] = _mistral3(c["tokenizer"])
    elif base == "sd3":
        c["tokenizer"] = clip_tokenizer(root / "tokenizer")
        c["text_encoder"] = _clip_model("CLIPTextModelWithProjection", len(c["tokenizer"]), "clip_l")
        c["tokenizer_2"] = clip_tokenizer(root / "tokenizer_2")
        c["text_encoder_2"] = _clip_model("CLIPTextModelWithProjection", len(c["tokenizer_2"]), "clip_g")
        c["tokenizer_3"], n = word_tokenizer(root / "tokenizer_3")
        c["text_encoder_3"] = _t5("T5EncoderModel", n)
    else:
        raise ValueError(f"no tiny components for family {family!r}")
    if family == "hunyuan_i2v":
        c["vae"] = tiny_hunyuan_vae()
    if family == "wan22_5b_i2v":
        c["vae"] = tiny_wan22_vae()
    if family == "wan_i2v":
        c["vae"] = tiny_wan_vae()
        vcfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=8)
        c["image_encoder"] = transformers.CLIPVisionModel(vcfg)
        c["image_processor"] = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                               crop_size={"height": 32, "width": 32})
    for name, obj in c.items():
        if name.startswith("tokenizer") or name == "processor" or (family == "qwen_image_edit"
                                                                    and name == "image_processor"):
            continue
        if isinstance(obj, torch.nn.Module):
            obj.eval()
        obj.save_pretrained(str(root / name))
    return c
