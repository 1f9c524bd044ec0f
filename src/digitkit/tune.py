"""Hyperparameter search with Optuna: a search space in YAML over a training config, each trial an ordinary run
scored on validation data, median pruning on every epoch's validation accuracy, and a study kept in a database
that several processes or machines share.

    digitkit tune --config configs/default.yaml --space configs/space.yaml --trials 20
    digitkit tune --report --study default

runs/tune/<study>.db   the study (SQLite by default; PostgreSQL by URL, so workers on several machines share it)
runs/tune/<study>/
  trial-0000 ...       one run folder per trial (its config.yaml reproduces it), or a k-fold folder (objective cv)
  best.yaml            the best trial's config, ready for `digitkit train --config`
  report/              `--report`'s plots: history.png, importances.png, intermediate.png, slices.png

Honest measurement: the objective is the validation accuracy of the config's hold-out (objective val) or the mean
over k folds of the training files (objective cv). The test files are never read, so choosing among hundreds of
trials cannot overfit the figure `digitkit train` reports at the end.

`--trials N` is the study's total: every worker stops once N trials are finished or running, however many
workers share the study. Trials are numbered by the database in the order they start, so workers agree which
trials are within the budget; a worker that starts one past it (two workers asking at the same instant) marks it
pruned with the user attribute `skipped` and stops. Trials that failed do not count, nor do trials whose worker
died (a live worker marks them failed once their heartbeat is 5 minutes old), so the budget is filled again.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from digitkit import config, cv, data, runs
from digitkit.config import Config
from digitkit.errors import ConfigError, DataError
from digitkit.models import model_options
from digitkit.train import Reporter

WIDTH = "model.width"
"""A space key of its own: multiplies the model's layer widths (`channels` of a CNN, `hidden` of the MLP)."""
SPACE_KEYS = ("objective", "folds", "pruning", "params")
PARAM_KEYS = ("low", "high", "log", "step", "choices", "type")
PRUNING_KEYS = ("startup_trials", "warmup_epochs")
FROZEN = {
    "seed": "the seed fixes the validation split and the initial weights; tune it and trials differ by luck",
    "data": "data.* decides what is measured; every trial must be scored on the same validation images",
    "preprocess": "preprocess.* changes the images themselves; every trial must see the same data",
}
# Not compared when a worker joins a study: they differ between machines without changing the recipe.
MACHINE_KEYS = (("data", "dir"), ("data", "extra_dirs"), ("train", "threads"), ("train", "device"))

HEARTBEAT_SECONDS = 30
STALE_SECONDS = 300
ReporterFactory = Callable[[str], Reporter]


def _live_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


# ----------------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Param:
    """One dimension: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    key: str
    kind: str
    """float, int or choice"""
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    objective: str = "val"
    """val: the config's validation hold-out; cv: the mean over `folds` folds of the training files."""
    folds: int = 3
    pruning: bool = True
    startup_trials: int = 5
    """Trials that finish before the median pruner starts comparing."""
    warmup_epochs: int = 1
    """Epochs of every trial that are never pruned."""
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    """The file as read (stored with the study)."""


