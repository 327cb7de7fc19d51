"""What a benchmark suite is (``python -m fastvideo_grpo.cli.evaluate --suite NAME``, docs/benchmarks.md).

A suite reads its prompts from local files in their published format (``items``: prompt, category and
the per-prompt metadata the protocol needs), says which per-sample values it measures (``metrics``: how
each is aggregated into the paper's table) and builds, on each rank, the ``scorer`` that turns a batch
of generated samples into those values. Sampling, the split over ranks and the tables are shared
(sampling.py, tables.py, cli.py). Suites are registered by name in ``SUITES``; ``--suite-args`` (a YAML
mapping) sets a suite's options, checked against its ``defaults``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..utils.registry import Registry

#: (images (B, 3, H, W) or (B, F, 3, H, W) in [0, 1], the B samples' items) -> {metric key: B values or None}
Scorer = Callable[[torch.Tensor, Sequence["Item"]], Dict[str, List[Optional[float]]]]

SUITES: Registry = Registry("benchmark suite")
#: model name -> ``builder(cfg, device, **policy_args)`` for models a config alone cannot rebuild (the toy demo's
#: model is pretrained by the demo and cached); other models are built by ``models.build_policy``
POLICIES: Registry = Registry("policy builder")


def build_policy(cfg, device, policy_args: Optional[Dict] = None):
    """The untrained policy of ``cfg`` (the CLI then loads the checkpoint's weights into it)."""
    if cfg.model.name in POLICIES.names():
        return POLICIES.build(cfg.model.name, cfg=cfg, device=device, **(policy_args or {}))
    if policy_args:
        raise ValueError(f"--policy-args: model {cfg.model.name!r} takes none (it is built from the config)")
    from ..models import build_policy as build

    return build(cfg, device)


@dataclass(frozen=True)
class Item:
    """One prompt of a suite: its text, its category (a column of the table) and protocol metadata."""

    prompt: str
    category: str
    meta: Dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Metric:
    """A per-sample value and its table. ``overall``: "categories" (mean of the category means: GenEval,
    HPDv2's average), "samples" (mean over every sample) or "none" (no overall column). ``scale`` multiplies
    the values in the Markdown table only (e.g. 100 for percentages); ``chunks`` > 0 also reports, per
    category, the std of the means of that many consecutive chunks of its samples (HPDv2: 10)."""

    key: str
    title: str
    overall: str = "categories"
    scale: float = 1.0
    digits: int = 4
    chunks: int = 0


class Suite:
    """Base class. Subclasses set ``name``, ``media`` ("image" / "video"), ``defaults`` (the suite-args they
    take), ``default_samples_per_prompt``, ``category_titles`` (category -> column title, in table order)
    and implement ``items``, ``metrics`` and ``scorer``."""

    name = "?"
    media = "image"
    defaults: Dict = {}
    default_samples_per_prompt = 1
    category_titles: Dict[str, str] = {}
    needs_prompts = True  # a --prompts path is required
    prompts_hint = ""  # where to get the prompt files (docs/benchmarks.md)

    def __init__(self, prompts: Optional[str], args: Optional[Dict] = None, cfg=None):
        self.cfg = cfg
        self.args = self.check_args(dict(args or {}))
        if self.needs_prompts and not prompts:
            raise ValueError(f"--suite {self.name} needs --prompts: {self.prompts_hint}")
        self.prompts_path = Path(prompts).expanduser() if prompts else None
        if self.prompts_path is not None and not self.prompts_path.exists():
            raise FileNotFoundError(f"--prompts {prompts!r} does not exist ({self.name}: {self.prompts_hint})")

    def check_args(self, args: Dict) -> Dict:
        unknown = sorted(set(args) - set(self.defaults))
        if unknown:
            raise ValueError(f"--suite-args: suite {self.name!r} does not take {unknown}; accepted: "
                             f"{sorted(self.defaults) or 'none'}")
        return {**self.defaults, **args}

    def items(self) -> List[Item]:
        raise NotImplementedError

    def metrics(self) -> List[Metric]:
        raise NotImplementedError

    def scorer(self, device: torch.device) -> Scorer:
        raise NotImplementedError

    def category_order(self, items: Sequence[Item]) -> List[str]:
        seen = list(dict.fromkeys(it.category for it in items))
        known = [c for c in self.category_titles if c in seen]
        return known + [c for c in seen if c not in known]

    def title(self, category: str) -> str:
        return self.category_titles.get(category, category)


def read_lines(path: Path) -> List[str]:
    """Non-empty lines, stripped (a prompt per line)."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def reward_scorer(reward_cfgs: Sequence[Dict], where: str) -> Callable:
    """The rewards named by ``reward_cfgs`` (``{name:, key:, kwargs:}`` mappings, as under ``rewards:``) as a
    function (images, prompts) -> {key: B scores}, built through the reward registry."""
    from ..config import RewardConfig, _build
    from ..rewards import REWARDS  # noqa: F401  (registers every reward)
    from ..rewards.build import build_reward_fns

    if not reward_cfgs:
        raise ValueError(f"{where}: name at least one reward, e.g. [{{name: hps, kwargs: {{model_path: ...}}}}]")
    cfgs = [_build(RewardConfig, dict(rc), f"{where}[{i}]") for i, rc in enumerate(reward_cfgs)]
    fns = build_reward_fns(cfgs)[0]

    def score(images, prompts):
        from ..rewards.base import compute_rewards

        scores, _ = compute_rewards(fns, images, list(prompts))
        return {k: v.tolist() for k, v in scores.items()}

    return score
