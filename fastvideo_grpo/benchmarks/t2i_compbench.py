"""``--suite t2i_compbench``: T2I-CompBench (Huang et al. 2023), compositional text-to-image generation.

Prompts: its ``examples/dataset/`` folder: ``{color,shape,texture,spatial,non_spatial,complex}_val.txt`` (one
prompt per line; the categories whose file is present are run, ``categories`` picks some), plus for the
complex category ``complex_val_spatial.txt`` / ``complex_val_action.txt`` when present. 10 images per prompt.
Each category's metric, as the benchmark's:

* color, shape, texture: BLIP-VQA (blip_vqa.py; ``blip_vqa_path``): the product over the prompt's noun phrases of
  P(yes | "{phrase}?");
* spatial: the detector (detection.py; T2I-CompBench: UniDet) finds the first and last object nouns of the prompt
  (the word before the spatial phrase and the prompt's last word; girl / boy / man / woman count as person) and
  ``spatial_score`` applies its rule: 0.25 x each found object's confidence plus half the relation's score
  (``determine_position``: centres, IoU threshold 0.1, distance threshold 150 px), 0 below 0.5;
* non_spatial: CLIPScore (``clip_path``; T2I-CompBench: OpenAI ViT-B/32), the cosine of image and prompt;
* complex: "3-in-1": the mean of BLIP-VQA and spatial for prompts listed in complex_val_spatial.txt, of BLIP-VQA
  and CLIPScore for those in complex_val_action.txt, of all three otherwise.

Not run: the 3d_spatial and numeracy categories of T2I-CompBench++ (depth and counting experts); spaCy's part of
speech tagging (the object nouns and, for complex prompts, CLIPScore on the prompt without adjectives) is
replaced as described, which matches the simple "a X on the left of a Y" prompts.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .base import SUITES, Item, Metric, Suite, read_lines

CATEGORIES = {"color": "Color", "shape": "Shape", "texture": "Texture", "spatial": "Spatial",
              "non_spatial": "Non-spatial", "complex": "Complex"}
ATTRIBUTE = ("color", "shape", "texture")
LOCALITY = ["on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top of",
            "on top of"]
PERSON = {"girl", "boy", "man", "woman"}


def determine_position(locality: str, box1, box2, iou_threshold: float = 0.1, distance_threshold: float = 150.0) -> float:
    """T2I-CompBench's relation score of object 1 (box1) and object 2 (box2), boxes (x1, y1, x2, y2)."""
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    ox = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
    oy = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    inter = ox * oy
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    iou = inter / union if union else 0.0

    def graded() -> float:
        return 1.0 if iou < iou_threshold else iou_threshold / iou

    if locality in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    if locality == "on the right of":
        return graded() if dx < 0 and abs(dx) > abs(dy) else 0.0
    if locality == "on the left of":
        return graded() if dx > 0 and abs(dx) > abs(dy) else 0.0
    if locality == "on the bottom of":
        return graded() if dy < 0 and abs(dy) > abs(dx) else 0.0
    if locality == "on the top of":
        return graded() if dy > 0 and abs(dy) > abs(dx) else 0.0
    return 0.0  # "on top of" and unknown phrases score 0, as the released rule


