"""Run folders: create one per run, train into it, evaluate its best checkpoint once, write the summary.

runs/<YYYYmmdd-HHMMSS>-<model>/
  config.yaml   the resolved config (reproduces the run)      metrics.csv   one row per epoch
  best-*.pt     best checkpoint on validation (loss), or      last.pt       resume state after the last epoch
  final-*.pt    the last epoch's (train.checkpoint_metric last)
  history.png   loss and accuracy curves                      confusion.png test-set confusion (counts and %)
  summary.json  model, params, epochs, seconds, val and test accuracy
runs/latest -> the newest run
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from digitkit import __version__, checkpoint, config, data, distributed
from digitkit.config import Config
from digitkit.errors import ConfigError, DataError
from digitkit.evaluate import confusion_matrix, loss_and_accuracy, predict_logits, predict_probs_shift_tta
from digitkit.idx import atomic_write_bytes
from digitkit.models import count_macs, count_params, create_model
from digitkit.train import LAST, FitState, Reporter, StepFn, fit, pick_device

DEFAULT_ROOT = Path("runs")


def new_run_dir(root: Path, model_name: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{model_name}"
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise DataError(f"{root}: could not create a new run folder named {base}-N")


def point_latest(root: Path, run_dir: Path) -> None:
    """runs/latest -> run_dir (relative, so the runs folder can move), replaced atomically."""
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, root / "latest")


def load_data(cfg: Config, extra: bool = True) -> tuple[data.Dataset, data.Dataset, data.Dataset]:
    """(train, val, test): a seeded stratified hold-out of the training files, and the sealed test files.

    The `data.extra_dirs` sets are appended to the training portion (unless `extra` is False); validation and test
    never see them, so the figures stay comparable with runs without extra data."""
    full = prepared(data.load_split(cfg.data.dir, "train", verify=cfg.data.verify), cfg)
    test = prepared(data.load_split(cfg.data.dir, "test", verify=cfg.data.verify), cfg)
    train_idx, val_idx = data.stratified_split(full.labels, cfg.data.val_fraction, cfg.split_seed)
    train = full.subset(train_idx)
    if extra:
        train = data.concat([train, *load_extra_sets(cfg, train)])
    return train, full.subset(val_idx), test


def load_extra_sets(cfg: Config, like: data.Dataset) -> list[data.Dataset]:
    """The `data.extra_dirs` training sets, checked against `like` (classes, image size) and prepared like it."""
    shape = (like.images.shape[2], like.images.shape[3])
    return [prepared(data.load_extra(d, like.classes, shape, verify=cfg.data.verify), cfg) for d in cfg.data.extra_dirs]


def load_negatives(cfg: Config, shape: tuple[int, int] = (28, 28)) -> torch.Tensor:
    """The non-digits of data.negatives_dir (outlier exposure; digitkit.realworld.negatives builds such a folder),
    checksums verified, deskewed like the digits when preprocess.deskew."""
    folder = Path(cfg.data.negatives_dir)
    if not folder.is_dir():
        raise DataError(f"data.negatives_dir = {folder}: no such folder; use the shipped data/negatives, build one "
                        f"with `digitkit negatives build --out {folder}`, or set train.outlier_weight: 0")  # fmt: skip
    ds = data.load_extra(folder, data.class_names(folder), shape)  # the digits' image size
    return deskewed(ds.images) if cfg.preprocess.deskew else ds.images


def negatives_record(cfg: Config, negatives: torch.Tensor | None) -> dict[str, Any] | None:
    """What a run trained its rejection on, for its summary: the folder, how many images, and the SHA-256 of the
    folder's SHA256SUMS.raw (so two runs can be shown to have used the same non-digits wherever they were)."""
    if negatives is None:
        return None
    sums = Path(cfg.data.negatives_dir) / "SHA256SUMS.raw"
    digest = hashlib.sha256(sums.read_bytes()).hexdigest() if sums.is_file() else None
    return {"dir": str(cfg.data.negatives_dir), "images": len(negatives), "sums_sha256": digest}


def prepared(ds: data.Dataset, cfg: Config) -> data.Dataset:
    """The data set as the model is trained and measured on: deskewed when `preprocess.deskew` is on, so
    training, validation, test and real-world input (preprocess) all share the same deskew."""
    if not cfg.preprocess.deskew:
        return ds
    return data.Dataset(deskewed(ds.images), ds.labels, ds.classes, ds.source)


