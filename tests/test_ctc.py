"""CTC decoding (digitkit.realworld.ctc): greedy and beam decoders, the forward algorithm and the forced alignment,
checked against brute-force enumeration of every alignment on small inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from digitkit.realworld import ctc
from digitkit.realworld.ctc import ALPHABET, BLANK, Decoded, K
from digitkit.realworld.pattern import compile_pattern


# ------------------------------------------------------------------------------------------ helpers
def frames(spec: str, p: float = 0.9) -> np.ndarray:
    """Log-probs with one frame per character of `spec` ('_' is the blank): that class gets p, the rest share 1 - p."""
    rows = np.full((len(spec), K), (1 - p) / (K - 1))
    for t, ch in enumerate(spec):
        rows[t, BLANK if ch == "_" else ALPHABET.index(ch) + 1] = p
    return np.log(rows)


def random_log_probs(rng: np.random.Generator, T: int, scale: float = 2.0) -> np.ndarray:
    x = rng.normal(size=(T, K)) * scale
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def all_paths(T: int) -> np.ndarray:
    """Every alignment of T frames: (K**T, T) class indices."""
    return np.indices((K,) * T, dtype=np.int8).reshape(T, -1).T


def collapse(paths: np.ndarray) -> np.ndarray:
    """Each alignment's collapsed string as a base-11 number (digits are classes 1..10, so it is unambiguous)."""
    key = np.zeros(len(paths), dtype=np.int64)
    prev = np.full(len(paths), BLANK, dtype=paths.dtype)
    for t in range(paths.shape[1]):
        c = paths[:, t]
        key = np.where((c != BLANK) & (c != prev), key * K + c, key)
        prev = c
    return key


def path_log_probs(lp: np.ndarray, paths: np.ndarray) -> np.ndarray:
    return lp[np.arange(lp.shape[0]), paths].sum(axis=1)


def brute_force(lp: np.ndarray) -> dict[str, float]:
    """P(string) for every string with non-zero probability, by summing over all K**T alignments."""
    paths = all_paths(lp.shape[0])
    keys, inverse = np.unique(collapse(paths), return_inverse=True)
    sums = np.bincount(inverse, weights=np.exp(path_log_probs(lp, paths)))
    out = {}
    for k, p in zip(keys.tolist(), sums.tolist(), strict=True):
        text = ""
        while k:
            k, d = divmod(k, K)
            text = ALPHABET[d - 1] + text
        out[text] = p
    return out


def best_alignment(lp: np.ndarray, text: str) -> list[tuple[int, int]]:
    """The most probable alignment of `text`, by enumeration, as each character's (first, last) frame."""
    paths = all_paths(lp.shape[0])
    target = 0
    for ch in text:
        target = target * K + ALPHABET.index(ch) + 1
    scores = np.where(collapse(paths) == target, path_log_probs(lp, paths), -np.inf)
    best = paths[int(scores.argmax())].tolist()
    spans: list[list[int]] = []
    for t, c in enumerate(best):
        if c != BLANK and (t == 0 or c != best[t - 1]):
            spans.append([t, t])
        elif c != BLANK:
            spans[-1][1] = t
    return [(a, b) for a, b in spans]


# ------------------------------------------------------------------------------------------ greedy
def test_greedy_collapses_repeats_but_keeps_repeats_split_by_a_blank():
    out = ctc.greedy(frames("11_1"))
    assert out.text == "11"
    assert out.char_frames == ((0, 1), (3, 3))
    assert ctc.greedy(frames("111")).text == "1"
    assert ctc.greedy(frames("_12_2_")).text == "122"


def test_all_blank_frames_read_as_the_empty_string():
    lp = frames("____", p=0.8)
    for out in (ctc.greedy(lp), ctc.beam(lp)):
        assert out.text == "" and out.char_frames == () and out.char_confidences == () and out.matched
        assert out.confidence == pytest.approx(math.exp(ctc.string_log_prob(lp, "")), rel=1e-12)
        assert out.confidence == pytest.approx(0.8**4, rel=1e-12)


