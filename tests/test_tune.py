"""digitkit tune: search spaces checked with clear errors, trials scored on validation data only (the test files
here are corrupt, so reading them would fail), median pruning, the best config as YAML that trains, and two worker
processes sharing one study on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from digitkit import cli, config, runs, train, tune
from digitkit.errors import ConfigError

from .conftest import ROOT, make_idx_dir

BASE = ["model.name=mlp", "train.epochs=2", "train.batch_size=32", "train.threads=1", "train.plots=false",
        "augment.recipe=none"]  # fmt: skip
SPACE = """\
pruning: {startup_trials: 2, warmup_epochs: 0}
params:
  train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}
  model.args.dropout: {low: 0.0, high: 0.5}
  model.width: {choices: [0.5, 1.0]}
"""


@pytest.fixture(scope="module")
def no_test_dir(tmp_path_factory) -> Path:
    """A small synthetic data set whose test files are corrupt: anything that reads them fails."""
    d = make_idx_dir(tmp_path_factory.mktemp("tune") / "data", num_classes=4, n_train=600, n_test=40)
    for path in d.glob("t10k-*"):
        path.write_bytes(b"not an IDX file")
    return d


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def base_cfg(data_dir: Path, *extra: str) -> config.Config:
    return config.load(None, [f"data.dir={data_dir}", *BASE, *extra])


# ----------------------------------------------------------------------------------------------------------
# Workers sharing a study


def start_worker(data_dir: Path, space: Path, url: str, study: str, out: Path, trials: int, cwd: Path):
    sets = [a for s in BASE for a in ("--set", s)]
    cmd = [sys.executable, "-m", "digitkit", "tune", "--data-dir", str(data_dir), "--space", str(space),
           "--trials", str(trials), "--study", study, "--storage", url, "--out", str(out), "--quiet", "--json", *sets]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    server = request.getfixturevalue("postgres_url")  # skips without PostgreSQL, fails in CI
    name = f"tune_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_two_workers_share_one_study_without_repeating_trials(storage, no_test_dir, space_file, tmp_path):
    trials, out = 6, tmp_path / "out"
    workers = [start_worker(no_test_dir, space_file, storage, "shared", out, trials, tmp_path) for _ in range(2)]
    results = []
    for w in workers:
        stdout, stderr = w.communicate(timeout=240)
        assert w.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    study = optuna.load_study(study_name="shared", storage=tune.storage_url(storage, tmp_path / "unused.db"))
    counted = [t for t in study.trials if tune.counts(t)]
    # Exactly the budget, numbered 0..N-1 by the database; any trial a worker started past it is marked skipped.
    assert sorted(t.number for t in counted) == list(range(trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    assert all(r["trials"] == trials and r["fail"] == 0 for r in results)  # the other may still be running one
    # Shared: both processes ran trials; not repeated: every trial has its own values and its own run folder.
    by_worker = {t.user_attrs["worker"] for t in counted}
    assert len(by_worker) == 2, by_worker
    assert len({tuple(sorted(t.params.items())) for t in counted}) == trials
    for t in counted:
        run_dir = Path(t.user_attrs["run_dir"])
        assert run_dir.name == f"trial-{t.number:04d}"
        assert config.load(run_dir / "config.yaml").train.lr == pytest.approx(t.params["train.lr"])
    assert {p.name for p in out.glob("trial-*")} == {f"trial-{n:04d}" for n in range(trials)}
    assert (out / "best.yaml").is_file()


# ----------------------------------------------------------------------------------------------------------
# Pruning, the best config, the report, cross-validation


def test_a_trial_behind_the_median_is_pruned_after_its_first_epoch(no_test_dir, tmp_path):
    base = base_cfg(no_test_dir, "train.epochs=3")
    space = tune.parse_space({"pruning": {"startup_trials": 1, "warmup_epochs": 0},
                              "params": {"train.lr": {"low": 1.0e-6, "high": 1.0e-2, "log": True}}}, base)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = tune.open_study("p", url, base, space)
    study.enqueue_trial({"train.lr": 5e-3})  # learns the bars in an epoch
    study.enqueue_trial({"train.lr": 1e-6})  # barely moves
    result = tune.run_study(base, space, "p", url, 2, tmp_path / "out")
    good, bad = study.trials
    assert (good.state, bad.state) == (TrialState.COMPLETE, TrialState.PRUNED)
    assert result["complete"] == 1 and result["pruned"] == 1
    assert bad.intermediate_values[1] < good.intermediate_values[1]
    assert len(train.read_metrics(Path(bad.user_attrs["run_dir"]) / "metrics.csv")) == 1  # stopped at once
    assert len(train.read_metrics(Path(good.user_attrs["run_dir"]) / "metrics.csv")) == 3
    # One finished trial is too few for importances: the report says so instead of failing.
    importances, note = tune.param_importances(study)
    assert importances is None and "at least 2 finished trials" in note


def test_best_config_is_yaml_that_loads_and_trains(no_test_dir, tmp_path, tiny_dir):
    base = base_cfg(no_test_dir)
    space = tune.parse_space({"pruning": False, "params": {"train.lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True},
                                                          "model.width": {"choices": [0.5, 1.0]}}}, base)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'b.db'}"
    result = tune.run_study(base, space, "b", url, 3, tmp_path / "out")
    best = result["best"]
    study = tune.open_study("b", url)
    assert best["value"] == max(t.value for t in study.trials)
    cfg = config.load(best["config"])
    # The best trial's own resolved config, ready for `digitkit train --config`.
    assert config.to_dict(cfg) == config.to_dict(config.load(Path(best["run_dir"]) / "config.yaml"))
    assert cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    summary = runs.train_run(config.load(best["config"], [f"data.dir={tiny_dir}"]), out=tmp_path / "final")
    assert summary["finished"] and summary["model"] == "mlp"


def test_report_prints_best_trials_importances_and_saves_plots(no_test_dir, tmp_path, capsys):
    base = base_cfg(no_test_dir, "train.epochs=1")
    params = {"train.lr": {"low": 1.0e-6, "high": 1.0e-2, "log": True}, "model.args.dropout": {"low": 0.0, "high": 0.5}}
    space = tune.parse_space({"pruning": False, "params": params}, base)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    tune.run_study(base, space, "r", url, 3, tmp_path / "out")
    capsys.readouterr()
    assert cli.main(["tune", "--report", "--study", "r", "--storage", url, "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "3 trials (3 complete" in text and "best trials by validation accuracy" in text
    assert "parameter importances (PED-ANOVA over 3 finished trials)" in text and "train.lr" in text
    for name in ("history.png", "intermediate.png", "slices.png", "importances.png"):
        assert (tmp_path / "out" / "report" / name).read_bytes()[:4] == b"\x89PNG", name
    assert "best config (trial " in text and (tmp_path / "out" / "best.yaml").is_file()


def test_cross_validation_objective_is_the_mean_over_folds(no_test_dir, tmp_path):
    base = base_cfg(no_test_dir, "train.epochs=1")
    space = tune.parse_space({"objective": "cv", "folds": 2, "pruning": False,
                              "params": {"train.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}}, base)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'cv.db'}"
    tune.run_study(base, space, "cv", url, 1, tmp_path / "out")
    (trial,) = tune.open_study("cv", url).trials
    folds = trial.user_attrs["fold_accuracies"]
    assert len(folds) == 2 and trial.value == pytest.approx(sum(folds) / 2)
    assert json.loads((Path(trial.user_attrs["run_dir"]) / "cv.json").read_text())["k"] == 2


def test_a_worker_with_another_recipe_cannot_join_a_study(no_test_dir, tmp_path):
    base = base_cfg(no_test_dir)
    space = tune.parse_space({"params": {"train.lr": {"low": 1.0e-4, "high": 1.0e-2}}}, base)
    url = f"sqlite:///{tmp_path / 'j.db'}"
    tune.open_study("j", url, base, space)
    tune.open_study("j", url, base_cfg(no_test_dir, "train.threads=2"), space)  # machine-specific: fine
    with pytest.raises(ConfigError, match="another base config .*train.epochs was 2, now 3"):
        tune.open_study("j", url, base_cfg(no_test_dir, "train.epochs=3"), space)


# ----------------------------------------------------------------------------------------------------------
# Spaces, storage and command-line errors


@pytest.mark.parametrize("text, message", [
    ("prams: {}", "unknown key 'prams'; valid keys: objective, folds, pruning, params"),
    ("params: {}", "params: expected a mapping of dotted config keys"),
    ("objective: test\nparams: {train.lr: {low: 0.001, high: 0.01}}", "the test set is never an objective"),
    ("folds: 1\nparams: {train.lr: {low: 0.001, high: 0.01}}", "folds = 1: expected an integer >= 2"),
    ("pruning: {patience: 2}\nparams: {train.lr: {low: 0.001, high: 0.01}}", "pruning.patience: unknown key"),
    ("params: {train.lrr: {low: 0.001, high: 0.01}}", "unknown config key 'train.lrr'"),
    ("params: {train.lr: [0.001, 0.01]}", "expected a range like"),
    ("params: {train.lr: {low: 0.1, high: 0.01}}", "low (0.1) must be below high (0.01)"),
    ("params: {train.lr: {low: 0, high: 0.1, log: true}}", "a log range needs low > 0"),
    ("params: {train.lr: {low: 0.001, high: 0.01, lg: true}}", "params.train.lr.lg: unknown key"),
    ("params: {train.lr: {low: 0.001}}", "params.train.lr: missing high"),
    ("params: {train.epochs: {low: 1.5, high: 3}}", "train.epochs is an integer"),
    ("params: {augment.rotation.p: {low: 0.5, high: 1.5}}", "params.augment.rotation.p = 1.5 does not make a valid"),
    ("params: {seed: {low: 0, high: 3}}", "params.seed: cannot be tuned"),
    ("params: {data.val_fraction: {low: 0.1, high: 0.2}}", "params.data.val_fraction: cannot be tuned"),
    ("params: {model.args.hidden: {choices: [[64, 32]]}}", "tune model.width instead"),
    ("params: {model.args.dropout: {choices: []}}", "expected a non-empty list"),
    ("params: [train.lr]", "params: expected a mapping"),
    ("params: {train.lr: {low: 0.001, high: [", "not valid YAML"),
])  # fmt: skip
def test_bad_space_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        tune.load_space(path, base_cfg(tmp_path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_width_needs_a_model_with_widths(tmp_path):
    with pytest.raises(ConfigError, match="model 'classic' has no layer widths to scale"):
        tune.parse_space({"params": {"model.width": {"choices": [0.5, 1.0]}}}, base_cfg(tmp_path, "model.name=classic"))
    cfg = tune.trial_config(base_cfg(tmp_path), {"model.width": 0.5, "train.lr": 0.004})
    assert cfg.model.args["hidden"] == [256, 128] and cfg.train.lr == 0.004


def test_storage_urls():
    default = Path("runs/tune/x.db")
    assert tune.storage_url(None, default) == f"sqlite:///{default.resolve()}"
    assert tune.storage_url("postgresql://u:pw@host:5432/db", default) == "postgresql+psycopg://u:pw@host:5432/db"
    assert tune.safe_url("postgresql+psycopg://u:pw@host/db") == "postgresql+psycopg://u:***@host/db"
    with pytest.raises(ConfigError, match="in-memory SQLite"):
        tune.storage_url("sqlite://", default)
    with pytest.raises(ConfigError, match="unsupported database 'mysql'"):
        tune.storage_url("mysql://u:pw@host/db", default)


def test_command_line_errors(tmp_path, capsys, space_file):
    root = ["--runs-root", str(tmp_path / "runs")]
    assert cli.main(["tune", "--space", str(space_file), *root]) == 2
    assert "needs --space FILE and --trials N" in capsys.readouterr().err
    assert cli.main(["tune", "--report", "--study", "nothing", *root]) == 2
    assert "no study database; run trials first" in capsys.readouterr().err
    assert cli.main(["tune", "--space", str(tmp_path / "missing.yaml"), "--trials", "2", *root]) == 2
    assert "space file not found; configs/space.yaml is an example" in capsys.readouterr().err


def test_the_shipped_space_fits_the_default_recipe():
    space = tune.load_space(ROOT / "configs" / "space.yaml", config.load(ROOT / "configs" / "default.yaml"))
    keys = {p.key for p in space.params}
    assert {"train.lr", "train.weight_decay", "model.args.dropout", "model.width", "augment.rotation.p"} <= keys
    assert space.objective == "val" and space.pruning
