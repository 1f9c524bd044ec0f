"""Temperature scaling (calibration.py): T recovered on synthetic logits, fitted on validation when a run
finishes and stored in its checkpoint, applied by the Recognizer (predict, read, the API), inside the ONNX graph
(fp32 and int8) and by `digitkit evaluate`, which reports ECE before and after; `digitkit calibrate RUN` for older
runs, and checkpoints without a temperature still answering with T = 1."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from digitkit import checkpoint, config, data, export, metrics, runs
from digitkit.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibrate,
    fit_temperature,
    nll,
    temperature_of,
)
from digitkit.classify import Recognizer
from digitkit.cli import main
from digitkit.engine import OnnxModel, open_recognizer
from digitkit.evaluate import EvalOptions, evaluate_model, predict_logits, predict_probs
from digitkit.preprocess import Preprocessed
from digitkit.serve.service import Loaded
from digitkit.serve.settings import ServeSettings

from .conftest import ROOT


# ------------------------------------------------------------------------------------------------ the fit
def synthetic(temperature: float, n: int = 20_000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits / temperature): the true temperature is known."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=g)
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=g)[:, 0]
    return logits, labels


@pytest.mark.parametrize("true_t", [0.4, 1.0, 3.0])
def test_fit_recovers_a_known_temperature(true_t):
    logits, labels = synthetic(true_t)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    # It is the minimum of the log loss: a little either side is worse.
    assert nll(logits, labels, t) < min(nll(logits, labels, 0.9 * t), nll(logits, labels, 1.1 * t))
    cal = calibrate(logits, labels, "synthetic")
    assert cal.fitted and cal.images == len(labels) and cal.ece_after < 0.02
    if true_t != 1.0:
        assert cal.ece_before > 0.1 and cal.nll_after < cal.nll_before


def test_fit_is_clipped_to_a_sane_range():
    logits, _ = synthetic(1.0, n=2000)
    assert fit_temperature(logits, logits.argmax(1)) == pytest.approx(MIN_TEMPERATURE)  # always right: T -> 0
    assert fit_temperature(logits, logits.argmin(1)) == pytest.approx(MAX_TEMPERATURE)  # always wrong: T -> inf


@pytest.mark.parametrize(
    "logits, labels, message",
    [
        (torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), "nothing to fit"),
        (torch.zeros(5, 10), torch.zeros(4, dtype=torch.long), r"expected logits \(N, K\) and labels \(N,\)"),
        (torch.zeros(5, 10), torch.zeros(5), "integer class indices"),
        (torch.zeros(5, 10), torch.full((5,), 10), r"labels must be in \[0, 10\)"),
        (torch.full((5, 10), float("nan")), torch.zeros(5, dtype=torch.long), "finite"),
    ],
)
def test_fit_refuses_bad_input(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


# ------------------------------------------------------------------------------ training stores it
def fixture_splits(mnist_train: data.Dataset) -> tuple[data.Dataset, data.Dataset]:
    """mnist_small_run's own validation images (conftest builds them the same way) and 3,000 training-file images
    that run never saw (neither trained nor validated on): a held-out set that is not the sealed test set."""
    sub_out, sub = data.stratified_split(mnist_train.labels, 0.2, seed=0)
    _, val_idx = data.stratified_split(mnist_train.labels[sub], 1 / 6, seed=0)
    return mnist_train.subset(sub).subset(val_idx), mnist_train.subset(sub_out[:3000])


@pytest.fixture(scope="module")
def held_out(mnist_train) -> data.Dataset:
    return fixture_splits(mnist_train)[1]


@pytest.fixture(scope="module")
def run_copy(mnist_small_run, tmp_path_factory) -> Path:
    """A private copy: exports, baselines and re-calibration here never reach other tests' run folder."""
    dst = tmp_path_factory.mktemp("calibrate") / "run"
    shutil.copytree(mnist_small_run, dst)
    return dst


def test_training_fits_T_on_validation_and_stores_it(mnist_small_run, mnist_train):
    ckpt = checkpoint.load(mnist_small_run)
    t, cal = ckpt["temperature"], ckpt["calibration"]
    val, _ = fixture_splits(mnist_train)
    # Fitted on this run's validation images: refitting on them gives the stored T.
    model = checkpoint.model_from_checkpoint(ckpt)
    assert fit_temperature(predict_logits(model, val.images), val.labels) == pytest.approx(t, rel=1e-4)
    assert cal["fitted"] and cal["images"] == len(val) and "validation" in cal["source"]
    assert MIN_TEMPERATURE < t < 1  # label smoothing 0.1 makes the model under-confident: T sharpens
    assert cal["ece_after"] < cal["ece_before"] and cal["nll_after"] < cal["nll_before"]
    summary = json.loads((mnist_small_run / "summary.json").read_text())
    assert summary["temperature"] == t and summary["calibration"] == cal


