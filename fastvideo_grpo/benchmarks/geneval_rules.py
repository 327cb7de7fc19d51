"""GenEval's scoring rules over detections (Ghosh et al. 2023, ``evaluation/evaluate_images.py``), pure functions.

* ``keep_detections``: per class, detections above the confidence threshold (0.3; 0.9 for the ``counting``
  task), the most confident first, at most ``max_objects`` (16), then greedy non-maximum suppression at
  ``nms_threshold`` (1.0: none, GenEval's default);
* ``compute_iou``: boxes in inclusive pixel coordinates (+1 on each side), as GenEval;
* ``relative_position``: A relative to B from the box centres, each offset shrunk by ``position_threshold``
  (0.1) times the two boxes' summed size on that axis; "left of" / "right of" / "above" / "below" when the
  shrunk offset's share of the centre distance exceeds 0.5 on that axis;
* ``judge``: the ``include`` clauses (AND) each need ``count`` objects of the class, counted among the kept
  ones truncated to ``count``; with ``color`` at least ``count`` of them classified that colour; with
  ``position: [relation, i]`` every one of them in that relation to every object matched by clause i. The
  ``exclude`` clauses (OR) fail when the class has ``count`` or more kept objects.

``colour_of(image, detections, class) -> colours`` is the colour classifier (colour.py: GenEval's CLIP
zero-shot over its 10 colours on the masked crop). A suite's result per image is ``correct``; the task score
is the share of correct images, the overall score the mean over tasks (``tables.summarize``).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from .detection import Box, Detection, Detections

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]


def compute_iou(a: Box, b: Box) -> float:
    def area(x):
        return max(x[2] - x[0] + 1, 0) * max(x[3] - x[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(raw: Detections, tag: str, threshold: float = 0.3, counting_threshold: float = 0.9,
                    max_objects: int = 16, nms_threshold: float = 1.0) -> Detections:
    conf = counting_threshold if tag == "counting" else threshold
    out: Detections = {}
    for name, dets in raw.items():
        order = sorted(dets, key=lambda d: -d.score)  # stable: equal scores keep the detector's order
        order = [d for d in order if d.score > conf][:max_objects]
        kept = []
        while order:
            top = order.pop(0)
            kept.append(top)
            if nms_threshold != 1:
                order = [d for d in order if compute_iou(top.box, d.box) < nms_threshold]
        if kept:
            out[name] = kept
    return out


def relative_position(a: Box, b: Box, position_threshold: float = 0.1) -> Set[str]:
    """The relations of A to B ("left of", "right of", "above", "below"; image y grows downwards)."""
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    dim_a, dim_b = (abs(a[2] - a[0]), abs(a[3] - a[1])), (abs(b[2] - b[0]), abs(b[3] - b[1]))
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [max(abs(o) - position_threshold * (da + db), 0.0) * math.copysign(1.0, o) if o else 0.0
               for o, da, db in zip(offset, dim_a, dim_b)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


ColourOf = Callable[[object, Sequence[Detection], str], List[str]]


def judge(objects: Detections, metadata: Dict, colour_of: Optional[ColourOf] = None, image=None,
          position_threshold: float = 0.1) -> Tuple[bool, List[str]]:
    """(correct, reasons) of one image's kept detections against its GenEval metadata line."""
    correct, reasons = True, []
    groups: List[Optional[List[Detection]]] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        matched = True
        found = objects.get(name, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                if colour_of is None:
                    raise ValueError("a GenEval 'color' clause needs a colour classifier (--suite-args clip_path)")
                colours = colour_of(image, found, name)
                if colours.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colours.count(req['color'])} "
                                   f"{req['color']}; and " + ", ".join(f"{colours.count(c)} {c}" for c in COLORS
                                                                      if c in colours))
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        for tgt in groups[target]:
                            rels = relative_position(obj.box, tgt.box, position_threshold)
                            if relation not in rels:
                                correct = matched = False
                                reasons.append(f"expected {name} {relation} target, found {' and '.join(rels)} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name = req["class"]
        if len(objects.get(name, [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {name}<{req['count']}, found {len(objects[name])}")
    return correct, reasons
