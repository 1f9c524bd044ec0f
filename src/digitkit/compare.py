"""Compare training configs over several seeds: is a difference bigger than the seed-to-seed noise?

A spec is either a training config (configs/default.yaml: one entry, named after the file) or a comparison file
(a mapping with `entries:`; `base:` or `seeds:` also mark one, none of them is a training config key):

    base: default.yaml        # training config the entries start from, relative to this file; absent = defaults
    seeds: 3                  # seeds per entry (base seed, +1, +2 ...); run_compare(seeds=N) overrides it
    entries:
      - name: cnn1            # letters, digits, . _ - ; names the run folders
        set: {model.name: cnn1}                                   # dotted keys, as `--set` takes them
      - {name: cnn3-plain, set: {model.name: cnn3, augment: {recipe: none}}}   # a mapping replaces a section
      - {name: other, base: other.yaml}                           # an entry may start from its own config

Every `set` goes through config.load(base, overrides), so a misspelt key fails before anything trains.

Each (entry, seed) run lives in root/compare/<name>-<hash of the resolved config minus seed>-s<seed>/ and is
reused when it already finished (any change to the resolved config gives a new hash, hence a new run); an
interrupted one is resumed. The comparison itself goes to root/compare-<stamp>/: compare.json, compare.md and
compare.png. Test accuracy is reported there and never used to choose anything: every run's checkpoint is
picked on its own validation split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import yaml

from digitkit import config, plots, runs
from digitkit.config import Config
from digitkit.cv import ReporterFactory
from digitkit.errors import ConfigError, DataError
from digitkit.idx import atomic_write_bytes
from digitkit.train import LAST, Reporter

DEFAULT_SEEDS = 3
NOISE_STANDARD_ERRORS = 2.0
"""A difference 'exceeds the noise' when it is larger than this many standard errors (|Welch t| > 2)."""
_SPEC_KEYS = ("base", "seeds", "entries")
_ENTRY_KEYS = ("name", "base", "set")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Entry:
    """One line of the comparison: a training config plus overrides, trained once per seed."""

    name: str
    source: Path
    """The spec file the entry came from."""
    base: Path | None
    """The training config it starts from; None = the built-in defaults."""
    overrides: list[str]
    """`--set` style KEY=VALUE strings applied to `base`, seed excluded."""
    seeds: list[int]

    def config(self, seed: int | None = None) -> Config:
        """The resolved config with `seed` set (None: the config's own seed)."""
        seed_override = [] if seed is None else [f"seed={seed}"]
        try:
            return config.load(self.base, [*self.overrides, *seed_override])
        except ConfigError as e:
            if self.base == self.source:  # a training config given directly: config.load named the file
                raise
            raise ConfigError(f"{self.source}: entry {self.name!r}: {e}") from None


def load_specs(specs: list[Path], seeds: int | None = None, overrides: list[str] | None = None) -> list[Entry]:
    """Read spec files into entries and check every entry's config; nothing trains here.

    `seeds` (if given) replaces each file's `seeds:`; `overrides` (`--set` strings, e.g. data.dir=...) apply to
    every entry before the entry's own `set`.
    """
    if seeds is not None and seeds < 1:
        raise ConfigError(f"seeds = {seeds}: expected at least 1 (3 or more to tell a difference from noise)")
    if not specs:
        raise ConfigError("nothing to compare: pass training configs or a comparison file like "
                          "configs/compare-depth.yaml")  # fmt: skip
    entries: list[Entry] = []
    for spec in map(Path, specs):
        entries += _read_spec(spec, seeds, list(overrides or []))
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"entry name {name!r} is used twice; names label the runs, so give each entry its own "
                              "(two training configs with the same file name need a comparison file)")  # fmt: skip
    return entries


