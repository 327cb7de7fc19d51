"""``--suite toy``: the embedded toy task's own GenEval-like benchmark, on the CPU in seconds.

Prompts: the toy grammar (``toy/shapes.py``): ``split`` all (144 prompts, default), held (the demo's 29
held-out prompts) or train. Categories as GenEval's tasks: ``single_object`` ("one red square"),
``counting`` ("two / three ..."), ``position`` ("a red square left of a blue circle"). Per sample, with
``toy_geneval``'s object finder and checks (rewards/rules.py): ``success`` (every check passed: GenEval's
"correct"), each check's pass (``colour``: no colour the prompt does not name; ``count``; ``shape``;
``position``, relation prompts only; ``background``: clean) and ``reward`` (toy_geneval's mean of the
checks). Overall = the mean of the category means, as GenEval's overall score. 4 samples per prompt.

The toy demo's policy is rebuilt by ``toy_policy`` (its pretrained model, cached under ``cache_dir``, with the
checkpoint's weights), for this suite and any other (e.g. ``--suite geneval`` with the ``toy`` detector).
"""

from __future__ import annotations

from typing import List

from .base import SUITES, Item, Metric, Suite

CHECK_NAMES = {False: ["colour", "count", "shape"], True: ["colour", "count", "count", "shape", "shape", "position"]}


@SUITES.register("toy")
class ToySuite(Suite):
    name = "toy"
    defaults = {"split": "all", "min_pixels": 8, "max_background": 0.01}
    default_samples_per_prompt = 4
    category_titles = {"single_object": "Single object", "counting": "Counting", "position": "Position"}
    needs_prompts = False

    def items(self) -> List[Item]:
        from ..toy.shapes import all_prompts, parse_prompt, split_prompts

        split = self.args["split"]
        if split not in ("all", "held", "train"):
            raise ValueError(f"--suite-args split must be all, held or train, got {split!r}")
        prompts = all_prompts() if split == "all" else split_prompts(seed=0)[0 if split == "train" else 1]
        out = []
        for p in prompts:
            spec = parse_prompt(p)
            cat = "position" if spec.relation else ("single_object" if spec.objects[0].count == 1 else "counting")
            out.append(Item(p, cat))
        return out

    def metrics(self) -> List[Metric]:
        checks = [Metric(c, f"{c} check passed (fraction)") for c in ("colour", "count", "shape", "position",
                                                                     "background")]
        return [Metric("success", "correct images: every check passed (fraction; GenEval's metric)"), *checks,
                Metric("reward", "toy_geneval reward (mean of the checks)")]

    def scorer(self, device):
        from ..rewards.rules import background_brightness, background_check, classify_pixels, find_objects, score_image
        from ..toy.shapes import parse_prompt

        min_pixels, max_bg = int(self.args["min_pixels"]), float(self.args["max_background"])

        def score(images, items):
            imgs = images.detach().float().cpu().clamp(0, 1)
            cls = classify_pixels(imgs)
            objs = find_objects(imgs, min_pixels, cls)
            bright = background_brightness(imgs, cls).tolist()
            out = {k: [] for k in ("success", "colour", "count", "shape", "position", "background", "reward")}
            for it, o, bb in zip(items, objs, bright):
                spec = parse_prompt(it.prompt)
                checks = score_image(spec, o)
                per = {}
                for name, v in zip(CHECK_NAMES[spec.relation is not None], checks):
                    per[name] = min(per.get(name, 1.0), float(v == 1.0))  # a check passes if all its parts do
                every = list(checks)
                if max_bg > 0:  # max_background 0 leaves the background check out, as toy_geneval's
                    every.append(background_check(bb, max_bg))
                    per["background"] = float(every[-1] == 1.0)
                out["success"].append(float(all(c == 1.0 for c in every)))
                out["reward"].append(sum(every) / len(every))
                for name in ("colour", "count", "shape", "position", "background"):
                    out[name].append(per.get(name))
            return out

        return score
