"""Reading prompt lists: .txt (one prompt per line), .jsonl (a ``prompt`` field) or .csv (a ``prompt`` column).

Every problem is a ValueError naming the file and the 1-based line (or CSV row) so the user knows
what to fix: an empty file, a missing field / column, a non-string or empty prompt, invalid JSON, bytes
that are not UTF-8, and blank lines when ``blank_lines="error"``. Blank lines are skipped by default
(policy ``"skip"``); a blank line is never turned into an empty prompt.

For image-to-video families each record also carries an ``image`` path (field / column name
configurable), resolved relative to the prompt file's folder.

A prompt *set folder* (the released Flow-GRPO / DiffusionNFT ``dataset/pickscore``, ``dataset/ocr``,
``dataset/geneval``) holds one file per split: ``<split>.txt`` or ``<split>_metadata.jsonl`` (a ``prompt`` field
beside GenEval's ``tag`` / ``include`` / ``exclude``); ``prompt_file(folder, split)`` names it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

BLANK_LINE_POLICIES = ("skip", "error")


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    image: Optional[str] = None  # absolute path of the reference image (I2V only)

    def key(self) -> tuple:
        return (self.prompt, self.image)


def _decode_lines(path: Path) -> List[str]:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out = []
    for i, b in enumerate(lines, start=1):
        if b.endswith(b"\r"):
            b = b[:-1]
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8") from None
        if i == 1 and s.startswith("\ufeff"):
            s = s[1:]  # UTF-8 byte-order mark
        out.append(s)
    if out and out[-1] == "":
        out.pop()  # trailing newline
    return out


def _resolve_image(path: Path, line: int, value, image_field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{line}: field {image_field!r} must be a non-empty image path, got {value!r}")
    p = Path(value.strip()).expanduser()
    if not p.is_absolute():
        p = path.parent / p
    return str(p)


def prompt_file(path, split: str = "train") -> Path:
    """``path`` itself when it is a file; for a prompt-set folder its ``<split>.txt`` or ``<split>_metadata.jsonl``
    (the released Flow-GRPO layout). FileNotFoundError naming what was looked for otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return path
    found = [f for f in (path / f"{split}.txt", path / f"{split}_metadata.jsonl") if f.is_file()]
    if len(found) != 1:
        what = "both " + " and ".join(f.name for f in found) if found else f"neither {split}.txt nor {split}_metadata.jsonl"
        raise FileNotFoundError(f"prompt folder {str(path)!r} has {what}; a prompt-set folder holds one file per split "
                                f"(--split {split}), e.g. dataset/pickscore/{split}.txt or "
                                f"dataset/geneval/{split}_metadata.jsonl")
    return found[0]


def read_prompts(path, *, field: str = "prompt", image_field: Optional[str] = None, blank_lines: str = "skip",
                 strip: bool = True) -> List[PromptRecord]:
    """Prompt records from ``path`` in file order.

    ``image_field``: when set (I2V), each record must also name an image (jsonl / csv only).
    ``strip``: strip surrounding whitespace from each prompt (default on).
    """
    if blank_lines not in BLANK_LINE_POLICIES:
        raise ValueError(f"blank_lines must be one of {BLANK_LINE_POLICIES}, got {blank_lines!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a prompt file in it (.txt, one prompt per line; .jsonl "
                         f"with a {field!r} field; or .csv with a {field!r} column)")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use .txt (one prompt per line), "
                         f".jsonl (field {field!r}) or .csv (column {field!r})")
    if suffix == ".txt" and image_field:
        raise ValueError(f"{path}: a .txt prompt file cannot name reference images; use .jsonl or .csv with "
                         f"a {image_field!r} field for image-to-video")
    lines = _decode_lines(path)
    records: List[PromptRecord] = []

    def blank(i):
        if blank_lines == "error":
            raise ValueError(f"{path}:{i}: blank line (blank_lines='error'); remove it or use blank_lines='skip'")

    def clean(i, value, where):
        if not isinstance(value, str):
            raise ValueError(f"{path}:{i}: {where} must be a string, got {type(value).__name__} {value!r}")
        s = value.strip() if strip else value
        if not s.strip():
            raise ValueError(f"{path}:{i}: {where} is empty")
        return s

    if suffix == ".txt":
        for i, s in enumerate(lines, start=1):
            if not s.strip():
                blank(i)
                continue
            records.append(PromptRecord(clean(i, s, "prompt")))
    elif suffix == ".jsonl":
        for i, s in enumerate(lines, start=1):
            if not s.strip():
                blank(i)
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: each line must be a JSON object with a {field!r} field")
            if field not in obj:
                raise ValueError(f"{path}:{i}: missing field {field!r} (fields present: {sorted(obj)}); "
                                 "pass the right field name (--prompt-field)")
            image = _resolve_image(path, i, obj.get(image_field), image_field) if image_field else None
            records.append(PromptRecord(clean(i, obj[field], f"field {field!r}"), image))
    else:  # .csv
        text = "\n".join(lines)
        reader = csv.reader(io.StringIO(text))
        rows = list(reader)
        if not rows:
            raise ValueError(f"{path}: empty CSV file; expected a header row with a {field!r} column")
        header = [h.strip() for h in rows[0]]
        if field not in header:
            raise ValueError(f"{path}:1: no {field!r} column in the header {header}; pass the right column "
                             "name (--prompt-field)")
        if image_field and image_field not in header:
            raise ValueError(f"{path}:1: no {image_field!r} column in the header {header} (needed for image-to-video)")
        col = header.index(field)
        icol = header.index(image_field) if image_field else None
        # csv.reader rows map to physical lines only without embedded newlines; track by reader.line_num
        reader = csv.reader(io.StringIO(text))
        next(reader)
        for row in reader:
            i = reader.line_num
            if not row or all(not c.strip() for c in row):
                blank(i)
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{i}: {len(row)} columns, the header has {len(header)}")
            image = _resolve_image(path, i, row[icol], image_field) if icol is not None else None
            records.append(PromptRecord(clean(i, row[col], f"column {field!r}"), image))
    if not records:
        raise ValueError(f"{path}: no prompts found (empty file)")
    return records


def find_duplicates(records) -> List[tuple]:
    """[(first_index, duplicate_index, record)] for records whose (prompt, image) repeats."""
    seen, dups = {}, []
    for i, r in enumerate(records):
        k = r.key()
        if k in seen:
            dups.append((seen[k], i, r))
        else:
            seen[k] = i
    return dups
