"""Model families, one file each; importing this package imports every module in it, which registers
each family's adapter -- and, in the same registration, its prompt encoding -- in ADAPTERS.

A new family is one file here (an adapter, its ``PromptEncoding``, one ``@ADAPTERS.register(...,
encoding=...)``) plus its recipe (configs/) and architecture file (configs/arch/, for the planner); see
docs/adding_a_model.md. Adapter modules import diffusers lazily inside their factories, so importing this
is cheap.
"""

import importlib
import pkgutil
from typing import List, Type

from .base import ADAPTERS, PolicyAdapter, index_cond  # noqa: F401
from .encoding import PromptEncoding

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_policy(cfg, device):
    """The adapter named by ``model.name`` with ``model.kwargs`` (plus ``device`` unless given there)."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("device", str(device))
    return ADAPTERS.build(cfg.model.name, **kwargs)


def _encodings():
    """model name -> the PromptEncoding its registration declares (families that encode prompts offline)."""
    out = {}
    for name in ADAPTERS.names():
        enc = ADAPTERS.info(name).get("encoding")
        if enc is not None:
            out[name] = enc
    return out


def encoding_names() -> List[str]:
    """The names a family's prompt encoding is found by: its own (``PromptEncoding.family``, the manifests'
    name) and those of the models that declare it."""
    encs = _encodings()
    return sorted(set(encs) | {e.family for e in encs.values()})


def encoding_for(name: str) -> Type[PromptEncoding]:
    """The prompt encoding of family / model ``name``; ValueError naming the known ones."""
    encs = _encodings()
    if name in encs:
        return encs[name]
    for enc in encs.values():
        if enc.family == name:
            return enc
    raise ValueError(f"no prompt encoding is declared for {name!r}; known families: {', '.join(encoding_names())} "
                     "(a family declares it in its model file: ADAPTERS.register(..., encoding=...))")
