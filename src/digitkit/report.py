"""Write an evaluation to disk: CSVs, figures, metrics.json, and one report as Markdown and self-contained HTML.

The report is built once as a list of blocks (headings, paragraphs, tables, images) and rendered twice, so the
Markdown and the HTML always say the same thing. HTML embeds its images (base64), so it can be mailed or
archived alone.

RUN/eval/<split>/
  metrics.json          every figure                     per_class.csv   precision, recall, F1, support
  confusion_*.csv       counts and row percentages       confusion.png   both panels
  errors.csv            every error: index, true, predicted, confidence, probability of the true class
  errors.png            the most confident errors per (true -> predicted) group
  reliability.png       calibration                      robustness.png / adversarial.png  when measured
  report.md / report.html
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digitkit import plots
from digitkit.evaluate import Evaluation
from digitkit.idx import atomic_write_bytes


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "list" | "table" | "img"
    text: str = ""
    items: list[str] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def write_evaluation(ev: Evaluation, images: torch.Tensor, labels: torch.Tensor, classes: list[str],
                     out_dir: Path, info: dict[str, Any]) -> dict[str, Path]:  # fmt: skip
    """All files of one evaluation into `out_dir`; `info` names what was evaluated (run, checkpoint, split, ...).
    Returns the written paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = ev.results
    files: dict[str, Path] = {}
    files["metrics"] = _write_text(out_dir / "metrics.json", json.dumps({**info, **r}, indent=2) + "\n")
    files["per_class"] = _write_csv(out_dir / "per_class.csv", ["class", "precision", "recall", "f1", "support"],
                                    [[c["class"], c["precision"], c["recall"], c["f1"], c["support"]]
                                     for c in r["per_class"]])  # fmt: skip
    cm = ev.confusion.numpy()
    header = ["true \\ predicted", *classes]
    files["confusion_counts"] = _write_csv(out_dir / "confusion_counts.csv", header,
                                           [[c, *row] for c, row in zip(classes, cm.tolist(), strict=True)])
    row_pct = (cm / cm.sum(1, keepdims=True).clip(min=1) * 100).round(2)
    files["confusion_percent"] = _write_csv(out_dir / "confusion_percent.csv", header,
                                            [[c, *row] for c, row in zip(classes, row_pct.tolist(), strict=True)])
    files["confusion"] = plots.save_confusion(cm, classes, out_dir / "confusion.png", title=info.get("title"))
    conf, preds = ev.probs.max(1)
    err = torch.nonzero(preds != labels).flatten().tolist()
    files["errors_csv"] = _write_csv(
        out_dir / "errors.csv", ["index", "true", "predicted", "confidence", "p_true"],
        [[i, classes[labels[i]], classes[preds[i]], round(float(conf[i]), 5), round(float(ev.probs[i, labels[i]]), 5)]
         for i in sorted(err, key=lambda i: -float(conf[i]))],
    )  # fmt: skip
    if ev.groups:
        files["errors"] = plots.save_error_gallery(images, ev.groups, classes, out_dir / "errors.png",
                                                   title="most confident errors (true -> predicted)")  # fmt: skip
    files["reliability"] = plots.save_reliability(r["calibration"], out_dir / "reliability.png")
    if len(r.get("robustness", {})) > 1:
        files["robustness"] = plots.save_robustness(r["robustness"], out_dir / "robustness.png")
        _write_csv(out_dir / "robustness.csv", ["test set", "accuracy"], [[k, v] for k, v in r["robustness"].items()])
    if "adversarial" in r:
        adv = r["adversarial"]
        curves = {name: list(zip(adv["epsilons"], accs, strict=True)) for name, accs in adv["curves"].items()}
        files["adversarial"] = plots.save_attack_curves(curves, out_dir / "adversarial.png")
    blocks = build_blocks(r, info, files, classes)
    files["report_md"] = _write_text(out_dir / "report.md", render_markdown(blocks))
    files["report_html"] = _write_text(out_dir / "report.html", render_html(blocks, out_dir, info.get("title", "")))
    return files


