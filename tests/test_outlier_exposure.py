"""Learned rejection: the non-digit sets (digitkit.realworld.negatives), outlier exposure in training, and the
low-resolution augmentation's upsampling kinds."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from digitkit import augment as A
from digitkit import config, runs
from digitkit.config import ConfigError
from digitkit.data import Dataset, load_split
from digitkit.errors import DataError
from digitkit.realworld import negatives
from digitkit.train import outlier_batch, train_step

from .conftest import MNIST_DIR, make_idx_dir

QUICK = ("letter", "symbol", "blank_paper", "partial_digit")
"""Negative kinds that draw in tens of milliseconds (an object photo takes 0.3 s)."""


@pytest.fixture(scope="module")
def small_set() -> tuple[torch.Tensor, list[str]]:
    return negatives.build(12, seed=5, kinds=QUICK, mnist_dir=MNIST_DIR)


def test_build_keeps_what_preprocessing_passes_and_is_deterministic(small_set) -> None:
    images, kinds = small_set
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    assert len(images) == len(kinds) and 6 <= len(kinds) <= 12
    assert set(kinds) <= set(QUICK) and {"letter", "symbol", "partial_digit"} <= set(kinds)
    assert (images.flatten(1).amax(1) > 100).all()  # every kept one has ink: preprocessing found something
    again, kinds2 = negatives.build(12, seed=5, kinds=QUICK, mnist_dir=MNIST_DIR, workers=2)
    assert kinds2 == kinds and torch.equal(again, images)
    other, _ = negatives.build(12, seed=6, kinds=QUICK, mnist_dir=MNIST_DIR)
    assert len(other) != len(images) or not torch.equal(other, images)


def test_build_refuses_unknown_kinds_and_nothing() -> None:
    with pytest.raises(ValueError, match="unknown|expected some of"):
        negatives.build(4, kinds=("letter", "teapot"))
    with pytest.raises(ValueError, match="at least one"):
        negatives.build(0)


def test_save_load_round_trip_and_checksums(tmp_path: Path, small_set) -> None:
    images, kinds = small_set
    folder = negatives.save(tmp_path / "negs", images, kinds)
    back, kinds_back = negatives.load(folder)
    assert torch.equal(back, images) and kinds_back == kinds
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="(?i)sha-?256|checksum"):
        negatives.load(folder)
    with pytest.raises(DataError, match="negatives build"):
        negatives.load(tmp_path / "missing")


def test_the_shipped_set_loads() -> None:
    images, kinds = negatives.load(Path(__file__).resolve().parents[1] / negatives.DIR)
    assert len(images) >= 5000 and images.shape[1:] == (1, 28, 28)
    from digitkit import synth

    assert set(kinds) == set(synth.NEGATIVE_KINDS)


def test_train_step_adds_the_uniform_cross_entropy_of_the_non_digits() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the loss alone is compared
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    loss, logits = train_step(model, opt, x, y, outlier_weight=0.5)
    z = model(x).detach()
    expected = F.cross_entropy(z[:4], y) + 0.5 * (-F.log_softmax(z[4:], 1).mean(1)).mean()
    assert logits.shape == (4, 3) and torch.allclose(loss, expected, atol=1e-6)
    plain, _ = train_step(model, opt, x[:4], y)
    assert torch.allclose(plain, F.cross_entropy(z[:4], y), atol=1e-6)


def test_outlier_weight_needs_negatives() -> None:
    with pytest.raises(ConfigError, match="negatives_dir"):
        config.from_dict({"train": {"outlier_weight": 0.5}})
    with pytest.raises(ConfigError, match="outlier_weight"):
        config.from_dict({"train": {"outlier_weight": -1.0}})


def _negative_confidence(tmp_path: Path, weight: float, neg_dir: Path, held_out: torch.Tensor) -> tuple[float, float]:
    data_dir = make_idx_dir(tmp_path / f"data-{weight}", num_classes=4, n_train=400, n_test=80)
    cfg = config.from_dict({
        "seed": 0, "data": {"dir": str(data_dir), "val_fraction": 0.2, "negatives_dir": str(neg_dir)},
        "model": {"name": "cnn1"}, "augment": {"recipe": "none"},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "outlier_weight": weight, "outlier_batch": 16,
                  "plots": False, "threads": 1},
    })  # fmt: skip
    summary = runs.train_run(cfg, out=tmp_path / f"run-{weight}", point_latest_link=False)
    opened = runs.open_model(summary["run_dir"])
    with torch.no_grad():
        conf = opened.model(held_out.float() / 255).softmax(1).amax(1).mean()
    return float(conf), summary["val_accuracy"]


def test_outlier_exposure_lowers_confidence_on_unseen_non_digits(tmp_path: Path) -> None:
    images, kinds = negatives.build(60, seed=9, kinds=("letter", "symbol", "partial_digit"), mnist_dir=MNIST_DIR)
    train_part, held_out = images[:40], images[40:]
    neg_dir = negatives.save(tmp_path / "negs", train_part, kinds[:40])
    plain_conf, plain_acc = _negative_confidence(tmp_path, 0.0, neg_dir, held_out)
    oe_conf, oe_acc = _negative_confidence(tmp_path, 1.0, neg_dir, held_out)
    assert oe_conf < plain_conf - 0.1, (oe_conf, plain_conf)
    assert oe_acc >= plain_acc - 0.05  # the digits are still read


def _bar_digits(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k MNIST-format "digits": a filled 12x8 box (rows 8-19, cols 10-17), labelled 7 (not a 1)."""
    x = torch.zeros(k, 1, 28, 28, dtype=torch.uint8)
    x[:, :, 8:20, 10:18] = 255
    return x, torch.full((k,), 7)


