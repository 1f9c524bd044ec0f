"""The studies of docs/studies.md: one command per question users ask, each writing its JSON under
benchmarks/results/ and its figure under docs/img/.

    python benchmarks/studies.py keras        # Keras-style CNN, stratified 5-fold: none / minimal / combinatorial
                                              # augmentation, online and offline (about 40 min on 2 cores)
    python benchmarks/studies.py improve      # stuck at 98%: dense vs compact CNN, plateau + early stopping
                                              # (configs/compare-improve.yaml, 15 runs, about 15 min)
    python benchmarks/studies.py production   # configs/production.yaml over 3 seeds, its learning curves, against
                                              # the default recipe (about 40 min)
    python benchmarks/studies.py preprocess --model RUN [--model RUN ...]
                                              # each preprocessing step off on real-world input
                                              # (benchmarks/study_preprocess.py)

(The first study, depth and augmentation, is `digitkit compare configs/compare-depth.yaml --seeds 3`.)

Runs are kept under --runs (default runs/) and reused when the command is run again with the same settings:
compare's runs under runs/compare/, the k-fold runs under runs/study-keras/<variant>/. `--fresh` trains again.
The test files choose nothing: checkpoints are picked on each run's validation split (or held-out fold); test
accuracy is measured once per finished model and reported. Verdicts are Welch's t (digitkit.compare.welch).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from digitkit import compare, config, cv, data, evaluate, runs
from digitkit.errors import ConfigError
from digitkit.train import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402 - benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"

KERAS_EPOCHS = 4
"""Online epochs per fold in the Keras study; the offline variant spends the same steps (epochs / factor)."""
OFFLINE_FACTOR = 2
KERAS_VARIANTS: list[tuple[str, str, list[str], int]] = [
    # (name, what it is, overrides of configs/keras-style.yaml, offline expansion factor)
    ("none", "no augmentation", ['augment={"recipe": "none"}'], 1),
    ("minimal", "minimal: shift +-2 px on half the images, nothing else",
     ['augment={"recipe": "none", "translate": {"p": 0.5, "pixels": 2.0}}'], 1),
    ("combinatorial", "combinatorial, online: rotation 10 deg, shift 2 px, zoom 0.9-1.1, noise, fresh every batch",
     [], 1),
    ("combinatorial-offline", f"combinatorial, offline: originals + {OFFLINE_FACTOR - 1} copy drawn once, same "
     "steps", [], OFFLINE_FACTOR),
]  # fmt: skip


def machine_info() -> dict[str, Any]:
    return {"cpu": machine.cpu_name(), "kind": machine.cpu_flags(), "cores": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def save_json(obj: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}")


def json_path(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else RESULTS / f"study-{args.study}.json"


def figure_path(args: argparse.Namespace) -> Path:
    """docs/img/studies-<name>.png, the name from the JSON's (study-production-e30.json: studies-production-e30.png),
    so a variant run with --out keeps the default figure."""
    return Path(args.img_dir) / f"studies-{json_path(args).stem.removeprefix('study-')}.png"


def pct(s: dict[str, Any]) -> str:
    return f"{100 * s['mean']:.2f} +- {100 * (s['std'] or 0):.2f}%"


def test_accuracy(run_dir: Path, test: data.Dataset) -> float:
    """The run's kept checkpoint scored once on the test files (reported only)."""
    model = runs.open_model(run_dir).model
    logits = evaluate.predict_logits(model, test.images)
    return float((logits.argmax(1) == test.labels).float().mean())


