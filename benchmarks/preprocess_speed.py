"""Preprocessing time, p50 at 1 torch thread, in-process: a 28x28 PNG (an MNIST-format digit, what a canvas page
sends) and a 320 px phone photo (JPEG), both as bytes, the inputs `benchmarks/realworld.py` times. With
--baseline, another version of preprocess.py (e.g. `git show HEAD:src/digitkit/preprocess.py > /tmp/old.py`) is
timed in the same run, calls interleaved, so a machine shared with training jobs slows both alike: compare the
ratio, not the milliseconds.

    python benchmarks/preprocess_speed.py [--baseline /tmp/old.py] [--calls 300] [--repeats 3] [--profile] \
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from digitkit import preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realworld import timing_inputs  # noqa: E402 - the same inputs as the realworld benchmark


def _module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("preprocess_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _p50s(versions: dict[str, ModuleType], inputs: dict[str, bytes], calls: int) -> dict[tuple[str, str], float]:
    """p50 ms per (version, input) over `calls` rounds, the versions' calls interleaved within each round."""
    times: dict[tuple[str, str], list[float]] = {(v, k): [] for v in versions for k in inputs}
    for _ in range(calls):
        for v, module in versions.items():
            for k, blob in inputs.items():
                t0 = time.perf_counter()
                module.preprocess(blob)
                times[(v, k)].append(time.perf_counter() - t0)
    return {key: round(1000 * statistics.median(t), 3) for key, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="another preprocess.py to time alongside (same inputs, interleaved)")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the JSON keeps each and their median")
    p.add_argument("--source", choices=("val", "test"), default="val")
    p.add_argument("--profile", action="store_true", help="print the top functions of the current version")
    p.add_argument("--out", help="JSON file for the figures")
    args = p.parse_args()
    torch.set_num_threads(1)
    inputs = timing_inputs(args.source, 200, 0)
    versions = {"current": preprocess}
    if args.baseline:
        versions["baseline"] = _module(args.baseline)
    for module in versions.values():  # warm up: imports, caches
        for blob in inputs.values():
            for _ in range(10):
                module.preprocess(blob)
    result = {"calls": args.calls, "repeats": args.repeats, "torch_threads": 1, "python": platform.python_version(),
              "repeat_runs": [], "inputs": {}}  # fmt: skip
    for r in range(args.repeats):
        p50 = _p50s(versions, inputs, args.calls)
        result["repeat_runs"].append({k: {v: p50[(v, k)] for v in versions} for k in inputs})
        print(f"run {r + 1} of {args.repeats}:")
        for k, blob in inputs.items():
            row = {v: p50[(v, k)] for v in versions}
            ratio = f"  ratio {row['current'] / row['baseline']:.2f}" if args.baseline else ""
            print(f"  {k:<16s} {len(blob):7d} bytes  " + "  ".join(f"{v} {t:.3f} ms" for v, t in row.items()) + ratio)
    for k, blob in inputs.items():
        runs_k = [run[k] for run in result["repeat_runs"]]
        row = {v: round(statistics.median(run[v] for run in runs_k), 3) for v in versions}
        if args.baseline:  # the median of the per-run ratios: each run's two versions saw the same load
            row["ratio"] = round(statistics.median(run["current"] / run["baseline"] for run in runs_k), 3)
        result["inputs"][k] = {"bytes": len(blob), "p50_ms": row,
                               "input_kind": preprocess.preprocess(blob).record["input_kind"]}  # fmt: skip
        print(f"median of {args.repeats}: {k:<16s} " + "  ".join(
            f"{v} {t:.3f} ms" if v != "ratio" else f"ratio {t:.2f}" for v, t in row.items()))  # fmt: skip
    if args.profile:
        for k, blob in inputs.items():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                preprocess.preprocess(blob)
            prof.disable()
            print(f"\n{k}: top functions by own time (100 calls, profiler overhead included)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
