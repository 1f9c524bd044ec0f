"""Non-digits for training the rejection (outlier exposure): `synth.make_negatives` images brought to 28x28 by the
same `preprocess` that serving uses, stored as an IDX folder like any 28x28 set.

Only what preprocessing passes is kept: a blank page it calls `empty` never reaches the model, so the model has
nothing to learn from it. The label of each image is its kind (classes.txt names them), so a folder says what it
holds and `data.load_split(folder, "train")` reads it back, checksums verified.

The set is drawn from its own seed stream (`SEED`), never the benchmark's (benchmarks/realworld.py draws from
seed + 101 and seed + 202), and its partial and doubled digits come from MNIST training images outside the seed-0
validation hold-out, never from the test files. Building 8,000 takes about 10 minutes on one core (an object photo
costs 0.3 s to draw); `digitkit negatives build` writes the folder, `data/negatives/` ships one.

    from digitkit.realworld import negatives
    images, kinds = negatives.build(2000, workers=2)
    negatives.save("data/my-negatives", images, kinds)
    x, kinds = negatives.load("data/my-negatives")   # (N, 1, 28, 28) uint8, kind names
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from digitkit import data, synth
from digitkit.errors import DataError
from digitkit.preprocess import PreprocessConfig, preprocess

SEED = 2_200_000
"""The training negatives' seed stream: image i of a set is drawn from Generator([SEED + seed, i])."""
DIR = "data/negatives"
"""Where the shipped set lives, relative to the project root."""


def _draw(args: tuple[int, int, int, tuple[str, ...], str]) -> tuple[np.ndarray, np.ndarray]:
    """Negatives start..stop of the set with `seed` (one worker's share) -> (kept (M, 28, 28) uint8, kind indices)."""
    start, stop, seed, kinds, mnist_dir = args
    digits, labels = _training_digits(mnist_dir)
    cfg = PreprocessConfig()
    images, kind_ids = [], []
    for i in range(start, stop):
        kind = kinds[i % len(kinds)]
        img = synth.negative(kind, np.random.default_rng([SEED + seed, i]), digits, labels)
        pre = preprocess(img, cfg)
        if pre.rejected:  # refused before the model: nothing to learn
            continue
        images.append((pre.tensor[0].numpy() * 255).round().astype(np.uint8))
        kind_ids.append(kinds.index(kind))
    stacked = np.stack(images) if images else np.zeros((0, cfg.size, cfg.size), np.uint8)
    return stacked, np.asarray(kind_ids, np.uint8)


def _training_digits(mnist_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST training images outside the seed-0 validation hold-out (for partial and doubled digits)."""
    train = data.load_split(mnist_dir, "train")
    train_idx, _ = data.stratified_split(train.labels, 0.1, 0)
    return train.images[train_idx, 0].numpy(), train.labels[train_idx].numpy()


def build(n: int, seed: int = 0, kinds: tuple[str, ...] | None = None,
          workers: int = 1, mnist_dir: str | Path = "data/mnist") -> tuple[torch.Tensor, list[str]]:  # fmt: skip
    """n negatives drawn (kind i % len(kinds), default synth.NEGATIVE_KINDS), preprocessed; the ones preprocessing
    passes -> (images (M, 1, 28, 28) uint8, kind name per image). Deterministic in (n, seed, kinds), whatever
    `workers` (processes). `mnist_dir` supplies the handwritten digits of partial and doubled digits."""
    if n < 1:
        raise ValueError(f"n = {n}: expected at least one negative to draw")
    kinds = tuple(synth.NEGATIVE_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in synth.ALL_NEGATIVE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"negative kinds {unknown or 'none'}: expected some of {', '.join(synth.ALL_NEGATIVE_KINDS)}")
    workers = max(1, min(workers, n, os.cpu_count() or 1))
    bounds = np.linspace(0, n, workers + 1).round().astype(int)
    jobs = [(int(a), int(b), seed, kinds, str(mnist_dir)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if workers == 1:
        parts = [_draw(j) for j in jobs]
    else:
        # spawn, not fork: a forked copy of a process whose torch thread pool is running can deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_draw, jobs))
    images = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images).unsqueeze(1), [kinds[int(i)] for i in ids]


def save(folder: str | Path, images: torch.Tensor, kinds: list[str]) -> Path:
    """Write the set as an IDX folder (train-images, train-labels = kind index, classes.txt = kind names,
    SHA256SUMS.raw) that `load` verifies."""
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) != len(kinds) or not len(kinds):
        raise ValueError("save needs (N, 1, H, W) uint8 images, N >= 1, and one kind name per image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(synth.ALL_NEGATIVE_KINDS))
    labels = torch.tensor([names.index(k) for k in kinds], dtype=torch.long)
    (folder / data.CLASSES_FILE).write_text("".join(f"{k}\n" for k in names))
    data.save_split(data.Dataset(images, labels, names), folder, "train")
    data.write_sums(folder)
    return folder


def load(folder: str | Path, size: int = 28) -> tuple[torch.Tensor, list[str]]:
    """A negatives folder -> (images (N, 1, size, size) uint8, kind name per image), checksums verified."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such negatives folder; build one with `digitkit negatives build --out "
                        f"{folder}` or use the shipped {DIR}")  # fmt: skip
    names = data.class_names(folder) if (folder / data.CLASSES_FILE).is_file() else list(synth.ALL_NEGATIVE_KINDS)
    ds = data.load_extra(folder, names, (size, size))  # train-* files only, checksums verified, shape checked
    return ds.images, [names[int(i)] for i in ds.labels]
