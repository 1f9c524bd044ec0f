"""One typed config for a run: dataclasses with every default in one place, YAML in and out, dotted overrides.

Unknown keys and wrong types are errors, never silently ignored: a typo in a config must not train the wrong
model. A run folder's `config.yaml` is the fully resolved config, so `--config RUN/config.yaml` reproduces it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from digitkit import augment
from digitkit.errors import ConfigError
from digitkit.models import model_options, model_task
from digitkit.preprocess import PreprocessConfig
from digitkit.rows import RowsConfig

TASKS = ("classify", "sequence")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "plateau", "onecycle", "cosine")
CHECKPOINT_METRICS = ("val_loss", "val_acc", "last")


@dataclass
class DataConfig:
    dir: str = "data/mnist"
    """Folder with the four IDX files (train/t10k images/labels), raw or .gz."""
    val_fraction: float = 0.1
    """Share of each class of the training set held out for validation (stratified, seeded). 0 trains on every
    training image with no validation (a refit once a recipe is fixed on a hold-out): it needs
    train.checkpoint_metric=last, no early stopping and no plateau schedule, since nothing can choose an epoch."""
    split_seed: int | None = None
    """Seed of that hold-out; None uses the run's `seed`. Runs meant for one ensemble share it, so the ensemble
    has a validation set that none of its members trained on."""
    verify: bool = True
    """Check SHA-256 sums from the folder's SHA256SUMS.raw before training."""
    extra_dirs: list[str] = field(default_factory=list)
    """Extra IDX training sets (train-images/train-labels only, same classes and image size), added to the training
    portion only: validation stays the hold-out of `dir` and the test set stays `dir`'s. `digitkit audit export
    --format idx` writes such a folder from the serving feedback; `digitkit train --extra-data DIR` appends here."""
    negatives_dir: str = ""
    """An IDX folder of non-digits already brought to 28x28 by `preprocess` (digitkit.realworld.negatives; the
    shipped one is data/negatives) for outlier exposure (train.outlier_weight). Empty: none."""

    def __post_init__(self) -> None:
        if not isinstance(self.negatives_dir, str):
            raise ConfigError(f"data.negatives_dir = {self.negatives_dir!r}: expected a folder path, or empty for none")
        if not all(isinstance(d, str) and d for d in self.extra_dirs):
            raise ConfigError(f"data.extra_dirs = {self.extra_dirs!r}: expected a list of folder paths")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(
                f"data.val_fraction = {self.val_fraction}: expected a fraction in [0, 1) such as 0.1; 0 trains on "
                "every training image with no validation (the test set is never used to choose anything)"
            )