def test_label_smoothed_model_is_better_calibrated_on_held_out_images(mnist_small_run, held_out):
    ckpt = checkpoint.load(mnist_small_run)
    logits = predict_logits(checkpoint.model_from_checkpoint(ckpt), held_out.images)
    t = temperature_of(ckpt)
    before = metrics.calibration(logits.softmax(1), held_out.labels)["ece"]
    after = metrics.calibration((logits / t).softmax(1), held_out.labels)["ece"]
    assert before > 0.03 and after < before / 2, (before, after)
    assert nll(logits, held_out.labels, t) < nll(logits, held_out.labels)


REFIT = ("data.val_fraction=0", "train.checkpoint_metric=last", "train.early_stopping_patience_epochs=0")


def test_run_without_validation_keeps_T_1_recorded_as_not_fitted(tmp_path, tiny_dir, capsys):
    cfg = config.load(None, [f"data.dir={tiny_dir}", "model.name=cnn1", "train.epochs=1", "train.batch_size=32",
                             "augment.recipe=none", "train.plots=false", *REFIT])  # fmt: skip
    summary = runs.train_run(cfg, out=tmp_path / "refit")
    ckpt = checkpoint.load(tmp_path / "refit")
    assert ckpt["temperature"] == 1.0 and not ckpt["calibration"]["fitted"]
    assert "no validation" in ckpt["calibration"]["source"] and summary["calibration"]["fitted"] is False
    assert Recognizer.open(tmp_path / "refit").temperature == 1.0
    # `digitkit calibrate` has nothing to fit on and says so in one line.
    assert main(["calibrate", str(tmp_path / "refit")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no validation images" in err and "\n" not in err


# --------------------------------------------------------------------------------- where it is applied
def test_recognizer_answers_with_softmax_of_logits_over_T(run_copy, held_out):
    rec = Recognizer.open(run_copy)
    t = temperature_of(checkpoint.load(run_copy))
    assert rec.temperature == t < 1
    x = held_out.images[:64].float().div(255)
    with torch.no_grad():
        logits = rec.model(x)
    probs = rec.probs(x)
    assert torch.allclose(probs, (logits / t).softmax(1), atol=1e-6)
    assert (probs.max(1).values - logits.softmax(1).max(1).values).mean() > 0.02  # not the raw softmax
    # The noise defence averages calibrated softmaxes too.
    rec.inference = dataclasses.replace(rec.inference, noise_defence_sigma=0.1, noise_defence_samples=4)
    assert torch.allclose(rec.probs(x), predict_probs(rec.model, x, 0.1, 4, temperature=t), atol=1e-6)
    assert not torch.allclose(rec.probs(x), predict_probs(rec.model, x, 0.1, 4), atol=1e-3)


def test_rejection_threshold_compares_against_the_calibrated_confidence(run_copy, held_out):
    rec = Recognizer.open(run_copy)
    x = held_out.images[:500].float().div(255)
    with torch.no_grad():
        logits = rec.model(x)
    threshold = 0.95
    raw_conf, cal_conf = logits.softmax(1).max(1).values, (logits / rec.temperature).softmax(1).max(1).values
    between = torch.nonzero((raw_conf < threshold) & (cal_conf >= threshold))[:, 0]
    assert len(between) > 10  # label smoothing keeps many confident digits below 0.95 on the raw scale
    pres = [Preprocessed(x[int(i)]) for i in between[:10]]
    rec.inference = dataclasses.replace(rec.inference, reject_below_confidence=threshold)
    assert all(a.rejected is None and a.confidence >= threshold for a in rec.answers(pres))
    raw = Recognizer(rec.model, rec.classes, rec.inference, rec.preprocess_cfg, temperature=1.0)
    assert all(a.rejected == "low-confidence" for a in raw.answers(pres))


def test_the_api_answers_with_the_runs_temperature(run_copy, held_out):
    loaded = Loaded(str(run_copy), ServeSettings(model=str(run_copy)))
    t = temperature_of(checkpoint.load(run_copy))
    assert loaded.recognizer.temperature == t and loaded.info.contract["temperature"] == t
    x = held_out.images[:32].float().div(255)
    assert torch.allclose(loaded.recognizer.probs(x), Recognizer.open(run_copy).probs(x), atol=1e-6)


@pytest.fixture(scope="module")
def exported(run_copy) -> export.ExportReport:
    return export.export_run(run_copy, options=export.ExportOptions(measure_speed=False))


def test_onnx_file_gives_the_calibrated_probabilities(exported, run_copy, held_out):
    t = temperature_of(checkpoint.load(run_copy))
    x = held_out.images[:256].float().div(255)
    torch_probs = Recognizer.open(run_copy).probs(x)
    assert (OnnxModel(exported.out).probs(x) - torch_probs).abs().max() < 1e-5
    assert (open_recognizer(run_copy).probs(x) - torch_probs).abs().max() < 1e-5  # the engine adds nothing
    graph = onnx.load(exported.out).graph
    producer = {out: n for n in graph.node for out in n.output}
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    assert producer[softmax.input[0]].op_type == "Div"  # the division by T is in the graph
    assert json.loads(exported.metadata["temperature"]) == t
    # The server's ONNX engine serves the export of this very checkpoint, with the same confidences.
    served = Loaded(str(run_copy), ServeSettings(model=str(run_copy), engine="onnx")).recognizer
    assert served.engine is not None and (served.probs(x) - torch_probs).abs().max() < 1e-5


def test_int8_export_keeps_the_temperature(exported, run_copy, held_out, tmp_path):
    report = export.export_run(run_copy, tmp_path / "model.int8.onnx",
                               export.ExportOptions(int8=True, calibration_images=200, measure_speed=False))
    assert report.int8["graph"]["portable"] and report.int8["agreement_with_fp32"] > 0.99
    x = held_out.images[:1000].float().div(255)
    int8_conf = OnnxModel(report.out).probs(x).max(1).values.mean()
    rec = Recognizer.open(run_copy)
    with torch.no_grad():
        raw_conf = rec.model(x).softmax(1).max(1).values.mean()
    cal_conf = rec.probs(x).max(1).values.mean()
    assert abs(int8_conf - cal_conf) < 0.01 < abs(int8_conf - raw_conf)


def test_evaluate_reports_ece_before_and_after_with_accuracy_unchanged(run_copy, held_out):
    model = checkpoint.model_from_checkpoint(checkpoint.load(run_copy))
    t = temperature_of(checkpoint.load(run_copy))
    opts = EvalOptions(corruptions=False, augmented=False, adversarial=False)
    args = (model, held_out.images, held_out.labels, held_out.classes, opts)
    calibrated, raw = evaluate_model(*args, temperature=t), evaluate_model(*args, temperature=1.0)
    assert calibrated.results["accuracy"] == raw.results["accuracy"]
    assert torch.equal(calibrated.probs.argmax(1), raw.probs.argmax(1))
    ts = calibrated.results["temperature_scaling"]
    assert ts["temperature"] == t and ts["same_predictions"] == 1.0
    assert ts["ece_before"] == pytest.approx(raw.results["calibration"]["ece"])
    assert ts["ece_after"] == calibrated.results["calibration"]["ece"] < ts["ece_before"] / 2
    assert ts["log_loss_after"] < ts["log_loss_before"]


def test_evaluate_command_prints_ece_before_and_after(run_copy, tmp_path, capsys):
    assert main(["evaluate", str(run_copy), "--split", "val", "--quick", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "calibration: temperature T = " in out and "raw (T = 1) -> " in out
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    ts = saved["temperature_scaling"]
    assert ts["ece_after"] < ts["ece_before"] and "validation" in ts["fitted_on"]
    assert "temperature scaling: T = " in (tmp_path / "ev" / "report.html").read_text()


# ------------------------------------------------------------------------------------ older runs
@pytest.fixture
def old_run(mnist_small_run, tmp_path) -> Path:
    """A copy of the run as it was before calibration existed: no temperature in its checkpoint or summary."""
    dst = tmp_path / "old"
    shutil.copytree(mnist_small_run, dst)
    path = checkpoint.resolve(dst)
    ckpt = checkpoint.load(path)
    del ckpt["temperature"], ckpt["calibration"]
    checkpoint.save(path, ckpt)
    summary = json.loads((dst / "summary.json").read_text())
    del summary["temperature"], summary["calibration"]
    (dst / "summary.json").write_text(json.dumps(summary))
    return dst


def test_old_checkpoint_without_temperature_answers_with_T_1(old_run, held_out, capsys):
    rec = Recognizer.open(old_run)
    assert rec.temperature == 1.0
    x = held_out.images[:64].float().div(255)
    with torch.no_grad():
        assert torch.allclose(rec.probs(x), rec.model(x).softmax(1), atol=1e-6)
    assert main(["evaluate", str(old_run), "--split", "val", "--quick"]) == 0
    assert "calibration: temperature T = 1 [not fitted" in capsys.readouterr().out


def test_calibrate_command_fits_and_stores_T_for_an_old_run(old_run):
    path = checkpoint.resolve(old_run)
    weights = checkpoint.load(path)["state_dict"]
    done = subprocess.run([sys.executable, "-m", "digitkit", "calibrate", str(old_run), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    val, _ = runs.evaluation_data(runs.open_model(old_run).cfg, "val")  # the run's hold-out, from its config and seed
    assert result["fitted"] and MIN_TEMPERATURE < result["temperature"] < 1 and result["images"] == len(val) > 5000
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # still a plain-data checkpoint
    assert ckpt["temperature"] == result["temperature"] and ckpt["calibration"]["ece_after"] == result["ece_after"]
    assert all(torch.equal(weights[k], ckpt["state_dict"][k]) for k in weights)  # the weights are untouched
    assert json.loads((old_run / "summary.json").read_text())["temperature"] == result["temperature"]
    assert Recognizer.open(old_run).temperature == result["temperature"]
    assert not [p for p in old_run.iterdir() if p.name.endswith(".tmp")]  # the atomic write left nothing behind


def test_calibrate_command_refuses_a_bad_path_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "digitkit", "calibrate", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip()
    assert err.count("\n") == 0 and str(tmp_path / "nope") in err and "no such checkpoint or run folder" in err
