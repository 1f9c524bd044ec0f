"""Model compression: magnitude pruning with fine-tuning, and knowledge distillation into a smaller model.

Both produce ordinary run folders (config.yaml, best-*.pt, metrics.csv, summary.json), so evaluate, predict,
serve and export work on the result unchanged. Fine-tuning and distillation go through train.fit, which picks
the checkpoint on the validation hold-out; the test set is read once at the end by runs.finish_run, to report.

Pruning
- unstructured: global magnitude pruning over every conv and linear weight (the smallest |w| of the whole
  model go first, so layers lose different shares). The zeros are stored in a dense tensor: the file is no
  smaller and dense kernels do no less work; the figure is the share of weights a sparse format could drop.
- structured: each conv layer loses the same share of its output filters, ranked by the L2 norm of the filter
  with its batch norm folded in (w * gamma / sqrt(running_var + eps); batch norm makes a raw filter's norm
  meaningless). The filters are removed physically: a narrower model of the same family is built (its
  `channels` option), the next layer loses the matching input channels and the head the matching columns. So
  the parameters, the checkpoint and the multiply-adds really shrink. Only models with a `channels` option
  (cnn1, cnn2, cnn3, cnn3_slim) can be narrowed this way.
Fine-tuning reuses the run's own recipe (augmentation, optimizer, schedule) for a few epochs at a fraction of
its learning rate; unstructured masks are re-applied after every optimizer step, so pruned weights stay zero.

Distillation (Hinton et al., 2015)
    loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student logits, labels)
where p^T = softmax(logits / T); the T^2 keeps the soft term's gradient scale independent of T. A teacher
ensemble gives the mean of its members' p^T. The teacher answers online, on the very batch the student sees
(augmented when the recipe augments), in eval mode and without gradients.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from digitkit import checkpoint, config, data, ensemble, optim, runs
from digitkit.config import Config
from digitkit.errors import ConfigError
from digitkit.evaluate import loss_and_accuracy, predict_logits
from digitkit.idx import atomic_write_bytes
from digitkit.models import DigitModel, count_macs, count_params, create_model, model_options
from digitkit.train import Reporter, fit, pick_device

METHODS = ("unstructured", "structured")
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.7


# ---------------------------------------------------------------------------------------------------- pruning
@dataclass
class PruneOptions:
    sparsity: float
    """unstructured: share of conv + linear weights set to zero; structured: share of each conv layer's filters
    removed."""
    structured: bool = False
    finetune_epochs: int = 2
    lr_scale: float = 0.1
    """Fine-tuning peak learning rate = the run's train.lr times this."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise ConfigError(f"sparsity {self.sparsity}: expected a fraction in (0, 1), e.g. 0.5 or 0.9")
        if self.finetune_epochs < 1:
            raise ConfigError(f"fine-tune epochs {self.finetune_epochs}: expected at least 1 (pruning without "
                              "fine-tuning loses most of the accuracy it could keep)")  # fmt: skip
        if self.lr_scale <= 0:
            raise ConfigError(f"lr scale {self.lr_scale}: expected a positive factor such as 0.1")

    @property
    def method(self) -> str:
        return "structured" if self.structured else "unstructured"


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer: the weights pruning acts on."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for _, m in prunable(model))


