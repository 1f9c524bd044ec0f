"""Reading rows of digits: the row reader (CNN + CTC), the segmenting reader (cut, then classify each digit) and
Tesseract 5, side by side on the same images.

Sets (each row 1-8 or 3-8 digits; a third of the rows have touching neighbours, as people write):
  mnist_rows          rows of MNIST *test* digits on clean paper (synth.strip, digits 28-64 px tall), 1-8 digits
  mnist_photo_rows    rows of MNIST test digits photographed on paper (synth.row_photo), 3-8 digits
  pages               forms of 3-10 handwritten fields (3-7 MNIST test digits) beside printed labels, under a
                      printed title, half photographed, half scanned (synth.form_page): fields found, read exactly,
                      printed words taken for digit fields, time per page
  font_photo_rows     rows in handwriting-style fonts (synth.HANDWRITING_FONTS: Humor Sans, Comic Neue, Dancing
                      Script; Debian packages) photographed on paper, 3-8 digits. The row reader never trains on
                      them: they are as new to it as a stranger's handwriting. With --source val the faces are
                      rows.HELD_OUT_FONTS (printed faces no run trains on) instead.
Per set and reader: exact-string accuracy (every digit read, nothing added), character accuracy (1 - edit distance
/ length), both on touching and on separated rows, and the time per row (p50, in-process, image bytes to string).
With --source test (the default) nothing here chooses anything: the sets come from the MNIST test files and fonts.

    python benchmarks/read.py --reader runs/read-s0 [--classifier runs/rw3e20-s0] [--rows 300] \
        [--source test|val] [--setup] [--no-tesseract] [--ink-fractions 0.64,0.7,0.75,0.8,0.86|none] \
        [--reread-below 0.9] [--reject-below 0.2] [--out benchmarks/results/read.json]

--ink-fractions and --reread-below replace the run's inference.row_ink_fractions (the heights a row is read at)
and inference.reread_below_row_confidence (read the other heights only for rows less sure than this);
--reject-below replaces inference.reject_below_row_confidence (on pages, fields less sure are not digit fields).

--source val builds the rows from the reader's validation digits (the font rows are the same) and chooses
inference.reject_below_row_confidence there: the highest threshold rejecting at most 1% of the rows read right.

--setup installs Debian's tesseract-ocr and the handwriting fonts (apt-get, as root) when they are missing;
without them the Tesseract column and font_photo_rows are skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from digitkit import data, synth
from digitkit.rows import HELD_OUT_FONTS
from digitkit.sequence import edit_distance

ROOT = Path(__file__).resolve().parents[1]
APT_PACKAGES = ("tesseract-ocr", "fonts-humor-sans", "fonts-comic-neue", "fonts-dancingscript")
TOUCHING_ROWS = 1 / 3


def setup() -> None:
    """apt-get install what is missing (root only); a line says what could not be done."""
    missing = [p for p in APT_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if not missing:
        return
    if shutil.which("apt-get") is None or not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid():
        print(f"setup: cannot install {' '.join(missing)} (needs apt-get as root); those columns are skipped")
        return
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=False,
                   env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip


# ------------------------------------------------------------------------------------------------ sets
def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _touching_row(rng: np.random.Generator, sizer: int) -> bool:
    return sizer >= 2 and rng.random() < TOUCHING_ROWS


def mnist_rows(ds: data.Dataset, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, 1])
    out = []
    while len(out) < n:
        k = int(rng.integers(1, 9))
        idx = rng.integers(0, len(ds), k)
        want = _touching_row(rng, k)
        img, labels, boxes = synth.strip([ds.images[i, 0].numpy() for i in idx], [int(ds.labels[i]) for i in idx],
                                         seed=rng, height=float(rng.uniform(28, 64)), touch=0.6 if want else 0.0)
        if want and not synth.touching(boxes):  # a touching row must have touching digits: draw again
            continue
        out.append({"png": _png(img), "text": "".join(map(str, labels)), "touching": synth.touching(boxes)})
    return out


def photo_rows(n: int, seed: int, source) -> list[dict]:
    """Rows of 3-8 digits from `source(rng, digit) -> 28x28 uint8`, photographed by synth.row_photo."""
    rng = np.random.default_rng([seed, 2])
    out = []
    while len(out) < n:
        labels = [int(d) for d in rng.integers(0, 10, int(rng.integers(3, 9)))]
        want = _touching_row(rng, len(labels))
        img, _, touching = synth.row_photo([source(rng, d) for d in labels], labels, seed=rng,
                                           touch=0.6 if want else 0.0)  # fmt: skip
        if want != touching:
            continue
        out.append({"png": _png(img), "text": "".join(map(str, labels)), "touching": touching})
    return out


def pages(ds: data.Dataset, n: int, seed: int) -> list[dict]:
    """Forms (synth.form_page) of 3-10 handwritten fields of 3-7 MNIST test digits beside printed labels."""
    rng = np.random.default_rng([seed, 3])
    out = []
    for i in range(n):
        fields = []
        for _ in range(int(rng.integers(3, 11))):
            idx = rng.integers(0, len(ds), int(rng.integers(3, 8)))
            fields.append(([ds.images[j, 0].numpy() for j in idx], [int(ds.labels[j]) for j in idx]))
        img, truths = synth.form_page(fields, seed=rng, photo=bool(i % 2 == 0))
        out.append({"png": _png(img), "fields": truths})
    return out


def _iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def measure_pages(run: str, forms: list[dict], inference: dict | None = None) -> dict:
    """Each handwritten field found (a field box with IoU > 0.5) and read exactly; printed labels read as digit
    fields (not rejected) count as false fields; time per page (image bytes to every field read)."""
    from digitkit.realworld.page import read_page

    rdr = open_reader(run, inference)
    times, found, exact, total, false_fields = [], 0, 0, 0, 0
    for form in forms:
        t0 = time.perf_counter()
        page = read_page(rdr, form["png"])
        times.append(time.perf_counter() - t0)
        matched = set()
        for truth in form["fields"]:
            total += 1
            best = max(range(len(page.fields)), key=lambda k: _iou(page.fields[k]["box"], truth["box"]), default=None)
            if best is None or _iou(page.fields[best]["box"], truth["box"]) <= 0.5:
                continue
            matched.add(best)
            found += 1
            exact += page.fields[best]["text"] == truth["text"] and not page.fields[best]["rejected"]
        false_fields += sum(1 for k, f in enumerate(page.fields) if k not in matched and not f["rejected"])
    return {"pages": len(forms), "fields": total, "found": found / total, "exact": exact / total,
            "false_fields_per_page": false_fields / len(forms),
            "ms_per_page_p50": round(1000 * statistics.median(times), 1),
            "ms_per_page_p90": round(1000 * sorted(times)[int(0.9 * (len(times) - 1))], 1)}  # fmt: skip


# --------------------------------------------------------------------------------------------- readers
def tesseract_reader():
    exe = shutil.which("tesseract")
    if exe is None:
        return None

    def read(png: bytes) -> str:
        done = subprocess.run([exe, "-", "stdout", "--psm", "7", "-c", "tessedit_char_whitelist=0123456789"],
                              input=png, capture_output=True, timeout=60)  # fmt: skip
        return "".join(c for c in done.stdout.decode(errors="replace") if c.isdigit())

    return read


def open_reader(run: str, inference: dict | None = None):
    """The run's reader; `inference` replaces keys of its inference config (as the run's config would)."""
    from digitkit.config import InferenceConfig
    from digitkit.realworld.reader import SequenceReader

    rdr = SequenceReader.open(run)
    if inference:
        rdr.inference = InferenceConfig(**{**dataclasses.asdict(rdr.inference), **inference})
    return rdr


def sequence_reader(rdr):
    def read(png: bytes) -> tuple[str, float]:
        r = rdr.read(png)
        return (r.text, r.confidence) if r.rejected in (None, "low-confidence") else ("", 0.0)

    return read


def segment_reader(run: str):
    from digitkit.classify import Recognizer

    rec = Recognizer.open(run)

    def read(png: bytes) -> str:
        return rec.read(png)["text"].replace("?", "")

    return read


def measure(read, rows: list[dict]) -> dict:
    times, exact, chars, total = [], 0, 0, 0
    split = {True: [0, 0], False: [0, 0]}
    errors, confidences = [], []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        text = read(row["png"])
        times.append(time.perf_counter() - t0)
        if isinstance(text, tuple):  # the row reader: (text, the string's probability)
            text, confidence = text
            confidences.append((confidence, text == row["text"]))
        ok = text == row["text"]
        exact += ok
        split[row["touching"]][0] += ok
        split[row["touching"]][1] += 1
        chars += max(0, len(row["text"]) - edit_distance(text, row["text"]))
        total += len(row["text"])
        if not ok and len(errors) < 12:
            errors.append({"row": i, "truth": row["text"], "read": text, "touching": row["touching"]})
    return {
        "rows": len(rows),
        "exact": exact / len(rows),
        "char_accuracy": chars / total,
        "touching_rows": split[True][1],
        "touching_exact": split[True][0] / split[True][1] if split[True][1] else None,
        "separated_exact": split[False][0] / split[False][1] if split[False][1] else None,
        "ms_per_row_p50": round(1000 * statistics.median(times), 2),
        "ms_per_row_p90": round(1000 * sorted(times)[int(0.9 * (len(times) - 1))], 2),
        "errors": errors,
        **({"confidence_curve": confidence_curve(confidences)} if confidences else {}),
    }


CURVE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def confidence_curve(pairs: list[tuple[float, bool]]) -> list[dict]:
    """Per threshold on the string's probability: share of rows rejected, of right rows rejected, of wrong rows
    caught, and the exact rate on the rows answered."""
    right = [c for c, ok in pairs if ok]
    wrong = [c for c, ok in pairs if not ok]
    out = []
    for t in CURVE:
        kept_right = sum(c >= t for c in right)
        kept = kept_right + sum(c >= t for c in wrong)
        out.append({"threshold": t, "rows_rejected": 1 - kept / len(pairs),
                    "right_rejected": 1 - kept_right / len(right) if right else 0.0,
                    "wrong_caught": sum(c < t for c in wrong) / len(wrong) if wrong else None,
                    "exact_answered": kept_right / kept if kept else None})  # fmt: skip
    return out


def choose_threshold(curves: list[list[dict]], budget: float = 0.01) -> dict:
    """The highest threshold that rejects at most `budget` of the right rows on every set (validation only)."""
    ok = [t for t in CURVE if all(next(r for r in c if r["threshold"] == t)["right_rejected"] <= budget
                                  for c in curves)]  # fmt: skip
    t = max(ok) if ok else 0.0
    return {"threshold": t, "budget_right_rejected": budget,
            "per_set": [next(r for r in c if r["threshold"] == t) for c in curves]}  # fmt: skip


def _cpu_name() -> str:
    import machine  # benchmarks/machine.py, beside this script

    return machine.cpu_name()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reader", required=True, help="row-reader run (configs/read.yaml)")
    ap.add_argument("--classifier", help="single-digit run for the segmenting reader (default: none)")
    ap.add_argument("--rows", type=int, default=300, help="rows per set (default 300)")
    ap.add_argument("--pages", type=int, default=40, help="forms of 3-10 fields to read (default 40; 0 skips)")
    ap.add_argument("--source", choices=("test", "val"), default="test", help="digits from the MNIST test files "
                    "(report), or from the reader's validation split (choose the rejection threshold)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setup", action="store_true", help="apt-get install tesseract-ocr and the fonts if missing")
    ap.add_argument("--no-tesseract", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ink-fractions", help="comma-separated heights to read each row at, replacing the run's "
                    "inference.row_ink_fractions (e.g. 0.64,0.7,0.75,0.8,0.86; 'none' for the one height)")  # fmt: skip
    ap.add_argument("--reread-below", type=float, help="replaces the run's inference.reread_below_row_confidence "
                    "(1: every row at every height)")  # fmt: skip
    ap.add_argument("--reject-below", type=float, help="replaces the run's inference.reject_below_row_confidence "
                    "(pages: fields less sure than this are not digit fields)")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "read.json"))
    args = ap.parse_args(argv)
    inference: dict = {}
    if args.ink_fractions:
        inference["row_ink_fractions"] = ([] if args.ink_fractions == "none"
                                          else [float(f) for f in args.ink_fractions.split(",")])  # fmt: skip
    if args.reread_below is not None:
        inference["reread_below_row_confidence"] = args.reread_below
    if args.reject_below is not None:
        inference["reject_below_row_confidence"] = args.reject_below
    if args.setup:
        setup()
    torch.set_num_threads(args.threads)
    if args.source == "val":  # the reader's own validation digits: what the threshold is chosen on
        from digitkit import runs

        test, _ = runs.evaluation_data(runs.open_model(args.reader).cfg, "val")
    else:
        test = data.load_split(ROOT / "data" / "mnist", "test")
    sets = {"mnist_rows": mnist_rows(test, args.rows, args.seed)}
    sets["mnist_photo_rows"] = photo_rows(args.rows, args.seed + 1,
                                          lambda rng, d: test.images[_pick(rng, test, d), 0].numpy())  # fmt: skip
    # Validation rows in faces no run trains on (rows.HELD_OUT_FONTS); the report's in handwriting fonts.
    fonts = list(HELD_OUT_FONTS) if args.source == "val" else synth.handwriting_fonts()
    if fonts:
        sets["font_photo_rows"] = photo_rows(args.rows, args.seed + 2, lambda rng, d: synth.font_digit(
            d, fonts[int(rng.integers(len(fonts)))], slant_degrees=float(rng.uniform(-8, 8))))  # fmt: skip
    else:
        print("font_photo_rows skipped: no handwriting fonts installed (benchmarks/read.py --setup installs them)")
    rdr = open_reader(args.reader, inference)
    used = rdr.inference
    readers = {"sequence": sequence_reader(rdr)}
    if args.classifier:
        readers["segment"] = segment_reader(args.classifier)
    tess = None if args.no_tesseract else tesseract_reader()
    if tess is not None:
        readers["tesseract"] = tess
    elif not args.no_tesseract:
        print("tesseract skipped: the tesseract binary is not installed (benchmarks/read.py --setup installs it)")
    results: dict = {}
    for set_name, rows in sets.items():
        results[set_name] = {}
        for name, read in readers.items():
            m = measure(read, rows)
            results[set_name][name] = m
            print(f"{set_name:18s} {name:10s} exact {100 * m['exact']:5.1f}%  touching "
                  f"{100 * (m['touching_exact'] or 0):5.1f}% ({m['touching_rows']})  separated "
                  f"{100 * (m['separated_exact'] or 0):5.1f}%  chars {100 * m['char_accuracy']:5.1f}%  "
                  f"{m['ms_per_row_p50']:.1f} ms/row", flush=True)  # fmt: skip
    if args.pages:
        m = measure_pages(args.reader, pages(test, args.pages, args.seed), inference)
        results["pages"] = m
        print(f"pages ({m['pages']}, {m['fields']} fields): found {100 * m['found']:.1f}%  read exactly "
              f"{100 * m['exact']:.1f}%  false fields {m['false_fields_per_page']:.2f}/page  "
              f"{m['ms_per_page_p50']:.0f} ms/page p50", flush=True)  # fmt: skip
    if args.source == "val":
        curves = [r["sequence"]["confidence_curve"] for k, r in results.items() if k != "pages"]
        results["threshold_choice"] = choice = choose_threshold(curves)
        print(f"inference.reject_below_row_confidence chosen on validation: {choice['threshold']} (at most 1% of "
              "the rows read right rejected on every set)")  # fmt: skip
    out = {
        "reader": args.reader, "source": args.source, "classifier": args.classifier, "rows_per_set": args.rows,
        "seed": args.seed, "row_ink_fractions": used.row_ink_fractions,
        "reread_below_row_confidence": used.reread_below_row_confidence,
        "reject_below_row_confidence": used.reject_below_row_confidence,
        "touching_rows_share": TOUCHING_ROWS, "fonts": fonts, "threads": args.threads,
        "tesseract": _tesseract_version() if tess is not None else None,
        "machine": {"processor": _cpu_name(), "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _pick(rng: np.random.Generator, ds: data.Dataset, digit: int) -> int:
    where = np.flatnonzero(ds.labels.numpy() == digit)
    return int(where[rng.integers(len(where))])


def _tesseract_version() -> str:
    done = subprocess.run(["tesseract", "--version"], capture_output=True, text=True)
    return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "unknown"


if __name__ == "__main__":
    sys.exit(main())
