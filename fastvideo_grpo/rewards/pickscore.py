"""PickScore reward (Kirstain et al. 2023): a CLIP-H model fine-tuned on Pick-a-Pic.

Registry name ``pickscore``. score = exp(logit_scale) * cos(image, text) as in the PickScore
reference (typically ~18-23); ``score_mode="logit/100"`` gives the /100 values papers print
(~0.20-0.23); ``"cosine"`` the bare cosine. The model folder is ``yuvalkirstain/PickScore_v1``
(a transformers CLIPModel); its processor/tokenizer come from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``:
copy that repo's tokenizer files and preprocessor_config.json into the same folder, or pass
``tokenizer_path``.
"""

from __future__ import annotations

from .base import REWARDS, check_scores, validate_reward_inputs

HINT = ("Download `yuvalkirstain/PickScore_v1` (config.json, model.safetensors) and the tokenizer files "
        "(tokenizer.json or vocab.json+merges.txt, preprocessor_config.json) of "
        "`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` into one folder and pass it as model_path.")


@REWARDS.register("pickscore", paths=("model_path", "tokenizer_path"))
def pickscore(model_path=None, device=None, dtype="float32", batch_size=32, score_mode="logit",
              tokenizer_path=None):
    from ._clip_utils import ClipScorer

    scorer = ClipScorer(model_path, "pickscore", HINT, device=device, dtype=dtype, batch_size=batch_size,
                        score_mode=score_mode, need_text=tokenizer_path is None)
    if tokenizer_path is not None:
        from transformers import AutoTokenizer

        from ._clip_utils import require_files

        tp = require_files(tokenizer_path, [["tokenizer.json", "vocab.json"]], "pickscore tokenizer", HINT)
        scorer.tokenizer = AutoTokenizer.from_pretrained(tp, local_files_only=True)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        scores = check_scores("pickscore", scorer.pair_scores(images, prompts), images.shape[0])
        return scores, {"pickscore_mean": float(scores.mean())}

    fn.scorer, fn.modules, fn.device = scorer, [scorer.model], scorer.device
    return fn
