"""The feedback-to-retrain loop (digitkit.retrain, `digitkit retrain`): labelled feedback from a real SQLite audit
log, a real tiny candidate trained beside a real tiny base, both compared on the base's validation split and on
held-out feedback, promoted (a link swapped atomically) or refused by the rule; the clear errors; and a real
server that hot-reloads the promoted model under a bounded load without failing a request."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from digitkit import cli, config, data, retrain, runs
from digitkit.errors import ConfigError, DataError
from digitkit.serve.audit import AuditLog, AuditRecord

from .conftest import make_idx_dir, synthetic_images
from .serving import serve

CLASSES = 10
ADMIN = "test-admin-token-0123456789"
FAST = ["--set", "train.epochs=2"]  # the candidates below: 2 epochs instead of the base's 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny classifier of 10 synthetic "digits" (bars at 10 angles): 480 training and 120 validation images,
    cnn1, 3 epochs, about a second; 100% on its validation split."""
    root = tmp_path_factory.mktemp("retrain-base")
    folder = make_idx_dir(root / "data", num_classes=CLASSES, n_train=600, n_test=50)
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn1", "train.epochs=3", "train.batch_size=32",
                             "augment.recipe=none", "train.plots=false", "train.threads=1",
                             "data.val_fraction=0.2"])  # fmt: skip
    summary = runs.train_run(cfg, out=root / "base")
    assert summary["val_accuracy"] == 1.0
    return root / "base"


def feedback_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n model inputs (28x28 uint8) of the base's kind, every class alike, and their true classes."""
    labels = np.arange(n) % CLASSES
    np.random.default_rng(seed).shuffle(labels)
    return synthetic_images(labels, seed=seed), labels


def make_db(path: Path, n: int, seed: int = 7, shift: int = 0, labelled: bool = True, version: str = "base") -> Path:
    """An audit log as the server leaves it: n answered predictions, each labelled by feedback (AuditLog.feedback)
    with its true class, or with class + `shift` (deliberately wrong labels)."""
    log = AuditLog(str(path))
    images, labels = feedback_images(n, seed)
    records = [AuditRecord(request_id=uuid.uuid4().hex, time=1_700_000_000.0 + i, route="predict",
                           input_sha256=f"{seed:08x}{i:056x}", model_version=version, digit=str(labels[i]),
                           confidence=0.9, rejected=None, latency_ms=1.0, client="127.0.0.1:5000",
                           image=images[i].tobytes()) for i in range(n)]  # fmt: skip
    log.record(records)
    if labelled:
        for rec, label in zip(records, labels, strict=True):
            assert log.feedback(rec.request_id, str((label + shift) % CLASSES)) is not None
    log.close()
    return path


def read_ids(folder: Path) -> list[str]:
    return (folder / retrain.REQUEST_IDS).read_text().split()


