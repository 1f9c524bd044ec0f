"""`digitkit evaluate`, the report and `digitkit augment check`, on a tiny run trained on synthetic bars."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from digitkit import augment, config, data, legibility, runs
from digitkit.cli import main
from digitkit.evaluate import EvalOptions, evaluate_model, predict_probs, rejection_curve

from .conftest import MNIST_DIR, make_idx_dir


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    folder = make_idx_dir(root / "tiny", num_classes=4, n_train=320, n_test=120,
                          class_names=["up", "right", "down", "left"])  # fmt: skip
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn1", "train.epochs=3", "train.batch_size=32",
                             "augment.recipe=none"])  # fmt: skip
    summary = runs.train_run(cfg, out=root / "run")
    assert summary["test_accuracy"] > 0.9
    return root / "run"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


QUICK = ("--adversarial-n", "60")


def test_evaluate_writes_every_artefact_and_agrees_with_the_run(tiny_run, capsys):
    code, out, err = run_cli(capsys, "evaluate", tiny_run, "--json", *QUICK)
    assert code == 0, err
    r = json.loads(out)
    summary = json.loads((tiny_run / "summary.json").read_text())
    # Same checkpoint, same data: the evaluation's accuracy is the run's test accuracy.
    assert r["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert r["n"] == 120 and r["split"] == "test"
    ev = tiny_run / "eval" / "test"
    for name in ("metrics.json", "per_class.csv", "confusion_counts.csv", "confusion_percent.csv", "confusion.png",
                 "errors.csv", "reliability.png", "robustness.png", "robustness.csv", "adversarial.png",
                 "report.md", "report.html"):  # fmt: skip
        assert (ev / name).is_file(), name
    with open(ev / "confusion_counts.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["up", "right", "down", "left"]
    counts = torch.tensor([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == 120 and int(counts.trace()) == round(r["accuracy"] * 120)
    with open(ev / "errors.csv") as f:
        assert len(list(csv.reader(f))) - 1 == r["errors"]
    assert [c["class"] for c in r["per_class"]] == ["up", "right", "down", "left"]
    # Robustness: clean, the augmented copy and all 15 corruptions; the clean entry is the accuracy.
    from digitkit.corruptions import CORRUPTIONS

    assert set(r["robustness"]) == {"clean", "augmented", *CORRUPTIONS}
    assert r["robustness"]["clean"] == r["accuracy"]
    adv = r["adversarial"]
    assert adv["epsilons"][0] == 0.0 and adv["n"] == 60
    for name, accs in adv["curves"].items():
        if "defence" not in name:
            assert accs[0] == pytest.approx(adv["clean_accuracy"]), name
    assert any("defence" in name for name in adv["curves"])  # with and without the noise defence
    assert r["diagnosis"]["verdict"] in ("overfitting", "underfitting", "still-improving", "converged")


def test_report_html_is_self_contained_and_matches_markdown(tiny_run, capsys):
    assert run_cli(capsys, "evaluate", tiny_run, "--quick")[0] == 0
    ev = tiny_run / "eval" / "test"
    page = (ev / "report.html").read_text()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    assert "<link" not in page and "http" not in page
    md = (ev / "report.md").read_text()
    acc = json.loads((ev / "metrics.json").read_text())["accuracy"]
    assert f"{100 * acc:.2f}%" in md and f"{100 * acc:.2f}%" in page
    assert "## Per class" in md and "<h2>Per class</h2>" in page


def test_evaluate_val_split_is_the_runs_own_holdout(tiny_run, capsys):
    code, out, _ = run_cli(capsys, "evaluate", tiny_run, "--split", "val", "--quick", "--json")
    r = json.loads(out)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert code == 0 and r["n"] == 32  # 10% of 320, stratified
    assert r["accuracy"] == pytest.approx(summary["val_accuracy"])
    assert (tiny_run / "eval" / "val" / "report.html").is_file()


def test_evaluate_accepts_a_checkpoint_file_and_rejects_anything_else(tiny_run, tmp_path, capsys):
    ckpt = next(tiny_run.glob("best-*.pt"))
    code, out, _ = run_cli(capsys, "evaluate", ckpt, "--quick", "--json", "--out", tmp_path / "e")
    assert code == 0 and json.loads(out)["checkpoint"] == ckpt.name
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for bad, message in ((tmp_path / "junk.pt", "not a loadable digitkit checkpoint"),
                         (tmp_path, "no best-*.pt or final-*.pt checkpoint"),
                         (tmp_path / "missing", "no such checkpoint or run folder")):  # fmt: skip
        code, _, err = run_cli(capsys, "evaluate", bad, "--quick")
        assert code == 2 and message in err and "Traceback" not in err


def test_evaluate_refuses_data_the_model_was_not_built_for(tiny_run, tmp_path, capsys):
    other = make_idx_dir(tmp_path / "six", num_classes=6)
    code, _, err = run_cli(capsys, "evaluate", tiny_run, "--quick", "--data-dir", other)
    assert code == 2 and "expects 4 classes" in err and "--data-dir" in err


def test_noise_defence_in_the_config_changes_answers_deterministically(tiny_run):
    opened = runs.open_model(tiny_run)
    test = data.load_split(opened.cfg.data.dir, "test")
    a = predict_probs(opened.model, test.images, noise_sigma=0.3, noise_samples=4, seed=1)
    b = predict_probs(opened.model, test.images, noise_sigma=0.3, noise_samples=4, seed=1)
    plain = predict_probs(opened.model, test.images)
    assert torch.equal(a, b) and not torch.allclose(a, plain)
    cfg = config.load(None, ["inference.noise_defence_sigma=0.3", "inference.noise_defence_samples=4"])
    ev = evaluate_model(opened.model, test.images, test.labels, test.classes,
                        EvalOptions(corruptions=False, augmented=False, adversarial=False), inference=cfg.inference)
    assert ev.results["noise_defence_sigma"] == 0.3
    assert torch.allclose(ev.probs, predict_probs(opened.model, test.images, 0.3, 4, seed=0))


def test_rejection_curve_counts():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.55, 0.45], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])  # second is wrong at 0.6 confidence
    rows = {r["threshold"]: r for r in rejection_curve(probs, labels, (0.0, 0.58, 0.85))}
    assert rows[0.0]["coverage"] == 1.0 and rows[0.0]["errors_answered"] == 1
    assert rows[0.58] == {"threshold": 0.58, "coverage": 0.75, "accuracy_answered": 2 / 3, "errors_answered": 1,
                          "errors_rejected": 0, "correct_rejected": 1}  # fmt: skip
    assert rows[0.85]["coverage"] == 0.25 and rows[0.85]["errors_rejected"] == 1


def test_mnist_test_slices_are_the_two_writer_populations():
    cfg = config.load(None, [f"data.dir={MNIST_DIR}"])
    ds, slices = runs.evaluation_data(cfg, "test")
    assert len(ds) == 10_000 and list(slices) == list(runs.MNIST_TEST_SLICES)
    first, last = slices.values()
    assert first.tolist() == list(range(5000)) and last.tolist() == list(range(5000, 10_000))


def test_scaled_op_scales_distance_from_identity():
    rot = augment.Rotation(p=0.3, degrees=20.0)
    assert legibility.scaled_op(rot, 2.0).degrees == 40.0 and legibility.scaled_op(rot, 2.0).p == 1.0
    sc = legibility.scaled_op(augment.Scale(p=0.5, min=0.9, max=1.2), 0.5)
    assert sc.min == pytest.approx(0.95) and sc.max == pytest.approx(1.1)
    assert legibility.scaled_op(augment.Stroke(p=0.5, max_radius=1), 2.0).max_radius == 2
    blur = legibility.scaled_op(augment.Blur(p=0.2, sigma_min=0.4, sigma_max=1.0), 2.0)
    assert (blur.sigma_min, blur.sigma_max) == pytest.approx((0.8, 2.0))
    low = legibility.scaled_op(augment.LowRes(p=0.2, min_size=12, max_size=20), 2.0)
    assert (low.min_size, low.max_size) == (2, 12)  # 28 - 2 * (28 - 20) = 12; 28 - 2 * 16 clamps at 2
    contrast = legibility.scaled_op(augment.Contrast(p=1, gamma_min=0.5, gamma_max=2.0), 2.0)
    assert contrast.gamma_min == pytest.approx(0.25) and contrast.gamma_max == pytest.approx(4.0)


def test_augment_check_warns_where_legibility_collapses(tiny_run, capsys):
    # The classes are bar orientations 45 degrees apart: rotating by up to 50 (2x: 100) degrees turns one class
    # into another, while a 1-pixel shift keeps them legible.
    recipe = Path(tiny_run).parent / "rot.yaml"
    recipe.write_text("rotation: {p: 0.5, degrees: 50}\ntranslate: {p: 0.5, pixels: 1}\n")
    # 32 validation images: one image is 3 points, so warn only beyond 10 points.
    code, out, err = run_cli(capsys, "augment", "check", "--recipe", recipe, "--model", tiny_run, "--json",
                             "--warn-drop", "10")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    warned = {w.split(" ")[0] for w in r["warnings"]}
    assert "rotation" in warned and "translate" not in warned
    rot = [x["accuracy"] for x in r["rows"] if x["op"] == "rotation"]
    assert rot[-1] < rot[0]  # stronger rotation, fewer digits still legible
    code, out, _ = run_cli(capsys, "augment", "check", "--recipe", recipe, "--model", tiny_run, "--warn-drop", "10")
    assert code == 0 and "warning: rotation" in out


def test_augment_preview_shows_the_training_batch(tiny_run, tmp_path, capsys):
    from PIL import Image

    cfg_path = tiny_run / "config.yaml"
    code, out, err = run_cli(capsys, "augment", "preview", "--config", cfg_path, "--out", tmp_path / "b.png",
                             "--n", "2", "--copies", "4")  # fmt: skip
    assert code == 0, err
    assert "first 8 images of epoch 1's first batch" in out
    assert Image.open(tmp_path / "b.png").size[0] > 4 * 28


def test_explain_by_index_writes_the_overlay_and_names_the_prediction(tiny_run, tmp_path, capsys):
    from PIL import Image

    code, out, err = run_cli(capsys, "explain", tiny_run, "--index", "3", "--json", "--out", tmp_path / "x.png")
    assert code == 0, err
    r = json.loads(out)
    test = data.load_split(runs.open_model(tiny_run).cfg.data.dir, "test")
    assert r["true"] == test.classes[int(test.labels[3])] and r["predicted"] in test.classes
    assert r["methods"] == ["saliency", "smoothgrad", "integrated-gradients", "gradcam"]
    assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    w, h = Image.open(tmp_path / "x.png").size
    assert w > 4 * h  # one row: input, then map and overlay per method
    code, _, err = run_cli(capsys, "explain", tiny_run)
    assert code == 2 and "exactly one of --image FILE or --index N" in err
    code, _, err = run_cli(capsys, "explain", tiny_run, "--index", "999")
    assert code == 2 and "--index 999: expected 0..119" in err


def test_explain_gradcam_needs_spatial_features(tmp_path, capsys):
    folder = make_idx_dir(tmp_path / "tiny", num_classes=4)
    cfg = config.load(None, [f"data.dir={folder}", "model.name=mlp", "train.epochs=1", "augment.recipe=none"])
    runs.train_run(cfg, out=tmp_path / "mlp")
    code, _, err = run_cli(capsys, "explain", tmp_path / "mlp", "--index", "0", "--method", "gradcam")
    assert code == 2 and "gradcam needs spatial feature maps" in err and "'mlp'" in err
    code, out, _ = run_cli(capsys, "explain", tmp_path / "mlp", "--index", "0", "--json")
    assert code == 0 and "gradcam" not in json.loads(out)["methods"]


def test_cv_and_compare_commands(tmp_path, capsys):
    folder = make_idx_dir(tmp_path / "tiny", num_classes=4)
    sets = ["--set", "model.name=cnn1", "--set", "train.epochs=1", "--set", "augment.recipe=none"]
    code, out, err = run_cli(capsys, "cv", "--folds", "3", "--data-dir", folder, *sets, "--out", tmp_path / "cv",
                             "--quiet", "--json")  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["k"] == 3 and len(r["folds"]) == 3 and (tmp_path / "cv" / "cv.md").is_file()
    code, out, _ = run_cli(capsys, "cv", "--folds", "1", "--data-dir", folder)
    assert code == 2
    spec = tmp_path / "a.yaml"
    spec.write_text("model: {name: cnn1}\naugment: {recipe: none}\ntrain: {epochs: 1}\n")
    code, out, err = run_cli(capsys, "compare", spec, "--seeds", "2", "--data-dir", folder, "--runs-root",
                             tmp_path / "runs", "--out", tmp_path / "cmp", "--quiet")  # fmt: skip
    assert code == 0, err
    assert "cannot tell" in out or "| a |" in out or "a" in out
    assert (tmp_path / "cmp" / "compare.json").is_file() and (tmp_path / "cmp" / "compare.png").is_file()


def test_shift_moves_pixels_and_fills_zeros():
    from digitkit.evaluate import shift

    x = torch.arange(1, 17, dtype=torch.float32).reshape(1, 1, 4, 4)
    down_right = shift(x, 1, 1)
    assert torch.equal(down_right[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert down_right[0, 0, 0].abs().sum() == 0 and down_right[0, 0, :, 0].abs().sum() == 0
    assert torch.equal(shift(shift(x, 0, -2), 0, 2)[..., 2:], x[..., 2:])
    assert torch.equal(shift(x, 0, 0), x)
    with pytest.raises(ValueError, match="leaves nothing"):
        shift(x, 4, 0)


def test_shift_tta_is_the_mean_softmax_of_five_views():
    from digitkit.evaluate import predict_probs_shift_tta, shift

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))  # not shift-invariant
    images = (torch.rand(7, 1, 6, 6) * 255).to(torch.uint8)
    x = images.float() / 255
    views = [(0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)]
    with torch.no_grad():
        expected = sum(model(shift(x, dy, dx)).softmax(1) for dy, dx in views) / 5
    got = predict_probs_shift_tta(model, images, pixels=2, batch_size=3)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, predict_probs(model, images), atol=1e-3)  # the views do change the answer
    with pytest.raises(ValueError, match="at least 1 px"):
        predict_probs_shift_tta(model, images, pixels=0)
