"""The serving audit log: one row per answer in a SQL table `predictions` (SQLite or PostgreSQL, SQLAlchemy Core).

Every answer the server gives is recorded before the client sees it; `/v1/feedback` later adds the true label.
From the log come statistics (`digitkit audit stats`), exports as CSV or JSON lines, and an MNIST-style IDX
training set of the labelled field images (`digitkit audit export --format idx`, then
`digitkit train --extra-data DIR`).

URLs: `sqlite:///path/audit.db`, a bare file path (SQLite), or `postgresql://user@host/db` (psycopg 3;
`postgresql+psycopg://` is the same). Several server workers may share one SQLite file: it runs in WAL mode with a
busy timeout, so writers queue instead of failing.

Exports: CSV has every column except the image; JSON lines have every column, the image (the 28x28 uint8 model
input, row-major) as base64 under `image_b64` (null when the input was unreadable).

Retention (`AuditLog.prune`, `digitkit audit prune`, and the server's background `Pruner` when the `audit:` settings
set a limit): rows older than an age go, whether labelled or not; then, over a row limit, unlabelled rows go first
(oldest first), so labelled rows, the ones that become training data, are kept longest. Deletes run in small
batches, one transaction each, so the table is never locked for long.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import logging
import math
import operator
import os
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, SQLAlchemyError

from digitkit.errors import ConfigError, DataError

if typing.TYPE_CHECKING:
    from digitkit.serve.settings import AuditSettings

logger = logging.getLogger("digitkit.serve")

IMAGE_SIZE = 28
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE
SQLITE_BUSY_TIMEOUT_MS = 30_000
EXPORT_FORMATS = ("csv", "jsonl")
PRUNE_BATCH = 2000
"""Rows deleted per transaction when pruning: a batch holds SQLite's write lock (or PostgreSQL's row locks) for a
few milliseconds, so answers recorded meanwhile wait at most that long."""
_Step = tuple[str, bool, Callable[[Any], Any]]
"""One prune step: (the limit, "age" or "rows"; labelled rows?; the condition on a `predictions` table or alias)."""


@dataclass
class AuditRecord:
    """One answer of the server, as stored in the `predictions` table."""

    request_id: str
    """uuid4 hex, the primary key; the client sends it back with /v1/feedback."""
    time: float
    """Unix seconds when the answer was given."""
    route: str
    """predict, batch, read or explain."""
    input_sha256: str
    """SHA-256 of the raw request input bytes (or of the pixel array bytes)."""
    model_version: str
    digit: str | None
    """The answer; None when rejected."""
    confidence: float
    rejected: str | None
    """None, or why: unreadable, empty, no-ink, not-a-digit, low-confidence (the server may add others)."""
    latency_ms: float
    client: str
    """Client address, "host:port" or host."""
    cached: bool = False
    image: bytes | None = None
    """The 28x28 uint8 model input, row-major, exactly 784 bytes; None if the input was unreadable."""
    true_label: str | None = None
    """Set later by feedback."""
    feedback_time: float | None = None


COLUMNS = [f.name for f in fields(AuditRecord)]
TEXT_COLUMNS = [c for c in COLUMNS if c != "image"]

metadata = sa.MetaData()
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("route", sa.String(32), nullable=False),
    sa.Column("input_sha256", sa.String(64), nullable=False),
    sa.Column("model_version", sa.Text, nullable=False),
    sa.Column("digit", sa.Text),
    sa.Column("confidence", sa.Double, nullable=False),
    sa.Column("rejected", sa.String(64)),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("client", sa.Text, nullable=False),
    sa.Column("cached", sa.Boolean, nullable=False, default=False),
    sa.Column("image", sa.LargeBinary),
    sa.Column("true_label", sa.Text),
    sa.Column("feedback_time", sa.Double),
    sa.Index("ix_predictions_time", "time"),
    sa.Index("ix_predictions_true_label", "true_label"),
)


def normalize_url(url: str) -> URL:
    """An SQLAlchemy URL for SQLite or PostgreSQL (psycopg 3); a bare path means a SQLite file."""
    text = str(url).strip()
    if not text:
        raise ConfigError("audit database: empty URL; expected a SQLite file path or postgresql://user@host/db")
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser()))
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"audit database {_redact_text(text)!r}: not a database URL; expected sqlite:///path/audit.db, "
            "a file path, or postgresql://user:password@host:5432/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername != "sqlite":
            parsed = parsed.set(drivername="sqlite")
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(
                f"audit database {text!r}: an in-memory SQLite database is lost when the server stops and is not "
                "shared between workers; give a file: sqlite:///path/audit.db"
            )
        return parsed
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg")
    raise ConfigError(
        f"audit database {safe_url(parsed)!r}: unsupported database {backend!r}; expected sqlite:///path/audit.db "
        "or postgresql://user@host/db"
    )


def safe_url(url: URL) -> str:
    """The URL as text with its password hidden, for messages and logs."""
    return url.render_as_string(hide_password=True)


def _redact_text(text: str) -> str:
    # For strings that did not parse as URLs: drop anything between "://user:" and "@".
    head, sep, rest = text.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{head}://{user}:***@{host}" if ":" in creds else text
    return text


class AuditLog:
    """The `predictions` table behind a URL; thread-safe, and safe for several processes on one SQLite file."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.display_url = safe_url(self.url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        if self.is_sqlite:
            path = Path(self.url.database or "")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(
                    f"audit database {self.display_url}: cannot create the folder {path.parent} ({e.strerror}); "
                    "choose a writable location with --audit-db"
                ) from None
            self.engine = sa.create_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            try:
                self.engine = sa.create_engine(self.url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
            except (NoSuchModuleError, ImportError) as e:
                raise ConfigError(
                    f"audit database {self.display_url}: the PostgreSQL driver is missing ({e}); "
                    "install it with: pip install 'psycopg[binary]>=3.1'"
                ) from None
        self._create_table()
        self._insert = _Insert(self.engine.dialect)

    # ------------------------------------------------------------------------------------------ plumbing
    def _engine(self) -> Engine:
        # A forked child must not reuse the parent's pooled connections (SQLAlchemy's multiprocessing advice).
        if os.getpid() != self._pid:
            with self._lock:
                if os.getpid() != self._pid:
                    self.engine.dispose(close=False)
                    self._pid = os.getpid()
        return self.engine

    def _error(self, e: SQLAlchemyError, doing: str) -> DataError:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if self.url.password:
            reason = reason.replace(str(self.url.password), "***")
        hint = (
            "check the file and folder are writable and the disk is not full"
            if self.is_sqlite
            else "check the server is running and reachable, and the user, password and database name"
        )
        return DataError(f"audit database {self.display_url}: cannot {doing} ({reason}); {hint}")

    def _create_table(self) -> None:
        # IF NOT EXISTS: several workers may open a new database at the same moment.
        try:
            with self._engine().begin() as conn:
                conn.execute(sa.schema.CreateTable(predictions, if_not_exists=True))
                for index in predictions.indexes:
                    conn.execute(sa.schema.CreateIndex(index, if_not_exists=True))
        except IntegrityError:
            # PostgreSQL can still race on its catalog when two processes create the table at once; the other
            # one won, which is all that was needed.
            pass
        except (DBAPIError, SQLAlchemyError) as e:
            raise self._error(e, "open the database") from None

    # ------------------------------------------------------------------------------------------ writes
    def record(self, records: list[AuditRecord]) -> None:
        """Insert the records in one transaction; when this returns they are committed.

        On the request path, so it skips SQLAlchemy's per-call work: the INSERT SQLAlchemy Core would send is
        compiled once (`_Insert`) and run with the pooled DBAPI connection's cursor, the values passed through the
        same type processors, and the driver's errors wrapped as SQLAlchemy wraps them.
        """
        if not records:
            return
        for rec in records:
            if rec.image is not None and len(rec.image) != IMAGE_BYTES:
                raise DataError(
                    f"audit record {rec.request_id}: image has {len(rec.image)} bytes, expected {IMAGE_BYTES} "
                    f"(the {IMAGE_SIZE}x{IMAGE_SIZE} uint8 model input, row-major) or None"
                )
        insert = self._insert
        try:
            rows = insert.parameters(records)
            # SQLite lets one writer in at a time and makes the others retry after sleeps that grow to 100 ms: the
            # threads of this process take turns on a lock instead (other processes still meet the busy timeout).
            with self._write_lock if self.is_sqlite else contextlib.nullcontext():
                insert.run(self._engine(), rows)
        except IntegrityError as e:
            raise DataError(
                f"audit database {self.display_url}: a request_id is already in the log "
                f"({str(e.orig).splitlines()[0]}); request ids must be unique (uuid4 hex)"
            ) from None
        except SQLAlchemyError as e:
            raise self._error(e, "record predictions") from None

    def feedback(self, request_id: str, true_label: str) -> AuditRecord | None:
        """Set the true label of a prediction (a second call overwrites); None if the id is unknown."""
        where = predictions.c.request_id == request_id
        try:
            with self._engine().begin() as conn:
                # The write comes first, so a SQLite transaction takes the write lock at once (a read-then-write
                # transaction could fail with SQLITE_BUSY_SNAPSHOT instead of waiting).
                done = conn.execute(predictions.update().where(where).values(true_label=true_label,
                                                                              feedback_time=time.time()))
                if done.rowcount == 0:
                    return None
                row = conn.execute(sa.select(predictions).where(where)).mappings().one()
        except SQLAlchemyError as e:
            raise self._error(e, "store feedback") from None
        return _record(row)

    # ------------------------------------------------------------------------------------------ reads
    def get(self, request_id: str) -> AuditRecord | None:
        try:
            with self._engine().connect() as conn:
                row = conn.execute(sa.select(predictions).where(predictions.c.request_id == request_id))
                found = row.mappings().one_or_none()
        except SQLAlchemyError as e:
            raise self._error(e, "read") from None
        return _record(found) if found is not None else None

    def labelled_accuracy(self) -> tuple[int, int]:
        """(labelled predictions that gave a digit, how many of them were right)."""
        p = predictions.c
        query = sa.select(
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(sa.case((p.digit == p.true_label, 1), else_=0)), 0),
        ).where(p.true_label.is_not(None), p.digit.is_not(None))
        try:
            with self._engine().connect() as conn:
                n, correct = conn.execute(query).one()
        except SQLAlchemyError as e:
            raise self._error(e, "read") from None
        return int(n), int(correct)

    def stats(self, since: float | None = None) -> dict[str, Any]:
        """Totals, per route and class, rejections, confidence, latency percentiles, cache, labels, versions.

        Mean confidence is over answered predictions (those with a digit). Latency percentiles use the nearest-rank
        method over all predictions. `since` (unix seconds) keeps predictions at or after it.
        """
        p = predictions.c
        cond = p.time >= since if since is not None else sa.true()

        def grouped(conn: sa.Connection, column: Any, *extra: Any) -> dict[str, int]:
            query = sa.select(column, sa.func.count()).where(cond, *extra).group_by(column).order_by(column)
            return {str(k): int(n) for k, n in conn.execute(query)}

        try:
            with self._engine().connect() as conn:
                total, first, last, rejected, cache_hits, labelled = conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.min(p.time), sa.func.max(p.time),
                        sa.func.count(p.rejected),
                        sa.func.coalesce(sa.func.sum(sa.case((p.cached, 1), else_=0)), 0),
                        sa.func.count(p.true_label),
                    ).where(cond)
                ).one()  # fmt: skip
                answered, mean_conf, labelled_answered, correct = conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.avg(p.confidence),
                        sa.func.count(p.true_label),
                        sa.func.coalesce(sa.func.sum(sa.case((p.digit == p.true_label, 1), else_=0)), 0),
                    ).where(cond, p.digit.is_not(None))
                ).one()  # fmt: skip
                latency = {f"p{q}": self._percentile(conn, cond, total, q) for q in (50, 95, 99)}
                mean_latency = conn.execute(sa.select(sa.func.avg(p.latency_ms)).where(cond)).scalar()
                per_route = grouped(conn, p.route)
                per_class = grouped(conn, p.digit, p.digit.is_not(None))
                reasons = grouped(conn, p.rejected, p.rejected.is_not(None))
                versions = grouped(conn, p.model_version)
        except SQLAlchemyError as e:
            raise self._error(e, "read statistics") from None
        total, labelled_answered, correct = int(total), int(labelled_answered), int(correct)
        return {
            "database": self.display_url,
            "since": since,
            "total": total,
            "first_time": first,
            "last_time": last,
            "per_route": per_route,
            "per_class": per_class,
            "answered": int(answered),
            "rejected": int(rejected),
            "rejection_rate": int(rejected) / total if total else None,
            "rejections": reasons,
            "mean_confidence": float(mean_conf) if mean_conf is not None else None,
            "latency_ms": {**latency, "mean": float(mean_latency) if mean_latency is not None else None},
            "cache_hits": int(cache_hits),
            "cache_hit_rate": int(cache_hits) / total if total else None,
            "labelled": int(labelled),
            "labelled_answered": labelled_answered,
            "labelled_correct": correct,
            "labelled_accuracy": correct / labelled_answered if labelled_answered else None,
            "model_versions": versions,
        }

    @staticmethod
    def _percentile(conn: sa.Connection, cond: Any, n: int, q: float) -> float | None:
        # Nearest rank, computed by the database (ORDER BY ... OFFSET), so nothing is loaded into memory and
        # SQLite (which has no percentile function) and PostgreSQL give the same number.
        if n == 0:
            return None
        rank = max(math.ceil(q / 100 * n), 1) - 1
        col = predictions.c.latency_ms
        return float(conn.execute(sa.select(col).where(cond).order_by(col).offset(rank).limit(1)).scalar_one())

    def _rows(self, columns: list[str], where: Any = None) -> typing.Iterator[sa.RowMapping]:
        """Rows in time order, fetched in chunks (a server-side cursor on PostgreSQL)."""
        query = sa.select(*(predictions.c[c] for c in columns)).order_by(predictions.c.time, predictions.c.request_id)
        if where is not None:
            query = query.where(where)
        try:
            with self._engine().connect() as conn:
                result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
                yield from result.mappings()
        except SQLAlchemyError as e:
            raise self._error(e, "read") from None

    def export(self, out: typing.IO[str], fmt: str, labelled_only: bool = False) -> int:
        """Stream every prediction (or only labelled ones) in time order as CSV or JSON lines; returns the count.

        CSV: every column but the image. JSON lines: every column, the image as base64 under `image_b64`.
        """
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"audit export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)} (or idx)")
        where = predictions.c.true_label.is_not(None) if labelled_only else None
        n = 0
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(TEXT_COLUMNS)
            for row in self._rows(TEXT_COLUMNS, where):
                writer.writerow(["" if row[c] is None else _csv_value(row[c]) for c in TEXT_COLUMNS])
                n += 1
        else:
            for row in self._rows(COLUMNS, where):
                obj = {c: row[c] for c in TEXT_COLUMNS}
                obj["cached"] = bool(obj["cached"])
                obj["image_b64"] = base64.b64encode(row["image"]).decode() if row["image"] is not None else None
                out.write(json.dumps(obj) + "\n")
                n += 1
        return n

    def export_idx(self, out_dir: Path, labelled_only: bool = True, classes: list[str] | None = None) -> dict[str, int]:
        """Write the labelled field images as an MNIST-style IDX training set; returns the count per class.

        Files: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, classes.txt, SHA256SUMS.raw (what
        `digitkit train --extra-data DIR` reads) and request_ids.txt (the audit row behind each image, in order).
        Rejected predictions count too when labelled: they are the inputs the model found hardest. With
        `labelled_only=False`, unlabelled answered predictions are added with the model's own answer as the label
        (pseudo-labels: they can only reinforce what the model already believes). `classes` defaults to "0".."9"
        when every label is a digit, else the sorted labels.
        """
        from digitkit import data

        p = predictions.c
        has_label = p.true_label.is_not(None) if labelled_only else sa.or_(p.true_label.is_not(None),
                                                                          p.digit.is_not(None))  # fmt: skip
        where = sa.and_(p.image.is_not(None), has_label)
        try:
            with self._engine().connect() as conn:
                n = int(conn.execute(sa.select(sa.func.count()).where(where)).scalar_one())
        except SQLAlchemyError as e:
            raise self._error(e, "read") from None
        if n == 0:
            raise DataError(
                f"audit database {self.display_url}: no {'labelled ' if labelled_only else ''}predictions with an "
                "image to export; labels come from POST /v1/feedback {request_id, true_label}"
            )
        images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        names: list[str] = []
        ids: list[str] = []
        with contextlib.closing(self._rows(["request_id", "image", "true_label", "digit"], where)) as rows:
            for i, row in enumerate(rows):
                if i >= n:  # rows recorded after the count was taken
                    break
                images[i] = np.frombuffer(row["image"], np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
                names.append(row["true_label"] if row["true_label"] is not None else row["digit"])
                ids.append(row["request_id"])
        images = images[: len(names)]
        if classes is None:
            digits = [str(d) for d in range(10)]
            classes = digits if set(names) <= set(digits) else sorted(set(names))
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(
                f"audit database {self.display_url}: label {unknown[0]!r} is not one of the classes "
                f"({', '.join(classes)}); correct the feedback or pass the model's classes"
            )
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[name] for name in names], np.int64)
        import torch

        out_dir = Path(out_dir)
        ds = data.Dataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), list(classes), str(out_dir))
        data.save_split(ds, out_dir, "train")
        (out_dir / data.CLASSES_FILE).write_text("\n".join(classes) + "\n")
        (out_dir / "request_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        data.write_sums(out_dir)
        return {c: k for c, k in zip(classes, ds.class_counts(), strict=True) if k}

    # ------------------------------------------------------------------------------------------ retention
    def prune(self, max_age_s: float | None = None, max_rows: int | None = None, dry_run: bool = False,
              now: float | None = None, batch: int = PRUNE_BATCH,
              stop: Callable[[], bool] | None = None) -> PruneResult:  # fmt: skip
        """Delete the predictions older than `max_age_s` seconds, then the oldest beyond `max_rows`; return counts.

        The age limit applies to every row. `max_rows` keeps labelled rows (with feedback) longest: unlabelled rows
        are deleted first, oldest first, and labelled rows (oldest first) only when they alone exceed max_rows.
        Each limit becomes a fixed boundary before anything is deleted, so two processes pruning at once (server
        workers) delete the same rows, never twice as many. Rows go in batches of `batch`, one transaction each;
        `stop` is asked between batches and ends the work early. With `dry_run` nothing is deleted and the counts
        say what would be.
        """
        if max_age_s is not None and not (isinstance(max_age_s, int | float) and math.isfinite(max_age_s)
                                          and max_age_s > 0):  # fmt: skip
            raise ConfigError(f"prune: max age {max_age_s!r} s: expected a positive number of seconds (e.g. 30d = "
                              "2592000), or None to keep predictions of any age")  # fmt: skip
        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ConfigError(f"prune: max rows {max_rows!r}: expected a positive integer, or None to keep any number")
        if batch < 1:
            raise ConfigError(f"prune: batch {batch}: expected a positive number of rows per transaction")
        t0 = time.perf_counter()
        cutoff = float((time.time() if now is None else now) - max_age_s) if max_age_s is not None else None
        p = predictions.c
        deleted = {("age", False): 0, ("age", True): 0, ("rows", False): 0, ("rows", True): 0}
        try:
            with self._engine().connect() as conn:
                plan, warnings = self._prune_plan(conn, cutoff, max_rows)
                if dry_run:
                    for kind, labelled, cond in plan:
                        n = conn.execute(sa.select(sa.func.count()).where(cond(predictions))).scalar_one()
                        deleted[kind, labelled] += int(n)
            if not dry_run:
                for kind, labelled, cond in plan:
                    deleted[kind, labelled] += self._delete_batches(cond, batch, stop)
            kept_where = sa.not_(sa.or_(*(cond(predictions) for _, _, cond in plan))) if dry_run and plan else sa.true()
            with self._engine().connect() as conn:
                kept, kept_labelled, oldest = conn.execute(
                    sa.select(sa.func.count(), sa.func.count(p.true_label), sa.func.min(p.time)).where(kept_where)
                ).one()
        except SQLAlchemyError as e:
            raise self._error(e, "prune the audit log") from None
        return PruneResult(
            database=self.display_url, dry_run=dry_run, max_age_s=max_age_s, cutoff=cutoff, max_rows=max_rows,
            deleted_by_age=deleted["age", False] + deleted["age", True],
            deleted_by_rows=deleted["rows", False] + deleted["rows", True],
            deleted_labelled=deleted["age", True] + deleted["rows", True],
            kept=int(kept), kept_labelled=int(kept_labelled), oldest_kept=oldest,
            seconds=round(time.perf_counter() - t0, 3), warnings=warnings,
        )  # fmt: skip

    def _prune_plan(self, conn: sa.Connection, cutoff: float | None,
                    max_rows: int | None) -> tuple[list[_Step], list[str]]:  # fmt: skip
        """(what to delete: (limit, labelled?, condition on a `predictions` table or alias), warnings)."""

        def kind(t: Any, labelled: bool) -> Any:
            return t.c.true_label.is_not(None) if labelled else t.c.true_label.is_(None)

        def alive(t: Any) -> Any:  # what the age limit keeps
            return t.c.time >= cutoff if cutoff is not None else sa.true()

        plan: list[_Step] = []
        warnings: list[str] = []
        if cutoff is not None:
            for labelled in (False, True):
                plan.append(("age", labelled, lambda t, lab=labelled: sa.and_(kind(t, lab), t.c.time < cutoff)))
        if max_rows is None:
            return plan, warnings
        p = predictions
        n_labelled = int(conn.execute(sa.select(sa.func.count()).where(kind(p, True), alive(p))).scalar_one())
        keep = {False: max(max_rows - n_labelled, 0), True: max_rows}
        if keep[False] == 0:
            warnings.append(
                f"labelled predictions alone ({n_labelled:,}) fill max_rows ({max_rows:,}): every unlabelled "
                "prediction is deleted at each prune, before feedback can label it; raise max_rows (or set a "
                "max age so old labelled rows make room)"
            )
        for labelled in (False, True):
            if keep[labelled] == 0:
                plan.append(("rows", labelled, lambda t, lab=labelled: sa.and_(kind(t, lab), alive(t))))
                continue
            # The newest rows are kept: the boundary is the keep-th newest row by (time, request_id).
            last_kept = conn.execute(
                sa.select(p.c.time, p.c.request_id).where(kind(p, labelled), alive(p))
                .order_by(p.c.time.desc(), p.c.request_id.desc()).offset(keep[labelled] - 1).limit(1)
            ).first()  # fmt: skip
            if last_kept is None:  # no more rows than that: nothing to delete
                continue
            t_k, id_k = last_kept
            plan.append(("rows", labelled, lambda t, lab=labelled, t_k=t_k, id_k=id_k: sa.and_(
                kind(t, lab), alive(t), t.c.time <= t_k, sa.or_(t.c.time < t_k, t.c.request_id < id_k))))  # fmt: skip
        return plan, warnings

    def start_pruner(self, settings: AuditSettings) -> Pruner:
        """The server's background retention (see Pruner): a thread when the settings set a limit, inert otherwise."""
        return Pruner(self, settings).start()

    def _delete_batches(self, cond: Callable[[Any], Any], batch: int, stop: Callable[[], bool] | None) -> int:
        """Delete the rows matching `cond`, oldest first, `batch` rows per transaction; returns how many."""
        p = predictions.c
        oldest = sa.select(p.request_id).where(cond(predictions)).order_by(p.time, p.request_id).limit(batch)
        total = 0
        while stop is None or not stop():
            with self._engine().begin() as conn:
                if self.is_sqlite:
                    # One statement: a SQLite transaction that reads before it writes could fail with
                    # SQLITE_BUSY_SNAPSHOT when a server worker commits in between, instead of waiting its turn.
                    victims = predictions.alias("victims")
                    ids: Any = sa.select(victims.c.request_id).where(cond(victims)).order_by(
                        victims.c.time, victims.c.request_id).limit(batch)  # fmt: skip
                else:
                    # The batch is locked first, skipping rows another transaction holds (a feedback update, another
                    # worker's batch): concurrent pruners take disjoint batches and never wait on or deadlock with
                    # each other. (A FOR UPDATE subquery inside the DELETE could be re-run and exceed the batch.)
                    ids = list(conn.execute(oldest.with_for_update(skip_locked=True)).scalars())
                    if not ids:
                        break
                # `cond` is checked again on each row as it is deleted: a row labelled by feedback in the meantime
                # is kept (a labelled row is never deleted as an unlabelled one).
                n = conn.execute(predictions.delete().where(cond(predictions), p.request_id.in_(ids))).rowcount
            total += n
            if n == 0:
                break
        return total

    def close(self) -> None:
        self.engine.dispose()


class _Insert:
    """`predictions.insert()` of every column, compiled once for a dialect, run straight on a DBAPI cursor.

    What `conn.execute(predictions.insert(), rows)` sends, without its per-call cost (statement cache lookup,
    execution context, parameter processing through dicts, Connection and Transaction objects): the same SQL text
    (with PostgreSQL's rendered casts), the same values (each column type's bind processor, as SQLAlchemy applies
    it), cursor.execute for one row and cursor.executemany for several, then the DBAPI commit, on a connection from
    the engine's pool (so pre-ping, the connect-time SQLite pragmas and the pool's rollback-on-return still apply).
    The driver's errors come out as SQLAlchemy's (IntegrityError, OperationalError, ...), a disconnect invalidating
    the pooled connection, and a value a bind processor refuses as a StatementError.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        compiled = predictions.insert().compile(dialect=dialect, column_keys=COLUMNS)
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        names = list(compiled.positiontup or ()) if self.positional else list(compiled.binds)
        keys = [compiled.binds[name].key for name in names]
        if sorted(keys) != sorted(COLUMNS) or len(set(names)) != len(names):
            raise RuntimeError(f"audit: the compiled INSERT binds {names}, expected one parameter per column")
        self.names = tuple(names)
        self.values = operator.attrgetter(*keys)
        self.image_at = keys.index("image")
        processors = [compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names]
        self.processors = [(i, process) for i, process in enumerate(processors) if process is not None]

    def parameters(self, records: list[AuditRecord]) -> list[Any]:
        """One parameter set per record, a tuple or a dict as the dialect's paramstyle wants."""
        rows: list[Any] = []
        image_at, processors = self.image_at, self.processors
        for rec in records:
            values = list(self.values(rec))
            image = values[image_at]
            if image is not None and type(image) is not bytes:
                values[image_at] = bytes(image)
            try:
                for i, process in processors:
                    values[i] = process(values[i])
            except Exception as e:  # as SQLAlchemy reports a value its type refuses (e.g. a non-bool `cached`)
                raise sa.exc.StatementError(str(e), self.sql, None, e) from None
            rows.append(tuple(values) if self.positional else dict(zip(self.names, values, strict=True)))
        return rows

    def run(self, engine: Engine, rows: list[Any]) -> None:
        """Insert the rows in one transaction and commit it; raises SQLAlchemy's DBAPIError subclasses."""
        dbapi_error = self.dialect.loaded_dbapi.Error
        try:
            pooled = engine.raw_connection()
        except dbapi_error as e:
            raise self._wrap(e, rows) from None
        try:
            connection = pooled.dbapi_connection
            cursor = None
            try:
                cursor = connection.cursor()
                if len(rows) == 1:
                    cursor.execute(self.sql, rows[0])
                else:
                    cursor.executemany(self.sql, rows)
                cursor.close()
                connection.commit()
            except dbapi_error as e:
                invalidated = self.dialect.is_disconnect(e, connection, cursor)
                if invalidated:
                    pooled.invalidate(e)
                raise self._wrap(e, rows, invalidated) from None
        finally:
            pooled.close()  # back to the pool, which rolls back whatever was not committed

    def _wrap(self, e: Exception, rows: list[Any], invalidated: bool = False) -> Exception:
        return sa.exc.DBAPIError.instance(
            self.sql, rows, e, self.dialect.loaded_dbapi.Error, hide_parameters=True,
            connection_invalidated=invalidated, dialect=self.dialect, ismulti=len(rows) > 1,
        )  # fmt: skip


@dataclass
class PruneResult:
    """What `AuditLog.prune` deleted (with dry_run: would delete) and what is left."""

    database: str
    dry_run: bool
    max_age_s: float | None
    cutoff: float | None
    """Rows recorded before this unix time are over the age limit."""
    max_rows: int | None
    deleted_by_age: int
    deleted_by_rows: int
    """Deleted (after the age limit) to get down to max_rows."""
    deleted_labelled: int
    """Of all the deleted rows, those with a label from feedback."""
    kept: int
    kept_labelled: int
    oldest_kept: float | None
    seconds: float
    warnings: list[str]

    @property
    def deleted(self) -> int:
        return self.deleted_by_age + self.deleted_by_rows

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "deleted": self.deleted}