def test_no_frames_read_as_the_empty_string_with_certainty():
    empty = np.zeros((0, K))
    assert ctc.greedy(empty) == Decoded("", 1.0, (), ())
    assert ctc.beam(empty) == Decoded("", 1.0, (), ())
    assert ctc.greedy_batch(np.zeros((2, 0, K))) == [Decoded("", 1.0, (), ())] * 2
    assert ctc.string_log_prob(empty, "") == 0.0
    assert ctc.string_log_prob(empty, "1") == -math.inf
    assert ctc.beam(empty, pattern=compile_pattern(r"\d*")) == Decoded("", 1.0, (), ())
    assert ctc.beam(empty, pattern=compile_pattern(r"\d")) == Decoded("", 0.0, (), (), matched=False)


# ------------------------------------------------------------------------------------------ beam
def test_beam_finds_the_most_probable_string_where_the_best_path_does_not():
    # two frames, blank 0.4 and '1' 0.35 each: the best path is "_ _" (0.16) but P("1") = 0.35^2 + 2 * 0.35 * 0.4
    rows = np.full((2, K), 0.25 / 9)
    rows[:, BLANK], rows[:, 2] = 0.4, 0.35
    lp = np.log(rows)
    greedy, best = ctc.greedy(lp), ctc.beam(lp)
    assert greedy.text == "" and greedy.confidence == pytest.approx(0.16, rel=1e-12)
    assert best.text == "1"
    assert best.confidence == pytest.approx(0.35**2 + 2 * 0.35 * 0.4, rel=1e-12)
    assert best.confidence == pytest.approx(math.exp(ctc.string_log_prob(lp, "1")), rel=1e-12)
    assert best.confidence > greedy.confidence


@pytest.mark.parametrize("seed", range(6))
def test_beam_finds_the_brute_force_most_probable_string_on_small_inputs(seed):
    lp = random_log_probs(np.random.default_rng(seed), T=5, scale=2.5)
    probs = brute_force(lp)
    text = max(probs, key=probs.get)
    out = ctc.beam(lp, beam_width=16)
    assert out.text == text
    assert out.confidence == pytest.approx(probs[text], rel=1e-9)
    assert 0.0 <= out.confidence <= 1.0 and all(0.0 <= c <= 1.0 for c in out.char_confidences)


@pytest.fixture(scope="module")
def reads_123():
    """Five frames reading "123" most probably, with a weaker '4' in the last frame (blank 0.6, '4' 0.35)."""
    lp = frames("1_23_", p=0.9)
    rows = np.full(K, 0.05 / 9)
    rows[BLANK], rows[ALPHABET.index("4") + 1] = 0.6, 0.35
    lp[4] = np.log(rows)
    return lp, brute_force(lp)


@pytest.mark.parametrize("source", [r"\d{4}", "12[0-9]4", r"\d\d?\d?4"])
def test_beam_with_a_pattern_returns_the_most_probable_matching_string(reads_123, source):
    lp, probs = reads_123
    assert ctc.beam(lp).text == "123" == max(probs, key=probs.get)
    pattern = compile_pattern(source)
    expected = next(s for s in sorted(probs, key=probs.get, reverse=True) if pattern.fullmatch(s))
    out = ctc.beam(lp, beam_width=8, pattern=pattern)
    assert out.matched and out.text == expected == "1234"
    assert out.confidence == pytest.approx(probs[expected], rel=1e-9)
    assert out.char_frames[-1] == (4, 4)


@pytest.mark.parametrize("source", [r"\d{10}", "a+", r"\d-\d"])
def test_beam_reports_no_match_when_no_string_can_match(source):
    out = ctc.beam(frames("1_2"), pattern=compile_pattern(source))
    assert out == Decoded("", 0.0, (), (), matched=False)


# ------------------------------------------------------------------------------------------ forward algorithm
@pytest.mark.parametrize("seed,T", [(0, 4), (1, 4), (2, 5), (3, 5)])
def test_string_log_prob_matches_brute_force_enumeration(seed, T):
    rng = np.random.default_rng(seed)
    lp = random_log_probs(rng, T)
    probs = brute_force(lp)
    likely = sorted(probs, key=probs.get, reverse=True)[:4]
    texts = {"", "1", "11", "12", "121", "00", "1111"} | set(likely) | {str(rng.integers(0, 10**T))[:T]}
    for text in texts:
        got = ctc.string_log_prob(lp, text)
        if text in probs:
            assert got == pytest.approx(math.log(probs[text]), abs=1e-9), text
        else:
            assert got == -math.inf, text
    assert ctc.string_log_prob(lp, "11" * T) == -math.inf  # needs 4T - 1 frames


