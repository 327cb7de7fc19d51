"""Start-up checks, before anything heavy is loaded: the files a run needs exist.

Every path in ``model.kwargs`` and the reward kwargs (by name: ``*_path``, ``checkpoint``, ``*_dir``,
``*_file``), the model folder's subfolders, and the embeddings manifest with its shard files. A missing
piece is one FileNotFoundError listing everything missing and what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .config import RunConfig

#: model.kwargs / reward kwargs whose names end like this are paths that must exist at start-up
_PATH_SUFFIXES = ("_path", "checkpoint", "_dir", "_file")


def _path_like_values(kwargs: Dict, where: str):
    for k, v in (kwargs or {}).items():
        if isinstance(v, str) and v and (k.endswith(_PATH_SUFFIXES) or k == "checkpoint"):
            yield f"{where}.{k}", v


def _missing_subfolders(factory, model_path: str) -> List[str]:
    """Subfolders the adapter will load (``model_subfolder`` + ``vae``), read from the class the factory
    returns (its return annotation): checked here so that nothing heavy is loaded before the message."""
    import typing

    try:
        cls = typing.get_type_hints(factory).get("return")
    except Exception:
        return []
    sub = getattr(cls, "model_subfolder", None)
    if not isinstance(cls, type) or not sub or not getattr(cls, "vae_class", None):
        return []
    from .models.diffusers_base import require_subfolders

    try:
        require_subfolders(model_path, (sub, "vae"))
    except (FileNotFoundError, ValueError) as e:
        return [str(e)]
    return []


def preflight(cfg: RunConfig) -> dict:
    """Cheap start-up checks; raises FileNotFoundError / ValueError naming what is missing.

    Returns the loaded (file-checked) training manifest.
    """
    from .models import ADAPTERS
    from .rewards import REWARDS

    factory = ADAPTERS.get(cfg.model.name)  # unknown adapter -> ValueError listing the known ones
    problems: List[str] = []
    for where, path in _path_like_values(cfg.model.kwargs, "model.kwargs"):
        if not Path(path).expanduser().exists():
            problems.append(f"{where} = {path!r} does not exist (the model weights folder; download it first, "
                            f"e.g. `huggingface-cli download <repo> --local-dir {path}`, see docs/recipes.md)")
        elif where.endswith(".model_path"):
            problems += _missing_subfolders(factory, path)
    reward_cfgs = list(cfg.rewards) + list(cfg.eval.rewards)
    for i, rc in enumerate(reward_cfgs):
        REWARDS.get(rc.name)
        n = len(cfg.rewards)
        where = f"rewards[{i}] ({rc.key or rc.name})" if i < n else f"eval.rewards[{i - n}]"
        for w, path in _path_like_values(rc.kwargs, where + ".kwargs"):
            if not Path(path).expanduser().exists():
                problems.append(f"{w} = {path!r} does not exist (reward model weights; see docs/rewards.md)")
    if not cfg.data.manifest:
        problems.append("data.manifest is not set: training reads precomputed prompt embeddings. Run data_prep "
                        "(docs/data_prep.md) and set data.manifest to the written manifest.json")
    for where in ("manifest", "eval_manifest"):
        path = getattr(cfg.data, where)
        if path and not (Path(path).expanduser().is_file() or (Path(path).expanduser() / "manifest.json").is_file()):
            problems.append(f"data.{where} = {path!r} does not exist: run data_prep first (docs/data_prep.md), e.g. "
                            f"`python data_prep/prep_embeddings.py --family <family> --model-path <model folder> "
                            f"--prompts <prompts.txt> --out {Path(path).parent if path.endswith('.json') else path}`")
    if problems:
        raise FileNotFoundError("cannot start training:\n  - " + "\n  - ".join(problems))
    from .data.manifest import load_manifest, validate_manifest

    manifest = validate_manifest(load_manifest(cfg.data.manifest), None, check_files=True,
                                     verify_hashes=cfg.data.verify_hashes, dedupe=cfg.data.dedupe)
    if cfg.data.eval_manifest:
        validate_manifest(load_manifest(cfg.data.eval_manifest), None, check_files=True, verify_hashes=False,
                          dedupe=cfg.data.dedupe)
    return manifest
