"""The speed ladder: each rung's config over several seeds, timed as whole `digitkit train` processes.

The rungs (RUNGS): configs/fast.yaml (99.0% mean in 6 s), configs/fast-995.yaml (99.5% in 30 s) and
configs/fast-997.yaml (99.7% in 8 minutes), each promise on the AVX-512 machine (2 vCPUs). Each run is a fresh
`digitkit train` process (interpreter start, imports, data load, training, validation, test evaluation, run
folder), timed from before the process starts until it exits: the wall-clock a user waits. The test accuracy is
read from the run's summary.json; it is printed, never used to choose anything. Also times `digitkit --help`.
Prints each rung's mean/min/max accuracy, median wall-clock and whether its goal is met, and writes one JSON.

One warm-up process runs first for each rung (not counted) so the page cache holds the interpreter, torch and the
data, as on any machine that has run digitkit before; the uncompressed-data cache (~/.cache/digitkit) is warmed by
it too.

    python benchmarks/speedrun.py [--rungs fast fast-995 fast-997] [--seeds 0 1 2 3 4] [--set KEY=VALUE] [--out FILE]
    python benchmarks/speedrun.py --config CONFIG     # one config, no goal: speedrun-<name>.json
    python benchmarks/speedrun.py --probe [--config configs/fast.yaml] [--repeats 3]   # each technique off in turn

--probe runs the config once per variant (the recipe as is, then one change each: float32 instead of bfloat16,
torch.compile, no channels_last, one thread, the standard (NCHW Conv-BN-ReLU-Pool) cnn3_slim, deskew off, the whole
pass) and reports validation accuracy, training seconds and whole-process seconds; choices are made on validation
only.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIGITKIT = [sys.executable, "-m", "digitkit"]


# Python writes compiled bytecode (__pycache__) on first import unless PYTHONDONTWRITEBYTECODE is set, as it is in
# some sandboxes and CI images; the processes here run as on an ordinary machine, where the warm-up run leaves
# digitkit's bytecode behind (pip installs have it from the start). Worth about 0.1 s of CPU per process.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV)
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
    "float32 (cpu_bf16 off)": ["train.cpu_bf16=false"],
    "torch.compile": ["train.compile=true"],
    "channels_last off": ["train.channels_last=false"],
    "1 thread": ["train.threads=1"],
    "cnn3_slim (Conv-BN-ReLU-Pool, full image)": ["model.name=cnn3_slim"],
    "deskew off": ["preprocess.deskew=false"],
    "the whole pass (421 batches, not 380)": ["train.steps_per_epoch=0"],
}


def probe(config: str, overrides: list[str], out: Path | None, repeats: int) -> None:
    """Each variant `repeats` times, interleaved (round after round of all variants, so a slow spell of the shared
    machine hits every variant alike); medians of the times. Validation accuracy is the same on every repeat."""
    runs: dict[str, list[dict]] = {name: [] for name in PROBES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for i, (name, extra) in enumerate(PROBES.items()):
                sets = [x for kv in [*overrides, *extra] for x in ("--set", kv)]
                folder = Path(tmp) / f"{r}-{i}"
                wall, _ = timed([*DIGITKIT, "train", "--config", config, *sets, "--out", str(folder), "--quiet"])
                s = json.loads((folder / "summary.json").read_text())
                runs[name].append({"val_accuracy": s["val_accuracy"], "train_seconds": s["train_seconds"],
                                   "wall_seconds": round(wall, 2)})  # fmt: skip
            print(f"round {r + 1} of {repeats} done", flush=True)
    rows = []
    print(f"{'variant':44s} {'val %':>7s} {'train s':>8s} {'wall s':>7s}  (medians of {repeats})")
    for name, extra in PROBES.items():
        got = runs[name]
        row = {"variant": name, "overrides": extra, "val_accuracy": got[0]["val_accuracy"],
               "train_seconds": statistics.median(g["train_seconds"] for g in got),
               "wall_seconds": statistics.median(g["wall_seconds"] for g in got), "repeats": got}  # fmt: skip
        rows.append(row)
        print(f"{name:44s} {100 * row['val_accuracy']:>7.2f} {row['train_seconds']:>8.2f} {row['wall_seconds']:>7.2f}")
    result = {"benchmark": "speedrun-probe", "config": config, "overrides": overrides, "repeats": repeats,
              "statistic": "median", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": 0, "cpu": cpu_info(),
              "variants": rows}  # fmt: skip
    path = out or ROOT / "benchmarks" / "results" / f"speedrun-probe-{Path(config).stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


RUNGS = {
    "fast": ("configs/fast.yaml", 0.990, 6.0),
    "fast-995": ("configs/fast-995.yaml", 0.995, 30.0),
    "fast-997": ("configs/fast-997.yaml", 0.997, 480.0),
}
"""The ladder: rung -> (config, the mean test accuracy it promises, in at most this many seconds per process)."""


def earlier_rungs(path: Path) -> list[dict[str, Any]]:
    """The rungs a ladder JSON already holds (none when it is missing or not one)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    rungs = earlier.get("rungs") if isinstance(earlier, dict) else None
    return [r for r in rungs if isinstance(r, dict) and "rung" in r] if isinstance(rungs, list) else []