def deskewed(images: torch.Tensor) -> torch.Tensor:
    """images (N, 1, H, W) uint8, each deskewed by preprocess.deskew_batch, through a copy in cache_dir()/deskew.

    Deskewing all of MNIST takes about 0.45 s on 2 cores; reading the copy back about 0.07 s
    (benchmarks/startup.py). The copy is keyed by the SHA-256 of the images, of preprocess.py (where the deskew
    lives) and of the torch version, and checked like the IDX cache (idx.read_cached)."""
    from digitkit import idx, preprocess

    key = hashlib.sha256(images.contiguous().numpy())
    for part in (str(tuple(images.shape)), Path(preprocess.__file__).read_text(), torch.__version__):
        key.update(part.encode())
    folder, stem = idx.cache_dir() / "deskew", key.hexdigest()[:24]
    found = idx.read_cached(folder, stem, "u8")
    if found is not None and len(found[0]) == images.numel():
        return torch.frombuffer(bytearray(found[0]), dtype=torch.uint8).view(images.shape)
    out = torch.empty_like(images)
    for start in range(0, len(images), 4096):
        out[start : start + 4096] = preprocess.deskew_uint8(images[start : start + 4096])
    idx.write_cached(folder, stem, "u8", out.numpy().tobytes())
    return out


