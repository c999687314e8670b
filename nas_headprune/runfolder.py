"""A run folder: its lock, its stage manifest and the fingerprints that make resuming safe.

``search`` works through stages (search, reweight, fine-tune, evaluate). Before a stage runs, the
run writes the stage's *inputs* (every config value it depends on and the fingerprint of the stage
before it) and their hash, the *fingerprint*, into ``stages.json``; when the stage ends it is marked
done. On a later run in the same folder a stage is reused only when its fingerprint matches. A
different fingerprint stops the run with :class:`~nas_headprune.errors.RunFolderError` (exit 2)
naming the stage and the keys that differ, unless ``restart`` is set: then the stage's files and
those of every later stage are removed and the stages run again.

A folder is locked by one process at a time with an advisory ``flock`` on ``.lock``; the kernel
drops the lock when the process dies, so a killed run never leaves a stale lock behind.

This module imports no torch: it only deals with files and dictionaries.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nas_headprune.atomic import atomic_write_json
from nas_headprune.errors import CheckpointError, RunFolderError, UsageError
from nas_headprune.jsonlog import JsonLines, finite_json  # noqa: F401  (their earlier import path)

log = logging.getLogger(__name__)

MANIFEST = "stages.json"
LOCK = ".lock"
MANIFEST_FORMAT = "nas-headprune/run-stages"
MANIFEST_VERSION = 1

#: the stages in order, and the files and folders each one writes (relative to the run folder)
STAGE_FILES: dict[str, tuple[str, ...]] = {
    "search": (
        "search.json",
        "search_scales.safetensors",
        "search_weights.safetensors",
        "search_state",
    ),
    "reweight": ("reweighted", "reweight.json"),
    "finetune": ("finetune", "finetune.json", "model"),
    "evaluate": ("result.json",),
}
STAGES = tuple(STAGE_FILES)
#: what a finished stage must still hold to be reused (the rest is optional or working state)
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "search": ("search.json",),
    "reweight": ("reweighted", "reweight.json"),
    "finetune": ("model", "finetune.json"),
    "evaluate": ("result.json",),
}


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-able mapping (key order does not matter)."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differing_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, as ``"key: old -> new"`` lines."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return lines


def read_json(path: Path, what: str) -> Any:
    """A JSON file written by this project; damage is a :class:`CheckpointError` naming the file."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{what} {path} is damaged ({exc}); delete the run folder's later stages or rerun with --restart"
        ) from exc


def read_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file written by this project; damage is a :class:`CheckpointError`."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing; rerun with --restart to redo the stage that writes it")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types and OSError for a damaged file
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); rerun with --restart"
        ) from exc


