"""BLIP-VQA as T2I-CompBench scores attribute binding: the probability that the answer to "{noun phrase}?" is yes.

``BlipVqa(model_path)`` loads transformers' ``BlipForQuestionAnswering`` and its processor files from a local
folder (T2I-CompBench: BLIP's VQA model, ``Salesforce/blip-vqa-capfilt-large`` in transformers format).
``yes_probability``: the image (resized to the model's square size, bicubic, normalised as its processor says) and
the question (at most 35 tokens, never padded) go through the vision tower and the text encoder; the answer
decoder's first step from the decoder start token gives P(yes) / (P(yes) + P(no)) over its vocabulary
(T2I-CompBench's ``vqa_prob``). The question keeps the tokenizer's first token (transformers' BLIP; the LAVIS BLIP
that T2I-CompBench runs swaps it for its [ENC] token). ``noun_phrases`` splits a prompt into the phrases asked
about: spaCy's noun chunks when spaCy and ``en_core_web_sm`` are installed (T2I-CompBench's choice), else a split
at "and" and commas, which gives the same phrases for its attribute prompts ("a green bench and a red car"). A
prompt's score is the product over its phrases.
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..rewards._clip_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, require_files, resolve_device


def noun_phrases(prompt: str) -> List[str]:
    try:  # T2I-CompBench's own extraction, when available
        import spacy

        nlp = spacy.load("en_core_web_sm")
        return [c.text for c in nlp(prompt).noun_chunks]
    except (ImportError, OSError):
        pass
    parts = re.split(r",|\band\b", prompt.strip().rstrip("."))
    return [p.strip() for p in parts if p.strip()]


class BlipVqa:
    def __init__(self, model_path: str, device=None, dtype: torch.dtype = torch.float32, batch_size: int = 16):
        from transformers import AutoTokenizer, BlipForQuestionAnswering

        folder = require_files(model_path, [["config.json"], ["model.safetensors", "pytorch_model.bin"],
                                            ["tokenizer.json", "vocab.txt"]], "--suite-args blip_vqa_path",
                               "T2I-CompBench uses BLIP VQA: Salesforce/blip-vqa-capfilt-large (transformers format).")
        self.device = resolve_device(device)
        self.model = BlipForQuestionAnswering.from_pretrained(folder, local_files_only=True).to(dtype).eval()
        self.model.requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = self.model.config.vision_config.image_size
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pp = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(pp):
            with open(pp) as f:
                cfg = json.load(f)
            self.mean, self.std = tuple(cfg.get("image_mean", self.mean)), tuple(cfg.get("image_std", self.std))
        self.yes, self.no = (self.tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no"))
        self.bos = self.model.decoder_start_token_id
        self.batch_size, self.dtype = int(batch_size), dtype

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        s = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x.clamp(0, 1) - m) / s).to(self.device, self.dtype)

    @torch.no_grad()
    def yes_probability(self, images: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """(B,) P(yes) / (P(yes) + P(no)) for image i and question i. Questions of equal token length are batched
        together, so none is padded (the answer of a padded question would depend on how transformers masks
        the decoder's cross-attention)."""
        tokens = [self.tokenizer(q, truncation=True, max_length=35)["input_ids"] for q in questions]
        groups = {}
        for i, t in enumerate(tokens):
            groups.setdefault(len(t), []).append(i)
        out = torch.empty(len(questions))
        m = self.model
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                ids = torch.tensor([tokens[i] for i in part], device=self.device)
                image_embeds = m.vision_model(pixel_values=self.pixels(images[part]))[0]
                question = m.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          encoder_hidden_states=image_embeds)[0]
                start = torch.full((len(part), 1), self.bos, dtype=torch.long, device=self.device)
                logits = m.text_decoder(input_ids=start, encoder_hidden_states=question).logits[:, 0, :]
                p = torch.softmax(logits.float(), dim=-1)
                out[part] = (p[:, self.yes] / (p[:, self.yes] + p[:, self.no])).cpu()
        return out

    def attribute_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> List[float]:
        """T2I-CompBench's BLIP-VQA score per image: the product over the prompt's noun phrases."""
        scores = [1.0] * len(prompts)
        asks = [(i, f"{np}?") for i, p in enumerate(prompts) for np in noun_phrases(p)]
        if asks:
            idx = [i for i, _ in asks]
            probs = self.yes_probability(images[idx], [q for _, q in asks]).tolist()
            for i, pr in zip(idx, probs):
                scores[i] *= pr
        return scores
