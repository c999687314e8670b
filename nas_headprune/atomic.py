"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every writer puts its bytes in a temporary file in the destination's folder (so the final
``os.replace`` never crosses a file system), flushes it to disk with ``fsync`` and only then
replaces the destination. A failure at any point leaves the destination as it was and removes the
temporary file. :func:`atomic_path` exposes the same protocol to writers that want a path, such as
``torch.save`` or ``safetensors.torch.save_file``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

_MAX_NAME_TRIES = 100


def _create_temp_file(target: Path) -> Path:
    """Create an empty, uniquely named file beside ``target`` (mode 0o666 less the umask)."""
    for _ in range(_MAX_NAME_TRIES):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file beside {target} after {_MAX_NAME_TRIES} tries")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort, since not every platform can open a folder."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and replaces ``path``.

    The writer must have closed the file when the ``with`` block ends. If the block raises, the
    temporary file is removed and ``path`` is untouched::

        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)
    """
    target = Path(path)
    tmp = _create_temp_file(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path`` as a :class:`~pathlib.Path`."""
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return ``path`` as a :class:`~pathlib.Path`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, keys in their given order, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
