"""k-fold cross-validation on the training files: K models, each scored on the fold it never trained on.

runs/<YYYYmmdd-HHMMSS>-cv<K>-<model>/
  config.yaml       the config every fold trains with          fold-1 .. fold-K   one run folder per fold
  cv.json           per-fold numbers, mean and std, timings    cv.md              the table, in words
  cv.png            per-fold accuracy with mean and +- std     final/             (final=True) one more run

The training files are split into K stratified folds (seeded by data.split_seed, else the seed; every fold has
each class in proportion). Fold i trains on the other K-1 folds and is validated on fold i: that held-out fold picks
the fold's checkpoint (lowest val loss, as in every run) *and* gives the fold's score. This is the standard k-fold
estimate; the checkpoint choice makes it slightly optimistic, by as much as picking the best of a few epochs can. The
sealed test files are never read for the folds.

`final=True` then trains one model on the training files as `digitkit train` does with the config: with its
hold-out split (a validation set picks its checkpoint, so it sees 1 - val_fraction of the training images), or, with
data.val_fraction=0 and train.checkpoint_metric=last, on all of them (a refit: its last epoch is kept). Like every
run it is scored once on the test set (reported only).

Cost: the training files are read and verified once (serial), or read once per worker process; folds are
subsets by index, so K folds cost K runs plus the `overhead_seconds` recorded in cv.json.

`expand=F` (> 1) is offline augmentation done the k-fold way: each fold's *training* part is expanded to F times
its size (its originals, then F - 1 augmented copies drawn once with the config's augmentation, as
`augment.expand` and `digitkit augment expand` do) and trained with no augmentation on top; the held-out fold stays
as it is. Expanding the files before splitting would put copies of a held-out image into the training folds. The
expanded set costs F times the steps per epoch: divide train.epochs by F to spend what online augmentation does.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import torch

from digitkit import augment, config, data, plots, runs
from digitkit.config import Config
from digitkit.errors import ConfigError, DigitkitError
from digitkit.idx import atomic_write_bytes
from digitkit.train import Reporter

ReporterFactory = Callable[[str], Reporter]
"""Called with a label ("fold 2/5", "final") and returns the Reporter for that run's epochs."""


