"""Training the row reader (task: sequence): CTC on rows composed afresh each epoch from the training digits.

The loop mirrors train.fit (the same optimizer, schedule, EMA, mixed precision, checkpoints, metrics.csv and
exact resume from last.pt: every epoch's rows are drawn from a generator seeded by (seed, epoch)). What differs is
the batch (rows of any width, padded) and the loss (torch's CTCLoss over the frames of each row's own width).
The accuracy columns hold the exact-string rate: a row counts only when every digit is read and nothing is added.
Validation rows come from the validation digits, the report's rows from the MNIST test digits, read once at the
end; neither is ever augmented or used for training.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from digitkit import __version__, checkpoint, config
from digitkit.config import Config
from digitkit.data import Dataset
from digitkit.idx import atomic_write_bytes
from digitkit.models import DigitModel, count_macs, count_params
from digitkit.models.crnn import FRAME_PX
from digitkit.rows import RowBatch, compose, fixed_rows, font_digits, training_fonts
from digitkit.train import (
    FitState,
    Reporter,
    SilentReporter,
    _update_best,
    _update_early_stopping,
    mixed_precision,
    pick_device,
    save_resume,
    training_state,
    write_metrics,
)

ROW_PX = 128
"""The row width the summary's multiply-adds are counted for: about five digits at 32 px tall."""