def _box(img: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the ink box of a (28, 28) image."""
    ys, xs = (img > 60).nonzero(as_tuple=True)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_broken_digits_are_partial_or_doubled_and_brought_to_the_digit_format() -> None:
    x, y = _bar_digits(400)
    out = A.broken_digits(x, y, torch.Generator().manual_seed(0))
    assert out.shape == (200, 1, 28, 28) and out.dtype == torch.uint8
    boxes = [_box(o[0]) for o in out]
    # Every one is scaled like preprocessing scales a digit: its longer side about 20 px.
    assert all(18 <= max(b) <= 22 for b in boxes), boxes
    # Doubled boxes side by side are wider than tall; partial boxes (a cut of a 12x8 box) are cut along one side.
    wide = sum(w > h * 1.2 for h, w in boxes)
    assert 40 <= wide <= 160, wide
    # Centre of mass at the centre, as preprocessing puts it.
    f = out.float()[:, 0]
    ar = torch.arange(28.0)
    cy = (f.sum(2) * ar).sum(1) / f.sum((1, 2))
    cx = (f.sum(1) * ar).sum(1) / f.sum((1, 2))
    assert (cy - 13.5).abs().max() < 1.0 and (cx - 13.5).abs().max() < 1.0
    # Deterministic in the generator; a 1 is never cut (what is left of a 1 is a 1): it is always doubled.
    again = A.broken_digits(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    ones = A.broken_digits(x, torch.ones(400, dtype=torch.long), torch.Generator().manual_seed(1))
    one_boxes = [_box(o[0]) for o in ones]
    overlaid = sum(w <= h * 1.2 for h, w in one_boxes)
    assert overlaid < 100  # only the drawn-over-each-other quarter (about 50) is not wide
    with pytest.raises(ValueError, match="even number"):
        A.broken_digits(x[:3], y[:3])


def test_outlier_batch_mixes_the_set_and_digits_made_broken() -> None:
    digits, labels = _bar_digits(50)
    train_set = Dataset(digits, labels, tuple(range(10)))
    negs = torch.full((30, 1, 28, 28), 77, dtype=torch.uint8)
    t = config.from_dict({"data": {"negatives_dir": "x"}, "train": {"outlier_weight": 0.5, "outlier_batch": 16,
                                                                    "outlier_from_digits": 0.25}}).train
    batch = outlier_batch(negs, train_set, t, torch.Generator().manual_seed(0))
    assert batch.shape == (16, 1, 28, 28) and batch.dtype == torch.uint8
    from_set = (batch.flatten(1) == 77).all(1)
    assert int(from_set.sum()) == 12  # the rest (4) made from the digits
    t0 = config.from_dict({"data": {"negatives_dir": "x"}, "train": {"outlier_weight": 0.5}}).train
    assert bool((outlier_batch(negs, train_set, t0, torch.Generator().manual_seed(0)).flatten(1) == 77).all())
    with pytest.raises(ConfigError, match="outlier_from_digits"):
        config.from_dict({"train": {"outlier_from_digits": 1.5}})


def test_lowres_upsample_kinds() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cfg = lambda mode: A.config_from_dict({"lowres": {"p": 1.0, "min_size": 9, "max_size": 9, "upsample": mode}})  # noqa: E731
    nearest = A.augment_batch(x, cfg("nearest"), g())
    bilinear = A.augment_batch(x, cfg("bilinear"), g())
    # Nearest keeps few grey levels (blocks); bilinear makes a ramp of them.
    assert len(nearest[0].unique()) < len(bilinear[0].unique())
    mixed = A.augment_batch(x.repeat(8, 1, 1, 1), cfg("mixed"), g())
    kinds = {len(m.unique()) for m in mixed}
    assert len(kinds) >= 2  # more than one way of enlarging was drawn
    with pytest.raises(ConfigError, match="upsample"):
        cfg("lanczos")


def test_cli_negatives_build(tmp_path: Path) -> None:
    out = tmp_path / "negs"
    cmd = [sys.executable, "-m", "digitkit", "negatives", "build", "--out", str(out), "--n", "4",
           "--data-dir", str(MNIST_DIR)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "passed preprocessing" in done.stdout and negatives.load(out)[0].shape[1:] == (1, 28, 28)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "not empty" in again.stderr and again.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------- the digit score
def test_digit_score_is_the_top_logit_over_the_mean_on_the_calibrated_scale() -> None:
    from digitkit.classify import digit_score
    from digitkit.evaluate import digit_scores

    z = 4 * torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    t = 0.4
    scores = digit_scores((z / t).softmax(1))
    assert torch.allclose(scores, (z.amax(1) - z.mean(1)) / t, rtol=1e-4)
    assert digit_score(torch.full((10,), 0.1)) == pytest.approx(0.0, abs=1e-6)  # "no idea": every class alike
    one_hot = torch.zeros(10)
    one_hot[3] = 1.0  # every other class underflowed to 0: still a finite, very high score
    assert 50 < digit_score(one_hot) < 100
    assert digit_score(z[0].softmax(0)) == pytest.approx(float(scores[0] * t), rel=1e-4)


def test_recognizer_rejects_below_the_digit_score_as_not_a_digit(mnist_small_run, mnist_train) -> None:
    import dataclasses

    from digitkit.classify import Recognizer
    from digitkit.preprocess import Preprocessed

    rec = Recognizer.open(mnist_small_run)
    x = mnist_train.images[-200:].float().div(255)
    plain = rec.answers([Preprocessed(im) for im in x])
    scores = torch.tensor([a.digit_score for a in plain])
    assert all(a.rejected in (None, "low-confidence") for a in plain) and (scores > 0).all()
    ordered = scores.sort().values
    gaps = ordered[81:120] - ordered[80:119]  # a cut between two scores well apart, near the median
    i = 80 + int(gaps.argmax())
    cut = float(ordered[i] + ordered[i + 1]) / 2
    rec.inference = dataclasses.replace(rec.inference, reject_below_confidence=0.0, reject_below_digit_score=cut)
    answers = rec.answers([Preprocessed(im) for im in x])
    for a, s in zip(answers, scores.tolist(), strict=True):
        assert (a.rejected == "not-a-digit") == (s < cut)
        assert a.digit_score == pytest.approx(s, abs=1e-4)  # the score is shown either way
        if a.rejected:
            assert a.digit is None and "reject_below_digit_score" in a.record["why"] and a.predicted is not None
            assert a.to_json()["digit_score"] == a.digit_score
    with pytest.raises(ConfigError, match="reject_below_digit_score"):
        config.from_dict({"inference": {"reject_below_digit_score": -1.0}})


# ------------------------------------------------------------------------------------------ reject gate
def test_reject_gate_mixes_the_answer_towards_no_idea() -> None:
    """cnn3's reject_gate: one more output s; the answer is log((1 - q) softmax(z) + q / 10), q = sigmoid(s)."""
    import math

    from digitkit.models import create_model
    from digitkit.models.cnn import RejectGate

    torch.manual_seed(0)
    model = create_model("cnn3", reject_gate=True).eval()
    assert isinstance(model.head, RejectGate)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (5, 10) and torch.allclose(out.logsumexp(1), torch.zeros(5), atol=1e-5)
        last = model.head.head[-1]  # the linear layer: its 11th output is the gate
        last.weight[10] = 0.0
        last.bias[10] = 30.0  # certainly not a digit: every class alike
        assert torch.allclose(model(x), torch.full((5, 10), -math.log(10)), atol=1e-5)
        last.bias[10] = -30.0  # certainly a digit: the digit logits' own answer
        z = model.head.head(model.forward_features(x))[:, :10]
        assert torch.allclose(model(x), z.log_softmax(1), atol=1e-5)
        last.bias[10] = 0.0  # q = 1/2: half way
        assert torch.allclose(model(x).exp(), 0.5 * z.softmax(1) + 0.05, atol=1e-5)
    assert create_model("cnn3")(x).shape == (5, 10)  # off by default: ten plain logits


def test_reject_gate_learns_non_digits_trains_exports_and_reopens(tmp_path: Path) -> None:
    """Trained with outlier exposure the gate opens on unseen non-digits and stays shut on digits; the run
    reopens with its gate and its ONNX export answers as PyTorch does."""
    from digitkit import export

    images, kinds = negatives.build(60, seed=9, kinds=("letter", "symbol", "blank_paper"), mnist_dir=MNIST_DIR)
    neg_dir = negatives.save(tmp_path / "negs", images[:40], kinds[:40])
    data_dir = make_idx_dir(tmp_path / "data", num_classes=4, n_train=400, n_test=80)
    cfg = config.from_dict({
        "seed": 0, "data": {"dir": str(data_dir), "val_fraction": 0.2, "negatives_dir": str(neg_dir)},
        "model": {"name": "cnn3", "args": {"channels": [8, 16, 32], "reject_gate": True}},
        "augment": {"recipe": "none"},
        "train": {"epochs": 6, "batch_size": 32, "lr": 3e-3, "outlier_weight": 1.0, "outlier_batch": 16,
                  "plots": False, "threads": 1},
    })  # fmt: skip
    summary = runs.train_run(cfg, out=tmp_path / "run", point_latest_link=False)
    opened = runs.open_model(summary["run_dir"])
    model = opened.model.eval()
    held_out = images[40:].float() / 255
    digits = load_split(data_dir, "test").images.float() / 255
    with torch.no_grad():
        def gate(x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(model.head.head(model.forward_features(x))[:, model.head.num_classes].float())

        opened_on, shut_on = float(gate(held_out).mean()), float(gate(digits).mean())
        assert opened_on > shut_on + 0.2 and opened_on > 4 * shut_on, (opened_on, shut_on)
    assert summary["val_accuracy"] > 0.9
    report = export.export_run(summary["run_dir"], options=export.ExportOptions(measure_speed=False),
                               data_dir=data_dir)  # fmt: skip
    assert report.parity["agreement"] >= 0.9999 and report.parity["max_abs_prob_diff"] < 1e-4
