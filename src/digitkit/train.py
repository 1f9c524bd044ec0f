"""fit(): the training loop. Batches come straight from uint8 tensors in memory and are augmented whole.

Reproducibility without saving RNG state: every epoch reseeds its shuffle, augmentation and dropout from
(seed, epoch), so a run resumed from `last.pt` draws exactly what the uninterrupted run would have drawn.
The test set never enters this module: the checkpoint and the stopping epoch are chosen on validation.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from digitkit import checkpoint, distributed, optim
from digitkit.augment import AugmentConfig, augment_batch, broken_digits
from digitkit.config import Config, TrainConfig
from digitkit.data import Dataset
from digitkit.evaluate import loss_and_accuracy, predict_logits
from digitkit.idx import atomic_write_bytes
from digitkit.models import DigitModel

METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_s")
LAST = "last.pt"


class Reporter(Protocol):
    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None: ...
    def batch(self, done: int, loss: float, acc: float, images_per_s: float) -> None: ...
    def epoch_end(self, row: dict[str, float]) -> None: ...


class StepFn(Protocol):
    """One optimizer step on a batch x (B, C, H, W), y (B,): returns (loss, logits), both detached. fit() uses
    train_step; distillation swaps the loss, pruning re-applies its masks after the step."""

    def __call__(
        self, model: DigitModel, opt: optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def batch(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, row: dict[str, float]) -> None:
        pass


@dataclass
class FitState:
    """Everything a resumed run needs besides the weights, optimizer and schedule."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_acc: float = -1.0
    best_val_loss: float = math.inf
    best_path: str = ""
    best_val_log_loss: float = math.nan  # the best checkpoint's plain log loss (val_loss includes label smoothing)
    stop_best_loss: float = math.inf
    stale_epochs: int = 0
    stopped_early: bool = False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def make_optimizer(params: Any, t: TrainConfig) -> optim.Optimizer:
    if t.optimizer == "adam":
        return optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0, weight_decay=t.weight_decay)


def make_schedule(opt: optim.Optimizer, t: TrainConfig, steps_per_epoch: int) -> tuple[Any, str]:
    """(scheduler, when it steps: 'batch', 'epoch' or 'never')."""
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle" and t.onecycle_pct_start * total > 1:
        return optim.OneCycle(opt, max_lr=t.lr, total_steps=total, pct_start=t.onecycle_pct_start), "batch"
    if t.schedule in ("cosine", "onecycle"):
        # onecycle lands here only when the run is too short for one warm-up step: it anneals from the peak instead.
        return optim.Cosine(opt, total_steps=total), "batch"
    if t.schedule == "plateau":
        return optim.Plateau(opt, factor=t.plateau_factor, patience=t.plateau_patience_epochs), "epoch"
    return None, "never"