def ctc_loss(logits: torch.Tensor, batch: RowBatch, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, K) -> torch's CTC loss (blank 0) over each row's own frames, in float32. "mean" divides each
    row's loss by its length, then averages (torch's convention); "none" gives (B,) per-row negative log-likelihoods."""
    log_probs = logits.float().log_softmax(2).transpose(0, 1)  # (T, B, K)
    frames = batch.frames().clamp(max=log_probs.shape[0])
    return F.ctc_loss(log_probs, batch.targets, frames, batch.lengths, blank=0, reduction=reduction,
                      zero_infinity=True)  # fmt: skip


def read_batch(model: DigitModel, x: torch.Tensor, widths: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Greedy reading of padded rows: (logits (B, T, K), texts)."""
    logits = model(x)
    return logits, greedy_texts(logits, widths // FRAME_PX)


def greedy_texts(logits: torch.Tensor, frames: torch.Tensor) -> list[str]:
    """The best path's strings of logits (B, T, K) over each row's first `frames` frames: the text alone, without
    the confidences ctc.greedy_batch computes (what the training accuracy needs, every batch)."""
    best = logits.detach().argmax(2).cpu()
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[:, 1:] = best[:, 1:] != best[:, :-1]
    keep &= (best != 0) & (torch.arange(best.shape[1]) < frames.cpu()[:, None])
    return ["".join(str(int(c) - 1) for c in row[k]) for row, k in zip(best, keep, strict=True)]


def evaluate_rows(model: DigitModel, batches: list[RowBatch], device: torch.device) -> dict[str, Any]:
    """Exact-string and character accuracy, mean CTC loss, and exact accuracy on touching and separated rows."""
    model.eval()
    loss_sum = 0.0
    n = exact = 0
    char_right = char_total = 0
    split = {True: [0, 0], False: [0, 0]}
    with torch.no_grad():
        for b in batches:
            logits, texts = read_batch(model, b.x.to(device), b.widths.to(device))
            loss_sum += float(ctc_loss(logits.cpu(), b)) * len(b)
            for text, truth, touching in zip(texts, b.texts, b.touching.tolist(), strict=True):
                ok = text == truth
                exact += ok
                split[touching][0] += ok
                split[touching][1] += 1
                char_right += max(0, len(truth) - edit_distance(text, truth))
                char_total += len(truth)
            n += len(b)
    return {
        "rows": n,
        "loss": loss_sum / max(n, 1),
        "exact": exact / max(n, 1),
        "char_accuracy": char_right / max(char_total, 1),
        "touching_rows": split[True][1],
        "touching_exact": split[True][0] / split[True][1] if split[True][1] else None,
        "separated_exact": split[False][0] / split[False][1] if split[False][1] else None,
    }


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions); character accuracy is 1 - it / len(truth)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def fit_sequence(
    cfg: Config,
    model: DigitModel,
    train_set: Dataset,
    val_rows: list[RowBatch],
    run_dir: Path,
    meta: dict[str, Any],
    reporter: Reporter | None = None,
    resume: dict[str, Any] | None = None,
    stop_after_epochs: int | None = None,
) -> FitState:
    """Train the row reader in place; writes metrics.csv, last.pt and the kept checkpoint into `run_dir`."""
    t, r = cfg.train, cfg.rows
    reporter = reporter or SilentReporter()
    device = pick_device(t.device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    steps_per_epoch = max(1, r.rows_per_epoch // t.batch_size)
    if t.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.steps_per_epoch)
    opt, sched, sched_every, ema, state = training_state(model, t, steps_per_epoch, resume)
    autocast, _ = mixed_precision(device, t)
    measured = ema.module if ema is not None else model
    fonts = font_digits(training_fonts()) if r.font_share > 0 else None
    epochs_this_call = 0
    while state.epoch < t.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        started = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # this epoch's rows, the same on resume
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
        model.train()
        reporter.epoch_start(epoch, t.epochs, steps_per_epoch)
        loss_sum, exact, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            # One digit count per batch: rows of like width pad little (a 12-digit row beside a 1-digit one would
            # make the batch 12 digits wide).
            count = int(torch.randint(r.min_digits, r.max_digits + 1, (), generator=g))
            b = compose(train_set, t.batch_size, g, r, cfg.augment, digits=(count, count), fonts=fonts)
            x = b.x.to(device).contiguous(memory_format=memory_format)
            with autocast:
                logits = model(x)
            loss = ctc_loss(logits, b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            if sched_every == "batch":
                sched.step()
            loss_sum += float(loss.detach()) * len(b)
            seen += len(b)
            texts = greedy_texts(logits, b.frames())
            exact += sum(a == c for a, c in zip(texts, b.texts, strict=True))
            if step % 20 == 19 or step == steps_per_epoch - 1:
                reporter.batch(step + 1, loss_sum / seen, exact / seen, seen / (time.perf_counter() - started))
        train_seconds = time.perf_counter() - started
        val_loss = val_acc = math.nan
        if val_rows:
            m = evaluate_rows(measured, val_rows, device)
            val_loss, val_acc = m["loss"], m["exact"]
        if sched_every == "epoch":
            sched.step(val_loss)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": exact / seen, "val_loss": val_loss,
               "val_acc": val_acc, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
               "images_per_s": seen / train_seconds}  # fmt: skip
        state.history.append(row)
        state.epoch = epoch
        if val_rows:
            _update_early_stopping(state, val_loss, t.early_stopping_patience_epochs)
        _update_best(state, measured, row, val_loss, run_dir, meta, t.checkpoint_metric)
        write_metrics(run_dir / "metrics.csv", state.history)
        save_resume(run_dir, model, meta, opt, sched, ema, state)
        reporter.epoch_end(row)
        epochs_this_call += 1
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
    return state


def train_sequence_run(cfg: Config, train_set: Dataset, val_set: Dataset, test_set: Dataset | None, run_dir: Path,
                       reporter: Reporter | None, resume_state: dict[str, Any] | None, stop_after_epochs: int | None,
                       started: float, earlier_seconds: float, data_seconds: float) -> dict[str, Any]:  # fmt: skip
    """runs.train_run for task: sequence, once the data is loaded and the run folder made: model, fit, report."""
    from digitkit.models import create_model

    r = cfg.rows
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model.name, num_classes=train_set.num_classes, in_chans=1, img_size=r.height,
                         mean=0.0, std=1.0, **cfg.model.args)  # fmt: skip
    meta = {"model": cfg.model.name, "model_args": dict(cfg.model.args), "classes": train_set.classes,
            "in_chans": 1, "img_size": r.height, "task": "sequence", "config": config.to_dict(cfg)}  # fmt: skip
    val_rows = fixed_rows(val_set, r.val_rows, cfg.seed + 1, r) if len(val_set) and r.val_rows else []
    state = fit_sequence(cfg, model, train_set, val_rows, run_dir, meta, reporter, resume_state, stop_after_epochs)
    if stop_after_epochs is not None and state.epoch < cfg.train.epochs and not state.stopped_early:
        return {"run_dir": str(run_dir), "epochs": state.epoch, "finished": False}
    finish_started = time.perf_counter()
    best_path = checkpoint.resolve(run_dir)
    ckpt = checkpoint.load(best_path)
    best = checkpoint.model_from_checkpoint(ckpt)
    device = pick_device(cfg.train.device)
    best.to(device)
    val = evaluate_rows(best, val_rows, device) if val_rows else None
    summary: dict[str, Any] = {
        "task": "sequence",
        "model": cfg.model.name,
        "model_args": cfg.model.args,
        "params": count_params(best),
        "macs_per_image": count_macs(best, 1, r.height, ROW_PX),
        "macs_per": f"row of {ROW_PX} px (about 5 digits)",
        "epochs": len(state.history),
        "best_epoch": ckpt["metrics"]["epoch"],
        "checkpoint_metric": cfg.train.checkpoint_metric,
        "stopped_early": state.stopped_early,
        "train_seconds": round(sum(h["seconds"] for h in state.history), 2),
        "data_seconds": round(data_seconds, 2),
        "val_accuracy": val["exact"] if val else None,
        "val_log_loss": val["loss"] if val else None,
        "validation": val,
        "checkpoint": best_path.name,
        "classes": train_set.classes,
        "seed": cfg.seed,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "digitkit": __version__,
        "python": platform.python_version(),
    }
    if test_set is not None and r.test_rows:
        # The report's rows: MNIST test digits, read once; nothing above was chosen on them.
        test = evaluate_rows(best, fixed_rows(test_set, r.test_rows, cfg.seed + 2, r), device)
        summary.update(test_accuracy=test["exact"], test_log_loss=test["loss"],
                       test_errors=round((1 - test["exact"]) * test["rows"]), test=test)  # fmt: skip
    if cfg.train.plots:
        from digitkit import plots

        plots.save_history(state.history, run_dir / "history.png", title=f"{cfg.model.name} ({run_dir.name})",
                           checkpoint_epoch=summary["best_epoch"])  # fmt: skip
    summary["total_seconds"] = round(time.perf_counter() - started + earlier_seconds, 2)
    summary["finish_seconds"] = round(time.perf_counter() - finish_started, 2)
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return {"run_dir": str(run_dir), "finished": True, **summary}
