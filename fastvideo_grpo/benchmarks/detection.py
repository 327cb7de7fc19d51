"""The object-detector protocol of the detection-based suites (GenEval, T2I-CompBench's spatial categories).

A detector is a callable ``detect(images) -> per image {class name: [Detection, ...]}`` over a batch of images
(B, 3, H, W) in [0, 1]; boxes are (x1, y1, x2, y2) in pixels of that image, ``score`` the confidence and
``mask`` an optional (H, W) bool instance mask. It returns every detection it has: the suites apply their
protocol's thresholds themselves. Detectors are built by name from ``DETECTORS`` with their options
(``{name: ..., model_path: ..., ...}`` in ``--suite-args``):

* ``mmdet``: GenEval's own detector, Mask2Former (Swin-S, COCO) through mmdetection 2.x (``config`` and
  ``model_path``: the ``.pth``); needs ``mmdet``/``mmcv``, which are not installed with this package (and
  not run by its tests: ``detections_from_mmdet`` converts mmdet's output and is tested on that format).
* ``plugin``: ``target: "module:function"``, called with the remaining options, returning a detector (any
  model a user can load from a local path).
* ``toy``: the toy task's object finder (rules.py) as a detector of squares, circles and triangles, for
  runs on the toy task and for tests of the suites end to end.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..utils.registry import Registry

Box = Tuple[float, float, float, float]


@dataclass
class Detection:
    box: Box  # (x1, y1, x2, y2), pixels
    score: float
    mask: Optional[torch.Tensor] = None  # (H, W) bool


Detections = Dict[str, List[Detection]]
Detector = Callable[[torch.Tensor], List[Detections]]

DETECTORS: Registry = Registry("detector")


def build_detector(spec: Dict, where: str = "--suite-args detector") -> Detector:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{where} must be a mapping with a name ({', '.join(DETECTORS.names())}) and its options, "
                         "e.g. {name: mmdet, config: ..., model_path: ...}")
    opts = {k: v for k, v in spec.items() if k != "name"}
    DETECTORS.check_kwargs(spec["name"], opts, where)
    return DETECTORS.build(spec["name"], **opts)


# ----------------------------------------------------------------------------- mmdetection (GenEval's detector)


def detections_from_mmdet(result, classnames: Sequence[str]) -> Detections:
    """mmdet 2.x ``inference_detector`` output for one image (``bbox`` or ``(bbox, segm)``: per class an (N, 5)
    array of x1, y1, x2, y2, score and, with masks, a list of N (H, W) bool arrays) -> detections per class."""
    bbox = result[0] if isinstance(result, tuple) else result
    segm = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    out: Detections = {}
    for c, name in enumerate(classnames):
        rows = bbox[c]
        dets = []
        for i in range(len(rows)):
            x1, y1, x2, y2, s = (float(v) for v in rows[i][:5])
            mask = None if segm is None else torch.as_tensor(segm[c][i]).bool()
            dets.append(Detection((x1, y1, x2, y2), s, mask))
        if dets:
            out[name] = dets
    return out


@DETECTORS.register("mmdet", paths=("config", "model_path", "classnames"))
def mmdet_detector(config: str, model_path: str, classnames: Optional[str] = None, device: str = "cuda"):
    """GenEval's setup: ``config`` = mmdet's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py``, ``model_path``
    = the ``.pth`` GenEval's ``download_models.sh`` fetches, ``classnames`` = a file with one class per line
    (GenEval's ``object_names.txt``; default: the model's ``CLASSES``)."""
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError as e:
        raise ValueError("detector mmdet needs mmdetection 2.x (GenEval's README: mim install mmdet==2.27.0) in this "
                         "environment; or give a detector plugin") from e
    model = init_detector(config, model_path, device=device)
    names = [ln.strip() for ln in open(classnames)] if classnames else list(model.CLASSES)

    def detect(images):
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()[..., ::-1]
        return [detections_from_mmdet(inference_detector(model, a.copy()), names) for a in arr]  # mmdet reads BGR

    return detect


@DETECTORS.register("plugin")
def plugin_detector(target: str, **options):
    """``target: "package.module:function"``; the function gets the other options and returns a detector."""
    if ":" not in str(target):
        raise ValueError(f"detector plugin target must be 'module:function', got {target!r}")
    mod, fn = str(target).split(":", 1)
    return getattr(importlib.import_module(mod), fn)(**options)


# ----------------------------------------------------------------------------- the toy task's objects


def toy_detections(image: torch.Tensor, min_pixels: int = 8) -> Detections:
    """The toy task's objects in one (3, H, W) image: class = the shape, score 1, box and mask of the component.
    Colours are the toy palette's (``toy_colour``)."""
    from ..rewards.rules import _NAMES, classify_pixels, classify_shape, connected_components

    cls = classify_pixels(image.unsqueeze(0).float().clamp(0, 1))[0]
    out: Detections = {}
    for ci in range(1, len(_NAMES)):
        labels = connected_components((cls == ci).unsqueeze(0))[0]
        for lab in torch.unique(labels[labels > 0]).tolist():
            m = labels == lab
            if int(m.sum()) < min_pixels:
                continue
            ys, xs = torch.nonzero(m, as_tuple=True)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
            height = y1 - y0 + 1
            cy = float(ys.float().mean())
            obj = {"fill": int(m.sum()) / (height * (x1 - x0 + 1)), "skew": (cy - (y0 + y1) / 2) / height}
            out.setdefault(classify_shape(obj), []).append(Detection((x0, y0, x1, y1), 1.0, m))
    return out


def toy_colour(image: torch.Tensor, detections: Sequence[Detection], classname: str) -> List[str]:
    """Each detection's colour: the toy palette colour most of its mask's pixels are nearest to."""
    from ..rewards.rules import _NAMES, classify_pixels

    cls = classify_pixels(image.unsqueeze(0).float().clamp(0, 1))[0]
    out = []
    for d in detections:
        if d.mask is not None:
            vals = cls[d.mask]
        else:
            vals = cls[int(d.box[1]):int(d.box[3]) + 1, int(d.box[0]):int(d.box[2]) + 1].flatten()
        vals = vals[vals > 0]
        out.append(_NAMES[int(torch.mode(vals).values)] if vals.numel() else "black")
    return out


@DETECTORS.register("toy")
def toy_detector(min_pixels: int = 8):
    def detect(images):
        return [toy_detections(img, min_pixels) for img in images]

    detect.colour = toy_colour
    return detect
