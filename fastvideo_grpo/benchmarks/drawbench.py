"""``--suite drawbench``: DrawBench's 200 prompts in 11 categories (Saharia et al. 2022, Imagen) scored with rewards.

Prompts: DrawBench's CSV as published (the Imagen authors' sheet exported as CSV; also on Hugging Face):
a header row with a prompt column (``Prompts`` / ``Prompt`` / ``prompt`` / ``prompts``) and a category column
(``Category`` / ``category``). DrawBench was built for side-by-side human ratings; RL-for-diffusion papers
report reward models over its prompts instead, which is what this suite does: every reward of ``rewards``
(default: the run's evaluation rewards, ``eval.rewards`` or the training rewards in continuous form), per
category and over all prompts ("Overall": the mean over every sample, as those papers print it).
"""

from __future__ import annotations

import csv
from typing import Dict, List

from .base import SUITES, Item, Metric, Suite, reward_scorer

PROMPT_COLUMNS = ("Prompts", "Prompt", "prompts", "prompt")
CATEGORY_COLUMNS = ("Category", "category", "Categories", "categories")


@SUITES.register("drawbench")
class DrawBenchSuite(Suite):
    name = "drawbench"
    defaults = {"rewards": None}
    prompts_hint = "DrawBench's CSV (Prompts, Category columns); docs/benchmarks.md"

    def items(self) -> List[Item]:
        with open(self.prompts_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{self.prompts_path}: no rows (expected DrawBench's CSV with a header)")
        cols = list(rows[0])
        pcol = next((c for c in PROMPT_COLUMNS if c in cols), None)
        ccol = next((c for c in CATEGORY_COLUMNS if c in cols), None)
        if pcol is None or ccol is None:
            raise ValueError(f"{self.prompts_path}: expected a prompt column ({'/'.join(PROMPT_COLUMNS)}) and a "
                             f"category column ({'/'.join(CATEGORY_COLUMNS)}); found {cols}")
        return [Item(r[pcol].strip(), r[ccol].strip()) for r in rows if r[pcol] and r[pcol].strip()]

    def _reward_cfgs(self) -> List[Dict]:
        if self.args["rewards"] is not None:
            return list(self.args["rewards"])
        cfg = self.cfg
        src = cfg.eval.rewards or cfg.rewards
        return [{"name": rc.name, "key": rc.key or rc.name, "kwargs": dict(rc.kwargs)} for rc in src]

    def metrics(self) -> List[Metric]:
        keys = [rc.get("key") or rc["name"] for rc in self._reward_cfgs()]
        return [Metric(k, f"DrawBench: {k}", overall="samples") for k in keys]

    def scorer(self, device):
        score = reward_scorer(self._reward_cfgs(), "--suite-args rewards")

        def run(images, items):
            return score(images, [it.prompt for it in items])

        return run