# ------------------------------------------------------------------------------------------------------ keras
def study_keras(args: argparse.Namespace) -> dict[str, Any]:
    base = ROOT / "configs" / "keras-style.yaml"
    test = data.load_split(args.data_dir, "test")
    out_root = Path(args.runs) / "study-keras"
    variants = []
    for name, what, sets, factor in KERAS_VARIANTS:
        epochs = max(1, args.epochs // factor)  # offline: the same number of steps as online
        cfg = config.load(base, [f"train.epochs={epochs}", f"data.dir={args.data_dir}", *args.set, *sets])
        cv_dir = out_root / name
        saved = cv_dir / "cv.json"
        if saved.is_file() and not args.fresh and _same_cv(cv_dir, cfg, args.folds, factor):
            result = json.loads(saved.read_text())
            print(f"[keras] {name}: reusing {cv_dir}")
        else:
            if cv_dir.exists():
                shutil.rmtree(cv_dir)
            print(f"[keras] {name}: {args.folds}-fold cross-validation ({what})", flush=True)
            result = cv.run_cv(cfg, folds=args.folds, out=cv_dir, expand=factor)
        folds = result["folds"]
        accs = [f["val_accuracy"] for f in folds]
        tests = [test_accuracy(cv_dir / f["run_dir"], test) for f in folds]
        variants.append({
            "name": name, "what": what, "overrides": sets, "offline_factor": factor,
            "epochs": cfg.train.epochs, "train_images_per_fold": folds[0]["n_train"],
            "fold_accuracy": compare.stats(accs), "fold_log_loss": compare.stats([f["val_log_loss"] for f in folds]),
            "test_accuracy_of_fold_models": compare.stats(tests),
            "seconds_per_fold": statistics.mean(f["seconds"] for f in folds),
            "fold_seconds_sum": result["fold_seconds_sum"], "cv_dir": str(cv_dir),
        })  # fmt: skip
        print(f"[keras] {name}: held-out folds {pct(variants[-1]['fold_accuracy'])}, "
              f"test {pct(variants[-1]['test_accuracy_of_fold_models'])}", flush=True)  # fmt: skip
    by = {v["name"]: v for v in variants}
    pairs = []
    for a, b in (("minimal", "none"), ("combinatorial", "none"), ("combinatorial", "minimal"),
                 ("combinatorial-offline", "combinatorial"), ("combinatorial-offline", "none")):
        va, vb = by[a]["fold_accuracy"]["values"], by[b]["fold_accuracy"]["values"]
        pair = compare.welch(a, va, b, vb)
        # The folds are the same for every variant (same split seed), so the per-fold difference is paired too.
        diffs = [x - y for x, y in zip(va, vb, strict=True)]
        pair["paired_difference"] = compare.stats(diffs)
        pair["paired_t"], pair["paired_p_value"] = _paired_t(va, vb)
        pair["test_welch"] = compare.welch(a, by[a]["test_accuracy_of_fold_models"]["values"], b,
                                           by[b]["test_accuracy_of_fold_models"]["values"])  # fmt: skip
        pairs.append(pair)
    _plot_points([v["name"] for v in variants], [v["fold_accuracy"]["values"] for v in variants],
                 [v["test_accuracy_of_fold_models"]["values"] for v in variants],
                 figure_path(args), f"Keras-style CNN, {args.folds}-fold: accuracy per fold",
                 "held-out fold", "test (fold models)")  # fmt: skip
    return {
        "training_seconds": round(sum(v["fold_seconds_sum"] for v in variants), 1),
        "study": "keras", "config": "configs/keras-style.yaml", "folds": args.folds, "online_epochs": args.epochs,
        "selection": "each fold's held-out part picks its epoch and scores it; the fold models are then scored once "
                     "on the test files, reported only",
        "variants": variants, "pairs": pairs,
    }  # fmt: skip


def _paired_t(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """Student's t of the per-fold differences (the variants share their folds): mean / (std / sqrt(n))."""
    from scipy import stats as scipy_stats

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    if len(diffs) < 2 or statistics.stdev(diffs) == 0:
        return None, None
    result = scipy_stats.ttest_rel(a, b)
    return float(result.statistic), float(result.pvalue)


def _same_cv(cv_dir: Path, cfg: config.Config, folds: int, factor: int) -> bool:
    try:
        saved = json.loads((cv_dir / "cv.json").read_text())
        same_cfg = config.to_dict(config.load(cv_dir / "config.yaml")) == config.to_dict(cfg)
    except (OSError, ValueError, ConfigError):
        return False
    return same_cfg and saved["k"] == folds and (saved.get("expand") or {}).get("factor", 1) == factor


# -------------------------------------------------------------------------------------- improve, production
def _compare(specs: list[Path], args: argparse.Namespace, out: str) -> dict[str, Any]:
    return compare.run_compare(specs, seeds=args.seeds, root=Path(args.runs), out=Path(args.runs) / out,
                               reuse=not args.fresh, overrides=args.set)  # fmt: skip


def _entries(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for e in result["entries"]:
        runs_ = []
        for d in e["run_dirs"]:
            s = json.loads((Path(d) / "summary.json").read_text())
            # The median epoch, robust to an epoch slowed by another job on the machine (train_seconds sums them).
            epoch_s = statistics.median(r["seconds"] for r in read_metrics(Path(d) / "metrics.csv"))
            runs_.append({"run_dir": d, "best_epoch": s["best_epoch"], "epochs": s["epochs"],
                          "stopped_early": s["stopped_early"], "train_seconds": s["train_seconds"],
                          "epoch_seconds_median": epoch_s,
                          "test_accuracy": s["test_accuracy"], "val_accuracy": s["val_accuracy"]})  # fmt: skip
        rows.append({"name": e["name"], "model": e["model"], "params": e["params"], "test_accuracy": e["test_accuracy"],
                     "val_accuracy": e["val_accuracy"], "train_seconds_mean": e["train_seconds_mean"],
                     "epoch_seconds_median": statistics.median(r["epoch_seconds_median"] for r in runs_),
                     "epochs_mean": statistics.mean(r["epochs"] for r in runs_), "runs": runs_})  # fmt: skip
    return rows


def study_improve(args: argparse.Namespace) -> dict[str, Any]:
    result = _compare([ROOT / "configs" / "compare-improve.yaml"], args, "study-improve")
    entries = _entries(result)
    _plot_curves(entries, figure_path(args), "The improvement loop (seed 0 of each)")
    steps = [(b, a) for a, b in zip([e["name"] for e in entries], [e["name"] for e in entries][1:], strict=False)]
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    return {"study": "improve", "config": "configs/compare-improve.yaml", "entries": entries,
            "steps": [pairs.get((a, b)) or compare.welch(a, _vals(entries, a), b, _vals(entries, b))
                      for a, b in steps],
            "pairs": result["pairs"], "compare_dir": result["compare_dir"]}  # fmt: skip


def _vals(entries: list[dict[str, Any]], name: str) -> list[float]:
    return next(e for e in entries if e["name"] == name)["test_accuracy"]["values"]


def study_production(args: argparse.Namespace) -> dict[str, Any]:
    result = _compare([ROOT / "configs" / "production.yaml"], args, "study-production")
    entries = _entries(result)
    seeds = len(entries[0]["runs"])
    _plot_curves(entries, figure_path(args), f"configs/production.yaml, {seeds} seed{'s' * (seeds > 1)}"
                 + "".join(f", {o}" for o in args.set),
                 all_seeds=True)
    out: dict[str, Any] = {"study": "production", "config": "configs/production.yaml", "entries": entries,
                           "compare_dir": result["compare_dir"]}  # fmt: skip
    depth = RESULTS / "study-depth.json"
    if depth.is_file():  # the default recipe's seeds, from the first study (same seeds 0, 1, 2)
        default = next(e for e in json.loads(depth.read_text())["entries"] if e["name"] == "cnn3_slim")
        out["default_recipe"] = {"source": "benchmarks/results/study-depth.json, entry cnn3_slim "
                                           "(configs/default.yaml)",
                                 "test_accuracy": default["test_accuracy"],
                                 "train_seconds_mean": default["train_seconds_mean"], "params": default["params"]}
        out["versus_default"] = compare.welch("production", entries[0]["test_accuracy"]["values"], "default",
                                              default["test_accuracy"]["values"])  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------ plots
def _plot_points(names: list[str], first: list[list[float]], second: list[list[float]], path: Path, title: str,
                 first_label: str, second_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        for offset, values, color, label in ((-0.12, a, "tab:blue", first_label), (0.12, b, "tab:orange",
                                                                                      second_label)):
            xs = [i + offset] * len(values)
            ax.scatter(xs, [100 * v for v in values], color=color, s=18, alpha=0.6, label=label if i == 0 else None)
            mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
            ax.errorbar(i + offset, 100 * mean, yerr=100 * std, color=color, capsize=6, marker="_", markersize=18)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _plot_curves(entries: list[dict[str, Any]], path: Path, title: str, all_seeds: bool = False) -> None:
    """Validation loss and accuracy per epoch (and the learning rate), one line per entry (or per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 4))
    shown: list[list[dict[str, float]]] = []
    for e in entries:
        for i, run in enumerate(e["runs"] if all_seeds else e["runs"][:1]):
            h = read_metrics(Path(run["run_dir"]) / "metrics.csv")
            shown.append(h)
            epochs = [r["epoch"] for r in h]
            label = f"{e['name']} seed {i}" if all_seeds else e["name"]
            line = loss_ax.plot(epochs, [r["val_loss"] for r in h], marker=".", label=label)[0]
            acc_ax.plot(epochs, [100 * r["val_acc"] for r in h], marker=".", color=line.get_color())
            lr_ax.plot(epochs, [r["lr"] for r in h], marker=".", color=line.get_color())
            best = run["best_epoch"]
            loss_ax.scatter([best], [h[best - 1]["val_loss"]], color=line.get_color(), s=80, facecolors="none")
    loss_ax.set(title="validation loss (circle: kept epoch)", xlabel="epoch", yscale="log")
    acc_ax.set(title="validation accuracy (%)", xlabel="epoch")
    lr_ax.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
    lo = min(100 * r["val_acc"] for h in shown for r in h[1:])
    acc_ax.set_ylim(max(lo - 0.2, 90), 100)
    loss_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=("keras", "improve", "production", "preprocess"))
    p.add_argument("--runs", default=str(ROOT / "runs"), help="where runs are kept and reused (default runs/)")
    p.add_argument("--fresh", action="store_true", help="train again even where finished runs exist")
    p.add_argument("--seeds", type=int, default=3, help="improve, production: seeds per entry (default 3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (a study's own settings win), e.g. train.threads=1")
    p.add_argument("--folds", type=int, default=5, help="keras: folds (default 5)")
    p.add_argument("--epochs", type=int, default=KERAS_EPOCHS, help=f"keras: online epochs (default {KERAS_EPOCHS})")
    p.add_argument("--data-dir", default=str(ROOT / "data" / "mnist"), help="keras: the IDX files (default data/mnist)")
    p.add_argument("--img-dir", default=str(IMG), help="where figures go (default docs/img)")
    p.add_argument("--out", help="JSON (default benchmarks/results/study-<name>.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    if args.study == "preprocess":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import study_preprocess

        study_preprocess.main(rest + (["--out", args.out] if args.out else []))
        return
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    started = time.perf_counter()
    result = {"keras": study_keras, "improve": study_improve, "production": study_production}[args.study](args)
    command = " ".join(["python", "benchmarks/studies.py", *(argv or sys.argv[1:])])
    result.update(machine=machine_info(), command=command,
                  wall_seconds=round(time.perf_counter() - started, 1),
                  test_set="reported, never used to choose anything")  # fmt: skip
    save_json(result, json_path(args))


if __name__ == "__main__":
    main()