class Pruner:
    """The server's retention: `AuditLog.prune` in a background thread, at start and then every prune_every_s.

    Never on a request's path nor on the event loop. A failed prune logs a warning and is tried again at the next
    interval; serving goes on. Inert (no thread) when the settings keep everything. The service starts it with
    `self.pruner = self.audit.start_pruner(settings.audit)` and stops it with `self.pruner.close()`.
    """

    def __init__(self, audit: AuditLog, settings: AuditSettings) -> None:
        self.audit, self.settings = audit, settings
        self.last: PruneResult | None = None
        self.runs = self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Pruner:
        if self.settings.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="digitkit-audit-prune", daemon=True)
            self._thread.start()
        return self

    def run_once(self) -> PruneResult | None:
        """One prune now (in the caller's thread); None if it failed (logged)."""
        s = self.settings
        try:
            result = self.audit.prune(max_age_s=s.max_age_s, max_rows=s.max_rows, stop=self._stop.is_set)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, serving goes on
            self.failures += 1
            logger.warning("audit retention: pruning %s failed (%s); serving goes on, next try in %g s",
                           self.audit.display_url, e, s.prune_every_s)  # fmt: skip
            return None
        self.runs += 1
        self.last = result
        for warning in result.warnings:
            logger.warning("audit retention: %s", warning)
        if result.deleted:
            logger.info("audit retention: deleted %d predictions (%d over the age limit, %d over max_rows; %d "
                        "labelled) in %.2f s; %d kept", result.deleted, result.deleted_by_age, result.deleted_by_rows,
                        result.deleted_labelled, result.seconds, result.kept)  # fmt: skip
        return result

    def _loop(self) -> None:
        delay = 0.0  # the first prune at startup
        while not self._stop.wait(delay):
            self.run_once()
            delay = self.settings.prune_every_s

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (a prune under way stops after its current batch)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # Wait for another writer (thread or worker process) instead of failing with "database is locked".
    cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    # WAL: readers never block the writer and one writer never blocks readers; several processes can share it.
    cur.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode: a commit is written to the WAL file (the OS page cache) before it returns, but fsync
    # happens only at checkpoints. A killed process (SIGKILL, crash, OOM) loses nothing, since the kernel still
    # holds and writes the pages; only a power loss or kernel crash can roll back the last commits (FULL would
    # fsync every commit to survive that too, at a few milliseconds per request).
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def _csv_value(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _record(row: sa.RowMapping) -> AuditRecord:
    values = {c: row[c] for c in COLUMNS}
    values["cached"] = bool(values["cached"])
    if values["image"] is not None:
        values["image"] = bytes(values["image"])
    return AuditRecord(**values)