def load_space(path: str | Path, base: Config) -> Space:
    """Read and check a space file against the config it will modify; every problem is a ConfigError naming the
    file, the key and what is expected."""
    path = Path(path)
    raw = config.read_yaml(path, "space file not found; configs/space.yaml is an example")
    try:
        return parse_space(raw, base)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_space(raw: Any, base: Config) -> Space:
    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping with params: (and optionally objective:, folds:, pruning:)")
    unknown = sorted(set(raw) - set(SPACE_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid keys: {', '.join(SPACE_KEYS)}")
    objective = raw.get("objective", "val")
    if objective not in ("val", "cv"):
        raise ConfigError(f"objective = {objective!r}: expected val (the config's validation hold-out) or cv "
                          "(k-fold on the training files); the test set is never an objective")  # fmt: skip
    folds = raw.get("folds", 3)
    if not _is_int(folds) or folds < 2:
        raise ConfigError(f"folds = {folds!r}: expected an integer >= 2 (3 or 5 are usual)")
    pruning, startup, warmup = _parse_pruning(raw.get("pruning", {}))
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError("params: expected a mapping of dotted config keys to ranges, e.g. "
                          "params: {train.lr: {low: 1.0e-3, high: 1.0e-2, log: true}}")  # fmt: skip
    params = tuple(_parse_param(str(key), spec, base) for key, spec in params_raw.items())
    return Space(params, objective, folds, pruning, startup, warmup, raw=raw)


def _parse_pruning(raw: Any) -> tuple[bool, int, int]:
    if raw is False or raw is None:  # `pruning: off` (YAML reads off as false)
        return False, 0, 0
    if not isinstance(raw, dict):
        raise ConfigError(f"pruning = {raw!r}: expected off or a mapping like {{startup_trials: 5, warmup_epochs: 1}}")
    unknown = sorted(set(raw) - set(PRUNING_KEYS))
    if unknown:
        raise ConfigError(f"pruning.{unknown[0]}: unknown key; valid keys: {', '.join(PRUNING_KEYS)}")
    values = {k: raw.get(k, d) for k, d in zip(PRUNING_KEYS, (5, 1), strict=True)}
    for k, v in values.items():
        if not _is_int(v) or v < 0:
            raise ConfigError(f"pruning.{k} = {v!r}: expected an integer >= 0")
    return True, values["startup_trials"], values["warmup_epochs"]


def _parse_param(key: str, spec: Any, base: Config) -> Param:
    where = f"params.{key}"
    frozen = FROZEN.get(key.split(".")[0])
    if frozen:
        raise ConfigError(f"{where}: cannot be tuned: {frozen}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a range like {{low: 0.0, high: 0.5}} or {{choices: [a, b]}}, "
                          f"got {spec!r}")  # fmt: skip
    unknown = sorted(set(spec) - set(PARAM_KEYS))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(PARAM_KEYS)}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) - {"choices"}:
            raise ConfigError(f"{where}: give either choices or low/high, not both")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"{where}.choices: {bad[0]!r} is not a number, string, bool or null (lists of "
                              f"layer widths: tune {WIDTH} instead)")  # fmt: skip
        param = Param(key, "choice", choices=tuple(choices))
        _check_values(param, choices, base)
        return param
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise ConfigError(f"{where}: missing {missing[0]}; expected {{low: ..., high: ...}} or {{choices: [...]}}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _is_number(value):
            raise ConfigError(f"{where}.{name} = {value!r}: expected a number")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log = {log!r}: expected true or false")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (got {low}); use low: 1.0e-5 or drop log")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}.step = {step}: expected a positive step, and no step with log: true")
    kind = spec.get("type") or _kind_of(base, key, low, high)
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}.type = {kind!r}: expected int or float")
    if kind == "int" and not all(_is_int(v) for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: {key} is an integer; give integer low, high (and step)")
    param = Param(key, kind, float(low), float(high), log, float(step) if step is not None else None)
    _check_values(param, [int(low), int(high)] if kind == "int" else [float(low), float(high)], base)
    return param


def _check_values(param: Param, values: list[Any], base: Config) -> None:
    """The ends of a range (every choice) must make a valid config: unknown keys, wrong types and values out of
    their domain (a probability above 1) fail here, with the config's own message."""
    for value in values:
        try:
            trial_config(base, {param.key: value})
        except ConfigError as e:
            raise ConfigError(f"params.{param.key} = {value!r} does not make a valid config: {e}") from None


def _kind_of(base: Config, key: str, low: Any, high: Any) -> str:
    if key == WIDTH:
        return "float"
    current = _lookup(config.to_dict(base), key.split("."))
    if current is None and key.startswith("model.args."):
        current = model_options(base.model.name).get(key.split(".", 2)[2])
    if isinstance(current, bool) or current is None:
        return "int" if _is_int(low) and _is_int(high) else "float"
    return "int" if isinstance(current, int) else "float"


def _lookup(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """`base` with the trial's values set (dotted keys; model.width scales the model's layer widths)."""
    raw = config.to_dict(base)
    for key, value in values.items():
        if key != WIDTH:
            node = raw
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {part!r} is a value, not a section")
            node[last] = value
    if WIDTH in values:
        _scale_width(raw["model"], values[WIDTH])
    return config.from_dict(raw)


def _scale_width(model: dict[str, Any], factor: float) -> None:
    options = model_options(model["name"])
    widths = [k for k, v in options.items() if isinstance(v, tuple) and v and all(_is_int(c) for c in v)]
    if not widths:
        raise ConfigError(f"{WIDTH}: model {model['name']!r} has no layer widths to scale (no channels or hidden "
                          f"option); drop {WIDTH} from the space or tune another model")  # fmt: skip
    if factor <= 0:
        raise ConfigError(f"{WIDTH} = {factor}: expected a positive factor such as 0.5 or 2")
    args = model.setdefault("args", {})
    for k in widths:
        args[k] = [max(1, round(c * factor)) for c in args.get(k, options[k])]


# ----------------------------------------------------------------------------------------------------------
# Storage and study


def storage_url(storage: str | None, default_file: Path) -> str:
    """An SQLAlchemy URL for Optuna: a SQLite file (the default, or a bare path), sqlite:///..., or PostgreSQL
    (postgresql://user:password@host:5432/db, through psycopg 3)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    text = (storage or "").strip()
    if not text or "://" not in text:
        path = Path(text).expanduser() if text else default_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path.resolve()}"
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--storage {text!r}: not a database URL; expected a file path, sqlite:///path/study.db "
                          "or postgresql://user:password@host:5432/db") from None  # fmt: skip
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ConfigError("--storage: an in-memory SQLite database is not shared between workers and is lost "
                              "when the command ends; give a file: sqlite:///runs/tune/study.db")  # fmt: skip
        return url.set(drivername="sqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(f"--storage {safe_url(text)!r}: unsupported database {backend!r}; expected a SQLite file or "
                      "postgresql://user@host/db")  # fmt: skip


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str) -> Any:
    """Optuna's RDBStorage; workers starting at the same moment on a fresh database may race to create its tables,
    so that is retried, and SQLite waits up to a minute for a lock instead of failing."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            # Heartbeats: a trial whose worker died (killed, machine lost) is marked failed by a live worker after
            # STALE_SECONDS, so it stops counting toward --trials and the budget is filled again.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                                  grace_period=STALE_SECONDS)  # fmt: skip
        except (IntegrityError, OperationalError, ProgrammingError) as e:
            if attempt == 4 or not _is_creation_race(e):
                raise DataError(f"study storage {safe_url(url)}: {_first_line(e)}") from None
            time.sleep(0.5 + attempt)
        except SQLAlchemyError as e:
            raise DataError(f"study storage {safe_url(url)}: {_first_line(e)}") from None
        except ModuleNotFoundError as e:
            raise ConfigError(f"study storage {safe_url(url)}: the database driver is missing ({e.name}); for "
                              "PostgreSQL install it with: pip install 'psycopg[binary]>=3.1'") from None  # fmt: skip
    raise AssertionError("unreachable")


def _is_creation_race(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("already exists", "duplicate", "locked", "unique"))


def _first_line(e: Exception) -> str:
    return (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]


def open_study(name: str, url: str, base: Config | None = None, space: Space | None = None) -> Any:
    """Create the study or join it. A study remembers the base config and space it was started with; a worker
    with another recipe (beyond machine-specific keys such as data.dir) is refused, since its trials would not be
    comparable. With `base` None the study must exist (reports)."""
    import optuna

    storage = open_storage(url)
    if base is None:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
            raise DataError(f"no study {name!r} in {safe_url(url)}; studies there: {', '.join(names) or 'none'}") \
                from None  # fmt: skip
    assert space is not None
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials,
                                          n_warmup_steps=space.warmup_epochs + 1)  # steps are epochs, from 1
              if space.pruning else optuna.pruners.NopPruner())  # fmt: skip
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner,
                                load_if_exists=True)  # fmt: skip
    recipe = {"base_config": _comparable(config.to_dict(base)), "space": space.raw}
    stored = {k: study.user_attrs.get(k) for k in recipe}
    if stored["base_config"] is None:
        for k, v in recipe.items():
            study.set_user_attr(k, json.loads(json.dumps(v)))
        study.set_user_attr("full_base_config", json.loads(json.dumps(config.to_dict(base))))
    else:
        for k, v in recipe.items():
            diff = _first_difference(stored[k], json.loads(json.dumps(v)))
            if diff:
                what = "base config (--config, --set)" if k == "base_config" else "search space (--space)"
                raise ConfigError(
                    f"study {name!r} in {safe_url(url)} was started with another {what}: {diff}; use the same "
                    "recipe to join it, or start a new study with --study NAME"
                )
    return study


