"""Real-world digits: accuracy of models on photo-, scan- and canvas-like images, with and without `preprocess`,
what is rejected and why, and what the rejection threshold trades on digits against non-digits.

The images are built by `digitkit.synth` from MNIST digits: the v1 kinds (synth.KINDS: pen on paper, photos with
shading and texture, faded scans, RGBA canvases, tiny, huge, rotated and inverted digits, plus printed digits in
seven fonts) and the issue-22 kinds (synth.EXTRA_KINDS: low-resolution scans, thumbnails, faxes, pencil,
handwriting-style phone photos at any size, strokes on an opaque canvas, plus printed digits in 16 fonts as phone
photos and as low-resolution scans). Two ways to feed a model are compared:
  raw         what a new user does: convert to gray, resize to 28x28, no inversion, no centring
  preprocess  digitkit's pipeline (the one the CLI, the API and the web page use)
Per kind: top-1 with rejection off ("top-1": the pipeline's empty/no-ink count as wrong), and at the model's
default threshold the overall accuracy (answered right / all), the accuracy on answered images, the rejection
rate and the rejections by reason (empty, no-ink, not-a-digit, low-confidence), with what preprocessing recorded.

Non-digits measure the rejection. v1: `non_digits()` (letters, blank pages, scribbles, blobs, noise; kept as it
was so the old figures reproduce). v2: synth.make_negatives (letters and symbols in 16 fonts, blank and textured
paper, scribbles, photos of objects, partial and doubled digits, each drawn like the digits; letters a person
reads as digits are reported on their own, outside the curve). Partial and doubled digits come from validation
images that no digit set uses, never from the test files. The rejection curve: share of negatives rejected
against share of digits rejected, over confidence thresholds.

Preprocessing time: p50 over --calls calls at 1 torch thread, in-process, for a 28x28 PNG and a 320 px phone photo
(JPEG), both as bytes; and preprocess + model (Recognizer.predict) per model.

    python benchmarks/realworld.py --model runs/A [--model runs/B ...] [--n 200] [--n-negatives 100] \
        [--source test|val] [--out FILE.json]

--source val builds every set from the models' validation images (training files) and is what choices (the
default threshold) are made on; --source test (the default) reports on MNIST test digits, which choose nothing.
The printed sets and the v1 non-digits come from fonts and seeds alone, so they are the same for both sources.
Results: benchmarks/results/realworld-v2-<source>.json (the v1 figures, `realworld-<source>.json`, came from the
same v1 sets: its `kinds` and `rejection` appear here under the same names).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import pickle
import platform
import statistics
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitkit import config, data, runs, synth
from digitkit.classify import Recognizer
from digitkit.preprocess import load_image, preprocess

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""The v1 table's thresholds."""
CURVE = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The v2 rejection curve's thresholds."""
SCORE_CURVE = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
"""The digit-score curve's thresholds (inference.reject_below_digit_score; confidence threshold 0)."""
V1_KINDS = (*synth.KINDS, "printed_fonts")
REASONS = ("empty", "no-ink", "not-a-digit", "low-confidence")
NEGATIVE_POOL = 500
"""Validation images per source set aside for partial and doubled digits (disjoint from the digit sets)."""


