"""Safe file output: atomic writes and output folders that never clobber a user's files."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from arithinterp._errors import ArithInterpError


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `path` for writing bytes so that readers see either the old file or the whole new one.

    The file object writes to a temporary file `.<name>.<random>.tmp` beside `path` (its parent is created);
    when the block ends it is flushed, fsynced, given the usual permissions (0666 less the umask) and renamed
    over `path`. On any exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    with atomic_open(path) as f:
        f.write(data)
    return path


_umask_lock = threading.Lock()
_umask_cached: int | None = None


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (store shards are written by a thread).

    Linux reports it in /proc/self/status, read afresh each time. Elsewhere `os.umask` reads it only by setting it,
    for every thread at once; that is done once, under a lock, and cached (a later `os.umask` call is not seen).
    """
    mask = _proc_umask()
    if mask is not None:
        return mask
    global _umask_cached
    with _umask_lock:
        if _umask_cached is None:
            _umask_cached = os.umask(0o022)  # 022, not 0: a file another thread makes meanwhile is not world-writable
            os.umask(_umask_cached)
        return _umask_cached


def _proc_umask() -> int | None:
    """The umask from the `Umask:` line of /proc/self/status (Linux 4.7+), or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def refuse_file(out: str | os.PathLike) -> Path:
    """`out` as a `Path`; refuses one that exists and is not a folder (the check every `--out` starts with)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArithInterpError(f"--out {str(out)!r} is a file, not a folder; pass a folder path.")
    return out


def check_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an output folder that is a file, or non-empty without `overwrite`; creates nothing.

    Commands call this before any slow work, and `prepare_out_dir` when they are about to write.
    """
    out = refuse_file(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArithInterpError(
            f"output folder {str(out)!r} already exists and is not empty; "
            "pass another --out, or --overwrite to replace its result files."
        )
    return out


def prepare_out_dir(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Create `out` for a command's results; refuse a non-empty folder unless `overwrite`.

    With `overwrite` the folder is kept and files of the same name are replaced (atomically) one by one;
    nothing else in it is deleted.
    """
    out = check_out_dir(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    return out
