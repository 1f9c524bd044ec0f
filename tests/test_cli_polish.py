"""The command line's finish: --help examples that parse, shell completion, progress with an ETA, a clean Ctrl-C
that leaves a resumable run, and multiprocessing that works under the spawn start method (Windows, macOS)."""

import ast
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digitkit import cli, completion

from .conftest import ROOT, make_idx_dir

DIGITKIT = str(Path(sys.executable).parent / "digitkit")  # the console script, as users run it


def example_lines(parser) -> list[tuple[str, str]]:
    out = []
    for path, p in completion.walk(parser).items():
        epilog = p.epilog or ""
        block = epilog.split("examples:\n", 1)[1] if "examples:\n" in epilog else ""
        out += [(path, line.strip()) for line in block.splitlines() if line.strip()]
    return out


def test_every_command_help_ends_with_examples_that_parse():
    parser = cli.build_parser()
    paths = completion.walk(parser)
    examples = example_lines(parser)
    assert len(paths) > 25
    for path, p in paths.items():
        help_text = p.format_help()
        assert "\nexamples:\n  digitkit " in help_text, f"`digitkit {path} --help` has no examples"
        assert help_text.rstrip().splitlines()[-1].startswith("  digitkit"), f"{path}: examples must come last"
        if path:  # each command's examples run that command
            assert any(line.startswith(f"digitkit {path}") for q, line in examples if q == path), path
    for path, line in examples:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "digitkit", line
        if argv[1:2] == ["completion"] and ">" in argv:
            argv = argv[: argv.index(">")]
        try:
            cli.build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"example of `digitkit {path}` does not parse: {line}")