@dataclass
class ModelConfig:
    name: str = "cnn3"
    """A registered model (`digitkit models` lists them)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the model's constructor, e.g. {dropout: 0.2}."""

    def __post_init__(self) -> None:
        # Fail at load time, before minutes of data loading, on a misspelt model or option.
        options = model_options(self.name)
        unknown = sorted(set(self.args) - set(options))
        if unknown:
            raise ConfigError(
                f"model.args.{unknown[0]}: model {self.name!r} has no such option; its options are: "
                f"{', '.join(f'{k}={v}' for k, v in options.items()) or 'none'}"
            )


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"
    """adam, adamw or sgd (with momentum, Nesterov)."""
    lr: float = 2e-3
    """Learning rate; the peak rate for the one-cycle schedule."""
    weight_decay: float = 5e-4
    """L2 penalty for adam/sgd, decoupled weight decay for adamw."""
    momentum: float = 0.9
    label_smoothing: float = 0.0
    schedule: str = "onecycle"
    """none, plateau (multiply by plateau_factor when the validation loss stalls), onecycle or cosine."""
    plateau_factor: float = 0.5
    plateau_patience_epochs: int = 3
    """plateau: the rate is cut once more than this many epochs in a row bring no lower validation loss (torch's
    ReduceLROnPlateau counting: 3 cuts on the 4th flat epoch; Keras's patience=3, a cut on the 3rd, is 2 here)."""
    onecycle_pct_start: float = 0.25
    checkpoint_metric: str = "val_loss"
    """Which epoch's weights are kept: val_loss (lowest; the smoother signal: 6,000 validation images move the
    accuracy in steps of 0.017%, so its maximum is often a lucky early epoch), val_acc (highest) or last (the last
    epoch's, as final-*.pt; the only choice without validation)."""
    early_stopping_patience_epochs: int = 5
    """Stop on the epoch that makes this many in a row without a lower validation loss (Keras's EarlyStopping
    patience); 0 turns early stopping off."""
    eval_batch_size: int = 256
    """Images per evaluation batch. On a CPU a few hundred beat thousands: the activations stay in cache."""
    device: str = "auto"
    """auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."""
    amp: bool = True
    """Mixed precision on a GPU: bfloat16 autocast, or float16 with loss scaling where bfloat16 is unsupported. On
    a CPU it follows cpu_bf16."""
    cpu_bf16: bool = False
    """bfloat16 autocast on the CPU too, where the CPU does bfloat16 natively (AVX-512 BF16, AMX): about 1.3x faster
    training steps for fast.yaml (benchmarks/speedrun.py --probe). On other CPUs bfloat16 would be emulated and
    several times slower, so training stays in float32 there (with a warning)."""
    compile: bool = False
    """torch.compile the model for training and evaluation: faster steps after a compilation that costs seconds to
    minutes, so it pays off only for long runs (measured in benchmarks/speedrun.py --probe)."""
    threads: int = 0
    """CPU threads for torch; 0 uses every core."""
    channels_last: bool = True
    """NHWC memory layout: faster convolutions on CPU (measured in benchmarks/train_speed.py)."""
    steps_per_epoch: int = 0
    """Batches per epoch; 0 is one full pass over the training set. Fewer make an epoch a fraction of the data
    (fast.yaml trains on less than one pass when that is enough)."""
    plots: bool = True
    """Draw history.png and confusion.png when the run ends (about a second: matplotlib); `digitkit evaluate RUN`
    draws them, and more, at any time."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (and batch-norm statistics), updated every step; validation,
    checkpoints and the test figure use the average. 0 turns it off; 0.999 is typical for runs of 10k+ steps."""
    tta_shift_px: int = 0
    """Test-time augmentation at the run's final evaluation: validation and test are also scored on the mean
    softmax over each image and its copies moved this many pixels left, right, up and down (5 forward passes;
    evaluate.predict_probs_shift_tta), into summary.json's `tta`. 0 turns it off. The checkpoint is still chosen
    on plain validation; `predict` and the server answer without it."""
    outlier_weight: float = 0.0
    """Outlier exposure (Hendrycks et al. 2019, "Deep anomaly detection with outlier exposure"): every batch also
    holds `outlier_batch` non-digits from data.negatives_dir, augmented like the digits, and the loss adds this
    weight times their cross-entropy to the uniform distribution, so the model learns to spread its confidence
    on what is not a digit (and the confidence threshold rejects it). 0 turns it off; 0.5 is the paper's."""
    outlier_batch: int = 32
    """Non-digits per batch when outlier_weight > 0 (on top of batch_size digits)."""
    outlier_from_digits: float = 0.0
    """Share of those non-digits made fresh each batch from training digits (augment.broken_digits: partial and
    doubled digits, never the same twice); the rest come from data.negatives_dir. Measured on the realworld recipe
    (seed 0, README, issue 22): it rejects more partial and doubled digits and fewer letters, no better overall, so
    the shipped recipes leave it at 0."""

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.checkpoint_metric", self.checkpoint_metric, CHECKPOINT_METRICS)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)}: expected a positive integer")
        if self.lr <= 0:
            raise ConfigError(f"train.lr = {self.lr}: expected a positive learning rate such as 1e-3")
        if not 0 <= self.outlier_from_digits <= 1:
            raise ConfigError(f"train.outlier_from_digits = {self.outlier_from_digits}: expected a share in [0, 1] of "
                              "train.outlier_batch (0: every non-digit from data.negatives_dir)")
        if self.outlier_weight < 0 or self.outlier_batch < 1:
            raise ConfigError(f"train.outlier_weight = {self.outlier_weight}, train.outlier_batch = "
                              f"{self.outlier_batch}: expected a weight >= 0 (0 is off, 0.5 typical) and a positive "
                              "number of non-digits per batch")  # fmt: skip
        if self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.weight_decay must be >= 0 and train.label_smoothing in [0, 1)")
        if self.steps_per_epoch < 0:
            raise ConfigError(f"train.steps_per_epoch = {self.steps_per_epoch}: expected 0 (a full pass) or more")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay = {self.ema_decay}: expected 0 (off) or a decay in (0, 1) such as "
                              "0.999")  # fmt: skip
        if isinstance(self.tta_shift_px, bool) or not isinstance(self.tta_shift_px, int) or \
                not 0 <= self.tta_shift_px <= 4:  # fmt: skip
            raise ConfigError(f"train.tta_shift_px = {self.tta_shift_px!r}: expected 0 (off) or a shift of 1 to 4 "
                              "pixels (1 is typical)")
        if self.early_stopping_patience_epochs < 0 or self.plateau_patience_epochs < 0:
            raise ConfigError("train.*_patience_epochs must be >= 0 (0 turns early stopping off)")


