"""The fixed costs behind fast.yaml's time: what a few-second run pays besides training, each measured directly.

- `import torch`, and `import torch._dynamo` after it (what every torch.optim optimizer imports on its first step;
  digitkit.optim does not);
- interpreter exit after `import torch`, with and without `gc.freeze()` first (what `digitkit` does);
- deskewing the 70,000 MNIST images, computed and read back from the cache (`runs.deskewed`);
- evaluation time per image by batch size, for cnn_fast, cnn3 and cnn_deep (channels_last, float32).

Process-level figures are medians of fresh processes, run one after another. Writes benchmarks/results/startup.json.

    python benchmarks/startup.py [--repeats 5]
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from speedrun import cpu_info  # noqa: E402

IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
IMPORT_DYNAMO = "import time, torch; t = time.perf_counter(); import torch._dynamo; print(time.perf_counter() - t)"
EXIT = "import time, gc, torch; {freeze}; print(time.time(), flush=True)"


def in_fresh_process(code: str) -> float:
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def exit_seconds(freeze: bool) -> float:
    """From the script's last line to the end of the process."""
    code = EXIT.format(freeze="gc.freeze()" if freeze else "pass")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return time.time() - float(out)


def eval_micros(model_name: str, batch: int, images: object) -> float:
    import torch

    from digitkit.models import create_model

    model = create_model(model_name).eval().to(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            for chunk in images.split(batch):
                model(chunk.float().div_(255).contiguous(memory_format=torch.channels_last))
            times.append(time.perf_counter() - t)
    return statistics.median(times) / len(images) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup.json"))
    args = p.parse_args()
    n = args.repeats

    def med(fn, *a) -> float:
        return round(statistics.median(fn(*a) for _ in range(n)), 3)

    process = {
        "import torch": med(in_fresh_process, IMPORT_TORCH),
        "import torch._dynamo after torch": med(in_fresh_process, IMPORT_DYNAMO),
        "exit after import torch": med(exit_seconds, False),
        "exit after import torch, gc.freeze() first": med(exit_seconds, True),
    }
    for k, v in process.items():
        print(f"{k:<45s} {v:6.3f} s", flush=True)

    import torch

    from digitkit import data, runs

    with tempfile.TemporaryDirectory() as cache:
        os.environ["DIGITKIT_CACHE_DIR"] = cache
        sets = [data.load_split(ROOT / "data" / "mnist", s).images for s in ("train", "test")]
        t = time.perf_counter()
        for images in sets:
            runs.deskewed(images)
        computed = time.perf_counter() - t
        reads = []
        for _ in range(n):
            t = time.perf_counter()
            for images in sets:
                runs.deskewed(images)
            reads.append(time.perf_counter() - t)
    deskew = {"computed and cached (first run)": round(computed, 3),
              "read from the cache": round(statistics.median(reads), 3)}
    for k, v in deskew.items():
        print(f"deskew 70,000 images, {k:<31s} {v:6.3f} s", flush=True)

    images = data.load_split(ROOT / "data" / "mnist", "test").images[:4000]
    batches = (128, 256, 1000, 2000)
    evaluation = {}
    print(f"{'evaluation, us per image':<26s}" + "".join(f"{b:>8d}" for b in batches))
    for name in ("cnn_fast", "cnn3", "cnn_deep"):
        evaluation[name] = {str(b): round(eval_micros(name, b, images), 1) for b in batches}
        print(f"{name:<26s}" + "".join(f"{evaluation[name][str(b)]:>8.1f}" for b in batches), flush=True)

    result = {"benchmark": "startup", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeats": n,
              "process_seconds": process, "deskew_seconds": deskew, "eval_micros_per_image": evaluation,
              "threads": torch.get_num_threads(), "cpu": cpu_info(), "torch": torch.__version__,
              "python": platform.python_version()}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