def test_version_and_help_from_the_console_script():
    done = subprocess.run([DIGITKIT, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("digitkit ")
    done = subprocess.run([DIGITKIT, "evaluate", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "examples:\n  digitkit evaluate runs/latest" in done.stdout


def bash_complete(script: Path, words: list[str], cwd: Path) -> list[str]:
    """COMPREPLY of the generated completion function for the command line `words` (the last one is partial)."""
    line = " ".join(shlex.quote(w) for w in words)
    program = (f"source {shlex.quote(str(script))}\nCOMP_WORDS=({line})\nCOMP_CWORD={len(words) - 1}\n"
               "_digitkit\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")  # fmt: skip
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                          cwd=cwd, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completion_in_a_real_bash(tmp_path, capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "digitkit.bash"
    script.write_text(capsys.readouterr().out)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text("seed: 0\n")
    assert bash_complete(script, ["digitkit", "ev"], tmp_path) == ["evaluate"]
    assert set(bash_complete(script, ["digitkit", "e"], tmp_path)) == {"evaluate", "explain", "ensemble", "export"}
    assert bash_complete(script, ["digitkit", "train", "--con"], tmp_path) == ["--config"]
    assert bash_complete(script, ["digitkit", "data", "pre"], tmp_path) == ["preview"]
    assert bash_complete(script, ["digitkit", "data", "preview", "--per"], tmp_path) == ["--per-class"]
    # values: choices, and file names for paths; an option's value is not taken for a subcommand
    assert bash_complete(script, ["digitkit", "evaluate", "--split", ""], tmp_path) == ["test", "val"]
    assert bash_complete(script, ["digitkit", "train", "--config", "configs/t"], tmp_path) == ["configs/tiny.yaml"]
    assert bash_complete(script, ["digitkit", "predict", "--model", "data", "--js"], tmp_path) == ["--json"]
    assert bash_complete(script, ["digitkit", "completion", "f"], tmp_path) == ["fish"]


def test_zsh_and_fish_scripts_cover_every_command(capsys):
    assert cli.main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert "bashcompinit" in zsh and "complete -F _digitkit digitkit" in zsh
    assert cli.main(["completion", "fish"]) == 0
    fish = capsys.readouterr().out
    for path, p in completion.walk(cli.build_parser()).items():
        for name in completion.subparsers(p):
            assert f"-n '__digitkit_at \\'{path}\\'' -a {name} " in fish, (path, name)
    assert "-n '__digitkit_at \\'evaluate\\'' -l split -x -a 'test val'" in fish
    assert "-n '__digitkit_at \\'train\\'' -l config -r -F" in fish


# ---------------------------------------------------------------------------------------------- progress
def test_the_bar_and_the_epoch_lines_show_the_whole_runs_eta():
    stream = io.StringIO()
    rep = cli.ConsoleReporter(stream=stream, bar=True)
    rows = []
    for epoch in (3, 4, 5):  # a run resumed at epoch 3 of 5
        rep.epoch_start(epoch, 5, 10)
        if epoch == 3:
            assert (rep.bar.total, rep.bar.n) == (50, 20)  # the bar spans the run, not the epoch
        rep.batch(10, 0.5, 0.9, 1000.0)
        time.sleep(0.02)
        row = {"epoch": epoch, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.4, "val_acc": 0.91, "lr": 1e-3,
               "seconds": 0.02, "images_per_s": 1000.0}  # fmt: skip
        rows.append(row)
        rep.epoch_end(row)
    assert rep.bar is None  # closed after the last epoch
    lines = [line for line in stream.getvalue().replace("\r", "\n").splitlines() if " train loss " in line]
    assert len(lines) == 3
    assert "ETA 0:00" in lines[0] and "ETA" in lines[1] and "ETA" not in lines[2]


def test_a_command_clock_counts_every_run_and_skips_reused_ones():
    clock = cli.CommandClock()
    clock.started -= 10  # 10 s so far
    clock.update("cnn1 seed 0 (3/4)", 1, 2)  # runs 1 and 2 were reused: they never report
    assert clock.eta() == pytest.approx(10 * (1 + 2), rel=0.05)  # this run's last epoch and run 4's two
    cv = cli.CommandClock(extra_runs=1)  # cv with --final
    cv.started -= 4
    cv.update("fold 1/3", 1, 2)
    assert cv.eta() == pytest.approx(4 * (1 + 2 * 2 + 2), rel=0.05)
    assert cli.CommandClock().eta() is None


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_train_says_how_to_resume_and_resume_finishes(tmp_path):
    data = make_idx_dir(tmp_path / "data", num_classes=4, n_train=1500, n_test=40)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    argv = [DIGITKIT, "train", "--data-dir", str(data), "--out", str(run), "--set", "model.name=cnn1",
            "--set", "train.epochs=4", "--set", "train.batch_size=16", "--set", "train.threads=1"]  # fmt: skip
    # A shell's background jobs (nohup ... &, CI runners) start with SIGINT ignored, and a child inherits that:
    # Python then installs no KeyboardInterrupt handler and Ctrl-C is ignored, as the user asked. Here the child
    # gets the terminal's default, as when a user runs digitkit in the foreground.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        first = proc.stderr.readline()
        assert first.startswith("epoch   1 "), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"{run} holds epoch 1 of 4" in err or f"{run} holds epoch 2 of 4" in err, err
    assert f"  digitkit train --resume {run}\n" in err
    assert not (run / "summary.json").exists()
    done = subprocess.run([DIGITKIT, "train", "--resume", str(run), "--json"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (run / "summary.json").is_file() and '"epochs": 4' in done.stdout


def test_ctrl_c_before_the_first_epoch_says_there_is_nothing_to_resume(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    cli.interrupted_run(tmp_path / "run", 8)
    cli.interrupted_run(None, 8)
    err = capsys.readouterr().err
    assert err.count("interrupted before the first epoch finished") == 2
    assert f"({tmp_path / 'run'} has no finished epoch): nothing to resume" in err and "--resume" not in err


def test_new_run_folder_finds_the_folder_train_made(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "old").mkdir()
    before = set(root.iterdir())
    (root / "20250101-000000-mlp").mkdir()
    assert cli.new_run_folder(root, before) == root / "20250101-000000-mlp"
    assert cli.new_run_folder(tmp_path / "none", set()) is None


# ---------------------------------------------------------------------------------------------- spawn safety
def multiprocessing_calls(tree: ast.AST) -> list[ast.Call]:
    names = ("ProcessPoolExecutor", "Pool", "Process", "get_context", "set_start_method")
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "attr", getattr(n.func, "id", None)) in names]  # fmt: skip


def test_every_multiprocessing_use_is_spawn_safe():
    """Explicit spawn contexts (no fork: the same code on Linux, macOS and Windows), and a __main__ guard in every
    script, so a spawned child that re-imports the main module does not run it again."""
    checked = 0
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        assert "os.fork(" not in source, path
        for call in multiprocessing_calls(tree):
            name = getattr(call.func, "attr", getattr(call.func, "id", None))
            if name in ("get_context", "set_start_method"):
                assert call.args and getattr(call.args[0], "value", None) == "spawn", f"{path}:{call.lineno}"
            else:
                kw = {k.arg for k in call.keywords}
                assert "mp_context" in kw or "context" in kw or name == "Process", f"{path}:{call.lineno}: {name} " \
                    "without an explicit spawn context"
            checked += 1
        if path.parent.name == "benchmarks" or path.name == "__main__.py":
            assert 'if __name__ == "__main__":' in source, f"{path}: no __main__ guard"
    assert checked >= 2  # cv's pool and its context at least


def test_parallel_cv_under_the_spawn_start_method(tmp_path):
    """`digitkit cv --workers 2` from a guarded script with spawn forced as the default start method, as on Windows
    and macOS: the workers re-import the main module and must find only definitions there."""
    data = make_idx_dir(tmp_path / "data", num_classes=3, n_train=120, n_test=15)
    out = tmp_path / "cv"
    argv = ["cv", "--data-dir", str(data), "--folds", "2", "--workers", "2", "--out", str(out), "--quiet",
            "--set", "model.name=mlp", "--set", "train.epochs=1", "--set", "train.batch_size=8"]  # fmt: skip
    script = tmp_path / "user_script.py"
    script.write_text(
        "import multiprocessing\n"
        "import sys\n\n"
        "from digitkit.cli import main\n\n"
        "if __name__ == '__main__':\n"
        "    multiprocessing.set_start_method('spawn', force=True)\n"
        f"    sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2-fold cross-validation" in done.stdout and (out / "fold-2" / "summary.json").is_file()


def test_evaluate_shows_progress_weighted_by_work(capsys, tmp_path, tiny_dir):
    from digitkit.evaluate import EvalOptions, work_plan

    plan = work_plan(10_000, EvalOptions(adversarial_n=500), sigma=0.0, samples=8)
    assert len(plan) == 1 + 1 + 15 + 1
    assert plan["attacks"] > sum(v for k, v in plan.items() if k != "attacks")  # the attacks dominate, as measured
    run = tmp_path / "run"
    assert cli.main(["train", "--data-dir", str(tiny_dir), "--out", str(run), "--set", "model.name=mlp",
                     "--set", "train.epochs=1", "--set", "train.batch_size=32", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli.main(["evaluate", str(run), "--no-adversarial", "--progress"]) == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "evaluate: clean" in err and "evaluate: corruption zigzag" in err
    assert re.search(r"evaluate: .*\[\d+:\d+<\d+:\d+\]", err)  # elapsed < remaining
