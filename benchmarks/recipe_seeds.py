"""A recipe's test accuracy and time over several seeds: the evidence behind a config's accuracy claim.

Each seed changes the initial weights, the validation split, the shuffling and the augmentation. The
checkpoint is chosen on validation; the test set is read once per run, after training. Prints a table and
mean +- std (sample std, n = number of seeds) and writes JSON.

    python benchmarks/recipe_seeds.py [--config configs/default.yaml] [--seeds 0 1 2] [--out FILE] [--keep DIR]

--keep DIR keeps each run folder as DIR/seed-N (for `digitkit evaluate` or `digitkit ensemble` later); without it
the runs are written to a temporary folder and deleted. --runs RUN... reads runs already trained with the config
instead (each run's stored config must be the config at its seed, apart from data.dir, train.threads and the
inference settings, which training does not read, and data.negatives_dir, compared by its files' checksums; the time
is then the run's own total, as measured while it trained).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from digitkit import config, runs

ROOT = Path(__file__).resolve().parents[1]


def _sums(folder: str) -> str:
    """An IDX folder's SHA256SUMS.raw (the sums of its uncompressed files), or the path when it has none."""
    path = Path(folder) if Path(folder).is_absolute() else ROOT / folder
    sums = path / "SHA256SUMS.raw"
    return sums.read_text() if sums.is_file() else str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="JSON file (default: benchmarks/results/seeds-<config name>.json)")
    p.add_argument("--keep", metavar="DIR", help="keep the run folders as DIR/seed-N")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="summarise these finished runs of the config instead")
    args = p.parse_args()
    if args.runs:
        args.seeds = []

    name = Path(args.config).stem
    rows = []
    print(f"{'seed':>4s} {'epochs':>6s} {'best':>4s} {'val %':>7s} {'test %':>7s} {'train s':>8s} {'total s':>8s}")
    for seed in args.seeds:
        cfg = config.load(args.config, [*args.set, f"seed={seed}", f"data.dir={ROOT / 'data' / 'mnist'}"])
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.keep) / f"seed-{seed}" if args.keep else Path(tmp) / "run"
            started = time.perf_counter()
            s = runs.train_run(cfg, out=out)
            wall = time.perf_counter() - started
        row = {k: s[k] for k in ("epochs", "best_epoch", "val_accuracy", "test_accuracy", "train_seconds")}
        kept = {"run_dir": str(out)} if args.keep else {}
        rows.append({"seed": seed, **row, "wall_seconds": round(wall, 1), **kept})
        print(f"{seed:>4d} {s['epochs']:>6d} {s['best_epoch']:>4d} {100 * s['val_accuracy']:>7.2f} "
              f"{100 * s['test_accuracy']:>7.2f} {s['train_seconds']:>8.1f} {wall:>8.1f}", flush=True)  # fmt: skip

    for run in args.runs or []:
        s = json.loads((Path(run) / "summary.json").read_text())
        stored = config.to_dict(config.load(Path(run) / "config.yaml"))
        wanted = config.to_dict(config.load(args.config, [*args.set, f"seed={stored['seed']}"]))
        for d in (stored, wanted):
            d["data"].pop("dir"), d["train"].pop("threads"), d.pop("inference")  # what training does not read
            if d["data"].get("negatives_dir"):  # the same non-digits wherever they were: compared by their sums
                d["data"]["negatives_dir"] = _sums(d["data"]["negatives_dir"])
        if stored != wanted:
            raise SystemExit(f"{run}: trained with another config than {args.config} at seed {stored['seed']}")
        row = {k: s[k] for k in ("epochs", "best_epoch", "val_accuracy", "test_accuracy", "train_seconds")}
        rows.append({"seed": s["seed"], **row, "wall_seconds": s["total_seconds"], "run_dir": str(run)})
        print(f"{s['seed']:>4d} {s['epochs']:>6d} {s['best_epoch']:>4d} {100 * s['val_accuracy']:>7.2f} "
              f"{100 * s['test_accuracy']:>7.2f} {s['train_seconds']:>8.1f} {s['total_seconds']:>8.1f}")

    def mean_std(key: str) -> tuple[float, float]:
        values = [r[key] for r in rows]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    test_mean, test_std = mean_std("test_accuracy")
    wall_mean, wall_std = mean_std("wall_seconds")
    print(f"test accuracy {100 * test_mean:.2f} +- {100 * test_std:.2f}% (n={len(rows)}), "
          f"min {100 * min(r['test_accuracy'] for r in rows):.2f}%; "
          f"train+eval {wall_mean:.0f} +- {wall_std:.0f} s per run")  # fmt: skip
    result = {
        "benchmark": "recipe_seeds",
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if ROOT in Path(args.config).resolve().parents
        else args.config,
        "overrides": args.set,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n": len(rows),
        "test_accuracy_mean": test_mean,
        "test_accuracy_std": test_std,
        "test_accuracy_min": min(r["test_accuracy"] for r in rows),
        "wall_seconds_mean": wall_mean,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"seeds-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
