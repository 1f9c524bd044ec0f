"""`digitkit card RUN`: a model card (MODEL_CARD.md) built from what the run folder holds.

`build_card` is pure (files in, Markdown out). It reads the checkpoint, config.yaml, summary.json and, when
`digitkit evaluate` has run, eval/test/metrics.json and per_class.csv; whatever is missing is named in the card
with the command that produces it, never guessed.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from digitkit import augment, config, data, idx, runs
from digitkit.errors import DataError
from digitkit.idx import atomic_write_bytes
from digitkit.models import count_macs, count_params

CARD_NAME = "MODEL_CARD.md"


def build_card(path: str | Path) -> str:
    """The model card of a run folder or checkpoint file, as Markdown."""
    opened = runs.open_model(path)
    ckpt, cfg = opened.ckpt, opened.cfg
    run_dir = opened.run_dir
    run_arg = str(run_dir or opened.checkpoint_path)
    summary = _read_json(run_dir / "summary.json") if run_dir else {}
    ev = _read_json(run_dir / "eval" / "test" / "metrics.json") if run_dir else {}
    per_class = _read_csv(run_dir / "eval" / "test" / "per_class.csv") if run_dir else []
    sha = runs.checkpoint_sha256(opened.checkpoint_path)
    missing: list[str] = []
    if run_dir is None:
        missing.append("run folder (config.yaml, summary.json, metrics.csv): only a checkpoint file was given")
    elif not summary:
        missing.append("summary.json (the run did not finish, or the folder was copied without it)")
    if not ev:
        missing.append(f"evaluation results: run `digitkit evaluate {run_arg}` for per-class metrics, robustness "
                       "and calibration, then `digitkit card` again")  # fmt: skip

    out: list[str] = [f"# Model card: {cfg.model.name} ({(run_dir or opened.checkpoint_path).name})", ""]
    if missing:
        out += ["> Missing from this card:", *[f"> - {m}" for m in missing], ""]
    out += _details(opened, summary, sha)
    out += _intended_use()
    out += _training_data(cfg, summary)
    out += _preprocessing(cfg, ckpt)
    out += _metrics(summary, ev, per_class, sha, run_arg)
    out += _robustness(ev, run_arg)
    out += _limitations(cfg)
    out += _config_and_reproduce(opened, summary)
    return "\n".join(out).rstrip() + "\n"


def write_card(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the card to `out` (default: RUN/MODEL_CARD.md, or beside a bare checkpoint)."""
    text = build_card(path)
    opened_dir = Path(path) if Path(path).is_dir() else Path(path).parent
    target = Path(out) if out is not None else opened_dir / CARD_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, text.encode())
    return target


