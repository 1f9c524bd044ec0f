"""Regenerate the pictures in docs/img/ and the output excerpts in docs/*.md by running the commands they show.

    .venv/bin/python docs/build.py            # about 6 minutes on 2 CPU cores (it trains a small model first)
    .venv/bin/python docs/build.py --only train evaluate

Every excerpt in a page sits between `<!-- output: NAME -->` and `<!-- /output -->`; the step NAME below runs its
commands in a scratch folder (with `configs/` and `data/` linked from the repository, so the commands read exactly
as a user types them in the repository), and writes `$ command` plus its output there. Pictures are the files the
commands write, shrunk to palette PNGs of a few tens of kB in docs/img/. The model is the default recipe cut to
2 epochs (about 99% on the test set): enough to show what the commands print, in a minute of training.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
IMG = DOCS / "img"
DIGITKIT = Path(sys.executable).parent / ("digitkit.exe" if os.name == "nt" else "digitkit")
MAX_WIDTH = 900


@dataclass
class Step:
    """Commands (as shown in the docs) whose output fills the excerpt `name`, and the pictures they leave."""

    name: str
    commands: list[str]
    images: dict[str, str] = field(default_factory=dict)  # file the commands wrote (in the scratch folder) -> docs/img
    max_lines: int = 40
    keep: Callable[[str], bool] | None = None  # which output lines to show (default: all, up to max_lines)
    before: Callable[[Path], None] | None = None  # prepares inputs in the scratch folder


def run(command: str, work: Path) -> str:
    """Run one `digitkit ...` command line in `work`; its stdout and stderr as a terminal would show them."""
    argv = shlex.split(command)
    assert argv[0] == "digitkit", command
    env = {**os.environ, "COLUMNS": "110"}
    done = subprocess.run([str(DIGITKIT), *argv[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode not in (0, 1):
        raise SystemExit(f"docs/build.py: `{command}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stderr + done.stdout


def shrink(src: Path, dst: Path, max_width: int = MAX_WIDTH, colors: int = 64) -> int:
    """A small copy for the docs: at most max_width wide, a palette of `colors`; returns its size in bytes."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.LANCZOS)
        im = im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        buf = io.BytesIO()
        im.save(buf, "PNG", optimize=True)
    dst.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def montage(top: list[Path], bottom: list[Path], out: Path, cell: int = 112) -> None:
    """Inputs (top row) above what the model saw (bottom row), `cell` px squares, 8 px apart."""
    gap = 8
    sheet = Image.new("RGB", (len(top) * (cell + gap) + gap, 2 * (cell + gap) + gap), "white")
    for row, files in enumerate((top, bottom)):
        for i, f in enumerate(files):
            with Image.open(f) as im:
                im = im.convert("RGBA")
                flat = Image.new("RGBA", im.size, (128, 128, 128, 255))  # transparent canvases shown on gray
                flat.alpha_composite(im)
                flat.thumbnail((cell, cell), Image.Resampling.NEAREST if im.width <= 28 else Image.Resampling.LANCZOS)
                if flat.width < cell and im.width <= 28:
                    flat = flat.resize((cell, cell), Image.Resampling.NEAREST)
                x = gap + i * (cell + gap) + (cell - flat.width) // 2
                y = gap + row * (cell + gap) + (cell - flat.height) // 2
                sheet.paste(flat.convert("RGB"), (x, y))
    sheet.save(out)


# ---------------------------------------------------------------------------------------------- inputs
PHOTO_KINDS = ("photo", "pen_on_paper", "scan", "canvas_rgba", "inverted", "rotated")


def make_photos(work: Path) -> None:
    """Realistic pictures of six MNIST test digits (digitkit.synth): a phone photo, pen on paper, a scan..."""
    from digitkit import data, synth

    test = data.load_split(work / "data" / "mnist", "test", verify=False)
    (work / "photos").mkdir(exist_ok=True)
    for i, kind in enumerate(PHOTO_KINDS):
        img = synth.KINDS[kind](test.images[i + 20, 0].numpy(), seed=i)
        Image.fromarray(img).save(work / "photos" / f"{i}-{kind}.png")


