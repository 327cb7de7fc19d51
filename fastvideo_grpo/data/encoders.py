"""A model family's prompt encoding loaded from a local diffusers-format folder: the generic part of data_prep.

What a family encodes and how (its encoders, tokenizer folders, template, max lengths, image inputs, CFG
default) is declared once, in its model file next to its adapter (``models/<family>.py``: a
``models.encoding.PromptEncoding`` subclass, registered with the adapter). This module only finds that
declaration by name and loads what it lists: each text encoder and its tokenizer (``from_pretrained(...,
local_files_only=True)``; tokenizers through ``AutoTokenizer``), the VAE for reference images, and the
family's extra components; each is recorded in the manifest with its class, path and config hash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Type

import torch

from ..models import encoding_for, encoding_names
from ..models.encoding import PromptEncoding, config_sha, load_pretrained


def family_names():
    """Every name ``--family`` accepts: the manifests' family names and the model names that declare one."""
    return encoding_names()


def FamilyEncoder(family: str, components: Dict[str, object], **options) -> PromptEncoding:  # noqa: N802
    """``family``'s prompt encoding over already loaded ``components`` (diffusers component names -> objects)."""
    return encoding_for(family)(components, **options)


def encoder_subfolders(cls: Type[PromptEncoding]) -> list:
    """The subfolders of a model folder that a family's prompt encoding loads (text encoders, their
    tokenizers, the VAE for reference images)."""
    need = []
    for te, _ in cls.text_encoders:
        need += [te, cls.tokenizer_folder(te)]
    if cls.vae_class is not None:
        need.append("vae")
    return need


def load_family_encoder(family: str, model_path, *, dtype=torch.float32, device="cpu", image_embeds: bool = True,
                        **options) -> PromptEncoding:
    """Load ``family``'s encoders from a local diffusers-format folder (see docs/data_prep.md)."""
    from transformers import AutoTokenizer

    cls: Type[PromptEncoding] = encoding_for(family)
    root = Path(model_path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"model path {str(root)!r} is not a folder; expected a local diffusers-format "
                                "folder with tokenizer/ and text_encoder/ subfolders (see docs/data_prep.md)")
    need = encoder_subfolders(cls)
    missing = [s for s in need if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {str(root)!r} lacks the subfolders {missing} needed for family "
                                f"{family!r} (expected: {need})")
    comps, ids = {}, {}

    def add(name, obj):
        comps[name] = obj
        ids[name] = {"class": type(obj).__name__, "path": str(root / name), "config_sha256": config_sha(root / name)}

    for te, klass in cls.text_encoders:
        tk = cls.tokenizer_folder(te)
        add(tk, AutoTokenizer.from_pretrained(str(root / tk), local_files_only=True))
        add(te, load_pretrained(klass, root / te, dtype, device))
    if cls.vae_class is not None:
        add("vae", load_pretrained(cls.vae_class, root / "vae", dtype, device, module="diffusers"))
    for name, (obj, ident) in cls.extra_components(root, dtype, device, image_embeds).items():
        comps[name], ids[name] = obj, ident
    return cls(comps, ids=ids, device=device, image_embeds=image_embeds, **options)
