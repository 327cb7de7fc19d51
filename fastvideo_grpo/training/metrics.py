"""Rank-0 logging and pictures: JSONL metrics, optional TensorBoard/wandb, reward curves, image grids.

Curves are drawn with a moving average over iterations, like the paper's reward plots.
Every file is written atomically, so an interrupted run never leaves a half-written PNG.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..utils.io import atomic_path


class MetricsLogger:
    """Appends one JSON line per logged step; mirrors scalars to TensorBoard / wandb when present."""

    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = True, wandb_project: Optional[str] = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.history: List[Dict] = []
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, dir=str(self.out_dir))
            except ImportError:
                self._wandb = None

    def log(self, metrics: Dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        append_line(self.path, json.dumps(row))
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                if self._tb is not None:
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def append_line(path, line: str) -> None:
    """Append ``line`` and a newline in one write; if the write fails part-way (a full disk), the file
    is cut back to its previous length, so it only ever holds whole lines."""
    data = (line + "\n").encode()
    fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read_jsonl(path) -> List[Dict]:
    """The rows of a JSON-lines file. A cut-off last line (a crash mid-write by an older version, or a
    full disk) is dropped with a warning naming the file; a damaged line elsewhere is a ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    rows = []
    for n, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                warnings.warn(f"{path}: dropping the cut-off last line {lineno} ({e.msg}); the run continues from "
                              f"the rows before it", stacklevel=2)
                break
            raise ValueError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
    return rows


def moving_average(values: Sequence[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_reward_curves(rows: Iterable[Dict], keys: Sequence[str], path, window: int = 10,
                       title: str = "GRPO training reward", hlines: Optional[Dict[str, float]] = None) -> None:
    """Raw values (faint) and moving averages (solid) of ``keys`` against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for i, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float)) and math.isfinite(r[k])]
        if not pts:
            continue
        xs, ys = zip(*pts)
        colour = f"C{i}"
        ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(xs, moving_average(list(ys), window), color=colour, linewidth=2, label=f"{k} (MA {window})")
    for j, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color=f"C{len(keys) + j}", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_image_grid(images: torch.Tensor, path, nrow: int, upscale: int = 4, pad: int = 2,
                    row_labels: Optional[Sequence[str]] = None,
                    borders: Optional[Sequence[Optional[Sequence[float]]]] = None) -> None:
    """Save (N, 3, H, W) images in [0, 1] as a PNG grid with ``nrow`` images per row.

    ``borders``: an RGB colour in [0, 1] (or None) per image, drawn as a frame in the padding around it
    ``pad // 2`` pixels wide (``pad`` >= 2)."""
    from PIL import Image, ImageDraw

    imgs = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = imgs.shape
    if upscale > 1:
        imgs = torch.nn.functional.interpolate(imgs, scale_factor=upscale, mode="nearest")
        h, w = h * upscale, w * upscale
    rows = math.ceil(n / nrow)
    label_w = 0 if not row_labels else 260
    canvas = torch.ones(3, rows * (h + pad) + pad, label_w + nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), label_w + pad + c * (w + pad)
        if borders is not None and borders[i] is not None:
            f = pad // 2  # half the gap each, so neighbouring frames do not overlap
            canvas[:, y - f:y + h + f, x - f:x + w + f] = torch.tensor(borders[i]).view(3, 1, 1)
        canvas[:, y:y + h, x:x + w] = imgs[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    im = Image.fromarray(arr)
    if row_labels:
        d = ImageDraw.Draw(im)
        for r, text in enumerate(row_labels[:rows]):
            d.text((4, pad + r * (h + pad) + h // 2 - 5), text, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
