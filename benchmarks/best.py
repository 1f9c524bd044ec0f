"""How the best figures are produced: configs/best.yaml over several seeds, test-time shifts, and an ensemble.

1. Training (`--train`): `benchmarks/recipe_seeds.py --config configs/best.yaml --seeds 0 1 2 --keep RUNS` trains
   one run per seed (each seed changes the initial weights, the validation split, the shuffle and the
   augmentation) and keeps the run folders as RUNS/seed-N. Without --train, the runs already in RUNS are measured.
2. Each run's kept checkpoint (chosen on its own validation loss) is scored on its validation split and on the
   test set, as trained and with test-time augmentation by small translations (the mean softmax over the image and
   its copies shifted by --tta-pixels left, right, up and down). Whether shifts help is read on validation; the
   test figures are printed, never used to choose.
3. The runs together, as `digitkit ensemble RUN...` combines them (the equal-weight mean of the members'
   probabilities, taken here from the test probabilities of step 2 instead of a second forward pass). Its
   members were trained on each other's validation images, so no clean validation figure exists for the ensemble.

Prints a table and writes JSON (default benchmarks/results/best.json).

    python benchmarks/best.py --train [--seeds 0 1 2] [--runs runs/best]
    python benchmarks/best.py [--runs runs/best] [--tta-pixels 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from digitkit import runs
from digitkit.evaluate import accuracy, predict_probs, predict_probs_shift_tta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from speedrun import cpu_info  # noqa: E402


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "best.yaml"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "best"), help="folder of seed-N run folders")
    p.add_argument("--train", action="store_true", help="train the seeds first (recipe_seeds.py --keep RUNS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tta-pixels", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "best.json"))
    args = p.parse_args()

    runs_dir = Path(args.runs)
    if args.train:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_seeds.py"), "--config", args.config,
                        "--seeds", *map(str, args.seeds), "--keep", str(runs_dir),
                        "--out", str(Path(args.out).with_name(f"seeds-{Path(args.config).stem}.json"))],
                       check=True)  # fmt: skip
    run_dirs = [runs_dir / f"seed-{s}" for s in args.seeds]
    missing = [str(d) for d in run_dirs if not (d / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"no finished run in {', '.join(missing)}; train them with --train")

    rows, test_probs, test_probs_tta, test_labels = [], [], [], None
    print(f"{'seed':>4s} {'epoch':>5s} {'val %':>7s} {'val+shifts':>10s} {'test %':>7s} {'test+shifts':>11s} "
          f"{'train min':>9s}")  # fmt: skip
    for run_dir in run_dirs:
        opened = runs.open_model(run_dir)
        cfg, model = opened.cfg, opened.model.eval()
        cfg.data.dir = str(ROOT / "data" / "mnist")
        _, val, test = runs.load_data(cfg)  # the run's own validation split (its seed), and the test set
        summary = json.loads((run_dir / "summary.json").read_text())
        fig = {}
        for name, ds in (("val", val), ("test", test)):
            probs = predict_probs(model, ds.images)
            probs_tta = predict_probs_shift_tta(model, ds.images, args.tta_pixels)
            fig[name], fig[f"{name}_shifts"] = accuracy(probs, ds.labels), accuracy(probs_tta, ds.labels)
            if name == "test":
                test_probs.append(probs)
                test_probs_tta.append(probs_tta)
                test_labels = ds.labels
        row = {"seed": cfg.seed, "run_dir": str(run_dir), "best_epoch": summary["best_epoch"],
               "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
               "total_seconds": summary["total_seconds"], "threads": summary["threads"],
               "val_accuracy": fig["val"], "val_accuracy_shifts": fig["val_shifts"],
               "test_accuracy": fig["test"], "test_accuracy_shifts": fig["test_shifts"],
               "test_accuracy_summary": summary["test_accuracy"]}  # fmt: skip
        rows.append(row)
        print(f"{cfg.seed:>4d} {row['best_epoch']:>5d} {100 * fig['val']:>7.2f} {100 * fig['val_shifts']:>10.2f} "
              f"{100 * fig['test']:>7.2f} {100 * fig['test_shifts']:>11.2f} {row['train_seconds'] / 60:>9.1f}",
              flush=True)  # fmt: skip

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in rows]
        m, s = mean_std(values)
        return {"mean": m, "std": s, "min": min(values), "max": max(values)}

    ensemble = accuracy(sum(test_probs) / len(test_probs), test_labels)
    ensemble_tta = accuracy(sum(test_probs_tta) / len(test_probs_tta), test_labels)
    result = {
        "benchmark": "best",
        "config": str(Path(args.config).resolve().relative_to(ROOT)),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n": len(rows),
        "tta_pixels": args.tta_pixels,
        "test_accuracy": stats("test_accuracy"),
        "test_accuracy_shifts": stats("test_accuracy_shifts"),
        "val_accuracy": stats("val_accuracy"),
        "val_accuracy_shifts": stats("val_accuracy_shifts"),
        "train_minutes": {k: v / 60 for k, v in stats("train_seconds").items()},
        "ensemble_of_seeds": {"members": len(rows), "weights": "equal", "test_accuracy": ensemble,
                              "test_accuracy_shifts": ensemble_tta,
                              "train_minutes_total": sum(r["train_seconds"] for r in rows) / 60},  # fmt: skip
        "goals": {"single_mean_0.9970_in_30_min": stats("test_accuracy")["mean"] >= 0.997
                  and max(r["train_seconds"] for r in rows) <= 1800,
                  "ensemble_0.9980_in_2_h": ensemble >= 0.998
                  and sum(r["train_seconds"] for r in rows) <= 7200},  # fmt: skip
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": rows,
    }
    t, ts, v, vs = (result[k] for k in ("test_accuracy", "test_accuracy_shifts", "val_accuracy",
                                        "val_accuracy_shifts"))  # fmt: skip
    print(f"single model: test {100 * t['mean']:.2f} +- {100 * t['std']:.2f}% (n={len(rows)}, min "
          f"{100 * t['min']:.2f}); with shifts {100 * ts['mean']:.2f} +- {100 * ts['std']:.2f}%; validation "
          f"{100 * v['mean']:.2f}% -> {100 * vs['mean']:.2f}% with shifts")  # fmt: skip
    print(f"ensemble of the {len(rows)} runs: test {100 * ensemble:.2f}% ({100 * ensemble_tta:.2f}% with shifts), "
          f"{result['ensemble_of_seeds']['train_minutes_total']:.0f} min of training in all")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