class RunFolder:
    """The folder of one ``search`` run. Use as a context manager to hold its lock."""

    def __init__(self, path: str | os.PathLike[str], *, write: bool = True) -> None:
        self.path = Path(path)
        self.write = write  # False on the non-zero ranks of a distributed run: rank 0 writes
        self._lock_fd: int | None = None
        self._manifest: dict[str, Any] = {}

    # ------------------------------------------------------------------------------- lifecycle
    def open(self) -> RunFolder:
        """Create the folder if needed, take its lock and read its manifest."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is an existing file, not a folder; choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        if self.write:
            self._take_lock()
        self._manifest = self._read_manifest()
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                owner = (self.path / LOCK).read_text().strip() or "another process"
                raise RunFolderError(
                    f"run folder {self.path} is in use by {owner}; wait for it to finish or choose another --out"
                ) from exc
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}".encode())
        self._lock_fd = fd

    # -------------------------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.is_file():
            leftovers = [
                name for files in STAGE_FILES.values() for name in files if (self.path / name).exists()
            ]
            if leftovers:
                return {"_foreign": leftovers}
            return {}
        data = read_json(path, "stage manifest")
        if (
            not isinstance(data, dict)
            or data.get("format") != MANIFEST_FORMAT
            or not isinstance(data.get("stages"), dict)
            or not all(isinstance(v, dict) for v in data["stages"].values())
        ):
            raise CheckpointError(
                f"{path} is not a nas-headprune stage manifest; rerun with --restart to redo every stage"
            )
        if data.get("format_version") != MANIFEST_VERSION:
            raise CheckpointError(
                f"{path} has format version {data.get('format_version')!r}; this version reads "
                f"{MANIFEST_VERSION}. Rerun with --restart or choose another --out"
            )
        return dict(data["stages"])

    def _save_manifest(self) -> None:
        if self.write:
            stages = {k: v for k, v in self._manifest.items() if not k.startswith("_")}
            atomic_write_json(
                self.path / MANIFEST,
                {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "stages": stages},
            )

    def reset(self, stage: str) -> None:
        """Remove the files of ``stage`` and of every later stage, and forget their records."""
        for later in STAGES[STAGES.index(stage) :]:
            for name in STAGE_FILES[later]:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target) if self.write else None
                elif target.exists() and self.write:
                    target.unlink()
            self._manifest.pop(later, None)
        self._save_manifest()

    # ---------------------------------------------------------------------------------- stages
    def check(self, stage: str, inputs: Mapping[str, Any], *, restart: bool = False) -> tuple[str, bool]:
        """Check ``stage`` against what the folder holds; return ``(fingerprint, done)``.

        ``done`` is True when the stage finished earlier with the same inputs and its outputs are
        still there (reuse them). A stage recorded with other inputs raises
        :class:`RunFolderError`, or with ``restart`` is removed together with every later stage. A
        stage begun but not finished with the same inputs returns ``done=False``: it runs again
        and may resume from its own checkpoints. Nothing is recorded until :meth:`start`.
        """
        fp = fingerprint(inputs)
        if "_foreign" in self._manifest:
            found = ", ".join(self._manifest["_foreign"])
            if not restart:
                raise RunFolderError(
                    f"{self.path} holds {found} but no stage manifest ({MANIFEST}): it was not written by "
                    "this version of nas-headprune or was tampered with. Rerun with --restart to redo "
                    "every stage, or choose another --out"
                )
            log.warning("%s: no stage manifest; --restart redoes every stage", self.path)
            del self._manifest["_foreign"]
            self.reset(STAGES[0])
        record = self._manifest.get(stage)
        if record is not None and record.get("fingerprint") != fp:
            old = record.get("inputs") if isinstance(record.get("inputs"), dict) else {}
            diff = differing_keys(old, inputs) or ["(the recorded inputs are missing)"]
            if not restart:
                raise RunFolderError(
                    f"{self.path}: stage {stage!r} was run with other settings; differing: "
                    + "; ".join(diff)
                    + ". Rerun with --restart to redo it and every later stage, or choose another --out"
                )
            log.warning(
                "stage %s: settings changed (%s); redoing it and every later stage", stage, "; ".join(diff)
            )
            self.reset(stage)
            record = None
        if record is not None and record.get("status") == "done":
            gone = [n for n in STAGE_OUTPUTS[stage] if not (self.path / n).exists()]
            if gone:
                log.warning(
                    "stage %s: %s was removed; redoing the stage and every later one", stage, ", ".join(gone)
                )
                self.reset(stage)
                record = None
        return fp, record is not None and record.get("status") == "done"

    def start(self, stage: str, inputs: Mapping[str, Any]) -> None:
        """Record that ``stage`` runs with ``inputs``; later stages' records and files are removed
        (they were made from an earlier run of this stage and cannot be trusted)."""
        later = STAGES[STAGES.index(stage) + 1 :]
        if any(s in self._manifest for s in later):
            self.reset(later[0])
        self._manifest[stage] = {
            "fingerprint": fingerprint(inputs),
            "inputs": dict(inputs),
            "status": "running",
        }
        self._save_manifest()

    def finish(self, stage: str, **extra: Any) -> None:
        """Mark ``stage`` done (after its files are written)."""
        self._manifest[stage]["status"] = "done"
        self._manifest[stage].update(extra)
        self._save_manifest()


@contextlib.contextmanager
def opened(path: str | os.PathLike[str], *, write: bool = True) -> Iterator[RunFolder]:
    folder = RunFolder(path, write=write)
    try:
        yield folder.open()
    finally:
        folder.close()
