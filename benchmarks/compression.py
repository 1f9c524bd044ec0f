"""Pruning and distillation figures for the README's "Compression and model card" section.

    python benchmarks/compression.py --source runs/latest   # a run of configs/default.yaml (cnn3_slim)

1. `digitkit prune` at 0.5, 0.7, 0.9 (unstructured, global magnitude) and 0.5 structured (half of every conv
   layer's filters removed), each fine-tuned for --finetune-epochs with the run's own recipe at 0.1x its lr.
2. `digitkit distill`: the source run teaches a narrow cnn2 (channels 8, 16) for --student-epochs with the
   teacher's recipe (default T and alpha, not tuned); the same student with the same recipe and epochs is also
   trained without the teacher. That pair is the honest figure: same budget, with and without soft targets.
Every checkpoint is picked on the validation hold-out; the test set is read once per model, to report.
Writes benchmarks/results/compression.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from digitkit import compress, runs

STUDENT = ["model.args.channels=[8, 16]"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="runs/latest", help="a finished run of configs/default.yaml")
    ap.add_argument("--sparsity", default="0.5,0.7,0.9")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--student", default="cnn2")
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/digitkit-compression", help="where the run folders go")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "compression.json"))
    args = ap.parse_args()
    work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()

    t = time.perf_counter()
    unstructured = compress.prune_sweep(args.source, compress.parse_sparsities(args.sparsity), work / "prune",
                                        finetune_epochs=args.finetune_epochs)  # fmt: skip
    unstructured["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    structured = compress.prune_sweep(args.source, [0.5], work / "prune-structured", structured=True,
                                      finetune_epochs=args.finetune_epochs)  # fmt: skip
    structured["seconds"] = round(time.perf_counter() - t, 1)

    teacher_cfg = runs.open_model(args.source).cfg
    overrides = [*STUDENT, f"train.epochs={args.student_epochs}"]
    cfg = compress.student_config(teacher_cfg, args.student, None, overrides)
    datasets = runs.load_data(cfg)
    t = time.perf_counter()
    distilled = compress.distill_run([args.source], cfg, compress.DistillOptions(), out=work / "distilled",
                                     datasets=datasets)  # fmt: skip
    distilled["seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    plain = runs.train_run(cfg, out=work / "plain", datasets=datasets)
    plain["seconds"] = round(time.perf_counter() - t, 1)

    d = distilled["distill"]
    result = {
        "source": str(Path(args.source).resolve()),
        "prune_unstructured": unstructured,
        "prune_structured": structured,
        "distill": {
            "student": args.student,
            "student_overrides": overrides,
            "temperature": d["temperature"],
            "alpha": d["alpha"],
            "teacher_test_accuracy": d["teacher_test_accuracy"],
            "teacher_params": d["teacher_params"],
            "teacher_checkpoint_bytes": d["teacher_checkpoint_bytes"],
            "teacher_macs_per_image": _macs(args.source),
            "distilled": _student(distilled),
            "plain": _student(plain),
            "params_ratio": d["params_ratio"],
            "bytes_ratio": d["bytes_ratio"],
        },
        "total_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "note": "checkpoints picked on validation; test accuracy reported once per model; n = 1 seed each, so "
        "differences under about 0.1 pp (10 test images) are within noise",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(compress.prune_markdown(unstructured))
    print(compress.prune_markdown(structured))
    dd = result["distill"]
    print(f"teacher {dd['teacher_test_accuracy']:.4f} ({dd['teacher_params']:,} params); student {args.student} "
          f"distilled {dd['distilled']['test_accuracy']:.4f} vs plain {dd['plain']['test_accuracy']:.4f} "
          f"({dd['distilled']['params']:,} params, {dd['params_ratio']:.3f}x)")  # fmt: skip
    print(f"wrote {out} in {result['total_seconds']} s")


def _student(s: dict) -> dict:
    keep = ("run_dir", "params", "macs_per_image", "epochs", "best_epoch", "val_accuracy", "test_accuracy",
            "train_seconds", "seconds")  # fmt: skip
    out = {k: s.get(k) for k in keep}
    out["checkpoint_bytes"] = (Path(s["run_dir"]) / s["checkpoint"]).stat().st_size
    return out


def _macs(path: str) -> int:
    from digitkit.models import count_macs

    o = runs.open_model(path)
    return count_macs(o.model, o.ckpt["in_chans"], o.ckpt["img_size"])


if __name__ == "__main__":
    main()