def spatial_objects(prompt: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(locality, object 1, object 2): the first spatial phrase in the prompt, the word before it, the last word."""
    text = prompt.strip().rstrip(".").lower()
    loc = next((w for w in LOCALITY if w in text), None)
    if loc is None:
        return None, None, None
    before, after = text.split(loc, 1)
    w1 = before.split()[-1] if before.split() else None
    w2 = after.split()[-1] if after.split() else None
    w1, w2 = ("person" if w in PERSON else w for w in (w1, w2))
    return loc, w1, w2


def spatial_score(prompt: str, detections: Dict) -> float:
    """T2I-CompBench's UniDet score of one image from its detections ({class: [Detection]}, the most confident of
    each class used)."""
    loc, o1, o2 = spatial_objects(prompt)
    best = {k: max(v, key=lambda d: d.score) for k, v in detections.items() if v}
    if o1 in best and o2 in best:
        b1, b2 = best[o1], best[o2]
        score = 0.25 * b1.score + 0.25 * b2.score + determine_position(loc, b1.box, b2.box) / 2
    elif o1 in best:
        score = 0.25 * best[o1].score
    elif o2 in best:
        score = 0.25 * best[o2].score
    else:
        score = 0.0
    return 0.0 if score < 0.5 else score


@SUITES.register("t2i_compbench")
class T2ICompBenchSuite(Suite):
    name = "t2i_compbench"
    defaults = {"categories": list(CATEGORIES), "blip_vqa_path": None, "clip_path": None, "detector": None,
                "device": None}
    default_samples_per_prompt = 10
    category_titles = dict(CATEGORIES)
    prompts_hint = "T2I-CompBench's examples/dataset folder ({category}_val.txt files); docs/benchmarks.md"
    notes = ["T2I-CompBench++'s 3d_spatial and numeracy categories are not run; object nouns come from the prompt's "
             "wording instead of spaCy (docs/benchmarks.md)."]

    def items(self) -> List[Item]:
        wanted = list(self.args["categories"])
        unknown = [c for c in wanted if c not in CATEGORIES]
        if unknown:
            raise ValueError(f"--suite-args categories: {unknown} are not run (known: {list(CATEGORIES)})")
        folder = self.prompts_path if self.prompts_path.is_dir() else self.prompts_path.parent
        self.complex_kind: Dict[str, str] = {}
        for kind in ("spatial", "action"):
            f = folder / f"complex_val_{kind}.txt"
            if f.is_file():
                for p in read_lines(f):
                    self.complex_kind[p.split(".")[0].lower()] = kind
        out = []
        for c in wanted:
            f = folder / f"{c}_val.txt"
            if f.is_file():
                out += [Item(p, c) for p in read_lines(f)]
        if not out:
            raise FileNotFoundError(f"no {{category}}_val.txt files for {wanted} in {folder} ({self.prompts_hint})")
        return out

    def metrics(self) -> List[Metric]:
        return [Metric("score", "T2I-CompBench: BLIP-VQA (attributes), UniDet rule (spatial), CLIPScore "
                       "(non-spatial), 3-in-1 (complex)", overall="none")]

    def scorer(self, device):
        a = self.args
        dev = a["device"] or device
        cats = set(a["categories"])
        blip = clip = detect = None
        if cats & {*ATTRIBUTE, "complex"}:
            if not a["blip_vqa_path"]:
                raise ValueError("--suite-args blip_vqa_path is needed for color / shape / texture / complex")
            from .blip_vqa import BlipVqa

            blip = BlipVqa(a["blip_vqa_path"], device=dev)
        if cats & {"non_spatial", "complex"}:
            if not a["clip_path"]:
                raise ValueError("--suite-args clip_path (CLIP ViT-B/32) is needed for non_spatial / complex")
            from ..rewards._clip_utils import ClipScorer

            clip = ClipScorer(a["clip_path"], "--suite-args clip_path", "T2I-CompBench uses OpenAI CLIP ViT-B/32.",
                              device=dev)
        if cats & {"spatial", "complex"}:
            if not a["detector"]:
                raise ValueError("--suite-args detector is needed for spatial / complex (T2I-CompBench: UniDet)")
            from .detection import build_detector

            detect = build_detector(a["detector"])
        kinds = getattr(self, "complex_kind", {})

        def score(images, items):
            prompts = [it.prompt for it in items]
            need = {it.category for it in items}
            attr = blip.attribute_scores(images, prompts) if need & {*ATTRIBUTE, "complex"} else None
            cs = clip.pair_scores(images, prompts).tolist() if need & {"non_spatial", "complex"} else None
            dets = detect(images) if need & {"spatial", "complex"} else None
            out = []
            for i, it in enumerate(items):
                if it.category in ATTRIBUTE:
                    out.append(attr[i])
                elif it.category == "non_spatial":
                    out.append(cs[i])
                elif it.category == "spatial":
                    out.append(spatial_score(it.prompt, dets[i]))
                else:  # complex: 3-in-1
                    sp = spatial_score(it.prompt, dets[i])
                    kind = kinds.get(it.prompt.split(".")[0].lower())
                    parts = [attr[i], sp] if kind == "spatial" else [attr[i], cs[i]] if kind == "action" else \
                        [attr[i], sp, cs[i]]
                    out.append(sum(parts) / len(parts))
            return {"score": out}

        return score
