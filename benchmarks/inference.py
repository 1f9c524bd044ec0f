"""Inference speed of every registered model on each engine: PyTorch eager, PyTorch with torch.compile, ONNX Runtime
fp32 and ONNX Runtime int8 (static, QDQ).

Batch-1 latency (p50/p99 over --calls calls, in-process, the input already a tensor/array: the model's own time) and
batch-1024 throughput (images/s, median of --repeats calls), on CPU threads as a 2-core machine gives them: batch 1
is timed with 1 and 2 threads and the faster is reported (with its setting), batch 1024 with 2 threads. PyTorch
eager is timed in both memory formats and the faster is reported. Speed needs no training: the weights are
untrained (the same arithmetic); the accuracy behind "the fastest model that reaches 99%" comes from recorded runs
(`benchmarks/results/seeds-*.json`), named in the output. torch.compile costs about a minute per model and shape
on 2 cores, so by default it runs for the default recipe's model only (--compile MODEL... to add others).
The machine is shared and noisy: compare engines within one run (ratios), not across runs.

    python benchmarks/inference.py [--models cnn3_slim mlp] [--compile cnn3_slim] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from digitkit import data, export
from digitkit.engine import INPUT_NAME, OnnxModel
from digitkit.models import count_macs, count_params, create_model, list_models

ROOT = Path(__file__).resolve().parents[1]
BATCH = 1024
ACCURACY_EVIDENCE = {
    # model -> recorded test accuracies of shipped recipes (mean over seeds); no other model has a recorded run.
    "cnn3_slim": ["seeds-default.json", "seeds-realworld.json"],
    "cnn3_tiny": ["seeds-edge.json"],
}


def torch_eager(model: torch.nn.Module, x1: torch.Tensor, xb: torch.Tensor, calls: int, repeats: int) -> dict:
    """Both memory formats; the faster one for each figure, named."""
    rows = {}
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        m = model.to(memory_format=fmt)
        a1, ab = x1.contiguous(memory_format=fmt), xb.contiguous(memory_format=fmt)
        with torch.inference_mode():
            rows[fmt_name] = timed(lambda x, m=m: m(x).softmax(1), torch.set_num_threads, a1, ab, calls, repeats)
    model.to(memory_format=torch.contiguous_format)
    b1 = min(rows, key=lambda k: rows[k]["batch1_p50_ms"])
    bb = max(rows, key=lambda k: rows[k]["batch_images_per_s"])
    return {**rows[b1], "batch1_memory_format": b1, "batch_images_per_s": rows[bb]["batch_images_per_s"],
            "batch_memory_format": bb}  # fmt: skip


def torch_compiled(model: torch.nn.Module, x1: torch.Tensor, xb: torch.Tensor, calls: int, repeats: int) -> dict:
    """One static graph per batch shape (automatic dynamic shapes off, so batch 1 is not retraced with a symbolic
    batch once batch 1024 was seen); compile time measured separately."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.automatic_dynamic_shapes = False
    compiled = torch.compile(model, dynamic=False)
    seconds = {}
    with torch.inference_mode():
        for name, x in (("batch1", x1), ("batch", xb)):
            t0 = time.perf_counter()
            compiled(x)
            seconds[name] = round(time.perf_counter() - t0, 1)
        row = timed(lambda x: compiled(x).softmax(1), torch.set_num_threads, x1, xb, calls, repeats)
    return {**row, "compile_seconds": seconds}


def ort(path: Path, x1: np.ndarray, xb: np.ndarray, calls: int, repeats: int) -> dict:
    models = {t: OnnxModel(path, t) for t in (1, 2)}
    current = {"threads": 2}

    def run(x: np.ndarray) -> list:
        # As OnnxModel.probs runs a batch: in chunks of its `chunk` images (64 for conv nets, 1,024 for the MLP).
        m = models[current["threads"]]
        return [m.session.run(None, {INPUT_NAME: x[i : i + m.chunk]}) for i in range(0, len(x), m.chunk)]

    return timed(run, lambda t: current.update(threads=t), x1, xb, calls, repeats)


def timed(fn, set_threads, x1, xb, calls: int, repeats: int) -> dict:
    """Batch 1 with 1 and with 2 threads (the faster reported, with its setting); the batch with 2 threads."""
    by_threads = {}
    for t in (1, 2):
        set_threads(t)
        by_threads[t] = export.measure_speed(fn, x1, x1, calls, 1)
    best = min(by_threads, key=lambda t: by_threads[t]["batch1_p50_ms"])
    set_threads(2)
    batch = export.measure_speed(fn, x1, xb, 10, repeats)
    return {"batch1_p50_ms": by_threads[best]["batch1_p50_ms"], "batch1_p99_ms": by_threads[best]["batch1_p99_ms"],
            "batch1_threads": best, "batch_images_per_s": batch["batch_images_per_s"], "batch_threads": 2}  # fmt: skip


