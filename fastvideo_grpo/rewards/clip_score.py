"""CLIP score reward: cosine similarity of each image with ITS OWN prompt (transformers CLIPModel).

Registry name ``clip_score``. The paper's CLIP numbers (0.36-0.43) are cosines of an OpenCLIP
ViT-H-14 (laion2B) model; any CLIP folder loadable by ``CLIPModel.from_pretrained`` works, e.g.
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` or ``openai/clip-vit-large-patch14`` downloaded beforehand.
``score_mode="logit/100"`` multiplies the cosine by exp(logit_scale)/100 (= 1 for the usual
logit_scale of ln 100); ``"logit"`` gives the raw CLIP logit. Videos: frames scored and averaged.
"""

from __future__ import annotations

from .base import REWARDS, check_scores, validate_reward_inputs

HINT = ("Download a CLIP checkpoint beforehand, e.g. `huggingface-cli download "
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --local-dir ckpts/clip-vit-h-14` "
        "(config.json, model.safetensors, tokenizer.json/vocab.json+merges.txt, preprocessor_config.json).")


@REWARDS.register("clip_score", paths=("model_path",))
def clip_score(model_path=None, device=None, dtype="float32", batch_size=32, score_mode="cosine"):
    from ._clip_utils import ClipScorer

    scorer = ClipScorer(model_path, "clip_score", HINT, device=device, dtype=dtype, batch_size=batch_size,
                        score_mode=score_mode)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        scores = check_scores("clip_score", scorer.pair_scores(images, prompts), images.shape[0])
        return scores, {"clip_score_mean": float(scores.mean())}

    fn.scorer, fn.modules, fn.device = scorer, [scorer.model], scorer.device
    return fn