def _source_images(source: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels) of the digit sets, and (images, labels) for the negatives' partial and doubled digits:
    validation images the --source val digit sets do not use, a different half of them per source."""
    cfg = config.load(None, [f"data.dir={ROOT / 'data' / 'mnist'}"])
    val, _ = runs.evaluation_data(cfg, "val")
    ds = data.load_split(cfg.data.dir, "test") if source == "test" else val
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ds), generator=g)[:n]
    g = torch.Generator().manual_seed(seed)
    rest = torch.randperm(len(val), generator=g)[n:]
    if len(rest) < 2 * NEGATIVE_POOL:
        raise ValueError(f"--n {n}: leaves {len(rest)} validation images for the negatives' digits, expected at "
                         f"least {2 * NEGATIVE_POOL}; use a smaller --n")
    neg = rest[:NEGATIVE_POOL] if source == "val" else rest[NEGATIVE_POOL : 2 * NEGATIVE_POOL]
    return ds.images[pick], ds.labels[pick], val.images[neg], val.labels[neg]


def digit_sets(source: str, n: int, seed: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    images, labels, _, _ = _source_images(source, n, seed)
    sets = {kind: synth.make_set(images, labels, kind, seed=seed) for kind in synth.KINDS}
    rng = np.random.default_rng(seed)
    fonts = list(synth.FONTS)
    printed = []
    for i in range(n):
        d, font = int(rng.integers(10)), fonts[i % len(fonts)]
        src = synth.font_digit(d, font, slant_degrees=float(rng.uniform(-12, 12)))
        printed.append((synth.pen_on_paper(src, seed=int(rng.integers(1 << 30))), d))
    sets["printed_fonts"] = printed
    # Issue 22's kinds, after the v1 sets (which stay exactly as they were).
    for kind in synth.EXTRA_KINDS:
        sets[kind] = synth.make_set(images, labels, kind, seed=seed)
    fonts = [*synth.FONTS, *synth.EXTRA_FONTS]
    for name, make in (("printed_photo", synth.handwriting_photo), ("printed_lowres", synth.lowres_scan)):
        rng = np.random.default_rng([seed, 22, len(name)])
        items = []
        for i in range(n):
            d, font = int(rng.integers(10)), fonts[i % len(fonts)]
            src = synth.font_digit(d, font, slant_degrees=float(rng.uniform(-12, 12)))
            items.append((make(src, np.random.default_rng([seed, 22, len(name), i])), d))
        sets[name] = items
    return sets


def negative_set(source: str, n_per_kind: int, seed: int, n: int) -> list[tuple[np.ndarray, str]]:
    """synth.make_negatives over every negative kind (lookalikes included, reported apart), partial and doubled
    digits drawn from validation images no digit set uses; a different seed per source."""
    _, _, images, labels = _source_images(source, n, seed)
    kinds = synth.ALL_NEGATIVE_KINDS
    neg_seed = seed + (101 if source == "val" else 202)
    return synth.make_negatives(n_per_kind * len(kinds), neg_seed, kinds, images.numpy()[:, 0], labels.numpy())


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


def _why(answer) -> str:
    """A short cause for a rejection, from what preprocessing recorded."""
    rec = answer.record or {}
    if answer.rejected == "empty":
        th = rec.get("threshold", {})
        if th.get("contrast", 0) == 0:  # no pixel above the threshold, which is at least median + 3 x noise
            return "empty: nothing above the threshold (median + 3x noise estimate)"
        if th.get("contrast", 0) < 0.08:
            return "empty: contrast below blank_contrast"
        return "empty: ink within 4x the noise estimate"
    if answer.rejected == "no-ink":
        comps = rec.get("components", {})
        if comps.get("kept", 0) == 0:
            return "no-ink: every component a speck or border shadow"
        return "no-ink: fewer ink pixels than min_ink_fraction"
    if answer.rejected == "not-a-digit":
        shape = rec.get("ink_shape", {})
        return "not-a-digit: coverage" if shape.get("coverage", 0) > 0.45 else "not-a-digit: box fill"
    return answer.rejected or "answered"


def _outcomes(rec: Recognizer, images: list) -> list[dict]:
    """Each image through rec.predict with both thresholds at 0: the shape/emptiness verdict, the top class, its
    confidence and the digit score (not-a-digit by score and low-confidence are then decided per threshold)."""
    out = []
    for a in rec.predict(images):
        out.append({"shape": a.rejected, "pred": int(a.predicted) if a.predicted is not None else -1,
                    "conf": a.confidence, "score": a.digit_score if a.digit_score is not None else 0.0,
                    "why": _why(a) if a.rejected else None,
                    "record": {k: a.record.get(k) for k in ("threshold", "components", "lighting", "ink_shape", "why")
                               if a.record.get(k) is not None} if a.rejected else None})  # fmt: skip
    return out


def _verdict(o: dict, t: float, s: float = 0.0) -> str:
    """The answer at confidence threshold t and digit-score threshold s (what Recognizer._decide does)."""
    if o["shape"]:
        return o["shape"]
    return "not-a-digit" if o["score"] < s else "low-confidence" if o["conf"] < t else "answered"


def evaluate(rec: Recognizer, sets: dict, junk: list[np.ndarray], negatives: list[tuple[np.ndarray, str]]) -> dict:
    out: dict = {"kinds": {}, "rejection": [], "curve": [], "negatives": {}}
    threshold, score_threshold = rec.inference.reject_below_confidence, rec.inference.reject_below_digit_score
    rec.inference.reject_below_confidence = rec.inference.reject_below_digit_score = 0.0
    digits: dict[str, list[dict]] = {}
    try:
        for kind, items in sets.items():
            images = [im for im, _ in items]
            labels = [y for _, y in items]
            raw = rec.probs(torch.stack([raw_tensor(im) for im in images])).argmax(1).tolist()
            outs = _outcomes(rec, images)
            for o, y in zip(outs, labels, strict=True):
                o["ok"] = o["pred"] == y
            digits[kind] = outs
            verdicts = [_verdict(o, threshold, score_threshold) for o in outs]
            answered = [o for o, v in zip(outs, verdicts, strict=True) if v == "answered"]
            reasons = Counter(v for v in verdicts if v != "answered")
            why = Counter(o["why"] for o in outs if o["why"])
            examples = [{"index": i, "label": y, "verdict": v, "pred": o["pred"], "confidence": round(o["conf"], 4),
                         "record": o["record"]}
                        for i, (o, y, v) in enumerate(zip(outs, labels, verdicts, strict=True)) if v != "answered"]
            out["kinds"][kind] = {
                "n": len(items),
                "raw_accuracy": sum(r == y for r, y in zip(raw, labels, strict=True)) / len(items),
                "preprocess_accuracy": sum(o["ok"] for o in outs) / len(items),
                "rejected_by_preprocess": sum(o["shape"] in ("empty", "no-ink") for o in outs),
                "accuracy": sum(o["ok"] for o in answered) / len(items),
                "accuracy_answered": sum(o["ok"] for o in answered) / max(len(answered), 1),
                "rejected": 1 - len(answered) / len(items),
                "rejections": {r: reasons[r] for r in REASONS if reasons[r]},
                "rejection_causes": dict(why.most_common()),
                "rejected_examples": examples[:12],
            }  # fmt: skip
        # v1: the same table as before, over the v1 kinds and the v1 non-digits.
        v1 = [o for kind in V1_KINDS for o in digits[kind]]
        junk_outs = _outcomes(rec, junk)
        for t in THRESHOLDS:
            rej = [_verdict(o, t) != "answered" for o in v1]
            answered_ok = [o["ok"] for o, r in zip(v1, rej, strict=True) if not r]
            out["rejection"].append({
                "threshold": t,
                "digits_rejected": sum(rej) / len(rej),
                "accuracy_answered": sum(answered_ok) / max(len(answered_ok), 1),
                "non_digits_rejected": sum(_verdict(o, t) != "answered" for o in junk_outs) / len(junk_outs),
            })  # fmt: skip
        out["non_digit_outcomes_at_default"] = dict(Counter(_verdict(o, threshold, score_threshold) for o in junk_outs))
        # v2: negatives per kind, and the curve over every digit kind and the negatives (lookalikes apart).
        neg_outs: dict[str, list[dict]] = {}
        outs = _outcomes(rec, [im for im, _ in negatives])
        for o, (_, kind) in zip(outs, negatives, strict=True):
            neg_outs.setdefault(kind, []).append(o)
        for kind, os_ in neg_outs.items():
            verdicts = Counter(_verdict(o, threshold, score_threshold) for o in os_)
            out["negatives"][kind] = {
                "n": len(os_),
                "rejected": 1 - verdicts["answered"] / len(os_),
                "outcomes": {r: verdicts[r] for r in (*REASONS, "answered") if verdicts[r]},
                "answered_as": dict(sorted(Counter(o["pred"] for o in os_
                                                   if _verdict(o, threshold, score_threshold) == "answered").items())),
                "rejected_by_threshold": {str(t): sum(_verdict(o, t) != "answered" for o in os_) / len(os_)
                                          for t in CURVE},
                "rejected_by_score": {str(s): sum(_verdict(o, 0.0, s) != "answered" for o in os_) / len(os_)
                                      for s in SCORE_CURVE},
            }  # fmt: skip
        all_digits = [o for kind in digits for o in digits[kind]]
        new_digits = [o for kind in digits if kind not in V1_KINDS for o in digits[kind]]
        pooled = [o for kind, os_ in neg_outs.items() if kind in synth.NEGATIVE_KINDS for o in os_]
        for t in CURVE:
            row = {"threshold": t}
            for name, group in (("digits", all_digits), ("new_kind_digits", new_digits)):
                rej = [_verdict(o, t) != "answered" for o in group]
                ok = [o["ok"] for o, r in zip(group, rej, strict=True) if not r]
                row[f"{name}_rejected"] = sum(rej) / len(rej)
                row[f"{name}_accuracy_answered"] = sum(ok) / max(len(ok), 1)
                row[f"{name}_accuracy"] = sum(ok) / len(group)
            row["negatives_rejected"] = sum(_verdict(o, t) != "answered" for o in pooled) / len(pooled)
            out["curve"].append(row)
        out["score_curve"] = [{"digit_score": s, **_rates(all_digits, pooled, 0.0, s)} for s in SCORE_CURVE]
        out["threshold_choice"] = choose_threshold(all_digits, pooled)
        out["thresholds_choice"] = choose_thresholds(all_digits, pooled)
        out["at_default"] = {"confidence": threshold, "digit_score": score_threshold, **_rates(
            all_digits, pooled, threshold, score_threshold)}  # fmt: skip
    finally:
        rec.inference.reject_below_confidence, rec.inference.reject_below_digit_score = threshold, score_threshold
    v1_kinds = [out["kinds"][k] for k in V1_KINDS]
    out["mean_raw_accuracy"] = float(np.mean([k["raw_accuracy"] for k in v1_kinds]))
    out["mean_preprocess_accuracy"] = float(np.mean([k["preprocess_accuracy"] for k in v1_kinds]))
    return out


DIGIT_REJECTION_BUDGET = 0.01
"""The issue's aim: at most 1% of legible digits rejected; the shipped threshold is the highest within it."""


