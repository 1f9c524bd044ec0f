"""Training-step throughput of every registered model, with and without augmentation.

Measures the real hot path (`train.load_batch` + `train.train_step`, as `fit` runs them) on MNIST in memory:
images/s of the whole step, and seconds per epoch of the default 54,000-image training split at that rate.
Each figure is the median of --repeats timed blocks of --steps steps after --warmup steps; the machine is shared
and noisy, so compare models within one run (ratios), not across runs.

    python benchmarks/train_speed.py [--models cnn3 mlp] [--batch-size 128] [--out benchmarks/results/train_speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from digitkit import augment, config, data, train
from digitkit.models import count_macs, count_params, create_model, list_models

ROOT = Path(__file__).resolve().parents[1]
EPOCH_IMAGES = 54_000  # the default 90% training split of MNIST


def time_steps(model, opt, ds, aug_cfg, batch_size, steps, memory_format) -> float:
    """Seconds for `steps` training steps drawn from `ds` (gather, augment, forward, backward, update)."""
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (batch_size,), generator=g)
        x, y = train.load_batch(ds, idx, aug_cfg, g, torch.device("cpu"), memory_format)
        train.train_step(model, opt, x, y)
    return time.perf_counter() - started


def time_augment(ds, aug_cfg, batch_size, steps) -> float:
    g = torch.Generator().manual_seed(0)
    x = ds.images[:batch_size].float().div(255)
    started = time.perf_counter()
    for _ in range(steps):
        augment.augment_batch(x, aug_cfg, g)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list_models())
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="its augmentation is used")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.json"))
    args = p.parse_args()

    cfg = config.load(args.config)
    ds = data.load_split(ROOT / "data" / "mnist", "train")
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    recipes = {"none": augment.AugmentConfig(), "default": cfg.augment}
    aug_rate = {}
    for name, aug_cfg in recipes.items():
        if aug_cfg.enabled:
            time_augment(ds, aug_cfg, args.batch_size, args.warmup)
            secs = [time_augment(ds, aug_cfg, args.batch_size, args.steps) for _ in range(args.repeats)]
            aug_rate[name] = args.batch_size * args.steps / statistics.median(secs)
    rows = []
    print(f"{'model':12s} {'params':>9s} {'MMACs':>7s} {'img/s plain':>12s} {'img/s aug':>10s} "
          f"{'s/epoch plain':>14s} {'s/epoch aug':>12s} {'aug cost':>9s} {'aug share':>9s}")  # fmt: skip
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).to(memory_format=fmt).train()
        opt = train.make_optimizer(model.parameters(), cfg.train)
        row = {"model": name, "params": count_params(model), "macs": count_macs(model)}
        for label, aug_cfg in recipes.items():
            time_steps(model, opt, ds, aug_cfg, args.batch_size, args.warmup, fmt)
            secs = [time_steps(model, opt, ds, aug_cfg, args.batch_size, args.steps, fmt) for _ in range(args.repeats)]
            rate = args.batch_size * args.steps / statistics.median(secs)
            row[f"images_per_s_{label}"] = round(rate, 1)
            row[f"seconds_per_epoch_{label}"] = round(EPOCH_IMAGES / rate, 1)
        row["augmentation_cost"] = round(row["images_per_s_none"] / row["images_per_s_default"] - 1, 3)
        # The measure (at most 15% for the default recipe): augmenting a batch alone, as a share of the whole
        # augmented step, both timed in this run. Steadier than the difference of two noisy step rates above.
        row["augmentation_share_of_step"] = (
            round(row["images_per_s_default"] / aug_rate["default"], 3) if "default" in aug_rate else 0.0
        )
        rows.append(row)
        print(f"{name:12s} {row['params']:>9,d} {row['macs'] / 1e6:>7.2f} {row['images_per_s_none']:>12,.0f} "
              f"{row['images_per_s_default']:>10,.0f} {row['seconds_per_epoch_none']:>14.1f} "
              f"{row['seconds_per_epoch_default']:>12.1f} {100 * row['augmentation_cost']:>8.0f}% "
              f"{100 * row['augmentation_share_of_step']:>8.1f}%",
              flush=True)  # fmt: skip
    result = {
        "benchmark": "train_speed",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "statistic": "median",
        "augmentation": config.to_dict(cfg)["augment"],
        "augment_only_images_per_s": {k: round(v, 1) for k, v in aug_rate.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "models": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"augmentation alone: {', '.join(f'{k} {v:,.0f} img/s' for k, v in aug_rate.items())}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
