"""A whole tiny random-init FLUX pipeline folder (model_index.json, scheduler, both text encoders and their
tokenizers, VAE, transformer), written by diffusers' own ``FluxPipeline.save_pretrained``: what a user
downloads, at toy sizes. The text encoders' widths match the tiny transformer (T5 width = its
joint_attention_dim, CLIP width = its pooled_projection_dim), so prompts can be encoded straight from it
(data.prompts) and the folder loads with plain ``FluxPipeline`` / ``DiffusionPipeline.from_pretrained``.

The scheduler is FlowMatchEulerDiscreteScheduler with the static shift 3 of the project's FLUX adapter (no
dynamic shifting), so a pipeline given the same unshifted sigmas samples on the adapter's sigma grid.
"""

from __future__ import annotations

from pathlib import Path

import torch

from support.tiny_encoders import clip_tokenizer, word_tokenizer
from support.tiny_models import tiny_flux, tiny_vae_2d

PROMPTS = [f"a {c} {s} photo" for c in ("red", "blue", "green", "white") for s in ("cat", "dog", "city")]


def build_tiny_flux_pipeline(root: Path) -> Path:
    """Write the pipeline folder at ``root`` (seed 0); returns ``root``."""
    import diffusers
    import transformers

    root = Path(root)
    torch.manual_seed(0)
    transformer = tiny_flux()
    c = transformer.config
    vae = tiny_vae_2d(scaling_factor=0.5, shift_factor=0.1)
    tok = clip_tokenizer(root / "_tok")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=c.pooled_projection_dim, intermediate_size=2 * c.pooled_projection_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=8, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))
    tok2, n = word_tokenizer(root / "_tok2", max_length=512)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=n, d_model=c.joint_attention_dim, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip.eval(), tokenizer=tok,
                                  text_encoder_2=t5.eval(), tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(str(root))
    import shutil

    shutil.rmtree(root / "_tok")
    shutil.rmtree(root / "_tok2")
    return root
