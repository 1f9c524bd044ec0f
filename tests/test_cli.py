import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from digitkit import data
from digitkit.cli import main

from .conftest import ROOT


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_python_dash_m_and_console_script_entry_points():
    script = Path(sys.executable).parent / "digitkit"  # installed beside the interpreter running the tests
    for cmd in ([sys.executable, "-m", "digitkit", "--version"], [str(script), "--version"]):
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 0 and done.stdout.startswith("digitkit ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "nope.yaml"], "nope.yaml: config file not found"),
        (["train", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", "--set", "model.name=resnet9000"], "unknown model 'resnet9000'; registered models:"),
        (["train", "--set", "augment.recipe=wobbly"], "wobbly"),
        (["train", "--data-dir", "/nonexistent/mnist"], "data folder not found"),
        (["train", "--resume", "/nonexistent/run"], "no such run folder"),
        (["data", "info", "--data-dir", "/nonexistent"], "data folder not found"),
        (["augment", "preview", "--recipe", "wobbly", "--out", "x.png"], "wobbly"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("digitkit: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_data_leaves_no_run_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data-dir", str(tmp_path / "nope"), "--runs-root", str(tmp_path / "runs"))
    assert code == 2 and "data folder not found" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "digitkit", "train", "--set", "model.name=nope"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and "unknown model 'nope'" in done.stderr


def test_models_lists_every_model_with_counts(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"mlp", "cnn1", "cnn2", "cnn3", "lenet_like", "classic"} <= set(rows)
    assert rows["cnn1"]["params"] == 63082 and rows["cnn1"]["macs"] == 288512
    assert rows["crnn"]["task"] == "sequence" and rows["cnn1"]["task"] == "classify"
    code, out, _ = run_cli(capsys, "models")
    assert "classic" in out and "MACs/image" in out


def test_data_info_counts(capsys, tiny_dir):
    code, out, _ = run_cli(capsys, "data", "info", "--data-dir", str(tiny_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["classes"] == ["up", "right", "down", "left"]
    assert info["train"]["count"] == 240 and sum(info["train"]["per_class"].values()) == 240
    assert set(info["files"].values()) == {"ok (sha256)"}
    code, out, _ = run_cli(capsys, "data", "info", "--data-dir", str(tiny_dir))
    assert "train: 240 images of 1x28x28" in out


def test_data_preview_writes_a_grid_per_class(capsys, tmp_path, tiny_dir):
    out_png = tmp_path / "grid.png"
    code, out, _ = run_cli(capsys, "data", "preview", "--data-dir", str(tiny_dir), "--out", str(out_png),
                           "--per-class", "3")  # fmt: skip
    assert code == 0
    img = Image.open(out_png)
    assert img.width > 3 * 28 and img.height > 4 * 28


def test_augment_list_preview_and_expand(capsys, tmp_path, tiny_dir):
    code, out, _ = run_cli(capsys, "augment", "list")
    for name in ("none", "mild", "standard", "combinatorial", "erasing", "corruption"):
        assert name in out
    png = tmp_path / "aug.png"
    code, _, _ = run_cli(capsys, "augment", "preview", "--recipe", "combinatorial", "--out", str(png),
                         "--data-dir", str(tiny_dir), "--n", "4", "--copies", "5")  # fmt: skip
    assert code == 0 and Image.open(png).width > 6 * 28
    out_dir = tmp_path / "expanded"
    code, out, _ = run_cli(capsys, "augment", "expand", "--recipe", "standard", "--factor", "3", "--out",
                           str(out_dir), "--data-dir", str(tiny_dir))  # fmt: skip
    assert code == 0
    expanded = data.load_split(out_dir, "train")  # verified against the written SHA256SUMS.raw
    original = data.load_split(tiny_dir, "train")
    assert len(expanded) == 3 * len(original) and expanded.classes == original.classes
    assert (expanded.images[: len(original)] == original.images).all()
    assert (data.load_split(out_dir, "test").images == data.load_split(tiny_dir, "test").images).all()


def test_train_cli_end_to_end_json(capsys, tmp_path, tiny_dir):
    code, out, err = run_cli(capsys, "train", "--data-dir", str(tiny_dir), "--out", str(tmp_path / "run"),
                             "--set", "model.name=mlp", "--set", "train.epochs=2", "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == "mlp" and summary["epochs"] == 2
    assert "epoch   2" in err  # the one-line epoch summary
    code, out, err = run_cli(capsys, "train", "--data-dir", str(tiny_dir), "--out", str(tmp_path / "run2"),
                             "--set", "train.epochs=1", "--set", "model.name=cnn1", "--quiet")  # fmt: skip
    assert code == 0 and err == "" and "test" in out
