"""Rank-0 logging and pictures: JSONL metrics, TensorBoard / wandb (as the ecosystem's trainers log to them),
reward curves, image grids.

A logger the config asks for is never silently dropped: ``log.wandb_project`` without wandb, or
``log.tensorboard: true`` without tensorboard, is an error at start-up (``check_loggers``); TensorBoard by
default (``log.tensorboard: null``) logs when installed and warns once when not.

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


#: prefixes of the metrics that follow the wall clock (timings, throughput): never equal between two runs
WALL_CLOCK_PREFIXES = ("time/", "throughput/")


def wall_clock_metric(key: str) -> bool:
    """Whether metric ``key`` depends on wall-clock time (two runs of the same config differ in it)."""
    return key.startswith(WALL_CLOCK_PREFIXES) or "samples_per_s" in key


class LoggerWarning(UserWarning):
    """A logger the config asks for by default (TensorBoard) is not installed: the run logs without it."""


def _tensorboard_writer():
    """torch's SummaryWriter class, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError:
        return None
    return wandb


def check_loggers(log_cfg) -> None:
    """ValueError, before anything is loaded, when a logger the config requires is not installed:
    ``log.wandb_project`` set without wandb, ``log.tensorboard: true`` without tensorboard."""
    if log_cfg.wandb_project and _wandb() is None:
        raise ValueError(_NO_WANDB.format(log_cfg.wandb_project))
    if log_cfg.tensorboard is True and _tensorboard_writer() is None:
        raise ValueError(_NO_TENSORBOARD)


_NO_WANDB = ("log.wandb_project = {!r} but wandb is not installed: pip install wandb (and `wandb login`), or remove "
             "log.wandb_project")
_NO_TENSORBOARD = ("log.tensorboard is true but tensorboard is not installed: pip install tensorboard, or set "
                   "log.tensorboard to null (TensorBoard when installed) or false")


def flat_hparams(config: Dict, prefix: str = "") -> Dict[str, object]:
    """A nested config as {dotted key: int / float / str / bool} (lists and None as text), for TensorBoard's
    hyperparameter table."""
    out: Dict[str, object] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


class MetricsLogger:
    """Appends one JSON line per logged step; mirrors scalars (and images) to TensorBoard / wandb.

    ``tensorboard``: None = when installed (a ``LoggerWarning`` when not), True = required, False = off.
    ``wandb_project``: log to that wandb project (wandb must be installed: ``check_loggers``), with
    ``run_name`` (default: the output folder's name) and ``config`` (the resolved config) as the run's
    config; a resumed run (``resumed``) continues the wandb run whose id the folder recorded. TensorBoard
    gets the config as text at the start and as hyperparameters (with the last evaluation's metrics) at
    the end. ``log_image`` sends a picture (a sample grid) to both."""

    WANDB_ID = "wandb_run_id.txt"

    def __init__(self, out_dir, enabled: bool = True, tensorboard: Optional[bool] = None,
                 wandb_project: Optional[str] = None, *, run_name: Optional[str] = None,
                 config: Optional[Dict] = None, resumed: bool = False):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.history: List[Dict] = []
        self.config = config or {}
        self.run_name = run_name or self.out_dir.resolve().name
        self._tb = None
        self._wandb = None
        self._wandb_module = None
        self._last_eval: Dict[str, float] = {}
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard is not False:
            writer = _tensorboard_writer()
            if writer is None:
                if tensorboard is True:
                    raise ValueError(_NO_TENSORBOARD)
                warnings.warn("tensorboard is not installed, so this run logs no TensorBoard events (metrics.jsonl "
                              "and reward_curve.png are written as always): pip install tensorboard, or set "
                              "log.tensorboard: false to silence this", LoggerWarning, stacklevel=2)
            else:
                self._tb = writer(str(self.out_dir / "tensorboard"))
                if self.config:
                    import yaml

                    self._tb.add_text("config", "```yaml\n" + yaml.safe_dump(self.config, sort_keys=False) + "```", 0)
        if wandb_project:
            wandb = _wandb()
            if wandb is None:
                raise ValueError(_NO_WANDB.format(wandb_project))
            self._wandb_module = wandb
            id_file = self.out_dir / self.WANDB_ID
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
            kwargs = dict(project=wandb_project, name=self.run_name, config=self.config, dir=str(self.out_dir))
            if run_id:
                kwargs.update(id=run_id, resume="allow")
            self._wandb = wandb.init(**kwargs)
            new_id = getattr(self._wandb, "id", None)
            if new_id:
                from ..utils.io import atomic_write_text

                atomic_write_text(id_file, str(new_id) + "\n")

    def log(self, metrics: Dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(row)
        append_line(self.path, json.dumps(row))
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        self._last_eval.update({k: v for k, v in scalars.items() if k.startswith("eval/")})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def log_image(self, tag: str, image, step: int, caption: Optional[str] = None) -> None:
        """A PIL image (e.g. a sample grid) to TensorBoard and wandb at ``step``."""
        if not self.enabled or (self._tb is None and self._wandb is None):
            return
        import numpy as np

        arr = np.asarray(image.convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(tag, arr, step, dataformats="HWC")
        if self._wandb is not None:
            self._wandb.log({tag: self._wandb_module.Image(image, caption=caption)}, step=step)

    @property
    def wants_images(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def close(self):
        if self._tb is not None:
            if self.config:
                self._tb.add_hparams(flat_hparams(self.config), dict(self._last_eval), run_name=".")
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


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
                    borders: Optional[Sequence[Optional[Sequence[float]]]] = None):
    """Save (N, 3, H, W) images in [0, 1] as a PNG grid with ``nrow`` images per row; returns the PIL image.

    ``borders``: an RGB colour in [0, 1] (or None) per image, drawn as a frame in the padding around it
    ``pad // 2`` pixels wide (``pad`` >= 2)."""
    im = image_grid(images, nrow, upscale, pad, row_labels, borders)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return im


def image_grid(images: torch.Tensor, nrow: int, upscale: int = 4, pad: int = 2,
               row_labels: Optional[Sequence[str]] = None,
               borders: Optional[Sequence[Optional[Sequence[float]]]] = None):
    """The PIL image ``save_image_grid`` writes."""
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
    return im
