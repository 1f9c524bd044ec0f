"""`digitkit card`: every section, the real checkpoint hash, per-class figures once evaluated, and no crash on a
run folder without evaluation or summary, or on a bare checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from digitkit import card, checkpoint, config, data, runs
from digitkit.cli import main

from .conftest import make_idx_dir

SECTIONS = ("## Model details", "## Intended use", "## Out of scope", "## Training data", "## Preprocessing contract",
            "## Metrics", "### Per class", "## Robustness and calibration", "## Limitations",
            "## Training config and how to reproduce")  # fmt: skip


@pytest.fixture
def run(tmp_path):
    folder = make_idx_dir(tmp_path / "tiny", num_classes=4, class_names=["up", "right", "down", "left"])
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn1", "train.epochs=2", "augment.recipe=mild"])
    runs.train_run(cfg, out=tmp_path / "run")
    return tmp_path / "run"


def test_card_has_every_section_the_hash_and_says_to_evaluate(run):
    text = card.build_card(run)
    for s in SECTIONS:
        assert s in text, s
    best = checkpoint.resolve(run)
    assert f"`{runs.checkpoint_sha256(best)}`" in text and best.name in text
    assert f"run `digitkit evaluate {run.resolve()}`" in text  # per class, robustness and calibration are missing
    assert "Not evaluated yet" in text
    cfg = runs.open_model(run).cfg
    labels = data.load_split(cfg.data.dir, "train").labels
    n_train, n_val = (len(i) for i in data.stratified_split(labels, cfg.data.val_fraction, cfg.seed))
    assert f"split into {n_train:,} for training and {n_val:,} for validation" in text
    for name, digest in data.expected_sums(cfg.data.dir).items():
        assert digest in text, name
    summary = json.loads((run / "summary.json").read_text())
    assert f"**{100 * summary['test_accuracy']:.2f}%**" in text
    assert "Devanagari" in text and "letters" in text.lower() and "10 px" in text
    assert "model:\n  name: cnn1" in text and f"digitkit train --config {run.resolve()}/config.yaml" in text


def test_card_after_evaluate_has_the_per_class_table_and_calibration(run, capsys):
    assert main(["evaluate", str(run), "--quick", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert main(["card", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / card.CARD_NAME}"
    text = (run / card.CARD_NAME).read_text()
    for c in ev["per_class"]:
        assert f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |" in text
    assert "Not evaluated yet" not in text
    assert f"expected calibration error {100 * ev['calibration']['ece']:.2f}%" in text
    assert "Robustness not measured" in text  # --quick skips corruptions and attacks, and the card says so


def test_card_without_summary_or_run_folder_says_what_is_missing(run, tmp_path):
    (run / "summary.json").unlink()
    text = card.build_card(run)
    assert "summary.json" in text.split("## Model details")[0]
    assert "No test figures" in text
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(checkpoint.resolve(run), lone)
    text = card.build_card(lone)
    for s in SECTIONS:
        assert s in text, s
    assert "only a checkpoint file was given" in text and f"`{runs.checkpoint_sha256(lone)}`" in text
    out = card.write_card(lone, tmp_path / "cards" / "lone.md")
    assert out.read_text() == text


def test_card_survives_a_data_folder_that_moved(run):
    shutil.rmtree(runs.open_model(run).cfg.data.dir)
    text = card.build_card(run)
    assert "could not be read from here" in text and "## Metrics" in text