def train_run(
    cfg: Config,
    out: Path | None = None,
    root: Path = DEFAULT_ROOT,
    reporter: Reporter | None = None,
    resume: Path | None = None,
    stop_after_epochs: int | None = None,
    datasets: tuple[data.Dataset, data.Dataset, data.Dataset | None] | None = None,
    point_latest_link: bool = True,
    step_fn: StepFn | None = None,
) -> dict[str, Any]:
    """Train per `cfg` into a new run folder (or continue `resume`); returns the summary.

    `datasets` = (train, val, test) replaces the config's hold-out split (cross-validation folds); a test set of
    None skips the test evaluation (summary then has no test figures). `step_fn` replaces fit's optimizer step
    (distillation).
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    started = time.perf_counter()
    # Under torchrun: join its process group (distributed.py); rank 0 alone makes and writes the run folder.
    world = distributed.init_from_env(pick_device(cfg.train.device))
    if not world.is_main:
        reporter = None
    # Data first: a missing or corrupt file must fail before a run folder (and runs/latest) is made.
    extra_images = 0
    if datasets is not None:
        train_set, val_set, test_set = datasets
    else:
        train_set, val_set, test_set = load_data(cfg, extra=False)
        extra_sets = load_extra_sets(cfg, train_set)
        train_set = data.concat([train_set, *extra_sets])
        extra_images = sum(len(d) for d in extra_sets)
    negatives = load_negatives(cfg, tuple(train_set.images.shape[2:])) if cfg.train.outlier_weight > 0 else None
    data_seconds = time.perf_counter() - started
    distributed.check_launch(cfg.train.batch_size, world, custom_step=step_fn is not None)
    resume_state, earlier_seconds = None, 0.0
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / LAST).is_file():
            raise DataError(f"{run_dir}: nothing to resume (no {LAST}); start a new run instead")
        resume_state = checkpoint.load(run_dir / LAST)
        distributed.check_resume(resume_state, world, run_dir)
        # The epochs trained before the resume count towards the run's total time (their start-up does not).
        earlier_seconds = sum(r["seconds"] for r in resume_state["fit_state"]["history"])
    elif world.is_main:
        run_dir = Path(out) if out is not None else new_run_dir(root, cfg.model.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / LAST).exists():
            raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        config.save(cfg, run_dir / "config.yaml")
    if out is None and resume is None and point_latest_link and world.is_main:
        point_latest(root, run_dir)
    run_dir = distributed.broadcast(run_dir if world.is_main else None, world)
    if cfg.task == "sequence":
        if world.size > 1 or step_fn is not None:
            raise ConfigError("task: sequence trains in one process with the CTC step (no torchrun, no distillation)")
        from digitkit.sequence import train_sequence_run

        return train_sequence_run(cfg, train_set, val_set, test_set, run_dir, reporter, resume_state,
                                  stop_after_epochs, started, earlier_seconds, data_seconds)  # fmt: skip

    mean, std = data.pixel_stats(train_set.images)
    in_chans, img_size = train_set.images.shape[1], train_set.images.shape[2]
    torch.manual_seed(cfg.seed)  # the initial weights are part of what the seed reproduces
    model = create_model(
        cfg.model.name, num_classes=train_set.num_classes, in_chans=in_chans, img_size=img_size,
        mean=mean, std=std, **cfg.model.args,
    )  # fmt: skip
    meta = {
        "model": cfg.model.name,
        "model_args": dict(cfg.model.args),
        "classes": train_set.classes,
        "in_chans": in_chans,
        "img_size": img_size,
        "config": config.to_dict(cfg),
    }
    state = fit(cfg, model, train_set, val_set, run_dir, meta, reporter, resume_state, stop_after_epochs, step_fn,
                negatives)
    if stop_after_epochs is not None and state.epoch < cfg.train.epochs and not state.stopped_early:
        return {"run_dir": str(run_dir), "epochs": state.epoch, "finished": False}
    summary = None
    if world.is_main:  # the other ranks return rank 0's summary
        seconds = time.perf_counter() - started + earlier_seconds
        summary = finish_run(cfg, run_dir, state.history, val_set, test_set, seconds,
                             stopped_early=state.stopped_early, extra_training_images=extra_images,
                             data_seconds=data_seconds, fit_state=state,
                             negatives=negatives_record(cfg, negatives))  # fmt: skip
    return distributed.broadcast(summary, world)


def finish_run(
    cfg: Config,
    run_dir: Path,
    history: list[dict[str, float]],
    val_set: data.Dataset,
    test_set: data.Dataset | None,
    seconds: float,
    stopped_early: bool,
    extra_training_images: int = 0,
    data_seconds: float = 0.0,
    fit_state: FitState | None = None,
    negatives: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the best checkpoint (chosen on validation) once on the test set; plots and summary.json.

    Its validation figures are the ones fit measured on it (`fit_state`) when fit chose it in this process and
    recorded them; otherwise they are measured again.

    Times in the summary: data_seconds (reading and preparing the data), train_seconds (the epochs: training and
    each epoch's validation), total_seconds (from the start of the run to here; for a resumed run, this process's
    time plus the epochs trained before the resume, whose start-up is not recorded), finish_seconds (this
    function: re-validation, plots, the test evaluation)."""
    finish_started = time.perf_counter()
    best_path = checkpoint.resolve(run_dir)
    ckpt = checkpoint.load(best_path)
    model = checkpoint.model_from_checkpoint(ckpt)
    device = pick_device(cfg.train.device)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)

    def logits(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(model, images, cfg.train.eval_batch_size, device, cfg.train.channels_last)

    recorded = fit_state is not None and fit_state.best_path == best_path.name
    val_logits = logits(val_set.images) if len(val_set) else None
    if val_logits is None:
        val_loss = val_acc = None  # no validation (data.val_fraction 0)
    elif recorded and not math.isnan(fit_state.best_val_log_loss):
        val_loss, val_acc = fit_state.best_val_log_loss, fit_state.best_val_acc
    else:
        val_loss, val_acc = loss_and_accuracy(val_logits, val_set.labels)
    # The temperature behind every confidence shown (calibration.py): fitted on validation, never on test.
    calibration = store_calibration(best_path, ckpt, val_logits, val_set.labels)
    model_cpu = model.cpu()
    summary: dict[str, Any] = {
        "model": cfg.model.name,
        "model_args": cfg.model.args,
        "params": count_params(model_cpu),
        "macs_per_image": count_macs(model_cpu, ckpt["in_chans"], ckpt["img_size"]),
        "epochs": len(history),
        "best_epoch": ckpt["metrics"]["epoch"],
        "checkpoint_metric": cfg.train.checkpoint_metric,
        "stopped_early": stopped_early,
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "data_seconds": round(data_seconds, 2),
        "total_seconds": round(seconds, 2),
        "val_accuracy": val_acc,
        "val_log_loss": val_loss,
        "temperature": calibration.temperature,
        "calibration": calibration.to_json(),
        "checkpoint": best_path.name,
        "classes": val_set.classes,
        "augment_enabled": cfg.augment.enabled,
        "extra_training_images": extra_training_images,
        **({"negatives": negatives} if negatives else {}),
        "seed": cfg.seed,
        "processes": distributed.world().size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "digitkit": __version__,
        "python": platform.python_version(),
    }
    if cfg.train.plots:
        from digitkit import plots  # matplotlib: imported only when drawing

        plots.save_history(history, run_dir / "history.png", title=f"{cfg.model.name} ({run_dir.name})",
                           checkpoint_epoch=summary["best_epoch"])  # fmt: skip
    if test_set is not None:
        model.to(device=device, memory_format=fmt)
        test_logits = logits(test_set.images)
        test_loss, test_acc = loss_and_accuracy(test_logits, test_set.labels)
        test_preds = test_logits.argmax(1)
        cm = confusion_matrix(test_set.labels, test_preds, test_set.num_classes)
        summary.update(test_accuracy=test_acc, test_log_loss=test_loss,
                       test_errors=int((test_preds != test_set.labels).sum()))  # fmt: skip
        if cfg.train.plots:
            from digitkit import plots

            plots.save_confusion(cm.numpy(), test_set.classes, run_dir / "confusion.png",
                                 title=f"{cfg.model.name} ({run_dir.name}): test set")  # fmt: skip
    if cfg.train.tta_shift_px:
        summary["tta"] = _tta_figures(model, cfg, device, val_set, test_set)
    summary["finish_seconds"] = round(time.perf_counter() - finish_started, 2)
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return {"run_dir": str(run_dir), "finished": True, **summary}


def _tta_figures(model: torch.nn.Module, cfg: Config, device: torch.device, val_set: data.Dataset,
                 test_set: data.Dataset | None) -> dict[str, Any]:  # fmt: skip
    """Validation and test accuracy with shift TTA (train.tta_shift_px): summary.json's `tta`."""
    px = cfg.train.tta_shift_px
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    out: dict[str, Any] = {"shift_px": px, "views": 5}
    for name, ds in (("val", val_set), ("test", test_set)):
        if ds is not None and len(ds):
            probs = predict_probs_shift_tta(model, ds.images, px, cfg.train.eval_batch_size, device,
                                            cfg.train.channels_last)  # fmt: skip
            out[f"{name}_accuracy"] = int((probs.argmax(1) == ds.labels).sum()) / len(ds)
    return out


def store_calibration(ckpt_path: Path, ckpt: dict[str, Any], val_logits: torch.Tensor | None,
                      val_labels: torch.Tensor) -> Any:  # fmt: skip
    """Fit the temperature on validation logits (N, K) and write it into the checkpoint (atomically, like every
    checkpoint write): `temperature` and the details under `calibration`. No validation images: T = 1, not fitted.
    Returns the calibration.Calibration."""
    from digitkit.calibration import calibrate, not_fitted

    if val_logits is None or not len(val_logits):
        cal = not_fitted("no validation split (data.val_fraction 0): the raw softmax, T = 1")
    else:
        cal = calibrate(val_logits, val_labels, f"validation split ({len(val_labels):,} images)")
    ckpt["temperature"] = cal.temperature
    ckpt["calibration"] = cal.to_json()
    checkpoint.save(ckpt_path, ckpt)
    return cal


def calibrate_run(path: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit the temperature of a finished run (its kept checkpoint) on the run's own validation split, rebuilt from
    its config and seed, and store it in the checkpoint and summary.json. For runs trained before calibration
    existed; new runs are calibrated when they finish. A run without a validation split is refused (ConfigError).

    The checkpoint's bytes change, so an ONNX export made before is stale: re-export it."""
    opened = open_model(path)
    ds, _ = evaluation_data(opened.cfg, "val", data_dir)
    ckpt = opened.ckpt
    if ds.num_classes != len(ckpt["classes"]) or tuple(ds.images.shape[1:]) != (
        ckpt["in_chans"], ckpt["img_size"], ckpt["img_size"]
    ):
        raise ConfigError(f"{path}: the model expects {len(ckpt['classes'])} classes of {ckpt['img_size']}x"
                          f"{ckpt['img_size']} images; the validation data has {ds.num_classes} classes of shape "
                          f"{tuple(ds.images.shape[1:])}; pass the matching --data-dir")  # fmt: skip
    val_logits = predict_logits(opened.model, ds.images, opened.cfg.train.eval_batch_size)
    cal = store_calibration(opened.checkpoint_path, ckpt, val_logits, ds.labels)
    summary_path = opened.run_dir / "summary.json" if opened.run_dir is not None else None
    if summary_path is not None and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("checkpoint") == opened.checkpoint_path.name:
            summary.update(temperature=cal.temperature, calibration=cal.to_json())
            atomic_write_bytes(summary_path, (json.dumps(summary, indent=2) + "\n").encode())
    return {"run_dir": str(opened.run_dir or ""), "checkpoint": str(opened.checkpoint_path), **cal.to_json()}


def resolve_run(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such run folder; runs are in runs/ (runs/latest is the newest)")
    return path.resolve()


@dataclass
class Opened:
    """A trained model ready to use, from a run folder or a checkpoint file."""

    checkpoint_path: Path
    run_dir: Path | None
    """The run folder when there is one (a checkpoint inside a run folder counts)."""
    ckpt: dict[str, Any]
    model: Any
    cfg: Config
    history: list[dict[str, float]]
    """metrics.csv rows when the run folder has them, else []."""


def open_model(path: str | Path) -> Opened:
    """Load a run folder (its best checkpoint) or a checkpoint file; anything else is a DataError saying which."""
    from digitkit.train import read_metrics

    ckpt_path = checkpoint.resolve(path)
    ckpt_path = ckpt_path.resolve()  # through runs/latest to the real run folder, whose name the reports show
    ckpt = checkpoint.load(ckpt_path)
    model = checkpoint.model_from_checkpoint(ckpt)
    try:
        cfg = config.from_dict(ckpt.get("config") or {})
    except ConfigError as e:
        raise DataError(f"{ckpt_path}: the config stored in the checkpoint is not valid here ({e})") from None
    run_dir = ckpt_path.parent if (ckpt_path.parent / "config.yaml").is_file() else None
    history = []
    if run_dir is not None and (run_dir / "metrics.csv").is_file():
        history = read_metrics(run_dir / "metrics.csv")
    return Opened(ckpt_path, run_dir, ckpt, model, cfg, history)


def checkpoint_sha256(path: Path) -> str:
    from digitkit.idx import sha256

    return sha256(path.read_bytes())


MNIST_TEST_SLICES = {
    # The MNIST documentation: the first 5,000 test images come from NIST's SD-3 (Census Bureau employees), the
    # last 5,000 from SD-1 (high-school students); "the first 5000 are cleaner and easier than the last 5000".
    "first 5,000 (SD-3 writers)": (0, 5000),
    "last 5,000 (SD-1 writers)": (5000, 10000),
}


def evaluation_data(cfg: Config, split: str, data_dir: str | Path | None = None) -> tuple[data.Dataset, dict]:
    """The data set `digitkit evaluate` measures on and its named slices.

    split "test": the sealed test files (report only; nothing is chosen on them). split "val": the run's own
    validation hold-out, recomputed from its seed and val_fraction, so it is exactly what picked the checkpoint.
    """
    folder = Path(data_dir) if data_dir is not None else Path(cfg.data.dir)
    if split == "test":
        ds = prepared(data.load_split(folder, "test", verify=cfg.data.verify), cfg)
        slices = {}
        if len(ds) == 10_000 and ds.num_classes == 10:
            slices = {k: torch.arange(a, b) for k, (a, b) in MNIST_TEST_SLICES.items()}
        return ds, slices
    if split == "val":
        if not cfg.has_validation:
            raise ConfigError("no validation images: this model trained on every training image (data.val_fraction "
                              "0), so it has no hold-out; measure it on the test set, or use a run trained with a "
                              "hold-out")  # fmt: skip
        full = prepared(data.load_split(folder, "train", verify=cfg.data.verify), cfg)
        _, val_idx = data.stratified_split(full.labels, cfg.data.val_fraction, cfg.split_seed)
        return full.subset(val_idx), {}
    raise ConfigError(f"split {split!r}: expected test or val")
