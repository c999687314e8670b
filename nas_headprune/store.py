"""The results store of an ablation: one SQLite file, one row per trial.

Only the process that runs the ablation writes to a store (workers return their results to it), and
every state change is its own committed transaction, so a killed ablation leaves a consistent file.
Shards write separate files (``results.shard-<i>-of-<n>.sqlite``) that :func:`load_rows` merges.

A store identifies itself with ``meta.app`` and ``meta.schema``; opening anything else (another
SQLite database, a text file, a truncated file) raises :class:`StoreError` naming the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nas_headprune.errors import StoreError, UsageError

APP = "nas-headprune-ablation"
SCHEMA = 2

SUMMARY_COLUMNS = (
    "top1_dense",
    "top1_before",
    "top1_after",
    "loss_after",
    "macs",
    "macs_ratio",
    "params",
    "params_ratio",
    "speedup",
    "search_s",
    "materialize_reweight_s",
    "finetune_s",
    # since schema 2: validation top-1 and the training steps of the trial
    "top1_val_dense",
    "top1_val_before",
    "top1_val_after",
    "steps_search",
    "steps_finetune",
    "steps_total",
)
#: the summary columns a schema-1 store lacks; opening one adds them (NULL for its old rows)
_ADDED_IN_SCHEMA_2 = SUMMARY_COLUMNS[-6:]

_TRIAL_COLUMNS = (
    "trial_id TEXT PRIMARY KEY",
    "idx INTEGER NOT NULL",
    "strategy TEXT NOT NULL",
    "budget REAL NOT NULL",
    "seed INTEGER NOT NULL",
    "variant TEXT NOT NULL",
    "axes TEXT NOT NULL",
    "base TEXT NOT NULL",
    "overrides TEXT NOT NULL",
    "status TEXT NOT NULL",
    "attempts INTEGER NOT NULL DEFAULT 0",
    "error TEXT",
    "detail TEXT",
    "started REAL",
    "finished REAL",
    "seconds REAL",
    *(f"{c} REAL" for c in SUMMARY_COLUMNS),
    "result TEXT",
)

STATUSES = ("pending", "running", "done", "failed")


def store_name(shard: tuple[int, int] | None) -> str:
    return "results.sqlite" if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.sqlite"


class ResultsStore:
    """Open with :meth:`open`; a thin layer over ``sqlite3`` with the project's schema."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    # ------------------------------------------------------------------ open / check
    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> ResultsStore:
        path = Path(path)
        exists = path.exists()
        if not exists and not create:
            raise StoreError(f"results store {path} does not exist")
        if exists and not path.is_file():
            raise StoreError(f"results store {path} is not a file")
        try:
            conn = sqlite3.connect(str(path), timeout=30)
            conn.row_factory = sqlite3.Row
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path} is not a nas-headprune results store (SQLite says: {exc}); it may be corrupt "
                f"or another kind of file: move it away, or pass another output directory"
            ) from exc
        store = cls(path, conn)
        if not tables and (not exists or path.stat().st_size == 0):
            if not create:
                conn.close()
                raise StoreError(f"results store {path} is empty")
            store._create()
            return store
        store._check(tables)
        return store

    def _create(self) -> None:
        with self.conn:
            self.conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.conn.execute(f"CREATE TABLE trials ({', '.join(_TRIAL_COLUMNS)})")
            self.conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("app", APP), ("schema", str(SCHEMA)), ("created", str(time.time()))],
            )

    def _check(self, tables: set[str]) -> None:
        if not {"meta", "trials"} <= tables:
            self.conn.close()
            raise StoreError(
                f"{self.path} is an SQLite database but not a nas-headprune results store "
                f"(tables: {', '.join(sorted(tables)) or 'none'}); pass another output directory"
            )
        try:
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            cols = {r[1] for r in self.conn.execute("PRAGMA table_info(trials)")}
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise StoreError(f"{self.path} is a damaged results store: {exc}") from exc
        if meta.get("app") != APP:
            self.conn.close()
            raise StoreError(
                f"{self.path} is an SQLite database of another application (meta.app={meta.get('app')!r}, "
                f"expected {APP!r})"
            )
        if meta.get("schema") == "1":  # add the columns of schema 2; the old rows keep NULL there
            with self.conn:
                for column in _ADDED_IN_SCHEMA_2:
                    if column not in cols:
                        self.conn.execute(f"ALTER TABLE trials ADD COLUMN {column} REAL")
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA),))
            cols |= set(_ADDED_IN_SCHEMA_2)
            meta["schema"] = str(SCHEMA)
        if meta.get("schema") != str(SCHEMA):
            self.conn.close()
            raise StoreError(
                f"{self.path} uses results-store schema {meta.get('schema')!r}; this version reads schema "
                f"{SCHEMA}"
            )
        missing = {c.split()[0] for c in _TRIAL_COLUMNS} - cols
        if missing:
            self.conn.close()
            raise StoreError(f"{self.path} is a damaged results store: missing columns {sorted(missing)}")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------- meta
    def set_meta(self, **items: str) -> None:
        with self.conn:
            self.conn.executemany(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(items.items()),
            )

    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta").fetchall())

    # ----------------------------------------------------------------------- trials
    def register(self, trials: Iterable[Any], all_ids: Iterable[str] | None = None) -> None:
        """Insert new trials as pending; a finished trial whose overrides changed is an error.

        With ``all_ids`` (every trial of the ablation, all shards), unfinished rows of trials the
        ablation no longer declares are dropped; finished ones stay, they are results."""
        rows = {r["trial_id"]: r for r in self.conn.execute("SELECT trial_id, overrides, status FROM trials")}
        with self.conn:
            if all_ids is not None:
                keep = set(all_ids)
                gone = [(tid,) for tid, r in rows.items() if tid not in keep and r["status"] != "done"]
                self.conn.executemany("DELETE FROM trials WHERE trial_id = ?", gone)
            for t in trials:
                overrides = json.dumps(list(t.overrides))
                old = rows.get(t.trial_id)
                if old is None:
                    self.conn.execute(
                        "INSERT INTO trials (trial_id, idx, strategy, budget, seed, variant, axes, base, "
                        "overrides, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                        (
                            t.trial_id,
                            t.index,
                            t.strategy,
                            t.budget,
                            t.seed,
                            t.variant,
                            json.dumps(t.axes),
                            t.base,
                            overrides,
                        ),
                    )
                elif old["overrides"] != overrides:
                    if old["status"] == "done":
                        raise UsageError(
                            f"trial {t.trial_id} finished in {self.path} with other settings "
                            f"({old['overrides']}); the ablation file changed: use a new output directory"
                        )
                    self.conn.execute(
                        "UPDATE trials SET overrides = ?, base = ?, idx = ? WHERE trial_id = ?",
                        (overrides, t.base, t.index, t.trial_id),
                    )
                else:  # the same trial, maybe at another place in an edited file: the report follows it
                    self.conn.execute("UPDATE trials SET idx = ? WHERE trial_id = ?", (t.index, t.trial_id))

    def finished_ids(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT trial_id FROM trials WHERE status = 'done'")}

    def mark_running(self, trial_id: str) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, error = NULL, "
                "detail = NULL WHERE trial_id = ?",
                (time.time(), trial_id),
            )

    def record(self, trial_id: str, res: dict[str, Any]) -> None:
        summary = res.get("summary") or {}
        values = [summary.get(c) for c in SUMMARY_COLUMNS]
        started, finished = res.get("started"), res.get("finished")
        seconds = finished - started if started is not None and finished is not None else None
        with self.conn:
            self.conn.execute(
                f"UPDATE trials SET status = ?, error = ?, detail = ?, finished = ?, seconds = ?, result = ?, "
                f"{', '.join(f'{c} = ?' for c in SUMMARY_COLUMNS)} WHERE trial_id = ?",
                (
                    res["status"],
                    res.get("error"),
                    res.get("detail"),
                    finished,
                    seconds,
                    json.dumps(res.get("result")) if res.get("result") is not None else None,
                    *values,
                    trial_id,
                ),
            )

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.conn.execute("SELECT * FROM trials ORDER BY idx"):
            row = dict(r)
            row["axes"] = json.loads(row["axes"])
            row["overrides"] = json.loads(row["overrides"])
            row["store"] = self.path.name
            out.append(row)
        return out


def store_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(
            f"{directory} is not a directory (expected the output folder of `nas-headprune ablate`)"
        )
    files = sorted(directory.glob("results*.sqlite"))
    if not files:
        raise UsageError(
            f"{directory} holds no results store (results*.sqlite); run `nas-headprune ablate` first"
        )
    return files


_RANK = {"done": 3, "failed": 2, "running": 1, "pending": 0}


def load_rows(directory: str | Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every trial of every store in ``directory``, merged; a trial found in several shards keeps its
    best state (done over failed over interrupted), then the latest."""
    merged: dict[str, dict[str, Any]] = {}
    meta: dict[str, str] = {}
    for path in store_files(directory):
        with ResultsStore.open(path) as store:
            meta = {**store.meta(), **meta}
            for row in store.rows():
                old = merged.get(row["trial_id"])
                key = (_RANK.get(row["status"], 0), row["finished"] or 0)
                if old is None or key > (_RANK.get(old["status"], 0), old["finished"] or 0):
                    merged[row["trial_id"]] = row
    rows = sorted(merged.values(), key=lambda r: r["idx"])
    return rows, meta