def make_folds(labels: torch.Tensor, folds: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(train_idx, val_idx) per fold: stratified, disjoint val folds covering every sample, sorted indices."""
    check_folds(folds, labels)
    parts = data.stratified_kfold(labels, folds, seed)
    return [(torch.cat(parts[:i] + parts[i + 1 :]).sort().values, parts[i].sort().values) for i in range(folds)]


def check_folds(folds: int, labels: torch.Tensor | None = None) -> None:
    """K must be >= 2 and, with `labels`, no larger than the rarest class (else some fold lacks a class)."""
    if folds < 2:
        raise ConfigError(f"folds = {folds}: cross-validation needs at least 2 folds; use 5 (the default) or 10")
    if labels is None:
        return
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).flatten()
    rarest = int(present[counts[present].argmin()])
    if folds > int(counts[rarest]):
        raise ConfigError(
            f"folds = {folds}: class {rarest} has only {int(counts[rarest])} training images, so some folds would "
            f"have none of it; use at most {int(counts[rarest])} folds (5 or 10 are usual)"
        )


def run_cv(
    cfg: Config,
    folds: int = 5,
    workers: int = 1,
    out: Path | None = None,
    root: Path = runs.DEFAULT_ROOT,
    final: bool = False,
    reporter_factory: ReporterFactory | None = None,
    expand: int = 1,
) -> dict[str, Any]:
    """Cross-validate `cfg` with `folds` stratified folds of the training files; returns what cv.json holds.

    `workers` > 1 trains folds in parallel processes (spawn start method; each gets cores // workers torch
    threads unless train.threads is set); the numbers are the same as a serial run's. `out` replaces the
    default folder runs/<stamp>-cv<K>-<model>/. `expand` > 1: offline augmentation of each fold's training part
    (see the module's docstring).
    """
    started = time.perf_counter()
    check_folds(folds)
    check_expand(cfg, expand, final)
    if workers < 1:
        raise ConfigError(f"workers = {workers}: expected 1 (folds one after another) or more (in parallel)")
    workers = min(workers, folds)
    # Read and verify the training files once; the folds are index subsets of this one copy.
    full = runs.prepared(data.load_split(cfg.data.dir, "train", verify=cfg.data.verify), cfg)
    splits = make_folds(full.labels, folds, cfg.split_seed)
    cv_dir = _make_cv_dir(out, root, f"cv{folds}-{cfg.model.name}")
    config.save(cfg, cv_dir / "config.yaml")

    if workers == 1:
        summaries = []
        for i, (train_idx, val_idx) in enumerate(splits, 1):
            reporter = reporter_factory(f"fold {i}/{folds}") if reporter_factory else None
            try:
                summaries.append(_train_fold(cfg, full, train_idx, val_idx, cv_dir / f"fold-{i}", reporter,
                                             expand=expand, fold=i))
            except DigitkitError as e:
                raise type(e)(f"fold {i}/{folds}: {e}") from e
    else:
        summaries = _run_parallel(cfg, splits, cv_dir, workers, reporter_factory, expand)

    per_fold = []
    for i, ((train_idx, val_idx), s) in enumerate(zip(splits, summaries, strict=True), 1):
        per_fold.append({
            "fold": i, "n_train": len(train_idx) * expand, "n_val": len(val_idx),
            "val_accuracy": s["val_accuracy"], "val_log_loss": s["val_log_loss"],
            "best_epoch": s["best_epoch"], "epochs": s["epochs"],
            "seconds": round(s["wall_seconds"], 2), "train_seconds": s["train_seconds"],
            "val_class_counts": torch.bincount(full.labels[val_idx], minlength=full.num_classes).tolist(),
            "run_dir": f"fold-{i}",
        })  # fmt: skip
    accs = [f["val_accuracy"] for f in per_fold]
    losses = [f["val_log_loss"] for f in per_fold]
    result: dict[str, Any] = {
        "k": folds,
        "seed": cfg.seed,
        "workers": workers,
        "model": cfg.model.name,
        "data_dir": str(cfg.data.dir),
        "n_train_files": len(full),
        "expand": None if expand == 1 else {
            "factor": expand,
            "augment": augment.config_to_dict(cfg.augment),
            "note": f"offline augmentation: each fold's training part is its originals plus {expand - 1} augmented "
                    "copies drawn once, trained with no further augmentation; held-out folds are not expanded",
        },
        "classes": full.classes,
        "selection": "each fold's held-out part picks its checkpoint and scores it (the standard k-fold "
        "estimate); the test files are not used",
        "std": "sample standard deviation over folds (ddof=1)",
        "val_accuracy": {**_mean_std(accs), "min": min(accs), "max": max(accs)},
        "val_log_loss": _mean_std(losses),
        "folds": per_fold,
    }
    plots.save_cv(accs, cv_dir / "cv.png", title=f"{folds}-fold cross-validation: {cfg.model.name} ({cv_dir.name})")
    fold_seconds = sum(f["seconds"] for f in per_fold)
    total = time.perf_counter() - started
    # With workers > 1 the folds overlap, so the overhead is negative; the speedup is then the useful figure.
    result.update(total_seconds=round(total, 2), fold_seconds_sum=round(fold_seconds, 2),
                  overhead_seconds=round(total - fold_seconds, 2), speedup=round(fold_seconds / total, 2),
                  final=None)  # fmt: skip

    if final:
        reporter = reporter_factory("final") if reporter_factory else None
        summary = runs.train_run(cfg, out=cv_dir / "final", reporter=reporter, point_latest_link=False)
        trained = ("trained on the training files with the config's hold-out split (val_fraction) picking the "
                   "checkpoint" if cfg.has_validation else "trained on every training image (val_fraction 0), the "
                   "last epoch kept")
        result["final"] = {
            "run_dir": "final",
            "trained": trained,
            "note": f"{trained}; test accuracy measured once and reported, not used to choose anything",
            **{k: summary[k] for k in ("val_accuracy", "test_accuracy", "test_log_loss", "best_epoch")},
            "seconds": summary["total_seconds"],
        }
    _write_json(cv_dir / "cv.json", result)
    (cv_dir / "cv.md").write_text(cv_markdown(result, cv_dir.name))
    return {"cv_dir": str(cv_dir), **result}


def check_expand(cfg: Config, expand: int, final: bool = False) -> None:
    """`expand` must be a whole number >= 1; above 1 it needs an augmentation to draw the copies with."""
    if isinstance(expand, bool) or not isinstance(expand, int) or expand < 1:
        raise ConfigError(f"expand = {expand!r}: expected a whole number >= 1 (1: no offline expansion; 2 adds one "
                          "augmented copy of each fold's training part)")  # fmt: skip
    if expand > 1 and not cfg.augment.enabled:
        raise ConfigError(f"expand = {expand} draws augmented copies with the config's augmentation, but it has "
                          "none; set one, e.g. --set augment.recipe=standard")  # fmt: skip
    if expand > 1 and final:
        raise ConfigError("expand and final together are not supported: the final model trains on the training "
                          "files as `digitkit train` does; for an offline-expanded final model, train on "
                          "`digitkit augment expand` output with augment.recipe=none")  # fmt: skip


def _make_cv_dir(out: Path | None, root: Path, name: str) -> Path:
    if out is None:
        return runs.new_run_dir(root, name)
    out = Path(out)
    if (out / "cv.json").exists() or any(out.glob("fold-*")):
        raise ConfigError(f"{out} already holds a cross-validation; choose another --out or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _train_fold(
    cfg: Config,
    full: data.Dataset,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    run_dir: Path,
    reporter: Reporter | None,
    expand: int = 1,
    fold: int = 1,
) -> dict[str, Any]:
    """One fold: an ordinary run on index subsets of the training files, without a test set.

    With `expand` > 1 the training part is expanded offline (copies drawn with a generator seeded by the config's
    seed and the fold) and trained with augmentation off; the fold's config.yaml says so.

    Returns the run's summary plus `wall_seconds`, the whole call (the summary's total_seconds stops before the
    run's final evaluation and figures).
    """
    started = time.perf_counter()
    train = full.subset(train_idx)
    if expand > 1:
        images, labels = augment.expand(train.images, train.labels, cfg.augment, expand, seed=cfg.seed * 1000 + fold)
        train = data.Dataset(images, labels, train.classes, f"{train.source} (fold {fold} expanded x{expand})")
        cfg = dataclasses.replace(cfg, augment=augment.AugmentConfig())
    datasets = (train, full.subset(val_idx), None)
    summary = runs.train_run(cfg, out=run_dir, reporter=reporter, datasets=datasets, point_latest_link=False)
    return {**summary, "wall_seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------
# Parallel folds. Spawned processes (no fork: the same code on Linux, macOS and Windows) get only picklable
# arguments: the config as plain data, the fold's indices as numpy arrays and the fold's folder.

_WORKER: dict[str, Any] = {}


def _init_worker(threads: int, events: Any) -> None:
    torch.set_num_threads(threads)
    _WORKER["events"] = events


def _fold_worker(cfg_dict: dict[str, Any], label: str, train_idx: np.ndarray, val_idx: np.ndarray,
                 run_dir: str, expand: int = 1, fold: int = 1) -> dict[str, Any]:  # fmt: skip
    cfg = config.from_dict(cfg_dict)
    if _WORKER.get("data_dir") != cfg.data.dir:
        # Once per process, not per fold; the parent already verified the checksums.
        _WORKER["full"] = runs.prepared(data.load_split(cfg.data.dir, "train", verify=False), cfg)
        _WORKER["data_dir"] = cfg.data.dir
    events = _WORKER.get("events")
    reporter = _QueueReporter(events, label) if events is not None else None
    return _train_fold(cfg, _WORKER["full"], torch.from_numpy(train_idx), torch.from_numpy(val_idx),
                       Path(run_dir), reporter, expand, fold)  # fmt: skip


class _QueueReporter:
    """Sends epoch events to the parent, which hands them to the caller's reporter for that fold. Batch updates
    are dropped: bars of several folds at once would only interleave."""

    def __init__(self, events: Any, label: str):
        self.events, self.label = events, label

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        self.events.put((self.label, "epoch_start", (epoch, epochs, batches)))

    def batch(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, row: dict[str, float]) -> None:
        self.events.put((self.label, "epoch_end", (row,)))


def _run_parallel(
    cfg: Config,
    splits: list[tuple[torch.Tensor, torch.Tensor]],
    cv_dir: Path,
    workers: int,
    reporter_factory: ReporterFactory | None,
    expand: int = 1,
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue() if reporter_factory else None
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // workers)
    cfg_dict, k = config.to_dict(cfg), len(splits)
    reporters: dict[str, Reporter] = {}
    summaries: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, events)) as pool:
        futures: dict[Future, int] = {}
        for i, (train_idx, val_idx) in enumerate(splits, 1):
            args = (cfg_dict, f"fold {i}/{k}", train_idx.numpy(), val_idx.numpy(), str(cv_dir / f"fold-{i}"),
                    expand, i)
            futures[pool.submit(_fold_worker, *args)] = i
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _forward_events(events, reporters, reporter_factory)
                for future in done:
                    summaries[futures[future]] = _fold_result(future, futures[future], k)
        except BaseException:
            # Folds not started yet are dropped; those already running finish before the error is raised.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    _forward_events(events, reporters, reporter_factory)
    return [summaries[i] for i in range(1, k + 1)]


def _fold_result(future: Future, fold: int, k: int) -> dict[str, Any]:
    try:
        return future.result()
    except DigitkitError as e:
        raise type(e)(f"fold {fold}/{k}: {e}") from e
    except BrokenProcessPool as e:
        raise DigitkitError(
            f"fold {fold}/{k}: its worker process stopped abruptly (out of memory or killed; or, from a script, "
            "run_cv(workers > 1) called without an `if __name__ == '__main__':` guard); try fewer workers"
        ) from e
    except Exception as e:
        raise DigitkitError(f"fold {fold}/{k} failed in its worker process: {type(e).__name__}: {e}") from e


def _forward_events(events: Any, reporters: dict[str, Reporter], factory: ReporterFactory | None) -> None:
    while events is not None and factory is not None:
        try:
            label, method, args = events.get_nowait()
        except queue_module.Empty:
            return
        if label not in reporters:
            reporters[label] = factory(label)
        getattr(reporters[label], method)(*args)


# ----------------------------------------------------------------------------------------------------------
# Output


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}  # stdev: ddof=1


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def cv_markdown(result: dict[str, Any], title: str = "") -> str:
    """cv.md: the headline with n, a per-fold table and how to read it."""
    k, acc, loss = result["k"], result["val_accuracy"], result["val_log_loss"]
    lines = [
        f"# {k}-fold cross-validation: {result['model']}" + (f" ({title})" if title else ""),
        "",
        f"**accuracy {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}% (n={k} folds)**, "
        f"log loss {loss['mean']:.4f} +- {loss['std']:.4f}; mean +- sample std (ddof=1) over folds.",
        "",
        "| fold | train images | val images | val accuracy | val log loss | best epoch | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in result["folds"]:
        lines.append(f"| {f['fold']} | {f['n_train']:,} | {f['n_val']:,} | {100 * f['val_accuracy']:.2f}% | "
                     f"{f['val_log_loss']:.4f} | {f['best_epoch']} | {f['seconds']:.1f} |")  # fmt: skip
    lines += [
        f"| mean +- std | | | {100 * acc['mean']:.2f} +- {100 * acc['std']:.2f}% | "
        f"{loss['mean']:.4f} +- {loss['std']:.4f} | | |",
        "",
        f"Each fold's model trained on the other {k - 1} folds of the training files (stratified, seed "
        f"{result['seed']}); its held-out fold chose the checkpoint (as validation does in every run) and then "
        "scored it. This is the standard k-fold estimate, slightly optimistic by that choice of epoch. "
        "The sealed test files were not used.",
        "",
        *([f"Offline augmentation: {result['expand']['note']} (x{result['expand']['factor']}).", ""]
          if result.get("expand") else []),
        f"Run folders: fold-1 .. fold-{k}; config: config.yaml. Time: {result['total_seconds']:.1f} s with "
        f"{result['workers']} worker(s) for {result['fold_seconds_sum']:.1f} s of fold runs.",
    ]
    if result["final"]:
        fin = result["final"]
        lines += [
            "",
            f"Final model: final/ ({fin['trained']}); "
            + (f"validation {100 * fin['val_accuracy']:.2f}%, " if fin["val_accuracy"] is not None else "")
            + f"test {100 * fin['test_accuracy']:.2f}% (measured once, reported, not used to choose anything).",
        ]
    return "\n".join(lines) + "\n"