def _comparable(raw: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for section, key in MACHINE_KEYS:
        out.get(section, {}).pop(key, None)
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d:
                return d
        return ""
    return "" if a == b else f"{prefix or 'value'} was {a!r}, now {b!r}"


# ----------------------------------------------------------------------------------------------------------
# Trials


class PruningReporter:
    """Passes epoch events on to `inner`, reports each epoch's validation accuracy to the trial (at step
    offset + epoch) and raises optuna.TrialPruned when the median pruner says the trial is behind."""

    def __init__(self, trial: Any, inner: Reporter | None = None, offset: int = 0):
        self.trial, self.inner, self.offset = trial, inner, offset

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        if self.inner is not None:
            self.inner.epoch_start(epoch, epochs, batches)

    def batch(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        if self.inner is not None:
            self.inner.batch(done, loss, acc, images_per_s)

    def epoch_end(self, row: dict[str, float]) -> None:
        import optuna

        if self.inner is not None:
            self.inner.epoch_end(row)
        step = self.offset + int(row["epoch"])
        self.trial.report(row["val_acc"], step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {100 * row['val_acc']:.2f}% at step {step} is below "
                                     "the median of earlier trials")  # fmt: skip


class Objective:
    """Trains one trial's config and returns what it is judged by: validation accuracy of the best checkpoint
    (objective val) or its mean over folds (objective cv). The training files are read once per process; the
    test files never."""

    def __init__(self, base: Config, space: Space, out_dir: Path, n_trials: int,
                 reporter_factory: ReporterFactory | None = None):  # fmt: skip
        self.base, self.space, self.out_dir, self.n_trials = base, space, Path(out_dir), n_trials
        self.reporter_factory = reporter_factory
        self._datasets: tuple[data.Dataset, data.Dataset] | None = None

    def __call__(self, trial: Any) -> float:
        import optuna

        if _counted_before(trial) >= self.n_trials:
            trial.set_user_attr("skipped", "budget")
            trial.study.stop()
            raise optuna.TrialPruned(f"the study already has its {self.n_trials} trials; this worker stops")
        values = {p.key: p.suggest(trial) for p in self.space.params}
        try:
            cfg = trial_config(self.base, values)
        except ConfigError as e:
            raise ConfigError(f"trial {trial.number}: the sampled values {values} make an invalid config ({e}); "
                              "narrow the space so every combination is valid") from None  # fmt: skip
        run_dir = self.out_dir / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        label = f"trial {trial.number}"
        if self.space.objective == "val":
            inner = self.reporter_factory(label) if self.reporter_factory else None
            summary = runs.train_run(cfg, out=run_dir, reporter=PruningReporter(trial, inner),
                                     datasets=(*self.datasets(), None), point_latest_link=False)  # fmt: skip
            trial.set_user_attr("epochs", summary["epochs"])
            return float(summary["val_accuracy"])
        result = cv.run_cv(cfg, folds=self.space.folds, workers=1, out=run_dir,
                           reporter_factory=lambda fold_label: self._fold_reporter(trial, label, fold_label, cfg))
        trial.set_user_attr("fold_accuracies", [f["val_accuracy"] for f in result["folds"]])
        return float(result["val_accuracy"]["mean"])

    def datasets(self) -> tuple[data.Dataset, data.Dataset]:
        """(train, val) of the config's hold-out split (plus data.extra_dirs in training), without the test files."""
        if self._datasets is None:
            cfg = self.base
            full = runs.prepared(data.load_split(cfg.data.dir, "train", verify=cfg.data.verify), cfg)
            train_idx, val_idx = data.stratified_split(full.labels, cfg.data.val_fraction, cfg.split_seed)
            train = full.subset(train_idx)
            self._datasets = (data.concat([train, *runs.load_extra_sets(cfg, train)]), full.subset(val_idx))
        return self._datasets

    def _fold_reporter(self, trial: Any, label: str, fold_label: str, cfg: Config) -> PruningReporter:
        fold = int(re.search(r"(\d+)/\d+", fold_label).group(1))
        inner = self.reporter_factory(f"{label} {fold_label}") if self.reporter_factory else None
        return PruningReporter(trial, inner, offset=(fold - 1) * cfg.train.epochs)


def _counted_before(trial: Any) -> int:
    """Trials that count toward the budget and started before this one (the database numbers them in order)."""
    earlier = trial.study.get_trials(deepcopy=False, states=_live_states())
    return sum(1 for t in earlier if t.number < trial.number and counts(t))


def counts(t: Any) -> bool:
    """False for trials a worker started past the budget and gave up at once."""
    return not t.user_attrs.get("skipped")


def _budget_used(study: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=_live_states()) if counts(t))


def run_study(
    base: Config,
    space: Space,
    study_name: str,
    url: str,
    n_trials: int,
    out_dir: Path,
    reporter_factory: ReporterFactory | None = None,
    on_trial: Callable[[Any, Any], None] | None = None,
) -> dict[str, Any]:
    """Run trials of `study_name` until it holds `n_trials` (with any other workers on the same storage); writes
    out_dir/best.yaml. `on_trial(study, frozen_trial)` is called after each trial of this process."""
    if n_trials < 1:
        raise ConfigError(f"--trials {n_trials}: expected a positive number of trials for the study")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("digitkit tune trains each trial in one process; start several `digitkit tune` workers on "
                          "the same --storage and --study instead of launching it with torchrun")  # fmt: skip
    if space.objective == "cv":
        cv.check_folds(space.folds)
    elif not base.has_validation:
        raise ConfigError("objective val scores each trial on the config's validation hold-out, but "
                          "data.val_fraction is 0 (no hold-out); set data.val_fraction=0.1, or use objective: cv "
                          "(k-fold on the training files)")  # fmt: skip
    study = open_study(study_name, url, base, space)
    objective = Objective(base, space, out_dir, n_trials, reporter_factory)

    def stop_at_budget(study: Any, trial: Any) -> None:
        if on_trial is not None and counts(trial):
            on_trial(study, trial)
        if _budget_used(study) >= n_trials:
            study.stop()

    before = _budget_used(study)
    if before < n_trials:
        study.optimize(objective, n_trials=n_trials, callbacks=[stop_at_budget])
    best = write_best(study, out_dir / "best.yaml", base)
    return {"study": study_name, "storage": safe_url(url), "out_dir": str(out_dir), "trials_before": before,
            **study_counts(study), "best": best}  # fmt: skip


def study_counts(study: Any) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if counts(t)]
    out = {"trials": len(trials)}
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
        out[state.name.lower()] = sum(1 for t in trials if t.state == state)
    return out


