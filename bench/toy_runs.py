"""Shared machinery of the toy-scale comparison scripts (bench/ablations.py, bench/algorithms.py).

A variant is the demo config plus overrides, trained from the same cached pretrained toy model by
``run_demo`` (``TOY_CACHE``: the one ``make demo`` caches, outputs/toy_pretrained under the working folder,
where ``make`` runs them; ``extra.pretrain_cache`` names another). Results are kept in ``<out>/results.json`` under keys ``name/seedN/tag``, where ``tag``
hashes the resolved base config and the script's own settings: a rerun with the same settings reuses
finished runs (resumable), a changed setting reruns, an edited comment does not.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastvideo_grpo.config import RunConfig, load_config, to_dict  # noqa: E402
from fastvideo_grpo.utils.io import atomic_write_json  # noqa: E402
from fastvideo_grpo.cli.demo import run_demo  # noqa: E402

#: the pretrained toy model's cache shared by every variant: `make demo`'s (outputs/demo -> outputs/toy_pretrained)
TOY_CACHE = "outputs/toy_pretrained"


def config_tag(config: str, *settings) -> str:
    """8 hex digits of the resolved base config plus the script's settings that change results."""
    resolved = json.dumps(to_dict(load_config(config)), sort_keys=True)
    return hashlib.sha256((resolved + "".join(str(s) for s in settings)).encode()).hexdigest()[:8]


def load_results(out: Path) -> Dict:
    path = Path(out) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(out: Path, results: Dict) -> None:
    atomic_write_json(Path(out) / "results.json", results)


def variant_config(config: str, overrides: Sequence[str], run_dir: Path, seed: int, iterations: int = 0,
                   extra: Sequence[str] = ()) -> RunConfig:
    """The base config with the variant's ``overrides``, then the run's folder, seed, iteration count
    (0: the config's) and any ``extra`` settings of the calling script."""
    run = [f"--train.output_dir={run_dir}", f"--train.seed={seed}"]
    if iterations:
        run.append(f"--train.num_iterations={iterations}")
    return load_config(config, list(overrides) + run + list(extra))


def run_variant(config: str, overrides: Sequence[str], run_dir: Path, seed: int, iterations: int = 0,
                extra: Sequence[str] = ()) -> Dict:
    """Train one variant (no images written); returns the demo's summary."""
    cfg = variant_config(config, overrides, run_dir, seed, iterations, extra)
    return run_demo(cfg, progress=False, write_images=False, cache_dir=cfg.extra.get("pretrain_cache") or TOY_CACHE)


def mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
