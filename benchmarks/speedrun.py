"""Time to 99%: `digitkit train --config configs/fast.yaml` over several seeds, timed as whole processes.

Each run is a fresh `digitkit train` process (interpreter start, imports, data load, training, validation, test
evaluation, run folder), timed from before the process starts until it exits: the wall-clock a user waits. The
test accuracy is read from the run's summary.json; it is printed, never used to choose anything. Also times
`digitkit --help`. Prints mean/min/max accuracy and the median wall-clock, and writes JSON.

One warm-up process runs first (not counted) so the page cache holds the interpreter, torch and the data, as on
any machine that has run digitkit before; the uncompressed-data cache (~/.cache/digitkit) is warmed by it too.

    python benchmarks/speedrun.py [--config configs/fast.yaml] [--seeds 0 1 2 3 4] [--set KEY=VALUE] [--out FILE]
    python benchmarks/speedrun.py --probe    # the techniques one at a time, seed 0: validation accuracy and time

--probe runs the config once per variant (the recipe as is, then one change each: bfloat16 autocast on the CPU,
torch.compile, no channels_last, one thread, the standard (NCHW Conv-BN-ReLU-Pool) cnn3_slim, deskew off) and
reports validation accuracy, training seconds and whole-process seconds; choices are made on validation only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITKIT = [sys.executable, "-m", "digitkit"]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc


def cpu_info() -> dict[str, object]:
    info: dict[str, object] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["avx512f"] = "avx512f" in flags
            info["avx512_bf16"] = "avx512_bf16" in flags
            info["amx_bf16"] = "amx_bf16" in flags
            break
    return info


PROBES = {
    "recipe as is": [],
    "cpu_bf16 autocast": ["train.cpu_bf16=true"],
    "torch.compile": ["train.compile=true"],
    "channels_last off": ["train.channels_last=false"],
    "1 thread": ["train.threads=1"],
    "cnn3_slim (Conv-BN-ReLU-Pool, full image)": ["model.name=cnn3_slim"],
    "deskew off": ["preprocess.deskew=false"],
}


def probe(config: str, overrides: list[str], out: Path | None) -> None:
    rows = []
    print(f"{'variant':44s} {'val %':>7s} {'train s':>8s} {'wall s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(PROBES.items()):
            sets = [x for kv in [*overrides, *extra] for x in ("--set", kv)]
            wall, _ = timed([*DIGITKIT, "train", "--config", config, *sets, "--out", f"{tmp}/{i}", "--quiet"])
            s = json.loads((Path(tmp) / str(i) / "summary.json").read_text())
            rows.append({"variant": name, "overrides": extra, "val_accuracy": s["val_accuracy"],
                         "train_seconds": s["train_seconds"], "wall_seconds": round(wall, 2)})  # fmt: skip
            print(f"{name:44s} {100 * s['val_accuracy']:>7.2f} {s['train_seconds']:>8.2f} {wall:>7.2f}", flush=True)
    result = {"benchmark": "speedrun-probe", "config": config, "overrides": overrides,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": 0, "cpu": cpu_info(), "variants": rows}  # fmt: skip
    path = out or ROOT / "benchmarks" / "results" / f"speedrun-probe-{Path(config).stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fast.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="JSON file (default: benchmarks/results/speedrun-<config name>.json)")
    p.add_argument("--probe", action="store_true", help="one run per technique variant instead of the seeds")
    args = p.parse_args()
    if args.probe:
        return probe(args.config, args.set, Path(args.out) if args.out else None)

    name = Path(args.config).stem
    overrides = [x for kv in args.set for x in ("--set", kv)]
    help_seconds = sorted(timed([*DIGITKIT, "--help"])[0] for _ in range(5))[2]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timed([*DIGITKIT, "train", "--config", args.config, *overrides, "--set", "train.epochs=1",
               "--set", "train.steps_per_epoch=20", "--set", "train.onecycle_pct_start=0.5",
               "--out", f"{tmp}/warmup", "--quiet"])  # fmt: skip
        print(f"{'seed':>4s} {'val %':>7s} {'test %':>7s} {'train s':>8s} {'wall s':>7s}")
        for seed in args.seeds:
            out = Path(tmp) / f"seed{seed}"
            wall, _ = timed([*DIGITKIT, "train", "--config", args.config, *overrides, "--set", f"seed={seed}",
                             "--out", str(out), "--quiet"])  # fmt: skip
            s = json.loads((out / "summary.json").read_text())
            rows.append({"seed": seed, "val_accuracy": s["val_accuracy"], "test_accuracy": s["test_accuracy"],
                         "train_seconds": s["train_seconds"], "in_process_seconds": s["total_seconds"],
                         "wall_seconds": round(wall, 2)})  # fmt: skip
            print(f"{seed:>4d} {100 * s['val_accuracy']:>7.2f} {100 * s['test_accuracy']:>7.2f} "
                  f"{s['train_seconds']:>8.2f} {wall:>7.2f}", flush=True)  # fmt: skip
    acc = [r["test_accuracy"] for r in rows]
    walls = [r["wall_seconds"] for r in rows]
    result = {
        "benchmark": "speedrun",
        "config": args.config,
        "overrides": args.set,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "n": len(rows),
        "test_accuracy_mean": statistics.mean(acc),
        "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "test_accuracy_min": min(acc),
        "test_accuracy_max": max(acc),
        "wall_seconds_median": statistics.median(walls),
        "wall_seconds_max": max(walls),
        "help_seconds_median": round(help_seconds, 3),
        "goal": {"test_accuracy_mean": 0.99, "wall_seconds": 6.0,
                 "met": statistics.mean(acc) >= 0.99 and statistics.median(walls) <= 6.0},  # fmt: skip
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "runs": rows,
    }
    print(f"test accuracy mean {100 * result['test_accuracy_mean']:.2f}% (min {100 * min(acc):.2f}, max "
          f"{100 * max(acc):.2f}, n={len(rows)}); median wall-clock {result['wall_seconds_median']:.2f} s per "
          f"process; digitkit --help {help_seconds:.2f} s")  # fmt: skip
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"speedrun-{name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