MAX_ROW_READINGS = 9
"""inference.row_ink_fractions holds at most this many heights (each one a forward pass per row)."""


@dataclass
class InferenceConfig:
    """How a trained model answers: honoured by `digitkit predict`, `read`, `evaluate` and the server."""

    reject_below_confidence: float = 0.5
    """Answer `digit: null` (reason low-confidence) when the top probability is below this. See the README's
    rejection section for how the default was chosen on validation data and what it trades."""
    reject_below_digit_score: float = 0.0
    """Answer `digit: null` (reason not-a-digit) when the digit score is below this: how far the answer is from the
    "no idea" answer (all classes alike) that outlier exposure trains a model to give for what is not a digit, the
    mean over the classes of log(p_top / p_i) on the calibrated probabilities (= (top logit - mean logit) / T).
    0 turns it off. It separates non-digits from digits better than the top probability does, which also falls
    for a digit the model hesitates between two readings of (benchmarks/realworld.py chooses both thresholds)."""
    reject_below_row_confidence: float = 0.0
    """Row reader (task: sequence): answer no text (reason low-confidence) when the probability of the string read
    (the sum over its CTC alignments) is below this. 0 never rejects."""
    row_ink_fractions: list[float] = field(default_factory=list)
    """Row reader: read each row at these ink heights (shares of rows.height, like rows.ink_fraction) in one batch
    and answer the string most probable over all of them (realworld.ctc.beam_many); the boxes come from the
    reading at rows.ink_fraction (listed or not). Empty: rows.ink_fraction alone. Costs a forward pass per
    height; configs/read.yaml chooses five on validation."""
    reread_below_row_confidence: float = 1.0
    """Row reader: read a row at the other row_ink_fractions only when the string read at rows.ink_fraction is
    less probable than this (a second batched pass for those rows alone); 1 reads every row at every height."""
    noise_defence_sigma: float = 0.0
    """Inference-time Gaussian-noise defence: average the softmax over noisy copies of the input (pixel std in
    [0, 1] units); 0 turns it off. Trades some clean accuracy for robustness to small adversarial perturbations;
    `digitkit evaluate` measures both with and without it."""
    noise_defence_samples: int = 8
    """Noisy copies averaged per image when the defence is on."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.reject_below_confidence < 1.0:
            raise ConfigError(
                f"inference.reject_below_confidence = {self.reject_below_confidence}: expected a probability in "
                "[0, 1); 0 never rejects for low confidence"
            )
        if not 0.0 <= self.reject_below_digit_score < 100.0:
            raise ConfigError(
                f"inference.reject_below_digit_score = {self.reject_below_digit_score}: expected a score in [0, 100) "
                "(0 never rejects by it; 2-4 is typical for a model trained with non-digits, see the README)"
            )
        if not 0.0 <= self.reject_below_row_confidence < 1.0:
            raise ConfigError(f"inference.reject_below_row_confidence = {self.reject_below_row_confidence}: expected "
                              "a probability in [0, 1); 0 never rejects a row")  # fmt: skip
        fractions = self.row_ink_fractions
        if not isinstance(fractions, list) or not 0 <= len(fractions) <= MAX_ROW_READINGS or not all(
                isinstance(f, int | float) and not isinstance(f, bool) and 0.3 <= f <= 1.0 for f in fractions):
            raise ConfigError(f"inference.row_ink_fractions = {fractions!r}: expected a list of at most "
                              f"{MAX_ROW_READINGS} shares in [0.3, 1] such as [0.64, 0.7, 0.75, 0.8, 0.86] ([] reads "
                              "at rows.ink_fraction alone)")  # fmt: skip
        self.row_ink_fractions = [float(f) for f in fractions]
        if not 0.0 <= self.reread_below_row_confidence <= 1.0:
            raise ConfigError(f"inference.reread_below_row_confidence = {self.reread_below_row_confidence}: expected "
                              "a probability in [0, 1] (1 reads every row at every height of row_ink_fractions)")
        if not 0.0 <= self.noise_defence_sigma <= 1.0 or self.noise_defence_samples < 1:
            raise ConfigError(
                "inference.noise_defence_sigma must be in [0, 1] (0 = off, 0.1-0.3 typical) and "
                "inference.noise_defence_samples a positive integer"
            )


@dataclass
class Config:
    seed: int = 0
    task: str = "classify"
    """classify: a model that reads one digit (28x28). sequence: a row reader (a `sequence` model such as crnn)
    trained with CTC on rows composed from the training digits (`rows`); `digitkit read` uses it."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: augment.AugmentConfig = field(default_factory=augment.AugmentConfig)
    """A recipe name plus per-op overrides: {recipe: standard, rotation: {p: 0.5}}; see `digitkit augment list`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """How real-world images (photos, scans, canvases) become 28x28 digits; stored with the model so the CLI,
    the server and the web page prepare input exactly alike. With deskew on, training deskews MNIST too."""
    rows: RowsConfig = field(default_factory=RowsConfig)
    """task: sequence only: how training rows are composed and every row is brought to the model's height."""

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        if model_task(self.model.name) != self.task:
            raise ConfigError(f"model {self.model.name!r} is a {model_task(self.model.name)} model but task is "
                              f"{self.task!r}: set task: {model_task(self.model.name)}, or pick a {self.task} model "
                              "(`digitkit models` lists them)")  # fmt: skip
        if self.task == "sequence" and self.train.outlier_weight > 0:
            raise ConfigError("train.outlier_weight: non-digit training is for the single-digit classifier; the row "
                              "reader rejects by its sequence confidence (set train.outlier_weight: 0)")
        if self.train.outlier_weight > 0 and not self.data.negatives_dir:
            raise ConfigError(f"train.outlier_weight = {self.train.outlier_weight} trains on non-digits, but "
                              "data.negatives_dir is empty; set it (data/negatives ships with digitkit) or set "
                              "train.outlier_weight: 0")  # fmt: skip
        if self.data.val_fraction == 0:
            needs = {
                "train.checkpoint_metric=last": self.train.checkpoint_metric == "last",
                "train.early_stopping_patience_epochs=0": self.train.early_stopping_patience_epochs == 0,
                "a train.schedule other than plateau": self.train.schedule != "plateau",
            }
            missing = [k for k, ok in needs.items() if not ok]
            if missing:
                raise ConfigError(
                    "data.val_fraction = 0 trains with no validation, so nothing can choose an epoch, stop early or "
                    f"lower the rate on a plateau; it needs {', '.join(missing)} (set them, or hold out a fraction "
                    "such as data.val_fraction=0.1)"
                )

    @property
    def has_validation(self) -> bool:
        """False when data.val_fraction is 0: every training image trains, and no figure is a validation one."""
        return self.data.val_fraction > 0

    @property
    def split_seed(self) -> int:
        """The seed of the validation hold-out: data.split_seed if set, else seed."""
        return self.seed if self.data.split_seed is None else self.data.split_seed


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from plain data (as loaded from YAML), strictly."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    return _build(Config, raw, "")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if cls is augment.AugmentConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix}: expected a mapping like {{recipe: standard}}, got {raw!r}")
        return augment.config_from_dict(raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(names)}")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _coerce(key, value, hint)
    return cls(**values)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _coerce(key, value, arg)
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads "3e-3" as a string; it is the way people write learning rates.
        try:
            return float(value)
        except ValueError:
            pass
    if origin is typing.Any or (isinstance(origin, type) and isinstance(value, origin)):
        if not (origin is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"config key {key!r} = {value!r}: expected {getattr(origin, '__name__', origin)}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data for YAML; the augmentation is written out in full so the run does not depend on recipes."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, augment.AugmentConfig):
            out[f.name] = augment.config_to_dict(value)
        elif dataclasses.is_dataclass(value):
            out[f.name] = dataclasses.asdict(value)
        else:
            out[f.name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-3` -> (['train', 'lr'], 0.003); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-3")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: bad key {key!r}; expected dotted keys like train.lr")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: Path, missing: str) -> Any:
    """A YAML file's content; a ConfigError naming the file when it is missing (`missing` says what to do) or is not
    YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults if `path` is None) and apply `--set` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_yaml(path, "config file not found; the shipped ones are in configs/") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level (seed:, data:, model:, train: ...)")
    try:
        return from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
