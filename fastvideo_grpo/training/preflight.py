"""Start-up checks, before anything heavy is loaded: the objective suits the sampler, the files a run needs exist.

``model.kwargs`` and every reward's kwargs are checked against what the adapter / reward accepts
(unknown keys are a ValueError naming the accepted ones), the paths they declare at registration
(``ADAPTERS.register(..., paths=...)``, registry.py) must exist, the adapter checks its model folder
(``missing_model_files``: e.g. a diffusers folder's subfolders), and the embeddings manifest and its
shard files must exist. Missing pieces are one FileNotFoundError listing all of them and what to do.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import List

from ..config import RunConfig

def preflight(cfg: RunConfig) -> dict:
    """Cheap start-up checks; raises FileNotFoundError / ValueError naming what is missing.

    Returns the loaded (file-checked) training manifest.
    """
    from ..algorithms.advantages import build_estimator
    from ..algorithms.objectives import build_objective
    from ..algorithms.samplers import ROLLOUTS
    from ..models import ADAPTERS
    from ..rewards import REWARDS
    from .watchdog import check_watchdog

    build_objective(cfg)  # the objective and its options, against the sampling settings (ValueError)
    build_estimator(cfg)  # grpo.advantage names a registered estimator
    ROLLOUTS.get(cfg.sampling.rollout)  # sampling.rollout names a registered sampler
    check_watchdog(cfg)  # train.watchdog against the evaluation settings and the trained rewards
    problems: List[str] = []
    # unknown adapter or key -> ValueError listing the known ones
    paths = ADAPTERS.check_kwargs(cfg.model.name, {k: v for k, v in cfg.model.kwargs.items() if k != "device"},
                                  "model.kwargs")
    missing_paths = [w for w, p in paths.items() if not Path(p).expanduser().exists()]
    for where in missing_paths:
        path = paths[where]
        problems.append(f"{where} = {path!r} does not exist (the model weights folder; download it first, "
                        f"e.g. `huggingface-cli download <repo> --local-dir {path}`, see docs/recipes.md)")
    adapter_cls = ADAPTERS.signature_of(cfg.model.name)
    if not missing_paths and inspect.isclass(adapter_cls):
        problems += adapter_cls.missing_model_files(cfg.model.kwargs)
    reward_cfgs = list(cfg.rewards) + list(cfg.eval.rewards) + list(cfg.train.watchdog.gold)
    for i, rc in enumerate(reward_cfgs):
        n, ne = len(cfg.rewards), len(cfg.eval.rewards)
        where = f"rewards[{i}] ({rc.key or rc.name})" if i < n else f"eval.rewards[{i - n}]" if i < n + ne \
            else f"train.watchdog.gold[{i - n - ne}]"
        for w, path in REWARDS.check_kwargs(rc.name, rc.kwargs, where + ".kwargs").items():
            if not Path(path).expanduser().exists():
                problems.append(f"{w} = {path!r} does not exist (reward model weights; see docs/rewards.md)")
    div_path = cfg.train.watchdog.diversity_model.get("model_path")
    if cfg.train.watchdog.diversity == "embedding" and div_path and not Path(div_path).expanduser().exists():
        problems.append(f"train.watchdog.diversity_model.model_path = {div_path!r} does not exist (a CLIP model "
                        "folder, transformers format; docs/watchdog.md)")
    if not cfg.data.manifest and not cfg.data.prompts:
        problems.append("data.manifest is not set: training reads prompt embeddings. Set data.prompts to a prompt "
                        "file (embedded on first use), or run data_prep (docs/data_prep.md) and set data.manifest to "
                        "the written manifest.json")
    for where in ("manifest", "eval_manifest"):
        path = getattr(cfg.data, where)
        if path and not (Path(path).expanduser().is_file() or (Path(path).expanduser() / "manifest.json").is_file()):
            problems.append(f"data.{where} = {path!r} does not exist: run data_prep first (docs/data_prep.md), e.g. "
                            f"`python data_prep/prep_embeddings.py --family <family> --model-path <model folder> "
                            f"--prompts <prompts.txt> --out {Path(path).parent if path.endswith('.json') else path}`")
    if problems:
        raise FileNotFoundError("cannot start training:\n  - " + "\n  - ".join(problems))
    from ..data.manifest import load_manifest, validate_manifest

    if not cfg.data.manifest:  # data.prompts not embedded yet (--check before the first run)
        return None
    manifest = validate_manifest(load_manifest(cfg.data.manifest), None, check_files=True,
                                     verify_hashes=cfg.data.verify_hashes, dedupe=cfg.data.dedupe)
    if cfg.data.eval_manifest:
        validate_manifest(load_manifest(cfg.data.eval_manifest), None, check_files=True, verify_hashes=False,
                          dedupe=cfg.data.dedupe)
    return manifest
