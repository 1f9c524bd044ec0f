"""The serving audit log on SQLite and PostgreSQL: records, feedback, statistics, exports, concurrency, durability,
errors; the `digitkit audit` commands; and `digitkit train --extra-data` with the IDX export."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sqlalchemy.engine import make_url

from digitkit import config, data, runs
from digitkit.cli import main, parse_age, parse_since
from digitkit.errors import ConfigError, DataError
from digitkit.serve.audit import AuditLog, AuditRecord

from .conftest import ROOT, make_idx_dir, synthetic_images

CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty audit database: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield str(tmp_path / "serve" / "audit.db")  # a bare path, in a folder that does not exist yet
        return
    import psycopg

    server = request.getfixturevalue("postgres_url")
    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def log(db_url):
    audit = AuditLog(db_url)
    yield audit
    audit.close()


def image(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, 784, dtype=np.uint8).tobytes()


def rec(i: int, **kw) -> AuditRecord:
    values = dict(request_id=uuid.uuid4().hex, time=1_700_000_000.0 + i, route="predict", input_sha256=f"{i:064x}",
                  model_version="v1", digit=str(i % 10), confidence=0.9, rejected=None, latency_ms=float(i),
                  client="127.0.0.1:5000", image=image(i))  # fmt: skip
    values.update(kw)
    return AuditRecord(**values)


# ---------------------------------------------------------------------------------------------- behaviour
def test_record_get_and_feedback(log):
    answered = rec(1, cached=True)
    rejected = rec(2, digit=None, rejected="low-confidence", confidence=0.31)
    unreadable = rec(3, digit=None, rejected="unreadable", confidence=0.0, image=None, route="batch")
    log.record([answered, rejected, unreadable])
    assert log.get(answered.request_id) == answered  # every field, image bytes included, round-trips
    assert log.get(rejected.request_id) == rejected
    assert log.get(unreadable.request_id) == unreadable
    assert log.get("f" * 32) is None

    labelled = log.feedback(answered.request_id, "7")
    assert labelled.true_label == "7" and labelled.feedback_time is not None and labelled.digit == "1"
    assert log.feedback(answered.request_id, "1").true_label == "1"  # a second feedback overwrites
    assert log.get(answered.request_id).true_label == "1"
    assert log.feedback(rejected.request_id, "4").true_label == "4"  # rejected answers can be labelled too
    assert log.feedback("0" * 32, "3") is None
    assert log.labelled_accuracy() == (1, 1)  # the rejected one has no digit to be right or wrong about


def test_record_rejects_a_wrong_image_size_and_duplicate_ids(log):
    with pytest.raises(DataError, match="image has 100 bytes, expected 784"):
        log.record([rec(1, image=bytes(100))])
    first = rec(2)
    log.record([first])
    with pytest.raises(DataError, match="already in the log"):
        log.record([rec(3), AuditRecord(**{**first.__dict__})])
    assert log.stats()["total"] == 1  # the failed batch left nothing behind: one transaction



def test_record_writes_exactly_what_sqlalchemy_core_writes(log, db_url):
    """record() runs a precompiled INSERT on the DBAPI cursor: the rows it stores are the ones
    `conn.execute(predictions.insert(), rows)` stores, field for field and type for type, through one row
    (cursor.execute) and several (executemany); and its errors are still DataErrors."""
    import sqlalchemy as sa

    from digitkit.serve.audit import COLUMNS, predictions

    def mix() -> list[AuditRecord]:
        return [
            rec(1, cached=True),
            rec(2, digit=None, rejected="low-confidence", confidence=0.31, image=bytearray(image(2))),
            rec(3, digit=None, rejected="unreadable", confidence=0.0, image=None, route="batch", client="[::1]:80"),
            rec(4, time=1_700_000_004, latency_ms=7, confidence=1, true_label="4", feedback_time=1_700_000_100.5),
            rec(5, model_version="v2 ünïcode", input_sha256="e" * 64, image=bytes(784), cached=False),
            rec(6, image=bytes(range(256)) * 3 + bytes(16)),
        ]  # fmt: skip

    fast, core = mix(), mix()
    for a, b in zip(fast, core, strict=True):
        b.request_id = "core-" + a.request_id[5:]
    log.record(fast[:1])  # one row
    log.record(fast[1:])  # several rows
    for batch in (core[:1], core[1:]):  # the path record() took before: SQLAlchemy Core, one transaction
        rows = [{c: getattr(r, c) for c in COLUMNS} for r in batch]
        for row in rows:
            row["image"] = bytes(row["image"]) if row["image"] is not None else None
        with log.engine.begin() as conn:
            conn.execute(predictions.insert(), rows)

    def as_core(record: AuditRecord, request_id: str) -> dict:
        values = {c: getattr(record, c) for c in COLUMNS}
        return {**values, "request_id": request_id, "types": [type(v).__name__ for v in values.values()]}

    for a, b in zip(fast, core, strict=True):
        got_a, got_b = log.get(a.request_id), log.get(b.request_id)
        assert as_core(got_a, b.request_id) == as_core(got_b, b.request_id)
        assert got_b.image == (bytes(a.image) if a.image is not None else None) and isinstance(got_a.time, float)

    exports = {}
    for fmt in ("csv", "jsonl"):
        out = io.StringIO()
        assert log.export(out, fmt) == 2 * len(fast)
        exports[fmt] = out.getvalue()
    for a, b in zip(fast, core, strict=True):
        exports = {fmt: text.replace(a.request_id, b.request_id) for fmt, text in exports.items()}
    for fmt, text in exports.items():  # every core row is next to its fast twin (same time), then byte-equal to it
        lines = sorted(text.splitlines()[1:] if fmt == "csv" else text.splitlines())
        assert lines[0::2] == lines[1::2], fmt

    # What the driver hands back without SQLAlchemy's types, and (SQLite) the storage class of every value.
    typeof = ", ".join(f"typeof({c})" for c in COLUMNS) if log.is_sqlite else "NULL"
    query = f"SELECT {', '.join(COLUMNS)}, {typeof} FROM predictions"
    with log.engine.connect() as conn:
        raw = {r[0]: tuple(r) for r in conn.exec_driver_sql(query)}
    for a, b in zip(fast, core, strict=True):
        got_a, got_b = raw[a.request_id][1:], raw[b.request_id][1:]
        assert [(type(v), bytes(v) if isinstance(v, memoryview) else v) for v in got_a] == \
               [(type(v), bytes(v) if isinstance(v, memoryview) else v) for v in got_b]  # fmt: skip
    if log.is_sqlite:
        assert raw[fast[0].request_id][len(COLUMNS) :] == ("text", "real", "text", "text", "text", "text", "real",
                                                          "null", "real", "text", "integer", "blob", "null", "null")

    # Errors: a value the column type refuses, as SQLAlchemy Core refused it; the database's own errors.
    with pytest.raises(sa.exc.StatementError, match="Not a boolean value"), log.engine.begin() as conn:
        conn.execute(predictions.insert(), [{**as_core(rec(7), "x"), "types": None, "cached": "yes"}])
    with pytest.raises(DataError, match=r"cannot record predictions \(Not a boolean value: 'yes'\)"):
        log.record([rec(7), rec(8, cached="yes")])
    with log.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE predictions"))
    with pytest.raises(DataError, match="cannot record predictions .*predictions"):
        log.record([rec(9)])
    AuditLog(db_url).close()  # creates the table again
    log.record([rec(10)])  # the failed transaction was rolled back: the pooled connection works
    assert log.stats()["total"] == 1

def test_stats(log):
    records = [rec(i, latency_ms=float(i), confidence=0.5 + i / 1000, cached=i % 4 == 0) for i in range(1, 101)]
    for r in records[90:95]:
        r.digit, r.rejected = None, "no-ink"
    for r in records[95:]:
        r.digit, r.rejected, r.route = None, "not-a-digit", "batch"
    records[-1].model_version = "v2"
    log.record(records)
    for r in records[:4]:  # digits 1, 2, 3, 4: two right, two wrong
        log.feedback(r.request_id, r.digit if int(r.digit) % 2 else "0")
    log.feedback(records[-1].request_id, "8")

    s = log.stats()
    assert s["total"] == 100 and s["answered"] == 90
    assert s["per_route"] == {"batch": 5, "predict": 95}
    assert s["per_class"] == {str(d): 9 for d in range(10)}
    assert s["rejected"] == 10 and s["rejection_rate"] == pytest.approx(0.1)
    assert s["rejections"] == {"no-ink": 5, "not-a-digit": 5}
    assert s["mean_confidence"] == pytest.approx(0.5 + np.mean(np.arange(1, 91)) / 1000)
    assert s["latency_ms"]["p50"] == 50 and s["latency_ms"]["p95"] == 95 and s["latency_ms"]["p99"] == 99
    assert s["latency_ms"]["mean"] == pytest.approx(50.5)
    assert s["cache_hits"] == 25
    assert s["labelled"] == 5 and s["labelled_answered"] == 4 and s["labelled_correct"] == 2
    assert s["labelled_accuracy"] == pytest.approx(0.5)
    assert s["model_versions"] == {"v1": 99, "v2": 1}
    assert s["first_time"] == records[0].time and s["last_time"] == records[-1].time
    json.dumps(s)  # the server returns it as JSON

    late = log.stats(since=records[89].time)
    assert late["total"] == 11 and late["answered"] == 1 and late["latency_ms"]["p50"] == 95
    assert log.labelled_accuracy() == (4, 2)
    empty = log.stats(since=records[-1].time + 1)
    assert empty["total"] == 0 and empty["rejection_rate"] is None and empty["latency_ms"]["p50"] is None


def test_export_csv_and_jsonl_in_time_order(log):
    records = [rec(i) for i in (5, 1, 3, 2, 4)]
    records[2].image, records[2].digit, records[2].rejected = None, None, "unreadable"
    log.record(records[:3])
    log.record(records[3:])
    log.feedback(records[0].request_id, "5")
    by_time = sorted(records, key=lambda r: r.time)

    out = io.StringIO()
    assert log.export(out, "csv") == 5
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["request_id"] for r in rows] == [r.request_id for r in by_time]
    assert "image" not in rows[0] and "image_b64" not in rows[0]
    assert rows[4]["true_label"] == "5" and rows[4]["digit"] == "5" and float(rows[4]["time"]) == records[0].time
    assert rows[2]["digit"] == "" and rows[2]["rejected"] == "unreadable"

    out = io.StringIO()
    assert log.export(out, "jsonl") == 5
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == [r.request_id for r in by_time]
    assert base64.b64decode(lines[0]["image_b64"]) == by_time[0].image
    assert lines[2]["image_b64"] is None and lines[2]["digit"] is None and lines[0]["cached"] is False

    out = io.StringIO()
    assert log.export(out, "jsonl", labelled_only=True) == 1
    assert json.loads(out.getvalue())["request_id"] == records[0].request_id
    with pytest.raises(ConfigError, match="expected one of csv, jsonl"):
        log.export(io.StringIO(), "xml")


def test_export_idx_holds_the_labelled_images(log, tmp_path):
    records = [rec(i) for i in range(6)]
    records[1].digit, records[1].rejected = None, "low-confidence"  # rejected but labelled: exported
    records[4].image = None  # labelled but no image: cannot be exported
    log.record(records)
    with pytest.raises(DataError, match="no labelled predictions with an image"):
        log.export_idx(tmp_path / "none")
    labels = {0: "0", 1: "7", 2: "3", 4: "4"}  # records 3 and 5 stay unlabelled
    for i, label in labels.items():
        log.feedback(records[i].request_id, label)

    counts = log.export_idx(tmp_path / "field")
    assert counts == {"0": 1, "3": 1, "7": 1}
    assert (tmp_path / "field" / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    assert (tmp_path / "field" / "request_ids.txt").read_text().split() == [records[i].request_id for i in (0, 1, 2)]
    ds = data.load_extra(tmp_path / "field", [str(d) for d in range(10)], (28, 28))  # checksums verified
    assert ds.labels.tolist() == [0, 7, 3]
    for row, i in enumerate((0, 1, 2)):
        assert ds.images[row, 0].numpy().tobytes() == records[i].image

    log.feedback(records[2].request_id, "three")
    with pytest.raises(DataError, match="label 'three' is not one of the classes"):
        log.export_idx(tmp_path / "bad", classes=[str(d) for d in range(10)])


def test_threads_lose_nothing(log):
    ids: list[str] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        for k in range(20):
            batch = [rec(seed * 100 + k), rec(seed * 100 + k + 50)]
            log.record(batch)
            with lock:
                ids.extend(r.request_id for r in batch)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.stats()["total"] == 240 == len(ids)
    assert all(log.get(i) is not None for i in ids[::17])


WRITER = textwrap.dedent("""
    import os, sys, time
    from digitkit.serve.audit import AuditLog, AuditRecord
    url, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    log = AuditLog(url)
    print("ready", flush=True)
    while not os.path.exists(go):  # both processes start writing at the same moment
        time.sleep(0.002)
    for i in range(n):
        log.record([AuditRecord(request_id=f"{tag}{i:06d}{j}" + "0" * 20, time=time.time(), route="predict",
                                input_sha256="0" * 64, model_version="v1", digit="1", confidence=0.9, rejected=None,
                                latency_ms=1.0, client=tag, image=bytes(784)) for j in range(3)])
    print("recorded", flush=True)
    if len(sys.argv) > 5:
        time.sleep(60)  # waits to be killed