def build_blocks(r: dict[str, Any], info: dict[str, Any], files: dict[str, Path], classes: list[str]) -> list[Block]:
    b: list[Block] = [Block("h1", info.get("title", "Evaluation"))]
    b.append(Block("table", headers=["", ""], rows=[[k, v] for k, v in info.items() if k != "title"]))
    b.append(Block("h2", "Summary"))
    cal = r["calibration"]
    b.append(Block("list", items=[
        f"accuracy **{pct(r['accuracy'])}** ({r['errors']} errors in {r['n']:,} images)",
        f"macro F1 {r['macro_f1']:.4f}, weighted F1 {r['weighted_f1']:.4f}, log loss {r['log_loss']:.4f}",
        f"expected calibration error {pct(cal['ece'])} (maximum {pct(cal['mce'])}, {len(cal['bins'])} bins)",
        *([f"temperature scaling: T = {ts['temperature']:.4g} ({ts.get('fitted_on', 'fitted on validation')}); "
           f"ECE {pct(ts['ece_before'])} with the raw softmax (T = 1), {pct(ts['ece_after'])} calibrated; log loss "
           f"{ts['log_loss_before']:.4f} -> {ts['log_loss_after']:.4f}"]
          if (ts := r.get("temperature_scaling")) else []),
        *([f"answers with the Gaussian-noise defence, sigma {r['noise_defence_sigma']}"]
          if r["noise_defence_sigma"] else []),
    ]))  # fmt: skip
    if "diagnosis" in r:
        d = r["diagnosis"]
        b.append(Block("h2", f"Diagnosis: {d['verdict']}"))
        b.append(Block("list", items=d["reasons"]))
        if d.get("next_steps"):
            b.append(Block("p", "Next to try:"))
            b.append(Block("list", items=d["next_steps"]))
    b.append(Block("h2", "Per class"))
    b.append(Block("table", headers=["class", "precision", "recall", "F1", "support"],
                   rows=[[c["class"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
                         for c in r["per_class"]]))  # fmt: skip
    b.append(Block("h2", "Confusion"))
    b.append(Block("img", "confusion.png"))
    b.append(Block("table", headers=["true", "predicted", "count", "% of true class"],
                   rows=[[t["true"], t["predicted"], t["count"], f"{t['percent_of_true']:.2f}"]
                         for t in r["top_confusions"] if t["count"] > 0]))  # fmt: skip
    if "errors" in files:
        b.append(Block("h2", "Errors"))
        b.append(Block("p", "Every error is listed in errors.csv (test index, true, predicted, confidence); the "
                            "gallery shows the most confident errors of each (true -> predicted) group."))  # fmt: skip
        b.append(Block("img", "errors.png"))
    b.append(Block("h2", "Calibration and rejection"))
    b.append(Block("img", "reliability.png"))
    b.append(Block("p", "What a confidence threshold trades: images below it are answered with `digit: null`."))
    b.append(Block("table", headers=["threshold", "answered", "accuracy answered", "errors kept", "errors rejected",
                                     "correct rejected"],
                   rows=[[f"{x['threshold']:.2f}", pct(x["coverage"]), pct(x["accuracy_answered"]),
                          x["errors_answered"], x["errors_rejected"], x["correct_rejected"]]
                         for x in r["rejection"]]))  # fmt: skip
    if "slices" in r:
        s = r["slices"]
        b.append(Block("h2", "Slices"))
        names = [k for k in s if k != "gap"]
        b.append(Block("table", headers=["slice", "n", "accuracy", "macro F1", "log loss", "ECE"],
                       rows=[[k, s[k]["n"], pct(s[k]["accuracy"]), f"{s[k]['macro_f1']:.4f}",
                              f"{s[k]['log_loss']:.4f}", pct(s[k]["ece"])] for k in names]))  # fmt: skip
        for gap in _as_list(s.get("gap")):
            b.append(Block("p", _gap_text(gap)))
    rob = r.get("robustness", {})
    if len(rob) > 1:
        b.append(Block("h2", "Robustness"))
        extra = ""
        if "corruption_summary" in r:
            cs = r["corruption_summary"]
            extra = f" Mean over the {cs.get('n', len(rob) - 2)} corruptions: {pct(cs['mean'])}; worst: {cs['worst']}."
        b.append(Block("p", "Clean test set, an augmented copy (" + r.get("augmented_recipe", "-") + ") and a "
                            "corruption suite modelled on MNIST-C, generated deterministically from the seed." + extra))
        b.append(Block("img", "robustness.png"))
        b.append(Block("table", headers=["test set", "accuracy"], rows=[[k, pct(v)] for k, v in rob.items()]))
    if "adversarial" in r:
        adv = r["adversarial"]
        b.append(Block("h2", "Adversarial robustness"))
        b.append(Block("p", f"L-infinity attacks on {adv['n']} test images (seeded, class-stratified). Attacks on "
                            "the noise defence average the gradient over its noise (an adaptive attack)."))
        b.append(Block("img", "adversarial.png"))
        b.append(Block("table", headers=["attack", *[f"eps {e:g}" for e in adv["epsilons"]]],
                       rows=[[k, *[pct(a) for a in v]] for k, v in adv["curves"].items()]))  # fmt: skip
    b.append(Block("p", f"Evaluation took {r.get('seconds', 0):.1f} s."))
    return b


def _as_list(x: Any) -> list[dict[str, Any]]:
    if x is None:
        return []
    return x if isinstance(x, list) else [x]


def _gap_text(g: dict[str, Any]) -> str:
    names = " vs ".join(str(n) for n in (g.get("a"), g.get("b")) if n is not None) or "slices"
    verdict = "a real gap (flagged)" if g.get("flagged") else "within noise"
    return f"{names}: difference {g.get('difference_pp', 0):+.2f} pp, z = {g.get('z', 0):.2f}: {verdict}."


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for bl in blocks:
        if bl.kind == "h1":
            out.append(f"# {bl.text}\n")
        elif bl.kind == "h2":
            out.append(f"## {bl.text}\n")
        elif bl.kind == "p":
            out.append(bl.text + "\n")
        elif bl.kind == "list":
            out.append("\n".join(f"- {i}" for i in bl.items) + "\n")
        elif bl.kind == "img":
            out.append(f"![{bl.text}]({bl.text})\n")
        elif bl.kind == "table":
            rows = [[str(c).replace("|", "\\|") for c in row] for row in bl.rows]
            lines = ["| " + " | ".join(bl.headers) + " |", "|" + "---|" * len(bl.headers)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the blocks use: **bold** and `code`."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(blocks: list[Block], img_dir: Path, title: str) -> str:
    body: list[str] = []
    for bl in blocks:
        if bl.kind in ("h1", "h2"):
            body.append(f"<{bl.kind}>{_inline(bl.text)}</{bl.kind}>")
        elif bl.kind == "p":
            body.append(f"<p>{_inline(bl.text)}</p>")
        elif bl.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in bl.items) + "</ul>")
        elif bl.kind == "img":
            data = base64.b64encode((img_dir / bl.text).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(bl.text)}" src="data:image/png;base64,{data}"></p>')
        elif bl.kind == "table":
            head = "".join(f"<th>{_inline(str(h))}</th>" for h in bl.headers)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in bl.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3}")  # fmt: skip
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode())
    return path


def _write_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(rows)
    return _write_text(path, buf.getvalue())