def best_trial(study: Any) -> Any | None:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def write_best(study: Any, path: Path, base: Config | None = None) -> dict[str, Any] | None:
    """The best finished trial's config as YAML (`digitkit train --config path`), replaced atomically; None when
    no trial has finished yet. `base` defaults to the config the study was started with."""
    best = best_trial(study)
    if best is None:
        return None
    if base is None:
        base = config.from_dict(study.user_attrs["full_base_config"])
    cfg = trial_config(base, best.params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    config.save(cfg, tmp)
    os.replace(tmp, path)
    return {"trial": best.number, "value": best.value, "params": best.params, "config": str(path),
            "run_dir": best.user_attrs.get("run_dir")}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Report: the best trials, parameter importances and plots (PNG, matplotlib)


def report(study: Any, out_dir: Path, top: int = 5) -> dict[str, Any]:
    """What `digitkit tune --report` shows and saves: the `top` finished trials, parameter importances (when the
    study has enough finished trials) and plots in out_dir/report/."""
    from optuna.trial import TrialState

    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: (-t.value, t.number))
    best_rows = [{"trial": t.number, "value": t.value, "params": t.params, "epochs": t.user_attrs.get("epochs"),
                  "run_dir": t.user_attrs.get("run_dir")} for t in done[:top]]  # fmt: skip
    importances, note = param_importances(study)
    plots = save_plots(study, out_dir / "report", importances)
    best = write_best(study, out_dir / "best.yaml")
    return {"study": study.study_name, **study_counts(study), "best_trials": best_rows, "importances": importances,
            "importance_note": note, "plots": [str(p) for p in plots], "best": best}  # fmt: skip