""")


def test_two_processes_writing_at_once_lose_nothing(db_url, tmp_path):
    AuditLog(db_url).close()  # the table exists before the race, as when the server's first worker started
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db_url, tag, "60", str(go)], env=CHILD_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    log = AuditLog(db_url)
    try:
        s = log.stats()
        assert s["total"] == 360
        assert log.get("a000059" + "2" + "0" * 20) is not None and log.get("b000000" + "0" + "0" * 20) is not None
    finally:
        log.close()


def test_a_recorded_prediction_survives_sigkill(db_url, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, db_url, "k", "1", str(tmp_path), "wait"], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        line = proc.stdout.readline()
        assert line.strip() == "recorded", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no close(), no atexit
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    log = AuditLog(db_url)
    try:
        assert log.stats()["total"] == 3
        assert log.get("k000000" + "1" + "0" * 20).client == "k"
    finally:
        log.close()


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "url, error, message",
    [
        ("mysql://admin:hunter2secret@db.example/audit", ConfigError, "unsupported database 'mysql'"),
        ("postgresql://admin:hunter2secret@127.0.0.1:notaport/db", ConfigError, "not a database URL"),
        ("postgresql://admin:hunter2secret@127.0.0.1:1/audit", DataError, "cannot open the database"),
        ("sqlite://", ConfigError, "in-memory SQLite"),
        ("", ConfigError, "empty URL"),
        ("/proc/no/such/place/audit.db", DataError, "cannot create the folder"),
    ],
)
def test_bad_urls_are_clear_errors_without_the_password(url, error, message):
    with pytest.raises(error, match=message) as info:
        AuditLog(url)
    assert "hunter2secret" not in str(info.value)
    if "127.0.0.1:1" in url:
        assert "postgresql+psycopg://admin:***@127.0.0.1:1/audit" in str(info.value)


def test_wrong_postgres_database_names_the_url_without_password(postgres_url):
    url = make_url(postgres_url).set(password="hunter2secret", database="no_such_db")
    with pytest.raises(DataError, match="no_such_db") as info:
        AuditLog(url.render_as_string(hide_password=False))
    assert "hunter2secret" not in str(info.value) and "***" in str(info.value)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_stats_and_exports(tmp_path, capsys):
    db = str(tmp_path / "audit.db")
    log = AuditLog(f"sqlite:///{db}")
    records = [rec(i) for i in range(4)]
    records[3].digit, records[3].rejected = None, "no-ink"
    log.record(records)
    log.feedback(records[0].request_id, "0")
    log.feedback(records[1].request_id, "9")
    log.close()

    assert main(["audit", "stats", "--db", db, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["total"] == 4 and s["labelled_accuracy"] == 0.5 and s["rejections"] == {"no-ink": 1}
    assert main(["audit", "stats", "--db", db]) == 0
    text = capsys.readouterr().out
    assert "predictions    4" in text and "rejected       1 (25.0%); no-ink: 1" in text
    assert "accuracy 50.0% (1 of 2 answered)" in text
    assert main(["audit", "stats", "--db", db, "--json", "--since", str(records[2].time)]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 2

    assert main(["audit", "export", "--db", db, "--format", "csv", "--labelled"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["true_label"] for r in rows] == ["0", "9"]
    assert main(["audit", "export", "--db", db, "--format", "jsonl", "--out", str(tmp_path / "x" / "all.jsonl")]) == 0
    assert len((tmp_path / "x" / "all.jsonl").read_text().splitlines()) == 4
    assert main(["audit", "export", "--db", db, "--format", "idx", "--out", str(tmp_path / "idx")]) == 0
    assert "wrote 2 labelled images" in capsys.readouterr().out
    assert data.load_extra(tmp_path / "idx", [str(d) for d in range(10)], (28, 28)).labels.tolist() == [0, 9]

    assert main(["audit", "export", "--db", db, "--format", "idx"]) == 2
    assert "give it with --out DIR" in capsys.readouterr().err
    assert main(["audit", "stats", "--db", "mysql://u:pw@h/d"]) == 2
    assert "unsupported database" in capsys.readouterr().err


def test_cli_prune(tmp_path, capsys):
    import time

    db = str(tmp_path / "audit.db")
    log = AuditLog(db)
    now = time.time()
    records = [rec(i, time=now - 86400 * (39.5 - i)) for i in range(40)]  # one a day, 39.5 to 0.5 days old
    log.record(records)
    for r in records[25:28]:
        log.feedback(r.request_id, r.digit)
    log.close()

    assert main(["audit", "prune", "--db", db, "--max-age", "30d", "--max-rows", "20", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would delete   20 predictions (10 over the age limit, 10 over the row limit; 0 of them labelled)" in text
    assert "limits         older than 30d (before " in text and "beyond 20 rows (unlabelled first)" in text
    assert "would keep     20 predictions (3 labelled), from " in text and "dry run: nothing was deleted" in text
    assert main(["audit", "stats", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 40

    assert main(["audit", "prune", "--db", db, "--max-age", "35d"]) == 0  # rows 0-4 (35.5 to 39.5 days old) go
    assert "deleted        5 predictions (5 over the age limit, 0 over the row limit; 0 of them labelled)" in \
        capsys.readouterr().out  # fmt: skip
    assert main(["audit", "prune", "--db", db, "--max-rows", "10", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["deleted"] == 25 and result["deleted_labelled"] == 0 and result["kept_labelled"] == 3
    assert result["kept"] == 10 and result["dry_run"] is False and not out.err
    assert main(["audit", "prune", "--db", db, "--max-rows", "2"]) == 0  # the 3 labelled rows alone exceed 2
    out = capsys.readouterr()
    assert "deleted        8 predictions (0 over the age limit, 8 over the row limit; 1 of them labelled)" in out.out
    assert "digitkit: warning: labelled predictions alone (3) fill max_rows (2)" in out.err

    for argv, message in [([], "nothing to prune: give --max-age (e.g. 30d) and/or --max-rows"),
                          (["--max-age", "30 days"], "--max-age '30 days': expected an age above zero"),
                          (["--max-age", "0d"], "--max-age '0d': expected an age above zero"),
                          (["--max-age", "2024-01-01"], "(90m, 24h, 30d)")]:  # fmt: skip
        assert main(["audit", "prune", "--db", db, *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "prune", "--db", db, "--max-rows", "0"])
    assert exit_info.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_parse_since():
    assert parse_since("1700000000") == 1_700_000_000
    assert parse_since("2h", now=10_000.0) == 10_000 - 7200
    assert parse_since("2023-11-14T22:13:20+00:00") == 1_700_000_000
    assert parse_since(None) is None
    with pytest.raises(ConfigError, match="expected an ISO time"):
        parse_since("yesterday")
    assert parse_age("90m") == 5400 and parse_age("1.5d") == 129600


# ---------------------------------------------------------------------------------------------- train --extra-data
CLASSES = ["up", "right", "down", "left"]


def _field_dir(tmp_path: Path, n: int = 12) -> tuple[Path, np.ndarray, np.ndarray]:
    """An audit log with n labelled predictions of the tiny data set's classes, exported as IDX."""
    labels = np.arange(n) % len(CLASSES)
    images = synthetic_images(labels, seed=9)
    log = AuditLog(tmp_path / "audit.db")
    records = [rec(i, image=images[i].tobytes(), digit=CLASSES[(labels[i] + 1) % 4]) for i in range(n)]
    log.record(records + [rec(n + 1, digit="up")])  # one unlabelled: not exported
    for r, y in zip(records, labels, strict=True):
        log.feedback(r.request_id, CLASSES[y])
    assert log.export_idx(tmp_path / "field", classes=CLASSES) == {c: n // 4 for c in CLASSES}
    log.close()
    return tmp_path / "field", images, labels


def test_extra_data_reaches_the_training_portion_only(tmp_path, tiny_dir):
    field, images, labels = _field_dir(tmp_path)
    base = config.load(None, [f"data.dir={tiny_dir}"])
    train0, val0, test0 = runs.load_data(base)
    cfg = config.load(None, [f"data.dir={tiny_dir}", f"data.extra_dirs=[{field}, {field}]"])
    train, val, test = runs.load_data(cfg)
    assert len(train) == len(train0) + 2 * len(labels)
    assert torch.equal(train.images[len(train0) : len(train0) + len(labels), 0], torch.from_numpy(images))
    assert train.labels[len(train0) :].tolist() == 2 * labels.tolist()
    assert torch.equal(val.images, val0.images) and torch.equal(test.images, test0.images)

    deskewed = config.load(None, [f"data.dir={tiny_dir}", f"data.extra_dirs=[{field}]", "preprocess.deskew=true"])
    extra = runs.load_data(deskewed)[0].images[len(train0) :]
    expected = runs.prepared(data.load_extra(field, CLASSES, (28, 28)), deskewed).images
    assert torch.equal(extra, expected) and not torch.equal(extra[:, 0], torch.from_numpy(images))


def test_train_cli_with_extra_data(tmp_path, tiny_dir, capsys):
    field, _, labels = _field_dir(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--data-dir", str(tiny_dir), "--extra-data", str(field), "--set", "model.name=mlp", "--set",
            "train.epochs=1", "--set", "augment.recipe=none", "--out", str(out), "--quiet", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["extra_training_images"] == len(labels)
    assert json.loads((out / "summary.json").read_text())["extra_training_images"] == len(labels)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["extra_dirs"] == [str(field)]


def test_extra_data_of_another_shape_or_classes_is_a_clear_error(tmp_path, tiny_dir, capsys):
    small = make_idx_dir(tmp_path / "small", num_classes=4, size=20)
    assert main(["train", "--data-dir", str(tiny_dir), "--extra-data", str(small), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "extra training images are uint8 (20, 20), the training data is uint8 (28, 28)" in err
    assert not (tmp_path / "r").exists()  # failed before a run folder was made

    other = make_idx_dir(tmp_path / "other", num_classes=4, class_names=["a", "b", "c", "d"])
    with pytest.raises(DataError, match="has classes a, b, c, d, the training data has up, right, down, left"):
        data.load_extra(other, CLASSES, (28, 28))
    with pytest.raises(DataError, match="extra training data folder not found"):
        data.load_extra(tmp_path / "missing", CLASSES, (28, 28))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03")
    with pytest.raises(DataError, match="no train labels file"):
        data.load_extra(tmp_path / "broken", CLASSES, (28, 28))


# ---------------------------------------------------------------------------------------------- retention
BASE = 1_700_000_000.0  # rec(i) was recorded at BASE + i


def kept_ids(log: AuditLog) -> set[str]:
    out = io.StringIO()
    log.export(out, "csv")
    return {row["request_id"] for row in csv.DictReader(io.StringIO(out.getvalue()))}


def test_prune_by_age_then_rows_keeps_labelled_rows_longest(log):
    records = [rec(i) for i in range(30)]
    log.record(records)
    labelled = (0, 1, 2, 10, 12, 14)  # three old enough for the age limit, three in the middle
    for i in labelled:
        log.feedback(records[i].request_id, records[i].digit)
    # Age: rows 0-4 are more than 25 s older than BASE + 30 (labelled ones too). Rows: of the 25 left, the 3
    # labelled ones stay and the 7 newest unlabelled ones (23-29) fill the 10 rows.
    expected = {records[i].request_id for i in (10, 12, 14, *range(23, 30))}
    dry = log.prune(max_age_s=25, max_rows=10, now=BASE + 30, dry_run=True)
    assert (dry.deleted_by_age, dry.deleted_by_rows, dry.deleted_labelled) == (5, 15, 3)
    assert (dry.kept, dry.kept_labelled, dry.oldest_kept) == (10, 3, BASE + 10) and dry.dry_run
    assert log.stats()["total"] == 30  # a dry run deletes nothing

    done = log.prune(max_age_s=25, max_rows=10, now=BASE + 30, batch=4)
    assert (done.deleted_by_age, done.deleted_by_rows, done.deleted_labelled, done.deleted) == (5, 15, 3, 20)
    assert (done.kept, done.kept_labelled, done.oldest_kept, done.cutoff) == (10, 3, BASE + 10, BASE + 5)
    assert kept_ids(log) == expected and not done.warnings
    json.dumps(done.to_json())  # what `digitkit audit prune --json` prints
    again = log.prune(max_age_s=25, max_rows=10, now=BASE + 30)
    assert again.deleted == 0 and again.kept == 10  # the limits are met: nothing more goes

    # Labelled rows alone over the limit: every unlabelled row goes, then the oldest labelled one, with a warning.
    tight = log.prune(max_rows=2)
    assert (tight.deleted_by_rows, tight.deleted_labelled) == (8, 1)
    assert kept_ids(log) == {records[12].request_id, records[14].request_id}
    assert len(tight.warnings) == 1 and "labelled predictions alone (3) fill max_rows (2)" in tight.warnings[0]


def test_prune_deletes_in_batches_and_stops_between_them(log):
    log.record([rec(i) for i in range(50)])
    asked = []
    result = log.prune(max_rows=10, batch=7, stop=lambda: asked.append(1) and False)
    assert result.deleted_by_rows == 40 and result.kept == 10 and result.oldest_kept == BASE + 40
    assert len(asked) == 7  # 40 rows in batches of 7 (6 transactions), then one that finds nothing: asked each time

    newer = [rec(i) for i in range(100, 130)]
    log.record(newer)
    asked.clear()
    stopped = log.prune(max_rows=10, batch=4, stop=lambda: len(asked) > 2 or asked.append(1))
    assert stopped.deleted_by_rows == 12 and stopped.kept == 28  # three batches of 4, then asked to stop
    assert stopped.oldest_kept == BASE + 102  # the oldest went first: 40-49, then 100 and 101
    assert log.prune(max_rows=10).deleted_by_rows == 18  # the rest
    assert kept_ids(log) == {r.request_id for r in newer[-10:]}


def test_two_processes_pruning_at_once_delete_no_more_than_one(db_url):
    """The server's workers each run a pruner: the limit is a boundary fixed up front, so they delete the same rows
    (each once), never twice as many."""
    first = AuditLog(db_url)
    records = [rec(i) for i in range(300)]
    first.record(records)
    second = AuditLog(db_url)
    go = threading.Barrier(2)
    results = []

    def prune(log: AuditLog) -> None:
        go.wait()
        results.append(log.prune(max_rows=100, batch=10))

    threads = [threading.Thread(target=prune, args=(log,)) for log in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(results) == 2 and sum(r.deleted for r in results) == 200
        assert kept_ids(first) == {r.request_id for r in records[200:]}
    finally:
        first.close()
        second.close()


def test_prune_arguments_are_checked(log):
    for kwargs, word in [({"max_age_s": 0}, "max age 0 s"), ({"max_age_s": float("nan")}, "max age nan"),
                         ({"max_rows": 0}, "max rows 0"), ({"max_rows": 2.5}, "max rows 2.5"),
                         ({"max_rows": True}, "max rows True"), ({"max_rows": 5, "batch": 0}, "batch 0")]:  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(word)):
            log.prune(**kwargs)
    nothing = log.prune()  # no limit: nothing to do, on an empty log too
    assert nothing.deleted == 0 and nothing.kept == 0 and nothing.oldest_kept is None


def test_retention_settings_are_validated():
    from digitkit.serve import settings

    s = settings.from_dict({"audit": {"max_age_days": 30, "max_rows": 1000}})
    assert s.audit.max_age_s == 30 * 86400 and s.audit.max_rows == 1000 and s.audit.enabled
    assert not settings.from_dict({}).audit.enabled  # the default keeps everything
    assert settings.from_dict(json.loads(s.to_env())).audit == s.audit  # what --workers N hands its workers
    bad = [({"max_age_days": 0}, "audit.max_age_days = 0.0: expected a number of days > 0"),
           ({"max_age_days": -3}, "audit.max_age_days = -3.0"), ({"max_age_days": "nan"}, "audit.max_age_days = nan"),
           ({"max_rows": 0}, "audit.max_rows = 0: expected a positive number of rows"),
           ({"max_rows": 1.5}, "'audit.max_rows' = 1.5: expected int"),
           ({"prune_every_s": 0.1}, "audit.prune_every_s = 0.1: expected seconds between prunes, from 1 to 604,800"),
           ({"prune_every_s": 1e300}, "audit.prune_every_s = 1e+300"),
           ({"max_age": 30}, "unknown config key 'audit.max_age'")]  # fmt: skip
    for raw, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            settings.from_dict({"audit": raw})
    with pytest.raises(ConfigError, match=re.escape("audit.max_rows = '5': expected a positive number")):
        settings.AuditSettings(max_rows="5")  # built in code, without the YAML's type checks


def test_the_pruner_thread_prunes_at_start_and_outlives_a_failure(tmp_path, caplog):
    import logging
    import time

    from digitkit.serve.settings import AuditSettings

    log = AuditLog(tmp_path / "audit.db")
    log.record([rec(i) for i in range(20)])
    real_prune, calls = log.prune, []

    def flaky(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise DataError("audit database x: cannot prune the audit log (disk I/O error)")
        return real_prune(**kwargs)

    log.prune = flaky
    assert log.start_pruner(AuditSettings())._thread is None  # no limit: no thread
    with caplog.at_level(logging.INFO, logger="digitkit.serve"):
        pruner = log.start_pruner(AuditSettings(max_rows=5, prune_every_s=1))
        try:
            deadline = time.monotonic() + 20
            while pruner.runs < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pruner.failures == 1 and pruner.runs == 1, (pruner.failures, pruner.runs)
            assert pruner._thread.daemon and pruner._thread.name == "digitkit-audit-prune"
        finally:
            pruner.close()
    assert not pruner._thread.is_alive()
    assert calls[0]["max_rows"] == 5 and calls[0]["max_age_s"] is None
    assert log.stats()["total"] == 5 and pruner.last.deleted == 15
    text = caplog.text
    assert "pruning" in text and "failed (audit database x: cannot prune the audit log (disk I/O error)); serving " \
        "goes on, next try in 1 s" in text and "audit retention: deleted 15 predictions" in text  # fmt: skip
    log.close()


def test_a_server_with_retention_prunes_in_the_background(mnist_small_run, tmp_path):
    import time

    from tests.serving import serve

    db = tmp_path / "audit.db"
    old = AuditLog(db)
    records = [rec(i) for i in range(30)]  # from 2023: over the age limit
    old.record(records)
    old.feedback(records[0].request_id, "0")  # the age limit applies to labelled rows too
    old.close()
    settings = tmp_path / "serve.yaml"
    settings.write_text("audit:\n  max_age_days: 30\n  max_rows: 8\n  prune_every_s: 1\n")
    pixels = np.random.default_rng(0).integers(0, 256, (12, 28, 28)).astype(float)
    pixels[:, 8:20, 12:16] = 255
    with serve(mnist_small_run, tmp_path, "--settings", str(settings), "--audit-db", str(db)) as srv, \
            srv.client() as c:  # fmt: skip
        ids = []
        for i, p in enumerate(pixels):
            ids.append(c.post("/v1/predict", json={"pixels": p.tolist()}).json()["request_id"])
            if i < 2:  # labelled while the log is under its row limit
                assert c.post("/v1/feedback", json={"request_id": ids[i], "true_label": "1"}).status_code == 200
        log = AuditLog(db)
        try:
            deadline = time.monotonic() + 30
            while log.stats()["total"] > 8 and time.monotonic() < deadline:
                time.sleep(0.1)
            # The 2023 rows went at startup (age); then, over 8 rows, the oldest unlabelled answers; the two
            # labelled ones stay although they are the oldest.
            assert kept_ids(log) == {ids[0], ids[1], *ids[-6:]}
        finally:
            log.close()
        assert c.get("/readyz").status_code == 200
        assert "(30 over the age limit, 0 over max_rows; 1 labelled)" in srv.log()
        assert "over max_rows" in srv.log().split("(30 over the age limit", 1)[1]  # then a prune by rows
