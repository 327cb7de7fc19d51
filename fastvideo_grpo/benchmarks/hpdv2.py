"""``--suite hpdv2``: HPDv2's benchmark prompts scored with HPS v2.1 per style (Wu et al. 2023, HPSv2's protocol).

Prompts: HPDv2's ``benchmark/`` folder with ``anime.json``, ``concept-art.json``, ``paintings.json`` and
``photo.json`` (each a JSON list of 800 prompts), or one JSON file mapping style -> prompt list (what
``hpsv2.benchmark_prompts('all')`` returns). One image per prompt. The score is the reward ``reward`` (default
``{name: hps}``: the package's HPS-v2.1, cosine of image and text features, as HPSv2's benchmark; its
``kwargs`` name the weights) and the table reports it x100 per style as HPSv2 prints it: the mean over the
style's prompts and the std of the means of 10 consecutive chunks (80 prompts each); "Overall" is the average
over the styles (the leaderboard's "Averaged").
"""

from __future__ import annotations

import json
from typing import List

from .base import SUITES, Item, Metric, Suite, reward_scorer

STYLES = {"anime": "Animation", "concept-art": "Concept-art", "paintings": "Painting", "photo": "Photo"}


@SUITES.register("hpdv2")
class HPDv2Suite(Suite):
    name = "hpdv2"
    defaults = {"reward": {"name": "hps"}, "styles": list(STYLES)}
    category_titles = dict(STYLES)
    prompts_hint = ("the folder holding HPDv2's benchmark/{anime,concept-art,paintings,photo}.json (Hugging Face "
                    "dataset zhwang/HPDv2); docs/benchmarks.md")

    def items(self) -> List[Item]:
        styles = list(self.args["styles"])
        unknown = [s for s in styles if s not in STYLES]
        if unknown:
            raise ValueError(f"--suite-args styles: {unknown} are not HPDv2 styles ({list(STYLES)})")
        path = self.prompts_path
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON mapping style -> prompts (or give the benchmark folder)")
        else:
            data = {}
            for s in styles:
                f = path / f"{s}.json"
                if not f.is_file():
                    raise FileNotFoundError(f"{f} not found: --prompts must hold HPDv2's {s}.json ({self.prompts_hint})")
                data[s] = json.loads(f.read_text(encoding="utf-8"))
        out = []
        for s in styles:
            prompts = data.get(s)
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"HPDv2 style {s!r}: expected a JSON list of prompt strings in {path}")
            out += [Item(p, s) for p in prompts]
        return out

    def _key(self) -> str:
        r = self.args["reward"]
        return r.get("key") or r.get("name", "hps")

    def metrics(self) -> List[Metric]:
        return [Metric(self._key(), f"HPDv2 benchmark: {self._key()} per style (mean ± std of 10 chunk means)",
                       scale=100.0, digits=2, chunks=10)]

    def scorer(self, device):
        score = reward_scorer([self.args["reward"]], "--suite-args reward")

        def run(images, items):
            return score(images, [it.prompt for it in items])

        return run
