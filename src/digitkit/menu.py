"""`digitkit menu`: the common tasks as a terminal menu, for users who would rather not write YAML or flags.

Each action asks only what it needs, with defaults from the shipped configs, the registered models and the last
run; builds the argv the command line parses; prints it as "equivalent command: digitkit ..." and runs it through
`digitkit.cli.main` in this process, so the output, progress bars and errors are the command's own. prompt_toolkit
draws the questions (arrow keys and number keys, no mouse): a plain terminal, SSH and the Windows console all
work; with TERM=dumb the questions fall back to numbered lines read with input(). A bad answer is re-asked with
the reason; Ctrl-C in a question goes back to the menu, and Ctrl-C during a command stops that command.

The last run (and the last data folder and images) are remembered in menu.json under $DIGITKIT_STATE_DIR, else
the user's config folder (~/.config/digitkit, ~/Library/Application Support/digitkit, %APPDATA%\\digitkit).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from digitkit.errors import ConfigError, DigitkitError

STATE_ENV = "DIGITKIT_STATE_DIR"
DEFAULT_DATA = "data/mnist"
RUNS_ROOT = Path("runs")
CONFIGS = Path("configs")
OTHER = "\0other"  # the "type a path" option of a list; cannot be a real path
T = TypeVar("T")


class Back(Exception):
    """The user left a question (Ctrl-C, Ctrl-D, or the "back" option): return to the main menu."""


# ---------------------------------------------------------------------------------------------- state
def state_path() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV]) / "menu.json"
    if os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "digitkit" / "menu.json"


def load_state() -> dict[str, Any]:
    try:
        state = json.loads(state_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # first run, or a damaged file: start afresh rather than refuse to open the menu
    return state if isinstance(state, dict) else {}


def save_state(state: dict[str, Any]) -> None:
    path = state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        print(f"(could not remember the last run in {path}: {e}; set {STATE_ENV} to a writable folder)")


# ---------------------------------------------------------------------------------------------- questions
def _plain() -> bool:
    """No cursor control (TERM=dumb, e.g. an editor's shell buffer): numbered lines and input() instead."""
    return os.environ.get("TERM") == "dumb"


def choose(message: str, options: Sequence[tuple[T, str]], default: T | None = None) -> T:
    """One of `options` ((value, label) pairs): arrow keys or its number, then Enter."""
    if _plain():
        return _choose_plain(message, options, default)
    from prompt_toolkit.shortcuts import choice

    try:
        return choice(message=message, options=list(options), default=default)
    except (KeyboardInterrupt, EOFError):
        raise Back from None


def _choose_plain(message: str, options: Sequence[tuple[T, str]], default: T | None) -> T:
    values = [v for v, _ in options]
    start = values.index(default) + 1 if default in values else 1
    print(message)
    for i, (_, label) in enumerate(options, 1):
        print(f"  {i:2d}. {label}")

    def check(text: str) -> str | None:
        if text.isdigit() and 1 <= int(text) <= len(options):
            return None
        return f"{text!r}: type a number from 1 to {len(options)}"

    return values[int(ask("number", str(start), check)) - 1]


def ask(message: str, default: str = "", check: Callable[[str], str | None] | None = None,
        paths: bool = False) -> str:  # fmt: skip
    """A line of text; `check` returns what is wrong with an answer (it is then asked again) or None.
    `paths`: Tab completes file names."""
    if _plain():
        while True:
            try:
                text = input(f"{message} [{default}]: ").strip() or default
            except (KeyboardInterrupt, EOFError):
                raise Back from None
            problem = check(text) if check else None
            if problem is None:
                return text
            print(f"  {problem}")
    from prompt_toolkit import prompt
    from prompt_toolkit.completion import PathCompleter
    from prompt_toolkit.validation import ValidationError, Validator

    class Check(Validator):
        def validate(self, document: Any) -> None:
            problem = check(document.text.strip()) if check else None
            if problem:
                raise ValidationError(message=problem, cursor_position=len(document.text))

    try:
        return prompt(f"{message}: ", default=default, validator=Check(), validate_while_typing=False,
                      completer=PathCompleter(expanduser=True) if paths else None).strip()  # fmt: skip
    except (KeyboardInterrupt, EOFError):
        raise Back from None


def check_int(low: int, high: int) -> Callable[[str], str | None]:
    def check(text: str) -> str | None:
        if text.lstrip("-").isdigit() and low <= int(text) <= high:
            return None
        return f"{text!r}: expected a whole number from {low} to {high}"

    return check


def check_data_dir(text: str) -> str | None:
    from digitkit import data

    try:
        data.find_files(Path(text))
    except DigitkitError as e:
        return str(e)
    return None


def check_run(text: str) -> str | None:
    from digitkit import checkpoint

    if not text:
        return "give a run folder (runs/...) or a checkpoint file (.pt)"
    try:
        checkpoint.resolve(text)
    except DigitkitError as e:
        return str(e)
    return None


def check_png(text: str) -> str | None:
    if Path(text).suffix.lower() != ".png":
        return f"{text!r}: expected a file name ending in .png, e.g. previews/grid.png"
    if Path(text).is_dir():
        return f"{text}: is a folder; give a file name ending in .png"
    return None


def split_words(text: str) -> list[str]:
    """Paths or settings separated by spaces; quotes keep a path with spaces together."""
    return shlex.split(text, posix=os.name != "nt")


def check_settings(config_path: str | None, fixed: list[str]) -> Callable[[str], str | None]:
    """KEY=VALUE words that, with `fixed`, the config accepts."""

    def check(text: str) -> str | None:
        from digitkit import config

        try:
            words = split_words(text)
            bad = [w for w in words if "=" not in w]
            if bad:
                return f"{bad[0]!r}: expected KEY=VALUE, e.g. train.lr=3e-3 (Enter for none)"
            config.load(config_path, fixed + words)
        except ValueError as e:
            return f"{text!r}: {e}"
        except DigitkitError as e:
            return str(e)
        return None

    return check


def check_paths(text: str) -> str | None:
    try:
        words = split_words(text)
    except ValueError as e:
        return f"{text!r}: {e}"
    if not words:
        return "give at least one image file or folder"
    missing = [w for w in words if not Path(w).exists()]
    return f"{missing[0]}: no such file or folder" if missing else None


# ---------------------------------------------------------------------------------------------- helpers
def shown(path: str | Path) -> str:
    """A path as a user would type it here: relative to the current folder when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def command_line(argv: list[str]) -> str:
    quote = subprocess.list2cmdline if os.name == "nt" else shlex.join
    return "digitkit " + quote(argv)


def run_command(argv: list[str]) -> int:
    """Print the equivalent command, then run it as the command line would."""
    from digitkit import cli

    print(f"\nequivalent command: {command_line(argv)}", flush=True)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse refused the argv (it printed why)
        code = e.code if isinstance(e.code, int) else 2
    print(f"(finished with exit code {code})\n" if code else "", end="", flush=True)
    return code or 0


def shipped_configs() -> tuple[list[Path], list[Path]]:
    """(training configs, comparison files) in ./configs, sorted; a comparison file has `entries:`."""
    import yaml

    train, compare = [], []
    for p in sorted(CONFIGS.glob("*.yaml")) if CONFIGS.is_dir() else []:
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        (compare if isinstance(raw, dict) and "entries" in raw else train).append(p)
    return train, compare


def first_comment(path: Path) -> str:
    """The first comment line of a config: what it is for."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()[:70]
    except OSError:
        pass
    return ""


def recent_runs(limit: int = 6) -> list[Path]:
    """Run folders under ./runs (and ./runs/compare) with a kept checkpoint, newest first."""
    folders = [f for f in (RUNS_ROOT, RUNS_ROOT / "compare") if f.is_dir()]
    found = [p for f in folders for p in f.iterdir() if p.is_dir() and not p.is_symlink() and _has_checkpoint(p)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def _has_checkpoint(run_dir: Path) -> bool:
    return any(run_dir.glob("best-*.pt")) or any(run_dir.glob("final-*.pt"))


def describe_run(path: Path) -> str:
    try:
        s = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        return f"{s['model']}, test {100 * s['test_accuracy']:.2f}%"
    except (OSError, ValueError, KeyError, TypeError):
        return "unfinished" if (path / "last.pt").is_file() else "no summary"


def pick_config(message: str, configs: list[Path], default: str | None = None) -> str | None:
    """A training config path, or None for the built-in defaults."""
    options: list[tuple[str, str]] = [(str(p), f"{p}  {first_comment(p)}".rstrip()) for p in configs]
    options += [("", "built-in defaults (no config file)"), (OTHER, "another YAML file...")]
    default = default if default in {v for v, _ in options} else (options[0][0] if configs else "")
    picked = choose(message, options, default)
    if picked == OTHER:
        picked = ask("config file", "", check=_check_config, paths=True)
    return picked or None


def _check_config(text: str) -> str | None:
    from digitkit import config

    try:
        config.load(text)
    except DigitkitError as e:
        return str(e)
    return None


def pick_run(state: dict[str, Any], purpose: str) -> str:
    """A run folder or checkpoint: the last run, a recent one, or a typed path."""
    options: list[tuple[str, str]] = []
    last = state.get("last_run")
    if last and check_run(last) is None:
        options.append((shown(last), f"the last run: {shown(last)} ({describe_run(Path(last))})"))
    for p in recent_runs():
        if not any(Path(v).resolve() == p.resolve() for v, _ in options):
            options.append((shown(p), f"{shown(p)} ({describe_run(p)})"))
    if not options:
        print("No finished run found in ./runs; train one first (action 2), or type a run folder or checkpoint.")
        return ask("run folder or checkpoint file", "", check=check_run, paths=True)
    options.append((OTHER, "another run folder or checkpoint file..."))
    picked = choose(f"Which model {purpose}?", options)
    if picked == OTHER:
        picked = ask("run folder or checkpoint file", "", check=check_run, paths=True)
    return picked


def remember_run(state: dict[str, Any], run_dir: Path | str | None) -> None:
    if run_dir is not None:
        state["last_run"] = str(Path(run_dir).resolve())
        save_state(state)


# ---------------------------------------------------------------------------------------------- actions
def action_data(state: dict[str, Any]) -> None:
    from digitkit import augment

    what = choose("Look at what?", [
        ("preview", "a grid of training images, 10 per class (data preview)"),
        ("augment", "training images beside augmented copies, for a recipe (augment preview)"),
        ("batch", "the first training batch of a config, exactly as training draws it"),
        ("info", "counts per class and pixel statistics (data info)"),
        ("back", "back to the menu"),
    ])  # fmt: skip
    if what == "back":
        raise Back
    if what == "batch":
        cfg = pick_config("Which config?", shipped_configs()[0], "configs/default.yaml")
        if cfg is None:
            raise ConfigError("the batch preview needs a config file; pick one of configs/ or type a path")
        out = ask("write the picture to", f"previews/batch-{Path(cfg).stem}.png", check_png, paths=True)
        run_command(["augment", "preview", "--config", cfg, "--out", out])
        return
    data_dir = ask("data folder", state.get("data_dir", DEFAULT_DATA), check_data_dir, paths=True)
    state["data_dir"] = data_dir
    extra = ["--data-dir", data_dir] if data_dir != DEFAULT_DATA else []
    if what == "info":
        run_command(["data", "info", *extra])
    elif what == "preview":
        out = ask("write the picture to", "previews/data.png", check_png, paths=True)
        run_command(["data", "preview", "--out", out, *extra])
    else:
        recipes = augment.list_recipes()
        recipe = choose("Which augmentation recipe?", [(r, r) for r in recipes], "standard")
        out = ask("write the picture to", f"previews/augment-{recipe}.png", check_png, paths=True)
        run_command(["augment", "preview", "--recipe", recipe, "--out", out, *extra])


def action_train(state: dict[str, Any]) -> None:
    from digitkit import cli, config
    from digitkit.models import list_models, model_description

    last = state.get("last_run")
    if last and (Path(last) / "last.pt").is_file() and not (Path(last) / "summary.json").is_file():
        how = choose(f"{shown(last)} was interrupted. Continue it or start a new run?", [
            ("resume", f"continue {shown(last)} from its last finished epoch"),
            ("new", "start a new run"),
        ])  # fmt: skip
        if how == "resume":
            run_command(["train", "--resume", shown(last)])
            return
    cfg_path = pick_config("Which recipe (training config)?", shipped_configs()[0], "configs/default.yaml")
    cfg = config.load(cfg_path)
    models = list_models()
    model = choose("Which model?", [(m, f"{m:11s} {model_description(m)}") for m in models], cfg.model.name)
    data_dir = ask("data folder", state.get("data_dir", cfg.data.dir), check_data_dir, paths=True)
    epochs = ask("epochs", str(cfg.train.epochs), check_int(1, 10_000))
    argv = ["train"] + (["--config", cfg_path] if cfg_path else [])
    fixed = []
    if model != cfg.model.name:
        fixed.append(f"model.name={model}")
    if int(epochs) != cfg.train.epochs:
        fixed.append(f"train.epochs={epochs}")
    more = ask("other settings as KEY=VALUE, separated by spaces (Enter for none)", "",
               check_settings(cfg_path, fixed + [f"data.dir={data_dir}"]))  # fmt: skip
    for item in fixed + split_words(more):
        argv += ["--set", item]
    if data_dir != cfg.data.dir:
        argv += ["--data-dir", data_dir]
    state["data_dir"] = data_dir
    before = set(RUNS_ROOT.iterdir()) if RUNS_ROOT.is_dir() else set()
    run_command(argv)
    remember_run(state, cli.new_run_folder(RUNS_ROOT, before))


def action_compare(state: dict[str, Any]) -> None:
    import yaml

    train_configs, compare_files = shipped_configs()
    options = [(str(p), f"{p}  {first_comment(p)}".rstrip()) for p in compare_files]
    options.append((OTHER, "pick training configs to compare..."))
    picked = choose("Compare what?", options)
    if picked == OTHER:
        default = " ".join(str(p) for p in train_configs[:2])

        def check(text: str) -> str | None:
            words = split_words(text)
            if len(words) < 2:
                return "give at least two config files, separated by spaces"
            return next((p for p in map(_check_config, words) if p), None)

        specs = split_words(ask("configs to compare, separated by spaces", default, check, paths=True))
        seeds_default = "3"
    else:
        specs = [picked]
        seeds_default = str((yaml.safe_load(Path(picked).read_text(encoding="utf-8")) or {}).get("seeds", 3))
    seeds = ask("seeds per entry (the spread over seeds is the noise a difference must beat)", seeds_default,
                check_int(1, 100))  # fmt: skip
    data_dir = ask("data folder (Enter: each config's own)", "",
                   lambda t: check_data_dir(t) if t else None, paths=True)  # fmt: skip
    more = ask("other settings for every entry as KEY=VALUE (Enter for none)", "", check_settings(None, []))
    argv = ["compare", *specs, "--seeds", seeds]
    if data_dir:
        argv += ["--data-dir", data_dir]
    for item in split_words(more):
        argv += ["--set", item]
    run_command(argv)


def action_evaluate(state: dict[str, Any]) -> None:
    import webbrowser

    run = pick_run(state, "to evaluate")
    split = choose("On which images?", [
        ("test", "the sealed test set (reported, never used to choose anything)"),
        ("val", "the run's own validation hold-out"),
    ])  # fmt: skip
    depth = choose("How thorough?", [
        ("full", "full: errors, calibration, robustness to corruptions, attacks (about a minute on MNIST)"),
        ("quick", "quick: accuracy, errors and calibration only (seconds)"),
    ])  # fmt: skip
    code = run_command(["evaluate", run, "--split", split] + (["--quick"] if depth == "quick" else []))
    remember_run(state, run if Path(run).is_dir() else None)
    base = Path(run) if Path(run).is_dir() else Path(run).parent
    report = base / "eval" / split / "report.html"
    if code or not report.is_file():
        return
    if choose(f"Open the report ({shown(report)})?", [("open", "open it in a web browser"),
                                                      ("back", "back to the menu")]) == "open":  # fmt: skip
        if not webbrowser.open(report.resolve().as_uri()):
            print(f"No web browser found here (over SSH?). The report is one self-contained file: copy {report} "
                  "to a machine with a browser.")  # fmt: skip


def action_predict(state: dict[str, Any]) -> None:
    run = pick_run(state, "to read the images with")
    paths = ask("image files or folders, separated by spaces (quote a path with spaces)",
                state.get("predict_paths", ""), check_paths, paths=True)  # fmt: skip
    state["predict_paths"] = paths
    run_command(["predict", "--model", run, *split_words(paths)])


def action_serve(state: dict[str, Any]) -> None:
    run = pick_run(state, "to serve")
    port = ask("port", "8000", check_int(1, 65535))
    print(f"Open http://127.0.0.1:{port}/ in a browser to draw digits (over SSH: ssh -L {port}:127.0.0.1:{port} "
          "HOST, then the same address on your machine). Ctrl-C stops the server and brings the menu back.")
    run_command(["serve", "--model", run, "--port", port])


def action_export(state: dict[str, Any]) -> None:
    run = pick_run(state, "to export")
    kind = choose("Which precision?", [
        ("fp32", "float32: identical answers to PyTorch, for any runtime"),
        ("int8", "int8: smaller, calibrated on training images, checked against float32 on the test set"),
    ])  # fmt: skip
    run_command(["export", run, "--format", "onnx"] + (["--int8"] if kind == "int8" else []))


ACTIONS: list[tuple[str, str, Callable[[dict[str, Any]], None] | None]] = [
    ("data", "Look at the data and augmented samples", action_data),
    ("train", "Train a model", action_train),
    ("compare", "Compare recipes over seeds", action_compare),
    ("evaluate", "Evaluate a run and open its report", action_evaluate),
    ("predict", "Predict image files", action_predict),
    ("serve", "Start the drawing page (web server)", action_serve),
    ("export", "Export a model to ONNX", action_export),
    ("quit", "Quit", None),
]


def run() -> int:
    """The menu loop; returns the exit code of `digitkit menu`."""
    if not sys.stdin.isatty() or not sys.stdout.isatty():
        raise ConfigError("digitkit menu needs an interactive terminal; in scripts, run the commands it prints "
                          "(see digitkit --help)")  # fmt: skip
    state = load_state()
    print("digitkit menu: arrow keys or a number to pick, Enter to confirm, Ctrl-C to go back. "
          "Each action prints the digitkit command it runs.")  # fmt: skip
    actions = {key: func for key, _, func in ACTIONS}
    while True:
        last = state.get("last_run")
        title = "What would you like to do?" + (f"  (last run: {shown(last)})" if last else "")
        try:
            key = choose(title, [(key, label) for key, label, _ in ACTIONS])
        except Back:
            return 0
        func = actions[key]
        if func is None:
            return 0
        try:
            func(state)
        except Back:
            print("(back to the menu)")
        except DigitkitError as e:
            print(f"digitkit: error: {e}")
        save_state(state)