def test_string_probabilities_over_all_strings_sum_to_one():
    lp = random_log_probs(np.random.default_rng(7), T=3)
    texts = ["".join(s) for n in range(4) for s in itertools.product(ALPHABET, repeat=n)]
    total = sum(math.exp(ctc.string_log_prob(lp, text)) for text in texts)
    assert total == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------------------------------------ alignment
def test_align_gives_each_character_its_frames_and_peak_probability():
    spec = "_11__2_333_"
    peaks = [0.9, 0.8, 0.9, 0.9, 0.9, 0.7, 0.9, 0.6, 0.95, 0.85, 0.9]
    rows = np.empty((len(spec), K))
    for t, (ch, p) in enumerate(zip(spec, peaks, strict=True)):
        rows[t] = (1 - p) / (K - 1)
        rows[t, BLANK if ch == "_" else ALPHABET.index(ch) + 1] = p
    lp = np.log(rows)
    assert ctc.align(lp, "123") == [(1, 2), (5, 5), (7, 9)]
    for out in (ctc.greedy(lp), ctc.beam(lp)):
        assert out.text == "123"
        assert out.char_frames == ((1, 2), (5, 5), (7, 9))
        assert out.char_confidences == pytest.approx((0.9, 0.7, 0.95), rel=1e-12)
    assert ctc.align(frames("11_1"), "11") == [(0, 1), (3, 3)]


@pytest.mark.parametrize("seed,text", [(0, "12"), (1, "11"), (2, "307")])
def test_align_is_the_most_probable_alignment(seed, text):
    lp = random_log_probs(np.random.default_rng(seed), T=5)
    spans = ctc.align(lp, text)
    assert spans == best_alignment(lp, text)
    assert all(a <= b for a, b in spans) and all(b < a2 for (_, b), (a2, _) in zip(spans, spans[1:], strict=False))


def test_align_refuses_a_text_that_cannot_fit():
    with pytest.raises(ValueError, match="cannot be aligned"):
        ctc.align(frames("1_1"), "111")


# ------------------------------------------------------------------------------------------ batches, torch
def test_greedy_batch_matches_greedy_row_by_row():
    rng = np.random.default_rng(3)
    lengths = [12, 7, 0, 3]
    batch = np.stack([random_log_probs(rng, 12, scale=3.0) for _ in lengths])
    for b, n in enumerate(lengths):
        batch[b, n:] = np.nan  # padding is never looked at
    outs = ctc.greedy_batch(torch.tensor(batch, dtype=torch.float32), torch.tensor(lengths))
    assert [o.text for o in outs] == [ctc.greedy(batch[b, :n]).text for b, n in enumerate(lengths)]
    for out, (b, n) in zip(outs, enumerate(lengths), strict=True):
        ref = ctc.greedy(batch[b, :n])
        assert out.char_frames == ref.char_frames
        assert out.confidence == pytest.approx(ref.confidence, rel=1e-5)
    full = ctc.greedy_batch(batch[:1, :12])
    assert full == [ctc.greedy(batch[0])]