def weight_sparsity(model: nn.Module) -> float:
    """Share of conv + linear weights that are exactly zero."""
    zeros = sum(int((m.weight == 0).sum()) for _, m in prunable(model))
    return zeros / max(weight_count(model), 1)


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of conv + linear weights, in place (permanent: plain weights, no hooks left).
    Returns {parameter name: mask}, 1 = kept, to keep the zeros in place while fine-tuning."""
    layers = prunable(model)
    amount = int(round(sparsity * weight_count(model)))
    torch_prune.global_unstructured([(m, "weight") for _, m in layers], torch_prune.L1Unstructured, amount=amount)
    masks = {f"{n}.weight": m.weight_mask.detach().clone() for n, m in layers}
    for _, m in layers:
        torch_prune.remove(m, "weight")  # weight = weight_orig * mask, as an ordinary parameter again
    return masks


def _conv_bn_pairs(model: DigitModel) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    mods = list(model.features.named_children())
    pairs = []
    for (cn, conv), (bn_name, bn) in zip(mods, mods[1:], strict=False):
        if isinstance(conv, nn.Conv2d):
            if not isinstance(bn, nn.BatchNorm2d):
                raise ConfigError("structured pruning expects every conv layer to be followed by batch norm")
            pairs.append((f"features.{cn}", conv, f"features.{bn_name}", bn))
    return pairs


def channel_scores(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """(C_out,) L2 norm of each filter with its batch norm folded in: how strongly the channel can respond."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight.detach().flatten(1).norm(dim=1) * scale.abs()


def kept_channels(model: DigitModel, fraction_removed: float) -> list[torch.Tensor]:
    """Per conv layer, the sorted indices of the filters kept (at least one)."""
    keep = []
    for _, conv, _, bn in _conv_bn_pairs(model):
        c = conv.out_channels
        k = max(1, c - int(round(fraction_removed * c)))
        keep.append(channel_scores(conv, bn).topk(k).indices.sort().values)
    return keep


def zero_channels(model: DigitModel, keep: list[torch.Tensor]) -> DigitModel:
    """A copy whose removed channels are zeroed (filter, batch-norm scale and shift) but still present: the same
    function as `shrink` computes, on the original shapes. Used to check `shrink`."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for (_, conv, _, bn), k in zip(_conv_bn_pairs(out), keep, strict=True):
            drop = torch.ones(conv.out_channels, dtype=torch.bool)
            drop[k] = False
            conv.weight[drop] = 0
            bn.weight[drop] = 0
            bn.bias[drop] = 0
    return out


def _check_narrowable(name: str) -> None:
    if "channels" not in model_options(name):
        raise ConfigError(
            f"model {name!r}: structured pruning narrows a model through its `channels` option "
            "(cnn1, cnn2, cnn3, cnn3_slim); use unstructured pruning (drop --structured) for it"
        )


def shrink(model: DigitModel, ckpt: dict[str, Any], keep: list[torch.Tensor]) -> tuple[DigitModel, dict[str, Any]]:
    """Physically remove the filters not in `keep`: returns the narrower model and its model_args."""
    name, args = ckpt["model"], dict(ckpt["model_args"])
    pairs = _conv_bn_pairs(model)
    _check_narrowable(name)
    args["channels"] = [len(k) for k in keep]
    small = create_model(name, num_classes=len(ckpt["classes"]), in_chans=ckpt["in_chans"], img_size=ckpt["img_size"],
                         mean=float(model.mean), std=float(model.std), **args)  # fmt: skip
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prev = None  # the kept input channels of the current conv (None: all of the image's channels)
    for (cn, _, bn_name, _), k in zip(pairs, keep, strict=True):
        w = state[f"{cn}.weight"][k]
        state[f"{cn}.weight"] = w if prev is None else w[:, prev]
        if f"{cn}.bias" in state:
            state[f"{cn}.bias"] = state[f"{cn}.bias"][k]
        for p in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn_name}.{p}"] = state[f"{bn_name}.{p}"][k]
        prev = k
    # The head flattens (C, S, S) maps: channel c owns columns c*S*S ... (c+1)*S*S - 1 of the first linear layer.
    head_name, head = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    per_channel = head.in_features // pairs[-1][1].out_channels
    cols = (prev[:, None] * per_channel + torch.arange(per_channel)).flatten()
    state[f"{head_name}.weight"] = state[f"{head_name}.weight"][:, cols]
    small.load_state_dict(state)  # strict: any shape this code got wrong fails here
    return small.eval(), args


def _masking_step(masks: dict[str, torch.Tensor], label_smoothing: float) -> Any:
    """fit()'s optimizer step followed by re-applying the masks: Adam's momentum would otherwise revive pruned
    weights."""
    from digitkit.train import train_step

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(model: DigitModel, opt: optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Any:
        if not pairs:
            params = dict(model.named_parameters())
            pairs.extend((params[n], m.to(params[n].device)) for n, m in masks.items())
        loss, logits = train_step(model, opt, x, y, label_smoothing)
        with torch.no_grad():
            for p, m in pairs:
                p.mul_(m)
        return loss, logits

    return step


def finetune_config(cfg: Config, opts: PruneOptions) -> Config:
    """The run's own recipe, shortened and at a lower learning rate."""
    out = config.from_dict(config.to_dict(cfg))
    out.train.epochs = opts.finetune_epochs
    out.train.lr = cfg.train.lr * opts.lr_scale
    return out


