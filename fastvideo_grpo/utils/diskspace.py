"""Running out of disk space, said in one line: which errors mean a full disk, how much room a folder's
filesystem has, and the one-line message a run ends with.

A full disk shows up as ``OSError`` ENOSPC (or EDQUOT, a quota), but also as torch's serializer failing a short
write (``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos N vs M``, or "file write failed")
and, in a distributed checkpoint save, inside DCP's ``CheckpointException`` (a ``BaseException`` holding each
rank's error). ``is_out_of_space`` recognises all of them, through ``__cause__`` / ``__context__`` chains.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

#: errno values that mean "no room left" (a full filesystem, a user's quota)
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: what torch's zip serializer (torch.save) says when a write comes up short, which on a local or network
#: filesystem means it is full; and what a failed write of the OS says in text form
_SHORT_WRITE = ("unexpected pos", "file write failed", "no space left on device", "disk quota exceeded")


class NoSpace(OSError):
    """There is clearly not enough room for a write: ``needed`` bytes (an estimate) against ``free`` in ``folder``.
    Raised before the write, so nothing has been touched."""

    def __init__(self, folder, needed: int, free: int, what: str = "the next checkpoint"):
        super().__init__(errno.ENOSPC, f"not enough space for {what} in {folder}: about {human_bytes(needed)} "
                         f"needed, {human_bytes(free)} free", str(folder))
        self.folder, self.needed, self.free, self.what = Path(folder), int(needed), int(free), what


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and the per-rank errors of a DCP CheckpointException (no repeats)."""
    todo, seen = [error], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):
            for value in failures.values():
                todo.append(value[0] if isinstance(value, tuple) else value)


def out_of_space_error(error: BaseException) -> Optional[BaseException]:
    """The error in ``error``'s chain that says the disk is full (None when none does)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return e
        if isinstance(e, (OSError, RuntimeError)) and any(s in str(e).lower() for s in _SHORT_WRITE):
            return e
    return None


def is_out_of_space(error: BaseException) -> bool:
    return out_of_space_error(error) is not None


def existing_folder(path) -> Path:
    """``path``'s nearest existing folder (itself when it is one): where free space can be asked."""
    p = Path(path).absolute()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path) -> int:
    """Bytes free for this user on the filesystem holding ``path`` (or its nearest existing parent)."""
    return int(shutil.disk_usage(existing_folder(path)).free)


def folder_bytes(path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} PB"  # pragma: no cover


def failed_folder(error: BaseException, default) -> Path:
    """The folder a failed write was writing into: the error's file name when it carries one, else ``default``."""
    e = out_of_space_error(error)
    name = getattr(e, "filename", None) if e is not None else None
    if not name:
        return Path(default)
    p = Path(name)
    return p if p.is_dir() else p.parent