def choose_threshold(digits: list[dict], negatives: list[dict], budget: float = DIGIT_REJECTION_BUDGET) -> dict:
    """The highest confidence threshold (0.01 steps) that rejects at most `budget` of the digits (every kind, the
    pipeline's own rejections included), with what it rejects of each. Meant for --source val: what it picks goes
    into the config (inference.reject_below_confidence), then --source test reports it."""
    best = None
    for t in np.round(np.arange(0.0, 1.0, 0.01), 2):
        rejected = sum(_verdict(o, t) != "answered" for o in digits) / len(digits)
        if rejected > budget:
            break
        best = {"threshold": float(t), "digits_rejected": rejected,
                "negatives_rejected": sum(_verdict(o, t) != "answered" for o in negatives) / len(negatives)}
    floor = sum(_verdict(o, 0.0) != "answered" for o in digits) / len(digits)
    return best or {"threshold": 0.0, "digits_rejected": floor, "over_budget": True,
                    "negatives_rejected": sum(_verdict(o, 0.0) != "answered" for o in negatives) / len(negatives)}


def _encoded(image: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt, **kw)
    return buf.getvalue()


def timing_inputs(source: str, n: int, seed: int) -> dict[str, bytes]:
    """A 28x28 PNG (an MNIST-format digit: what a canvas page sends) and a 320 px phone photo (JPEG), as bytes."""
    images, _, _, _ = _source_images(source, n, seed)
    digit = images[0, 0].numpy()
    return {"png_28": _encoded(digit, "PNG"),
            "photo_320_jpeg": _encoded(synth.photo(digit, seed, long_side=320), "JPEG", quality=85)}


