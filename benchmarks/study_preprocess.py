"""Study (issue 26, "real-world accuracy"): which step of `preprocess` matters on real-world input?

"My 99% model fails on my own digits; which preprocessing step matters?" Each step of digitkit's pipeline is
switched off (deskew, off by default, switched on) one at a time, the models fixed, and every variant reads the
same real-world-like digits: benchmarks/realworld.py's own digit sets (photos, scans, canvases, tiny and huge
images, low-resolution scans, thumbnails, faxes, pencil, printed fonts ...), built with its functions, so the
images are exactly that benchmark's. Digits only: non-digits are out of scope.

Variants (each a change of the run's own `preprocess` config, or a composition of the pipeline's public pieces):
  full             the pipeline as shipped (the reference)
  center_box       the bounding box's centre at the image centre, not the centre of mass (center: box)
  no_crop_scale    the pipeline's cleaned full-frame ink (ink_image/ink_candidates: grey levels, polarity fixed,
                   background, specks and border shadows removed) padded square and resized whole to 28x28: no
                   crop, no fit into the 20 px box, no centring
  deskew           deskew on (deskew: true); the models were trained without it
  no_lighting      remove_lighting: false
  no_specks        min_speck_area_fraction: 0
  keep_border      ignore_border_components: false
  no_thicken       thicken_strokes: false
  threshold_none   threshold: none (every pixel above the noise floor is ink: no Otsu, no hysteresis)
  raw              what a new user does (realworld.raw_tensor: gray, resized to 28x28, nothing else)

Each image is preprocessed once per variant (the models share the tensors); when the pipeline is unsure how to
read an image it offers candidate readings, and each model keeps the one it is surest of, as `Recognizer` does.
Metric: top-1 accuracy with rejection off (confidence and digit-score thresholds 0, the ink-shape check's answer
kept), where an image the pipeline refuses (empty, no-ink, unreadable) counts as wrong; the share refused is
recorded. Per kind and overall (the mean over kinds, and over all images), per model; then mean +- sample std over
the models and Welch's t of each variant against the full pipeline over the per-model overall accuracies
(digitkit.compare.welch). `changed` is the share of images whose preprocessed tensor (or refusal) differs from the
full pipeline's: a variant that changes little cannot matter much.

The models: the shipped recipe trained with seeds 0, 1 and 2, e.g.

    digitkit train --config configs/realworld.yaml --set seed=1 --out runs/rw3e20-s1

(runs/rw3e20-s0, -s1, -s2; `python benchmarks/recipe_seeds.py --config configs/realworld.yaml`,
benchmarks/results/seeds-realworld-v2.json: 99.57, 99.51, 99.54% on MNIST test. They were trained before the
config's rejection thresholds were chosen, which training does not read and this study switches off.) Then:

    python benchmarks/study_preprocess.py --model runs/rw3e20-s0 --model runs/rw3e20-s1 --model runs/rw3e20-s2 \
        --source test --cache benchmarks/.cache

--source test (the default) reports on MNIST test digits and chooses nothing. --cache reuses realworld.py's set
cache (the same pickle its own runs write, non-digits included). Results: benchmarks/results/study-preprocess.json
and docs/img/studies-preprocess.png. One torch thread: it runs beside training jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import realworld  # noqa: E402 - benchmarks/realworld.py, found through the sys.path entry above

from digitkit import preprocess as pp  # noqa: E402
from digitkit import runs  # noqa: E402
from digitkit.classify import Recognizer  # noqa: E402
from digitkit.compare import welch  # noqa: E402
from digitkit.errors import DataError  # noqa: E402
from digitkit.preprocess import PreprocessConfig, ink_candidates, load_image, preprocess  # noqa: E402

REFERENCE = "full"
FULL_FRAME = "full-frame"
RAW = "raw"
VARIANTS: list[dict[str, Any]] = [
    {"name": "full", "label": "full pipeline (reference)", "change": {}},
    {"name": "center_box", "label": "centre the bounding box, not the mass", "change": {"center": "box"}},
    {"name": "no_crop_scale", "label": "no crop-and-scale (whole frame to 28x28)", "change": FULL_FRAME},
    {"name": "deskew", "label": "deskew on", "change": {"deskew": True}},
    {"name": "no_lighting", "label": "no lighting removal", "change": {"remove_lighting": False}},
    {"name": "no_specks", "label": "no speck removal", "change": {"min_speck_area_fraction": 0.0}},
    {"name": "keep_border", "label": "keep border components", "change": {"ignore_border_components": False}},
    {"name": "no_thicken", "label": "no stroke thickening", "change": {"thicken_strokes": False}},
    {"name": "threshold_none", "label": "threshold: none", "change": {"threshold": "none"}},
    {"name": "raw", "label": "raw: gray, resized to 28x28", "change": RAW},
]
"""The variants, in the order reported. `change`: PreprocessConfig fields replaced in the run's own config, or
FULL_FRAME / RAW (compositions in this script)."""
CHANGED_ABOVE = 1e-6
"""A preprocessed tensor differs from the reference's when some pixel differs by more than this."""
CANDIDATE_DIFFERS = 0.1
"""What preprocess requires of another reading to offer it as a candidate (a pixel differing by more than this)."""


