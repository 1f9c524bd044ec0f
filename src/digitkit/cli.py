"""The `digitkit` command: each subcommand is one plain function; errors print as one line, not a traceback."""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from digitkit import __version__
from digitkit.errors import ConfigError, DataError, DigitkitError

DEFAULT_DATA = "data/mnist"


# ---------------------------------------------------------------------------------------------- train
def format_seconds(seconds: float) -> str:
    """4:05, or 1:02:03 past an hour."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class CommandClock:
    """The ETA of a command that trains several runs (cv folds, compare entries), shared by their reporters.

    Runs are counted from their labels ("fold 2/5", "cnn1 seed 0 (4/15)"); runs that never report (a comparison
    reuses finished runs) are the ones skipped below the highest index seen. The rate is epochs finished per
    wall-clock second, so folds trained in parallel count at the speed they really go."""

    def __init__(self, extra_runs: int = 0):
        self.started, self.extra_runs = time.perf_counter(), extra_runs
        self.epochs_done, self.epochs_left, self.epochs_per_run = 0, {}, 0
        self.runs_total: int | None = None
        self.max_index = 0

    def update(self, label: str, epoch: int, epochs: int) -> None:
        self.epochs_done += 1
        self.epochs_left[label] = epochs - epoch
        self.epochs_per_run = epochs
        m = re.findall(r"(\d+)/(\d+)", label)
        if m:
            index, total = map(int, m[-1])
            self.max_index, self.runs_total = max(self.max_index, index), total + self.extra_runs

    def eta(self) -> float | None:
        """Seconds until every run is done, or None while the number of runs is unknown."""
        if self.runs_total is None or not self.epochs_done:
            return None
        counted = [k for k in self.epochs_left if re.search(r"\d+/\d+", k)]
        skipped = max(0, self.max_index - len(counted))
        unseen = max(0, self.runs_total - len(self.epochs_left) - skipped)
        left = sum(self.epochs_left.values()) + unseen * self.epochs_per_run
        return (time.perf_counter() - self.started) / self.epochs_done * left


class ConsoleReporter:
    """One tqdm bar for the whole run (its ETA is the run's end, not the epoch's), and a line per epoch with the
    run's ETA (and, with a CommandClock, the whole command's), so logs without a bar show it too."""

    def __init__(self, stream: Any = None, bar: bool = True, label: str = "", clock: CommandClock | None = None):
        self.stream, self.show_bar, self.bar = stream or sys.stderr, bar, None
        self.label, self.clock = label, clock
        self.started: float | None = None
        self.epochs, self.epochs_this_call, self.done = 0, 0, 0

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.epochs = epochs
        desc = (f"[{self.label}] " if self.label else "") + f"epoch {epoch}/{epochs}"
        if self.show_bar and self.bar is None:
            from tqdm import tqdm

            # smoothing=0: the rate is batches over wall-clock time since the start, validation included, so the
            # ETA covers what the remaining epochs will really take.
            self.bar = tqdm(total=epochs * batches, initial=(epoch - 1) * batches, desc=desc, unit="batch",
                            leave=False, file=self.stream, dynamic_ncols=True, smoothing=0)  # fmt: skip
        elif self.bar is not None:
            self.bar.set_description(desc, refresh=False)
        self.done = 0

    def batch(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.2f}%", img_s=f"{images_per_s:,.0f}")
        self.done = done

    def epoch_end(self, row: dict[str, float]) -> None:
        self.epochs_this_call += 1
        epoch, epochs = int(row["epoch"]), self.epochs
        line = (
            (f"[{self.label}] " if self.label else "")
            + f"epoch {epoch:3d}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:6.2f}%  lr {row['lr']:.2e}  "
            f"{row['seconds']:5.1f}s  {row['images_per_s']:,.0f} img/s"
        )
        etas = []
        if epochs and epoch < epochs and self.started is not None:
            per_epoch = (time.perf_counter() - self.started) / self.epochs_this_call
            etas.append(f"ETA {format_seconds(per_epoch * (epochs - epoch))}" + (" this run" if self.clock else ""))
        if self.clock is not None:
            self.clock.update(self.label, epoch, epochs or epoch)
            left = self.clock.eta()
            if left:
                etas.append(f"{format_seconds(left)} all runs")
        if etas:
            line += "  " + ", ".join(etas)
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            if epochs and epoch >= epochs:
                self.close()
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StageProgress:
    """A bar over a long command's stages (digitkit evaluate: clean, corruptions, attacks), advanced by work done
    rather than stages counted, so its ETA holds when one stage costs more than the rest together."""

    def __init__(self, label: str, stream: Any = None):
        self.label, self.stream, self.bar = label, stream or sys.stderr, None

    def __call__(self, stage: str, done: float, total: float) -> None:
        from tqdm import tqdm

        desc = f"{self.label}: {stage}"
        if self.bar is None:
            self.bar = tqdm(total=total, desc=desc, leave=False, file=self.stream, dynamic_ncols=True, smoothing=0,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")  # fmt: skip
        self.bar.set_description_str(desc, refresh=False)
        self.bar.update(done - self.bar.n)
        self.bar.refresh()  # stages are few and coarse: show each one, however quickly it passes
        if stage == "done":
            self.bar.close()


def cmd_train(args: argparse.Namespace) -> int:
    from digitkit import config, runs
    from digitkit.train import SilentReporter

    if args.resume:
        if args.config or args.set or args.extra_data:
            raise ConfigError("--resume continues a run with its own saved config; drop --config, --set and "
                              "--extra-data")  # fmt: skip
        run_dir = runs.resolve_run(args.resume)
        cfg = config.load(run_dir / "config.yaml")
    else:
        overrides = list(args.set or [])
        if args.data_dir:
            overrides.append(f"data.dir={args.data_dir}")
        cfg = config.load(args.config, overrides)
        # Appended to the config (not a side channel), so the run's saved config.yaml reproduces it.
        cfg.data.extra_dirs = [*cfg.data.extra_dirs, *(args.extra_data or [])]
    reporter = SilentReporter() if args.quiet else ConsoleReporter(bar=sys.stderr.isatty() or args.progress)
    out = Path(args.out) if args.out else None
    root = Path(args.runs_root)
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        summary = runs.train_run(
            cfg, out=out, root=root, reporter=reporter,
            resume=run_dir if args.resume else None, stop_after_epochs=args.stop_after_epochs,
        )  # fmt: skip
    except KeyboardInterrupt:
        if isinstance(reporter, ConsoleReporter):
            reporter.close()
        interrupted_run(run_dir if args.resume else out or new_run_folder(root, before), cfg.train.epochs)
        return 130
    finally:
        if isinstance(reporter, ConsoleReporter):
            reporter.close()
    if args.json:
        print(json.dumps(summary))
    elif summary.get("finished"):
        print_summary(summary)
    else:
        print(f"stopped after epoch {summary['epochs']}: continue with --resume {summary['run_dir']}")
    return 0


def new_run_folder(root: Path, before: set[Path]) -> Path | None:
    """The run folder `digitkit train` made under `root` since `before` (a listing of root), if any."""
    made = [p for p in (root.iterdir() if root.is_dir() else ()) if p not in before and p.is_dir()]
    if len(made) > 1:  # another run started beside this one: runs/latest names ours
        latest = root / "latest"
        made = [p for p in made if latest.exists() and p.resolve() == latest.resolve()] or made
    return max(made, key=lambda p: p.stat().st_mtime) if made else None


def interrupted_run(run_dir: Path | None, epochs: int) -> None:
    """After Ctrl-C: which folder holds the last finished epoch and the command that continues it."""
    from digitkit import checkpoint
    from digitkit.train import LAST

    done = 0
    if run_dir is not None and (run_dir / LAST).is_file():
        try:
            done = int(checkpoint.load(run_dir / LAST)["fit_state"]["epoch"])
        except Exception:  # a last.pt from a crash mid-write: resuming would fail the same way
            done = 0
    if done:
        print(f"digitkit: interrupted. {run_dir} holds epoch {done} of {epochs} (the last one that finished); "
              f"continue it with:\n  digitkit train --resume {run_dir}", file=sys.stderr, flush=True)
    else:
        where = f" ({run_dir} has no finished epoch)" if run_dir is not None else ""
        print(f"digitkit: interrupted before the first epoch finished{where}: nothing to resume; run the same "
              "command again to start over", file=sys.stderr, flush=True)  # fmt: skip


def print_summary(s: dict[str, Any]) -> None:
    print(f"run            {s['run_dir']}")
    per = s.get("macs_per", "image")
    print(f"model          {s['model']}  ({s['params']:,} parameters, {s['macs_per_image'] / 1e6:.2f} M MACs/{per})")
    kept = "the last" if s.get("checkpoint_metric") == "last" else "best by validation"
    print(f"epochs         {s['epochs']} ({kept}: {s['best_epoch']}{', stopped early' if s['stopped_early'] else ''})")
    print(f"time           {s['train_seconds']:.1f} s training, {s['total_seconds']:.1f} s in all on {s['device']}")
    if s["val_accuracy"] is None:
        print("validation     none (data.val_fraction 0: every training image trained)")
    else:
        print(f"validation     {100 * s['val_accuracy']:.2f}%  (log loss {s['val_log_loss']:.4f})")
    print(f"test           {100 * s['test_accuracy']:.2f}%  "
          f"({s['test_errors']} errors, log loss {s['test_log_loss']:.4f})")  # fmt: skip
    if s.get("tta"):
        tta = s["tta"]
        figures = [f"{label} {100 * tta[f'{key}_accuracy']:.2f}%" for key, label in (("val", "validation"),
                   ("test", "test")) if f"{key}_accuracy" in tta]  # fmt: skip
        print(f"shift TTA      {', '.join(figures)}  ({tta['views']} views, {tta['shift_px']} px)")
    print(f"checkpoint     {s['checkpoint']}")


# ---------------------------------------------------------------------------------------------- data
def cmd_data_info(args: argparse.Namespace) -> int:
    from digitkit import data

    info: dict[str, Any] = {"data_dir": args.data_dir, "files": data.verify_dir(args.data_dir)}
    for split in ("train", "test"):
        ds = data.load_split(args.data_dir, split, verify=False)
        mean, std = data.pixel_stats(ds.images)
        info[split] = {
            "count": len(ds),
            "shape": list(ds.images.shape[1:]),
            "per_class": dict(zip(ds.classes, ds.class_counts(), strict=True)),
            "pixel_mean": round(mean, 4),
            "pixel_std": round(std, 4),
            "ink_fraction": round((ds.images > 127).float().mean().item(), 4),
        }
    info["classes"] = ds.classes
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"data folder {args.data_dir}: {len(info['classes'])} classes")
    for name, status in info["files"].items():
        print(f"  {name:36s} {status}")
    for split in ("train", "test"):
        s = info[split]
        print(f"{split}: {s['count']:,} images of {'x'.join(map(str, s['shape']))}, pixel mean {s['pixel_mean']}, "
              f"std {s['pixel_std']}, ink fraction {s['ink_fraction']}")  # fmt: skip
        for cls, n in s["per_class"].items():
            print(f"  {cls:>8s} {n:7,d}  {100 * n / s['count']:5.2f}%")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    import torch

    from digitkit import data, plots

    ds = data.load_split(args.data_dir, args.split, verify=False)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    # One row per class, so every class shows up however rare it is.
    for c in range(ds.num_classes):
        members = torch.nonzero(ds.labels == c).flatten()
        pick = members[torch.randperm(len(members), generator=g)[: args.per_class]]
        rows.append(ds.images[pick, 0])
    per_row = max((len(r) for r in rows), default=0)
    grid, labels = [], []
    for c, r in enumerate(rows):
        pad = torch.zeros(per_row - len(r), *ds.images.shape[2:], dtype=torch.uint8)
        grid.append(torch.cat([r, pad]))
        labels += [ds.classes[c]] * len(r) + [""] * (per_row - len(r))
    images = torch.cat(grid).numpy()
    path = plots.save_image_grid(images, Path(args.out), nrow=per_row, labels=labels)
    print(f"wrote {path}: {args.per_class} {args.split} images per class, {ds.num_classes} classes")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from digitkit import data

    for name, status in data.verify_dir(args.data_dir).items():
        print(f"{name:36s} {status}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from digitkit import download

    mirrors = tuple(args.mirror) if args.mirror else download.MNIST_MIRRORS
    cache = Path(args.cache_dir) if args.cache_dir else None
    dest = download.download_mnist(Path(args.out), mirrors=mirrors, cache_dir=cache, timeout_s=args.timeout)
    print(f"MNIST downloaded and verified into {dest}; use it with --data-dir {dest}")
    return 0


# ---------------------------------------------------------------------------------------------- augment
def cmd_augment_list(args: argparse.Namespace) -> int:
    from digitkit import augment

    for name in augment.list_recipes():
        cfg = augment.load_recipe(name)
        ops = [f"{op}(p={v['p']})" for op, v in augment.config_to_dict(cfg).items() if v["p"] > 0]
        print(f"{name:14s} {', '.join(ops) or 'identity'}")
    return 0


def cmd_augment_preview(args: argparse.Namespace) -> int:
    import torch

    from digitkit import augment, data, plots

    if args.config:
        return _preview_training_batch(args)
    if not args.recipe:
        raise ConfigError("augment preview: give --recipe NAME (see `digitkit augment list`) or --config C")
    cfg = augment.load_recipe(args.recipe)
    ds = data.load_split(args.data_dir or DEFAULT_DATA, "train", verify=False)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(ds), generator=g)[: args.n]
    originals = ds.images[pick]
    x = originals.float().div(255).repeat_interleave(args.copies, dim=0)
    out = augment.augment_batch(x, cfg, g).mul(255).round().clamp(0, 255).to(torch.uint8)
    augmented = out.reshape(args.n, args.copies, *ds.images.shape[2:]).numpy()
    path = plots.save_pairs_grid(originals[:, 0].numpy(), augmented, Path(args.out), title=f"recipe: {args.recipe}")
    print(f"wrote {path}: {args.n} originals (left) beside {args.copies} augmented copies each")
    return 0


def _preview_training_batch(args: argparse.Namespace) -> int:
    """The first batch of epoch 1 exactly as `digitkit train --config C` sees it."""
    import torch

    from digitkit import config, plots, runs
    from digitkit.train import training_batch

    cfg = config.load(args.config, args.set)
    if args.data_dir:
        cfg.data.dir = args.data_dir
    train_set, _, _ = runs.load_data(cfg)
    x, y = training_batch(cfg, train_set, epoch=1, step=0)
    n = min(len(x), args.n * args.copies)
    images = x[:n].mul(255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    labels = [train_set.classes[int(c)] for c in y[:n]]
    path = plots.save_image_grid(images, Path(args.out), nrow=args.copies, labels=labels)
    aug = "on" if cfg.augment.enabled else "off"
    print(f"wrote {path}: the first {n} images of epoch 1's first batch as training sees them "
          f"(seed {cfg.seed}, batch size {cfg.train.batch_size}, augmentation {aug})")
    return 0


def cmd_augment_check(args: argparse.Namespace) -> int:
    import torch

    from digitkit import augment, legibility, runs

    recipe = augment.load_recipe(args.recipe)
    if not recipe.enabled:
        raise ConfigError(f"recipe {args.recipe!r} has no op with p > 0: nothing to check")
    opened = runs.open_model(args.model)
    if not opened.cfg.has_validation:
        raise ConfigError(f"{args.model}: augment check reads the model's validation images (never the test set), "
                          "and this model has none: it trained on every training image (data.val_fraction 0); "
                          "check the recipe with a model trained with a hold-out")  # fmt: skip
    ds, _ = runs.evaluation_data(opened.cfg, "val", args.data_dir)  # validation images: never the test set
    n = min(args.n, len(ds))
    ds = ds.subset(torch.arange(n))
    result = legibility.check_recipe(opened.model, ds.images, ds.labels, recipe, seed=args.seed,
                                     warn_drop_pp=args.warn_drop)  # fmt: skip
    trained_with = [op for op in legibility.active_ops(recipe) if op in legibility.active_ops(opened.cfg.augment)]
    if trained_with:
        result["warnings"].insert(0, f"the model trained with {', '.join(trained_with)} already, so it reads those "
                                     "ops better than a fresh reader would; check with a model trained without "
                                     "augmentation (augment.recipe: none)")  # fmt: skip
    if args.json:
        print(json.dumps({"recipe": args.recipe, "model": str(opened.checkpoint_path), **result}))
        return 0
    print(f"recipe {args.recipe} read by {opened.checkpoint_path} on {result['n']:,} validation images: "
          f"clean {100 * result['clean_accuracy']:.2f}%, whole recipe {100 * result['recipe_accuracy']:.2f}%")
    print(f"  {'op':<10} " + " ".join(f"{k:>7g}x" for k in legibility.STRENGTHS))
    for op in legibility.active_ops(recipe):
        accs = [r["accuracy"] for r in result["rows"] if r["op"] == op]
        print(f"  {op:<10} " + " ".join(f"{100 * a:7.2f}%" for a in accs))
    for w in result["warnings"]:
        print(f"  warning: {w}")
    if not result["warnings"]:
        print(f"  no op drops accuracy more than {args.warn_drop:g} pp even at 2x: the recipe keeps digits legible")
    return 0


def cmd_augment_expand(args: argparse.Namespace) -> int:
    from digitkit import augment, data

    cfg = augment.load_recipe(args.recipe)
    train = data.load_split(args.data_dir, "train", verify=True)
    test = data.load_split(args.data_dir, "test", verify=True)
    images, labels = augment.expand(train.images, train.labels, cfg, args.factor, seed=args.seed)
    out = Path(args.out)
    data.save_split(data.Dataset(images, labels, train.classes, str(out)), out, "train")
    # The test set is copied unchanged so the folder works as a --data-dir; it is never augmented.
    data.save_split(test, out, "test")
    src_classes = Path(args.data_dir) / data.CLASSES_FILE
    if src_classes.is_file():
        (out / data.CLASSES_FILE).write_text(src_classes.read_text())
    data.write_sums(out)
    print(f"wrote {out}: {len(labels):,} training images ({len(train):,} originals + {args.factor - 1} augmented "
          f"copies with recipe {args.recipe}), test set unchanged; train on it with --data-dir {out}")  # fmt: skip
    return 0


# ---------------------------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from digitkit.models import (
        count_macs,
        count_params,
        create_model,
        list_models,
        model_description,
        model_options,
    )

    rows = []
    for name in list_models():
        model = create_model(name)
        rows.append({"name": name, "task": "classify", "params": count_params(model), "macs": count_macs(model),
                     "options": model_options(name), "description": model_description(name)})  # fmt: skip
    for name in list_models("sequence"):  # row readers: counted on a 32 x 128 row (about five digits)
        model = create_model(name, img_size=32)
        rows.append({"name": name, "task": "sequence", "params": count_params(model),
                     "macs": count_macs(model, 1, 32, 128), "options": model_options(name),
                     "description": model_description(name)})  # fmt: skip
    if args.json:
        print(json.dumps(rows, default=list))
        return 0
    print(f"{'model':12s} {'params':>10s} {'MACs/image':>12s}  description")
    for r in rows:
        note = " (MACs per 32x128 row; task: sequence)" if r["task"] == "sequence" else ""
        print(f"{r['name']:12s} {r['params']:>10,d} {r['macs']:>12,d}  {r['description']}{note}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="digitkit", description="Train handwritten-digit recognizers.")
    p.add_argument("--version", action="version", version=f"digitkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--config", help="YAML config (configs/default.yaml, configs/fast.yaml, ...)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-3")
    t.add_argument("--data-dir", help="folder with the four IDX files (default: the config's data.dir)")
    t.add_argument("--extra-data", action="append", metavar="DIR",
                   help="extra IDX training set (train-* files, e.g. from `digitkit audit export --format idx`) added "
                   "to the training portion only; repeatable; appended to data.extra_dirs")  # fmt: skip
    t.add_argument("--out", help="run folder (default: runs/<time>-<model>, with runs/latest pointing to it)")
    t.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last epoch checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    t.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.add_argument("--stop-after-epochs", type=int, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("data", help="inspect, verify, preview or download datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, func, helptext in (
        ("info", cmd_data_info, "counts per class and pixel statistics"),
        ("verify", cmd_data_verify, "check every file's structure and checksum"),
        ("preview", cmd_data_preview, "a grid of images per class"),
    ):
        a = dsub.add_parser(name, help=helptext)
        a.add_argument("--data-dir", default=DEFAULT_DATA)
        a.set_defaults(func=func)
        if name == "info":
            a.add_argument("--json", action="store_true")
        if name == "preview":
            a.add_argument("--out", required=True, help="PNG file to write")
            a.add_argument("--split", choices=("train", "test"), default="train")
            a.add_argument("--per-class", type=_positive, default=10)
            a.add_argument("--seed", type=int, default=0)
    dl = dsub.add_parser("download", help="download MNIST from the public mirrors, verified by checksum")
    dl.add_argument("--out", required=True, help="folder to write the four files and SHA256SUMS.raw into")
    dl.add_argument("--mirror", action="append", help="base URL to try (repeatable); default: the known mirrors")
    dl.add_argument("--cache-dir", help="download cache (default: $DIGITKIT_CACHE or ~/.cache/digitkit)")
    dl.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    dl.set_defaults(func=cmd_data_download)

    a = sub.add_parser("augment", help="list, preview or apply augmentation recipes")
    asub = a.add_subparsers(dest="augment_command", required=True, metavar="ACTION")
    asub.add_parser("list", help="the shipped recipes").set_defaults(func=cmd_augment_list)
    pv = asub.add_parser("preview", help="originals beside augmented copies, to check digits stay legible")
    pv.add_argument("--recipe", help="recipe name or YAML file")
    pv.add_argument("--config", help="instead of --recipe: show epoch 1's first batch exactly as training sees it")
    pv.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (with --config)")
    pv.add_argument("--out", required=True, help="PNG file to write")
    pv.add_argument("--n", type=_positive, default=8, help="originals")
    pv.add_argument("--copies", type=_positive, default=8, help="augmented copies of each")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--data-dir", help=f"training data (default: {DEFAULT_DATA}, or the config's data.dir)")
    pv.set_defaults(func=cmd_augment_preview)
    ck = asub.add_parser("check", help="warn where a recipe turns digits into something else")
    ck.add_argument("--recipe", required=True, help="recipe name or YAML file")
    ck.add_argument("--model", required=True, help="run or checkpoint trained WITHOUT this recipe")
    ck.add_argument("--n", type=_positive, default=5000, help="validation images to use (default 5000)")
    ck.add_argument("--warn-drop", type=float, default=5.0, help="warn below clean accuracy minus this many pp")
    ck.add_argument("--data-dir", help="training data (default: the model's data.dir)")
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument("--json", action="store_true")
    ck.set_defaults(func=cmd_augment_check)
    ex = asub.add_parser("expand", help="write an expanded training set as IDX files (offline augmentation)")
    ex.add_argument("--recipe", required=True, help="recipe name or YAML file")
    ex.add_argument("--factor", type=_positive, required=True, help="output size as a multiple of the input")
    ex.add_argument("--out", required=True, help="folder to write; use it later as --data-dir")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--data-dir", default=DEFAULT_DATA)
    ex.set_defaults(func=cmd_augment_expand)

    ev = sub.add_parser("evaluate", help="metrics, errors, calibration, robustness and a report for a run",
                        description="Evaluate a run folder or checkpoint; writes RUN/eval/<split>/ with report.html.")
    ev.add_argument("run", metavar="RUN", help="run folder (its best checkpoint) or a checkpoint file")
    ev.add_argument("--split", choices=("test", "val"), default="test",
                    help="test: the sealed test set (report only); val: the run's validation hold-out")  # fmt: skip
    ev.add_argument("--data-dir", help="folder with the IDX files (default: the run's data.dir)")
    ev.add_argument("--out", help="output folder (default: RUN/eval/<split>)")
    ev.add_argument("--quick", action="store_true", help="clean metrics only: no corruptions, augmentation, attacks")
    ev.add_argument("--no-corruptions", action="store_true", help="skip the corruption suite")
    ev.add_argument("--no-adversarial", action="store_true", help="skip FGSM/PGD")
    ev.add_argument("--adversarial-n", type=int, default=500, help="images attacked (default 500)")
    ev.add_argument("--defence-sigma", type=float,
                    help="noise defence sigma to compare against when the run has none (default 0.05)")
    ev.add_argument("--seed", type=int, default=0, help="seeds corrupted copies, attacks and defence noise")
    ev.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ev.add_argument("--json", action="store_true", help="print every figure as one JSON object")
    ev.add_argument("--progress", action="store_true", help="show the progress bar (with ETA) even when not on a "
                    "terminal")  # fmt: skip
    ev.set_defaults(func=cmd_evaluate)
    ca = sub.add_parser("calibrate", help="fit a run's temperature on its validation split and store it",
                        description="Fit the temperature T that makes the shown confidence match accuracy "
                        "(softmax(logits / T), minimising the log loss on the run's validation split; never the test "
                        "set) and store it in the run's checkpoint. New runs are calibrated when training ends; "
                        "this is for older runs. Re-export ONNX files afterwards.")  # fmt: skip
    ca.add_argument("run", metavar="RUN", help="run folder (its best checkpoint) or a checkpoint file")
    ca.add_argument("--data-dir", help="folder with the IDX files (default: the run's data.dir)")
    ca.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ca.set_defaults(func=cmd_calibrate)

    xp = sub.add_parser("explain", help="saliency, SmoothGrad, integrated gradients or Grad-CAM for one image")
    xp.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    xp.add_argument("--image", help="an image file (photo, scan, canvas), preprocessed as `digitkit predict` does")
    xp.add_argument("--index", type=int, help="an image of the data set by index (see --split)")
    xp.add_argument("--split", choices=("test", "val", "train"), default="test", help="data set for --index")
    xp.add_argument("--method", choices=("all", "saliency", "smoothgrad", "integrated-gradients", "gradcam"),
                    default="all", help="attribution method (default: all that apply)")  # fmt: skip
    xp.add_argument("--out", help="PNG to write (default: RUN/explain/<name>.png)")
    xp.add_argument("--data-dir", help="data folder for --index (default: the run's data.dir)")
    xp.add_argument("--seed", type=int, default=0, help="seeds SmoothGrad's noise")
    xp.add_argument("--json", action="store_true")
    xp.set_defaults(func=cmd_explain)

    c = sub.add_parser("cv", help="stratified k-fold cross-validation on the training set (mean +- std)")
    c.add_argument("--config", help="training config (default: built-in defaults)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    c.add_argument("--folds", type=_positive, default=5, help="K (default 5; 10 is the other usual choice)")
    c.add_argument("--workers", type=_positive, default=1, help="folds trained in parallel processes")
    c.add_argument("--final", action="store_true", help="then train one model on the training set as `train` does")
    c.add_argument("--expand", type=_positive, default=1, metavar="F",
                   help="offline augmentation: each fold's training part becomes its originals plus F-1 copies "
                        "augmented once with the config's recipe, trained with no further augmentation")
    c.add_argument("--data-dir", help="folder with the IDX files (default: the config's data.dir)")
    c.add_argument("--out", help="output folder (default: runs/<time>-cv<K>-<model>)")
    c.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cv)

    cmp = sub.add_parser("compare", help="train (or reuse) several configs over seeds and compare them")
    cmp.add_argument("specs", nargs="+", metavar="CONFIG", help="training configs or comparison files")
    cmp.add_argument("--seeds", type=_positive, help="seeds per entry (default: the file's seeds:, else 3)")
    cmp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override applied to every entry")
    cmp.add_argument("--data-dir", help="folder with the IDX files (default: each config's data.dir)")
    cmp.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    cmp.add_argument("--out", help="output folder (default: runs/compare-<time>)")
    cmp.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    cmp.add_argument("--quiet", action="store_true")
    cmp.add_argument("--progress", action="store_true")
    cmp.add_argument("--json", action="store_true")
    cmp.set_defaults(func=cmd_compare)

    pr = sub.add_parser("predict", help="classify image files (photos, scans, canvases) or folders of them")
    pr.add_argument("--model", required=True, help="run folder or checkpoint file (or an exported .onnx file)")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    pr.add_argument("--engine", choices=("torch", "onnx"), help="torch (default), or onnx: the run's "
                    "export/model.onnx (or --model FILE.onnx) through ONNX Runtime")  # fmt: skip
    pr.add_argument("--json", action="store_true", help="one JSON object per line")
    pr.add_argument("--top-k", type=_positive, default=3, help="most likely digits to list (default 3)")
    pr.add_argument("--show-preprocessed", metavar="DIR", help="write the 28x28 images the model saw")
    pr.add_argument("--reject-below", type=float, help="override inference.reject_below_confidence")
    pr.add_argument("--reject-below-score", type=float, help="override inference.reject_below_digit_score (0 = off)")
    pr.add_argument("--noise-defence", type=float, help="override inference.noise_defence_sigma (0 = off)")
    pr.add_argument("--record", action="store_true", help="with --json: include what preprocessing did")
    pr.set_defaults(func=cmd_predict)

    rd = sub.add_parser("read", help="read rows of handwritten digits (an amount, a postcode, a form field)",
                        description="Read each image as one row of digits. A row reader (trained with "
                        "configs/read.yaml) reads the whole row at once, touching digits included; a single-digit "
                        "model reads by cutting the row into digits first (--reader segment).")  # fmt: skip
    rd.add_argument("--model", required=True, help="run folder or checkpoint: a row reader, or a digit classifier "
                    "for --reader segment")  # fmt: skip
    rd.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    rd.add_argument("--reader", choices=("sequence", "segment"), help="sequence (the default for a row reader) or "
                    "segment (cut into digits, classify each; the default for a digit classifier)")  # fmt: skip
    rd.add_argument("--pattern", help="regular expression the whole string must match (the row reader's beam search "
                    "keeps only strings that can match); exit code 1 if a row does not")  # fmt: skip
    rd.add_argument("--page", action="store_true", help="row reader: each image is a page (a form, a check, a label) "
                    "with several fields; each digit field is found, boxed and read")  # fmt: skip
    rd.add_argument("--field", action="append", metavar="NAME=REGEX", help="row reader, implies --page: find the "
                    "field whose reading matches REGEX and report it as NAME (repeat for more fields); exit code 1 "
                    "when one is missing")  # fmt: skip
    rd.add_argument("--beam-width", type=_positive, default=8, help="row reader: prefixes kept per frame (default 8)")
    rd.add_argument("--top-k", type=_positive, default=3, help="segment reader: most likely digits to list")
    rd.add_argument("--reject-below", type=float, help="override inference.reject_below_row_confidence (row reader) "
                    "or inference.reject_below_confidence (segment reader)")  # fmt: skip
    rd.add_argument("--reject-below-score", type=float, help="segment reader: override "
                    "inference.reject_below_digit_score (0 = off)")  # fmt: skip
    rd.add_argument("--json", action="store_true", help="one JSON object per line")
    rd.set_defaults(func=cmd_read)

    en = sub.add_parser("ensemble", help="combine runs: mean of their probabilities, measured on the test set")
    en.add_argument("runs", nargs="+", metavar="RUN", help="run folders or checkpoints (at least two)")
    en.add_argument("--weights", choices=("equal", "val"), default="equal",
                    help="equal, or proportional to each run's validation accuracy")  # fmt: skip
    en.add_argument("--shifts", type=_positive, metavar="PIXELS",
                    help="test-time augmentation: each member's mean over the image and its copies shifted by PIXELS "
                         "left, right, up and down (default: off)")  # fmt: skip
    en.add_argument("--data-dir", help="folder with the IDX files (default: the first run's data.dir)")
    en.add_argument("--out", help="JSON file to write (default: runs/ensemble-<time>.json)")
    en.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    en.add_argument("--json", action="store_true")
    en.set_defaults(func=cmd_ensemble)

    m = sub.add_parser("models", help="registered models with parameters and multiply-adds per image")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    # --- serve parser (anchor: owned by the serving work)
    sv = sub.add_parser("serve", help="REST API and drawing page for a trained model")
    sv.add_argument("--model", help="run folder or checkpoint file (default runs/latest)")
    sv.add_argument("--reader", metavar="RUN", help="run folder or checkpoint of a row reader (trained with "
                    "configs/read.yaml) to answer /v1/read; default: the model reads rows cut into digits")  # fmt: skip
    sv.add_argument("--settings", metavar="YAML", help="serving settings file (limits:, drift:, cache_size: ...)")
    sv.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, help="port (default 8000)")
    sv.add_argument("--workers", type=_positive, help="processes (default 1); they share the audit log and /metrics")
    sv.add_argument("--threads", type=_positive, help="torch threads per worker (default 1)")
    sv.add_argument("--audit-db", metavar="URL", help="SQLite file or SQLAlchemy URL (sqlite:///..., "
                    "postgresql://user@host/db); default: serve/audit.db in the run folder")  # fmt: skip
    sv.add_argument("--cache-size", type=int, help="answers cached by input hash (default 4096, 0 = off)")
    sv.add_argument("--api-key-file", metavar="FILE", help="file holding the API key for prediction routes")
    sv.add_argument("--admin-token-file", metavar="FILE", help="file holding the admin token (reload, audit export)")
    sv.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    sv.add_argument("--engine", choices=("torch", "onnx"), help="torch (default) or onnx: the run's export/model.onnx "
                    "through ONNX Runtime (write it with `digitkit export RUN`)")  # fmt: skip
    sv.set_defaults(func=cmd_serve)

    # --- audit parser (anchor: owned by the audit-log work)
    au = sub.add_parser("audit", help="statistics, exports and pruning of the serving audit log")
    ausub = au.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    aus = ausub.add_parser("stats", help="totals, rejections, latency percentiles, labelled accuracy")
    aus.add_argument("--db", required=True, metavar="URL", help="audit database (file path or URL)")
    aus.add_argument("--since", metavar="WHEN", help="only predictions since WHEN: ISO time (2024-05-01, "
                     "2024-05-01T12:00, local unless it has an offset), unix seconds, or an age: 30m, 24h, 7d")
    aus.add_argument("--json", action="store_true", help="print one JSON object")
    aus.set_defaults(func=cmd_audit_stats)
    aue = ausub.add_parser("export", help="the log as CSV or JSON lines, or labelled images as an IDX training set")
    aue.add_argument("--db", required=True, metavar="URL", help="audit database (file path or URL)")
    aue.add_argument("--format", required=True, choices=("csv", "jsonl", "idx"))
    aue.add_argument("--labelled", action="store_true", help="only predictions with a label from feedback")
    aue.add_argument("--out", metavar="FILE_OR_DIR", help="output file (csv, jsonl; default or '-': stdout) or "
                     "folder (idx, required)")  # fmt: skip
    aue.set_defaults(func=cmd_audit_export)
    aup = ausub.add_parser("prune", help="delete old predictions, by age and/or beyond a row count (labelled rows "
                           "kept longest)", epilog=AUDIT_PRUNE_EPILOG)  # fmt: skip
    aup.add_argument("--db", required=True, metavar="URL", help="audit database (file path or URL)")
    aup.add_argument("--max-age", metavar="AGE", help="delete predictions older than AGE, labelled or not: an age "
                     "such as 90m, 24h, 30d")  # fmt: skip
    aup.add_argument("--max-rows", type=_positive, metavar="N", help="then keep at most N predictions: unlabelled "
                     "ones are deleted first, oldest first; labelled ones only when they alone exceed N")  # fmt: skip
    aup.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    aup.add_argument("--json", action="store_true", help="print one JSON object")
    aup.set_defaults(func=cmd_audit_prune)
    # --- negatives parser (anchor: owned by the real-world rejection work)
    ng = sub.add_parser("negatives", help="non-digits for training the rejection (outlier exposure)")
    ngsub = ng.add_subparsers(dest="negatives_command", required=True, metavar="ACTION")
    ngb = ngsub.add_parser("build", help="draw non-digits with digitkit.synth, preprocess them, write an IDX folder")
    ngb.add_argument("--out", required=True, metavar="DIR", help="folder to write (data/negatives ships one)")
    ngb.add_argument("--n", type=_positive, default=8000, help="non-digits to draw (default 8000); the ones "
                     "preprocessing refuses (blank pages) are left out")  # fmt: skip
    ngb.add_argument("--seed", type=int, default=0, help="seed within the training negatives' own stream")
    ngb.add_argument("--workers", type=_positive, default=1, help="processes (default 1)")
    ngb.add_argument("--data-dir", default="data/mnist", metavar="DIR",
                     help="MNIST folder for partial and doubled digits (training images only)")  # fmt: skip
    ngb.set_defaults(func=cmd_negatives_build)
    # --- export parser (anchor: owned by the export work)
    xo = sub.add_parser("export", help="export a run to ONNX (fp32 or int8), checked against PyTorch on the test set")
    xo.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    xo.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (the only format so far)")
    xo.add_argument("--int8", action="store_true", help="static int8 quantization calibrated on training images")
    xo.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    xo.add_argument("--out", metavar="FILE", help="default RUN/export/model.onnx (model.int8.onnx with --int8)")
    xo.add_argument("--calibration-images", type=_positive, default=1000, metavar="N",
                    help="training images for int8 calibration (default 1000; never test images)")  # fmt: skip
    xo.add_argument("--max-int8-drop", type=float, default=0.5, metavar="POINTS",
                    help="fail if int8 test accuracy is more than this many points below fp32 (default 0.5)")
    xo.add_argument("--data-dir", help="folder with the IDX files (default: the run's data.dir)")
    xo.add_argument("--threads", type=_positive, default=2, help="threads for the batched speed figure (default 2)")
    xo.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    xo.add_argument("--json", action="store_true", help="print the report as one JSON object")
    xo.set_defaults(func=cmd_export)
    # --- compression and card parser (anchor: owned by the compression work)
    pn = sub.add_parser("prune", help="prune a run (magnitude or channels), fine-tune it; accuracy against sparsity")
    pn.add_argument("run", metavar="RUN", help="run folder or checkpoint to prune")
    pn.add_argument("--sparsity", required=True, help="fraction(s) to prune, comma-separated: 0.5 or 0.5,0.7,0.9")
    pn.add_argument("--structured", action="store_true",
                    help="remove that share of each conv layer's filters (a narrower, faster model; cnn1/2/3 and "
                    "cnn3_slim) instead of zeroing the smallest weights of the whole model")  # fmt: skip
    pn.add_argument("--finetune-epochs", type=_positive, default=2, help="fine-tuning epochs (default 2)")
    pn.add_argument("--lr-scale", type=float, default=0.1, help="fine-tuning lr = the run's train.lr times this "
                    "(default 0.1)")  # fmt: skip
    pn.add_argument("--data-dir", help="folder with the IDX files (default: the run's data.dir)")
    pn.add_argument("--out", help="folder for the pruned runs and prune.json/md/png "
                    "(default runs/<time>-prune-<model>)")
    pn.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    pn.add_argument("--quiet", action="store_true")
    pn.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
    pn.add_argument("--json", action="store_true")
    pn.set_defaults(func=cmd_prune)

    ds = sub.add_parser("distill", help="train a small student from a teacher run or an ensemble (soft targets)")
    ds.add_argument("--teacher", nargs="+", required=True, metavar="RUN",
                    help="teacher run(s); several answer as an ensemble (mean of their softened probabilities)")
    ds.add_argument("--student", help="registered model to train (`digitkit models`); default: the config's model")
    ds.add_argument("--config", help="student recipe (default: the first teacher's config with the student model)")
    ds.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=4")
    ds.add_argument("--temperature", type=float, default=4.0, help="softmax temperature T (default 4)")
    ds.add_argument("--alpha", type=float, default=0.7,
                    help="weight of the teacher term; 1 - alpha goes to the labels (default 0.7; 0 = no teacher)")
    ds.add_argument("--data-dir", help="folder with the IDX files (default: the config's data.dir)")
    ds.add_argument("--out", help="run folder (default runs/<time>-<student>)")
    ds.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    ds.add_argument("--quiet", action="store_true")
    ds.add_argument("--progress", action="store_true")
    ds.add_argument("--json", action="store_true")
    ds.set_defaults(func=cmd_distill)

    cd = sub.add_parser("card", help="write MODEL_CARD.md for a run (use, data, metrics, limitations, config)")
    cd.add_argument("run", metavar="RUN", help="run folder or checkpoint file")
    cd.add_argument("--out", help="file to write (default RUN/MODEL_CARD.md)")
    cd.set_defaults(func=cmd_card)
    # --- tune parser (anchor: owned by the scale-out work)
    add_tune(sub)
    # --- retrain parser (anchor: owned by the retrain work)
    add_retrain(sub)
    # --- menu and completion parser (anchor: owned by the menu work)
    add_menu_and_completion(sub)
    add_examples(p)
    return p


# ----------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from digitkit import report, runs
    from digitkit.calibration import temperature_of
    from digitkit.evaluate import EvalOptions, evaluate_model
    from digitkit.train import pick_device

    opened = runs.open_model(args.run)
    cfg = opened.cfg
    ds, slices = runs.evaluation_data(cfg, args.split, args.data_dir)
    if ds.num_classes != len(opened.ckpt["classes"]) or tuple(ds.images.shape[1:]) != (
        opened.ckpt["in_chans"], opened.ckpt["img_size"], opened.ckpt["img_size"]
    ):
        raise ConfigError(
            f"{args.run}: the model expects {len(opened.ckpt['classes'])} classes of "
            f"{opened.ckpt['img_size']}x{opened.ckpt['img_size']} images; the {args.split} data has "
            f"{ds.num_classes} classes of shape {tuple(ds.images.shape[1:])}; pass the matching --data-dir"
        )
    opts = EvalOptions(
        corruptions=not args.quick and not args.no_corruptions,
        augmented=not args.quick,
        adversarial=not args.quick and not args.no_adversarial,
        adversarial_n=args.adversarial_n,
        seed=args.seed,
    )
    if args.defence_sigma is not None:
        opts.defence_sigma = args.defence_sigma
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = StageProgress("evaluate") if sys.stderr.isatty() or args.progress else None
    temperature = temperature_of(opened.ckpt)
    ev = evaluate_model(opened.model, ds.images, ds.labels, ds.classes, opts, inference=cfg.inference,
                        augment_cfg=cfg.augment, history=opened.history, slices=slices,
                        device=pick_device(cfg.train.device), progress=progress,
                        temperature=temperature)  # fmt: skip
    ev.results["temperature_scaling"]["fitted_on"] = (opened.ckpt.get("calibration") or {}).get(
        "source", "not fitted: the checkpoint predates calibration (run `digitkit calibrate RUN`)")
    base = opened.run_dir if opened.run_dir is not None else opened.checkpoint_path.parent
    out = Path(args.out) if args.out else base / "eval" / args.split
    name = opened.run_dir.name if opened.run_dir is not None else opened.checkpoint_path.name
    info = {
        "title": f"{cfg.model.name} ({name}) on the {args.split} set",
        "run": str(opened.run_dir or ""),
        "checkpoint": opened.checkpoint_path.name,
        "checkpoint_sha256": runs.checkpoint_sha256(opened.checkpoint_path),
        "model": cfg.model.name,
        "split": args.split,
        "data_dir": str(args.data_dir or cfg.data.dir),
        "seed": opts.seed,
    }
    files = report.write_evaluation(ev, ds.images, ds.labels, ds.classes, out, info)
    r = ev.results
    if args.json:
        print(json.dumps({**info, **r, "report": str(files["report_html"])}))
        return 0
    print(f"{info['title']}: accuracy {100 * r['accuracy']:.2f}% ({r['errors']} errors of {r['n']:,}), "
          f"macro F1 {r['macro_f1']:.4f}, log loss {r['log_loss']:.4f}, ECE {100 * r['calibration']['ece']:.2f}%")
    ts = r["temperature_scaling"]
    print(f"  calibration: temperature T = {ts['temperature']:.4g} [{ts['fitted_on']}]; ECE "
          f"{100 * ts['ece_before']:.2f}% raw (T = 1) -> {100 * ts['ece_after']:.2f}%, log loss "
          f"{ts['log_loss_before']:.4f} -> {ts['log_loss_after']:.4f}")  # fmt: skip
    if "corruption_summary" in r:
        cs = r["corruption_summary"]
        aug = r["robustness"].get("augmented")
        print(f"  corruptions: mean {100 * cs['mean']:.2f}%, worst {cs['worst']}"
              + (f"; augmented copy {100 * aug:.2f}%" if aug is not None else ""))
    if "adversarial" in r:
        adv = r["adversarial"]
        parts = [f"{k} {100 * v[-1]:.1f}%" for k, v in adv["curves"].items()]
        print(f"  attacks at eps {adv['epsilons'][-1]:g}: " + ", ".join(parts))
    if "slices" in r:
        for k, v in r["slices"].items():
            if k != "gap":
                print(f"  {k}: {100 * v['accuracy']:.2f}%")
    if "diagnosis" in r:
        print(f"  diagnosis: {r['diagnosis']['verdict']}: {'; '.join(r['diagnosis']['reasons'][:2])}")
    print(f"  report: {files['report_html']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from digitkit import runs

    result = runs.calibrate_run(args.run, args.data_dir)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']}: temperature T = {result['temperature']:.4g}, fitted on the {result['source']}; "
          f"there ECE {100 * result['ece_before']:.2f}% -> {100 * result['ece_after']:.2f}%, log loss "
          f"{result['nll_before']:.4f} -> {result['nll_after']:.4f}; stored in the checkpoint")  # fmt: skip
    print(f"  re-export any ONNX file of this run (`digitkit export {args.run} --format onnx`): the old one lacks T")
    return 0


# ------------------------------------------------------------------------------------------ explain
def cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from digitkit import explain, plots, runs

    opened = runs.open_model(args.run)
    classes = opened.ckpt["classes"]
    if (args.image is None) == (args.index is None):
        raise ConfigError("explain: give exactly one of --image FILE or --index N")
    if args.image is not None:
        from digitkit.preprocess import preprocess

        pre = preprocess(Path(args.image), opened.cfg.preprocess)
        if pre.rejected:
            raise ConfigError(f"{args.image}: nothing to explain: the image was rejected as {pre.rejected!r} "
                              "(no digit found); see `digitkit predict --show-preprocessed DIR`")  # fmt: skip
        x, what, true = pre.tensor[None], Path(args.image).name, None
        stem = Path(args.image).stem
    else:
        if args.split == "train":
            from digitkit import data

            ds = data.load_split(args.data_dir or opened.cfg.data.dir, "train", verify=False)
        else:
            ds, _ = runs.evaluation_data(opened.cfg, args.split, args.data_dir)
        if not 0 <= args.index < len(ds):
            raise ConfigError(f"--index {args.index}: expected 0..{len(ds) - 1} for the {args.split} set")
        x = ds.images[args.index : args.index + 1].float().div(255)
        what, true = f"{args.split} image {args.index}", classes[int(ds.labels[args.index])]
        stem = f"{args.split}-{args.index}"
    methods = list(explain.METHODS) if args.method == "all" else [args.method]
    if args.method == "all" and x.dim() == 4 and opened.model.forward_features(x).dim() != 4:
        methods.remove("gradcam")  # no spatial features (the mlp): the other methods still apply
    g = torch.Generator().manual_seed(args.seed)
    maps, probs = {}, None
    for m in methods:
        mp, probs = explain.attribute(opened.model, x, m, generator=g, model_name=opened.cfg.model.name)
        maps[m] = mp[0].numpy()
    from digitkit.calibration import temperature_of

    # The confidence shown is calibrated, as predict's: softmax(logits / T) = softmax(log(probs) / T).
    probs = probs.clamp_min(1e-30).log().div(temperature_of(opened.ckpt)).softmax(1)
    conf, pred = probs[0].max(0)
    base = opened.run_dir or opened.checkpoint_path.parent
    out = Path(args.out) if args.out else base / "explain" / f"{stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{what}" + (f" (true {true})" if true is not None else "")
    plots.save_explanation(x[0, 0].numpy(), maps, classes[int(pred)], float(conf), out, title=title)
    result = {"input": what, "predicted": classes[int(pred)], "confidence": float(conf), "true": true,
              "probabilities": [round(float(p), 6) for p in probs[0]], "methods": methods, "out": str(out)}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{what}: predicted {result['predicted']} (p = {result['confidence']:.3f})"
              + (f", true {true}" if true is not None else "") + f"; {', '.join(methods)} -> {out}")
    return 0


# -------------------------------------------------------------------------------------- cv, compare
class LabelledReporter(ConsoleReporter):
    """Epoch lines prefixed with the run's label ("fold 2/5") and the whole command's ETA (`clock`); no bar when
    several runs share the terminal."""

    def __init__(self, label: str, bar: bool, clock: CommandClock | None = None):
        super().__init__(bar=bar, label=label, clock=clock)


def _reporter_factory(args: argparse.Namespace, parallel: bool = False, extra_runs: int = 0) -> Any:
    """Reporters for a command that trains several runs; `extra_runs` are runs beyond the labels' "i/n" count
    (cv's final model)."""
    if args.quiet:
        return None
    bar = (sys.stderr.isatty() or getattr(args, "progress", False)) and not parallel
    clock = CommandClock(extra_runs)
    return lambda label: LabelledReporter(label, bar, clock)


def cmd_cv(args: argparse.Namespace) -> int:
    from digitkit import config, cv

    cfg = config.load(args.config, (args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else []))
    result = cv.run_cv(cfg, folds=args.folds, workers=args.workers, out=Path(args.out) if args.out else None,
                       root=Path(args.runs_root), final=args.final, expand=args.expand,
                       reporter_factory=_reporter_factory(args, parallel=args.workers > 1,
                                                        extra_runs=int(args.final)))  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(cv.cv_markdown(result, Path(result["cv_dir"]).name))
    print(f"wrote {result['cv_dir']}/cv.json, cv.md, cv.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from digitkit import compare

    overrides = (args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    result = compare.run_compare([Path(s) for s in args.specs], seeds=args.seeds, root=Path(args.runs_root),
                                 out=Path(args.out) if args.out else None, reuse=not args.retrain,
                                 reporter_factory=_reporter_factory(args), overrides=overrides)  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return 0
    print(compare.compare_markdown(result))
    print(f"wrote {result['compare_dir']}/compare.json, compare.md, compare.png")
    return 0


# ---------------------------------------------------------------------------------- predict, read
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def _recognizer(args: argparse.Namespace) -> Any:
    """The model with its stored preprocessing and inference settings, and the command line's overrides."""
    import dataclasses

    from digitkit.classify import Recognizer

    engine = getattr(args, "engine", None) or ("onnx" if str(args.model).endswith(".onnx") else "torch")
    if engine == "onnx":
        from digitkit.engine import open_recognizer

        rec = open_recognizer(args.model)  # a run folder's export is checked against its checkpoint
    elif str(args.model).endswith(".onnx"):
        raise ConfigError(f"--model {args.model} is an ONNX file; use --engine onnx (or give the run folder)")
    else:
        rec = Recognizer.open(args.model)
    changes = {}
    if getattr(args, "reject_below", None) is not None:
        changes["reject_below_confidence"] = args.reject_below
    if getattr(args, "reject_below_score", None) is not None:
        changes["reject_below_digit_score"] = args.reject_below_score
    if getattr(args, "noise_defence", None) is not None:
        changes["noise_defence_sigma"] = args.noise_defence
    rec.inference = dataclasses.replace(rec.inference, **changes)  # checked like config values
    return rec


def expand_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders contribute their image files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)  # a missing or bad file is reported per file, the rest go on
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    rec = _recognizer(args)
    files = expand_paths(args.paths)
    if not files:
        raise ConfigError(f"no image files in {', '.join(args.paths)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    show = Path(args.show_preprocessed) if args.show_preprocessed else None
    if show:
        show.mkdir(parents=True, exist_ok=True)
    failed = 0
    for start in range(0, len(files), 256):  # bounded memory for big folders
        chunk = files[start : start + 256]
        answers = rec.predict(chunk, top_k=args.top_k)
        for n, (path, a) in enumerate(zip(chunk, answers, strict=True), start):
            failed += a.rejected == "unreadable"
            if show and a.x is not None:
                x = a.x[0].mul(255).round().byte().numpy()
                Image.fromarray(x, "L").save(show / f"{n:05d}-{path.stem}.png")
            if args.json:
                out = a.to_json(path=str(path))
                if not args.record:
                    del out["record"]
                print(json.dumps(out), flush=True)
            elif a.rejected == "unreadable":
                print(f"{path}: unreadable: {a.error}")
            elif a.rejected:
                guess = f"; best guess {a.predicted} at {a.confidence:.3f}" if a.predicted is not None else ""
                print(f"{path}: no digit ({a.rejected}{guess})")
            else:
                others = ", ".join(f"{d} {p:.3f}" for d, p in a.top_k[1:])
                print(f"{path}: {a.digit} ({a.confidence:.3f})" + (f"  [{others}]" if others else ""))
    if show:
        print(f"wrote the {len(files) - failed} preprocessed 28x28 images to {show}", file=sys.stderr)
    return 1 if failed else 0


def cmd_read(args: argparse.Namespace) -> int:
    import dataclasses

    from digitkit import checkpoint

    files = expand_paths(args.paths)
    if not files:
        raise ConfigError(f"no image files in {', '.join(args.paths)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    sequence_model = checkpoint.load(args.model).get("task") == "sequence"
    reader = args.reader or ("sequence" if sequence_model else "segment")
    if reader == "segment" and sequence_model:
        raise ConfigError(f"--model {args.model} is a row reader; --reader segment needs a single-digit classifier "
                          "(any run trained with task: classify)")  # fmt: skip
    failed = 0
    if reader == "sequence":
        from digitkit.realworld.reader import SequenceReader

        if args.reject_below_score is not None:
            raise ConfigError("--reject-below-score is for the segment reader's digits; the row reader rejects by "
                              "the string's probability (--reject-below)")  # fmt: skip
        rdr = SequenceReader.open(args.model)
        if args.reject_below is not None:
            rdr.inference = dataclasses.replace(rdr.inference, reject_below_row_confidence=args.reject_below)
        if args.page or args.field:
            return _read_pages(rdr, files, args)
        for start in range(0, len(files), 64):  # bounded memory for big folders
            chunk = files[start : start + 64]
            for path, r in zip(chunk, rdr.read_many(chunk, args.pattern, args.beam_width), strict=True):
                failed += r.rejected in ("unreadable", "no-match")
                if args.json:
                    print(json.dumps(r.to_json(path=str(path))), flush=True)
                elif r.rejected in ("unreadable", "empty", "no-ink", "too-wide"):
                    print(f"{path}: no digits ({r.rejected}{': ' + r.why if r.why else ''})")
                else:
                    conf = ", ".join(f"{d['digit']} {d['confidence']:.2f}" for d in r.digits)
                    note = f"  REJECTED: {r.rejected} ({r.why})" if r.rejected else ""
                    print(f"{path}: {r.text or '(nothing read)'} ({r.confidence:.3f})" + (f"  [{conf}]" if conf else "")
                          + note)  # fmt: skip
        return 1 if failed else 0
    if args.page or args.field:
        raise ConfigError("--page and --field need a row reader (a run trained with configs/read.yaml)")
    if args.pattern is not None:  # a bad pattern is the command's error, not each file's
        from digitkit.realworld.pattern import compile_pattern

        compile_pattern(args.pattern)
    rec = _recognizer(args)
    for path in files:
        try:
            result = {"reader": "segment", **rec.read(path, pattern=args.pattern, top_k=args.top_k)}
        except DataError as e:
            failed += 1
            print(json.dumps({"path": str(path), "reader": "segment", "rejected": "unreadable", "why": str(e)})
                  if args.json else f"{path}: unreadable: {e}")  # fmt: skip
            continue
        failed += result.get("pattern_ok") is False
        if args.json:
            print(json.dumps({"path": str(path), **result}), flush=True)
        else:
            conf = ", ".join(f"{d['digit'] or '?'} {d['confidence']:.2f}" for d in result["digits"])
            print(f"{path}: {result['text'] or '(no digits found)'}" + (f"  [{conf}]" if conf else ""))
            if "pattern_ok" in result:
                print(f"  pattern {args.pattern!r}: " + ("matches" if result["pattern_ok"] else "DOES NOT MATCH"))
    return 1 if failed else 0


def parse_fields(items: list[str] | None) -> dict[str, str]:
    """`--field NAME=REGEX` options -> {NAME: REGEX}; a malformed or repeated one is a ConfigError."""
    fields: dict[str, str] = {}
    for item in items or []:
        name, sep, pattern = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,39}", name) or not pattern:
            raise ConfigError(f"--field {item!r}: expected NAME=REGEX, e.g. --field zip='[0-9]{{5}}' (a name of "
                              "letters, digits, _ and -, up to 40)")  # fmt: skip
        if name in fields:
            raise ConfigError(f"--field {name} is given twice; give each name once")
        fields[name] = pattern
    return fields


def _read_pages(rdr: Any, files: list[Path], args: argparse.Namespace) -> int:
    from digitkit.realworld.page import read_page

    fields = parse_fields(args.field)
    failed = 0
    for path in files:
        page = read_page(rdr, path, fields, args.beam_width)
        failed += bool(page.missing) or page.rejected == "unreadable"
        if args.json:
            print(json.dumps(page.to_json(path=str(path))), flush=True)
            continue
        if page.rejected:
            print(f"{path}: no fields ({page.rejected}{': ' + page.why if page.why else ''})")
            continue
        found = [f for f in page.fields if f.get("name") or not f["rejected"]]
        missing = f"; MISSING: {', '.join(page.missing)}" if page.missing else ""
        print(f"{path}: {len(found)} digit field(s){missing}")
        for f in found:
            label = f"{f['name']}: " if f.get("name") else ""
            print(f"  {label}{f['text']} ({f['confidence']:.3f})  box {f['box']}")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------- ensemble
def cmd_ensemble(args: argparse.Namespace) -> int:
    import time

    from digitkit import ensemble, metrics, runs
    from digitkit.evaluate import accuracy
    from digitkit.idx import atomic_write_bytes

    model, members = ensemble.build(args.runs, args.weights)
    cfg = runs.open_model(args.runs[0]).cfg
    cfg.preprocess.deskew = model.input_deskew  # in a mix, the deskewing members deskew their own copies
    weights = [m["weight"] for m in members]

    val_accuracy = None
    if ensemble.shared_validation(members):  # images none of the members trained on
        val, _ = runs.evaluation_data(cfg, "val", args.data_dir)
        each = ensemble.member_probs(model, val.images, args.shifts or 0)
        for m, probs in zip(members, each, strict=True):
            m["val_accuracy_measured"] = accuracy(probs, val.labels)
        val_accuracy = accuracy(ensemble.combine(each, weights), val.labels)
    ds, _ = runs.evaluation_data(cfg, "test", args.data_dir)  # reported once; nothing is chosen on it
    each = ensemble.member_probs(model, ds.images, args.shifts or 0)
    for m, probs in zip(members, each, strict=True):
        m["test_accuracy"] = accuracy(probs, ds.labels)
    probs = ensemble.combine(each, weights)
    result = {
        "members": members,
        "weights": args.weights,
        "shifts": args.shifts or 0,
        "val_accuracy": val_accuracy,
        **{k: v for k, v in metrics.classification_metrics(ds.labels, probs, ds.classes).items()
           if k in ("n", "accuracy", "errors", "log_loss", "macro_f1")},
        "best_member_test_accuracy": max(m["test_accuracy"] for m in members),
        "note": "the mean of the members' probabilities; weights come from validation only, and the test set is "
        "read once to report. val_accuracy is measured only when the members share their validation images "
        "(data.split_seed); otherwise each member trained on the others' validation images (or on every training "
        "image: data.val_fraction 0) and it is null.",
    }  # fmt: skip
    out = Path(args.out) if args.out else Path(args.runs_root) / f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    if args.json:
        print(json.dumps({**result, "out": str(out)}))
        return 0
    for m in members:
        val_m = f"val {100 * m['val_accuracy']:.2f}%" if m["val_accuracy"] is not None else "no validation"
        print(f"  {m['path']}: test {100 * m['test_accuracy']:.2f}% ({val_m}, "
              f"weight {m['weight']:.3f}{', deskewed' if m['deskew'] else ''})")
    shifts = f", {args.shifts}-px shifts" if args.shifts else ""
    if val_accuracy is not None:
        val_text = f"validation {100 * val_accuracy:.2f}%"
    elif any(m["val_fraction"] == 0 for m in members):
        val_text = "no validation images (a member trained on every training image, data.val_fraction 0)"
    else:
        val_text = "no shared validation images (train the members with one data.split_seed)"
    print(f"ensemble of {len(members)} ({args.weights} weights{shifts}): {val_text}; test "
          f"{100 * result['accuracy']:.2f}% ({result['errors']} errors), log loss {result['log_loss']:.4f}; "
          f"best member {100 * result['best_member_test_accuracy']:.2f}%; wrote {out}")
    return 0


# --- serve commands (anchor: owned by the serving work)
def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    import os
    import tempfile

    import uvicorn

    from digitkit import checkpoint
    from digitkit.serve import protocol
    from digitkit.serve import settings as serve_settings
    from digitkit.serve.service import check_paths

    settings = serve_settings.load(
        args.settings,
        {"model": args.model, "reader": args.reader, "host": args.host, "port": args.port, "workers": args.workers,
         "threads": args.threads, "audit_db": args.audit_db, "cache_size": args.cache_size,
         "log_level": args.log_level, "engine": args.engine},
        {"api_key": args.api_key_file, "admin_token": args.admin_token_file},
    )  # fmt: skip
    checkpoint.resolve(settings.model)  # a wrong path fails here, in one line, not inside uvicorn's startup
    check_paths(settings)  # likewise a model that is a row reader, or a reader that is not one
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    rows = f" (rows read by {settings.reader})" if settings.reader else ""
    print(f"digitkit: serving {settings.model}{rows} at http://{settings.host}:{settings.port}/ "
          f"(API key {'on' if settings.api_key else 'off'}, admin routes {'on' if settings.admin_token else 'off'})",
          file=sys.stderr, flush=True)  # fmt: skip
    # The guarded protocol bounds connections, header time and size (digitkit.serve.protocol); the app the rest.
    common = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
              "timeout_graceful_shutdown": 10, "http": protocol.protocol_path(settings.http),
              "h11_max_incomplete_event_size": settings.limits.max_header_bytes,
              "timeout_keep_alive": settings.limits.keep_alive_s, "backlog": settings.limits.backlog}  # fmt: skip
    if settings.workers == 1:
        from digitkit.serve.app import create_app
        from digitkit.serve.cpu import machine_turns, pin_to_one_core

        if settings.pin_cpu:  # the loop and the answering thread on one core (digitkit.serve.cpu)
            pin_to_one_core(machine_turns())
        uvicorn.run(create_app(settings), **common)
        return 0
    # Several processes: each worker builds its app from these variables (spawned, nothing is inherited).
    os.environ[serve_settings.SETTINGS_ENV] = settings.to_env()
    with tempfile.TemporaryDirectory(prefix="digitkit-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run("digitkit.serve.app:app_from_env", factory=True, workers=settings.workers, **common)
    return 0



# --- audit commands (anchor: owned by the audit-log work)
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AUDIT_PRUNE_EPILOG = (
    "Rows older than --max-age go whether labelled or not. Then, beyond --max-rows, unlabelled rows go first (oldest\n"
    "first): labelled rows, the ones `audit export --format idx` turns into training data, are deleted only when\n"
    "they alone exceed N. Deletes run in batches of 2,000 rows, one transaction each, so a server writing to the\n"
    "same database waits milliseconds at most. A SQLite file does not shrink; new rows reuse the freed space.\n"
    "The server can prune by itself: `audit: {max_age_days: 30, max_rows: 1000000}` in its --settings file.\n\n"
    "examples:\n"
    "  digitkit audit prune --db serve/audit.db --max-age 30d --dry-run\n"
    "  digitkit audit prune --db serve/audit.db --max-age 90d --max-rows 1000000\n"
    "  digitkit audit prune --db postgresql://digitkit@localhost/audit --max-rows 500000 --json"
)


def _age_seconds(text: str) -> float | None:
    """Seconds in an age such as 90s, 30m, 24h, 7d (None if the text is not one)."""
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    return float(age[1]) * AGE_UNITS[age[2]] if age else None


def parse_age(text: str, flag: str = "--max-age") -> float:
    """Seconds from an age such as 90m, 24h or 30d (more than zero)."""
    seconds = _age_seconds(text)
    if seconds is None or seconds <= 0:
        raise ConfigError(f"{flag} {text!r}: expected an age above zero: a number and a unit, s, m, h or d "
                          "(90m, 24h, 30d)")  # fmt: skip
    return seconds


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """Unix seconds from an ISO time (naive = local time), unix seconds, or an age such as 90s, 30m, 24h, 7d."""
    import datetime as dt
    import time

    if text is None:
        return None
    text = text.strip()
    age = _age_seconds(text)
    if age is not None:
        return (time.time() if now is None else now) - age
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: expected an ISO time (2024-05-01 or 2024-05-01T12:00:00+00:00), unix seconds "
            "(1714557600) or an age (30m, 24h, 7d)"
        ) from None


def cmd_audit_stats(args: argparse.Namespace) -> int:
    from digitkit.serve.audit import AuditLog

    log = AuditLog(args.db)
    try:
        stats = log.stats(since=parse_since(args.since))
    finally:
        log.close()
    if args.json:
        print(json.dumps(stats))
        return 0
    print_audit_stats(stats)
    return 0


def print_audit_stats(s: dict[str, Any]) -> None:
    import datetime as dt

    def when(t: float | None) -> str:
        return dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds") if t is not None else "-"

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v:,}" for k, v in d.items()) or "-"

    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if x is not None else "-"

    total = s["total"]
    print(f"audit log      {s['database']}" + (f"  (since {when(s['since'])})" if s["since"] is not None else ""))
    print(f"predictions    {total:,}" + (f"  ({when(s['first_time'])} to {when(s['last_time'])})" if total else ""))
    if not total:
        return
    lat = s["latency_ms"]
    print(f"routes         {counts(s['per_route'])}")
    print(f"answers        {counts(s['per_class'])}")
    print(f"rejected       {s['rejected']:,} ({pct(s['rejection_rate'])})" +
          (f"; {counts(s['rejections'])}" if s["rejections"] else ""))  # fmt: skip
    mean_conf = s["mean_confidence"]
    print(f"confidence     mean {mean_conf:.3f} (answered)" if mean_conf is not None else "confidence     -")
    print(f"latency ms     p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}  mean {lat['mean']:.1f}")
    print(f"cache hits     {s['cache_hits']:,} ({pct(s['cache_hit_rate'])})")
    acc = s["labelled_accuracy"]
    print(f"labelled       {s['labelled']:,}" + (f"; accuracy {pct(acc)} ({s['labelled_correct']:,} of "
                                                 f"{s['labelled_answered']:,} answered)" if acc is not None else ""))
    print(f"model versions {counts(s['model_versions'])}")


def cmd_negatives_build(args: argparse.Namespace) -> int:
    from collections import Counter

    from digitkit.realworld import negatives

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out folder (nothing was written)")
    images, kinds = negatives.build(args.n, args.seed, workers=args.workers, mnist_dir=args.data_dir)
    negatives.save(out, images, kinds)
    counts = ", ".join(f"{k} {n}" for k, n in sorted(Counter(kinds).items()))
    print(f"{len(kinds):,} of {args.n:,} non-digits passed preprocessing and were written to {out}: {counts}")
    return 0


def cmd_audit_prune(args: argparse.Namespace) -> int:
    from digitkit.serve.audit import AuditLog

    if args.max_age is None and args.max_rows is None:
        raise ConfigError("nothing to prune: give --max-age (e.g. 30d) and/or --max-rows (e.g. 1000000); "
                          "add --dry-run to see what would go")  # fmt: skip
    max_age_s = parse_age(args.max_age) if args.max_age is not None else None
    log = AuditLog(args.db)
    try:
        result = log.prune(max_age_s=max_age_s, max_rows=args.max_rows, dry_run=args.dry_run)
    finally:
        log.close()
    for warning in result.warnings:
        print(f"digitkit: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print_audit_prune(result, args.max_age)
    return 0


def print_audit_prune(r: Any, max_age: str | None) -> None:
    import datetime as dt

    def when(t: float) -> str:
        return dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")

    limits = []
    if r.cutoff is not None:
        limits.append(f"older than {max_age} (before {when(r.cutoff)})")
    if r.max_rows is not None:
        limits.append(f"beyond {r.max_rows:,} rows (unlabelled first)")
    verb = "would delete" if r.dry_run else "deleted"
    print(f"audit log      {r.database}")
    print(f"limits         {', '.join(limits)}")
    print(f"{verb:<14} {r.deleted:,} predictions ({r.deleted_by_age:,} over the age limit, {r.deleted_by_rows:,} over "
          f"the row limit; {r.deleted_labelled:,} of them labelled)")  # fmt: skip
    kept = f"{r.kept:,} predictions ({r.kept_labelled:,} labelled)"
    print(f"{'would keep' if r.dry_run else 'kept':<14} {kept}" + (f", from {when(r.oldest_kept)}" if r.kept else ""))
    if r.dry_run:
        print("dry run: nothing was deleted")


def cmd_audit_export(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from digitkit.serve.audit import AuditLog

    to_stdout = args.out in (None, "-")
    if args.format == "idx" and to_stdout:
        raise ConfigError("--format idx writes a folder of IDX files; give it with --out DIR")
    log = AuditLog(args.db)
    try:
        if args.format == "idx":
            # Only labelled predictions: training on the model's own answers would teach it nothing new.
            counts = log.export_idx(Path(args.out), labelled_only=True)
            print(f"wrote {sum(counts.values()):,} labelled images to {args.out} "
                  f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
                  f"train with: digitkit train --extra-data {args.out}")  # fmt: skip
        elif to_stdout:
            log.export(sys.stdout, args.format, labelled_only=args.labelled)
        else:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            # Written beside the target and renamed at the end: an interrupted export never leaves half a file.
            fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                    n = log.export(f, args.format, labelled_only=args.labelled)
                os.chmod(tmp, 0o644)
                os.replace(tmp, out)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            print(f"wrote {n:,} predictions to {out}", file=sys.stderr)
    finally:
        log.close()
    return 0


# --- export commands (anchor: owned by the export work)
def cmd_export(args: argparse.Namespace) -> int:
    from digitkit import export

    options = export.ExportOptions(
        int8=args.int8, opset=args.opset, calibration_images=args.calibration_images,
        max_int8_accuracy_drop=args.max_int8_drop / 100, measure_speed=not args.no_speed, threads=args.threads,
    )  # fmt: skip
    report = export.export_run(args.run, args.out, options, args.data_dir).to_json()
    if args.json:
        print(json.dumps(report))
        return 0
    par = report["parity"]
    print(f"wrote {report['out']} ({report['size_bytes']:,} bytes, {report['precision']}, opset {report['opset']}) "
          f"in {report['seconds']:.1f} s; report {Path(report['out']).with_suffix('.json')}")
    print(f"parity fp32 vs PyTorch on {par['images']:,} test images: {100 * par['agreement']:.2f}% identical "
          f"predictions ({par['disagreements']} differ), max |prob diff| {par['max_abs_prob_diff']:.2g}, accuracy "
          f"{100 * par['accuracy']:.2f}% (PyTorch {100 * par['accuracy_reference']:.2f}%)")  # fmt: skip
    q = report["int8"]
    if q:
        print(f"int8: {report['size_bytes']:,} bytes ({q['size_ratio']:.2f}x fp32), accuracy "
              f"{100 * q['accuracy_int8']:.2f}% ({q['accuracy_change_points']:+.2f} points; aim within 0.1), "
              f"{100 * q['agreement_with_fp32']:.2f}% same predictions as fp32")  # fmt: skip
    speed = {k: v for k, v in report["speed"].items() if k != "settings"}
    for engine, s in speed.items():
        print(f"  {engine:12s} batch 1 p50 {s['batch1_p50_ms']:.3f} ms (p99 {s['batch1_p99_ms']:.3f}), batch 1024 "
              f"{s['batch_images_per_s']:,.0f} images/s")
    if q and "speedup_batch" in q:
        print(f"int8 speed-up over fp32: {q['speedup_batch1']:.2f}x at batch 1, {q['speedup_batch']:.2f}x at "
              "batch 1024")
    return 0


# --- compression and card commands (anchor: owned by the compression work)
def cmd_prune(args: argparse.Namespace) -> int:
    import time

    from digitkit import compress, plots, runs
    from digitkit.idx import atomic_write_bytes

    sparsities = compress.parse_sparsities(args.sparsity)
    opened = runs.open_model(args.run)
    out = Path(args.out) if args.out else Path(args.runs_root) / (
        f"{time.strftime('%Y%m%d-%H%M%S')}-prune-{opened.cfg.model.name}")  # fmt: skip
    result = compress.prune_sweep(args.run, sparsities, out, structured=args.structured,
                                  finetune_epochs=args.finetune_epochs, lr_scale=args.lr_scale,
                                  data_dir=args.data_dir, reporter_factory=_reporter_factory(args))  # fmt: skip
    atomic_write_bytes(out / "prune.json", (json.dumps(result, indent=2) + "\n").encode())
    md = compress.prune_markdown(result)
    atomic_write_bytes(out / "prune.md", md.encode())
    plots.save_sparsity_curve(result["rows"], out / "prune.png",
                              source={"val_accuracy": result["source_val_accuracy"],
                                      "test_accuracy": result["source_test_accuracy"]},
                              title=f"{opened.cfg.model.name}, {result['method']} pruning")  # fmt: skip
    if args.json:
        print(json.dumps({**result, "out": str(out)}))
        return 0
    print(md, end="")
    print(f"wrote {out}/prune.json, prune.md, prune.png and one run folder per sparsity")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from digitkit import compress, runs

    overrides = list(args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    teacher_cfg = runs.open_model(args.teacher[0]).cfg
    cfg = compress.student_config(teacher_cfg, args.student, args.config, overrides)
    opts = compress.DistillOptions(temperature=args.temperature, alpha=args.alpha)
    reporter = _reporter_factory(args)
    summary = compress.distill_run(args.teacher, cfg, opts, out=Path(args.out) if args.out else None,
                                   root=Path(args.runs_root), reporter=reporter("distill") if reporter else None)
    if args.json:
        print(json.dumps(summary))
        return 0
    d = summary["distill"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    print(f"run            {summary['run_dir']}")
    print(f"teacher        {', '.join(d['teacher_models'])}: test {pct(d['teacher_test_accuracy'])}, "
          f"{d['teacher_params']:,} parameters, {d['teacher_checkpoint_bytes']:,} bytes")
    print(f"student        {summary['model']}: test {pct(d['student_test_accuracy'])}, {d['student_params']:,} "
          f"parameters, {d['student_checkpoint_bytes']:,} bytes (validation {pct(summary['val_accuracy'])})")
    print(f"size           student/teacher: {d['params_ratio']:.3f} of the parameters, {d['bytes_ratio']:.3f} of "
          f"the bytes (T = {d['temperature']:g}, alpha = {d['alpha']:g})")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from digitkit import card

    path = card.write_card(args.run, args.out)
    print(f"wrote {path}")
    return 0


# --- tune commands (anchor: owned by the scale-out work)
TUNE_EPILOG = """\
Each trial is a run folder under runs/tune/<study>/ scored on validation data (the config's hold-out, or k-fold
with objective: cv in the space file); the test files are never read. --trials is the study's total: start the
same command on several machines (--storage postgresql://...) or several times on one (add --set train.threads=1)
and the workers share the trials. The best config is written to runs/tune/<study>/best.yaml.

examples:
  digitkit tune --config configs/default.yaml --space configs/space.yaml --trials 20 --set train.epochs=3
  digitkit tune --config configs/edge.yaml --space configs/space.yaml --trials 40 --storage postgresql://db/optuna
  digitkit tune --report --study default
  digitkit train --config runs/tune/default/best.yaml"""


def add_tune(sub: Any) -> None:
    tn = sub.add_parser("tune", help="hyperparameter search with Optuna (pruning, shared studies, best config)",
                        description="Search a space of hyperparameters (configs/space.yaml) around a training config "
                        "with Optuna: median pruning on each epoch's validation accuracy, a study in SQLite or "
                        "PostgreSQL that several workers share, and the best config as YAML.",
                        epilog=TUNE_EPILOG)  # fmt: skip
    tn.add_argument("--config", help="base training config (default: built-in defaults)")
    tn.add_argument("--space", help="search space YAML (configs/space.yaml is an example)")
    tn.add_argument("--trials", type=_positive, help="trials in the study, over all workers sharing it")
    tn.add_argument("--study", help="study name (default: the config's file name, e.g. default)")
    tn.add_argument("--storage", metavar="URL", help="SQLite file or URL, or postgresql://user:password@host/db "
                    "(default: runs/tune/<study>.db)")  # fmt: skip
    tn.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config key")
    tn.add_argument("--data-dir", help="folder with the IDX files (default: the config's data.dir)")
    tn.add_argument("--out", help="folder for trial runs, best.yaml and the report (default: runs/tune/<study>)")
    tn.add_argument("--report", action="store_true", help="print the best trials and parameter importances, save "
                    "plots and best.yaml, and run no trials")  # fmt: skip
    tn.add_argument("--top", type=_positive, default=5, help="trials listed by --report (default 5)")
    tn.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    tn.add_argument("--quiet", action="store_true", help="no epoch or trial lines")
    tn.add_argument("--progress", action="store_true", help="progress bars even when not on a terminal")
    tn.add_argument("--json", action="store_true", help="print the result as one JSON object")
    tn.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from digitkit import config, tune
    from digitkit.errors import DataError

    root = Path(args.runs_root) / "tune"
    if args.report:
        if args.space or args.trials:
            raise ConfigError("--report summarizes a study and runs no trials; drop --space and --trials, or drop "
                              "--report to run trials")  # fmt: skip
        name = args.study or (Path(args.config).stem if args.config else "")
        if not name:
            raise ConfigError("--report needs the study: --study NAME (or the --config it was started with)")
        default_db = root / f"{name}.db"
        if not args.storage and not default_db.is_file():
            raise DataError(f"{default_db}: no study database; run trials first (digitkit tune --config C --space S "
                            "--trials N) or give --storage")  # fmt: skip
        study = tune.open_study(name, tune.storage_url(args.storage, default_db))
        result = tune.report(study, Path(args.out) if args.out else root / name, top=args.top)
        if args.json:
            print(json.dumps(result))
        else:
            print(tune_report_text(result))
        return 0
    if not args.space or not args.trials:
        raise ConfigError("digitkit tune needs --space FILE and --trials N to run trials (or --report to summarize "
                          "a study); configs/space.yaml is an example space")  # fmt: skip
    cfg = config.load(args.config, (args.set or []) + ([f"data.dir={args.data_dir}"] if args.data_dir else []))
    space = tune.load_space(args.space, cfg)
    name = args.study or (Path(args.config).stem if args.config else "defaults")
    url = tune.storage_url(args.storage, root / f"{name}.db")
    out = Path(args.out) if args.out else root / name
    _quiet_optuna()
    current: list[ConsoleReporter] = []

    def reporter_factory(label: str) -> ConsoleReporter:
        while current:  # a pruned trial leaves its bar open
            current.pop().close()
        current.append(ConsoleReporter(bar=sys.stderr.isatty() or args.progress, label=label))
        return current[-1]

    def on_trial(study: Any, trial: Any) -> None:
        best = tune.best_trial(study)
        value = f"{100 * trial.value:.2f}%" if trial.value is not None else "-"
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        line = f"trial {trial.number} {trial.state.name.lower()}: validation {value} ({params})"
        if best is not None:
            line += f"; best so far: trial {best.number}, {100 * best.value:.2f}%"
        print(line, file=sys.stderr, flush=True)

    try:
        result = tune.run_study(cfg, space, name, url, args.trials, out,
                                reporter_factory=None if args.quiet else reporter_factory,
                                on_trial=None if args.quiet else on_trial)  # fmt: skip
    finally:
        while current:
            current.pop().close()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"study {result['study']} ({result['storage']}): {result['trials']} trials, {result['complete']} complete, "
          f"{result['pruned']} pruned, {result['fail']} failed, {result['running']} running")
    best = result["best"]
    if best is None:
        print("no trial has finished yet, so there is no best config")
    else:
        params = ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        print(f"best: trial {best['trial']}, validation accuracy {100 * best['value']:.2f}% ({params})")
        print(f"wrote {best['config']}; train it with: digitkit train --config {best['config']}")
    return 0


def tune_report_text(r: dict[str, Any]) -> str:
    lines = [f"study {r['study']}: {r['trials']} trials ({r['complete']} complete, {r['pruned']} pruned, "
             f"{r['fail']} failed, {r['running']} running)"]  # fmt: skip
    if r["best_trials"]:
        best = r["best_trials"]  # one column per trial: spaces have more parameters than a line has room for
        keys = list(best[0]["params"])
        width = max(len(k) for k in [*keys, "validation accuracy"])
        lines += ["", "best trials by validation accuracy (the test set is never used):",
                  f"  {'':<{width}}" + "".join(f"  {'trial ' + str(row['trial']):>10}" for row in best),
                  f"  {'validation accuracy':<{width}}" + "".join(f"  {100 * row['value']:>9.2f}%" for row in best),
                  ]  # fmt: skip
        for k in keys:
            lines.append(f"  {k:<{width}}" + "".join(f"  {_short(row['params'].get(k)):>10}" for row in best))
    else:
        lines.append("no finished trials yet")
    lines += ["", f"parameter importances ({r['importance_note']}):" if r["importances"] else r["importance_note"]]
    for k, v in (r["importances"] or {}).items():
        lines.append(f"  {k:<28} {v:5.2f}  {'#' * round(40 * v)}")
    if r["plots"]:
        lines += ["", "plots: " + ", ".join(r["plots"])]
    if r["best"]:
        lines.append(f"best config (trial {r['best']['trial']}): {r['best']['config']}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _quiet_optuna() -> None:
    """Optuna logs every trial at INFO; the command prints its own line per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- retrain (anchor: owned by the retrain work)
RETRAIN_EPILOG = (
    "Labelled feedback the base has not trained on is split, seeded and stratified, into a training part (added to\n"
    "the base's training portion only) and a held-out part. The candidate is measured beside the base on the base's\n"
    "validation split and on the held-out feedback; it is promoted only if it is not worse by more than\n"
    "--val-tolerance points (default 0.1) on validation and --feedback-tolerance points (default 0) on the\n"
    "feedback. The test set plays no part in the decision. Exit status: 0 promoted, 1 refused, 2 an error.\n"
    "See docs/retrain.md.\n\n"
    "examples:\n"
    "  digitkit retrain --from-audit serve/audit.db --base models/current --out runs/retrain-1\n"
    "  digitkit retrain --from-audit serve/audit.db --base models/current --out runs/retrain-2 "
    "--promote-to models/current --reload http://127.0.0.1:8000 --admin-token-file admin.token\n"
    "  digitkit retrain --from-audit serve/audit.db --base runs/latest --out runs/retrain-3 --set train.epochs=3 "
    "--holdout 0.4 --json"
)


def add_retrain(sub: Any) -> None:
    rt = sub.add_parser("retrain", help="train on the serving feedback, compare with the served model, promote if "
                        "not worse", description="Close the feedback loop: export the labelled feedback of the "
                        "audit log, train a candidate with the base run's recipe plus that feedback, compare the two "
                        "on the base's validation split and on held-out feedback, and promote the candidate (a link "
                        "the server serves, then an admin reload) only when it is not worse.",
                        epilog=RETRAIN_EPILOG)  # fmt: skip
    rt.add_argument("--from-audit", required=True, metavar="DB", help="audit database (SQLite file or URL) the "
                    "server writes, with labels from POST /v1/feedback")  # fmt: skip
    rt.add_argument("--base", required=True, metavar="RUN", help="the served run folder or checkpoint (or the link "
                    "the server serves); its stored config is the candidate's recipe")  # fmt: skip
    rt.add_argument("--out", required=True, metavar="DIR", help="new folder for the candidate run, its feedback "
                    "sets and retrain.json")  # fmt: skip
    rt.add_argument("--holdout", type=float, default=0.3, metavar="FRACTION",
                    help="share of each label of the new feedback held out for the comparison (default 0.3)")
    rt.add_argument("--seed", type=int, default=0, help="seed of the feedback split (default 0)")
    rt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of the base's config, e.g. "
                    "train.epochs=3 (not data.dir, data.val_fraction, data.split_seed or seed: they move the "
                    "validation split)")  # fmt: skip
    rt.add_argument("--val-tolerance", type=float, default=0.1, metavar="POINTS",
                    help="validation accuracy the candidate may lose, in points (default 0.1)")
    rt.add_argument("--feedback-tolerance", type=float, default=0.0, metavar="POINTS",
                    help="held-out feedback accuracy the candidate may lose, in points (default 0)")
    rt.add_argument("--min-holdout", type=_positive, default=10, metavar="N",
                    help="fewest held-out feedback images to decide on (default 10)")
    rt.add_argument("--min-train", type=_positive, default=10, metavar="N",
                    help="fewest new feedback images to train on (default 10)")
    rt.add_argument("--promote-to", metavar="PATH", help="when promoted, point this symbolic link at the candidate "
                    "(atomically); serve it with `digitkit serve --model PATH`")  # fmt: skip
    rt.add_argument("--reload", metavar="URL", help="when promoted, ask the server at URL to load the candidate "
                    "(POST /v1/admin/reload), e.g. http://127.0.0.1:8000")  # fmt: skip
    rt.add_argument("--admin-token-file", metavar="FILE", help="file holding the server's admin token for --reload "
                    "(default: $DIGITKIT_ADMIN_TOKEN)")  # fmt: skip
    rt.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    rt.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")
    rt.add_argument("--json", action="store_true", help="print the report as one JSON object")
    rt.set_defaults(func=cmd_retrain)


def cmd_retrain(args: argparse.Namespace) -> int:
    from digitkit import retrain
    from digitkit.train import SilentReporter

    if args.admin_token_file and not args.reload:
        raise ConfigError("--admin-token-file is for --reload URL; add --reload or drop it")
    token = retrain.read_admin_token(args.admin_token_file) if args.reload else None
    reporter = SilentReporter() if args.quiet or args.json else ConsoleReporter(bar=sys.stderr.isatty() or
                                                                                 args.progress)  # fmt: skip
    try:
        report = retrain.retrain(
            args.from_audit, args.base, args.out, holdout=args.holdout, overrides=args.set, seed=args.seed,
            val_tolerance=args.val_tolerance, feedback_tolerance=args.feedback_tolerance,
            min_holdout=args.min_holdout, min_train=args.min_train, promote_to=args.promote_to,
            reload_url=args.reload, admin_token=token, reporter=reporter,
        )  # fmt: skip
    finally:
        if isinstance(reporter, ConsoleReporter):
            reporter.close()
    print(json.dumps(report.to_json()) if args.json else retrain.report_text(report))
    return 0 if report.promoted else 1

# --- menu and completion (anchor: owned by the menu work)
# Every command's --help ends with "examples:" (a test parses each line with the real parser). A note comes
# first where there is something to know before running the command. A subcommand can instead carry its own
# epilog with an "examples:" block; add_examples keeps it.
EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "": ("Every command has its own --help with examples; `digitkit menu` offers the common tasks as a menu and "
         "prints the command it runs.", [
        "digitkit menu                                        # a terminal menu for the common tasks",
        "digitkit train --config configs/default.yaml         # the demo recipe: about 3 minutes on 2 cores",
        "digitkit evaluate runs/latest                        # report.html with errors, calibration, robustness",
        "digitkit predict --model runs/latest photo.jpg",
        "digitkit completion bash > ~/.local/share/bash-completion/completions/digitkit",
    ]),  # fmt: skip
    "train": ("Ctrl-C stops after saying which run folder holds the last finished epoch; --resume continues it and "
              "ends where the uninterrupted run would have.", [
        "digitkit train --config configs/default.yaml",
        "digitkit train --config configs/default.yaml --set train.epochs=2 --set model.name=cnn1",
        "digitkit train --config configs/edge.yaml --out runs/edge --quiet --json",
        "digitkit train --resume runs/latest                  # continue an interrupted run",
        "digitkit train --config configs/default.yaml --extra-data feedback-idx/",
        "digitkit train --config configs/best.yaml --set data.val_fraction=0 --set train.checkpoint_metric=last"
        "   # refit: every training image, the last epoch kept",
    ]),  # fmt: skip
    "data": ("", [
        "digitkit data info",
        "digitkit data preview --out grid.png",
        "digitkit data verify --data-dir data/mnist",
    ]),
    "data info": ("", ["digitkit data info", "digitkit data info --data-dir data/fashion --json"]),
    "data verify": ("", ["digitkit data verify", "digitkit data verify --data-dir expanded/"]),
    "data preview": ("", [
        "digitkit data preview --out grid.png",
        "digitkit data preview --out test-grid.png --split test --per-class 6 --seed 1",
    ]),
    "data download": ("Files are verified by SHA-256 before they are kept; the cache is $DIGITKIT_CACHE or "
                      "~/.cache/digitkit.", [
        "digitkit data download --out data/mnist-download",
        "digitkit data download --out mnist/ --cache-dir /tmp/digitkit-cache --timeout 60",
    ]),  # fmt: skip
    "augment": ("", [
        "digitkit augment list",
        "digitkit augment preview --recipe standard --out aug.png",
        "digitkit augment check --recipe erasing --model runs/plain",
    ]),
    "augment list": ("", ["digitkit augment list"]),
    "augment preview": ("", [
        "digitkit augment preview --recipe realworld --out aug.png",
        "digitkit augment preview --recipe my-recipe.yaml --out aug.png --n 4 --copies 6",
        "digitkit augment preview --config configs/default.yaml --out batch.png   # epoch 1's first batch",
    ]),
    "augment check": ("Use a model trained without the recipe: it reads the augmented digits as a fresh reader "
                      "would.", [
        "digitkit augment check --recipe erasing --model runs/plain",
        "digitkit augment check --recipe realworld --model runs/plain --n 2000 --json",
    ]),  # fmt: skip
    "augment expand": ("The test files are copied unchanged, so the folder works as a --data-dir.", [
        "digitkit augment expand --recipe standard --factor 3 --out data/mnist-x3",
        "digitkit train --config configs/default.yaml --data-dir data/mnist-x3",
    ]),
    "evaluate": ("Writes RUN/eval/<split>/: metrics.json, per_class.csv, errors.png, reliability.png, "
                 "robustness.png, report.md and report.html.", [
        "digitkit evaluate runs/latest",
        "digitkit evaluate runs/latest --quick                 # clean metrics only, a few seconds",
        "digitkit evaluate runs/latest --split val --json",
    ]),  # fmt: skip
    "explain": ("", [
        "digitkit explain runs/latest --index 8 --method gradcam",
        "digitkit explain runs/latest --image photo.jpg --out why.png",
    ]),
    "cv": ("", [
        "digitkit cv --config configs/default.yaml --folds 5 --workers 2",
        "digitkit cv --config configs/edge.yaml --folds 10 --final",
        "digitkit cv --config configs/keras-style.yaml --expand 2 --set train.epochs=3",
    ]),
    "compare": ("Finished runs under runs/compare/ are reused; --retrain trains them again.", [
        "digitkit compare configs/compare-depth.yaml --seeds 3",
        "digitkit compare configs/default.yaml configs/edge.yaml --seeds 2 --set train.epochs=4",
    ]),
    "predict": ("", [
        "digitkit predict --model runs/latest photo.jpg scans/ --json",
        "digitkit predict --model runs/latest canvas.png --show-preprocessed seen/",
        "digitkit predict --engine onnx --model runs/latest/export/model.onnx photo.jpg",
    ]),
    "read": ("", [
        "digitkit train --config configs/read.yaml --out runs/reader",
        "digitkit read --model runs/reader postcode.jpg --pattern '[0-9]{5}'",
        "digitkit read --model runs/reader scans/ --json",
        "digitkit read --model runs/reader form.jpg --field zip='[0-9]{5}' --field amount='[0-9]+'",
        "digitkit read --model runs/latest amount.png --reader segment",
    ]),
    "ensemble": ("Members trained with one data.split_seed share their validation images, and the ensemble is "
                 "measured on them too. Members trained on deskewed digits (preprocess.deskew) may join plain ones: "
                 "each deskews its own copy of the input.", ["digitkit ensemble runs/a runs/b runs/c --weights val",
                                           "digitkit ensemble runs/ens/* --shifts 1"]),
    "models": ("", ["digitkit models", "digitkit models --json"]),
    "serve": ("Then open http://127.0.0.1:8000/ for the drawing page. Secrets come from the environment: "
              "DIGITKIT_API_KEY (prediction routes), DIGITKIT_ADMIN_TOKEN (admin routes), or the --*-file flags.", [
        "digitkit serve --model runs/latest --port 8000",
        "digitkit serve --model runs/latest --engine onnx --workers 2 --audit-db serve/audit.db",
        "digitkit serve --model runs/latest --reader runs/reader",
    ]),  # fmt: skip
    "negatives": ("data/negatives ships a set of 6,908; configs/realworld.yaml trains with it.", [
        "digitkit negatives build --out data/my-negatives --n 2000 --workers 2",
    ]),
    "negatives build": ("Training with them: train.outlier_weight (0.5) and data.negatives_dir in the config.", [
        "digitkit negatives build --out data/my-negatives --n 8000 --workers 2",
    ]),
    "audit": ("DB is a SQLite file or an SQLAlchemy URL (sqlite:///serve/audit.db, postgresql://user@host/db), as "
              "given to `digitkit serve --audit-db`.", [
        "digitkit audit stats --db serve/audit.db --since 24h",
        "digitkit audit export --db serve/audit.db --format idx --out feedback-idx",
    ]),  # fmt: skip
    "audit stats": ("", [
        "digitkit audit stats --db serve/audit.db",
        "digitkit audit stats --db postgresql://digitkit@localhost/audit --since 7d --json",
    ]),
    "audit export": ("csv: every column but the image; jsonl: every column, the 28x28 image as base64 (image_b64); "
                     "idx: labelled images only, a folder for `digitkit train --extra-data`.", [
        "digitkit audit export --db serve/audit.db --format csv --out audit.csv",
        "digitkit audit export --db serve/audit.db --format idx --out feedback-idx",
    ]),  # fmt: skip
    "calibrate": ("T < 1 sharpens an under-confident model (label smoothing), T > 1 softens an over-confident one; "
                  "the predicted class never changes.", [
        "digitkit calibrate runs/latest",
        "digitkit calibrate runs/latest --json",
    ]),  # fmt: skip
    "export": ("", [
        "digitkit export runs/latest --format onnx",
        "digitkit export runs/latest --format onnx --int8      # then: digitkit predict --engine onnx ...",
    ]),
    "prune": ("Each pruned model is a normal run folder under --out: evaluate, predict, serve and export work on it.", [
        "digitkit prune runs/latest --sparsity 0.5,0.7,0.9",
        "digitkit prune runs/latest --sparsity 0.5 --structured --finetune-epochs 3",
    ]),  # fmt: skip
    "distill": ("", [
        "digitkit distill --teacher runs/latest --student cnn1 --temperature 4",
        "digitkit distill --teacher runs/a runs/b --student cnn3_tiny --set train.epochs=4",
    ]),
    "card": ("Run `digitkit evaluate RUN` first for per-class, robustness and calibration figures.", [
        "digitkit card runs/latest",
        "digitkit card runs/latest --out MODEL_CARD.md",
    ]),
    "menu": ("Arrow keys or a number pick an action, Enter confirms, Ctrl-C goes back. The last run is remembered "
             "in $DIGITKIT_STATE_DIR (default: your config folder, e.g. ~/.config/digitkit).", ["digitkit menu"]),
    "completion": ("", [
        "digitkit completion bash > ~/.local/share/bash-completion/completions/digitkit",
        "digitkit completion zsh > ~/.zsh/digitkit.zsh      # then in ~/.zshrc: source ~/.zsh/digitkit.zsh",
        "digitkit completion fish > ~/.config/fish/completions/digitkit.fish",
    ]),
}


def add_examples(parser: argparse.ArgumentParser) -> None:
    """End every command's --help with its examples (EXAMPLES), printed as written."""
    import textwrap

    from digitkit.completion import walk

    for path, p in walk(parser).items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        if p.epilog and "examples:" in p.epilog:
            continue
        note, lines = EXAMPLES.get(path, ("", []))
        if not lines:
            continue
        text = "\n".join(textwrap.wrap(note, 100)) + "\n\n" if note else ""
        p.epilog = text + "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_menu_and_completion(sub: Any) -> None:
    mn = sub.add_parser("menu", help="a terminal menu for the common tasks (arrow keys or numbers)",
                        description="A menu for looking at the data, training, comparing, evaluating, predicting, "
                        "serving and exporting, without writing a config or remembering a flag. Each action prints "
                        "the digitkit command it runs.")  # fmt: skip
    mn.set_defaults(func=cmd_menu)
    co = sub.add_parser("completion", help="print a shell completion script (bash, zsh or fish)",
                        description="Print a completion script for your shell, generated from digitkit's own "
                        "argument parser: subcommands, options, choices and file names.")  # fmt: skip
    co.add_argument("shell", choices=("bash", "zsh", "fish"))
    co.set_defaults(func=cmd_completion)


def cmd_menu(args: argparse.Namespace) -> int:
    from digitkit import menu

    return menu.run()


def cmd_completion(args: argparse.Namespace) -> int:
    from digitkit import completion

    sys.stdout.write(completion.script(build_parser(), args.shell))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DigitkitError as e:
        print(f"digitkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digitkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def run() -> NoReturn:
    """The `digitkit` command (and `python -m digitkit`): main(), then exit with its status.

    Before exiting it freezes the garbage collector's view of the heap: the interpreter's last collection would
    otherwise walk every object torch created: exit after `import torch` takes 0.33 s, frozen 0.09 s
    (benchmarks/startup.py), memory the process is about to give back anyway. Files are closed and flushed by
    then; main() writes them atomically.
    Under torchrun a finished process leaves through distributed.leave instead (no teardown at all: frozen, the
    C++ runtime aborted on gloo's threads, and once even unfrozen)."""
    code = main()
    distributed = sys.modules.get("digitkit.distributed")
    if distributed is not None and distributed.world().size > 1:
        distributed.leave(code)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