def p50_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def time_preprocess(inputs: dict[str, bytes], calls: int, recs: dict[str, Recognizer]) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"calls": calls, "torch_threads": 1, "inputs": {}}
        for name, blob in inputs.items():
            out["inputs"][name] = {"bytes": len(blob), "preprocess_p50_ms": round(p50_ms(lambda b=blob: preprocess(b),
                                                                                          calls), 3)}  # fmt: skip
            for m, rec in recs.items():
                out["inputs"][name].setdefault("predict_p50_ms", {})[m] = round(
                    p50_ms(lambda b=blob, r=rec: r.predict([b]), calls), 3)
    finally:
        torch.set_num_threads(threads)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(m: str, r: dict) -> None:
    print(f"\n{m}  (MNIST test {100 * (r['mnist_test_accuracy'] or 0):.2f}%; default threshold "
          f"{r['default_threshold']})")
    print(f"  {'kind':<18s} {'n':>4s} {'raw %':>6s} {'top-1 %':>8s} {'overall %':>9s} {'answered %':>10s} "
          f"{'rejected %':>10s}  rejections")
    for kind, k in r["kinds"].items():
        reasons = ", ".join(f"{c} {v}" for v, c in k["rejections"].items())
        print(f"  {kind:<18s} {k['n']:4d} {_pct(k['raw_accuracy']):>6s} {_pct(k['preprocess_accuracy']):>8s} "
              f"{_pct(k['accuracy']):>9s} {_pct(k['accuracy_answered']):>10s} {_pct(k['rejected']):>10s}  {reasons}")
    raw_mean, pre_mean = _pct(r["mean_raw_accuracy"]), _pct(r["mean_preprocess_accuracy"])
    print(f"  {'mean (v1 kinds)':<18s} {'':4s} {raw_mean:>6s} {pre_mean:>8s}")
    print(f"  v1: {'threshold':>9s} {'digits rejected':>16s} {'acc answered':>13s} {'non-digits rejected':>20s}")
    for row in r["rejection"]:
        print(f"      {row['threshold']:9.2f} {_pct(row['digits_rejected']):>15s}% "
              f"{_pct(row['accuracy_answered']):>12s}% {_pct(row['non_digits_rejected']):>19s}%")
    print(f"  v2 negatives at the default threshold: {'kind':<15s} {'n':>4s} {'rejected %':>10s}  outcomes")
    for kind, k in r["negatives"].items():
        outcomes = ", ".join(f"{c} {v}" for v, c in k["outcomes"].items())
        print(f"  {'':39s} {kind:<15s} {k['n']:4d} {_pct(k['rejected']):>10s}  {outcomes}")
    print(f"  v2 curve: {'threshold':>9s} {'digits rej':>10s} {'acc answered':>12s} {'overall':>8s} "
          f"{'new kinds rej':>13s} {'negatives rej':>13s}")
    for row in r["curve"]:
        print(f"            {row['threshold']:9.2f} {_pct(row['digits_rejected']):>9s}% "
              f"{_pct(row['digits_accuracy_answered']):>11s}% {_pct(row['digits_accuracy']):>7s}% "
              f"{_pct(row['new_kind_digits_rejected']):>12s}% {_pct(row['negatives_rejected']):>12s}%")
    print(f"  digit-score curve: {'score':>6s} {'digits rej':>10s} {'acc answered':>12s} {'negatives rej':>13s}")
    for row in r["score_curve"]:
        print(f"                     {row['digit_score']:6.2f} {_pct(row['digits_rejected']):>9s}% "
              f"{_pct(row['digits_accuracy_answered']):>11s}% {_pct(row['negatives_rejected']):>12s}%")
    d = r["at_default"]
    print(f"  at the model's thresholds (confidence {d['confidence']:g}, digit score {d['digit_score']:g}): digits "
          f"rejected {_pct(d['digits_rejected'])}%, right {_pct(d['digits_accuracy'])}%, negatives rejected "
          f"{_pct(d['negatives_rejected'])}%")
    c2 = r["thresholds_choice"]
    print(f"  best pair rejecting <= {100 * DIGIT_REJECTION_BUDGET:g}% of digits: confidence {c2['confidence']:.2f}, "
          f"digit score {c2['digit_score']:.2f} (digits rejected {_pct(c2['digits_rejected'])}%, negatives rejected "
          f"{_pct(c2['negatives_rejected'])}%)" + ("; the pipeline alone rejects more" if c2.get("over_budget")
                                                    else ""))
    c = r["threshold_choice"]
    print(f"  highest threshold rejecting <= {100 * DIGIT_REJECTION_BUDGET:g}% of digits: {c['threshold']:.2f} (digits "
          f"rejected {_pct(c['digits_rejected'])}%, negatives rejected {_pct(c['negatives_rejected'])}%)"
          + ("; the pipeline alone rejects more than that" if c.get("over_budget") else ""))


