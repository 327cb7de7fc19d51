"""HPS-v2.1 reward: an OpenCLIP ViT-H-14 fine-tuned on human preferences; score = cos(image, text).

Registry name ``hps``. ``open_clip`` is not a dependency (it needs torchvision and may pull a CUDA
torch), so the OpenCLIP checkpoint runs through transformers' ``CLIPModel`` after a key mapping:

===============================================  ==================================================
OpenCLIP key                                     transformers CLIPModel key
===============================================  ==================================================
visual.conv1.weight                              vision_model.embeddings.patch_embedding.weight
visual.class_embedding                           vision_model.embeddings.class_embedding
visual.positional_embedding                      vision_model.embeddings.position_embedding.weight
visual.ln_pre.*                                  vision_model.pre_layrnorm.*
visual.transformer.resblocks.N.ln_1.*            vision_model.encoder.layers.N.layer_norm1.*
visual.transformer.resblocks.N.attn.in_proj_*    ...layers.N.self_attn.{q,k,v}_proj.* (split in 3 rows)
visual.transformer.resblocks.N.attn.out_proj.*   ...layers.N.self_attn.out_proj.*
visual.transformer.resblocks.N.ln_2.*            ...layers.N.layer_norm2.*
visual.transformer.resblocks.N.mlp.c_fc.*        ...layers.N.mlp.fc1.*
visual.transformer.resblocks.N.mlp.c_proj.*      ...layers.N.mlp.fc2.*
visual.ln_post.*                                 vision_model.post_layernorm.*
visual.proj  (width, embed)                      visual_projection.weight (embed, width) = proj.T
token_embedding.weight                           text_model.embeddings.token_embedding.weight
positional_embedding                             text_model.embeddings.position_embedding.weight
transformer.resblocks.N.*                        text_model.encoder.layers.N.* (as for the vision tower)
ln_final.*                                       text_model.final_layer_norm.*
text_projection (width, embed)                   text_projection.weight = text_projection.T
logit_scale                                      logit_scale (both hold the log)
===============================================  ==================================================

OpenCLIP pools text at ``argmax(token ids)`` (the end-of-text token has the largest id, 49407);
transformers pools at the first ``eos_token_id``, which is the same position when eos is the
largest id, so ``eos_token_id`` is set to ``vocab_size - 1``. ViT-H-14 uses exact GELU and
80-wide vision heads (16 heads of 1280), 64-wide text heads. ``attn_mask`` buffers are dropped.

Two ways to use the HPS_v2.1_compressed.pt checkpoint (huggingface.co/xswu/HPSv2):
* convert once: ``python -m fastvideo_grpo.rewards.openclip_convert --checkpoint HPS_v2.1_compressed.pt
  --tokenizer <folder with the CLIP tokenizer> --out ckpts/hps_v2.1_hf`` then ``model_path=ckpts/hps_v2.1_hf``;
* or pass ``checkpoint=`` and ``tokenizer_path=`` to the reward (converted in memory each start).
The tokenizer is the standard CLIP BPE one, e.g. from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

from .base import REWARDS, check_scores, validate_reward_inputs

HINT = ("Get HPS_v2.1_compressed.pt from huggingface.co/xswu/HPSv2 and a CLIP tokenizer (tokenizer.json or "
        "vocab.json+merges.txt, e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K); convert with "
        "`python -m fastvideo_grpo.rewards.openclip_convert --checkpoint HPS_v2.1_compressed.pt --tokenizer <dir> "
        "--out <dir>` and pass model_path=<out dir>, or pass checkpoint= and tokenizer_path= directly.")


@REWARDS.register("hps", paths=("model_path", "checkpoint", "tokenizer_path"))
def hps(model_path=None, checkpoint=None, tokenizer_path=None, device=None, dtype="float32", batch_size=32,
        score_mode="cosine", vision_head_width=80, text_head_width=64, hidden_act="gelu"):
    """``model_path``: a converted transformers folder; or ``checkpoint`` (OpenCLIP .pt) + ``tokenizer_path``."""
    from ._clip_utils import ClipScorer, require_files
    from .openclip_convert import load_openclip_checkpoint

    model = tokenizer = None
    if checkpoint is not None:
        if tokenizer_path is None:
            raise ValueError("hps: checkpoint= needs tokenizer_path= (a folder with the CLIP tokenizer files)")
        from transformers import AutoTokenizer

        tp = require_files(tokenizer_path, [["tokenizer.json", "vocab.json"]], "hps tokenizer", HINT)
        tokenizer = AutoTokenizer.from_pretrained(tp, local_files_only=True)
        model = load_openclip_checkpoint(checkpoint, vision_head_width=vision_head_width,
                                         text_head_width=text_head_width, hidden_act=hidden_act)
    scorer = ClipScorer(model_path, "hps", HINT, device=device, dtype=dtype, batch_size=batch_size,
                        score_mode=score_mode, model=model, tokenizer=tokenizer)

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        scores = check_scores("hps", scorer.pair_scores(images, prompts), images.shape[0])
        return scores, {"hps_mean": float(scores.mean())}

    fn.scorer, fn.modules, fn.device = scorer, [scorer.model], scorer.device
    return fn
