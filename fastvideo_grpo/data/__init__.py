"""Datasets over preprocessed prompt embeddings, manifest checks, and the preprocessing core (prep.py).

Heavy pieces (transformers, diffusers, safetensors) are imported inside functions.
"""

from .dataset import PromptEmbeddingDataset, collate_prompt_embeddings, is_eval_prompt
from .manifest import hash_tensors, load_manifest, validate_manifest
from .prompts import PromptRecord, read_prompts

__all__ = [
    "PromptEmbeddingDataset", "collate_prompt_embeddings", "is_eval_prompt", "hash_tensors", "load_manifest",
    "validate_manifest", "PromptRecord", "read_prompts",
]
