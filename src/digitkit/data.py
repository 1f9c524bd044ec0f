"""Datasets in memory: IDX folders -> uint8 tensors, checksum verification, stratified splits.

A data folder holds four IDX files named like MNIST's (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or .gz; EMNIST-style prefixes such as
`emnist-letters-train-images-idx3-ubyte` and `test` for `t10k` are accepted too). Optional files:
`SHA256SUMS.raw` (sha256sum format, over the *uncompressed* bytes) is checked when present, and
`classes.txt` (one class name per line) names the classes. Nothing here assumes ten classes or 28x28.
Extra training folders (`load_extra`, e.g. labelled field data exported from the audit log) need only the two
train files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from digitkit import idx
from digitkit.errors import DataError

SUMS_FILE = "SHA256SUMS.raw"
CLASSES_FILE = "classes.txt"
_ROLE_PATTERNS = {
    ("train", "images"): r"(^|[-_.])train-images-idx3-ubyte(\.gz)?$",
    ("train", "labels"): r"(^|[-_.])train-labels-idx1-ubyte(\.gz)?$",
    ("test", "images"): r"(^|[-_.])(t10k|test)-images-idx3-ubyte(\.gz)?$",
    ("test", "labels"): r"(^|[-_.])(t10k|test)-labels-idx1-ubyte(\.gz)?$",
}


@dataclass
class Dataset:
    """A labelled image set held in memory: images (N, 1, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 1:
            raise DataError(f"{self.source}: images must be (N, 1, H, W) uint8, got {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(
                f"{self.source}: {len(self.images)} images but {len(self.labels)} labels; "
                "the image and label files do not belong together"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.classes, self.source)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()


def find_files(data_dir: Path) -> dict[tuple[str, str], Path]:
    """Map (split, kind) -> file for the four IDX files in `data_dir`; a clear error if any is missing."""
    return _find_roles(data_dir, list(_ROLE_PATTERNS))


def _find_roles(data_dir: Path, required: list[tuple[str, str]]) -> dict[tuple[str, str], Path]:
    """The IDX files present in `data_dir` by role; a clear error if a `required` role has none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: data folder not found; expected a folder with the four MNIST-style IDX files "
            "(train-images-idx3-ubyte.gz, ...); run `digitkit data download --out DIR` or pass --data-dir"
        )
    names = sorted(p.name for p in data_dir.iterdir() if p.is_file())
    found: dict[tuple[str, str], Path] = {}
    for role, pattern in _ROLE_PATTERNS.items():
        hits = [n for n in names if re.search(pattern, n)]
        # Prefer the raw file when both raw and .gz exist: same bytes, faster to read.
        hits.sort(key=lambda n: (n.endswith(".gz"), n))
        if hits:
            found[role] = data_dir / hits[0]
        elif role in required:
            want = "-".join(["t10k" if role[0] == "test" else "train", role[1]])
            raise DataError(
                f"{data_dir}: no {role[0]} {role[1]} file (expected a name like "
                f"{want}-idx{3 if role[1] == 'images' else 1}-ubyte[.gz]); found: {', '.join(names) or 'nothing'}"
            )
    return found


def read_sums(path: Path) -> dict[str, str]:
    """Parse a sha256sum-format file into {file name without .gz: hex digest}."""
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise DataError(f"{path}:{n}: expected '<sha256>  <file name>', got {line!r}")
        sums[parts[1].lstrip("*").removesuffix(".gz")] = parts[0].lower()
    return sums


def expected_sums(data_dir: Path) -> dict[str, str]:
    # Without a sums file only the structure is checked: Fashion-MNIST reuses MNIST's file names, so MNIST's
    # sums cannot be assumed. The shipped data/mnist and every folder digitkit writes carry one.
    sums_path = Path(data_dir) / SUMS_FILE
    return read_sums(sums_path) if sums_path.is_file() else {}


def load_split(data_dir: str | Path, split: str, verify: bool = True) -> Dataset:
    """Load the `train` or `test` split of an IDX folder as uint8 tensors, checking checksums if known."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    data_dir = Path(data_dir)
    files = find_files(data_dir)
    sums = expected_sums(data_dir) if verify else {}
    images = _read_checked(files[(split, "images")], sums)
    labels = _read_checked(files[(split, "labels")], sums)
    if images.ndim != 3:
        raise DataError(f"{files[(split, 'images')]}: expected (N, H, W) images, got shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(f"{files[(split, 'labels')]}: expected (N,) uint8 labels, got {labels.dtype} {labels.shape}")
    classes = class_names(data_dir)
    if len(labels) and labels.max() >= len(classes):
        raise DataError(
            f"{files[(split, 'labels')]}: label {int(labels.max())} but only {len(classes)} classes are named "
            f"in {data_dir / CLASSES_FILE}; add the missing names"
        )
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, classes, source=str(files[(split, "images")]))


def load_extra(data_dir: str | Path, classes: list[str], shape: tuple[int, int], verify: bool = True) -> Dataset:
    """Extra training images from an IDX folder that needs only train-images/train-labels (what
    `digitkit audit export --format idx` writes), checked against the main data set's `classes` and image `shape`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"{data_dir}: extra training data folder not found; expected a folder with train-images-idx3-ubyte.gz "
            "and train-labels-idx1-ubyte.gz (digitkit audit export --format idx --out DIR writes one)"
        )
    files = _find_roles(data_dir, [("train", "images"), ("train", "labels")])
    sums = expected_sums(data_dir) if verify else {}
    images = _read_checked(files[("train", "images")], sums)
    labels = _read_checked(files[("train", "labels")], sums)
    if images.ndim != 3 or images.dtype != np.uint8 or tuple(images.shape[1:]) != tuple(shape):
        raise DataError(
            f"{files[('train', 'images')]}: extra training images are {images.dtype} {images.shape[1:]}, the training "
            f"data is uint8 {tuple(shape)}; resize them to {shape[0]}x{shape[1]} (as digitkit's preprocessing does) "
            "or drop this --extra-data folder"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8 or len(labels) != len(images):
        raise DataError(
            f"{files[('train', 'labels')]}: expected {len(images)} uint8 labels (one per image), got "
            f"{labels.dtype} {labels.shape}; the image and label files do not belong together"
        )
    if (data_dir / CLASSES_FILE).is_file() and class_names(data_dir) != list(classes):
        raise DataError(
            f"{data_dir / CLASSES_FILE}: extra training data has classes {', '.join(class_names(data_dir))}, the "
            f"training data has {', '.join(classes)}; only data with the same classes (in the same order) can be added"
        )
    if len(labels) and labels.max() >= len(classes):
        raise DataError(
            f"{files[('train', 'labels')]}: label {int(labels.max())} but the training data has only {len(classes)} "
            "classes; only data with the same classes can be added"
        )
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, list(classes), source=str(files[("train", "images")]))


def concat(datasets: list[Dataset]) -> Dataset:
    """One data set from several with the same classes, in order."""
    first = datasets[0]
    if len(datasets) == 1:
        return first
    return Dataset(torch.cat([d.images for d in datasets]), torch.cat([d.labels for d in datasets]), first.classes,
                   " + ".join(d.source for d in datasets))  # fmt: skip


def class_names(data_dir: Path) -> list[str]:
    """Class names from classes.txt if present, else '0'..'K-1' where K = 1 + the largest training label."""
    path = Path(data_dir) / CLASSES_FILE
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"{path}: expected at least two distinct class names, one per line")
        return names
    labels = idx.read(_find_roles(data_dir, [("train", "labels")])[("train", "labels")])
    return [str(i) for i in range(int(labels.max()) + 1)]


def _read_checked(path: Path, sums: dict[str, str]) -> np.ndarray:
    key = path.name.removesuffix(".gz")
    return idx.read(path, expected_sha256=sums.get(key))


def verify_dir(data_dir: str | Path) -> dict[str, str]:
    """Check every IDX file of a folder; returns {file: 'ok (checksum)' | 'ok (structure only)'} or raises."""
    data_dir = Path(data_dir)
    sums = expected_sums(data_dir)
    status = {}
    for path in find_files(data_dir).values():
        _read_checked(path, sums)
        status[path.name] = "ok (sha256)" if path.name.removesuffix(".gz") in sums else "ok (no checksum known)"
    return status


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): each class keeps `val_fraction` of its samples in val (rounded), seeded."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction}: expected a fraction in [0, 1)")
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = int(round(len(members) * val_fraction))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_idx, val_idx = torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values
    return train_idx, val_idx


def stratified_kfold(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """`folds` disjoint index sets covering every sample, each class spread evenly over the folds."""
    if folds < 2:
        raise DataError(f"folds = {folds}: expected at least 2")
    g = torch.Generator().manual_seed(seed)
    assignment = torch.empty_like(labels)
    offset = 0
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        # Continue the round-robin across classes so fold sizes differ by at most one overall.
        assignment[members] = (torch.arange(len(members)) + offset) % folds
        offset += len(members)
    return [torch.nonzero(assignment == k).flatten() for k in range(folds)]


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of pixel values scaled to [0, 1]. Sums of uint8 values and their squares are exact in int64
    (up to 2**63 / 255**2 pixels), so this is exact and takes one pass in chunks that keep memory flat."""
    if images.dtype != torch.uint8:
        images = images.mul(255).round().clamp(0, 255).to(torch.uint8)
    total, total_sq, n = 0, 0, images.numel()
    for chunk in images.reshape(-1).split(1 << 22):
        wide = chunk.to(torch.int32)
        total += int(wide.sum(dtype=torch.int64))
        total_sq += int(wide.mul_(wide).sum(dtype=torch.int64))
    if n == 0:
        return 0.0, 0.0
    mean = total / n / 255
    return mean, max(total_sq / n / 255**2 - mean * mean, 0.0) ** 0.5


def save_split(dataset: Dataset, data_dir: Path, split: str, compress: bool = True) -> list[Path]:
    """Write a dataset as MNIST-style IDX files (train-* or t10k-*) that load_split reads back."""
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if compress else ""
    paths = [
        idx.write(Path(data_dir) / f"{prefix}-images-idx3-ubyte{suffix}", dataset.images[:, 0].numpy()),
        idx.write(Path(data_dir) / f"{prefix}-labels-idx1-ubyte{suffix}", dataset.labels.to(torch.uint8).numpy()),
    ]
    return paths


def write_sums(data_dir: Path) -> Path:
    """Write SHA256SUMS.raw for every IDX file in a folder (two or four), so it verifies like the shipped MNIST copy."""
    data_dir = Path(data_dir)
    lines = []
    for path in sorted(_find_roles(data_dir, [("train", "images"), ("train", "labels")]).values()):
        lines.append(f"{idx.sha256(idx.read_bytes(path))}  {path.name.removesuffix('.gz')}\n")
    out = data_dir / SUMS_FILE
    idx.atomic_write_bytes(out, "".join(lines).encode())
    return out
