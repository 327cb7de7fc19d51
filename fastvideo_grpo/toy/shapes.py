"""The embedded toy task: procedurally rendered coloured shapes and the prompts that describe them.

Two prompt forms (a small GenEval of our own: counting, colour, shape, position):
    "two red circles"                       (count + colour + shape)
    "a blue square left of a green triangle" (two objects + spatial relation)

Everything is deterministic given a seed; images are float RGB in [0, 1], shape (3, S, S), black
background, objects centred in the cells of a 4 x 4 grid; squares, disks and upward triangles
differ in a third or more of their pixels, so the shapes are told apart at 32 px. ``parse_prompt`` is the single source of truth used by both the renderer and the
rule-based reward, so the two can never disagree about what a prompt means.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

COLOURS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.15),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("square", "circle", "triangle")
COUNT_WORDS = {"one": 1, "two": 2, "three": 3}
PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles"}
SINGULAR = {v: k for k, v in PLURAL.items()}


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    objects: Tuple[ObjectSpec, ...]
    relation: Optional[str] = None  # "left of": objects[0] is left of objects[1]


def count_prompt(count: int, colour: str, shape: str) -> str:
    word = [k for k, v in COUNT_WORDS.items() if v == count][0]
    return f"{word} {colour} {shape if count == 1 else PLURAL[shape]}"


def relation_prompt(c1: str, s1: str, c2: str, s2: str) -> str:
    return f"a {c1} {s1} left of a {c2} {s2}"


def all_prompts() -> List[str]:
    """Every prompt of the grammar (count prompts, then relation prompts with distinct colours)."""
    out = [count_prompt(n, c, s) for n in COUNT_WORDS.values() for c in COLOURS for s in SHAPES]
    for (c1, s1), (c2, s2) in itertools.permutations(itertools.product(COLOURS, SHAPES), 2):
        if c1 != c2:
            out.append(relation_prompt(c1, s1, c2, s2))
    return out


def split_prompts(seed: int = 0, eval_fraction: float = 0.2) -> Tuple[List[str], List[str]]:
    """Deterministic train / held-out split, stratified by prompt form."""
    rng = random.Random(seed)
    counts = [p for p in all_prompts() if " left of " not in p]
    rels = [p for p in all_prompts() if " left of " in p]
    train, held = [], []
    for group in (counts, rels):
        g = list(group)
        rng.shuffle(g)
        k = max(1, int(round(eval_fraction * len(g))))
        held += g[:k]
        train += g[k:]
    return train, held


def parse_prompt(prompt: str) -> PromptSpec:
    words = prompt.strip().lower().split()
    try:
        if "left" in words:
            # a C1 S1 left of a C2 S2
            if len(words) != 8 or words[0] != "a" or words[3:6] != ["left", "of", "a"]:
                raise KeyError
            o1, o2 = ObjectSpec(words[1], words[2]), ObjectSpec(words[6], words[7])
            _check(o1), _check(o2)
            return PromptSpec((o1, o2), "left of")
        if len(words) != 3:
            raise KeyError
        n = COUNT_WORDS[words[0]]
        shape = words[2] if n == 1 else SINGULAR[words[2]]
        o = ObjectSpec(words[1], shape, n)
        _check(o)
        return PromptSpec((o,))
    except KeyError:
        raise ValueError(
            f"toy prompt {prompt!r} is not in the grammar: '<one|two|three> <colour> <shape(s)>' or "
            f"'a <colour> <shape> left of a <colour> <shape>' with colours {list(COLOURS)} and shapes {list(SHAPES)}"
        ) from None


def _check(o: ObjectSpec):
    if o.colour not in COLOURS or o.shape not in SHAPES:
        raise KeyError


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == "square":
        return ((xs - cx).abs() <= r * 0.9) & ((ys - cy).abs() <= r * 0.9)
    if shape == "circle":  # a disk (rows 2, 4, 6, 6, 4, 2 at 32 px): a quarter of the square's box left empty
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= (0.8 * r) ** 2
    # upward triangle: apex at top, base at bottom
    top, bottom = cy - r, cy + r
    half_width = (ys - top) / (2 * r) * r
    return (ys >= top) & (ys <= bottom) & ((xs - cx).abs() <= half_width)


def render(spec: PromptSpec, size: int, rng: random.Random, cells: int = 4) -> torch.Tensor:
    """Render one image for ``spec``: objects centred in distinct cells of a cells x cells grid.

    Grid-aligned layouts keep the toy model small (one 8x8 cell = one DiT patch at 32 px) while the
    task keeps what matters: how many objects, which colours and shapes, and where.
    """
    if size % cells:
        raise ValueError(f"image size {size} must be a multiple of the grid's {cells} cells")
    cell = size // cells
    r = cell * 0.4
    objs = [o for o in spec.objects for _ in range(o.count)]
    for _ in range(1000):
        picks = rng.sample(range(cells * cells), len(objs))
        if spec.relation != "left of" or picks[0] % cells < picks[1] % cells:
            break
    else:  # pragma: no cover - a left-of layout exists for any grid with 2+ columns
        raise RuntimeError(f"could not place objects for {spec}")
    img = torch.zeros(3, size, size)
    for o, k in zip(objs, picks):
        cy, cx = (k // cells + 0.5) * cell, (k % cells + 0.5) * cell
        m = _shape_mask(o.shape, size, cx, cy, r)
        img[:, m] = torch.tensor(COLOURS[o.colour]).unsqueeze(1)
    return img


def make_dataset(prompts: Sequence[str], num_images: int, size: int, seed: int) -> Tuple[torch.Tensor, List[str]]:
    """num_images renders cycling through ``prompts`` with a fixed seed: ((N, 3, S, S), prompts)."""
    rng = random.Random(seed)
    chosen = [prompts[rng.randrange(len(prompts))] for _ in range(num_images)]
    imgs = torch.stack([render(parse_prompt(p), size, rng) for p in chosen])
    return imgs, chosen