def accuracy_evidence() -> dict:
    out = {}
    for model, files in ACCURACY_EVIDENCE.items():
        for f in files:
            path = ROOT / "benchmarks" / "results" / f
            if path.is_file():
                r = json.loads(path.read_text())
                out.setdefault(model, []).append({"source": f"benchmarks/results/{f}", "config": r["config"],
                                                  "n": r["n"], "test_accuracy_mean": round(r["test_accuracy_mean"], 5),
                                                  "test_accuracy_min": round(r["test_accuracy_min"], 5)})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list_models())
    p.add_argument("--compile", nargs="*", default=["cnn3_slim"], metavar="MODEL", help="models to torch.compile")
    p.add_argument("--calls", type=int, default=1000, help="batch-1 calls per setting (p50/p99)")
    p.add_argument("--repeats", type=int, default=5, help="batch-1024 calls (median)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference.json"))
    args = p.parse_args()

    train = data.load_split(ROOT / "data" / "mnist", "train")  # real digits as input; calibration for int8
    images = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:BATCH]]
    xb = images.float().div(255).contiguous()
    x1 = xb[:1].clone()
    rows = []
    print(f"{'model':11s} {'MMACs':>6s} {'engine':12s} {'b1 p50 ms':>10s} {'b1 p99 ms':>10s} {'b1 thr':>6s} "
          f"{'img/s @1024':>12s}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            torch.manual_seed(0)
            model = create_model(name).eval()
            row = {"model": name, "params": count_params(model), "macs": count_macs(model), "engines": {}}
            fp32, int8 = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}.int8.onnx"
            fp32.write_bytes(export.to_onnx(model, 1, 28, export.DEFAULT_OPSET, {"model": name}))
            export.quantize(fp32, int8, xb[:200])
            row["onnx_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
            engines = {
                "torch_eager": (torch_eager, model, x1, xb),
                "torch_compile": (torch_compiled, model, x1, xb),
                "onnx_fp32": (ort, fp32, x1.numpy(), xb.numpy()),
                "onnx_int8": (ort, int8, x1.numpy(), xb.numpy()),
            }
            for engine, (fn, target, a1, ab) in engines.items():
                if engine == "torch_compile" and name not in args.compile:
                    row["engines"][engine] = {"skipped": "not in --compile (about a minute per model and shape)"}
                    continue
                try:
                    r = fn(target, a1, ab, args.calls, args.repeats)
                except Exception as e:  # noqa: BLE001  a compiler failure is a result to report, not a crash
                    row["engines"][engine] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    print(f"{name:11s} {'':6s} {engine:12s} skipped: {row['engines'][engine]['skipped']}", flush=True)
                    continue
                row["engines"][engine] = r
                print(f"{name:11s} {row['macs'] / 1e6:6.2f} {engine:12s} {r['batch1_p50_ms']:10.3f} "
                      f"{r['batch1_p99_ms']:10.3f} {r['batch1_threads']:6d} {r['batch_images_per_s']:12,.0f}",
                      flush=True)  # fmt: skip
            eager, ort32 = row["engines"]["torch_eager"], row["engines"]["onnx_fp32"]
            row["onnx_fp32_vs_eager"] = {
                "batch1_latency_ratio": round(eager["batch1_p50_ms"] / ort32["batch1_p50_ms"], 2),
                "throughput_ratio": round(ort32["batch_images_per_s"] / eager["batch_images_per_s"], 2),
            }
            rows.append(row)
    evidence = accuracy_evidence()
    reaching = [r for r in rows if any(e["test_accuracy_mean"] >= 0.99 for e in evidence.get(r["model"], []))]
    fastest = max(reaching, key=lambda r: r["engines"]["onnx_fp32"]["batch_images_per_s"]) if reaching else None
    result = {
        "benchmark": "inference",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "batch": BATCH,
        "calls_batch1": args.calls,
        "repeats_batch": args.repeats,
        "statistic": "batch 1: p50/p99 of single calls; batch: median images/s",
        "weights": "untrained (speed only)",
        "accuracy_evidence": evidence,
        "fastest_model_reaching_99": None if fastest is None else {
            "model": fastest["model"], "engine": "onnx_fp32", **fastest["engines"]["onnx_fp32"],
            "aims": {"batch_images_per_s": 50_000, "batch1_ms": 0.2},
        },
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "models": rows,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if fastest:
        f = result["fastest_model_reaching_99"]
        print(f"fastest model with a recorded >= 99% run: {f['model']} (ONNX Runtime fp32): "
              f"{f['batch1_p50_ms']:.3f} ms per image, {f['batch_images_per_s']:,.0f} images/s at batch {BATCH}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
