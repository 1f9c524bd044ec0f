"""Real-world digits: accuracy of models on photo-, scan- and canvas-like images, with and without `preprocess`,
and what the rejection threshold trades on digits against non-digits.

The images are built by `digitkit.synth` from MNIST digits (see its docstring: pen on paper, photos with
shading and texture, faded scans, RGBA canvases, tiny, huge, rotated and inverted digits) plus printed digits
in several fonts (a source that is not MNIST at all). Two ways to feed a model are compared:
  raw         what a new user does: convert to gray, resize to 28x28, no inversion, no centring
  preprocess  digitkit's pipeline (the one the CLI, the API and the web page use), rejection off

Non-digits (letters in several fonts, blank pages, scribbles, blobs, noise) measure the rejection: the share
answered with `digit: null` at each threshold, beside the share of real digits rejected.

    python benchmarks/realworld.py --model runs/A [--model runs/B ...] [--n 200] [--source test|val]

--source val builds every set from the models' validation images (training files) and is what the default
threshold was chosen on; --source test (the default) reports on MNIST test digits, which choose nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import string
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitkit import config, data, runs, synth
from digitkit.classify import Recognizer
from digitkit.preprocess import load_image

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def digit_sets(source: str, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    cfg = config.load(None, [f"data.dir={ROOT / 'data' / 'mnist'}"])
    if source == "test":
        ds = data.load_split(cfg.data.dir, "test")
    else:
        ds, _ = runs.evaluation_data(cfg, "val")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ds), generator=g)[:n]
    images, labels = ds.images[pick], ds.labels[pick]
    sets = {kind: synth.make_set(images, labels, kind, seed=seed) for kind in synth.KINDS}
    rng = np.random.default_rng(seed)
    fonts = list(synth.FONTS)
    printed = []
    for i in range(n):
        d, font = int(rng.integers(10)), fonts[i % len(fonts)]
        src = synth.font_digit(d, font, slant_degrees=float(rng.uniform(-12, 12)))
        printed.append((synth.pen_on_paper(src, seed=int(rng.integers(1 << 30))), d))
    sets["printed_fonts"] = printed
    return sets


def non_digits(n: int, seed: int) -> list[np.ndarray]:
    """Letters (printed, drawn like the digits), blank pages, scribbles, filled blobs and noise."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    letters = [c for c in string.ascii_uppercase + "abdefghkmnpqrtuwxy" if c not in "OoIlZSBGQDgq"]
    fonts = list(synth.FONTS)
    from matplotlib import font_manager
    from PIL import ImageDraw, ImageFont

    for i in range(n):
        kind = i % 5
        if kind == 0:  # a letter
            family, weight, style = synth.FONTS[fonts[i % len(fonts)]]
            path = font_manager.findfont(font_manager.FontProperties(family=family, weight=weight, style=style))
            canvas = Image.new("L", (320, 320), 0)
            ImageDraw.Draw(canvas).text((80, 40), letters[i % len(letters)], fill=255,
                                        font=ImageFont.truetype(path, 160))  # fmt: skip
            src = (synth.to_mnist(np.asarray(canvas, np.float32) / 255) * 255).astype(np.uint8)
            out.append(synth.pen_on_paper(src, seed=int(rng.integers(1 << 30))))
        elif kind == 1:  # a blank page, lit unevenly
            h, w = int(rng.integers(200, 600)), int(rng.integers(200, 600))
            grad = np.linspace(0.8, 0.95, w)[None, :] * np.ones((h, 1))
            out.append((np.clip(grad + rng.normal(0, 0.01, (h, w)), 0, 1) * 255).astype(np.uint8))
        elif kind == 2:  # a scribble: a random walk of strokes
            img = Image.new("L", (300, 300), 245)
            pts = np.cumsum(rng.normal(0, 40, (12, 2)), 0) + 150
            ImageDraw.Draw(img).line([tuple(p) for p in pts.clip(10, 290)], fill=20, width=int(rng.integers(4, 12)))
            out.append(np.asarray(img))
        elif kind == 3:  # a filled blob
            img = Image.new("L", (300, 300), 240)
            x0, y0 = rng.integers(40, 120, 2)
            ImageDraw.Draw(img).rectangle([x0, y0, x0 + rng.integers(80, 150), y0 + rng.integers(80, 150)], fill=30)
            out.append(np.asarray(img))
        else:  # texture / noise
            out.append((rng.random((200, 200)) * 255).astype(np.uint8))
    return out


def raw_tensor(image: np.ndarray) -> torch.Tensor:
    """What a first-time user feeds the model: gray, resized to 28x28, as is."""
    gray = load_image(image)
    small = Image.fromarray((gray * 255).astype(np.uint8)).resize((28, 28), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(small, np.float32) / 255)[None]