# ---------------------------------------------------------------------------------------------- the loop
def test_promoted_candidate_then_a_second_round_skips_what_the_base_trained_on(base_run, tmp_path, capsys):
    db = make_db(tmp_path / "audit.db", 100)
    link = tmp_path / "models" / "current"
    retrain.promote(link, base_run)  # the served link, pointing at the base
    out = tmp_path / "cand1"
    code = cli.main(["retrain", "--from-audit", str(db), "--base", str(link), "--out", str(out),
                     "--promote-to", str(link), "--quiet", *FAST])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads((out / "retrain.json").read_text())
    # The feedback: 100 labelled, stratified 30% held out (3 of each class's 10), the rest trained on.
    fb = report["feedback"]
    assert (fb["labelled"], fb["already_trained"], fb["train"], fb["holdout"]) == (100, 0, 70, 30)
    assert fb["holdout_per_class"] == {str(c): 3 for c in range(CLASSES)}
    train_ids, hold_ids = read_ids(out / "feedback" / "train"), read_ids(out / "feedback" / "holdout")
    assert len(train_ids) == 70 and len(hold_ids) == 30 and not set(train_ids) & set(hold_ids)
    # The candidate: the base's recipe (the --set aside) plus the training part, on the same validation split.
    cand_cfg = config.load(out / "config.yaml")
    base_cfg = config.load(base_run / "config.yaml")
    assert cand_cfg.data.extra_dirs == [str((out / "feedback" / "train").resolve())]
    assert (cand_cfg.data.dir, cand_cfg.split_seed, cand_cfg.model.name) == (base_cfg.data.dir, 0, "cnn1")
    assert cand_cfg.train.epochs == 2 and base_cfg.train.epochs == 3
    assert json.loads((out / "summary.json").read_text())["extra_training_images"] == 70
    # Both comparisons, with figures the rule was applied to.
    val, feedback = report["comparisons"]
    assert (val["name"], val["images"], feedback["name"], feedback["images"]) == ("validation", 120, "feedback", 30)
    assert val["base_accuracy"] == 1.0 and val["candidate_accuracy"] >= 0.999
    assert feedback["candidate_accuracy"] >= feedback["base_accuracy"]
    assert all(c["passed"] for c in report["comparisons"]) and report["decision"] == "promoted"
    assert val["tolerance_points"] == 0.1 and feedback["tolerance_points"] == 0.0
    assert "not worse than the base by more than 0.1 points on the validation split" in report["rule"]
    assert "test" not in json.dumps(report["candidate_summary"])  # the sealed test set plays no part
    # The rule and the figures are printed; the link now points at the candidate, the old target recorded.
    assert "rule       promote only if" in text and "PROMOTED" in text and "validation      120" in text
    assert link.resolve() == out.resolve() and report["replaced"] == str(base_run.resolve())

    # Round 2, from the promoted link: the 70 rows the new base trained on are left out (they are in its
    # training data already, and would be no fair hold-out); the 30 held out before and 40 new ones are split.
    make_db(db, 40, seed=11)
    second = retrain.retrain(db, link, tmp_path / "cand2", overrides=["train.epochs=2"])
    assert (second.feedback["labelled"], second.feedback["already_trained"]) == (140, 70)
    assert second.feedback["train"] + second.feedback["holdout"] == 70
    new_ids = read_ids(tmp_path / "cand2" / "feedback" / "train") + read_ids(tmp_path / "cand2" / "feedback" /
                                                                             "holdout")  # fmt: skip
    assert not set(new_ids) & set(train_ids)
    cfg2 = config.load(tmp_path / "cand2" / "config.yaml")  # the earlier feedback stays, once
    assert cfg2.data.extra_dirs == [str((out / "feedback" / "train").resolve()),
                                    str((tmp_path / "cand2" / "feedback" / "train").resolve())]  # fmt: skip
    assert second.feedback["holdout"] >= 10


def test_wrong_labels_make_a_worse_candidate_that_is_refused(base_run, tmp_path, capsys):
    """Feedback whose labels are all off by one class, 3 times as much as the base's own data: the candidate
    learns the wrong names, validation falls, and the rule refuses it; the link stays on the base."""
    db = make_db(tmp_path / "audit.db", 1400, shift=1)
    link = tmp_path / "current"
    retrain.promote(link, base_run)
    report = retrain.retrain(db, link, tmp_path / "cand", overrides=["train.epochs=2"], promote_to=link)
    val, feedback = report.comparisons
    assert not report.promoted and report.decision == "refused"
    assert not val.passed and val.difference_points < -10 and val.broken > 10
    assert feedback.base_accuracy == 0.0 and feedback.passed  # the base never agrees with the wrong labels
    assert report.reasons and report.reasons[0].startswith("validation: the candidate is")
    assert link.resolve() == base_run.resolve() and report.promoted_to is None
    saved = json.loads((tmp_path / "cand" / "retrain.json").read_text())
    assert saved["decision"] == "refused" and saved["comparisons"][0]["passed"] is False
    assert "REFUSED: validation" in retrain.report_text(report)


