"""Benchmark tables in the papers' layout: one row per checkpoint, one column per category plus the overall
column, one table per metric; written as Markdown (``<suite>.md``) and JSON (``<suite>.json``), atomically.

``summarize`` is pure: per category the mean of its samples' values (samples without a value, e.g. a
VBench dimension a prompt is not listed for, are left out), the count, and with ``Metric.chunks`` the std
of the means of that many consecutive chunks (HPDv2's protocol: 800 prompts per style in 10 chunks of 80);
the overall is the mean of the category means ("categories") or of every sample ("samples").
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

from .base import Metric


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def chunk_std(values: Sequence[float], chunks: int) -> Optional[float]:
    """Population std of the means of ``chunks`` consecutive, as equal as possible, chunks of ``values``
    (numpy's ``array_split`` sizes; HPDv2's 800 values -> 10 chunks of 80)."""
    n = len(values)
    if chunks < 1 or n < chunks:
        return None
    base, extra = divmod(n, chunks)
    means, start = [], 0
    for c in range(chunks):
        size = base + (1 if c < extra else 0)
        means.append(sum(values[start:start + size]) / size)
        start += size
    m = sum(means) / len(means)
    return math.sqrt(sum((x - m) ** 2 for x in means) / len(means))


def summarize(metric: Metric, values: Sequence[Optional[float]], categories: Sequence[str],
              order: Sequence[str]) -> Dict:
    """{"categories": {category: {"mean", "n", ["std"]}}, "overall": value or None} for one checkpoint."""
    per: Dict[str, List[float]] = {c: [] for c in order}
    for v, c in zip(values, categories):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            per.setdefault(c, []).append(float(v))
    cats = {}
    for c, xs in per.items():
        cell = {"mean": _mean(xs), "n": len(xs)}
        if metric.chunks:
            cell["std"] = chunk_std(xs, metric.chunks)
        cats[c] = cell
    means = [cell["mean"] for cell in cats.values() if cell["mean"] is not None]
    if metric.overall == "categories":
        overall = _mean(means)
    elif metric.overall == "samples":
        overall = _mean([x for xs in per.values() for x in xs])
    else:
        overall = None
    return {"categories": cats, "overall": overall}


def _cell(cell: Optional[Dict], metric: Metric) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    text = f"{cell['mean'] * metric.scale:.{metric.digits}f}"
    if cell.get("std") is not None:
        text += f" ± {cell['std'] * metric.scale:.{metric.digits}f}"
    return text


def markdown(payload: Dict) -> str:
    """All of a suite result's tables (``payload`` as ``build_payload`` makes it) as Markdown."""
    st = payload.get("settings", {})
    lines = [f"# Benchmark: {payload['suite']}", "",
             f"{st.get('num_prompts', '?')} prompts x {st.get('samples_per_prompt', '?')} samples, ODE sampler "
             f"{st.get('num_steps', '?')} steps, noise seed {st.get('seed', '?')}.", ""]
    order, titles = payload["categories"], payload["category_titles"]
    for m in payload["metrics"]:
        metric = Metric(**m["metric"])
        cols = ([] if metric.overall == "none" else ["Overall"]) + [titles.get(c, c) for c in order]
        scale = f" (x{metric.scale:g})" if metric.scale != 1 else ""
        lines += [f"## {metric.title}{scale}", "", "| model | " + " | ".join(cols) + " |",
                  "| --- |" + " --- |" * len(cols)]
        for row in m["rows"]:
            cells = [] if metric.overall == "none" else [_cell({"mean": row["overall"]}, metric)]
            cells += [_cell(row["categories"].get(c), metric) for c in order]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        counts = ", ".join(f"{titles.get(c, c)} {m['rows'][0]['categories'].get(c, {}).get('n', 0)}" for c in order) \
            if m["rows"] else ""
        lines += ["", f"Samples per column: {counts}.", ""]
    for note in payload.get("notes", []):
        lines.append(f"* {note}")
    return "\n".join(lines).rstrip() + "\n"


def build_payload(suite, items, metrics: Sequence[Metric], rows: Sequence[Dict], settings: Dict,
                  notes: Sequence[str] = ()) -> Dict:
    """The JSON result. ``rows``: per checkpoint {"name", "checkpoint", "per_sample": [{metric: value}]}, the
    samples in item order (``samples_per_prompt`` consecutive samples per item)."""
    import dataclasses

    spp = settings["samples_per_prompt"]
    cats = [it.category for it in items for _ in range(spp)]
    order = suite.category_order(items)
    tables = []
    for metric in metrics:
        out_rows = []
        for r in rows:
            vals = [s.get(metric.key) for s in r["per_sample"]]
            out_rows.append({"name": r["name"], **summarize(metric, vals, cats, order)})
        tables.append({"metric": dataclasses.asdict(metric), "rows": out_rows})
    return {"suite": suite.name, "categories": order, "category_titles": {c: suite.title(c) for c in order},
            "metrics": tables, "settings": settings, "notes": list(notes),
            "checkpoints": [{"name": r["name"], "checkpoint": r["checkpoint"]} for r in rows],
            "items": [{"prompt": it.prompt, "category": it.category} for it in items],
            "per_sample": {r["name"]: r["per_sample"] for r in rows}}


def write_tables(out, payload: Dict) -> Dict[str, str]:
    """``<out>/<suite>.json`` and ``<out>/<suite>.md``, each written atomically."""
    from pathlib import Path

    from ..utils.io import atomic_write_json, atomic_write_text

    out = Path(out)
    paths = {"json": out / f"{payload['suite']}.json", "md": out / f"{payload['suite']}.md"}
    atomic_write_json(paths["json"], payload)
    atomic_write_text(paths["md"], markdown(payload))
    return {k: str(v) for k, v in paths.items()}
