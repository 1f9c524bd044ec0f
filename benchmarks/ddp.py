"""Data-parallel training against one process: throughput and accuracy of the same recipe, same seed.

Runs the recipe (default: configs/default.yaml cut to --epochs epochs on full MNIST) three ways, each as its own
command so thread settings do not leak between them:
  1 process, all cores' threads (train.threads=0: what `digitkit train` does)
  1 process, 1 thread             (what each rank of the data-parallel run gets)
  torchrun, --nproc N processes, 1 thread each (gloo on 127.0.0.1)
train.batch_size is the global batch, so all three take the same steps with the same learning-rate schedule.
Prints a table and writes benchmarks/results/ddp.json. On a machine with few cores expect little or no speed-up:
N processes share the same cores and add a gradient all-reduce per step.

    python benchmarks/ddp.py [--config configs/default.yaml] [--epochs 2] [--nproc 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from digitkit import train

ROOT = Path(__file__).resolve().parents[1]


def run(label: str, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = train.read_metrics(out / "metrics.csv")
    return {
        "label": label,
        "processes": summary["processes"],
        "threads_per_process": summary["threads"],
        "epochs": summary["epochs"],
        "train_images_per_s": round(sum(r["images_per_s"] for r in rows) / len(rows)),
        "train_seconds": summary["train_seconds"],
        "wall_seconds": round(wall, 1),
        "val_accuracy": summary["val_accuracy"],
        "test_accuracy": summary["test_accuracy"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (default 2: bounded time)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel run (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp.json"))
    args = p.parse_args()

    sets = [f"train.epochs={args.epochs}", "train.plots=false", "data.dir=data/mnist", *args.set]  # cwd: ROOT
    # Loopback only: a one-machine benchmark has no business on any other interface.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # row 1 uses every core
    env.update(PYTHONPATH=str(ROOT / "src"), GLOO_SOCKET_IFNAME="lo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plans = [
            ("1 process, all threads", [], "train.threads=0", {}),
            ("1 process, 1 thread", [], "train.threads=1", {"OMP_NUM_THREADS": "1"}),
            (f"torchrun, {args.nproc} processes x 1 thread",
             ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc)],
             "train.threads=1", {"OMP_NUM_THREADS": "1"}),
        ]  # fmt: skip
        for i, (label, launcher, threads, extra_env) in enumerate(plans):
            out = Path(tmp) / f"run{i}"
            overrides = [a for s in [*sets, threads] for a in ("--set", s)]
            cmd = [sys.executable, *launcher, "-m", "digitkit", "train", "--config", args.config, "--out", str(out),
                   "--json", "--quiet", *overrides]  # fmt: skip
            row = run(label, cmd, out, {**env, **extra_env})
            rows.append(row)
            print(f"{label:<34} {row['train_images_per_s']:>7,} img/s  train {row['train_seconds']:6.1f} s  "
                  f"wall {row['wall_seconds']:6.1f} s  val {100 * row['val_accuracy']:.2f}%  "
                  f"test {100 * row['test_accuracy']:.2f}%", flush=True)  # fmt: skip
    base = rows[0]["train_images_per_s"]
    for row in rows:
        row["speedup_vs_one_process"] = round(row["train_images_per_s"] / base, 2)
    result = {
        "benchmark": "ddp",
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if ROOT in Path(args.config).resolve().parents
        else args.config,
        "overrides": sets,
        "note": "train.batch_size is the global batch (each of N ranks takes batch_size / N); same seed in every "
        "row, one run each: the accuracy differences are within seed noise (see tests/test_distributed.py)",
        "rows": rows,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"speed-up of {rows[-1]['label']} over {rows[0]['label']}: {rows[-1]['speedup_vs_one_process']:.2f}x; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