def _read_spec(spec: Path, seeds: int | None, overrides: list[str]) -> list[Entry]:
    try:
        raw = yaml.safe_load(spec.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{spec}: comparison or config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{spec}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not (isinstance(raw, dict) and set(raw) & set(_SPEC_KEYS)):
        # A training config: one entry named after the file.
        entry = Entry(spec.stem, spec, spec, overrides, [])
        entry.seeds = _seed_list(entry, seeds or DEFAULT_SEEDS)
        return [entry]
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{spec}: unknown key {unknown[0]!r} in a comparison file; valid keys: "
                          f"{', '.join(_SPEC_KEYS)}")  # fmt: skip
    n_seeds = seeds if seeds is not None else raw.get("seeds", DEFAULT_SEEDS)
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ConfigError(f"{spec}: seeds = {n_seeds!r}: expected a whole number >= 1, e.g. seeds: 3")
    items = raw.get("entries")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{spec}: entries must be a non-empty list like - {{name: cnn1, set: {{model.name: cnn1}}}}")
    base = _base_path(spec, raw.get("base"), "base")
    entries = []
    for n, item in enumerate(items, 1):
        where = f"{spec}: entry {n}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with name: and set:, got {item!r}")
        unknown = sorted(set(item) - set(_ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_ENTRY_KEYS)}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: name = {name!r}: expected letters, digits, '.', '_' or '-' (it names the "
                              "run folders), e.g. name: cnn3-no-augment")  # fmt: skip
        sets = item.get("set") or {}
        if not isinstance(sets, dict) or not all(isinstance(k, str) for k in sets):
            raise ConfigError(f"{where} ({name}): set must map dotted keys to values, e.g. set: {{model.name: cnn1}}")
        # JSON is valid YAML, so each value reaches config.load exactly as written, mappings and lists included.
        entry_overrides = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in sets.items())]
        entry_base = _base_path(spec, item["base"], f"entry {name!r} base") if "base" in item else base
        entry = Entry(name, spec, entry_base, entry_overrides, [])
        entry.seeds = _seed_list(entry, n_seeds)
        entries.append(entry)
    return entries


