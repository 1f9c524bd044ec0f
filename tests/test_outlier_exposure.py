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
from digitkit.errors import DataError
from digitkit.realworld import negatives
from digitkit.train import train_step

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