def make_sets(source: str, n: int, n_negatives: int, seed: int, cache: str | None = None) -> tuple:
    """(digit sets, v1 non-digits, v2 negatives); with `cache`, read from / written to a pickle named by the
    arguments, the bytes of synth.py and the source of the functions here that make the sets, so a change to any
    of them makes new sets."""
    path = None
    if cache:
        h = hashlib.sha256(repr((source, n, n_negatives, seed)).encode())
        h.update(Path(synth.__file__).read_bytes())
        for fn in (_source_images, digit_sets, negative_set, non_digits):
            h.update(inspect.getsource(fn).encode())
        path = Path(cache) / f"realworld-{source}-{h.hexdigest()[:16]}.pkl"
        if path.exists():
            with path.open("rb") as f:
                return pickle.load(f)  # our own file, written below
    made = (digit_sets(source, n, seed), non_digits(n, seed + 1), negative_set(source, n_negatives, seed, n))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(made, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
    return made


def _rates(digits: list[dict], negatives: list[dict], t: float, s: float) -> dict:
    rej = [_verdict(o, t, s) != "answered" for o in digits]
    ok = [o["ok"] for o, r in zip(digits, rej, strict=True) if not r]
    return {"digits_rejected": sum(rej) / len(rej), "digits_accuracy_answered": sum(ok) / max(len(ok), 1),
            "digits_accuracy": sum(ok) / len(rej),
            "negatives_rejected": sum(_verdict(o, t, s) != "answered" for o in negatives) / len(negatives)}


def choose_thresholds(digits: list[dict], negatives: list[dict], budget: float = DIGIT_REJECTION_BUDGET) -> dict:
    """Both thresholds at once: the (confidence, digit score) pair, confidence in 0.01 steps and score in 0.05
    steps, that rejects the most negatives while rejecting at most `budget` of the digits; ties go to fewer digits
    rejected, then to the higher confidence threshold. Meant for --source val: inference.reject_below_confidence and
    inference.reject_below_digit_score in the config."""
    conf = np.array([o["conf"] for o in digits]), np.array([o["conf"] for o in negatives])
    score = np.array([o["score"] for o in digits]), np.array([o["score"] for o in negatives])
    shape = np.array([bool(o["shape"]) for o in digits]), np.array([bool(o["shape"]) for o in negatives])
    best = None
    for t in np.round(np.arange(0.0, 1.0, 0.01), 2):
        for s in np.round(np.arange(0.0, 8.0, 0.05), 2):
            d = float((shape[0] | (score[0] < s) | (conf[0] < t)).mean())
            if d > budget:
                break  # a higher score threshold only rejects more
            n = float((shape[1] | (score[1] < s) | (conf[1] < t)).mean())
            key = (n, -d, t)
            if best is None or key > best[0]:
                best = (key, {"confidence": float(t), "digit_score": float(s), "digits_rejected": d,
                              "negatives_rejected": n})
    if best is None:
        return {"confidence": 0.0, "digit_score": 0.0, "over_budget": True,
                "digits_rejected": float(shape[0].mean()), "negatives_rejected": float(shape[1].mean())}
    return best[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="run folder or checkpoint (repeatable)")
    p.add_argument("--n", type=int, default=200, help="images per digit kind")
    p.add_argument("--n-negatives", type=int, default=100, help="images per negative kind")
    p.add_argument("--source", choices=("test", "val"), default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, default=200, help="calls per preprocessing timing (0: no timing)")
    p.add_argument("--out", help="JSON file (default: benchmarks/results/realworld-v2-<source>.json)")
    p.add_argument("--threshold", type=float, help="report at this confidence threshold instead of each model's "
                   "inference.reject_below_confidence (e.g. one chosen with --source val for a config)")
    p.add_argument("--digit-score", type=float, help="report at this digit-score threshold instead of each model's "
                   "inference.reject_below_digit_score")
    p.add_argument("--cache", metavar="DIR", help="keep the generated sets in DIR and reuse them while synth.py "
                   "and this script are unchanged (making them takes most of a run)")
    args = p.parse_args()
    started = time.perf_counter()
    sets, junk, negatives = make_sets(args.source, args.n, args.n_negatives, args.seed, args.cache)
    made = time.perf_counter() - started
    print(f"made {sum(map(len, sets.values()))} digits in {len(sets)} kinds, {len(junk)} v1 non-digits and "
          f"{len(negatives)} v2 negatives in {made:.0f} s")
    results, recs = {}, {}
    for m in args.model:
        rec = recs[m] = Recognizer.open(m)
        if args.threshold is not None:
            rec.inference.reject_below_confidence = args.threshold
        if args.digit_score is not None:
            rec.inference.reject_below_digit_score = args.digit_score
        summary_path = runs.open_model(m).run_dir
        summary = json.loads((summary_path / "summary.json").read_text()) if summary_path else {}
        r = evaluate(rec, sets, junk, negatives)
        r["mnist_test_accuracy"] = summary.get("test_accuracy")
        r["default_threshold"] = rec.inference.reject_below_confidence
        r["default_digit_score"] = rec.inference.reject_below_digit_score
        r["temperature"] = rec.temperature  # confidences are calibrated (digitkit.calibration); 1.0: not fitted
        results[m] = r
        report(m, r)
    timing = {}
    if args.calls > 0:
        timing = time_preprocess(timing_inputs(args.source, args.n, args.seed), args.calls, recs)
        print(f"\npreprocessing p50 (1 torch thread, {args.calls} calls):")
        for name, t in timing["inputs"].items():
            print(f"  {name:<16s} {t['bytes']:7d} bytes  preprocess {t['preprocess_p50_ms']:.2f} ms  predict "
                  + ", ".join(f"{v:.2f} ms" for v in t.get("predict_p50_ms", {}).values()))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"realworld-v2-{args.source}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"n_per_kind": args.n, "n_per_negative_kind": args.n_negatives, "source": args.source, "seed": args.seed,
            "seconds": time.perf_counter() - started, "seconds_making_sets": made, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": _cpu_name()}  # fmt: skip
    out.write_text(json.dumps({**meta, "timing": timing, "models": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


def _cpu_name() -> str:
    import machine  # benchmarks/machine.py, beside this script

    return machine.cpu_name()


if __name__ == "__main__":
    main()