def prune_run(
    source: str | Path,
    opts: PruneOptions,
    out: Path,
    datasets: tuple[data.Dataset, data.Dataset, data.Dataset | None] | None = None,
    data_dir: str | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Prune the run `source`, fine-tune it into the new run folder `out` and return its summary.

    `datasets` = (train, val, test) as runs.load_data returns them for the source's config (pass it to prune at
    several sparsities without reading the data again); a test set of None skips the test evaluation.
    """
    started = time.perf_counter()
    opened = runs.open_model(source)
    cfg = finetune_config(opened.cfg, opts)
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if opts.structured:
        _check_narrowable(opened.ckpt["model"])  # before reading any data
    train_set, val_set, test_set = datasets if datasets is not None else runs.load_data(cfg)
    _check_data(opened.ckpt, train_set, str(source))
    model = opened.model
    before = {"params": count_params(model), "weights": weight_count(model),
              "macs": count_macs(model, opened.ckpt["in_chans"], opened.ckpt["img_size"])}  # fmt: skip
    meta = {k: opened.ckpt[k] for k in ("model", "model_args", "classes", "in_chans", "img_size")}
    masks: dict[str, torch.Tensor] = {}
    if opts.structured:
        keep = kept_channels(model, opts.sparsity)
        model, meta["model_args"] = shrink(model, opened.ckpt, keep)
        cfg.model.args = dict(meta["model_args"])
    else:
        masks = magnitude_masks(model, opts.sparsity)
    meta["config"] = config.to_dict(cfg)
    device = pick_device(cfg.train.device)
    val_acc_pruned = None  # no validation images: the source trained on all of them (data.val_fraction 0)
    if len(val_set):
        _, val_acc_pruned = loss_and_accuracy(predict_logits(model, val_set.images, device=device), val_set.labels)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "last.pt").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    config.save(cfg, out / "config.yaml")
    step = _masking_step(masks, cfg.train.label_smoothing) if masks else None
    state = fit(cfg, model, train_set, val_set, out, meta, reporter, step_fn=step)
    summary = runs.finish_run(cfg, out, state.history, val_set, test_set, time.perf_counter() - started,
                              stopped_early=state.stopped_early, fit_state=state)  # fmt: skip
    best = checkpoint.model_from_checkpoint(checkpoint.load(out / summary["checkpoint"]))
    zeros = 0 if opts.structured else round(weight_sparsity(best) * weight_count(best))
    weights_after = weight_count(best) - zeros
    extra = {
        "pruned_from": str(opened.checkpoint_path),
        "pruned_from_sha256": runs.checkpoint_sha256(opened.checkpoint_path),
        "prune": {
            "method": opts.method,
            "requested_sparsity": opts.sparsity,
            # Share of the source's conv + linear weights that are gone: zero (unstructured) or removed.
            "weight_sparsity": 1 - weights_after / before["weights"],
            "weights_before": before["weights"],
            "weights_after": weights_after,
            "params_before": before["params"],
            "params_after": summary["params"],
            "macs_before": before["macs"],
            "macs_after": summary["macs_per_image"],
            "compute_saved": opts.structured,
            "note": "filters physically removed: fewer parameters and multiply-adds" if opts.structured else
            "zeros stored densely: the same file size and dense compute; a sparse format or kernel would be needed",
            "finetune_epochs": opts.finetune_epochs,
            "finetune_lr": cfg.train.lr,
            "val_accuracy_source": source_val_accuracy(opened),
            "val_accuracy_before_finetune": val_acc_pruned,
        },
    }  # fmt: skip
    return _add_to_summary(out, summary, extra)


def prune_sweep(
    source: str | Path,
    sparsities: list[float],
    out: Path,
    structured: bool = False,
    finetune_epochs: int = 2,
    lr_scale: float = 0.1,
    data_dir: str | None = None,
    reporter_factory: Any = None,
) -> dict[str, Any]:
    """Prune `source` at each sparsity into out/sparsity-NN/; returns the accuracy-vs-sparsity table."""
    opts = [PruneOptions(s, structured, finetune_epochs, lr_scale) for s in sparsities]  # checked before any work
    opened = runs.open_model(source)
    if structured:
        _check_narrowable(opened.ckpt["model"])
    cfg = finetune_config(opened.cfg, opts[0])
    if data_dir is not None:
        cfg.data.dir = str(data_dir)
    datasets = runs.load_data(cfg)
    rows = []
    for o in opts:
        reporter = reporter_factory(f"sparsity {o.sparsity:g}") if reporter_factory else None
        s = prune_run(source, o, out / f"sparsity-{round(100 * o.sparsity):02d}", datasets, data_dir, reporter)
        rows.append(_prune_row(s))
    source_summary = _read_json((opened.run_dir or Path("/nonexistent")) / "summary.json")
    return {
        "source": str(opened.checkpoint_path),
        "source_test_accuracy": source_summary.get("test_accuracy"),
        "source_val_accuracy": source_val_accuracy(opened),
        "source_params": count_params(opened.model),
        "method": opts[0].method,
        "finetune_epochs": finetune_epochs,
        "lr_scale": lr_scale,
        "rows": rows,
        "note": "checkpoints chosen on validation; test accuracy read once per pruned model, to report",
    }


def source_val_accuracy(opened: runs.Opened) -> float | None:
    """The source checkpoint's validation accuracy, or None when it has none (data.val_fraction 0, or no metrics)."""
    v = opened.ckpt.get("metrics", {}).get("val_acc")
    return None if v is None or math.isnan(float(v)) else float(v)


