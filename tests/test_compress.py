"""Pruning and distillation: sparsity as asked, masks kept while fine-tuning, channels really removed, pruned and
distilled runs usable everywhere, the test set never choosing, and the distillation loss by hand."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from digitkit import checkpoint, compress, config, data, runs
from digitkit.cli import main
from digitkit.errors import ConfigError
from digitkit.models import count_macs, count_params, create_model

from .conftest import MNIST_DIR, make_idx_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny data folder and a cnn3_slim run trained on it (augmented, so fine-tuning augments too)."""
    root = tmp_path_factory.mktemp("compress")
    folder = make_idx_dir(root / "tiny", num_classes=4)
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn3_slim", "train.epochs=3", "augment.recipe=mild",
                             "train.lr=4e-3"])  # fmt: skip
    runs.train_run(cfg, out=root / "src")
    return folder, root / "src"


def _scrambled_test_copy(folder, dest):
    """The same training files, but test labels shuffled: anything chosen on the test set would change."""
    dest.mkdir()
    data.save_split(data.load_split(folder, "train"), dest, "train")
    test = data.load_split(folder, "test")
    labels = test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(5))]
    data.save_split(data.Dataset(test.images, (labels + 1) % test.num_classes, test.classes), dest, "test")
    if (folder / data.CLASSES_FILE).is_file():
        (dest / data.CLASSES_FILE).write_text((folder / data.CLASSES_FILE).read_text())
    data.write_sums(dest)
    return dest


def _state(run_dir):
    return checkpoint.load(checkpoint.resolve(run_dir))["state_dict"]


