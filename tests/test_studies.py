"""benchmarks/studies.py: each study's command runs end to end on a tiny data set, writes its JSON and figure,
reuses finished runs when run again, and never lets the test files choose anything."""

import json
import statistics
import sys
from pathlib import Path

import pytest

from .conftest import make_idx_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import studies  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_idx_dir(tmp_path_factory.mktemp("studies") / "tiny", num_classes=4)


def _run(tmp_path: Path, tiny: Path, *argv: str) -> dict:
    out = tmp_path / f"{argv[0]}.json"
    studies.main([*argv, "--runs", str(tmp_path / "runs"), "--img-dir", str(tmp_path / "img"), "--out", str(out),
                  "--data-dir", str(tiny), "--set", f"data.dir={tiny}", "--set", "train.batch_size=32",
                  "--set", "train.threads=1"])  # fmt: skip
    return json.loads(out.read_text())


def test_keras_study_cross_validates_every_variant_and_reuses_its_folds(tmp_path, tiny):
    result = _run(tmp_path, tiny, "keras", "--folds", "2", "--epochs", "2")
    names = [v["name"] for v in result["variants"]]
    assert names == ["none", "minimal", "combinatorial", "combinatorial-offline"]
    by = {v["name"]: v for v in result["variants"]}
    assert by["combinatorial-offline"]["train_images_per_fold"] == 2 * by["none"]["train_images_per_fold"] == 240
    assert by["combinatorial-offline"]["epochs"] == 1 and by["combinatorial"]["epochs"] == 2  # the same steps
    for v in result["variants"]:
        assert len(v["fold_accuracy"]["values"]) == len(v["test_accuracy_of_fold_models"]["values"]) == 2
        cv_json = json.loads((Path(v["cv_dir"]) / "cv.json").read_text())
        assert [f["val_accuracy"] for f in cv_json["folds"]] == v["fold_accuracy"]["values"]
    assert by["minimal"]["overrides"] and json.loads((Path(by["minimal"]["cv_dir"]) / "cv.json").read_text())
    pair = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("combinatorial-offline", "combinatorial"))
    assert pair["difference"] == pytest.approx(pair["paired_difference"]["mean"])
    diffs = pair["paired_difference"]["values"]
    if pair["paired_t"] is not None:  # t = mean / (std / sqrt(n)) of the per-fold differences
        assert pair["paired_t"] == pytest.approx(statistics.mean(diffs) / (statistics.stdev(diffs) / len(diffs) ** 0.5))
    assert "welch_t" in pair and "verdict" in pair["test_welch"]
    assert (tmp_path / "img" / "studies-keras.png").stat().st_size > 5000
    assert result["machine"]["cpu"] and result["test_set"].startswith("reported")

    stamp = {v["name"]: (Path(v["cv_dir"]) / "cv.json").stat().st_mtime_ns for v in result["variants"]}
    again = _run(tmp_path, tiny, "keras", "--folds", "2", "--epochs", "2")
    assert {v["name"]: (Path(v["cv_dir"]) / "cv.json").stat().st_mtime_ns for v in again["variants"]} == stamp
    assert [v["fold_accuracy"] for v in again["variants"]] == [v["fold_accuracy"] for v in result["variants"]]
    third = _run(tmp_path, tiny, "keras", "--folds", "2", "--epochs", "4")  # other settings: trained again
    assert (Path(third["variants"][0]["cv_dir"]) / "cv.json").stat().st_mtime_ns != stamp["none"]


def test_production_study_runs_its_config_over_seeds_with_curves(tmp_path, tiny):
    result = _run(tmp_path, tiny, "production", "--seeds", "2", "--set", "train.epochs=3")
    (entry,) = result["entries"]
    assert entry["model"] == "classic" and len(entry["runs"]) == 2
    for run in entry["runs"]:
        saved = json.loads((Path(run["run_dir"]) / "config.yaml").with_name("summary.json").read_text())
        assert saved["test_accuracy"] == run["test_accuracy"] and run["best_epoch"] <= run["epochs"] <= 3
    assert (tmp_path / "img" / "studies-production.png").stat().st_size > 5000
    if "versus_default" in result:
        assert result["versus_default"]["a"] == "production"


def test_studies_reject_unknown_arguments(tmp_path):
    with pytest.raises(SystemExit):
        studies.main(["improve", "--model", "x", "--runs", str(tmp_path)])


def test_every_study_command_in_the_docs_parses():
    """docs/studies.md shows one command per study; each must be one this script (or `digitkit`) runs."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "studies.md").read_text(encoding="utf-8")
    blocks = [re.sub(r"\\\n\s*", " ", block) for block in re.findall(r"```sh\n(.*?)```", page, re.S)]  # continuations
    lines = [line.strip() for block in blocks for line in block.splitlines()
             if line.strip().startswith("python benchmarks/studies.py")]  # fmt: skip
    shown = set()
    for line in lines:
        argv = shlex.split(line, comments=True)[2:]
        args, rest = studies.build_parser().parse_known_args(argv)
        assert args.study == "preprocess" or not rest, f"`{line}`: unknown arguments {rest}"
        shown.add(args.study)
    assert shown == {"keras", "improve", "production", "preprocess"}