def _prune_row(s: dict[str, Any]) -> dict[str, Any]:
    p = s["prune"]
    return {"run_dir": s["run_dir"], "sparsity": p["requested_sparsity"], "weight_sparsity": p["weight_sparsity"],
            "weights_after": p["weights_after"], "params_after": p["params_after"], "macs_after": p["macs_after"],
            "val_before_finetune": p["val_accuracy_before_finetune"], "val_accuracy": s["val_accuracy"],
            "test_accuracy": s.get("test_accuracy")}  # fmt: skip


def prune_markdown(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}%"

    lines = [
        f"Pruning {result['source']} ({result['method']}, {result['finetune_epochs']} fine-tune epochs at "
        f"{result['lr_scale']:g}x the run's learning rate)",
        "",
        "| sparsity | zero or removed weights | nonzero weights | MACs/image | val before fine-tune | val | test |",
        "|---|---|---|---|---|---|---|",
        f"| 0 (source) | 0% | - | - | - | {pct(result['source_val_accuracy'])} | "
        f"{pct(result['source_test_accuracy'])} |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['sparsity']:g} | {100 * r['weight_sparsity']:.1f}% | {r['weights_after']:,} | "
                     f"{r['macs_after']:,} | {pct(r['val_before_finetune'])} | {pct(r['val_accuracy'])} | "
                     f"{pct(r['test_accuracy'])} |")  # fmt: skip
    if result["method"] == "unstructured":
        lines += ["", "Unstructured zeros are stored densely: MACs and file size do not change without sparse kernels."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- distillation
def teacher_probs(teachers: list[nn.Module], x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x (B, C, H, W) -> (B, K): the mean over teachers of softmax(logits / T), without gradients."""
    with torch.no_grad():
        return sum(t(x).float().div(temperature).softmax(1) for t in teachers) / len(teachers)


def distill_loss(
    logits: torch.Tensor,
    teacher_p: torch.Tensor,
    y: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_p || softmax(logits / T)) + (1 - alpha) * CE(logits, y); teacher_p (B, K) are the
    teacher's probabilities at temperature T, logits (B, K) the student's, y (B,) the labels."""
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), teacher_p, reduction="batchmean")
    hard = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