# ---------------------------------------------------------------------------------------------- sections
def _details(opened: runs.Opened, summary: dict[str, Any], sha: str) -> list[str]:
    ckpt = opened.ckpt
    saved = ckpt.get("saved_at")
    when = dt.datetime.fromtimestamp(saved, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if saved else "unknown"
    rows = [
        ("model", f"`{ckpt['model']}` {json.dumps(ckpt.get('model_args') or {})}"),
        ("parameters", f"{count_params(opened.model):,}"),
        ("multiply-adds per image", f"{count_macs(opened.model, ckpt['in_chans'], ckpt['img_size']):,}"),
        ("classes", ", ".join(ckpt["classes"])),
        ("digitkit version", ckpt.get("digitkit_version", "unknown")),
        ("checkpoint saved", when),
        ("checkpoint file", f"`{opened.checkpoint_path.name}`"),
        ("checkpoint SHA-256", f"`{sha}`"),
    ]
    if "pruned_from" in summary:
        p = summary.get("prune", {})
        rows.append(("pruned from", f"`{summary['pruned_from']}` ({p.get('method', '?')}, requested sparsity "
                     f"{p.get('requested_sparsity', '?')})"))  # fmt: skip
    if "distilled_from" in summary:
        d = summary.get("distill", {})
        rows.append(("distilled from", ", ".join(f"`{t}`" for t in summary["distilled_from"])
                     + f" (T = {d.get('temperature')}, alpha = {d.get('alpha')})"))  # fmt: skip
    return ["## Model details", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _intended_use() -> list[str]:
    return [
        "## Intended use",
        "",
        "- Reading single handwritten Western Arabic digits (0-9), one digit per image: scanned forms, photos "
        "of paper, drawing canvases, passed through `digitkit predict` (or the server), which applies the "
        "preprocessing contract below.",
        "- Rows of digits (amounts, postcodes, form fields) through `digitkit read`, which segments them first.",
        "- Teaching, benchmarking and as a baseline for honest measurement.",
        "",
        "## Out of scope",
        "",
        "- Letters and other symbols: the model has no 'not a digit' class; letters that look like digits "
        "(O, l, S, Z, B, g) are answered as digits. Rejection by shape and confidence catches only part of them.",
        "- Non-Western digit systems (Eastern Arabic-Indic, Persian, Devanagari, Bengali, Chinese, ...): never "
        "seen in training; answers are meaningless.",
        "- Multi-digit strings passed to `predict` as one image: use `digitkit read`.",
        "- Very low resolution (digits under about 10 px tall) and heavy degradation: see the robustness figures.",
        "- Adversarial settings: small crafted perturbations flip answers (see the attack figures where evaluated).",
        "- Any decision with legal or financial weight without a human check of rejected and low-confidence answers.",
        "",
    ]


def _training_data(cfg: config.Config, summary: dict[str, Any]) -> list[str]:
    folder = Path(cfg.data.dir)
    lines = ["## Training data", ""]
    try:
        files = data.find_files(folder)
        sums = data.expected_sums(folder)
        labels = idx.read(files[("train", "labels")])
        test_n = len(idx.read(files[("test", "labels")]))
        train_idx, val_idx = data.stratified_split(torch.from_numpy(labels.astype("int64")), cfg.data.val_fraction,
                                                   cfg.split_seed)  # fmt: skip
        lines += [
            f"Data folder `{cfg.data.dir}`: {len(labels):,} images in the training files, "
            + (f"split into {len(train_idx):,} for training and {len(val_idx):,} for validation (stratified, "
               f"`data.val_fraction` = {cfg.data.val_fraction}, seed {cfg.split_seed}); " if cfg.has_validation else
               f"all {len(train_idx):,} for training, with no validation hold-out (`data.val_fraction` = 0: the "
               "last epoch's weights are kept, nothing is chosen); ")
            + f"{test_n:,} test images, sealed: read once after training to report, never to choose an epoch, "
            "checkpoint or setting.",
            "",
            "| file | SHA-256 (uncompressed) |",
            "|---|---|",
            *[f"| `{p.name}` | `{sums.get(p.name.removesuffix('.gz'), 'no SHA256SUMS.raw entry')}` |"
              for p in files.values()],
            "",
        ]  # fmt: skip
    except (DataError, OSError) as e:
        lines += [f"The data folder `{cfg.data.dir}` could not be read from here ({e}); split sizes and checksums "
                  f"are not shown. Validation: "
                  + (f"stratified {cfg.data.val_fraction} of the training files, seed {cfg.split_seed}." if
                     cfg.has_validation else "none (`data.val_fraction` = 0)."), ""]  # fmt: skip
    if cfg.data.extra_dirs:
        n = summary.get("extra_training_images")
        lines += [f"Extra training data (training portion only; validation and test are unchanged): "
                  f"{', '.join(f'`{d}`' for d in cfg.data.extra_dirs)}"
                  + (f", {n:,} images." if n is not None else "."), ""]  # fmt: skip
    ops = [f"{op} (p = {v['p']})" for op, v in augment.config_to_dict(cfg.augment).items() if v["p"] > 0]
    lines += [f"Augmentation (training batches only, never validation or test): {', '.join(ops) or 'none'}; the "
              "full parameters are in the config below.", ""]  # fmt: skip
    return lines


def _preprocessing(cfg: config.Config, ckpt: dict[str, Any]) -> list[str]:
    size = ckpt["img_size"]
    pre = yaml.safe_dump({"preprocess": config.to_dict(cfg)["preprocess"]}, sort_keys=False).rstrip()
    return [
        "## Preprocessing contract",
        "",
        f"The model reads a ({ckpt['in_chans']}, {size}, {size}) float tensor in [0, 1]: a white digit on a black "
        "background, fitted into a 20x20 box and centred by mass, as MNIST was made. Normalization "
        "(mean/std) is inside the model. Raw photos, scans and canvases must go through "
        "`digitkit.preprocess.preprocess` (what `predict`, `read` and the server do); feeding a resized photo "
        "directly costs most of the accuracy. The settings stored with this model:",
        "",
        "```yaml",
        pre,
        "```",
        "",
    ]


def _metrics(summary: dict[str, Any], ev: dict[str, Any], per_class: list[dict[str, str]], sha: str,
             run_arg: str) -> list[str]:  # fmt: skip
    lines = ["## Metrics", ""]
    if ev:
        if ev.get("checkpoint_sha256") not in (None, sha):
            lines += ["> The evaluation below is of a different checkpoint (its SHA-256 differs); run "
                      f"`digitkit evaluate {run_arg}` again.", ""]  # fmt: skip
        lines += [
            f"Test set ({_count(ev.get('n'))} images, `digitkit evaluate`): accuracy **{_pct(ev.get('accuracy'))}** "
            f"({ev.get('errors', '?')} errors), macro F1 {_num(ev.get('macro_f1'))}, log loss "
            f"{_num(ev.get('log_loss'))}.",
            "",
        ]
    elif summary.get("test_accuracy") is not None:
        lines += [f"Test set: accuracy **{_pct(summary['test_accuracy'])}** ({summary.get('test_errors', '?')} "
                  "errors), from the run's summary.json.", ""]  # fmt: skip
    else:
        lines += ["No test figures: neither summary.json nor an evaluation holds them.", ""]
    if summary.get("val_accuracy") is not None:
        role = "measured only" if summary.get("checkpoint_metric") == "last" else "picked the checkpoint"
        lines += [f"Validation hold-out ({role}): {_pct(summary['val_accuracy'])}.", ""]
    elif "val_accuracy" in summary:  # null: the run had no validation images
        lines += ["No validation figure: the model trained on every training image (`data.val_fraction` = 0).", ""]
    lines += ["### Per class", ""]
    if per_class:
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for r in per_class:
            lines.append(f"| {r['class']} | {float(r['precision']):.4f} | {float(r['recall']):.4f} | "
                         f"{float(r['f1']):.4f} | {r['support']} |")  # fmt: skip
        lines.append("")
    else:
        lines += [f"Not evaluated yet: run `digitkit evaluate {run_arg}` for per-class precision, recall and F1.", ""]
    for name, s in (ev.get("slices") or {}).items():
        if name != "gap" and isinstance(s, dict):
            lines.append(f"- {name}: {_pct(s.get('accuracy'))}")
    if ev.get("slices"):
        lines.append("")
    return lines


def _robustness(ev: dict[str, Any], run_arg: str) -> list[str]:
    lines = ["## Robustness and calibration", ""]
    if not ev:
        return lines + [f"Not evaluated yet: run `digitkit evaluate {run_arg}` for corruption, adversarial and "
                        "calibration figures.", ""]  # fmt: skip
    cal = ev.get("calibration") or {}
    if cal:
        lines.append(f"- Calibration: expected calibration error {_pct(cal.get('ece'))} (maximum "
                     f"{_pct(cal.get('mce'))}).")  # fmt: skip
    ts = ev.get("temperature_scaling") or {}
    if ts:
        lines.append(f"- Temperature scaling: confidence is softmax(logits / T), T = {ts.get('temperature')} "
                     f"({ts.get('fitted_on', 'fitted on validation')}); ECE {_pct(ts.get('ece_before'))} with the "
                     "raw softmax (T = 1).")  # fmt: skip
    rej = ev.get("rejection_at_config")
    if rej:
        score = f" and digit score {rej['digit_score']}" if rej.get("digit_score") else ""
        lines.append(f"- At the rejection threshold {rej['threshold']}{score}: {_pct(rej['coverage'])} answered, "
                     f"{_pct(rej['accuracy_answered'])} of those right.")  # fmt: skip
    cs = ev.get("corruption_summary")
    rob = ev.get("robustness") or {}
    if cs:
        lines.append(f"- Corruptions modelled on MNIST-C ({cs.get('n', '?')}): mean accuracy {_pct(cs.get('mean'))}, "
                     f"worst {cs.get('worst')} ({_pct(cs.get('worst_accuracy'))}).")  # fmt: skip
    if "augmented" in rob:
        lines.append(f"- Augmented copy of the test set (training recipe): {_pct(rob['augmented'])}.")
    adv = ev.get("adversarial")
    if adv:
        eps = adv["epsilons"]
        for name, accs in adv["curves"].items():
            lines.append(f"- {name} (L-infinity, {adv.get('n', '?')} images): "
                         + ", ".join(f"eps {e:g}: {_pct(a)}" for e, a in zip(eps, accs, strict=True)))  # fmt: skip
    if rob:
        lines += ["", "| test set | accuracy |", "|---|---|", *[f"| {k} | {_pct(v)} |" for k, v in rob.items()]]
    if not (cs or adv):
        lines.append(f"- Robustness not measured (`--quick` evaluation): run `digitkit evaluate {run_arg}`.")
    return lines + [""]


def _limitations(cfg: config.Config) -> list[str]:
    return [
        "## Limitations",
        "",
        f"- Trained on `{cfg.data.dir}` (MNIST: digits written by US Census Bureau employees and high-school "
        "students, scanned, size-normalized and centred). Other populations, pens and capture conditions shift "
        "accuracy; measure on your own data.",
        "- Letters, symbols and non-Western digits are out of scope (above); the model answers them anyway unless "
        "rejected.",
        "- Digits under about 10 px, heavy blur, low contrast, inverted or cluttered images degrade accuracy; "
        "the corruption figures show how much where evaluated.",
        f"- Confidence is not probability of being right: see the calibration figures; the default rejection "
        f"threshold is {cfg.inference.reject_below_confidence}.",
        "- Not robust to adversarial perturbations.",
        "",
    ]


def _config_and_reproduce(opened: runs.Opened, summary: dict[str, Any]) -> list[str]:
    run_dir = opened.run_dir
    cfg_path = run_dir / "config.yaml" if run_dir else None
    text = cfg_path.read_text() if cfg_path and cfg_path.is_file() else yaml.safe_dump(
        config.to_dict(opened.cfg), sort_keys=False)  # fmt: skip
    where = str(cfg_path) if cfg_path else "config.yaml (the config above, saved from the checkpoint)"
    lines = ["## Training config and how to reproduce", "", "```yaml", text.rstrip(), "```", ""]
    if "pruned_from" in summary:
        p = summary.get("prune", {})
        flag = " --structured" if p.get("method") == "structured" else ""
        lines.append(f"Pruned and fine-tuned from another run: `digitkit prune {summary['pruned_from']} --sparsity "
                     f"{p.get('requested_sparsity')}{flag} --finetune-epochs {p.get('finetune_epochs')}` "
                     "(the config above is the fine-tuning recipe, not a from-scratch one).")  # fmt: skip
    elif "distilled_from" in summary:
        d = summary.get("distill", {})
        teachers = " ".join(summary["distilled_from"])
        lines.append(f"Distilled: `digitkit distill --teacher {teachers} --student {opened.cfg.model.name} --config "
                     f"{where} --temperature {d.get('temperature')} --alpha {d.get('alpha')}`.")  # fmt: skip
    else:
        lines.append(
            f"`digitkit train --config {where}` trains the same model from scratch (every epoch is "
            "seeded from the config's seed; on the same hardware and torch version the weights match)."
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------- helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, int | float) else "-"


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, int | float) else "-"