def make_row(work: Path) -> None:
    from digitkit import data, synth

    test = data.load_split(work / "data" / "mnist", "test", verify=False)
    picks = [int(np.nonzero(test.labels.numpy() == d)[0][0]) for d in (9, 0, 2, 1, 0)]
    img, _, _ = synth.strip([test.images[i, 0].numpy() for i in picks], labels=[9, 0, 2, 1, 0], seed=3, height=64)
    Image.fromarray(img).save(work / "postcode.png")


def photos_montage(work: Path) -> None:
    photos = sorted((work / "photos").glob("*.png"))
    seen = sorted((work / "seen").glob("*.png"))
    montage(photos, seen, work / "realworld-preprocess.png")


# ---------------------------------------------------------------------------------------------- serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_excerpt(work: Path) -> str:
    """Start `digitkit serve`, ask it about one photo and its model, stop it; the exchange as text."""
    port = free_port()
    command = f"digitkit serve --model runs/docs --port {port}"
    proc = subprocess.Popen([str(DIGITKIT), *shlex.split(command)[1:]], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        photo = work / "photos" / "0-photo.png"
        req = urllib.request.Request(f"{base}/v1/predict", data=photo.read_bytes(),
                                     headers={"Content-Type": "image/png"})  # fmt: skip
        answer = json.loads(urllib.request.urlopen(req, timeout=30).read())
        model = json.loads(urllib.request.urlopen(f"{base}/v1/model", timeout=30).read())
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    answer.pop("input", None)
    answer["probabilities"] = "[... one per class ...]"  # the same numbers as top_k, ten of them
    first_log = next((line for line in log.splitlines() if line.startswith("digitkit: serving")), "")
    keep = {k: model[k] for k in ("model_version", "classes", "contract") if k in model}
    return "\n".join([
        f"$ {command.replace(str(port), '8000')}",
        first_log.replace(str(port), "8000"),
        "",
        "$ curl -s -X POST -H 'Content-Type: image/png' --data-binary @photos/0-photo.png "
        "http://127.0.0.1:8000/v1/predict",
        json.dumps(answer, indent=1),
        "",
        "$ curl -s http://127.0.0.1:8000/v1/model",
        json.dumps(keep, indent=1),
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------- steps
STEPS = [
    Step("data-preview", ["digitkit data preview --out data-preview.png --per-class 8"],
         {"data-preview.png": "data-preview.png"}),
    Step("augment-preview", ["digitkit augment preview --recipe standard --out augment-standard.png --n 6 --copies 8"],
         {"augment-standard.png": "augment-standard.png"}),
    Step("train", ["digitkit train --config configs/default.yaml --set train.epochs=2 --out runs/docs"],
         {"runs/docs/history.png": "train-history.png", "runs/docs/confusion.png": "train-confusion.png"}),
    Step("evaluate", ["digitkit evaluate runs/docs --adversarial-n 200"],
         {"runs/docs/eval/test/errors.png": "evaluate-errors.png",
          "runs/docs/eval/test/reliability.png": "evaluate-reliability.png",
          "runs/docs/eval/test/robustness.png": "evaluate-robustness.png"}),
    Step("explain", ["digitkit explain runs/docs --index 8 --out explain-8.png"], {"explain-8.png": "explain-8.png"}),
    Step("augment-realworld", ["digitkit augment preview --recipe realworld --out augment-realworld.png --n 6 "
                               "--copies 8"], {"augment-realworld.png": "augment-realworld.png"}),
    Step("predict", ["digitkit predict --model runs/docs photos/ --show-preprocessed seen/"],
         {"realworld-preprocess.png": "realworld-preprocess.png"}, before=make_photos),
    Step("explain-photo", ["digitkit explain runs/docs --image photos/0-photo.png --out explain-photo.png"],
         {"explain-photo.png": "explain-photo.png"}),
    Step("read", ["digitkit read --model runs/docs postcode.png --pattern '[0-9]{5}'"],
         {"postcode.png": "read-postcode.png"}, before=make_row),
    Step("export", ["digitkit export runs/docs --format onnx",
                    "digitkit predict --engine onnx --model runs/docs photos/0-photo.png photos/1-pen_on_paper.png"]),
    Step("cv", ["digitkit cv --config configs/default.yaml --folds 3 --workers 2 --set train.epochs=1 "
                "--out runs/docs-cv"], {"runs/docs-cv/cv.png": "scale-cv.png"},
         keep=lambda line: not line.startswith("[fold")),
    Step("compare", ["digitkit compare configs/default.yaml configs/edge.yaml --seeds 2 --set train.epochs=1 "
                     "--out runs/docs-compare"], {"runs/docs-compare/compare.png": "scale-compare.png"},
         keep=lambda line: not line.startswith("[")),
]  # fmt: skip
AFTER = {"predict": photos_montage}


def fill(page_text: str, name: str, excerpt: str) -> tuple[str, int]:
    # Non-greedy: from the step's marker to the first end marker after it, empty or not.
    pattern = re.compile(rf"(<!-- output: {re.escape(name)} -->\n)(.*?)(<!-- /output -->)", re.S)
    return pattern.subn(lambda m: f"{m[1]}```text\n{excerpt.rstrip()}\n```\n{m[3]}", page_text)


def excerpt_of(step: Step, work: Path) -> str:
    parts = []
    for command in step.commands:
        out = run(command, work).replace(str(work) + os.sep, "").replace(str(work), ".")
        lines = [line.rstrip() for line in out.replace("\r", "\n").splitlines() if line.strip()]
        lines = [line for line in lines if step.keep is None or step.keep(line)]
        if len(lines) > step.max_lines:
            lines = lines[: step.max_lines] + [f"... ({len(lines) - step.max_lines} more lines)"]
        parts.append("\n".join([f"$ {command}", *lines]))
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="STEP", help=f"steps to run: {' '.join(s.name for s in STEPS)} serve "
                    "(the model must already be in --work)")  # fmt: skip
    ap.add_argument("--work", type=Path, help="scratch folder to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="digitkit-docs-"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "data"):
        if not (work / name).exists():
            (work / name).symlink_to(ROOT / name, target_is_directory=True)
    IMG.mkdir(exist_ok=True)
    pages = {p: p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md"))}
    wanted = set(args.only or [s.name for s in STEPS] + ["serve"])
    for step in STEPS:
        if step.name not in wanted:
            continue
        print(f"docs/build.py: {step.name}", flush=True)
        if step.before:
            step.before(work)
        if step.name in ("cv", "compare"):
            shutil.rmtree(work / "runs" / f"docs-{step.name}", ignore_errors=True)
        if step.name == "train":
            shutil.rmtree(work / "runs" / "docs", ignore_errors=True)
        text = excerpt_of(step, work)
        if step.name in AFTER:
            AFTER[step.name](work)
        filled = 0
        for page in pages:
            pages[page], n = fill(pages[page], step.name, text)
            filled += n
        if not filled:
            print(f"  (no page has <!-- output: {step.name} -->)")
        for src, dst in step.images.items():
            size = shrink(work / src, IMG / dst)
            print(f"  docs/img/{dst}: {size / 1000:.0f} kB")
        for page, text in pages.items():  # after every step: a later failure keeps what was done
            page.write_text(text, encoding="utf-8")
    if "serve" in wanted:
        print("docs/build.py: serve", flush=True)
        text = serve_excerpt(work)
        for page in pages:
            pages[page], _ = fill(pages[page], "serve", text)
    for page, text in pages.items():
        page.write_text(text, encoding="utf-8")
    total = sum(p.stat().st_size for p in IMG.glob("*.png"))
    print(f"docs/img: {total / 1e6:.2f} MB in all; scratch folder {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
