"""``--suite geneval``: GenEval (Ghosh et al. 2023), object-focused text-to-image alignment.

Prompts: GenEval's ``evaluation_metadata.jsonl`` (its ``prompts/`` folder; one JSON object per line: ``tag``,
``prompt``, ``include`` / ``exclude`` clauses). 4 images per prompt, as GenEval. Each image is judged by
geneval_rules.py over the detections of ``detector`` (detection.py; GenEval: Mask2Former through mmdet) with
GenEval's thresholds (``threshold`` 0.3, ``counting_threshold`` 0.9, ``max_objects`` 16, ``nms_threshold`` 1,
``position_threshold`` 0.1) and, for colour clauses, the CLIP colour classifier of ``clip_path`` (colour.py;
the ``toy`` detector brings its own palette classifier). Table: the share of correct images per task and the
overall score (mean over the six tasks), GenEval's Table 2 layout.
"""

from __future__ import annotations

import json
from typing import List

from .base import SUITES, Item, Metric, Suite
from .geneval_rules import TAGS, judge, keep_detections


@SUITES.register("geneval")
class GenEvalSuite(Suite):
    name = "geneval"
    defaults = {"detector": None, "clip_path": None, "threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16,
                "nms_threshold": 1.0, "position_threshold": 0.1, "device": None}
    default_samples_per_prompt = 4
    category_titles = {"single_object": "Single object", "two_object": "Two object", "counting": "Counting",
                       "colors": "Colors", "position": "Position", "color_attr": "Color attribution"}
    prompts_hint = ("GenEval's prompts/evaluation_metadata.jsonl (github.com/djghosh13/geneval); "
                    "docs/benchmarks.md")

    def items(self) -> List[Item]:
        path = self.prompts_path
        if path.is_dir():
            path = path / "evaluation_metadata.jsonl"
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg}); expected GenEval's metadata lines") from None
            if not isinstance(meta, dict) or "prompt" not in meta or "tag" not in meta or "include" not in meta:
                raise ValueError(f"{path} line {n} lacks GenEval's 'tag' / 'prompt' / 'include' keys")
            out.append(Item(meta["prompt"], meta["tag"], meta))
        return out

    def metrics(self) -> List[Metric]:
        return [Metric("correct", "GenEval: correct images (fraction)", digits=2)]

    def scorer(self, device):
        from .detection import build_detector

        a = self.args
        if not a["detector"]:
            raise ValueError("--suite geneval needs --suite-args detector: {name: mmdet, config: ..., model_path: ...} "
                             "(GenEval's Mask2Former), a plugin, or {name: toy} for the toy task (docs/benchmarks.md)")
        detect = build_detector(a["detector"])
        colour_of = getattr(detect, "colour", None)
        if a["clip_path"]:
            from .colour import ClipColourClassifier

            colour_of = ClipColourClassifier(a["clip_path"], device=a["device"] or device)

        def score(images, items):
            raw = detect(images)
            correct = []
            for img, it, dets in zip(images, items, raw):
                kept = keep_detections(dets, it.meta["tag"], a["threshold"], a["counting_threshold"],
                                       int(a["max_objects"]), a["nms_threshold"])
                ok, _ = judge(kept, it.meta, colour_of, img, a["position_threshold"])
                correct.append(float(ok))
            return {"correct": correct}

        return score

    def category_order(self, items):
        seen = list(dict.fromkeys(it.category for it in items))
        return [t for t in TAGS if t in seen] + [t for t in seen if t not in TAGS]
