"""`digitkit ensemble`: the mean of members' probabilities, weights from validation only."""

import json

import pytest
import torch

from digitkit import config, data, ensemble, runs
from digitkit.cli import main
from digitkit.errors import ConfigError
from digitkit.evaluate import accuracy, predict_probs, predict_probs_shift_tta

from .conftest import make_idx_dir


def train(folder, out, *overrides):
    """A 2-epoch cnn1 run without augmentation on `folder`, `overrides` applied; returns its folder."""
    cfg = config.load(None, [f"data.dir={folder}", "model.name=cnn1", "train.epochs=2", "augment.recipe=none",
                             *overrides])  # fmt: skip
    runs.train_run(cfg, out=out)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    folder = make_idx_dir(root / "tiny", num_classes=4)
    out = [train(folder, root / f"run{seed}", f"seed={seed}", f"model.name={model}")
           for seed, model in ((0, "cnn1"), (1, "mlp"))]  # fmt: skip
    return folder, out


def test_ensemble_is_the_weighted_mean_of_probabilities(two_runs):
    folder, paths = two_runs
    test = data.load_split(folder, "test")
    for weighting in ("equal", "val"):
        model, members = ensemble.build(paths, weighting)
        w = torch.tensor([m["weight"] for m in members])
        assert w.sum().item() == pytest.approx(1.0)
        if weighting == "val":
            val = torch.tensor([m["val_accuracy"] for m in members])
            assert torch.allclose(w, val / val.sum())
        each = [predict_probs(runs.open_model(p).model, test.images) for p in paths]
        expected = sum(wi * probs for wi, probs in zip(w, each, strict=True))
        assert torch.allclose(predict_probs(model, test.images), expected, atol=1e-5)