def param_importances(study: Any) -> tuple[dict[str, float] | None, str]:
    """(importance per parameter, summing to 1; or None, and why). Optuna's default evaluator (PED-ANOVA) over
    the finished trials; it needs at least 2 of them, with parameters that vary."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return None, (f"parameter importances need at least 2 finished trials; this study has {len(done)} "
                      "(pruned trials do not count); run more trials")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        return None, f"parameter importances could not be computed from {len(done)} finished trials ({e})"
    return {k: float(v) for k, v in values.items()}, f"PED-ANOVA over {len(done)} finished trials"


def save_plots(study: Any, folder: Path, importances: dict[str, float] | None) -> list[Path]:
    """history.png (objective by trial, best so far), intermediate.png (validation accuracy per epoch of every
    trial, pruned ones included), slices.png (objective against each parameter) and importances.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    drawings = [("history.png", ovm.plot_optimization_history), ("intermediate.png", ovm.plot_intermediate_values),
                ("slices.png", ovm.plot_slice)]  # fmt: skip
    if importances:
        drawings.append(("importances.png", ovm.plot_param_importances))
    written = []
    for name, draw in drawings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            drawn = draw(study)
        axes = drawn.flat[0] if hasattr(drawn, "flat") else drawn
        if name in ("history.png", "intermediate.png"):
            axes.set_ylabel("validation accuracy")
        if name == "intermediate.png":
            axes.set_xlabel("epoch (objective cv: (fold - 1) x epochs + epoch)")
        fig = axes.figure
        fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
        fig.savefig(folder / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        written.append(folder / name)
    return written