def _base_path(spec: Path, value: Any, key: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{spec}: {key} = {value!r}: expected the path of a training config, e.g. default.yaml")
    path = Path(value)
    path = path if path.is_absolute() else spec.parent / path
    if not path.is_file():
        raise ConfigError(f"{spec}: {key} = {value!r}: no such file {path} (relative paths start at the comparison "
                          "file's folder)")  # fmt: skip
    return path


def _seed_list(entry: Entry, n: int) -> list[int]:
    # Loading the config here checks it before anything trains; the seeds count up from its own seed.
    first = entry.config().seed
    return [first + i for i in range(n)]


def config_hash(cfg: Config) -> str:
    """Ten hex digits of the resolved config without its seed (the seed is in the folder name)."""
    d = config.to_dict(cfg)
    d.pop("seed")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def run_compare(
    specs: list[Path],
    seeds: int | None = None,
    root: Path = runs.DEFAULT_ROOT,
    out: Path | None = None,
    reuse: bool = True,
    reporter_factory: ReporterFactory | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) every entry of `specs` with each of its seeds and compare them; returns compare.json.

    `seeds`: per entry (default: each comparison file's `seeds:`, else 3). `reuse=False` retrains finished runs,
    moving the old folder aside to <folder>.old-<stamp>. `overrides` (`--set` strings) apply to every entry.
    """
    started = time.perf_counter()
    entries = load_specs(specs, seeds, overrides)
    out_dir = Path(out) if out is not None else _new_dir(root, f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(e.seeds) for e in entries)
    results, done = [], 0
    for entry in entries:
        summaries, dirs, reused = [], [], []
        for seed in entry.seeds:
            done += 1
            cfg = entry.config(seed)
            run_dir = Path(root) / "compare" / f"{entry.name}-{config_hash(cfg)}-s{seed}"
            reporter = reporter_factory(f"{entry.name} seed {seed} ({done}/{total})") if reporter_factory else None
            summary, was_reused = _train_or_reuse(cfg, run_dir, reuse, reporter)
            summaries.append(summary)
            dirs.append(str(run_dir))
            reused.append(was_reused)
        results.append(_entry_result(entry, cfg, summaries, dirs, reused))
    pairs = [welch(a["name"], a["test_accuracy"]["values"], b["name"], b["test_accuracy"]["values"])
             for a, b in combinations(results, 2)]  # fmt: skip
    result: dict[str, Any] = {
        "specs": [str(s) for s in specs],
        "entries": results,
        "pairs": pairs,
        "std": "sample standard deviation over seeds (ddof=1); null with one seed",
        "noise_rule": f"a difference exceeds the noise when |Welch t| > {NOISE_STANDARD_ERRORS:g} "
        "(more than 2 standard errors of the difference)",
        "test_set": "reported, never used to choose anything: every checkpoint was picked on validation",
        "seconds": round(time.perf_counter() - started, 2),
    }
    plots.save_comparison([e["name"] for e in results], [e["test_accuracy"]["values"] for e in results],
                          out_dir / "compare.png", params=[e["params"] for e in results],
                          title=f"{', '.join(e['name'] for e in results)} ({out_dir.name})")  # fmt: skip
    atomic_write_bytes(out_dir / "compare.json", (json.dumps(result, indent=2) + "\n").encode())
    (out_dir / "compare.md").write_text(compare_markdown(result))
    return {"compare_dir": str(out_dir), **result}


def _new_dir(root: Path, base: str) -> Path:
    Path(root).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = Path(root) / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise DataError(f"{root}: could not create a new folder named {base}-N")


def _train_or_reuse(cfg: Config, run_dir: Path, reuse: bool, reporter: Reporter | None) -> tuple[dict[str, Any], bool]:
    if (run_dir / "summary.json").is_file():
        if reuse:
            return _finished_summary(cfg, run_dir), True
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    elif (run_dir / LAST).is_file() and reuse:
        # Interrupted earlier (same config, same seed): continue from its last epoch rather than start over.
        return runs.train_run(cfg, resume=run_dir, reporter=reporter), False
    elif run_dir.exists():
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    return runs.train_run(cfg, out=run_dir, reporter=reporter, point_latest_link=False), False


def _finished_summary(cfg: Config, run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
        saved = config.load(run_dir / "config.yaml")
    except (OSError, ValueError, ConfigError) as e:
        raise DataError(f"{run_dir}: cannot reuse this run ({e}); delete the folder to train it again") from None
    if config.to_dict(saved) != config.to_dict(cfg) or "test_accuracy" not in summary:
        raise DataError(f"{run_dir}: holds a different or unfinished run; delete the folder to train it again")
    return summary


def stats(values: list[float]) -> dict[str, Any]:
    """mean, sample std (None with one value), min, max and the values themselves."""
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _entry_result(entry: Entry, cfg: Config, summaries: list[dict], dirs: list[str], reused: list[bool]) -> dict:
    return {
        "name": entry.name,
        "source": str(entry.source),
        "base": str(entry.base) if entry.base else None,
        "overrides": entry.overrides,
        "model": cfg.model.name,
        "params": summaries[0]["params"],
        "config_hash": config_hash(cfg),
        "n_seeds": len(summaries),
        "seeds": entry.seeds,
        "test_accuracy": stats([s["test_accuracy"] for s in summaries]),
        # None when a run had no validation (data.val_fraction 0)
        "val_accuracy": None if any(s["val_accuracy"] is None for s in summaries) else
        stats([s["val_accuracy"] for s in summaries]),
        "train_seconds_mean": statistics.mean(s["train_seconds"] for s in summaries),
        "run_dirs": dirs,
        "reused": reused,
    }


def welch(name_a: str, a: list[float], name_b: str, b: list[float]) -> dict[str, Any]:
    """Welch's t-test of mean(a) - mean(b) and a plain-language verdict (the 2-standard-error rule)."""
    from scipy import stats

    diff = statistics.mean(a) - statistics.mean(b)
    out: dict[str, Any] = {"a": name_a, "b": name_b, "difference": diff, "standard_error": None, "welch_t": None,
                           "welch_df": None, "p_value": None, "exceeds_noise": None}  # fmt: skip
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = "cannot tell, one seed"
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    higher, lower = (name_a, name_b) if diff > 0 else (name_b, name_a)
    points = f"{100 * abs(diff):.2f} points"
    if se == 0:
        out.update(standard_error=0.0, exceeds_noise=diff != 0)
        out["verdict"] = (f"{higher} higher by {points} in every seed alike: exceeds the (zero) seed noise"
                          if diff else "identical in every seed")  # fmt: skip
        return out
    t = diff / se
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = float(2 * stats.t.sf(abs(t), df))
    exceeds = abs(t) > NOISE_STANDARD_ERRORS
    out.update(standard_error=se, welch_t=t, welch_df=df, p_value=p, exceeds_noise=exceeds)
    if exceeds:
        out["verdict"] = f"{higher} higher by {points}: exceeds the seed noise ({abs(t):.1f} standard errors)"
    else:
        out["verdict"] = (f"cannot tell apart: {points} ({higher} higher) is within {NOISE_STANDARD_ERRORS:g} "
                          f"standard errors ({100 * NOISE_STANDARD_ERRORS * se:.2f} points)")  # fmt: skip
    return out


def compare_markdown(result: dict[str, Any]) -> str:
    """compare.md: the entries table, the pairwise noise check and what the test column does not do."""

    def pct(s: dict[str, Any] | None) -> str:
        if s is None:
            return "none"
        return f"{100 * s['mean']:.2f}" + (f" +- {100 * s['std']:.2f}%" if s["std"] is not None else "% (one seed)")

    lines = [
        f"# Comparison: {', '.join(e['name'] for e in result['entries'])}",
        "",
        "Test accuracy is **reported, never used to choose anything**: every run's checkpoint was picked on its own "
        "validation split, and nothing here was tuned on the test set. Mean +- sample std (ddof=1) over n seeds.",
        "",
        "| entry | model | params | n seeds | test accuracy | test min - max | val accuracy | train s (mean) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["entries"]:
        t = e["test_accuracy"]
        lines.append(f"| {e['name']} | {e['model']} | {e['params']:,} | {e['n_seeds']} | {pct(t)} | "
                     f"{100 * t['min']:.2f} - {100 * t['max']:.2f} | {pct(e['val_accuracy'])} | "
                     f"{e['train_seconds_mean']:.1f} |")  # fmt: skip
    if result["pairs"]:
        lines += [
            "",
            "## Does the difference exceed the seed noise?",
            "",
            f"Welch's t on the per-seed test accuracies; a difference counts when |t| > {NOISE_STANDARD_ERRORS:g} "
            "(more than 2 standard errors). A rough rule: with 3 seeds per entry it is lenient (see p).",
            "",
            "| a | b | a - b (points) | t | df | p | verdict |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for p in result["pairs"]:
            num = [f"{p[k]:.2f}" if p[k] is not None else "-" for k in ("welch_t", "welch_df")]
            pv = f"{p['p_value']:.3f}" if p["p_value"] is not None else "-"
            lines.append(f"| {p['a']} | {p['b']} | {100 * p['difference']:+.2f} | {num[0]} | {num[1]} | {pv} | "
                         f"{p['verdict']} |")  # fmt: skip
    lines += ["", "Runs (reused when already finished):", ""]
    for e in result["entries"]:
        lines.append(f"- {e['name']}: " + ", ".join(f"`{d}`" for d in e["run_dirs"]))
    return "\n".join(lines) + "\n"
