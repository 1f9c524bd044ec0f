"""Config comparison: spec files resolve through config.load, runs are keyed by config hash and seed and reused,
the statistics are those of the runs, and the noise verdict follows Welch's t."""

import json
import statistics
import time
from pathlib import Path

import pytest
import yaml
from scipy import stats

from digitkit import compare, config, runs
from digitkit.errors import ConfigError

from .conftest import ROOT, make_idx_dir


def write_config(path: Path, data_dir: Path, **model: object) -> Path:
    raw = {
        "data": {"dir": str(data_dir)},
        "model": {"name": "cnn1", **model},
        "augment": {"recipe": "none"},
        "train": {"epochs": 2, "batch_size": 32, "threads": 1},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two tiny configs (different widths) x 2 seeds, trained once for the whole module."""
    tmp = tmp_path_factory.mktemp("compare")
    data_dir = make_idx_dir(tmp / "tiny", num_classes=4)
    specs = [write_config(tmp / "wide.yaml", data_dir),
             write_config(tmp / "narrow.yaml", data_dir, args={"channels": [4]})]  # fmt: skip
    result = compare.run_compare(specs, seeds=2, root=tmp / "runs")
    return {"result": result, "specs": specs, "root": tmp / "runs", "data_dir": data_dir}


def test_compare_writes_its_files_with_the_runs_numbers(compared):
    result, root = compared["result"], compared["root"]
    out = Path(result["compare_dir"])
    assert out.parent == root and out.name.startswith("compare-")
    saved = json.loads((out / "compare.json").read_text())
    assert saved == {k: v for k, v in result.items() if k != "compare_dir"}
    assert [e["name"] for e in saved["entries"]] == ["wide", "narrow"]
    for entry, spec in zip(saved["entries"], compared["specs"], strict=True):
        assert entry["n_seeds"] == 2 and entry["seeds"] == [0, 1] and entry["reused"] == [False, False]
        summaries = []
        for seed, run_dir in zip(entry["seeds"], entry["run_dirs"], strict=True):
            cfg = config.load(spec, [f"seed={seed}"])
            assert Path(run_dir) == root / "compare" / f"{entry['name']}-{compare.config_hash(cfg)}-s{seed}"
            assert config.load(Path(run_dir) / "config.yaml") == cfg  # each run trained its own seed
            summaries.append(json.loads((Path(run_dir) / "summary.json").read_text()))
        tests = [s["test_accuracy"] for s in summaries]
        assert entry["test_accuracy"]["values"] == tests
        assert entry["test_accuracy"]["mean"] == pytest.approx(statistics.mean(tests))
        assert entry["test_accuracy"]["std"] == pytest.approx(statistics.stdev(tests))
        assert entry["test_accuracy"]["min"] == min(tests) and entry["test_accuracy"]["max"] == max(tests)
        assert entry["val_accuracy"]["values"] == [s["val_accuracy"] for s in summaries]
        assert entry["params"] == summaries[0]["params"]
        assert entry["train_seconds_mean"] == pytest.approx(statistics.mean(s["train_seconds"] for s in summaries))
    assert saved["entries"][0]["params"] > saved["entries"][1]["params"]  # channels 32 vs 4
    (pair,) = saved["pairs"]
    assert (pair["a"], pair["b"]) == ("wide", "narrow")
    a, b = (e["test_accuracy"]["values"] for e in saved["entries"])
    assert pair["difference"] == pytest.approx(statistics.mean(a) - statistics.mean(b))
    md = (out / "compare.md").read_text()
    assert "never used to choose anything" in md and "| wide | cnn1 |" in md and pair["verdict"] in md
    assert (out / "compare.png").stat().st_size > 10_000
    assert not (root / "latest").exists()


def test_rerun_reuses_finished_runs(compared, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train_run", no_training)
    before = sorted(p.name for p in (compared["root"] / "compare").iterdir())
    started = time.perf_counter()
    again = compare.run_compare(compared["specs"], seeds=2, root=compared["root"])
    assert time.perf_counter() - started < 20  # loading summaries and one figure, no training
    assert sorted(p.name for p in (compared["root"] / "compare").iterdir()) == before
    assert again["compare_dir"] != compared["result"]["compare_dir"]
    for old, new in zip(compared["result"]["entries"], again["entries"], strict=True):
        assert new["reused"] == [True, True]
        assert new["test_accuracy"] == old["test_accuracy"] and new["run_dirs"] == old["run_dirs"]


def test_interrupted_run_is_resumed_and_no_reuse_retrains(tmp_path, tiny_dir):
    spec = write_config(tmp_path / "one.yaml", tiny_dir)
    cfg = config.load(spec, ["seed=0"])
    run_dir = tmp_path / "runs" / "compare" / f"one-{compare.config_hash(cfg)}-s0"
    runs.train_run(cfg, out=run_dir, stop_after_epochs=1)  # interrupted after epoch 1 of 2
    result = compare.run_compare([spec], seeds=1, root=tmp_path / "runs", out=tmp_path / "c1")
    (entry,) = result["entries"]
    assert entry["run_dirs"] == [str(run_dir)] and entry["reused"] == [False]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    assert entry["test_accuracy"]["std"] is None  # one seed: no spread to report
    again = compare.run_compare([spec], seeds=1, root=tmp_path / "runs", out=tmp_path / "c2", reuse=False)
    assert again["entries"][0]["reused"] == [False]
    assert len(list(run_dir.parent.glob(f"{run_dir.name}.old-*"))) == 1  # the old run is kept aside, not deleted


def test_comparison_file_resolves_entries_through_config_load(tmp_path, tiny_dir):
    base = write_config(tmp_path / "base.yaml", tiny_dir)
    (tmp_path / "sub").mkdir()
    other = write_config(tmp_path / "sub" / "other.yaml", tiny_dir, name="cnn2")
    spec = tmp_path / "cmp.yaml"
    spec.write_text(
        "base: base.yaml\nseeds: 2\nentries:\n"
        "  - {name: plain}\n"
        "  - {name: lr, set: {train.lr: 1.0e-3, seed: 5}}\n"
        "  - {name: aug, set: {augment: {recipe: standard, rotation: {p: 1.0}}}}\n"
        "  - {name: two, base: sub/other.yaml}\n"
    )
    entries = compare.load_specs([spec, base])
    assert [e.name for e in entries] == ["plain", "lr", "aug", "two", "base"]
    plain, lr, aug, two, from_config = entries
    assert plain.config(0) == config.load(base, ["seed=0"])
    assert lr.seeds == [5, 6] and lr.config(5).train.lr == 1e-3  # seeds count up from the entry's own seed
    assert aug.config(0).augment.rotation.p == 1.0 and aug.config(0).augment.noise.p == 0.2
    assert two.config(0).model.name == "cnn2" and two.base == other
    assert from_config.seeds == [0, 1, 2]  # a plain training config: 3 seeds by default
    assert [e.seeds for e in compare.load_specs([spec], seeds=1)] == [[0], [5], [0], [0]]  # the argument wins
    with_data = compare.load_specs([spec], overrides=["train.epochs=7"])
    assert {e.config(0).train.epochs for e in with_data} == {7}
    # The hash follows the config, not the seed.
    assert compare.config_hash(plain.config(0)) == compare.config_hash(plain.config(1))
    assert compare.config_hash(plain.config(0)) != compare.config_hash(lr.config(0))


def test_shipped_compare_depth_file_is_valid():
    entries = compare.load_specs([ROOT / "configs" / "compare-depth.yaml"])
    by_name = {e.name: e.config(e.seeds[0]) for e in entries}
    models = {"cnn1": "cnn1", "cnn2": "cnn2", "cnn3_slim": "cnn3_slim", "cnn3": "cnn3", "cnn3-no-augment": "cnn3"}
    assert {n: c.model.name for n, c in by_name.items()} == models
    assert by_name["cnn3"].augment.enabled and not by_name["cnn3-no-augment"].augment.enabled
    assert all(e.seeds == [0, 1, 2] for e in entries)


BAD_SPECS = {
    "unknown top-level key": ("base: base.yaml\nentrys: []\n", "unknown key 'entrys'"),
    "no entries": ("entries: []\n", "non-empty list"),
    "unknown entry key": ("base: base.yaml\nentries:\n  - {name: a, sets: {}}\n", "unknown key 'sets'"),
    "misspelt config key": ("base: base.yaml\nentries:\n  - {name: a, set: {model.nme: cnn1}}\n", "model.nme"),
    "unknown model": ("base: base.yaml\nentries:\n  - {name: a, set: {model.name: cnn9}}\n", "cnn9"),
    "bad name": ("base: base.yaml\nentries:\n  - {name: a/b}\n", "name = 'a/b'"),
    "duplicate names": ("base: base.yaml\nentries:\n  - {name: a}\n  - {name: a}\n", "used twice"),
    "missing base": ("base: nope.yaml\nentries:\n  - {name: a}\n", "no such file"),
    "bad seeds": ("base: base.yaml\nseeds: 0\nentries:\n  - {name: a}\n", "seeds = 0"),
    "not YAML": ("entries: [\n", "not valid YAML"),
    "bad training config": ("model: {name: cnn1}\ntrian: {epochs: 1}\n", "trian"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_a_config_error_before_anything_is_created(tmp_path, tiny_dir, case):
    text, message = BAD_SPECS[case]
    write_config(tmp_path / "base.yaml", tiny_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError, match=message):
        compare.run_compare([spec], root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_missing_spec_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        compare.load_specs([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="seeds = 0"):
        compare.load_specs([tmp_path / "nope.yaml"], seeds=0)


def test_welch_verdicts():
    one = compare.welch("a", [0.99], "b", [0.98, 0.97])
    assert one["verdict"] == "cannot tell, one seed" and one["welch_t"] is None and one["exceeds_noise"] is None
    a, b = [0.990, 0.991, 0.992], [0.980, 0.981, 0.979]
    clear = compare.welch("a", a, "b", b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert clear["welch_t"] == pytest.approx(ref.statistic) and clear["p_value"] == pytest.approx(ref.pvalue)
    assert clear["exceeds_noise"] and clear["verdict"].startswith("a higher by 1.10 points")
    noisy = compare.welch("a", [0.990, 0.980, 0.995], "b", [0.985, 0.992, 0.978])
    assert noisy["exceeds_noise"] is False and noisy["verdict"].startswith("cannot tell apart")
    flat = compare.welch("a", [0.99, 0.99], "b", [0.98, 0.98])
    assert flat["exceeds_noise"] is True and flat["welch_t"] is None
    assert compare.welch("a", [0.99, 0.99], "b", [0.99, 0.99])["verdict"] == "identical in every seed"