def test_torch_and_numpy_inputs_decode_alike():
    lp = random_log_probs(np.random.default_rng(5), T=20, scale=3.0)
    for fn in (ctc.greedy, ctc.beam):
        a, b = fn(lp), fn(torch.tensor(lp))
        assert a == b


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("call,message", [
    (lambda: ctc.greedy(np.zeros((5, 10))), r"shape \(T, K\) with K = 11"),
    (lambda: ctc.greedy(np.full((2, 5, K), -math.log(K))), r"shape \(T, K\)"),
    (lambda: ctc.greedy_batch(frames("12")), r"shape \(B, T, K\)"),
    (lambda: ctc.greedy(np.zeros((3, K), dtype=np.int64)), "floats"),
    (lambda: ctc.greedy(np.where(np.eye(3, K) > 0, np.nan, -2.4)), "finite or -inf"),
    (lambda: ctc.greedy(np.zeros((3, K))), "log_softmax output, not raw logits"),
    (lambda: ctc.greedy(np.full((3, K), -math.inf)), "-inf for every class"),
    (lambda: ctc.beam(frames("12"), beam_width=0), r"beam_width must be an int in 1\.\.64"),
    (lambda: ctc.beam(frames("12"), beam_width=100), r"beam_width must be an int in 1\.\.64"),
    (lambda: ctc.beam(frames("12"), beam_width=2.0), "beam_width must be an int"),
    (lambda: ctc.beam(frames("12"), pattern=r"\d+"), "pattern must be"),
    (lambda: ctc.string_log_prob(frames("12"), "a"), "holds 'a'"),
    (lambda: ctc.align(frames("12"), "1a"), "holds 'a'"),
    (lambda: ctc.greedy_batch(np.stack([frames("12")]), [3]), r"lengths must lie in 0\.\.2"),
    (lambda: ctc.greedy_batch(np.stack([frames("12")]), [1, 2]), "lengths must be 1 whole numbers"),
])  # fmt: skip
def test_bad_inputs_are_refused_with_a_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------ several readings
@pytest.mark.parametrize("seed", range(3))
def test_beam_many_of_one_reading_is_beam(seed):
    lp = random_log_probs(np.random.default_rng(seed), T=6)
    assert ctc.beam_many([lp], 8) == ctc.beam(lp, 8)
    pattern = compile_pattern(r"\d{2,3}")
    assert ctc.beam_many([lp], 8, pattern) == ctc.beam(lp, 8, pattern)


def test_beam_many_answers_the_string_most_probable_over_every_reading(monkeypatch):
    # reading A: "12" barely ahead of "13"; reading B (another height of the same row): "13" far ahead
    a, b = frames("1_2_"), frames("1__3_")
    a[2] = np.log(np.r_[[0.05], [0.9 / 9] * 10])  # frame 2 of A: '2' 0.5, '3' 0.4, the rest 0.1 together
    a[2, ALPHABET.index("2") + 1], a[2, ALPHABET.index("3") + 1] = np.log(0.5), np.log(0.4)
    a[2] -= np.logaddexp.reduce(a[2])
    assert ctc.beam(a).text == "12" and ctc.beam(b).text == "13"
    out = ctc.beam_many([a, b], 8)
    mean = (ctc.string_log_prob(a, "13") + ctc.string_log_prob(b, "13")) / 2
    assert out.text == "13" and out.confidence == pytest.approx(math.exp(mean), rel=1e-9)
    assert out.char_frames == tuple(ctc.align(a, "13"))  # the first reading places the characters
    # the order decides only the frames, never the string
    assert ctc.beam_many([b, a], 8).text == "13"
    # with a pattern only the matching candidates compete
    assert ctc.beam_many([a, b], 8, compile_pattern("12")).text == "12"
    assert ctc.beam_many([a, b], 8, compile_pattern(r"\d{6}")).matched is False  # 6 digits need 11 frames
    # the first reading's search, when the caller already has it, is taken as it is: same answer, not searched again
    calls = []
    original = ctc.beam
    monkeypatch.setattr(ctc, "beam", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    assert ctc.beam_many([a, b], 8, first=original(a, 8)) == out and len(calls) == 1  # only b's


def test_beam_many_keeps_to_the_first_reading_when_no_candidate_fits_them_all():
    long_ = frames("1_1_1_1_")
    long_[:, ALPHABET.index("7") + 1] = -np.inf  # "7" cannot be read here ...
    long_ -= np.logaddexp.reduce(long_, axis=1, keepdims=True)
    short = frames("7")  # ... nor can "1111" in one frame
    out = ctc.beam_many([long_, short], 8)
    assert out == ctc.beam(long_, 8) and out.text == "1111"


def test_beam_many_refuses_a_bare_array_or_nothing():
    with pytest.raises(ValueError, match="non-empty list"):
        ctc.beam_many(frames("1"))
    with pytest.raises(ValueError, match="non-empty list"):
        ctc.beam_many([])
