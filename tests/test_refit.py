"""Refit mode: data.val_fraction=0 trains on every training image, keeps the last epoch (train.checkpoint_metric
last) and every tool that reads validation figures says there are none instead of failing or inventing them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from digitkit import card, checkpoint, compare, compress, config, cv, ensemble, metrics, plots, runs, train, tune
from digitkit.classify import Recognizer
from digitkit.cli import main
from digitkit.errors import ConfigError
from digitkit.serve import service

from .conftest import ROOT

REFIT = ("data.val_fraction=0", "train.checkpoint_metric=last", "train.early_stopping_patience_epochs=0")


def refit_cfg(data_dir: Path, *extra: str) -> config.Config:
    return config.load(None, [f"data.dir={data_dir}", "model.name=cnn1", "train.epochs=3", "train.batch_size=32",
                              "augment.recipe=none", *REFIT, *extra])  # fmt: skip


@pytest.fixture
def refit_run(tmp_path, tiny_dir) -> Path:
    runs.train_run(refit_cfg(tiny_dir), out=tmp_path / "refit")
    return tmp_path / "refit"


def test_refit_trains_on_every_training_image_and_keeps_the_last_epoch(refit_run, tiny_dir):
    train_set, val_set, test_set = runs.load_data(refit_cfg(tiny_dir))
    assert len(val_set) == 0 and len(train_set) == 240  # all of tiny_dir's training images
    saved = json.loads((refit_run / "summary.json").read_text())
    assert saved["val_accuracy"] is None and saved["val_log_loss"] is None
    assert saved["best_epoch"] == 3 and saved["checkpoint_metric"] == "last"
    assert saved["test_accuracy"] > 0.9  # it learned: the synthetic bars are easy
    kept = list(refit_run.glob("final-*.pt")) + list(refit_run.glob("best-*.pt"))
    assert [p.name for p in kept] == [saved["checkpoint"]] and "-e003-train" in saved["checkpoint"]
    assert checkpoint.resolve(refit_run) == kept[0]
    rows = train.read_metrics(refit_run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(math.isnan(r["val_loss"]) and math.isnan(r["val_acc"]) for r in rows)
    assert (refit_run / "history.png").stat().st_size > 0


def test_last_with_validation_keeps_the_last_epoch_named_by_its_validation(tmp_path, tiny_dir):
    cfg = config.load(None, [f"data.dir={tiny_dir}", "model.name=cnn1", "train.epochs=2", "train.batch_size=32",
                             "augment.recipe=none", "train.checkpoint_metric=last"])  # fmt: skip
    s = runs.train_run(cfg, out=tmp_path / "r")
    assert s["best_epoch"] == 2 and s["checkpoint"].startswith("final-") and "-e002-val" in s["checkpoint"]
    assert s["val_accuracy"] is not None


@pytest.mark.parametrize(
    "overrides, missing",
    [
        (["data.val_fraction=0"], "train.checkpoint_metric=last, train.early_stopping_patience_epochs=0 (set"),
        (["data.val_fraction=0", "train.checkpoint_metric=last", "train.early_stopping_patience_epochs=0",
          "train.schedule=plateau"], "it needs a train.schedule other than plateau (set"),
    ],
)  # fmt: skip
def test_refit_needs_a_config_that_chooses_nothing(overrides, missing):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert "data.val_fraction = 0 trains with no validation" in str(err.value) and missing in str(err.value)


def test_tools_that_need_validation_say_there_is_none(refit_run, tiny_dir, tmp_path, capsys):
    opened = runs.open_model(refit_run)
    assert main(["augment", "check", "--recipe", "standard", "--model", str(refit_run)]) != 0
    assert "this model has none: it trained on every training image" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no validation images: this model trained on every training image"):
        runs.evaluation_data(opened.cfg, "val")
    with pytest.raises(ConfigError, match="--weights val needs every member's validation accuracy.*--weights equal"):
        ensemble.build([refit_run, refit_run], "val")
    base = refit_cfg(tiny_dir)
    space = tune.parse_space({"pruning": False, "params": {"train.lr": {"low": 1e-3, "high": 1e-2}}}, base)
    with pytest.raises(ConfigError, match="objective val scores each trial on the config's validation hold-out"):
        tune.run_study(base, space, "s", f"sqlite:///{tmp_path / 's.db'}", 1, tmp_path / "out")
    assert not (tmp_path / "s.db").exists()  # refused before the study was opened


def test_cli_summary_and_ensemble_of_refit_runs(refit_run, tiny_dir, tmp_path):
    second = tmp_path / "refit-2"
    runs.train_run(refit_cfg(tiny_dir, "seed=1"), out=second)
    model, records = ensemble.build([refit_run, second])
    assert [r["val_accuracy"] for r in records] == [None, None] and not ensemble.shared_validation(records)
    out = tmp_path / "ens.json"
    done = subprocess.run([sys.executable, "-m", "digitkit", "ensemble", str(refit_run), str(second), "--shifts", "1",
                           "--data-dir", str(tiny_dir), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no validation images (a member trained on every training image" in done.stdout
    assert "(no validation, weight 0.500)" in done.stdout
    result = json.loads(out.read_text())  # strict JSON: no NaN
    assert result["val_accuracy"] is None and result["accuracy"] > 0.9
    shown = subprocess.run([sys.executable, "-m", "digitkit", "train", "--set", f"data.dir={tiny_dir}",
                            "--set", "model.name=cnn1", "--set", "train.epochs=1", "--set", "augment.recipe=none",
                            *[a for r in REFIT for a in ("--set", r)], "--out", str(tmp_path / "cli"), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "validation     none (data.val_fraction 0" in shown.stdout and "(the last: 1)" in shown.stdout


def test_card_says_every_training_image_trained(refit_run, tiny_dir):
    text = card.build_card(refit_run)
    assert "all 240 for training, with no validation hold-out" in text
    assert "No validation figure: the model trained on every training image" in text
    assert "picked the checkpoint" not in text


def test_diagnosis_without_a_validation_curve(refit_run):
    rows = train.read_metrics(refit_run / "metrics.csv")
    d = metrics.diagnose(rows)
    assert d["verdict"] == "no-validation" and "trained on every training image" in d["reasons"][0]
    low = [{**r, "train_acc": 0.5} for r in rows]
    assert metrics.diagnose(low)["verdict"] == "underfitting"
    plots.save_history(rows, refit_run / "again.png")  # no val lines, no warning turned error
    assert (refit_run / "again.png").stat().st_size > 0


def test_cross_validation_final_model_can_be_a_refit(tiny_dir, tmp_path):
    result = cv.run_cv(refit_cfg(tiny_dir, "train.epochs=1"), folds=2, out=tmp_path / "cv", final=True)
    assert all(f["val_accuracy"] is not None for f in result["folds"])  # the folds have their own validation
    assert result["final"]["val_accuracy"] is None and "trained on every training image" in result["final"]["note"]
    assert "Final model: final/ (trained on every training image" in (tmp_path / "cv" / "cv.md").read_text()


def test_prune_compare_and_serving_baseline_of_a_refit_run(refit_run, tmp_path):
    s = compress.prune_run(refit_run, compress.PruneOptions(0.5, finetune_epochs=1), tmp_path / "p")
    assert s["val_accuracy"] is None and s["prune"]["val_accuracy_before_finetune"] is None
    assert s["prune"]["val_accuracy_source"] is None
    json.loads((tmp_path / "p" / "summary.json").read_text(), parse_constant=pytest.fail)  # no NaN in the file
    summaries = [json.loads((refit_run / "summary.json").read_text())] * 2
    entry = compare._entry_result(compare.Entry("refit", refit_run, None, [], [0, 1]), runs.open_model(refit_run).cfg,
                                  summaries, ["a", "b"], [False, False])  # fmt: skip
    assert entry["val_accuracy"] is None
    table = compare.compare_markdown({"entries": [entry], "pairs": []})
    assert "| none |" in table
    opened = runs.open_model(refit_run)
    baseline = service._reference_baseline(opened, Recognizer.open(refit_run))
    assert "training images (the model has no validation hold-out" in baseline.source
    assert baseline.images > 0 and sum(baseline.class_distribution.values()) == pytest.approx(1.0)