def test_unstructured_pruning_reaches_the_sparsity_and_fine_tuning_keeps_the_zeros(source, tmp_path):
    _, src = source
    s = compress.prune_run(src, compress.PruneOptions(0.7, finetune_epochs=2), tmp_path / "p70")
    assert s["prune"]["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    pruned = runs.open_model(tmp_path / "p70").model
    assert compress.weight_sparsity(pruned) == pytest.approx(0.7, abs=0.01)
    masks = compress.magnitude_masks(copy.deepcopy(runs.open_model(src).model), 0.7)  # deterministic: same masks
    params = dict(pruned.named_parameters())
    original = dict(runs.open_model(src).model.named_parameters())
    moved = 0
    for name, mask in masks.items():
        assert (params[name][mask == 0] == 0).all(), f"{name}: a pruned weight came back during fine-tuning"
        moved += int((params[name][mask == 1] != original[name][mask == 1]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in masks.values())  # the kept weights were fine-tuned
    assert s["prune"]["macs_after"] == s["prune"]["macs_before"]  # dense zeros: no compute saved
    assert s["prune"]["compute_saved"] is False
    stored = json.loads((tmp_path / "p70" / "summary.json").read_text())
    assert stored["pruned_from"] == str(runs.open_model(src).checkpoint_path)
    assert "test_accuracy" in stored and stored["prune"]["requested_sparsity"] == 0.7


def test_structured_pruning_removes_whole_channels_and_computes_the_same_function(source, tmp_path):
    _, src = source
    o = runs.open_model(src)
    keep = compress.kept_channels(o.model, 0.5)
    assert [len(k) for k in keep] == [8, 16, 32]  # cnn3_slim: 16, 32, 64 filters
    zeroed = compress.zero_channels(o.model, keep)
    for (_, conv, _, bn), k in zip(compress._conv_bn_pairs(zeroed), keep, strict=True):
        gone = sorted(set(range(conv.out_channels)) - set(k.tolist()))
        assert (conv.weight[gone] == 0).all() and (bn.weight[gone] == 0).all() and (bn.bias[gone] == 0).all()
        assert (conv.weight[k].flatten(1).abs().sum(1) > 0).all()
    small, args = compress.shrink(o.model, o.ckpt, keep)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(small(x), zeroed(x), atol=1e-5)
        assert not torch.allclose(o.model(x), zeroed(x), atol=1e-3)  # the removed channels did matter
    assert args["channels"] == [8, 16, 32]
    assert count_macs(small) < 0.35 * count_macs(o.model)

    s = compress.prune_run(src, compress.PruneOptions(0.5, structured=True, finetune_epochs=1), tmp_path / "s50")
    reopened = runs.open_model(tmp_path / "s50")  # loads as an ordinary, narrower model
    assert reopened.ckpt["model_args"]["channels"] == [8, 16, 32] and reopened.cfg.model.args["channels"] == [8, 16, 32]
    assert s["prune"]["macs_after"] < 0.35 * s["prune"]["macs_before"] and s["prune"]["compute_saved"]
    assert s["params"] < 0.5 * count_params(o.model)


def test_pruned_runs_work_with_predict_and_evaluate(source, tmp_path, capsys):
    folder, src = source
    out = tmp_path / "sweep"
    assert main(["prune", str(src), "--sparsity", "0.5,0.9", "--finetune-epochs", "1", "--out", str(out), "--quiet",
                 "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert [r["sparsity"] for r in result["rows"]] == [0.5, 0.9]
    assert [round(r["weight_sparsity"], 2) for r in result["rows"]] == [0.5, 0.9]
    assert (out / "prune.png").stat().st_size > 0 and "| 0.9 |" in (out / "prune.md").read_text()
    run = out / "sparsity-50"
    test = data.load_split(folder, "test")
    img = tmp_path / "digit.png"
    Image.fromarray(test.images[0, 0].numpy(), "L").save(img)
    assert main(["predict", "--model", str(run), str(img), "--json", "--reject-below", "0"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["digit"] in test.classes
    assert main(["evaluate", str(run), "--quick", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["accuracy"] == pytest.approx(json.loads((run / "summary.json").read_text())["test_accuracy"])


def test_the_test_set_never_chooses_a_pruned_or_distilled_checkpoint(source, tmp_path):
    folder, src = source
    scrambled = _scrambled_test_copy(folder, tmp_path / "scrambled")
    a = compress.prune_run(src, compress.PruneOptions(0.6, finetune_epochs=2), tmp_path / "a")
    b = compress.prune_run(src, compress.PruneOptions(0.6, finetune_epochs=2), tmp_path / "b", data_dir=str(scrambled))
    assert a["test_accuracy"] != b["test_accuracy"]  # the test files did differ ...
    assert a["best_epoch"] == b["best_epoch"] and a["val_accuracy"] == b["val_accuracy"]  # ... and chose nothing
    sa, sb = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    teacher_cfg = runs.open_model(src).cfg
    results = []
    for name, d in (("da", folder), ("db", scrambled)):
        cfg = compress.student_config(teacher_cfg, "cnn1", None, [f"data.dir={d}", "train.epochs=2"])
        results.append(compress.distill_run([src], cfg, compress.DistillOptions(), out=tmp_path / name))
    assert results[0]["test_accuracy"] != results[1]["test_accuracy"]
    assert results[0]["best_epoch"] == results[1]["best_epoch"]
    da, db = _state(tmp_path / "da"), _state(tmp_path / "db")
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_distillation_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64)
    teacher_logits = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 2, 3])
    t, alpha, ls = 3.0, 0.6, 0.1

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    s, z = logits.numpy(), teacher_logits.numpy()
    pt, ps = softmax(z / t), softmax(s / t)
    kl = float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())
    logp = np.log(softmax(s))
    smoothed = np.full((5, 4), ls / 4) + (1 - ls) * np.eye(4)[y.numpy()]
    ce = float(-(smoothed * logp).sum(1).mean())
    expected = alpha * t * t * kl + (1 - alpha) * ce
    p_teacher = compress.teacher_probs([lambda x: x], teacher_logits, t)  # an identity "model" returns the logits
    got = compress.distill_loss(logits, p_teacher, y, t, alpha, ls)
    assert got.item() == pytest.approx(expected, rel=1e-6)  # teacher probabilities are float32
    plain = F.cross_entropy(logits, y).item()
    assert compress.distill_loss(logits, p_teacher, y, t, 0.0).item() == pytest.approx(plain)
    same = compress.teacher_probs([lambda x: x], logits, t)
    assert compress.distill_loss(logits, same, y, t, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_ensemble_gives_the_mean_of_softened_probabilities():
    a, b = create_model("mlp", num_classes=4).eval(), create_model("cnn1", num_classes=4).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        expected = ((a(x) / 2).softmax(1) + (b(x) / 2).softmax(1)) / 2
    assert torch.allclose(compress.teacher_probs([a, b], x, 2.0), expected, atol=1e-6)


def test_distillation_refuses_mismatched_teachers(source, tmp_path):
    folder, src = source
    six = make_idx_dir(tmp_path / "six", num_classes=6)
    cfg6 = config.load(None, [f"data.dir={six}", "model.name=mlp", "train.epochs=1", "augment.recipe=none"])
    runs.train_run(cfg6, out=tmp_path / "six-run")
    student = compress.student_config(runs.open_model(src).cfg, "mlp", None, ["train.epochs=1"])
    with pytest.raises(ConfigError, match="classes"):
        compress.distill_run([src, tmp_path / "six-run"], student, compress.DistillOptions(), out=tmp_path / "x")
    with pytest.raises(ConfigError, match="classes"):  # a single teacher that reads other data than the student
        compress.distill_run([tmp_path / "six-run"], student, compress.DistillOptions(), out=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_distillation_feeds_teachers_images_prepared_as_they_were_trained(source, tmp_path):
    folder, src = source
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn1", "train.epochs=1", "preprocess.deskew=true",
                             "augment.recipe=none"])  # fmt: skip
    runs.train_run(cfg, out=tmp_path / "deskewed")
    deskewed_student = compress.student_config(runs.open_model(tmp_path / "deskewed").cfg, "mlp", None,
                                               ["train.epochs=1"])  # fmt: skip
    with pytest.raises(ConfigError, match="preprocess.deskew=false"):  # src read plain images
        compress.distill_run([src], deskewed_student, compress.DistillOptions(), out=tmp_path / "x")
    # A mix: the student reads plain images, and the deskewed teacher deskews its own copy.
    with pytest.raises(ConfigError, match="in a mix"):
        compress.distill_run([tmp_path / "deskewed", src], deskewed_student, compress.DistillOptions(),
                             out=tmp_path / "y")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    plain_student = compress.student_config(runs.open_model(src).cfg, "mlp", None, ["train.epochs=1"])
    summary = compress.distill_run([tmp_path / "deskewed", src], plain_student, compress.DistillOptions(),
                                   out=tmp_path / "z")  # fmt: skip
    assert summary["distill"]["teacher_test_accuracy"] is not None


def test_bad_options_are_one_line_errors(source, tmp_path, capsys):
    _, src = source
    for bad in ("0", "1.5", "a,b", ""):
        with pytest.raises(ConfigError):
            compress.parse_sparsities(bad)
    assert compress.parse_sparsities("0.5, 0.9") == [0.5, 0.9]
    with pytest.raises(ConfigError, match="alpha"):
        compress.DistillOptions(alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        compress.DistillOptions(temperature=0)
    folder = make_idx_dir(tmp_path / "tiny", num_classes=4)
    cfg = config.load(None, [f"data.dir={folder}", "model.name=lenet_like", "train.epochs=1", "augment.recipe=none"])
    runs.train_run(cfg, out=tmp_path / "lenet")
    code = main(["prune", str(tmp_path / "lenet"), "--sparsity", "0.5", "--structured", "--out", str(tmp_path / "o")])
    assert code == 2 and "channels" in capsys.readouterr().err


def test_a_distilled_student_does_at_least_as_well_as_the_same_student_alone(mnist_small_run, mnist_train):
    """Real digits: a cnn3_slim teacher (about 98%) and a small MLP student with 1,000 labelled images the teacher
    never saw, 4 epochs; measured on 3,000 other unseen training images (validation, not the test set)."""
    unseen = data.stratified_split(mnist_train.labels, 0.2, seed=0)[0]  # the fixture trained on the other 20%
    g = torch.Generator().manual_seed(1)
    pick = unseen[torch.randperm(len(unseen), generator=g)[:4000]]
    train, val = mnist_train.subset(pick[:1000]), mnist_train.subset(pick[1000:])
    base = [f"data.dir={MNIST_DIR}", "model.name=mlp", "model.args.hidden=[64]", "train.epochs=4",
            "train.batch_size=64", "augment.recipe=none", "train.label_smoothing=0.0", "train.lr=3e-3"]  # fmt: skip
    cfg = config.from_dict(config.apply_overrides({}, base))
    datasets = (train, val, None)
    plain = runs.train_run(cfg, out=mnist_small_run.parent / "plain-student", datasets=datasets)
    taught = compress.distill_run([mnist_small_run], cfg, compress.DistillOptions(), out=mnist_small_run.parent / "kd",
                                  datasets=datasets)  # fmt: skip
    assert taught["distill"]["teacher_test_accuracy"] is None and "test_accuracy" not in taught  # no test set given
    assert taught["val_accuracy"] >= plain["val_accuracy"] - 0.002, (taught["val_accuracy"], plain["val_accuracy"])
    assert math.isclose(taught["distill"]["params_ratio"], taught["params"] / taught["distill"]["teacher_params"])
