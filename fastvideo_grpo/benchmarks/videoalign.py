"""``--suite videoalign``: text-to-video prompts scored by VideoAlign (VideoReward: VQ, MQ, TA) through the
package's ``video_align`` reward (rewards/video_align.py; ``reward_kwargs`` are its kwargs: ``model_path``, ...).

Prompts: a text file (one prompt per line; category "all"), VBench's ``VBench_full_info.json`` (category = the
prompt's first VBench dimension) or a folder of ``<category>.txt`` files (e.g. VBench's prompts_per_category/).
Per video the three dimensions' scores (the reward's ``info``; raw by default, ``normalize: true`` as VideoAlign's
``use_norm``) and "overall" = VQ + MQ + TA (VideoAlign's Overall). Tables: one per dimension, per category and
the mean over every video.
"""

from __future__ import annotations

import json
from typing import List

from .base import SUITES, Item, Metric, Suite, read_lines

DIMS = ("VQ", "MQ", "TA")


@SUITES.register("videoalign")
class VideoAlignSuite(Suite):
    name = "videoalign"
    media = "video"
    defaults = {"reward_kwargs": {}}
    default_samples_per_prompt = 1
    prompts_hint = "a prompts .txt file, VBench_full_info.json or a folder of <category>.txt files"

    def items(self) -> List[Item]:
        path = self.prompts_path
        if path.is_dir():
            return [Item(p, f.stem) for f in sorted(path.glob("*.txt")) for p in read_lines(f)]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return [Item(e["prompt_en"], (e.get("dimension") or ["all"])[0]) for e in data]
        return [Item(p, "all") for p in read_lines(path)]

    def metrics(self) -> List[Metric]:
        return [Metric(d, f"VideoAlign {d}", overall="samples") for d in DIMS] + \
            [Metric("overall", "VideoAlign Overall (VQ + MQ + TA)", overall="samples")]

    def scorer(self, device):
        from ..rewards import REWARDS

        kw = dict(self.args["reward_kwargs"])
        kw.setdefault("dimensions", list(DIMS))
        kw.setdefault("device", str(device))
        fn = REWARDS.build("video_align", **kw)

        def score(videos, items):
            if videos.ndim != 5:
                raise ValueError("--suite videoalign scores videos (B, F, 3, H, W); this model generates images")
            _, info = fn(videos, [it.prompt for it in items])
            out = {d: [float(x) for x in info[d]] for d in DIMS}
            out["overall"] = [sum(out[d][i] for d in DIMS) for i in range(len(items))]
            return out

        return score