@dataclass
class DistillOptions:
    temperature: float = DEFAULT_TEMPERATURE
    """Softens both distributions; 1 is the plain softmax. Hinton et al. used 2-20; 4 is a common choice."""
    alpha: float = DEFAULT_ALPHA
    """Weight of the soft (teacher) term; 1 - alpha goes to the labels' cross-entropy. 0 is plain training."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature}: expected a positive number such as 4")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha {self.alpha}: expected a weight in [0, 1] (0 ignores the teacher)")


def open_teachers(paths: list[str | Path]) -> tuple[list[nn.Module], list[runs.Opened]]:
    """The teacher models; several must agree on classes and input shape (as an ensemble's members do)."""
    if not paths:
        raise ConfigError("distill: give at least one teacher run with --teacher RUN")
    if len(paths) > 1:
        ens, _ = ensemble.build(list(paths))  # refuses members with different classes or input shapes
        models = list(ens.members)
    opened = [runs.open_model(p) for p in paths]
    if len(paths) == 1:
        models = [opened[0].model]
    return [m.eval() for m in models], opened


def student_config(teacher_cfg: Config, student: str | None, config_path: str | None = None,
                   overrides: list[str] | None = None) -> Config:  # fmt: skip
    """The student's config: the teacher's recipe (data, augmentation, schedule) with the student model, unless
    --config gives another recipe; --set overrides either. The teacher's model args do not carry over."""
    if config_path is not None:
        raw = config.to_dict(config.load(config_path))
    else:
        raw = config.to_dict(teacher_cfg)
        raw["model"] = {"name": student or teacher_cfg.model.name, "args": {}}
    if student is not None and config_path is not None and raw["model"]["name"] != student:
        raw["model"] = {"name": student, "args": {}}
    try:
        return config.from_dict(config.apply_overrides(raw, list(overrides or [])))
    except ConfigError as e:
        raise ConfigError(f"student config: {e}") from None


def distill_run(
    teacher_paths: list[str | Path],
    cfg: Config,
    opts: DistillOptions,
    out: Path | None = None,
    root: Path = runs.DEFAULT_ROOT,
    reporter: Reporter | None = None,
    datasets: tuple[data.Dataset, data.Dataset, data.Dataset | None] | None = None,
) -> dict[str, Any]:
    """Train the student `cfg.model` from the teachers into a new run folder; returns its summary with the
    teachers' figures beside the student's."""
    teachers, opened = open_teachers(teacher_paths)
    teacher_deskew = ensemble.reads_deskewed([o.cfg.preprocess.deskew for o in opened])
    if cfg.preprocess.deskew != teacher_deskew:
        mix = " (in a mix of deskewed and plain teachers each deskewed one deskews its own copy)" if len(
            {o.cfg.preprocess.deskew for o in opened}) > 1 else ""
        raise ConfigError(f"the student's preprocess.deskew is {str(cfg.preprocess.deskew).lower()} but the teachers "
                          f"read {'deskewed' if teacher_deskew else 'plain'} images{mix}; set "
                          f"preprocess.deskew={str(teacher_deskew).lower()} so the teachers see what they were "
                          "trained on")  # fmt: skip
    train_set, val_set, test_set = datasets if datasets is not None else runs.load_data(cfg)
    for o in opened:
        _check_data(o.ckpt, train_set, str(o.checkpoint_path))
    device = pick_device(cfg.train.device)
    for t in teachers:
        t.to(device)
    t_, a_, ls = opts.temperature, opts.alpha, cfg.train.label_smoothing

    def step(model: DigitModel, opt: optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Any:
        p = teacher_probs(teachers, x, t_)  # the batch exactly as the student sees it, augmentation included
        logits = model(x)
        loss = distill_loss(logits, p, y, t_, a_, ls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), logits.detach()

    summary = runs.train_run(cfg, out=out, root=root, reporter=reporter, datasets=(train_set, val_set, test_set),
                             point_latest_link=False, step_fn=step)  # fmt: skip
    run_dir = Path(summary["run_dir"])
    teacher_test = None
    if test_set is not None:  # reported only, like the student's; nothing is chosen on it
        probs = sum(predict_logits(t.cpu(), test_set.images).softmax(1) for t in teachers) / len(teachers)
        teacher_test = (probs.argmax(1) == test_set.labels).sum().item() / len(test_set)
    teacher_params = sum(count_params(t) for t in teachers)
    teacher_bytes = sum(o.checkpoint_path.stat().st_size for o in opened)
    student_bytes = (run_dir / summary["checkpoint"]).stat().st_size
    extra = {
        "distilled_from": [str(o.checkpoint_path) for o in opened],
        "distilled_from_sha256": [runs.checkpoint_sha256(o.checkpoint_path) for o in opened],
        "distill": {
            "temperature": opts.temperature,
            "alpha": opts.alpha,
            "teacher_targets": "online: the teachers read each training batch as the student sees it (augmented "
            "when the recipe augments); an ensemble gives the mean of its members' softened probabilities",
            "teacher_models": [o.cfg.model.name for o in opened],
            "teacher_test_accuracy": teacher_test,
            "teacher_params": teacher_params,
            "teacher_checkpoint_bytes": teacher_bytes,
            "student_test_accuracy": summary.get("test_accuracy"),
            "student_params": summary["params"],
            "student_checkpoint_bytes": student_bytes,
            "params_ratio": summary["params"] / teacher_params,
            "bytes_ratio": student_bytes / teacher_bytes,
        },
    }
    return _add_to_summary(run_dir, summary, extra)


# ---------------------------------------------------------------------------------------------- shared
def _check_data(ckpt: dict[str, Any], train_set: data.Dataset, what: str) -> None:
    shape = (ckpt["in_chans"], ckpt["img_size"], ckpt["img_size"])
    if ckpt["classes"] != train_set.classes or tuple(train_set.images.shape[1:]) != shape:
        raise ConfigError(f"{what}: the model reads {len(ckpt['classes'])} classes {ckpt['classes']} of shape "
                          f"{shape}; the training data has {train_set.classes} of shape "
                          f"{tuple(train_set.images.shape[1:])}; pass the matching --data-dir")  # fmt: skip


def _add_to_summary(run_dir: Path, summary: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    stored = {k: v for k, v in summary.items() if k not in ("run_dir", "finished")}
    stored.update(extra)
    atomic_write_bytes(run_dir / "summary.json", (json.dumps(stored, indent=2) + "\n").encode())
    return {**summary, **extra}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def parse_sparsities(text: str) -> list[float]:
    """'0.5,0.7,0.9' -> [0.5, 0.7, 0.9]; each in (0, 1)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sparsity {text!r}: expected fractions separated by commas, e.g. 0.5,0.7,0.9") from None
    if not values:
        raise ConfigError("--sparsity: give at least one fraction, e.g. 0.5")
    for v in values:
        PruneOptions(v)
    return values
