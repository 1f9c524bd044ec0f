"""k-fold cross-validation: stratified disjoint folds of the training files only, honest statistics, the same
numbers in parallel worker processes, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from digitkit import checkpoint, config, cv, data, runs
from digitkit.errors import ConfigError, DataError, DigitkitError

from .conftest import make_idx_dir

FOLDS = 3


def tiny_cfg(data_dir: Path, *extra: str) -> config.Config:
    # threads=1: serial and worker runs then do the same float operations in the same order, bit for bit.
    return config.load(None, [f"data.dir={data_dir}", "model.name=cnn1", "train.epochs=2", "train.batch_size=32",
                              "augment.recipe=none", "train.threads=1", *extra])  # fmt: skip


class RecordingReporter:
    def __init__(self, log: list, label: str):
        self.log, self.label = log, label

    def epoch_start(self, epoch, epochs, batches):
        pass

    def batch(self, done, loss, acc, images_per_s):
        pass

    def epoch_end(self, row):
        self.log.append((self.label, row["epoch"]))


@pytest.fixture(scope="module")
def no_test_dir(tmp_path_factory) -> Path:
    """The tiny data set with its test files corrupted: anything that reads them fails."""
    d = make_idx_dir(tmp_path_factory.mktemp("cv") / "tiny", num_classes=4)
    for path in d.glob("t10k-*"):
        path.write_bytes(b"not an IDX file")
    return d


@pytest.fixture(scope="module")
def serial(no_test_dir, tmp_path_factory):
    """One serial 3-fold run, watching which splits are loaded and which data each fold trains on."""
    loaded, fold_data, progress = [], [], []
    real_load, real_train = data.load_split, runs.train_run

    def load_split(data_dir, split, verify=True):
        loaded.append(split)
        return real_load(data_dir, split, verify)

    def train_run(cfg, **kw):
        fold_data.append(kw["datasets"])
        return real_train(cfg, **kw)

    out = tmp_path_factory.mktemp("cv-serial") / "cv"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "load_split", load_split)
        mp.setattr(runs, "train_run", train_run)
        result = cv.run_cv(tiny_cfg(no_test_dir), folds=FOLDS, out=out,
                           reporter_factory=lambda label: RecordingReporter(progress, label))  # fmt: skip
    return {"result": result, "out": out, "loaded": loaded, "fold_data": fold_data, "progress": progress}


def _image_keys(ds: data.Dataset) -> list[bytes]:
    return [img.numpy().tobytes() for img in ds.images]


def test_folds_are_disjoint_stratified_and_cover_the_training_set(serial, no_test_dir):
    full = data.load_split(no_test_dir, "train")
    everything = _image_keys(full)
    assert len(set(everything)) == len(full)  # every image is distinct, so bytes identify images
    vals = []
    for train_set, val_set, test_set in serial["fold_data"]:
        assert test_set is None
        train_keys, val_keys = set(_image_keys(train_set)), set(_image_keys(val_set))
        assert not train_keys & val_keys  # a fold never validates on what it trained on
        assert train_keys | val_keys == set(everything)
        vals.append(val_keys)
    assert len(vals) == FOLDS
    assert sum(len(v) for v in vals) == len(full) and set().union(*vals) == set(everything)  # disjoint cover
    counts = torch.stack([torch.bincount(v.labels, minlength=4) for _, v, _ in serial["fold_data"]])
    assert (counts.max(0).values - counts.min(0).values).max() <= 1  # each class spread evenly over folds
    recorded = [f["val_class_counts"] for f in serial["result"]["folds"]]
    assert recorded == counts.tolist()


def test_folds_never_read_the_test_files(serial, no_test_dir):
    with pytest.raises(DataError):
        data.load_split(no_test_dir, "test")  # the copy's test files really are unreadable
    assert serial["loaded"] == ["train"]  # read once, for all folds
    assert serial["result"]["final"] is None
    for i in range(1, FOLDS + 1):
        summary = json.loads((serial["out"] / f"fold-{i}" / "summary.json").read_text())
        assert "test_accuracy" not in summary


def test_cv_json_statistics_are_those_of_the_folds(serial):
    out, result = serial["out"], serial["result"]
    saved = json.loads((out / "cv.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "cv_dir"}
    folds = saved["folds"]
    assert [f["fold"] for f in folds] == [1, 2, 3] and saved["k"] == FOLDS and saved["seed"] == 0
    for f in folds:
        summary = json.loads((out / f["run_dir"] / "summary.json").read_text())
        assert f["val_accuracy"] == summary["val_accuracy"] and f["val_log_loss"] == summary["val_log_loss"]
        assert f["best_epoch"] == summary["best_epoch"] and f["n_train"] + f["n_val"] == 240
    accs, losses = [f["val_accuracy"] for f in folds], [f["val_log_loss"] for f in folds]
    assert saved["val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert saved["val_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert saved["val_log_loss"]["mean"] == pytest.approx(np.mean(losses))
    assert saved["val_log_loss"]["std"] == pytest.approx(np.std(losses, ddof=1))
    assert saved["fold_seconds_sum"] == pytest.approx(sum(f["seconds"] for f in folds), abs=0.02)
    assert saved["overhead_seconds"] == pytest.approx(saved["total_seconds"] - saved["fold_seconds_sum"], abs=0.02)
    assert config.load(out / "config.yaml") == tiny_cfg(Path(saved["data_dir"]))
    md = (out / "cv.md").read_text()
    mean, std = saved["val_accuracy"]["mean"], saved["val_accuracy"]["std"]
    assert f"accuracy {100 * mean:.2f} +- {100 * std:.2f}% (n=3 folds)" in md
    assert (out / "cv.png").stat().st_size > 10_000
    # Progress: one epoch_end per epoch of every fold, labelled by fold.
    assert serial["progress"] == [(f"fold {i}/3", e) for i in (1, 2, 3) for e in (1, 2)]


def test_parallel_workers_give_the_serial_numbers(serial, no_test_dir, tmp_path):
    progress = []
    result = cv.run_cv(tiny_cfg(no_test_dir), folds=FOLDS, workers=2, out=tmp_path / "cv",
                       reporter_factory=lambda label: RecordingReporter(progress, label))  # fmt: skip
    assert result["workers"] == 2
    for par, ser in zip(result["folds"], serial["result"]["folds"], strict=True):
        assert par["val_accuracy"] == ser["val_accuracy"]
        assert par["val_log_loss"] == ser["val_log_loss"]
        assert par["val_class_counts"] == ser["val_class_counts"]
    a = torch.load(checkpoint.resolve(tmp_path / "cv" / "fold-2"), weights_only=True)["state_dict"]
    b = torch.load(checkpoint.resolve(serial["out"] / "fold-2"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(progress) == sorted(serial["progress"])  # epochs reported from the workers too


def test_an_error_in_a_worker_names_the_fold(no_test_dir, tmp_path):
    cfg = tiny_cfg(no_test_dir, "train.device=cuda:99")  # no such device here: every fold fails
    with pytest.raises(DigitkitError, match=r"fold [123]/3"):
        cv.run_cv(cfg, folds=FOLDS, workers=2, out=tmp_path / "cv")


@pytest.mark.parametrize("folds, message", [(1, "at least 2 folds"), (0, "at least 2 folds"),
                                            (61, "only 60 training images")])  # fmt: skip
def test_impossible_fold_counts_are_config_errors(tiny_dir, tmp_path, folds, message):
    with pytest.raises(ConfigError, match=message):
        cv.run_cv(tiny_cfg(tiny_dir), folds=folds, root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_ten_folds_balance_every_class():
    labels = torch.tensor([0] * 57 + [1] * 103 + [2] * 10 + [3] * 30)
    splits = cv.make_folds(labels, 10, seed=3)
    assert len(splits) == 10
    vals = torch.cat([v for _, v in splits])
    assert sorted(vals.tolist()) == list(range(len(labels)))
    for train_idx, val_idx in splits:
        assert not set(train_idx.tolist()) & set(val_idx.tolist())
        assert len(train_idx) + len(val_idx) == len(labels)
    counts = torch.stack([torch.bincount(labels[v], minlength=4) for _, v in splits])
    assert (counts.max(0).values - counts.min(0).values).max() <= 1
    again = cv.make_folds(labels, 10, seed=3)
    assert all(torch.equal(v, w) for (_, v), (_, w) in zip(splits, again, strict=True))  # seeded
    assert not torch.equal(splits[0][1], cv.make_folds(labels, 10, seed=4)[0][1])
    with pytest.raises(ConfigError, match="class 2 has only 10"):
        cv.make_folds(labels, 11, seed=3)


def test_final_run_trains_with_the_hold_out_split(tiny_dir, tmp_path):
    root = tmp_path / "runs"
    result = cv.run_cv(tiny_cfg(tiny_dir, "train.epochs=1"), folds=2, root=root, final=True)
    cv_dir = Path(result["cv_dir"])
    assert cv_dir.parent == root and cv_dir.name.endswith("-cv2-cnn1")
    assert not (root / "latest").exists()
    saved = json.loads((cv_dir / "cv.json").read_text())
    assert saved["final"]["run_dir"] == "final"
    summary = json.loads((cv_dir / "final" / "summary.json").read_text())
    assert saved["final"]["test_accuracy"] == summary["test_accuracy"]  # scored once on the test set, reported
    assert (cv_dir / "final" / "confusion.png").is_file() and summary["epochs"] == 1
    assert "Final model: final/" in (cv_dir / "cv.md").read_text()
    with pytest.raises(ConfigError, match="already holds a cross-validation"):
        cv.run_cv(tiny_cfg(tiny_dir), folds=2, out=cv_dir)



def test_offline_expansion_expands_only_the_training_folds(no_test_dir, tmp_path, monkeypatch):
    """--expand F: each fold trains on its own part F times over (originals first, then copies drawn with the
    recipe), with augmentation off; the held-out fold is the plain images, never an augmented copy of them."""
    seen = []
    real_train = runs.train_run

    def train_run(cfg, **kw):
        seen.append((cfg, kw["datasets"]))
        return real_train(cfg, **kw)

    monkeypatch.setattr(runs, "train_run", train_run)
    cfg = tiny_cfg(no_test_dir, "train.epochs=1", "augment.recipe=standard")
    result = cv.run_cv(cfg, folds=2, out=tmp_path / "x2", expand=2)
    full = data.load_split(no_test_dir, "train")
    splits = cv.make_folds(full.labels, 2, cfg.split_seed)
    assert len(seen) == 2 and result["expand"]["factor"] == 2
    for (fold_cfg, (train, val, test)), (train_idx, val_idx), row in zip(seen, splits, result["folds"], strict=True):
        n = len(train_idx)
        assert test is None and len(train) == 2 * n == row["n_train"] and len(val) == len(val_idx) == row["n_val"]
        assert torch.equal(train.images[:n], full.images[train_idx])  # the originals, then the copies
        assert not torch.equal(train.images[n:], full.images[train_idx])  # the copies are augmented
        assert torch.equal(train.labels, full.labels[train_idx].repeat(2))
        assert torch.equal(val.images, full.images[val_idx])  # the held-out fold is not expanded
        assert not fold_cfg.augment.enabled and cfg.augment.enabled  # no augmentation on top of the copies
    saved = config.load(tmp_path / "x2" / "fold-1" / "config.yaml")
    assert not saved.augment.enabled
    assert "Offline augmentation" in (tmp_path / "x2" / "cv.md").read_text()
    # the same folds and copies again: the expansion is seeded
    again = cv.run_cv(cfg, folds=2, out=tmp_path / "again", expand=2)
    assert [f["val_accuracy"] for f in again["folds"]] == [f["val_accuracy"] for f in result["folds"]]


@pytest.mark.parametrize(("sets", "expand", "final", "message"), [
    (["augment.recipe=standard"], 0, False, "whole number >= 1"),
    (["augment.recipe=none"], 2, False, "has none"),
    (["augment.recipe=standard"], 2, True, "not supported"),
])  # fmt: skip
def test_bad_expansions_are_config_errors(no_test_dir, tmp_path, sets, expand, final, message):
    with pytest.raises(ConfigError, match=message):
        cv.run_cv(tiny_cfg(no_test_dir, *sets), folds=2, out=tmp_path / "bad", expand=expand, final=final)
    assert not (tmp_path / "bad").exists()  # checked before anything is written
