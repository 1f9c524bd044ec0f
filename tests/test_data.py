import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from digitkit import data, idx
from digitkit.errors import DataError

from .conftest import MNIST_DIR, make_idx_dir

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_shipped_mnist_loads_verified_with_known_counts(mnist_train):
    assert mnist_train.images.shape == (60000, 1, 28, 28) and mnist_train.images.dtype == torch.uint8
    assert mnist_train.class_counts() == MNIST_TRAIN_COUNTS
    assert mnist_train.classes == [str(i) for i in range(10)]
    test = data.load_split(MNIST_DIR, "test")
    assert test.class_counts() == MNIST_TEST_COUNTS
    assert set(data.verify_dir(MNIST_DIR).values()) == {"ok (sha256)"}


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == np.uint8:
        a = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    path = idx.write(tmp_path / f"a-idx3{suffix}", a)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    b = idx.read(path)
    assert b.dtype == np.dtype(dtype).newbyteorder("=") and np.array_equal(a, b)


def test_idx_header_matches_the_mnist_spec():
    raw = idx.encode(np.zeros((3, 28, 28), np.uint8))
    assert raw[:4] == bytes([0, 0, 8, 3]) and raw[4:8] == (3).to_bytes(4, "big")
    assert len(raw) == 16 + 3 * 28 * 28


def _copy_mnist(tmp_path: Path) -> Path:
    dst = tmp_path / "mnist"
    shutil.copytree(MNIST_DIR, dst)
    return dst


def test_truncated_file_named_in_error(tmp_path):
    d = _copy_mnist(tmp_path)
    f = d / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*(truncated|corrupted)"):
        data.load_split(d, "test")


def test_wrong_content_fails_checksum_naming_file(tmp_path):
    d = _copy_mnist(tmp_path)
    f = d / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(f.read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # a valid label, the structure intact: only the checksum can tell
    f.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        data.load_split(d, "test")
    data.load_split(d, "test", verify=False)  # the structure is still fine


def test_raw_and_gz_files_are_equivalent(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-labels-idx1-ubyte"):
        (d / name).write_bytes(idx.read_bytes(MNIST_DIR / f"{name}.gz"))
    shutil.copy(MNIST_DIR / "train-images-idx3-ubyte.gz", d)
    shutil.copy(MNIST_DIR / "SHA256SUMS.raw", d)
    a, b = data.load_split(d, "test"), data.load_split(MNIST_DIR, "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_missing_file_and_missing_dir_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found.*digitkit data download"):
        data.load_split(tmp_path / "nope", "train")
    d = make_idx_dir(tmp_path / "d")
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no test labels file"):
        data.load_split(d, "test")


def test_not_idx_and_mismatched_counts(tmp_path):
    d = make_idx_dir(tmp_path / "d", sums=False)
    (d / "train-labels-idx1-ubyte.gz").write_bytes(b"hello, not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        data.load_split(d, "train")
    idx.write(d / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="240 images but 7 labels"):
        data.load_split(d, "train")


def test_class_count_and_names_come_from_the_data(tmp_path):
    d = make_idx_dir(tmp_path / "five", num_classes=5, size=20)
    ds = data.load_split(d, "train")
    assert ds.num_classes == 5 and ds.classes == ["0", "1", "2", "3", "4"]
    assert ds.images.shape[1:] == (1, 20, 20)
    (d / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match="label 4 but only 3 classes"):
        data.load_split(d, "train")


def test_emnist_style_names_are_found(tmp_path):
    d = make_idx_dir(tmp_path / "src", sums=False)
    e = tmp_path / "emnist"
    e.mkdir()
    for p in d.iterdir():
        shutil.copy(p, e / ("emnist-letters-" + p.name.replace("t10k", "test")))
    assert len(data.load_split(e, "test")) == 80


def test_stratified_split_is_disjoint_balanced_and_seeded(mnist_train):
    labels = mnist_train.labels
    tr, va = data.stratified_split(labels, 0.1, seed=0)
    assert len(tr) + len(va) == 60000 and len(np.intersect1d(tr.numpy(), va.numpy())) == 0
    counts = torch.bincount(labels[va], minlength=10)
    expected = torch.tensor([round(c * 0.1) for c in MNIST_TRAIN_COUNTS])
    assert torch.equal(counts, expected)
    assert torch.equal(va, data.stratified_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(va, data.stratified_split(labels, 0.1, seed=1)[1])


def test_stratified_kfold_partitions_and_balances():
    labels = torch.arange(1003) % 7
    folds = data.stratified_kfold(labels, 5, seed=0)
    all_idx = torch.cat(folds).sort().values
    assert torch.equal(all_idx, torch.arange(1003))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for f in folds:
        per_class = torch.bincount(labels[f], minlength=7)
        assert per_class.max() - per_class.min() <= 1


def test_pixel_stats_match_known_mnist_values(mnist_train):
    mean, std = data.pixel_stats(mnist_train.images)
    assert mean == pytest.approx(0.1307, abs=1e-4) and std == pytest.approx(0.3081, abs=1e-4)


def test_save_split_and_sums_round_trip(tmp_path, tiny_dir):
    ds = data.load_split(tiny_dir, "train")
    assert ds.classes == ["up", "right", "down", "left"]
    sums = data.read_sums(tiny_dir / "SHA256SUMS.raw")
    assert len(sums) == 4 and all(len(v) == 64 for v in sums.values())


def test_gzip_files_are_read_through_a_verified_uncompressed_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITKIT_CACHE_DIR", str(tmp_path / "cache"))
    src = make_idx_dir(tmp_path / "d", num_classes=3)
    first = data.load_split(src, "train")
    copies = sorted((tmp_path / "cache" / "idx").glob("train-images-idx3-ubyte.gz.*.raw"))
    assert len(copies) == 1
    # The copy is what later reads use: alter one pixel in it (keeping its name) and it must be refused, not used.
    raw = bytearray(copies[0].read_bytes())
    raw[-1] ^= 0xFF
    copies[0].write_bytes(bytes(raw))
    again = data.load_split(src, "train")
    assert torch.equal(again.images, first.images)
    assert idx.sha256(copies[0].read_bytes()) == copies[0].name.split(".")[-2]  # replaced from the source
    # A changed source file (new content, new mtime) gets its own copy; the old one is never served for it.
    shutil.copy(src / "t10k-images-idx3-ubyte.gz", src / "train-images-idx3-ubyte.gz")
    images = idx.read(src / "train-images-idx3-ubyte.gz")
    assert images.shape[0] == 80 and not np.array_equal(images[:80], first.images[:80, 0].numpy())


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("DIGITKIT_CACHE_DIR", str(blocker))
    src = make_idx_dir(tmp_path / "d", num_classes=3)
    assert len(data.load_split(src, "train")) == 240
