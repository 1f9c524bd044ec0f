"""metrics.py: every number agrees with scikit-learn or a hand computation; orderings and verdicts are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from digitkit import metrics
from digitkit.evaluate import confusion_matrix

K = 5
CLASSES = ["zero", "one", "two", "three", "four"]
NEVER_PREDICTED, NO_SUPPORT = 3, 4


def _fixture(n: int = 300, dtype: type = np.float64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded labels (N,) and probs (N, K): class 3 has support but is never predicted, class 4 is predicted but
    has no support, so both zero_division paths are exercised."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NO_SUPPORT, size=n)  # 0..3, never 4
    logits = rng.normal(size=(n, K))
    logits[np.arange(n), labels] += 1.5  # mostly right, plenty of errors
    logits[:, NEVER_PREDICTED] -= 10
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = probs.astype(dtype)
    preds = probs.argmax(1)
    assert (labels == NEVER_PREDICTED).any() and not (preds == NEVER_PREDICTED).any()
    assert (preds == NO_SUPPORT).any() and not (labels == NO_SUPPORT).any()
    assert 0.3 < (preds == labels).mean() < 0.95
    return labels, probs


# ---------------------------------------------------------------------------------------------------------
# classification metrics against scikit-learn


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_classification_metrics_match_sklearn(dtype: type, as_tensor: bool) -> None:
    labels, probs = _fixture(dtype=dtype)
    preds = probs.argmax(1)
    y_in, p_in = (torch.from_numpy(labels), torch.from_numpy(probs)) if as_tensor else (labels, probs)
    m = metrics.classification_metrics(y_in, p_in, CLASSES)
    ks = list(range(K))

    assert m["n"] == len(labels)
    assert m["accuracy"] == skm.accuracy_score(labels, preds)
    assert m["errors"] == int((preds != labels).sum())
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs, labels=ks), rel=1e-6)
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=ks, zero_division=0)
    assert [c["class"] for c in m["per_class"]] == CLASSES
    np.testing.assert_allclose([c["precision"] for c in m["per_class"]], p, rtol=1e-12)
    np.testing.assert_allclose([c["recall"] for c in m["per_class"]], r, rtol=1e-12)
    np.testing.assert_allclose([c["f1"] for c in m["per_class"]], f, rtol=1e-12)
    assert [c["support"] for c in m["per_class"]] == s.tolist()
    assert m["per_class"][NEVER_PREDICTED]["precision"] == 0.0 and m["per_class"][NO_SUPPORT]["recall"] == 0.0
    for key, fn in (("macro_precision", skm.precision_score), ("macro_recall", skm.recall_score),
                    ("macro_f1", skm.f1_score)):  # fmt: skip
        assert m[key] == pytest.approx(fn(labels, preds, labels=ks, average="macro", zero_division=0), rel=1e-12)
    assert m["weighted_f1"] == pytest.approx(
        skm.f1_score(labels, preds, labels=ks, average="weighted", zero_division=0), rel=1e-12
    )
    json.dumps(m)  # plain Python numbers only


def test_log_loss_clips_a_zero_probability_like_sklearn() -> None:
    labels = np.array([0, 1, 2])
    probs = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])  # example 1 gives its class p = 0
    m = metrics.classification_metrics(labels, probs, ["a", "b", "c"])
    assert np.isfinite(m["log_loss"])
    assert m["log_loss"] == pytest.approx(skm.log_loss(labels, probs, labels=[0, 1, 2]), rel=1e-9)


def test_confusion_and_percentages_match_sklearn() -> None:
    labels, probs = _fixture()
    preds = probs.argmax(1)
    cm = confusion_matrix(torch.from_numpy(labels), torch.from_numpy(preds), K)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(labels, preds, labels=list(range(K))))
    pct = metrics.confusion_percent(cm)
    expected = skm.confusion_matrix(labels, preds, labels=list(range(K)), normalize="true") * 100
    np.testing.assert_allclose(pct[:NO_SUPPORT], expected[:NO_SUPPORT], rtol=1e-12)
    assert (pct[NO_SUPPORT] == 0).all(), "a class with no examples must keep a zero row, not NaN"
    np.testing.assert_allclose(pct[:NO_SUPPORT].sum(1), 100.0)
    m = metrics.classification_metrics(labels, probs, CLASSES)
    assert m["errors"] == int(cm.sum() - cm.trace())


def test_bad_inputs_are_rejected_with_a_reason() -> None:
    labels, probs = _fixture()
    with pytest.raises(ValueError, match="softmax"):
        metrics.classification_metrics(labels, np.log(probs), CLASSES)  # logits, not probabilities
    with pytest.raises(ValueError, match="class names"):
        metrics.classification_metrics(labels, probs, CLASSES[:3])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        metrics.classification_metrics(labels[:5], probs, CLASSES)
    with pytest.raises(ValueError, match="labels must be in"):
        metrics.classification_metrics(labels + K, probs, CLASSES)


# ---------------------------------------------------------------------------------------------------------
# top confusions, error groups


def test_top_confusions_order_and_ties() -> None:
    cm = np.array([
        [90, 5, 0, 1],
        [7, 80, 0, 0],
        [0, 5, 40, 1],
        [0, 0, 0, 0],
    ])  # fmt: skip
    top = metrics.top_confusions(cm, list("abcd"), k=10)
    # 7 first; the two 5s tie on count, and 5 of 46 (c) is a larger share than 5 of 96 (a); the two 1s tie on
    # count, 1 of 46 beats 1 of 96 again; zero cells and the diagonal never appear.
    assert [(t["true"], t["predicted"], t["count"]) for t in top] == [
        ("b", "a", 7), ("c", "b", 5), ("a", "b", 5), ("c", "d", 1), ("a", "d", 1),
    ]  # fmt: skip
    assert top[0]["percent_of_true"] == pytest.approx(100 * 7 / 87)
    assert [t["count"] for t in metrics.top_confusions(cm, list("abcd"), k=2)] == [7, 5]
    equal = np.array([[5, 2, 2], [2, 5, 2], [2, 2, 5]])  # every error ties on count and share: index order
    assert [(t["true"], t["predicted"]) for t in metrics.top_confusions(equal, list("xyz"), k=3)] == [
        ("x", "y"), ("x", "z"), ("y", "x"),
    ]  # fmt: skip


def _probs_for(preds: list[int], confs: list[float], k: int = 10) -> np.ndarray:
    """One row per example: `conf` on its predicted class, the rest spread evenly over the others."""
    p = np.zeros((len(preds), k))
    for i, (c, q) in enumerate(zip(preds, confs, strict=True)):
        p[i] = (1 - q) / (k - 1)
        p[i, c] = q
    return p


def test_error_groups_order_groups_and_members() -> None:
    labels = [1, 4, 1, 3, 4, 1, 0, 4, 1, 2]
    preds = [1, 9, 7, 5, 9, 7, 0, 9, 7, 2]
    confs = [0.9, 0.6, 0.9, 0.5, 0.8, 0.6, 0.9, 0.6, 0.7, 0.9]
    groups = metrics.error_groups(torch.tensor(labels), torch.from_numpy(_probs_for(preds, confs)))
    # (1->7) and (4->9) have 3 errors each: the lower true class first; then (3->5)
    assert [(g["true"], g["predicted"], g["count"]) for g in groups] == [(1, 7, 3), (4, 9, 3), (3, 5, 1)]
    assert groups[0]["indices"] == [2, 8, 5]  # confidence 0.9, 0.7, 0.6
    assert groups[0]["confidences"] == pytest.approx([0.9, 0.7, 0.6])
    assert groups[1]["indices"] == [4, 1, 7]  # 0.8, then the 0.6 tie broken by index
    assert sum(g["count"] for g in groups) == sum(a != b for a, b in zip(labels, preds, strict=True))
    json.dumps(groups)


def test_error_groups_is_empty_when_everything_is_right() -> None:
    assert metrics.error_groups(np.array([0, 1]), _probs_for([0, 1], [0.9, 0.8])) == []


# ---------------------------------------------------------------------------------------------------------
# calibration


def test_calibration_matches_a_hand_computed_example() -> None:
    probs = np.array([
        [0.40, 0.20, 0.20, 0.20],  # conf 0.40 (on the edge: bin (0.2, 0.4]), right
        [0.35, 0.25, 0.20, 0.20],  # conf 0.35, bin (0.2, 0.4], wrong
        [0.90, 0.05, 0.05, 0.00],  # conf 0.90, bin (0.8, 1.0], right
        [0.10, 0.80, 0.10, 0.00],  # conf 0.80 (edge: bin (0.6, 0.8]), wrong
        [0.00, 0.00, 1.00, 0.00],  # conf 1.00, bin (0.8, 1.0], right
    ])  # fmt: skip
    labels = np.array([0, 1, 0, 2, 2])
    cal = metrics.calibration(probs, labels, bins=5)
    bins = cal["bins"]
    # exactly the literals, so a confidence of 0.4 or 0.8 lands on the edge and goes to the bin below
    assert [b["lo"] for b in bins] == [0, 0.2, 0.4, 0.6, 0.8] and [b["hi"] for b in bins] == [0.2, 0.4, 0.6, 0.8, 1]
    assert [b["count"] for b in bins] == [0, 2, 0, 1, 2]
    assert [b["confidence"] for b in bins] == pytest.approx([0, 0.375, 0, 0.8, 0.95])
    assert [b["accuracy"] for b in bins] == pytest.approx([0, 0.5, 0, 0.0, 1.0])
    # ECE = (2 * |0.5 - 0.375| + 1 * |0 - 0.8| + 2 * |1 - 0.95|) / 5 = 1.15 / 5; MCE = 0.8
    assert cal["ece"] == pytest.approx(0.23)
    assert cal["mce"] == pytest.approx(0.8)
    json.dumps(cal)


def test_calibration_of_a_perfectly_calibrated_model_is_zero() -> None:
    # 10 examples at confidence 0.7, 7 of them right
    probs = _probs_for([0] * 10, [0.7] * 10, k=4)
    labels = np.array([0] * 7 + [1] * 3)
    cal = metrics.calibration(torch.from_numpy(probs), torch.from_numpy(labels), bins=10)
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12) and cal["mce"] == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in cal["bins"]) == 10 and len(cal["bins"]) == 10


# ---------------------------------------------------------------------------------------------------------
# slices


def _slices_with_accuracies(n: int, acc_a: float, acc_b: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """2n examples, the first n right with rate acc_a, the last n with acc_b."""
    labels = np.zeros(2 * n, dtype=np.int64)
    right = np.concatenate([np.arange(n) < round(acc_a * n), np.arange(n) < round(acc_b * n)])
    probs = _probs_for([0 if r else 1 for r in right], [0.9] * (2 * n), k=3)
    return labels, probs, {"first": torch.arange(n), "last": torch.arange(n, 2 * n)}


def test_slice_gap_is_flagged_for_a_real_difference() -> None:
    labels, probs, slices = _slices_with_accuracies(1000, 0.99, 0.95)
    rep = metrics.slice_report(labels, probs, slices, ["a", "b", "c"])
    assert rep["first"]["accuracy"] == 0.99 and rep["last"]["accuracy"] == 0.95
    assert rep["first"]["n"] == 1000 and "ece" in rep["first"] and "macro_f1" in rep["last"]
    (gap,) = rep["gap"]
    q = 0.97  # pooled
    z = 0.04 / np.sqrt(q * (1 - q) * 2 / 1000)  # 5.24
    assert (gap["a"], gap["b"]) == ("first", "last")
    assert gap["difference_pp"] == pytest.approx(4.0)
    assert gap["z"] == pytest.approx(z)
    assert gap["flagged"] is True and gap["p_value"] < 1e-6
    json.dumps(rep)


@pytest.mark.parametrize(("acc_a", "acc_b"), [(0.97, 0.97), (0.97, 0.965)])
def test_slice_gap_is_not_flagged_within_noise(acc_a: float, acc_b: float) -> None:
    labels, probs, slices = _slices_with_accuracies(1000, acc_a, acc_b)
    (gap,) = metrics.slice_report(labels, probs, slices, ["a", "b", "c"])["gap"]
    assert abs(gap["z"]) < 1 and gap["flagged"] is False


def test_slice_metrics_equal_the_metrics_of_the_subset_and_masks_work() -> None:
    labels, probs = _fixture()
    idx = torch.arange(0, 300, 3)
    mask = np.zeros(300, dtype=bool)
    mask[150:] = True
    rep = metrics.slice_report(labels, probs, {"every third": idx, "second half": mask}, CLASSES)
    sub = metrics.classification_metrics(labels[idx.numpy()], probs[idx.numpy()], CLASSES)
    assert {k: rep["every third"][k] for k in sub} == sub
    assert rep["every third"]["ece"] == metrics.calibration(probs[idx.numpy()], labels[idx.numpy()])["ece"]
    assert rep["second half"]["n"] == 150
    with pytest.raises(ValueError, match="gap"):
        metrics.slice_report(labels, probs, {"gap": idx}, CLASSES)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.slice_report(labels, probs, {"empty": torch.arange(0)}, CLASSES)


# ---------------------------------------------------------------------------------------------------------
# diagnosis


def _rows(train_acc: list[float], val_acc: list[float], train_loss: list[float], val_loss: list[float],
          lr: float = 1e-3) -> list[dict[str, float]]:  # fmt: skip
    return [
        {"epoch": e + 1, "train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va, "lr": lr,
         "seconds": 3.0, "images_per_s": 9000.0}
        for e, (ta, va, tl, vl) in enumerate(zip(train_acc, val_acc, train_loss, val_loss, strict=True))
    ]  # fmt: skip


def _falling(n: int, start: float, ratio: float) -> list[float]:
    return [start * ratio**i for i in range(n)]


def test_diagnose_overfitting_from_the_accuracy_gap() -> None:
    n = 12
    hist = _rows(np.linspace(0.95, 0.998, n).tolist(), [0.981] * n, _falling(n, 0.3, 0.8), [0.06] * n)
    d = metrics.diagnose(hist)
    assert d["verdict"] == "overfitting"
    assert "train 99.80% vs validation 98.10% (gap 1.7 pp) at epoch 12" in d["reasons"][0]
    assert any("augmentation" in s for s in d["next_steps"])
    json.dumps(d)


def test_diagnose_overfitting_from_a_rising_val_loss() -> None:
    val_loss = [0.08, 0.05, 0.04, 0.035, 0.037, 0.040, 0.044]
    hist = _rows([0.985] * 7, [0.99] * 7, _falling(7, 0.2, 0.8), val_loss)
    d = metrics.diagnose(hist)
    assert d["verdict"] == "overfitting"
    assert "val loss rose for 3 epochs in a row (0.0350 at epoch 4 -> 0.0440 at epoch 7)" in d["reasons"][0]
    # two rising epochs are not enough
    assert metrics.diagnose(hist[:-1])["verdict"] != "overfitting"


def test_diagnose_underfitting_and_its_threshold_is_a_parameter() -> None:
    hist = _rows([0.90, 0.91, 0.91], [0.92, 0.925, 0.925], [0.5, 0.45, 0.45], [0.40, 0.39, 0.39])
    d = metrics.diagnose(hist)
    assert d["verdict"] == "underfitting"
    assert "91.00%" in d["reasons"][0] and "92.50%" in d["reasons"][0]
    assert any("cnn3" in s for s in d["next_steps"])
    assert metrics.diagnose(hist, underfit_below=0.9)["verdict"] == "converged"
    # the evaluated accuracy, when given, stands in for the history's validation accuracy
    good_val = _rows([0.95] * 3, [0.99] * 3, [0.2] * 3, [0.03] * 3)
    assert metrics.diagnose(good_val)["verdict"] == "converged"
    assert metrics.diagnose(good_val, val_accuracy=0.9)["verdict"] == "underfitting"


def test_diagnose_still_improving() -> None:
    hist = _rows([0.98, 0.985, 0.99, 0.992], [0.985, 0.988, 0.99, 0.991], _falling(4, 0.1, 0.9),
                 [0.06, 0.05, 0.045, 0.040])  # fmt: skip
    d = metrics.diagnose(hist)
    assert d["verdict"] == "still-improving"
    assert "11.1%" in d["reasons"][0] and "(0.0450 -> 0.0400 at epoch 4)" in d["reasons"][0]
    assert any("more epochs" in s for s in d["next_steps"])
    assert metrics.diagnose(hist[:1])["verdict"] == "still-improving"  # one epoch: nothing has levelled off


def test_diagnose_converged_and_explains_train_below_validation() -> None:
    val_loss = [0.05, 0.032, 0.0305, 0.030, 0.0301, 0.0299]
    hist = _rows([0.97, 0.985, 0.987, 0.988, 0.988, 0.989], [0.985, 0.991, 0.992, 0.992, 0.9925, 0.993],
                 _falling(6, 0.2, 0.9), val_loss)  # fmt: skip
    d = metrics.diagnose(hist)
    assert d["verdict"] == "converged"
    assert "0.0299 at epoch 6" in d["reasons"][0]
    note = [r for r in d["reasons"] if "augmented" in r]
    assert len(note) == 1 and "train 98.90% is below validation 99.30% at epoch 6" in note[0]
    # with train above validation (by less than the gap threshold) there is no such note
    above = _rows([0.995] * 6, [0.99] * 6, _falling(6, 0.2, 0.9), val_loss)
    assert not [r for r in metrics.diagnose(above)["reasons"] if "below validation" in r]


def test_diagnose_rejects_percentages_and_empty_histories() -> None:
    with pytest.raises(ValueError, match="fractions"):
        metrics.diagnose(_rows([99.0], [98.0], [0.1], [0.1]))
    with pytest.raises(ValueError, match="at least one"):
        metrics.diagnose([])


# ---------------------------------------------------------------------------------------------------------
# robustness


def test_summarize_robustness() -> None:
    s = metrics.summarize_robustness({"blur": 0.9, "noise": 0.7, "shift": 0.95, "fog": 0.7})
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.8125)
    assert (s["worst"], s["worst_accuracy"]) == ("fog", 0.7)  # tie: the name that sorts first
    assert (s["best"], s["best_accuracy"]) == ("shift", 0.95)
    with pytest.raises(ValueError, match="no results"):
        metrics.summarize_robustness({})