def test_ensemble_command_reports_members_and_the_ensemble(two_runs, tmp_path, capsys):
    _, paths = two_runs
    code = main(["ensemble", *map(str, paths), "--weights", "val", "--json", "--out", str(tmp_path / "e.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert len(r["members"]) == 2 and r["n"] == 80 and 0.0 <= r["accuracy"] <= 1.0
    assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == r["accuracy"]
    summaries = [json.loads((p / "summary.json").read_text()) for p in paths]
    assert [m["test_accuracy"] for m in r["members"]] == pytest.approx([s["test_accuracy"] for s in summaries])


def test_ensemble_refuses_mismatched_or_single_members(two_runs, tmp_path):
    _, paths = two_runs
    with pytest.raises(ConfigError, match="at least two runs"):
        ensemble.build(paths[:1])
    other = make_idx_dir(tmp_path / "six", num_classes=6)
    six = train(other, tmp_path / "six-run", "model.name=mlp", "train.epochs=1")
    with pytest.raises(ConfigError, match="classes"):
        ensemble.build([paths[0], six])
    with pytest.raises(ConfigError, match="weighting 'best'"):
        ensemble.build(paths, "best")


@pytest.fixture(scope="module")
def shared_split_runs(two_runs, tmp_path_factory):
    folder, _ = two_runs
    root = tmp_path_factory.mktemp("ens-shared")
    return folder, [train(folder, root / f"run{seed}", f"seed={seed}", "data.split_seed=5") for seed in (2, 3)]


def test_members_sharing_a_split_give_the_ensemble_a_validation_figure(shared_split_runs, two_runs, tmp_path,
                                                                      capsys):  # fmt: skip
    folder, paths = shared_split_runs
    code = main(["ensemble", *map(str, paths), "--json", "--out", str(tmp_path / "e.json")])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["shifts"] == 0
    cfg = runs.open_model(paths[0]).cfg
    val, _ = runs.evaluation_data(cfg, "val", folder)
    assert cfg.split_seed == 5 and len(val) == 24
    each = [predict_probs(runs.open_model(p).model, val.images) for p in paths]
    assert r["val_accuracy"] == accuracy(sum(each) / 2, val.labels)
    # The first fixture's members held out different images: no figure rather than a contaminated one.
    code = main(["ensemble", *map(str, two_runs[1]), "--json", "--out", str(tmp_path / "f.json")])
    assert code == 0 and json.loads(capsys.readouterr().out)["val_accuracy"] is None


def test_ensemble_with_shifts_averages_each_members_shifted_views(shared_split_runs, tmp_path, capsys):
    folder, paths = shared_split_runs
    assert main(["ensemble", *map(str, paths), "--shifts", "1", "--json", "--out", str(tmp_path / "e.json")]) == 0
    r = json.loads(capsys.readouterr().out)
    test = data.load_split(folder, "test")
    each = [predict_probs_shift_tta(runs.open_model(p).model, test.images, 1) for p in paths]
    assert r["shifts"] == 1 and r["accuracy"] == accuracy(sum(each) / 2, test.labels)
    assert [m["test_accuracy"] for m in r["members"]] == [accuracy(p, test.labels) for p in each]
    with pytest.raises(SystemExit):
        main(["ensemble", *map(str, paths), "--shifts", "0"])


@pytest.fixture(scope="module")
def mixed_runs(shared_split_runs, tmp_path_factory):
    """shared_split_runs' two plain members and one trained on deskewed digits, all on one split."""
    folder, plain = shared_split_runs
    root = tmp_path_factory.mktemp("ens-mixed")
    return folder, [*plain, train(folder, root / "deskewed", "seed=4", "data.split_seed=5", "preprocess.deskew=true")]


def test_a_deskewed_member_deskews_its_own_copy_in_a_mix(mixed_runs):
    folder, paths = mixed_runs
    model, members = ensemble.build(paths)
    assert not model.input_deskew and [m["deskew"] for m in members] == [False, False, True]
    assert isinstance(model.members[2], ensemble.Deskewed) and not isinstance(model.members[0], ensemble.Deskewed)
    test = data.load_split(folder, "test")
    own = runs.open_model(paths[2])
    own_test, _ = runs.evaluation_data(own.cfg, "test", folder)  # what the member was measured on
    assert not torch.equal(own_test.images, test.images)
    expected = predict_probs(own.model, own_test.images)
    for shifts in (0, 1):
        each = ensemble.member_probs(model, test.images, shifts)
        alone = expected if not shifts else predict_probs_shift_tta(own.model, own_test.images, 1)
        assert torch.equal(each[2], alone)  # exactly the member's own figures
        assert torch.equal(each[0], predict_probs(runs.open_model(paths[0]).model, test.images) if not shifts else
                           predict_probs_shift_tta(runs.open_model(paths[0]).model, test.images, 1))  # fmt: skip
    # The module itself (what predict and serve would call) deskews float input the same way.
    x = test.images.float() / 255
    with torch.no_grad():
        assert torch.allclose(model.members[2](x).softmax(1), expected, atol=1e-5)
        mean = ensemble.combine(ensemble.member_probs(model, test.images), model.weights.tolist())
        assert torch.allclose(model(x).exp(), mean, atol=1e-5)


def test_the_ensemble_command_reports_a_mix_with_each_members_own_figures(mixed_runs, tmp_path, capsys):
    folder, paths = mixed_runs
    assert main(["ensemble", *map(str, paths), "--json", "--out", str(tmp_path / "e.json")]) == 0
    r = json.loads(capsys.readouterr().out)
    for p, m in zip(paths, r["members"], strict=True):
        own = runs.open_model(p)
        val, _ = runs.evaluation_data(own.cfg, "val", folder)
        test, _ = runs.evaluation_data(own.cfg, "test", folder)
        assert m["val_accuracy_measured"] == accuracy(predict_probs(own.model, val.images), val.labels)
        assert m["test_accuracy"] == accuracy(predict_probs(own.model, test.images), test.labels)
    assert r["val_accuracy"] is not None and r["members"][2]["deskew"] is True


def test_members_all_deskewed_read_deskewed_input(two_runs, tmp_path):
    folder, _ = two_runs
    paths = [train(folder, tmp_path / f"d{seed}", f"seed={seed}", "preprocess.deskew=true") for seed in (0, 1)]
    model, _ = ensemble.build(paths)
    assert model.input_deskew and not any(isinstance(m, ensemble.Deskewed) for m in model.members)