def evaluate(rec: Recognizer, sets: dict, junk: list[np.ndarray]) -> dict:
    out: dict = {"kinds": {}, "rejection": []}
    threshold = rec.inference.reject_below_confidence
    rec.inference.reject_below_confidence = 0.0
    all_conf, all_ok, all_shape = [], [], []
    for kind, items in sets.items():
        images = [im for im, _ in items]
        labels = torch.tensor([y for _, y in items])
        raw = rec.probs(torch.stack([raw_tensor(im) for im in images])).argmax(1)
        answers = rec.predict(images)
        pred = torch.tensor([int(a.predicted) if a.predicted is not None else -1 for a in answers])
        out["kinds"][kind] = {
            "n": len(items),
            "raw_accuracy": float((raw == labels).float().mean()),
            "preprocess_accuracy": float((pred == labels).float().mean()),
            "rejected_by_preprocess": sum(a.rejected in ("empty", "no-ink") for a in answers),
        }
        all_conf += [a.confidence for a in answers]
        all_ok += [bool(p == y) for p, y in zip(pred.tolist(), labels.tolist(), strict=True)]
        all_shape += [a.rejected is not None for a in answers]
    junk_answers = rec.predict(junk)
    for t in THRESHOLDS:
        digit_rej = [s or c < t for c, s in zip(all_conf, all_shape, strict=True)]
        answered_ok = [ok for ok, r in zip(all_ok, digit_rej, strict=True) if not r]
        junk_rej = [a.rejected is not None or a.confidence < t for a in junk_answers]
        out["rejection"].append({
            "threshold": t,
            "digits_rejected": sum(digit_rej) / len(digit_rej),
            "accuracy_answered": sum(answered_ok) / max(len(answered_ok), 1),
            "non_digits_rejected": sum(junk_rej) / len(junk_rej),
        })  # fmt: skip
    reasons: dict[str, int] = {}
    for a in junk_answers:
        key = a.rejected or ("low-confidence" if a.confidence < threshold else "answered")
        reasons[key] = reasons.get(key, 0) + 1
    out["non_digit_outcomes_at_default"] = reasons
    rec.inference.reject_below_confidence = threshold
    kinds = out["kinds"].values()
    out["mean_raw_accuracy"] = float(np.mean([k["raw_accuracy"] for k in kinds]))
    out["mean_preprocess_accuracy"] = float(np.mean([k["preprocess_accuracy"] for k in kinds]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="run folder or checkpoint (repeatable)")
    p.add_argument("--n", type=int, default=200, help="images per kind")
    p.add_argument("--source", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file (default: benchmarks/results/realworld-<source>.json)")
    args = p.parse_args()
    started = time.perf_counter()
    sets = digit_sets(args.source, args.n, args.seed)
    junk = non_digits(args.n, args.seed + 1)
    results = {}
    for m in args.model:
        rec = Recognizer.open(m)
        summary_path = runs.open_model(m).run_dir
        summary = json.loads((summary_path / "summary.json").read_text()) if summary_path else {}
        r = evaluate(rec, sets, junk)
        r["mnist_test_accuracy"] = summary.get("test_accuracy")
        r["default_threshold"] = rec.inference.reject_below_confidence
        results[m] = r
        print(f"\n{m}  (MNIST test {100 * (r['mnist_test_accuracy'] or 0):.2f}%)")
        print(f"  {'kind':<14s} {'n':>4s} {'raw %':>7s} {'preprocess %':>13s}")
        for kind, k in r["kinds"].items():
            print(f"  {kind:<14s} {k['n']:4d} {100 * k['raw_accuracy']:7.1f} {100 * k['preprocess_accuracy']:13.1f}")
        raw_mean, pre_mean = 100 * r["mean_raw_accuracy"], 100 * r["mean_preprocess_accuracy"]
        print(f"  {'mean':<14s} {'':4s} {raw_mean:7.1f} {pre_mean:13.1f}")
        print(f"  {'threshold':>9s} {'digits rejected':>16s} {'acc answered':>13s} {'non-digits rejected':>20s}")
        for row in r["rejection"]:
            print(f"  {row['threshold']:9.2f} {100 * row['digits_rejected']:15.1f}% "
                  f"{100 * row['accuracy_answered']:12.1f}% {100 * row['non_digits_rejected']:19.1f}%")
        print(f"  non-digits at the default threshold: {r['non_digit_outcomes_at_default']}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"realworld-{args.source}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"n_per_kind": args.n, "source": args.source, "seed": args.seed, "seconds": time.perf_counter() - started,
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({**meta, "models": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