# ----------------------------------------------------------------------------------------------------------
# Preprocessing, one variant.


@dataclasses.dataclass
class Prepared:
    """One image as a variant reads it: the candidate tensors (the first is the reading `preprocess` would return;
    none when refused) and why it was refused."""

    options: list[torch.Tensor]
    refused: str | None = None
    record: dict[str, Any] | None = None
    """What `preprocess` recorded (the pipeline's variants only)."""


def variant_config(base: PreprocessConfig, change: dict[str, Any]) -> PreprocessConfig:
    """The run's own config with `change` applied (validated by PreprocessConfig itself)."""
    unknown = set(change) - {f.name for f in dataclasses.fields(PreprocessConfig)}
    if unknown:
        raise ValueError(f"not PreprocessConfig fields: {sorted(unknown)}")
    return dataclasses.replace(base, **change)


def frame_tensor(ink: np.ndarray, size: int) -> torch.Tensor:
    """The whole frame of a white-on-black ink image, padded square (centred, zeros) and resized to size x size
    (area-averaged down, bicubic up): no crop, no box, no centring, no level stretch."""
    h, w = ink.shape
    side = max(h, w)
    square = np.zeros((side, side), np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = ink
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BICUBIC
    small = np.asarray(Image.fromarray(square).resize((size, size), resample), np.float32)
    return torch.from_numpy(np.clip(small, 0.0, 1.0).copy())[None]


def full_frame(image: Any, cfg: PreprocessConfig) -> Prepared:
    """The pipeline's cleaned full-frame ink, resized whole. The same first steps as `preprocess` (decoding shrunk to
    max_side, a tiny image enlarged before its ink is looked for, the survey and its readings), then
    `ink_candidates` instead of the crop, the fit into the box and the centring. Unlike `preprocess` it keeps every
    kept ink component (no choice of the digit's components: a far stray mark stays), and the survey is not told
    that an RGBA canvas's alpha is its ink (it reads 1 - alpha as an ordinary image)."""
    gray = load_image(image, cfg.max_side)
    gray, _ = pp._enlarge_tiny(gray)  # what preprocess does first (a private step, read, not changed)
    readings = ink_candidates(gray, cfg)
    _, ink, _, record = readings[0]
    if record.get("rejected"):
        return Prepared([], record["rejected"])
    first = frame_tensor(ink, cfg.size)
    options = [first]
    for _, other_ink, _, other in readings[1:]:  # as preprocess: a reading that finds nothing or the same is none
        if other.get("rejected"):
            continue
        other_t = frame_tensor(other_ink, cfg.size)
        if other_t.any() and float((other_t - first).abs().max()) > CANDIDATE_DIFFERS:
            options.append(other_t)
    return Prepared(options)


def prepare(image: Any, change: Any, base: PreprocessConfig) -> Prepared:
    """One image through one variant; a DataError (unreadable input) is a refusal, as `Recognizer.predict` makes
    it one."""
    try:
        if change == RAW:
            return Prepared([realworld.raw_tensor(image)])
        if change == FULL_FRAME:
            return full_frame(image, base)
        pre = preprocess(image, variant_config(base, change))
    except DataError:
        return Prepared([], "unreadable")
    if pre.rejected:
        return Prepared([], pre.rejected, pre.record)
    return Prepared([t for _, t in pre.candidates] or [pre.tensor], None, pre.record)


def _differs(a: Prepared, b: Prepared) -> bool:
    """Whether a variant's reading of an image differs from the reference's: refused or not, the candidate readings
    offered, or any pixel of one of them."""
    if a.refused != b.refused or len(a.options) != len(b.options):
        return True
    return any(float((x - y).abs().max()) > CHANGED_ABOVE for x, y in zip(a.options, b.options, strict=True))


STEPS = {
    "lighting_removed": lambda r: bool(r.get("lighting", {}).get("removed")),
    "specks_dropped": lambda r: r.get("components", {}).get("specks", 0) > 0,
    "border_components_dropped": lambda r: r.get("components", {}).get("border_shadows", 0) > 0,
    "stray_marks_left_out": lambda r: r.get("components", {}).get("stray", 0) > 0,
    "strokes_thickened": lambda r: "thickened_radius_px" in r.get("normalize", {}),
    "softened_two_level": lambda r: "softened_px" in r.get("normalize", {}),
    "candidate_readings": lambda r: "candidates" in r,
}
"""What the full pipeline did to an image, from its record (the first reading's): a step that never acts on a
kind cannot matter for it."""


def step_activity(prepared: dict[str, list[Prepared]]) -> dict[str, Any]:
    """Per kind: the share of images each step acted on in the reference, and the input kinds the survey found."""
    out = {}
    for kind, items in prepared.items():
        records = [p.record or {} for p in items]
        out[kind] = {name: sum(map(test, records)) / len(records) for name, test in STEPS.items()}
        out[kind]["input_kind"] = dict(Counter(r.get("input_kind", "?") for r in records))
    return out


# ----------------------------------------------------------------------------------------------------------
# The models.


def predictions(rec: Recognizer, prepared: list[Prepared]) -> list[int]:
    """The model's top class per image (-1 when refused): every candidate of every image in one batch, the reading
    the model is surest of answering (the first wins ties), as Recognizer.answers chooses."""
    rows: list[torch.Tensor] = []
    spans: list[tuple[int, int]] = []
    for p in prepared:
        spans.append((len(rows), len(rows) + len(p.options)))
        rows.extend(p.options)
    if not rows:
        return [-1] * len(prepared)
    probs = rec.probs(torch.stack(rows))
    conf, top = probs.max(1)
    out = []
    for p, (a, b) in zip(prepared, spans, strict=True):
        if p.refused is not None:
            out.append(-1)
            continue
        best = max(range(a, b), key=lambda r: float(conf[r]))
        out.append(int(top[best]))
    return out


def _open(m: str) -> tuple[Recognizer, dict[str, Any]]:
    rec = Recognizer.open(m)
    rec.inference.reject_below_confidence = rec.inference.reject_below_digit_score = 0.0  # (not read here anyway)
    opened = runs.open_model(m)
    summary_path = opened.run_dir / "summary.json" if opened.run_dir else None
    summary = json.loads(summary_path.read_text()) if summary_path and summary_path.is_file() else {}
    info = {"checkpoint": opened.checkpoint_path.name,
            "seed": opened.cfg.seed, "model": summary.get("model"), "test_accuracy": summary.get("test_accuracy"),
            "val_accuracy": summary.get("val_accuracy"), "temperature": rec.temperature,
            "preprocess": dataclasses.asdict(rec.preprocess_cfg)}  # fmt: skip
    return rec, info


# ----------------------------------------------------------------------------------------------------------
# The study.


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def measure(models: dict[str, Recognizer], sets: dict[str, list[tuple[Any, int]]],
            variants: list[dict[str, Any]] | None = None, log: Any = print) -> dict[str, Any]:  # fmt: skip
    """The core: every variant over every image and model. `sets`: {kind: [(image, label)]}; `models`: {name:
    Recognizer}. Returns {"results": per variant, "summary": per variant}."""
    variants = variants or VARIANTS
    if variants[0]["name"] != REFERENCE:
        raise ValueError(f"the first variant must be the reference, {REFERENCE!r}")
    kinds = list(sets)
    results: dict[str, Any] = {}
    reference: dict[tuple[str, str], list[Prepared]] = {}  # (model, kind) -> the full pipeline's tensors
    for v in variants:
        name, change = v["name"], v["change"]
        res: dict[str, Any] = {"seconds_preprocess": 0.0, "seconds_models": {}, "models": {}}
        prepared_by_cfg: dict[str, dict[str, list[Prepared]]] = {}  # repr(base config) -> kind -> prepared
        for m, rec in models.items():
            key = RAW if change == RAW else repr(rec.preprocess_cfg)
            if key not in prepared_by_cfg:
                t0 = time.perf_counter()
                prepared_by_cfg[key] = {kind: [prepare(im, change, rec.preprocess_cfg) for im, _ in items]
                                        for kind, items in sets.items()}  # fmt: skip
                res["seconds_preprocess"] += time.perf_counter() - t0
            prepared = prepared_by_cfg[key]
            if name == REFERENCE:
                for kind in kinds:
                    reference[(m, kind)] = prepared[kind]
                res.setdefault("steps_acting", {})[m] = step_activity(prepared)
            t0 = time.perf_counter()
            per_kind: dict[str, Any] = {}
            for kind, items in sets.items():
                labels = [y for _, y in items]
                preds = predictions(rec, prepared[kind])
                refused = Counter(p.refused for p in prepared[kind] if p.refused is not None)
                changed = sum(_differs(p, r) for p, r in zip(prepared[kind], reference[(m, kind)], strict=True))
                n = len(items)
                per_kind[kind] = {"n": n, "correct": sum(int(p == y) for p, y in zip(preds, labels, strict=True)),
                                  "refused": sum(refused.values()), "refused_reasons": dict(refused),
                                  "changed": changed}  # fmt: skip
                per_kind[kind].update(accuracy=per_kind[kind]["correct"] / n, refused_share=sum(refused.values()) / n,
                                      changed_share=changed / n)  # fmt: skip
            res["seconds_models"][m] = time.perf_counter() - t0
            total = sum(k["n"] for k in per_kind.values())
            res["models"][m] = {
                "accuracy_mean_over_kinds": statistics.mean(k["accuracy"] for k in per_kind.values()),
                "accuracy_all_images": sum(k["correct"] for k in per_kind.values()) / total,
                "refused_share": sum(k["refused"] for k in per_kind.values()) / total,
                "changed_share": sum(k["changed"] for k in per_kind.values()) / total,
                "kinds": per_kind,
            }  # fmt: skip
        n_images = sum(len(items) for items in sets.values())
        res["ms_per_image_preprocess"] = 1000 * res["seconds_preprocess"] / (n_images * len(prepared_by_cfg))
        results[name] = res
        first = res["models"][next(iter(models))]
        log(f"  {name:<15s} preprocessed in {res['seconds_preprocess']:6.1f} s "
            f"({res['ms_per_image_preprocess']:5.2f} ms an image), models "
            f"{sum(res['seconds_models'].values()):5.1f} s; accuracy {100 * first['accuracy_mean_over_kinds']:5.1f}%, "
            f"refused {100 * first['refused_share']:4.1f}%, changed {100 * first['changed_share']:5.1f}%")
    steps = results[REFERENCE]["steps_acting"][next(iter(models))]
    n_images = sum(len(items) for items in sets.values())
    overall = {name: sum(steps[k][name] * len(sets[k]) for k in kinds) / n_images for name in STEPS}
    return {"results": results, "summary": summarize(results, variants, list(models), kinds),
            "reference_steps": {"overall": overall, "kinds": steps}}


def summarize(results: dict[str, Any], variants: list[dict[str, Any]], models: list[str],
              kinds: list[str]) -> dict[str, Any]:  # fmt: skip
    """Per variant: mean +- sample std over the models (overall and per kind), the share refused and changed, the
    kinds it moves most, and Welch's t against the reference over the per-model overall accuracies."""
    ref = [results[REFERENCE]["models"][m]["accuracy_mean_over_kinds"] for m in models]
    ref_kinds = {k: statistics.mean(results[REFERENCE]["models"][m]["kinds"][k]["accuracy"] for m in models)
                 for k in kinds}  # fmt: skip
    out: dict[str, Any] = {}
    for v in variants:
        name = v["name"]
        per = results[name]["models"]
        acc = [per[m]["accuracy_mean_over_kinds"] for m in models]
        mean, std = _mean_std(acc)
        pooled, pooled_std = _mean_std([per[m]["accuracy_all_images"] for m in models])
        kind_stats = {}
        for k in kinds:
            km, ks = _mean_std([per[m]["kinds"][k]["accuracy"] for m in models])
            kind_stats[k] = {"accuracy_mean": km, "accuracy_std": ks, "difference_vs_full": km - ref_kinds[k],
                             "refused_share": statistics.mean(per[m]["kinds"][k]["refused_share"] for m in models),
                             "changed_share": statistics.mean(per[m]["kinds"][k]["changed_share"] for m in models)}
        moved = sorted(kinds, key=lambda k: (-abs(kind_stats[k]["difference_vs_full"]), k))
        out[name] = {
            "label": v["label"],
            "accuracy_mean": mean, "accuracy_std": std, "accuracy_per_model": acc,
            "accuracy_all_images_mean": pooled, "accuracy_all_images_std": pooled_std,
            "refused_share": statistics.mean(per[m]["refused_share"] for m in models),
            "changed_share": statistics.mean(per[m]["changed_share"] for m in models),
            "difference_vs_full": mean - statistics.mean(ref),
            "difference_vs_full_per_model": [a - r for a, r in zip(acc, ref, strict=True)],
            "kinds": kind_stats,
            "most_moved_kinds": [{"kind": k, **kind_stats[k]} for k in moved[:3]],
            "welch_vs_full": None if name == REFERENCE else welch(name, acc, REFERENCE, ref),
        }  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# Report: table, JSON, plot.


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def print_table(summary: dict[str, Any], results: dict[str, Any], kinds: list[str], n_models: int) -> None:
    print(f"\n{'variant':<16s} {'accuracy (mean +- std over ' + str(n_models) + ')':>30s} {'refused':>8s} "
          f"{'changed':>8s} {'Welch t':>8s} {'p':>7s} {'s prep':>7s}  kinds moved most (accuracy, difference)")
    for name, s in summary.items():
        w = s["welch_vs_full"] or {}
        t = w.get("welch_t")
        p = w.get("p_value")
        moved = "; ".join(f"{k['kind']} {_pct(k['accuracy_mean'], 0)} ({100 * k['difference_vs_full']:+.0f})"
                          for k in s["most_moved_kinds"][:2]) if name != REFERENCE else ""  # fmt: skip
        std = "" if s["accuracy_std"] is None else f" +- {_pct(s['accuracy_std'], 2)}"
        print(f"{name:<16s} {_pct(s['accuracy_mean'], 2) + '%' + std:>30s} {_pct(s['refused_share']) + '%':>8s} "
              f"{_pct(s['changed_share']) + '%':>8s} {'-' if t is None else f'{t:.1f}':>8s} "
              f"{'-' if p is None else f'{p:.3f}':>7s} {results[name]['seconds_preprocess']:7.1f}  {moved}")
    short = list(summary)
    print(f"\naccuracy per kind (%, mean over {n_models} models)")
    print(f"{'kind':<18s}" + "".join(f"{n[:10]:>11s}" for n in short))
    for k in kinds:
        print(f"{k:<18s}" + "".join(f"{_pct(summary[n]['kinds'][k]['accuracy_mean']):>11s}" for n in short))


def print_steps(steps: dict[str, Any]) -> None:
    print("\nwhat the full pipeline did (share of images; the kinds where it acted most)")
    for name, share in steps["overall"].items():
        most = sorted(steps["kinds"], key=lambda k: -steps["kinds"][k][name])[:3]
        where = ", ".join(f"{k} {_pct(steps['kinds'][k][name], 0)}%" for k in most if steps["kinds"][k][name] > 0)
        print(f"  {name:<26s} {_pct(share):>5s}%  {where}")


def _cpu_name() -> str:
    return realworld._cpu_name()


def save_plot(summary: dict[str, Any], kinds: list[str], path: Path, title: str) -> Path:
    """Left: overall accuracy per variant (mean +- sample std over the models, each model a dot); right: accuracy
    per kind and variant (mean over the models), a heat map. Figure + FigureCanvasAgg, as digitkit.plots draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary)
    fig = Figure(figsize=(17, 0.42 * len(names) + 3.2), layout="constrained")
    ax, hm = fig.subplots(1, 2, width_ratios=[1, 2.3])
    y = np.arange(len(names))[::-1]
    ref = 100 * summary[REFERENCE]["accuracy_mean"]
    for yi, n in zip(y, names, strict=True):
        s = summary[n]
        mean, std = 100 * s["accuracy_mean"], 100 * (s["accuracy_std"] or 0.0)
        colour = "C2" if n == REFERENCE else "C3" if n == RAW else "C0"
        ax.barh(yi, mean, color=colour, height=0.6, alpha=0.85)
        ax.errorbar(mean, yi, xerr=std if s["accuracy_std"] is not None else None, fmt="none", color="0.15",
                    capsize=4, elinewidth=1.2)  # fmt: skip
        per = 100 * np.array(s["accuracy_per_model"])
        ax.plot(per, np.full(per.size, yi), "o", color="C1", markersize=3.5, zorder=3)
        label = f"{mean:.1f}" + (f" +- {std:.1f}" if s["accuracy_std"] is not None else "")
        ax.annotate(label, (min(mean + std, 100), yi), textcoords="offset points", xytext=(5, -3), fontsize=8)
    ax.axvline(ref, color="0.3", linestyle="--", linewidth=1, label=f"full pipeline {ref:.1f}%")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{n}\n{summary[n]['label']}" for n in names], fontsize=7.5)
    ax.set_xlim(0, 112)
    ax.set_xlabel("top-1 accuracy, mean over kinds (%); refusals count as wrong")
    ax.plot([], [], "o", color="C1", markersize=3.5, label="one model")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title("overall: mean +- std over the models", fontsize=10)

    grid = np.array([[100 * summary[n]["kinds"][k]["accuracy_mean"] for k in kinds] for n in names])
    im = hm.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(names)):
        for j in range(len(kinds)):
            v = grid[i, j]
            hm.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7.5,
                    color="white" if v < 25 or v > 85 else "black")  # fmt: skip
    hm.set_xticks(range(len(kinds)))
    hm.set_xticklabels(kinds, rotation=40, ha="right", fontsize=8)
    hm.set_yticks(range(len(names)))
    hm.set_yticklabels(names, fontsize=8)
    hm.set_title("accuracy per kind (%, mean over the models)", fontsize=10)
    fig.colorbar(im, ax=hm, fraction=0.03, pad=0.01)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)
    return path


def _rel(path: str | Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="run folder or checkpoint (repeatable)")
    p.add_argument("--n", type=int, default=200, help="images per digit kind (realworld.py's default)")
    p.add_argument("--source", choices=("test", "val"), default="test",
                   help="test (default): MNIST test digits, reported only; val: the models' validation digits")
    p.add_argument("--seed", type=int, default=0, help="the sets' seed (realworld.py's default)")
    p.add_argument("--n-negatives", type=int, default=100, help=argparse.SUPPRESS)  # only names realworld.py's cache
    p.add_argument("--cache", metavar="DIR", help="realworld.py's set cache (e.g. benchmarks/.cache)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "study-preprocess.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "studies-preprocess.png"))
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # it runs beside training jobs (and inside a test session: restored below)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    if args.cache:  # the benchmark's own pickle (non-digits included, unused here)
        sets = realworld.make_sets(args.source, args.n, args.n_negatives, args.seed, args.cache)[0]
    else:
        sets = realworld.digit_sets(args.source, args.n, args.seed)
    made = time.perf_counter() - started
    kinds = list(sets)
    n_images = sum(map(len, sets.values()))
    print(f"{n_images} digits in {len(kinds)} kinds ({args.source} digits, n = {args.n}) in {made:.0f} s")
    recs, infos = {}, {}
    for m in args.model:
        recs[m], infos[m] = _open(m)
        print(f"model {m}: seed {infos[m]['seed']}, MNIST test {_pct(infos[m]['test_accuracy'], 2)}%")
    out = measure(recs, sets)
    command = "python " + " ".join(shlex.quote(a) for a in [_rel(__file__), *(argv if argv is not None
                                                                             else sys.argv[1:])])  # fmt: skip
    seconds = time.perf_counter() - started
    doc = {
        "study": "preprocess ablation on real-world input (issue 26, real-world accuracy)",
        "question": "my 99% model fails on my own digits; which preprocessing step matters?",
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"processor": _cpu_name(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "metric": "top-1 accuracy, rejection off; an image the pipeline refuses (empty, no-ink, unreadable) counts "
                  "as wrong; overall = mean over kinds (accuracy_all_images: over all images); mean +- sample std "
                  "over the models; Welch's t against the full pipeline over the per-model overall accuracies",
        "source": args.source, "n_per_kind": args.n, "seed": args.seed, "n_images": n_images,
        "sets": {k: len(v) for k, v in sets.items()},
        "models": infos,
        "variants": VARIANTS,
        "seconds_total": seconds, "seconds_making_sets": made,
        **out,
    }  # fmt: skip
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(out["summary"], out["results"], kinds, len(recs))
    print_steps(out["reference_steps"])
    seeds = ", ".join(str(i["seed"]) for i in infos.values())
    title = (f"Which preprocessing step matters? {len(recs)} model{'s' if len(recs) > 1 else ''} (seeds {seeds}), "
             f"{n_images:,} {args.source} digits in {len(kinds)} real-world kinds, one step changed at a time")
    save_plot(out["summary"], kinds, Path(args.plot), title)
    print(f"\nwrote {out_path} and {args.plot} ({seconds:.0f} s in all)")
    return doc


if __name__ == "__main__":
    main()
