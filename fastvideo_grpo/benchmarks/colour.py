"""GenEval's colour classifier: CLIP zero-shot over its 10 colours on each detected object's crop.

As GenEval's ``color_classification``: the object's mask is composited over a #999 grey background (the whole
image when the detection has no mask), cropped to its box (rounded to pixels, as PIL's crop), and CLIP
(GenEval: OpenAI ViT-L/14; here any CLIP in transformers format from a local folder) scores it against one
embedding per colour: the mean of the L2-normalised text embeddings of three templates ("a photo of a {c}
{class}", "a photo of a {c}-colored {class}", "a photo of a {c} object"), normalised again (clip_benchmark's
zero-shot classifier). The colour with the highest cosine wins. Embeddings per class are cached.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from .detection import Detection
from .geneval_rules import COLORS

TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
BACKGROUND = 153 / 255  # GenEval's bgcolor "#999"


def masked_crop(image: torch.Tensor, det: Detection) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> the detection's crop, its mask composited over grey."""
    img = image.float()
    if det.mask is not None:
        m = det.mask.to(img.device).bool()
        img = torch.where(m.unsqueeze(0), img, torch.full_like(img, BACKGROUND))
    h, w = img.shape[-2:]
    x0, y0, x1, y1 = (int(round(v)) for v in det.box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return img
    return img[:, y0:y1, x0:x1]


class ClipColourClassifier:
    """``(image, detections, class name) -> colours``; ``model_path``: a CLIP folder (transformers format)."""

    def __init__(self, model_path: str, device=None, dtype: str = "float32", colours: Sequence[str] = COLORS):
        from ..rewards._clip_utils import ClipScorer

        self.scorer = ClipScorer(model_path, "--suite-args clip_path", "GenEval uses OpenAI CLIP ViT-L/14 "
                                 "(openai/clip-vit-large-patch14, transformers format).", device=device, dtype=dtype)
        self.colours = list(colours)
        self._classifiers: Dict[str, torch.Tensor] = {}

    def classifier(self, name: str) -> torch.Tensor:
        """(C, D) one normalised embedding per colour for objects of class ``name``."""
        if name not in self._classifiers:
            rows = []
            for c in self.colours:
                t = self.scorer.text_features([tpl.format(c=c, name=name) for tpl in TEMPLATES])
                rows.append(F.normalize(t.mean(0), dim=-1))
            self._classifiers[name] = torch.stack(rows)
        return self._classifiers[name]

    def __call__(self, image: torch.Tensor, detections: Sequence[Detection], name: str) -> List[str]:
        if not detections:
            return []
        feats = torch.cat([self.scorer.image_features(masked_crop(image, d).unsqueeze(0)) for d in detections])
        logits = feats @ self.classifier(name).T
        return [self.colours[i] for i in logits.argmax(dim=1).tolist()]