def fit(
    cfg: Config,
    model: DigitModel,
    train_set: Dataset,
    val_set: Dataset,
    run_dir: Path,
    meta: dict[str, Any],
    reporter: Reporter | None = None,
    resume: dict[str, Any] | None = None,
    stop_after_epochs: int | None = None,
    step_fn: StepFn | None = None,
    negatives: torch.Tensor | None = None,
) -> FitState:
    """Train `model` in place; writes metrics.csv, last.pt and the best checkpoint into `run_dir`.

    `meta` describes the model for checkpoints (model, model_args, classes, in_chans, img_size, config).
    `resume` is a loaded last.pt. `stop_after_epochs` ends this call early (used to test resuming). `step_fn`
    replaces the optimizer step (default: train_step with the config's label smoothing). `negatives` (N, C, H, W)
    uint8 non-digits train the rejection when train.outlier_weight > 0: each batch then carries train.outlier_batch
    of them after its digits (x has more rows than y), augmented with the digits.
    """
    t = cfg.train
    reporter = reporter or SilentReporter()
    world = distributed.world()  # one process unless launched by torchrun (see distributed.py)
    batch_size = t.batch_size // world.size  # images per step on this process; the config's batch is global
    device = pick_device(t.device)
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    steps_per_epoch = epoch_steps(len(train_set), t)
    # The whole uint8 set on the device once (a no-op on the CPU): no host-to-device copy per batch.
    train_set = Dataset(train_set.images.to(device), train_set.labels.to(device), train_set.classes)
    outliers, outlier_box = None, 20
    if t.outlier_weight > 0:
        if negatives is None or not len(negatives):
            raise ValueError("train.outlier_weight > 0 needs non-digits: pass `negatives` (data.negatives_dir)")
        if tuple(negatives.shape[1:]) != tuple(train_set.images.shape[1:]) or negatives.dtype != torch.uint8:
            raise ValueError(f"negatives are {negatives.dtype} {tuple(negatives.shape[1:])}, the digits uint8 "
                             f"{tuple(train_set.images.shape[1:])}: they must match")  # fmt: skip
        outliers = negatives.to(device)
        # Digits made broken are fitted like preprocessing fits a digit (preprocess.box of preprocess.size px),
        # scaled to this set's image size.
        outlier_box = max(4, round(cfg.preprocess.box * train_set.images.shape[-2] / cfg.preprocess.size))
    opt, sched, sched_every, ema, state = training_state(model, t, steps_per_epoch, resume)
    autocast, scaler = mixed_precision(device, t)
    net = distributed.wrap(model, device, world)  # under torchrun: DDP, which averages the gradients over ranks
    # torch.compile wraps the module; the weights stay shared, so checkpoints save `model` as usual.
    net = torch.compile(net) if t.compile else net
    # What validation, the checkpoints and (through them) the test figure measure: the weight average if kept.
    measured = ema.module if ema is not None else model

    def plain_step(model: DigitModel, opt: optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Any:
        return train_step(net, opt, x, y, t.label_smoothing, autocast, scaler, t.outlier_weight)

    optimizer_step = step_fn if step_fn is not None else plain_step

    epochs_this_call = 0

    while state.epoch < t.epochs and not state.stopped_early:
        epoch = state.epoch + 1
        started = time.perf_counter()
        g, perm = epoch_draws(cfg.seed, epoch, len(train_set))
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout
        if world.size > 1:  # this rank's shard of the shuffle, and its own augmentation and dropout draws
            g, perm = distributed.rank_draws(cfg.seed, epoch, perm, world)
            distributed.log_shard(epoch, perm[: steps_per_epoch * batch_size], len(perm), world)
        model.train()
        reporter.epoch_start(epoch, t.epochs, steps_per_epoch)
        loss_sum, correct, seen = run_steps(
            EpochPlan(train_set, perm, g, steps_per_epoch, batch_size, device, memory_format), cfg, optimizer_step,
            model, opt, reporter, ema=ema, sched=sched if sched_every == "batch" else None, outliers=outliers,
            outlier_box=outlier_box, started=started)  # fmt: skip
        train_seconds = time.perf_counter() - started
        distributed.sync_buffers(measured, world)  # one model on every rank: rank 0's batch-norm statistics
        val_loss = val_acc = log_loss = math.nan  # no validation (data.val_fraction 0): the columns stay empty
        if len(val_set):
            val_part = distributed.shard_dataset(val_set, world)  # all of it in a single process
            val_logits = predict_logits(measured, val_part.images, t.eval_batch_size, device, t.channels_last)
            # The training objective on validation data (label smoothing included): with smoothing, the plain log
            # loss has a floor well above 0 and drifts up as the model sharpens, which would stop runs too early.
            val_loss, val_acc = loss_and_accuracy(val_logits, val_part.labels, t.label_smoothing)
            log_loss = loss_and_accuracy(val_logits, val_part.labels)[0] if t.label_smoothing else val_loss
            val_loss, val_acc, log_loss = distributed.mean_over_ranks([val_loss, val_acc, log_loss], len(val_part),
                                                                      world)  # fmt: skip
        loss_total, correct_total, seen = distributed.sum_over_ranks([loss_sum.item(), correct.item(), seen], world)
        lr = opt.param_groups[0]["lr"]
        if sched_every == "epoch":  # plateau, which the config allows only with validation
            sched.step(val_loss)
        row = {
            "epoch": epoch,
            "train_loss": loss_total / seen,
            "train_acc": correct_total / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - started,
            "images_per_s": seen / train_seconds,
        }
        state.history.append(row)
        state.epoch = epoch
        if len(val_set):
            _update_early_stopping(state, val_loss, t.early_stopping_patience_epochs)
        state.stopped_early = distributed.broadcast(state.stopped_early, world)  # rank 0 decides for all
        if world.is_main:  # every rank holds the same weights and history; only rank 0 writes
            _update_best(state, measured, row, log_loss, run_dir, meta, t.checkpoint_metric)
            write_metrics(run_dir / "metrics.csv", state.history)
            save_resume(run_dir, model, meta, opt, sched, ema, state, world.size)
        reporter.epoch_end(row)
        epochs_this_call += 1
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
    return state


@dataclass
class EpochPlan:
    """What one epoch's steps draw from: the training set (on `device`), the epoch's shuffle and generator."""

    train_set: Dataset
    perm: torch.Tensor
    g: torch.Generator
    steps: int
    batch_size: int
    device: torch.device
    memory_format: torch.memory_format = torch.contiguous_format


def run_steps(plan: EpochPlan, cfg: Config, step: StepFn, model: DigitModel, opt: optim.Optimizer,
              reporter: Reporter, ema: Any = None, sched: Any = None, outliers: torch.Tensor | None = None,
              outlier_box: int = 20, started: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One epoch's optimizer steps: (summed loss, correct answers, images seen), the first two on the device.

    Nothing here waits for the device: batches are gathered on it, the augmentation's draws reach it in one copy
    per parameter, and the running sums stay on it. The one exception is the progress bar, which reads the sums
    every 20 steps; a SilentReporter (`--quiet`) never does, so a quiet step never waits (the test runs these
    steps on the `meta` device, where any value read on the host is an error)."""
    t = cfg.train
    started = time.perf_counter() if started is None else started
    loss_sum = torch.zeros((), device=plan.device)
    correct = torch.zeros((), device=plan.device, dtype=torch.long)
    seen, shows = 0, not isinstance(reporter, SilentReporter)
    perm = plan.perm.to(plan.device, non_blocking=True)  # the shuffle is drawn on the CPU: one copy an epoch
    for i in range(plan.steps):
        idx = perm[i * plan.batch_size : (i + 1) * plan.batch_size]
        extra = None
        if outliers is not None:  # drawn from the epoch's generator: a resumed run draws the same ones
            extra = outlier_batch(outliers, plan.train_set, t, plan.g, outlier_box)
        x, y = load_batch(plan.train_set, idx, cfg.augment, plan.g, plan.device, plan.memory_format, extra)
        loss, logits = step(model, opt, x, y)
        if ema is not None:
            ema.update_parameters(model)
        if sched is not None:
            sched.step()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if shows and (i % 20 == 19 or i == plan.steps - 1):  # .item() waits for the device: for the progress bar
            elapsed = time.perf_counter() - started
            reporter.batch(i + 1, loss_sum.item() / seen, correct.item() / seen, seen / elapsed)
    return loss_sum, correct, seen


def training_state(model: DigitModel, t: TrainConfig, steps_per_epoch: int, resume: dict[str, Any] | None
                   ) -> tuple[optim.Optimizer, Any, str, Any, FitState]:  # fmt: skip
    """(optimizer, schedule, when it steps, EMA or None, FitState) for a run, restored from `resume` (a loaded
    last.pt, weights included) when given."""
    opt = make_optimizer(model.parameters(), t)
    sched, sched_every = make_schedule(opt, t, steps_per_epoch)
    ema = make_ema(model, t.ema_decay)
    state = FitState()
    if resume is not None:
        model.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None:
            sched.load_state_dict(resume["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
        state = FitState(**resume["fit_state"])
    return opt, sched, sched_every, ema, state


def save_resume(run_dir: Path, model: DigitModel, meta: dict[str, Any], opt: optim.Optimizer, sched: Any, ema: Any,
                state: FitState, world_size: int = 1) -> None:  # fmt: skip
    """last.pt: everything training_state restores (weights, optimizer, schedule, EMA, FitState)."""
    checkpoint.save(run_dir / LAST, {
        **checkpoint.model_payload(model, meta), "kind": "resume", "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else {},
        "ema": ema.state_dict() if ema is not None else {}, "fit_state": vars(state), "world_size": world_size,
    })  # fmt: skip


def epoch_steps(n: int, t: TrainConfig) -> int:
    """Batches per epoch: a full pass over n images (the last partial batch dropped), or t.steps_per_epoch if
    that is fewer."""
    full = max(1, n // t.batch_size)
    return min(full, t.steps_per_epoch) if t.steps_per_epoch else full


def make_ema(model: DigitModel, decay: float) -> optim.WeightAverage | None:
    """An exponential moving average of the weights and buffers (batch-norm statistics), or None if decay is 0."""
    return optim.WeightAverage(model, decay) if decay else None


def epoch_draws(seed: int, epoch: int, n: int) -> tuple[torch.Generator, torch.Tensor]:
    """The generator an epoch's augmentation draws from, already advanced past the epoch's shuffle, and that
    shuffle: what makes a resumed run (or `digitkit augment preview --config`) draw exactly what a run draws."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return g, torch.randperm(n, generator=g)


def training_batch(cfg: Config, train_set: Dataset, epoch: int = 1, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of `epoch` exactly as fit() builds it (same shuffle, same augmentation draws), on the CPU."""
    g, perm = epoch_draws(cfg.seed, epoch, len(train_set))
    x = y = None
    for s in range(step + 1):  # augmentation draws advance the generator batch by batch
        idx = perm[s * cfg.train.batch_size : (s + 1) * cfg.train.batch_size]
        x, y = load_batch(train_set, idx, cfg.augment, g, torch.device("cpu"))
    return x, y


def load_batch(
    ds: Dataset,
    idx: torch.Tensor,
    augment: AugmentConfig,
    g: torch.Generator,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    extra: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a batch from the uint8 tensors and augment it whole: x (B, C, H, W) in [0, 1], y (B,). `extra`
    (E, C, H, W) uint8 unlabelled images (non-digits) follow the digits in x, augmented alike: x has B + E rows."""
    x = ds.images[idx] if extra is None else torch.cat([ds.images[idx], extra.to(ds.images.device)])
    x = x.to(device, non_blocking=True).float().div_(255)
    y = ds.labels[idx].to(device, non_blocking=True)
    if augment.enabled:
        x = augment_batch(x, augment, g)
    return x.contiguous(memory_format=memory_format), y


def outlier_batch(negatives: torch.Tensor, train_set: Dataset, t: TrainConfig, g: torch.Generator,
                  box: int = 20) -> torch.Tensor:  # fmt: skip
    """One batch's non-digits (train.outlier_batch, uint8): a train.outlier_from_digits share made from training
    digits (augment.broken_digits, fitted to a `box`-px ink box as preprocessing fits a digit), the rest drawn
    from `negatives`."""
    made = round(t.outlier_batch * t.outlier_from_digits)
    drawn = negatives[torch.randint(len(negatives), (t.outlier_batch - made,), generator=g).to(negatives.device)]
    if not made:
        return drawn
    src = torch.randint(len(train_set), (2 * made,), generator=g).to(train_set.images.device)
    broken = broken_digits(train_set.images[src], train_set.labels[src], g, box=box).to(negatives.device)
    return torch.cat([drawn, broken])


def train_step(
    model: DigitModel,
    opt: optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    label_smoothing: float = 0.0,
    autocast: Any = None,
    scaler: Any = None,
    outlier_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns (loss, the digits' logits), both detached. `scaler` (a GradScaler) is for
    float16. Rows of x past len(y) are non-digits: their cross-entropy to the uniform distribution (logsumexp
    minus the mean logit), times `outlier_weight`, joins the loss (outlier exposure)."""
    n = len(y)
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(x)
        z = logits.float()
        loss = F.cross_entropy(z[:n], y, label_smoothing=label_smoothing)
        if len(x) > n and outlier_weight > 0:
            out = z[n:]
            loss = loss + outlier_weight * (out.logsumexp(1) - out.mean(1)).mean()
        logits = logits[:n]
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss.detach(), logits.detach()


def _update_best(state: FitState, model: DigitModel, row: dict, log_loss: float, run_dir: Path, meta: dict,
                 metric: str) -> None:  # fmt: skip
    """Keep one checkpoint by `metric`: val_loss (lowest, ties to higher accuracy) or val_acc (highest, ties to
    lower loss) as best-*.pt, or last (every epoch replaces the one before) as final-*.pt, named with its validation
    accuracy, or its training accuracy when there is no validation. `log_loss` is its validation loss without label
    smoothing, for the summary."""

    def rank(acc: float, loss: float) -> tuple[float, float]:
        return (-loss, acc) if metric == "val_loss" else (acc, -loss)

    better = metric == "last" or rank(row["val_acc"], row["val_loss"]) > rank(state.best_val_acc, state.best_val_loss)
    if not better:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "final" if metric == "last" else "best"
    acc = f"val{100 * row['val_acc']:.2f}" if not math.isnan(row["val_acc"]) else f"train{100 * row['train_acc']:.2f}"
    path = run_dir / f"{kind}-{stamp}-e{row['epoch']:03d}-{acc}.pt"
    metrics = {k: row[k] for k in ("epoch", "val_acc", "val_loss", "train_acc", "train_loss")}
    checkpoint.save(path, {**checkpoint.model_payload(model, meta), "kind": "model", "metrics": metrics})
    if state.best_path and Path(state.best_path).name != path.name:
        (run_dir / Path(state.best_path).name).unlink(missing_ok=True)
    state.best_val_acc, state.best_val_loss, state.best_path = row["val_acc"], row["val_loss"], path.name
    state.best_val_log_loss = log_loss


def _update_early_stopping(state: FitState, val_loss: float, patience_epochs: int) -> None:
    if val_loss < state.stop_best_loss:
        state.stop_best_loss, state.stale_epochs = val_loss, 0
    else:
        state.stale_epochs += 1
    state.stopped_early = patience_epochs > 0 and state.stale_epochs >= patience_epochs


def mixed_precision(device: torch.device, t: TrainConfig) -> tuple[Any, Any]:
    """(autocast context, GradScaler or None) for the device: bfloat16 on a GPU that has it, else float16 with a
    loss scaler (float16 gradients underflow without one); bfloat16 on the CPU only if t.cpu_bf16 and the CPU does
    bfloat16 natively (elsewhere it would be emulated and several times slower: float32 instead, said once)."""
    if device.type == "cuda" and t.amp:
        if torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16), None
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if device.type == "cpu" and t.cpu_bf16:
        if native_cpu_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16), None
        warnings.warn("train.cpu_bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX), where bfloat16 is "
                      "emulated and slower than float32; training in float32 instead", stacklevel=2)  # fmt: skip
    return torch.autocast(device.type, enabled=False), None


def native_cpu_bf16() -> bool:
    """True where the CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), as torch's own kernels detect it."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """Rewritten whole each epoch (atomically), so it always matches the last checkpoint."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_metrics(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]