def test_a_crippled_recipe_is_refused_and_the_command_exits_1(base_run, tmp_path, capsys):
    """Correct feedback, but --set leaves the candidate one training step: worse on both sets, exit status 1."""
    db = make_db(tmp_path / "audit.db", 60)
    out = tmp_path / "cand"
    code = cli.main(["retrain", "--from-audit", str(db), "--base", str(base_run), "--out", str(out), "--quiet",
                     "--set", "train.epochs=1", "--set", "train.steps_per_epoch=1", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["decision"] == "refused"
    assert [c["passed"] for c in report["comparisons"]] == [False, False]
    assert len(report["reasons"]) == 2 and report["reasons"][1].startswith("feedback: the candidate is")


def test_the_rule_at_its_boundaries():
    def comp(base: int, cand: int, tol: float, n: int = 1000) -> retrain.Comparison:
        return retrain.Comparison("validation", "", n, base, cand, tol, fixed=0, broken=max(base - cand, 0))

    assert comp(990, 989, 0.1).passed  # 0.1 points worse: allowed
    assert not comp(990, 988, 0.1).passed  # 0.2 points worse
    assert comp(30, 30, 0.0, n=30).passed and not comp(30, 29, 0.0, n=30).passed
    assert comp(10, 20, 0.0, n=30).passed
    assert comp(7, 7, 0.0).mcnemar_p == 1.0
    assert retrain.Comparison("f", "", 100, 50, 60, 0, fixed=10, broken=0).mcnemar_p == pytest.approx(2 / 1024)


# ---------------------------------------------------------------------------------------------- errors
def error_of(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("digitkit: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_errors_are_one_clear_line(base_run, tmp_path, capsys):
    db = make_db(tmp_path / "audit.db", 60)
    args = ["--base", str(base_run), "--out", str(tmp_path / "out")]
    missing = tmp_path / "nowhere" / "audit.db"
    err = error_of(capsys, ["retrain", "--from-audit", str(missing), *args])
    assert "no such audit database" in err and "--audit-db" in err
    assert not missing.exists() and not missing.parent.exists()  # nothing made on the way
    unlabelled = make_db(tmp_path / "unlabelled.db", 40, labelled=False)
    err = error_of(capsys, ["retrain", "--from-audit", str(unlabelled), *args])
    assert "no labelled predictions" in err and "/v1/feedback" in err
    assert not (tmp_path / "out").exists()  # no half-made candidate folder
    few = make_db(tmp_path / "few.db", 12)
    err = error_of(capsys, ["retrain", "--from-audit", str(few), *args])
    assert "too little new feedback: 12 labelled images" in err and "at least 10 held out" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--set", "train.epoch=2"])
    assert "unknown config key 'train.epoch'" in err and "epochs" in err and "--set" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--set", "data.val_fraction=0.3"])
    assert "moves the validation split" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--holdout", "1.5"])
    assert "--holdout 1.5" in err
    (tmp_path / "real").mkdir()
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--promote-to", str(tmp_path / "real")])
    assert "not a symbolic link" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--reload", "ftp://x"])
    assert "--reload 'ftp://x'" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), *args, "--reload", "http://127.0.0.1:9",
                            "--admin-token-file", str(tmp_path / "no-token")])  # fmt: skip
    assert "--admin-token-file" in err and "cannot read" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    err = error_of(capsys, ["retrain", "--from-audit", str(db), "--base", str(base_run), "--out",
                            str(tmp_path / "full")])  # fmt: skip
    assert "not empty" in err
    err = error_of(capsys, ["retrain", "--from-audit", str(db), "--base", str(tmp_path / "norun"), "--out",
                            str(tmp_path / "out")])  # fmt: skip
    assert "no such checkpoint or run folder" in err


def test_a_row_reader_is_no_base(row_reader_run, tmp_path):
    db = make_db(tmp_path / "audit.db", 40)
    with pytest.raises(ConfigError, match=r"a row reader \(task: sequence\).*single-digit classifier"):
        retrain.retrain(db, row_reader_run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_labels_outside_the_models_classes_are_refused(base_run, tmp_path):
    db = make_db(tmp_path / "audit.db", 40)
    log = AuditLog(str(db))
    log.record([AuditRecord(request_id=uuid.uuid4().hex, time=1.8e9, route="predict", input_sha256="f" * 64,
                            model_version="base", digit="1", confidence=0.9, rejected=None, latency_ms=1.0,
                            client="x", image=bytes(784), true_label="x")])  # fmt: skip
    log.close()
    with pytest.raises(DataError, match=r"label 'x' is not one of the classes"):
        retrain.retrain(db, base_run, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- hot reload
def test_retrain_reload_swaps_the_served_model_under_load_without_a_failed_request(base_run, tmp_path):
    """A real server serves the link; predictions and feedback go through it into its audit log; then, while 4
    clients send a bounded load (below), `digitkit retrain --promote-to LINK --reload URL`
    trains the candidate, swaps the link and posts the admin reload. Every request succeeds, and the answers move
    from the base's version to the candidate's. The load is bounded: 4 clients, each at most 40 requests a second,
    at most 2,000 requests and 120 s in all (about 250 here: the retrain takes a second or two)."""
    link, db, token = tmp_path / "models" / "current", tmp_path / "serve" / "audit.db", tmp_path / "admin.token"
    retrain.promote(link, base_run)
    token.write_text(ADMIN + "\n")
    images, labels = feedback_images(80, seed=21)
    pool = [synthetic_images(np.arange(CLASSES), seed=s)[s % CLASSES] for s in range(40)]
    with serve(link, tmp_path, "--admin-token-file", str(token), "--audit-db", str(db)) as server:
        with server.client() as c:
            base_version = c.get("/v1/model").json()["version"]
            for image, label in zip(images, labels, strict=True):
                answer = c.post("/v1/predict", json={"pixels": (image / 255).tolist(), "model_input": True})
                assert answer.status_code == 200, answer.text
                fb = c.post("/v1/feedback", json={"request_id": answer.json()["request_id"],
                                                  "true_label": str(label)})  # fmt: skip
                assert fb.status_code == 200, fb.text

        results: list[tuple[float, int, str]] = []  # (time sent, status, model version or error), as answered
        lock, stop = threading.Lock(), threading.Event()
        deadline = time.monotonic() + 120

        def client(worker: int) -> None:
            with server.client() as c:
                i = worker
                while not stop.is_set() and time.monotonic() < deadline and len(results) < 2000:
                    sent = time.monotonic()
                    body = {"pixels": (pool[i % len(pool)] / 255).tolist(), "model_input": True}
                    try:
                        r = c.post("/v1/predict", json=body)
                        outcome = (r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text)
                    except Exception as e:  # noqa: BLE001 - a refused or broken connection is a failed request
                        outcome = (0, repr(e))
                    with lock:
                        results.append((sent, *outcome))
                    i += 4
                    time.sleep(max(0.0, sent + 0.025 - time.monotonic()))

        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            while len(results) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            retrain_started = time.monotonic()
            code = cli.main(["retrain", "--from-audit", str(db), "--base", str(link), "--out", str(tmp_path / "cand"),
                             "--promote-to", str(link), "--reload", server.url, "--admin-token-file", str(token),
                             "--val-tolerance", "100", "--feedback-tolerance", "100",  # the rule is tested above
                             "--quiet", "--json", *FAST])  # fmt: skip
            reloaded_at = time.monotonic()
            with lock:
                before = len(results)
            while len(results) < max(before + 60, 200) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert code == 0
        report = json.loads((tmp_path / "cand" / "retrain.json").read_text())
        with server.client() as c:
            model = c.get("/v1/model").json()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    assert len(results) >= 200
    new_version = report["reload"]["version"]
    assert model["version"] == new_version != base_version and new_version.startswith("cand-")
    assert model["checkpoint_sha256"] == runs.checkpoint_sha256(runs.open_model(tmp_path / "cand").checkpoint_path)
    versions = [v for _, _, v in results]
    assert versions[0] == base_version and set(versions) == {base_version, new_version}
    during = [v for t, _, v in results if retrain_started < t < reloaded_at]  # sent while it trained and reloaded
    after = [v for t, _, v in results if t > reloaded_at]  # sent once the reload had answered
    assert during.count(base_version) >= 10  # the old model answered under load until the swap
    assert len(after) >= 40 and set(after) == {new_version}
    reloading = [v for t, _, v in results if reloaded_at - report["reload"]["seconds"] - 0.05 < t < reloaded_at]
    assert reloading  # requests were sent while the reload ran (each client sends one every 25 ms at least)
    print(f"{len(results)} requests, 0 failed: {len(during)} while retrain ran, {len(reloading)} of them while the "
          f"reload ran ({report['reload']['seconds']:.3f} s; {reloading.count(new_version)} answered by the new "
          f"model), {len(after)} after")
    assert report["feedback"]["labelled"] == 80 and link.resolve() == (tmp_path / "cand").resolve()


def test_reload_errors_say_what_went_wrong(base_run, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text(ADMIN)
    with serve(base_run, tmp_path, "--admin-token-file", str(token)) as server:
        with pytest.raises(DataError, match=r"answered 401 \(wrong admin token"):
            retrain.reload_server(server.url, "not-the-token-123")
        with pytest.raises(DataError, match="answered 422"):
            retrain.reload_server(server.url, ADMIN, tmp_path / "nope")
        with pytest.raises(DataError, match="not the candidate"):
            retrain.reload_server(server.url, ADMIN, base_run, expect_sha256="0" * 64)
        assert retrain.reload_server(server.url, ADMIN)["version"].startswith("base-")
    with pytest.raises(DataError, match="cannot reach the server"):
        retrain.reload_server(server.url, ADMIN)


def test_point_promote_link_is_atomic_and_refuses_real_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    link = tmp_path / "serving" / "current"
    assert retrain.promote(link, a) is None
    assert retrain.promote(link, b) == str(a.resolve()) and link.resolve() == b.resolve()
    assert sorted(p.name for p in link.parent.iterdir()) == ["current"]  # no temporary link left behind
    with pytest.raises(ConfigError, match="not a symbolic link"):
        retrain.promote(a, b)
    assert os.path.isdir(a) and not a.is_symlink()


def test_split_is_seeded_and_stratified(tmp_path):
    labels = torch.arange(50) % 5
    ds = data.Dataset(torch.zeros(50, 1, 28, 28, dtype=torch.uint8), labels, [str(c) for c in range(5)])
    ids = [f"r{i}" for i in range(50)]
    one = retrain.split_feedback(ds, ids, tmp_path / "one", known_ids={"r0", "r1"}, holdout=0.2, seed=3)
    two = retrain.split_feedback(ds, ids, tmp_path / "two", known_ids={"r0", "r1"}, holdout=0.2, seed=3)
    assert read_ids(tmp_path / "one" / "holdout") == read_ids(tmp_path / "two" / "holdout")
    assert two["holdout_per_class"] == one["holdout_per_class"]
    retrain.split_feedback(ds, ids, tmp_path / "other", known_ids=set(), holdout=0.2, seed=4)
    assert read_ids(tmp_path / "other" / "holdout") != read_ids(tmp_path / "one" / "holdout")
    assert one["already_trained"] == 2 and one["holdout"] == 10 and one["train"] == 38
    assert set(one["holdout_per_class"].values()) == {2}
    assert not {"r0", "r1"} & set(read_ids(tmp_path / "one" / "holdout") + read_ids(tmp_path / "one" / "train"))
