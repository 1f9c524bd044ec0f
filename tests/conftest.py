"""Shared fixtures: a tiny synthetic IDX data set (any class count) so most tests never touch real MNIST."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from digitkit import data
from digitkit.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT / "data" / "mnist"

# The uncompressed IDX cache (idx.cached_raw) of a test session, subprocesses included, lives in a throwaway folder,
# never in the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="digitkit-test-cache-")
os.environ["DIGITKIT_CACHE_DIR"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


def synthetic_images(labels: np.ndarray, size: int = 28, seed: int = 0) -> np.ndarray:
    """Class c is a bright bar at angle c*180/K plus noise: learnable in a few steps, any number of classes."""
    rng = np.random.default_rng(seed)
    k = int(labels.max()) + 1
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    out = np.zeros((len(labels), size, size), np.float32)
    for c in range(k):
        angle = np.pi * c / k
        dist = np.abs(-np.sin(angle) * xx + np.cos(angle) * yy)
        bar = ((dist < 1.6) & (np.hypot(xx, yy) < size * 0.38)).astype(np.float32)
        out[labels == c] = bar
    shift = rng.integers(-1, 2, size=(len(labels), 2))
    for i, (dy, dx) in enumerate(shift):
        out[i] = np.roll(out[i], (dy, dx), axis=(0, 1))
    out = out * rng.uniform(0.7, 1.0, size=(len(labels), 1, 1)) + rng.normal(0, 0.05, out.shape)
    return (out.clip(0, 1) * 255).round().astype(np.uint8)


def make_idx_dir(path: Path, num_classes: int = 4, n_train: int = 240, n_test: int = 80, size: int = 28,
                 class_names: list[str] | None = None, sums: bool = True) -> Path:  # fmt: skip
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % num_classes
        np.random.default_rng(1).shuffle(labels)
        images = synthetic_images(labels, size=size, seed=2 if split == "train" else 3)
        ds = Dataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                     [str(i) for i in range(num_classes)])  # fmt: skip
        data.save_split(ds, path, split)
    if class_names:
        (path / "classes.txt").write_text("\n".join(class_names) + "\n")
    if sums:
        data.write_sums(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return make_idx_dir(tmp_path / "tiny", num_classes=4, class_names=["up", "right", "down", "left"])


@pytest.fixture(scope="session")
def mnist_train() -> Dataset:
    return data.load_split(MNIST_DIR, "train")


@pytest.fixture(scope="session")
def mnist_small_run(tmp_path_factory, mnist_train) -> Path:
    """A small real MNIST model (cnn3_slim, 2 epochs on 12,000 training images, about 98%) for tests that need
    a model that reads real digits; trained once per session in about 15 s."""
    from digitkit import config, runs

    out = tmp_path_factory.mktemp("mnist-run") / "run"
    cfg = config.load(None, [f"data.dir={MNIST_DIR}", "model.name=cnn3_slim", "train.epochs=2", "train.batch_size=128",
                             "train.lr=4e-3", "augment.recipe=none", "train.label_smoothing=0.1"])  # fmt: skip
    sub = data.stratified_split(mnist_train.labels, 0.2, seed=0)[1]
    train_idx, val_idx = data.stratified_split(mnist_train.labels[sub], 1 / 6, seed=0)
    small = mnist_train.subset(sub)
    runs.train_run(cfg, out=out, datasets=(small.subset(train_idx), small.subset(val_idx), None))
    return out


@pytest.fixture(scope="session")
def row_reader_run(tmp_path_factory, mnist_train) -> Path:
    """A tiny row reader (crnn 8/16/32 channels, task: sequence, 2 epochs of 320 rows from 2,000 real training
    digits): it reads little, but it is a real run folder of the row-reader kind for the plumbing (read, export,
    serve). Trained once per session in a few seconds."""
    from digitkit import config, runs

    out = tmp_path_factory.mktemp("row-reader") / "run"
    cfg = config.load(ROOT / "configs" / "read.yaml", [
        f"data.dir={MNIST_DIR}", "model.args.channels=[8,16,32]", "model.args.hidden=32", "train.epochs=2",
        "train.batch_size=32", "rows.rows_per_epoch=320", "rows.val_rows=64", "rows.test_rows=64",
        "train.plots=false", "rows.max_digits=6", "rows.font_share=0",
    ])  # fmt: skip
    sub = data.stratified_split(mnist_train.labels, 2000 / len(mnist_train), seed=0)[1]
    small = mnist_train.subset(sub)
    train_idx, val_idx = data.stratified_split(small.labels, 0.2, seed=0)
    runs.train_run(cfg, out=out, datasets=(small.subset(train_idx), small.subset(val_idx), None))
    return out


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server URL: $DIGITKIT_TEST_POSTGRES_URL (CI sets it), else a private throwaway server started
    with .ci/postgres.sh for this session. Without PostgreSQL the test is skipped, or fails when DIGITKIT_CI=1."""
    import os
    import subprocess

    url = os.environ.get("DIGITKIT_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    script = ROOT / ".ci" / "postgres.sh"
    try:
        done = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=180)
        problem = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        problem, done = str(e), None
    if problem:
        reason = f"no PostgreSQL server for the tests ({problem}); set DIGITKIT_TEST_POSTGRES_URL or install postgresql"
        if os.environ.get("DIGITKIT_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = dict(line.removeprefix("export ").split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    try:
        yield env["DIGITKIT_TEST_POSTGRES_URL"]
    finally:
        subprocess.run(["bash", str(script), "stop", env["DIGITKIT_PG_DIR"]], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (Debian's `prometheus` package, which .ci/run installs): it lints /metrics and checks
    deploy/prometheus/alerts.yml. Missing: skipped, or failed under DIGITKIT_CI=1."""
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing (apt-get install --no-install-recommends prometheus): Prometheus checks need it"
        if os.environ.get("DIGITKIT_CI") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path
