"""benchmarks/study_preprocess.py (the preprocessing ablation): its core on a tiny set (2 images per real-world kind,
one small model trained in the session), the JSON it writes, the reference variant against an ordinary
preprocess + predict, and what the variants change."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digitkit.classify import Recognizer
from digitkit.preprocess import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import realworld  # noqa: E402
import study_preprocess as study  # noqa: E402

N = 2
REFUSALS = ("empty", "no-ink", "unreadable")


@pytest.fixture(scope="module")
def studied(mnist_small_run, tmp_path_factory):
    """main() on 2 images per kind; the sets it built (caught on their way from realworld.digit_sets)."""
    out = tmp_path_factory.mktemp("study-preprocess")
    made: dict = {}
    real = realworld.digit_sets

    def spy(source, n, seed):
        made["args"] = (source, n, seed)
        made["sets"] = real(source, n, seed)
        return made["sets"]

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study.realworld, "digit_sets", spy)
        doc = study.main(["--model", str(mnist_small_run), "--n", str(N), "--out", str(out / "study.json"),
                          "--plot", str(out / "study.png")])  # fmt: skip
    assert torch.get_num_threads() == threads  # main's one thread does not leak into the session
    return {"doc": doc, "json": json.loads((out / "study.json").read_text()), "png": out / "study.png",
            "sets": made["sets"], "args": made["args"], "run": str(mnist_small_run)}  # fmt: skip


def test_json_shape(studied):
    doc, sets, run = studied["json"], studied["sets"], studied["run"]
    assert studied["args"] == ("test", N, 0)  # realworld.py's own sets, test digits by default
    names = [v["name"] for v in study.VARIANTS]
    assert names[0] == "full" and names[-1] == "raw" and len(names) == 10
    assert [v["name"] for v in doc["variants"]] == names
    assert doc["sets"] == {k: N for k in sets} and len(sets) == 17 and doc["n_images"] == 17 * N
    assert doc["source"] == "test" and doc["n_per_kind"] == N
    assert doc["machine"]["processor"] and doc["machine"]["torch_threads"] == 1
    assert "study_preprocess.py" in doc["command"] and "--n 2" in doc["command"]
    assert set(doc["models"]) == {run} and doc["models"][run]["seed"] == 0
    assert "test_accuracy" in doc["models"][run]  # (None here: the session's run was trained without a test set)
    assert set(doc["results"]) == set(doc["summary"]) == set(names)
    for name in names:
        res = doc["results"][name]
        assert res["seconds_preprocess"] >= 0 and set(res["seconds_models"]) == {run}
        per = res["models"][run]
        assert set(per["kinds"]) == set(sets)
        for k in per["kinds"].values():
            assert k["n"] == N and 0 <= k["correct"] <= N - k["refused"]
            assert k["accuracy"] == k["correct"] / N
        s = doc["summary"][name]
        assert s["accuracy_per_model"] == [per["accuracy_mean_over_kinds"]]
        assert s["accuracy_std"] is None  # one model: no spread
        assert s["accuracy_mean"] == pytest.approx(np.mean([k["accuracy"] for k in per["kinds"].values()]))
        assert len(s["most_moved_kinds"]) == 3
        if name == "full":
            assert s["welch_vs_full"] is None and s["changed_share"] == 0
        else:
            assert s["welch_vs_full"]["b"] == "full" and "verdict" in s["welch_vs_full"]
    assert studied["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert studied["doc"]["summary"] == doc["summary"]


def test_reference_is_ordinary_preprocess_and_predict(studied):
    """The full variant scores exactly what Recognizer.predict answers on the same images (rejection off)."""
    rec = Recognizer.open(studied["run"])
    rec.inference.reject_below_confidence = rec.inference.reject_below_digit_score = 0.0
    full = studied["json"]["results"]["full"]["models"][studied["run"]]["kinds"]
    for kind, items in studied["sets"].items():
        answers = rec.predict([im for im, _ in items])
        correct = sum(a.predicted is not None and int(a.predicted) == y
                      for a, (_, y) in zip(answers, items, strict=True))
        refused = sum(a.rejected in REFUSALS for a in answers)
        assert (full[kind]["correct"], full[kind]["refused"]) == (correct, refused), kind


def test_raw_differs_and_the_variants_change_what_they_say(studied):
    summary = studied["json"]["summary"]
    raw, full = summary["raw"], summary["full"]
    assert raw["changed_share"] == 1.0 and raw["refused_share"] == 0.0
    assert raw["accuracy_mean"] < full["accuracy_mean"] - 0.2  # photos, scans, canvases fed as they are
    # Every config variant is the run's own config with exactly the field it names changed.
    base = PreprocessConfig()
    for v in study.VARIANTS:
        if isinstance(v["change"], dict):
            changed = {f.name for f in dataclasses.fields(base)
                       if getattr(study.variant_config(base, v["change"]), f.name) != getattr(base, f.name)}
            assert changed == set(v["change"]), v["name"]
    assert summary["center_box"]["changed_share"] > 0 and summary["no_crop_scale"]["changed_share"] > 0.9


def test_full_frame_keeps_the_digit_where_it_is():
    """no_crop_scale: the whole frame resized, the digit neither cropped, scaled into the box nor centred."""
    img = np.full((120, 120), 230, np.uint8)
    img[10:40, 14:18] = 20  # a "1" in the top-left corner of a page
    full = preprocess(img).tensor[0].numpy()
    frame = study.prepare(img, study.FULL_FRAME, PreprocessConfig())
    assert frame.refused is None
    x = frame.options[0][0].numpy()
    ys, xs = np.nonzero(x > 0.05)
    assert ys.max() < 14 and xs.max() < 14  # still in the top-left corner, and small
    ys, xs = np.nonzero(full > 0.05)
    assert ys.max() - ys.min() >= 18 and 11 <= ys.mean() <= 17  # the pipeline fits it into the box, centred
    assert study.prepare(np.zeros((40, 40), np.uint8), study.FULL_FRAME, PreprocessConfig()).refused == "empty"