def run_rung(config: str, seeds: list[int], sets: list[str], goal: tuple[float, float] | None) -> dict[str, Any]:
    """`digitkit train --config CONFIG` once per seed as whole processes, after one warm-up: the rung's JSON."""
    overrides = [x for kv in sets for x in ("--set", kv)]
    torch_import_seconds = sorted(timed([sys.executable, "-c", "import torch"])[0] for _ in range(3))[1]
    rows = []
    print(f"== {config}")
    with tempfile.TemporaryDirectory() as tmp:
        timed([*DIGITKIT, "train", "--config", config, *overrides, "--set", "train.epochs=1",
               "--set", "train.steps_per_epoch=20", "--set", "train.onecycle_pct_start=0.5",
               "--out", f"{tmp}/warmup", "--quiet"])  # fmt: skip
        print(f"{'seed':>4s} {'val %':>7s} {'test %':>7s} {'train s':>8s} {'wall s':>7s}")
        for seed in seeds:
            out = Path(tmp) / f"seed{seed}"
            wall, _ = timed([*DIGITKIT, "train", "--config", config, *overrides, "--set", f"seed={seed}",
                             "--out", str(out), "--quiet"])  # fmt: skip
            s = json.loads((out / "summary.json").read_text())
            # A rung whose config scores with shift TTA (train.tta_shift_px) is measured as it answers: with it.
            tta = s.get("tta") or {}
            rows.append({"seed": seed, "val_accuracy": tta.get("val_accuracy", s["val_accuracy"]),
                         "test_accuracy": tta.get("test_accuracy", s["test_accuracy"]),
                         "plain_val_accuracy": s["val_accuracy"], "plain_test_accuracy": s["test_accuracy"],
                         "tta_shift_px": tta.get("shift_px", 0), "epochs": s["epochs"],
                         "data_seconds": s["data_seconds"],
                         "train_seconds": s["train_seconds"], "in_process_seconds": s["total_seconds"],
                         "finish_seconds": s["finish_seconds"], "wall_seconds": round(wall, 2)})  # fmt: skip
            plain = f"  (without TTA: val {100 * s['val_accuracy']:.2f}, test {100 * s['test_accuracy']:.2f})"
            print(f"{seed:>4d} {100 * rows[-1]['val_accuracy']:>7.2f} {100 * rows[-1]['test_accuracy']:>7.2f} "
                  f"{s['train_seconds']:>8.2f} {wall:>7.2f}{plain if tta else ''}", flush=True)  # fmt: skip
    acc = [r["test_accuracy"] for r in rows]
    val = [r["val_accuracy"] for r in rows]

    def median_of(part: Callable[[dict], float]) -> float:  # a part computed within each run, then the median
        return round(statistics.median(part(r) for r in rows), 2)

    def median(key: str) -> float:
        return median_of(lambda r: r[key])

    # Where the wall-clock goes (medians over the runs): the in-process part is from the run's summary.json; "start
    # and exit" is the rest (interpreter start, imports, argument parsing, printing, interpreter teardown). The
    # remainders are taken within each run before the median, so each is one run's own figure.
    stages = {
        "import torch (separate process)": round(torch_import_seconds, 2),
        "data: read, deskew, split": median("data_seconds"),
        "training (each epoch's validation included)": median("train_seconds"),
        "rest of the run (model, validation, checkpoints)": median_of(
            lambda r: r["in_process_seconds"] - r["data_seconds"] - r["train_seconds"]),
        "final validation, test evaluation, summary": median("finish_seconds"),
        "start and exit (imports included)": median_of(
            lambda r: r["wall_seconds"] - r["in_process_seconds"] - r["finish_seconds"]),
    }
    walls = [r["wall_seconds"] for r in rows]
    result: dict[str, Any] = {
        "config": config,
        "overrides": sets,
        "n": len(rows),
        "val_accuracy_mean": statistics.mean(val),
        "test_accuracy_mean": statistics.mean(acc),
        "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "tta_shift_px": rows[0]["tta_shift_px"] if rows else 0,
        "plain_test_accuracy_mean": statistics.mean(r["plain_test_accuracy"] for r in rows),
        "plain_val_accuracy_mean": statistics.mean(r["plain_val_accuracy"] for r in rows),
        "test_accuracy_min": min(acc),
        "test_accuracy_max": max(acc),
        "wall_seconds_median": statistics.median(walls),
        "wall_seconds_max": max(walls),
        "stages_median_seconds": stages,
    }
    if goal is not None:
        result["goal"] = {"test_accuracy_mean": goal[0], "wall_seconds": goal[1],
                          "met": result["test_accuracy_mean"] >= goal[0] and result["wall_seconds_median"] <= goal[1]}
    result["runs"] = rows
    print(f"test accuracy mean {100 * result['test_accuracy_mean']:.2f}% (min {100 * min(acc):.2f}, max "
          f"{100 * max(acc):.2f}, n={len(rows)}); median wall-clock {result['wall_seconds_median']:.2f} s per "
          "process" + (f"; goal {100 * goal[0]:.1f}% in {goal[1]:g} s: "
                       f"{'met' if result['goal']['met'] else 'NOT met'}" if goal else ""))  # fmt: skip
    print("where the time goes (medians): " + "; ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rungs", nargs="+", choices=list(RUNGS), default=list(RUNGS), help="the rungs to run (all)")
    p.add_argument("--config", help="one config instead of the ladder's rungs (no goal)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="JSON file (default: benchmarks/results/speedrun.json, or speedrun-<config name>.json "
                   "with --config)")  # fmt: skip
    p.add_argument("--probe", action="store_true", help="one run per technique variant instead of the seeds")
    p.add_argument("--repeats", type=int, default=3, help="--probe: runs of each variant, interleaved (median)")
    args = p.parse_args()
    if args.probe:
        return probe(args.config or RUNGS["fast"][0], args.set, Path(args.out) if args.out else None, args.repeats)

    help_seconds = sorted(timed([*DIGITKIT, "--help"])[0] for _ in range(5))[2]
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"speedrun-{Path(args.config).stem}.json" if args.config else "speedrun.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "speedrun",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/speedrun.py " + " ".join(sys.argv[1:]),
        "help_seconds_median": round(help_seconds, 3),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "rungs": [],
    }
    todo = [(None, args.config, None)] if args.config else [(n, RUNGS[n][0], RUNGS[n][1:]) for n in args.rungs]
    # Rungs not run this time keep their entries (each says when and by which command it was measured).
    kept = [] if args.config else [r for r in earlier_rungs(out_path) if r.get("rung") not in args.rungs]
    for name, config, goal in todo:
        rung = run_rung(config, args.seeds, args.set, goal)
        stamp = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": result["command"]}
        result["rungs"].append({"rung": name, **stamp, **rung} if name else rung)
        order = list(RUNGS)
        everything = sorted(kept + result["rungs"], key=lambda r: order.index(r["rung"]) if r.get("rung") in order
                            else len(order))  # fmt: skip
        # after each rung: a long ladder keeps what it has measured
        out_path.write_text(json.dumps({**result, "rungs": everything}, indent=2) + "\n")
    rungs = result["rungs"]
    print(f"digitkit --help {help_seconds:.2f} s")
    for r in rungs:
        if "goal" in r:
            print(f"{r.get('rung', r['config']):10s} {100 * r['test_accuracy_mean']:.2f}% mean (min "
                  f"{100 * r['test_accuracy_min']:.2f}) in {r['wall_seconds_median']:.1f} s: goal "
                  f"{'met' if r['goal']['met'] else 'NOT met'}")  # fmt: skip
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
