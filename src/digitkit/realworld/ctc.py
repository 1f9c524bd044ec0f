"""CTC decoding for the digit-string recognizer: per-frame log-probabilities in, a read string with confidences out.

The sequence CNN reads a row of handwritten digits and emits, for each horizontal frame t, log-probabilities over
K = 11 classes: class 0 is the CTC blank, class i + 1 is the digit ALPHABET[i]. This module turns that (T, K) array
into text. It is pure (numpy and torch only, no I/O), so the CLI, the server and the benchmarks all share it.

    greedy(lp)                    best path, collapsed: fast, and right whenever the network is confident
    greedy_batch(lp, lengths)     the same for a padded batch (B, T, K), argmax done once for the whole batch
    beam(lp, 8, pattern)          prefix beam search: finds the most probable *string*, which the best path can miss
                                  (two frames with blank 0.4 and '1' 0.35 each: best path "", yet P("1") = 0.40 >
                                  P("") = 0.16), and can be restricted to strings matching a `Pattern`
    string_log_prob(lp, text)     exact log P(text): the CTC forward algorithm, summing over every alignment
    align(lp, text)               Viterbi forced alignment: the frames each character occupies (boxes to draw)

Every decoder returns a `Decoded`: `confidence` is always the exact probability of the whole string (the forward
algorithm, never a beam's partial sum), so it means the same thing whichever decoder produced the text; the
per-character confidences and frames come from the single best alignment of that text, which is what a box drawn
around a character should follow.

Inputs are checked, not trusted: a wrong shape, NaN or +inf, or rows that are not log-probabilities (raw logits
passed by mistake) raise ValueError saying what was expected. Rows are renormalised after that check, so float16 or
float32 rounding cannot push a confidence above 1.

Speed (T up to ~400): greedy is one argmax plus numpy over the collapsed path; the forward algorithm and the
alignment loop over frames but are vectorised over the 2L + 1 states of the blank-interleaved label sequence; the
beam search loops over frames, scoring each frame's width x 10 extensions as one numpy array, and ignores classes
far below a frame's best (see PRUNE). On a (100, 11) input: greedy < 1 ms, beam width 8 ~ 5 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from digitkit.realworld.pattern import Pattern

BLANK = 0
"""The CTC blank's class index."""
ALPHABET = "0123456789"
"""Class i + 1 is ALPHABET[i]."""
K = len(ALPHABET) + 1
"""Classes per frame: the blank and one per character."""

MAX_BEAM = 64
"""Largest beam width accepted; wider beams buy nothing on digit strings and cost time linearly."""
PRUNE = 12.0
"""The beam search ignores, at each frame, classes more than PRUNE nats below that frame's best class.

Why it is safe: the best class has log-prob <= 0, so a pruned class has probability below e^-12 at its frame, a
frame's pruned classes together below 10 * e^-12, and all paths through any pruned class together below
10 * T * e^-12 (6e-4 at T = 100, 2.5e-3 at T = 400). Pruning thus changes the probability of any string, as the
search sees it, by less than that: it can only lose strings no reading should be built on, and whichever string
wins, its reported confidence is computed exactly afterwards. Why: no beam slot (of at most 64) is spent on
noise-level classes, and the candidates a frame contributes are those that can matter."""
NORM_TOL = 0.01
"""How far a row's log-sum-exp may be from 0 (its probabilities summing to 1 within ~1%): loose enough for float16
log_softmax output, tight enough to catch raw logits."""

_NEG_INF = -math.inf


@dataclass(frozen=True)
class Decoded:
    """A read string and how sure the decoder is of it."""

    text: str
    confidence: float
    """P(text): the sum over all CTC alignments of the string, exp(-CTC loss), in [0, 1]."""
    char_confidences: tuple[float, ...]
    """Per character: its highest probability over the frames the best alignment gives it."""
    char_frames: tuple[tuple[int, int], ...]
    """Per character: the first and last frame (inclusive) the best alignment gives it."""
    matched: bool = True
    """False only when a pattern was given and no string matching it could be decoded (then text is "")."""


# ------------------------------------------------------------------------------------------ validation
def _to_numpy(log_probs: Any, ndim: int, shape_hint: str, func: str) -> np.ndarray:
    """A float64 copy of `log_probs` with the expected rank and class count, or ValueError saying what was wrong."""
    if isinstance(log_probs, torch.Tensor):
        if not log_probs.is_floating_point():
            raise ValueError(f"{func}: log_probs must be a float tensor of log-probabilities, got dtype "
                             f"{log_probs.dtype}")  # fmt: skip
        arr = log_probs.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(log_probs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{func}: log_probs must be a numpy array or torch tensor {shape_hint}, got "
                             f"{type(log_probs).__name__}") from e  # fmt: skip
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{func}: log_probs must be floats (log-probabilities), got dtype {arr.dtype}")
        arr = arr.astype(np.float64, copy=True)
    if arr.ndim != ndim or arr.shape[-1] != K:
        raise ValueError(f"{func}: log_probs must have shape {shape_hint} with K = {K} classes (blank + digits "
                         f"{ALPHABET}), got shape {tuple(arr.shape)}")  # fmt: skip
    return arr


def _normalised_rows(rows: np.ndarray, func: str, name: Callable[[int], str]) -> np.ndarray:
    """Check (N, K) rows are log-probabilities (no NaN or +inf, at least one finite entry, summing to 1 within
    NORM_TOL) and return them renormalised exactly; `name(i)` says which frame a message is about."""
    if rows.shape[0] == 0:
        return rows
    bad = np.isnan(rows) | np.isposinf(rows)
    if bad.any():
        i = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"{func}: log_probs must be finite or -inf, but {name(i)} holds "
                         f"{rows[i][bad[i]][0]} (expected log_softmax output)")  # fmt: skip
    top = rows.max(axis=1)
    if np.isneginf(top).any():
        i = int(np.flatnonzero(np.isneginf(top))[0])
        raise ValueError(f"{func}: {name(i)} is -inf for every class (probability 0 everywhere); each frame must be "
                         "a probability distribution (expected log_softmax output)")  # fmt: skip
    lse = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    off = np.abs(lse) > NORM_TOL
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ValueError(f"{func}: each frame must hold log-probabilities whose probabilities sum to 1, but "
                         f"{name(i)} sums to {math.exp(lse[i]):.6g} (pass log_softmax output, not raw "
                         "logits)")  # fmt: skip
    return rows - lse[:, None]


def _checked_row(log_probs: Any, func: str) -> np.ndarray:
    arr = _to_numpy(log_probs, 2, "(T, K)", func)
    return _normalised_rows(arr, func, lambda i: f"frame {i}")


def _labels(text: Any, func: str) -> np.ndarray:
    """Class indices of `text` (digit d is class d + 1)."""
    if not isinstance(text, str):
        raise ValueError(f"{func}: text must be a str of digits from {ALPHABET!r}, got {type(text).__name__}")
    bad = [ch for ch in text if ch not in ALPHABET]
    if bad:
        raise ValueError(f"{func}: text {text!r} holds {bad[0]!r}; only the characters {ALPHABET!r} can be read")
    return np.fromiter((ALPHABET.index(ch) + 1 for ch in text), dtype=np.int64, count=len(text))


def _min_frames(labels: np.ndarray) -> int:
    """Frames a label sequence needs: one per character plus a blank between each pair of equal neighbours."""
    return len(labels) + int(np.count_nonzero(labels[1:] == labels[:-1]))


# ------------------------------------------------------------------------------------------ forward / Viterbi
def _extended(lp: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blank-interleaved sequence's per-frame log-probs (T, S = 2L + 1) and the additive skip mask (S,):
    0 where state s may be entered from s - 2 (a character differing from the one two states back), else -inf."""
    ext = np.zeros(2 * len(labels) + 1, dtype=np.int64)  # BLANK everywhere, characters at odd states
    ext[1::2] = labels
    skip = np.full(len(ext), _NEG_INF)
    if len(ext) > 2:
        skip[2:] = np.where((ext[2:] != BLANK) & (ext[2:] != ext[:-2]), 0.0, _NEG_INF)
    return lp[:, ext], skip


def _forward(lp: np.ndarray, labels: np.ndarray) -> float:
    """log P(labels) by the CTC forward algorithm over normalised (T, K) rows."""
    T = lp.shape[0]
    if _min_frames(labels) > T:
        return _NEG_INF
    if T == 0:
        return 0.0  # only reachable with no labels: the empty string is certain when there are no frames
    lp_ext, skip = _extended(lp, labels)
    S = lp_ext.shape[1]
    alpha = np.full(S, _NEG_INF)
    alpha[:2] = lp_ext[0, :2]
    new = np.empty(S)
    skip2 = skip[2:]
    for t in range(1, T):
        new[0] = alpha[0]
        np.logaddexp(alpha[1:], alpha[:-1], out=new[1:])
        if S > 2:
            np.logaddexp(new[2:], alpha[:-2] + skip2, out=new[2:])
        new += lp_ext[t]
        alpha, new = new, alpha
    return float(np.logaddexp(alpha[-1], alpha[-2])) if S > 1 else float(alpha[0])


def _viterbi(lp: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """(L, 2) first and last frame of each character on the most probable alignment, or None if there is none."""
    T, L = lp.shape[0], len(labels)
    if _min_frames(labels) > T:
        return None
    if L == 0:
        return np.zeros((0, 2), dtype=np.int64)
    lp_ext, skip = _extended(lp, labels)
    S = lp_ext.shape[1]
    back = np.zeros((T, S), dtype=np.int8)  # how many states back each best predecessor is: 0, 1 or 2
    delta = np.full(S, _NEG_INF)
    delta[:2] = lp_ext[0, :2]
    cand = np.full((3, S), _NEG_INF)
    for t in range(1, T):
        cand[0] = delta
        cand[1, 1:] = delta[:-1]
        cand[2, 2:] = delta[:-2] + skip[2:]
        back[t] = cand.argmax(axis=0)  # ties keep the earlier state, so characters start as late as possible
        delta = cand.max(axis=0) + lp_ext[t]
    end = S - 1 if delta[S - 1] >= delta[S - 2] else S - 2
    if delta[end] == _NEG_INF:
        return None
    states = np.empty(T, dtype=np.int64)
    s = end
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(back[t, s])
    # states never decrease along a path, so each character's frames are one run found by binary search
    char_states = 2 * np.arange(L) + 1
    first = np.searchsorted(states, char_states, side="left")
    last = np.searchsorted(states, char_states, side="right") - 1
    return np.stack([first, last], axis=1)


def _char_confidences(lp: np.ndarray, labels: np.ndarray, frames: np.ndarray) -> tuple[float, ...]:
    pairs = zip(labels.tolist(), frames.tolist(), strict=True)
    return tuple(float(np.exp(lp[a : b + 1, c].max())) for c, (a, b) in pairs)


def _decoded(lp: np.ndarray, labels: np.ndarray, frames: np.ndarray) -> Decoded:
    text = "".join(ALPHABET[c - 1] for c in labels.tolist())
    confidence = min(1.0, math.exp(_forward(lp, labels)))  # min: rounding may land a hair above 1
    return Decoded(text, confidence, _char_confidences(lp, labels, frames),
                   tuple((int(a), int(b)) for a, b in frames.tolist()))  # fmt: skip


def string_log_prob(log_probs: torch.Tensor | np.ndarray, text: str) -> float:
    """log P(text) under (T, K) log-probabilities: the CTC forward algorithm in log space, summing over every
    alignment; -inf when no alignment exists (e.g. "11" needs 3 frames, for the blank between the ones)."""
    lp = _checked_row(log_probs, "string_log_prob")
    return _forward(lp, _labels(text, "string_log_prob"))


def align(log_probs: torch.Tensor | np.ndarray, text: str) -> list[tuple[int, int]]:
    """Viterbi forced alignment of `text`: each character's (first, last) frame, inclusive, on its most probable
    alignment. The ranges are increasing and disjoint. ValueError when `text` cannot be aligned at all."""
    lp = _checked_row(log_probs, "align")
    labels = _labels(text, "align")
    frames = _viterbi(lp, labels)
    if frames is None:
        raise ValueError(f"align: {text!r} cannot be aligned to these {lp.shape[0]} frames: it needs at least "
                         f"{_min_frames(labels)} frames and a non-zero probability for each character")  # fmt: skip
    return [(int(a), int(b)) for a, b in frames.tolist()]


# ------------------------------------------------------------------------------------------ greedy
def _greedy_row(lp: np.ndarray, path: np.ndarray) -> Decoded:
    """Decode one row from its best path. That path is also the Viterbi alignment of the text it collapses to (no
    path scores higher, so none of the text's paths does), so the character frames come from it without a search."""
    if len(path) == 0:
        return Decoded("", 1.0, (), ())
    prev = np.concatenate(([BLANK], path[:-1]))
    starts = np.flatnonzero((path != BLANK) & (path != prev))
    nxt = np.concatenate((path[1:], [BLANK]))
    ends = np.flatnonzero((path != BLANK) & (path != nxt))
    labels = path[starts]
    return _decoded(lp, labels, np.stack([starts, ends], axis=1))


def greedy(log_probs: torch.Tensor | np.ndarray) -> Decoded:
    """Best-path decoding of one row (T, K): the most probable class per frame, repeats collapsed, blanks dropped."""
    lp = _checked_row(log_probs, "greedy")
    return _greedy_row(lp, lp.argmax(axis=1))


def greedy_batch(log_probs: torch.Tensor | np.ndarray,
                 lengths: torch.Tensor | np.ndarray | Sequence[int] | None = None) -> list[Decoded]:  # fmt: skip
    """`greedy` for a padded batch (B, T, K): row b uses frames 0..lengths[b] - 1 (all T when lengths is None);
    later frames are ignored, not even validated, so padding may hold anything."""
    arr = _to_numpy(log_probs, 3, "(B, T, K)", "greedy_batch")
    B, T = arr.shape[:2]
    if lengths is None:
        lens = np.full(B, T, dtype=np.int64)
    else:
        raw = lengths.detach().cpu().numpy() if isinstance(lengths, torch.Tensor) else np.asarray(lengths)
        if raw.shape != (B,) or not (np.issubdtype(raw.dtype, np.integer) or (
                np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw)))):  # fmt: skip
            raise ValueError(f"greedy_batch: lengths must be {B} whole numbers (one per row), got shape "
                             f"{tuple(raw.shape)} and dtype {raw.dtype}")  # fmt: skip
        lens = raw.astype(np.int64)
        if B and (lens.min() < 0 or lens.max() > T):
            raise ValueError(f"greedy_batch: lengths must lie in 0..{T} (the frame count), got {lens.tolist()}")
    valid = np.arange(T)[None, :] < lens[:, None]
    where = np.argwhere(valid)
    arr[valid] = _normalised_rows(arr[valid], "greedy_batch",
                                  lambda i: f"row {where[i][0]} frame {where[i][1]}")  # fmt: skip
    paths = arr.argmax(axis=2)
    return [_greedy_row(arr[b, : lens[b]], paths[b, : lens[b]]) for b in range(B)]


# ------------------------------------------------------------------------------------------ beam search
def _lae(a: float, b: float) -> float:
    """log(e^a + e^b) for scalars (math has no logaddexp, and np.logaddexp costs ~1 us per scalar call)."""
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def beam(log_probs: torch.Tensor | np.ndarray, beam_width: int = 8, pattern: Pattern | None = None) -> Decoded:
    """CTC prefix beam search for the most probable string of one row (T, K).

    Each prefix keeps two log-probabilities, of its paths ending in a blank and in its last character, because the
    next frame's character extends them differently (after a blank a repeat is a new character; otherwise it merges).
    Identical prefixes are merged and the `beam_width` best kept each frame. With a `pattern`, a prefix is extended
    only by characters that keep it a viable prefix of a match, and only prefixes the pattern accepts may win; when
    none is left in the final beam, the result is Decoded("", 0.0, (), (), matched=False) (a wider beam may still
    find one when the match is possible but unlikely). The confidence is the exact P(text) from
    the forward algorithm, not the beam's partial sum.

    The loop is over frames; within a frame the beam's 10 x width extensions are scored as one numpy array rather
    than one Python step each (about 5x faster at width 8, 10x at 64), and only the survivors become tuples."""
    lp = _checked_row(log_probs, "beam")
    if isinstance(beam_width, bool) or not isinstance(beam_width, (int, np.integer)) or \
            not 1 <= beam_width <= MAX_BEAM:  # fmt: skip
        raise ValueError(f"beam: beam_width must be an int in 1..{MAX_BEAM}, got {beam_width!r}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise ValueError(f"beam: pattern must be a digitkit.realworld.pattern.Pattern (see compile_pattern) or None, "
                         f"got {type(pattern).__name__}")  # fmt: skip
    width = int(beam_width)
    n_chars = K - 1
    pruned = np.where(lp >= lp.max(axis=1, keepdims=True) - PRUNE, lp, _NEG_INF)

    # per pattern state set: an additive mask over the 10 characters (0 allowed, -inf not) and the next state sets
    moves: dict[frozenset[int], tuple[np.ndarray, list[frozenset[int] | None]]] = {}

    def moves_from(states: frozenset[int]) -> tuple[np.ndarray, list[frozenset[int] | None]]:
        got = moves.get(states)
        if got is None:
            assert pattern is not None
            nexts: list[frozenset[int] | None] = []
            for ch in ALPHABET:
                nxt = pattern.step(states, ch)
                nexts.append(nxt if nxt and pattern.viable(nxt) else None)
            mask = np.array([0.0 if nxt is not None else _NEG_INF for nxt in nexts])
            got = moves[states] = (mask, nexts)
        return got

    # the beam, one entry per prefix (a tuple of classes): log P of its paths ending in a blank (pb) and in its last
    # class (pnb), that last class (BLANK for the empty prefix) and its pattern state set
    prefixes: list[tuple[int, ...]] = [()]
    pb, pnb, last = np.array([0.0]), np.array([_NEG_INF]), np.array([BLANK])
    state_sets: list[frozenset[int]] = [pattern.start() if pattern is not None else frozenset()]
    for t in range(lp.shape[0]):
        if not prefixes:  # a pattern ruled out every prefix
            break
        r = pruned[t]
        n = len(prefixes)
        total = np.logaddexp(pb, pnb)
        stay_b = total + r[BLANK]
        r_repeat = r.copy()
        r_repeat[BLANK] = _NEG_INF  # the empty prefix has no last character to repeat
        repeat = r_repeat[last]
        stay_nb = pnb + repeat  # "1 1" merges into the same "1"
        ext = total[:, None] + r[None, 1:]  # (n, 10): prefix + (c,)
        rep = np.flatnonzero(last != BLANK)
        ext[rep, last[rep] - 1] = pb[rep] + repeat[rep]  # a second "1" after "1" needs a blank in between
        if pattern is not None:
            ext += np.stack([moves_from(s)[0] for s in state_sets])
        # an extension can only coincide with a prefix already in the beam (never with another extension): merge
        index = {p: j for j, p in enumerate(prefixes)}
        for j, p in enumerate(prefixes):
            i = index.get(p[:-1]) if p else None
            if i is not None:
                stay_nb[j] = _lae(float(stay_nb[j]), float(ext[i, p[-1] - 1]))
                ext[i, p[-1] - 1] = _NEG_INF
        scores = np.concatenate([np.logaddexp(stay_b, stay_nb), ext.ravel()])
        order = np.argsort(-scores, kind="stable")[:width]
        order = order[scores[order] > _NEG_INF]
        is_stay = order < n
        parent = np.where(is_stay, order, (order - n) // n_chars)
        char = np.where(is_stay, last[np.minimum(order, n - 1)], (order - n) % n_chars + 1)
        pb = np.where(is_stay, stay_b[np.minimum(order, n - 1)], _NEG_INF)
        pnb = np.where(is_stay, stay_nb[np.minimum(order, n - 1)], ext.ravel()[np.maximum(order - n, 0)])
        new_prefixes, new_states = [], []
        for stays, i, c in zip(is_stay.tolist(), parent.tolist(), char.tolist(), strict=True):
            if stays:
                new_prefixes.append(prefixes[i])
                new_states.append(state_sets[i])
            else:
                new_prefixes.append(prefixes[i] + (c,))
                new_states.append(moves_from(state_sets[i])[1][c - 1] if pattern is not None else state_sets[i])
        prefixes, state_sets, last = new_prefixes, new_states, char

    # the most probable surviving prefix (the pattern accepting it); ties go to the shorter, then the smaller one
    totals = np.logaddexp(pb, pnb).tolist() if prefixes else []
    ranked = sorted(range(len(prefixes)), key=lambda j: (-totals[j], len(prefixes[j]), prefixes[j]))
    best = next((prefixes[j] for j in ranked
                 if totals[j] > _NEG_INF and (pattern is None or pattern.accepts(state_sets[j]))), None)  # fmt: skip
    if best is None:  # only with a pattern: without one the empty prefix or an extension always survives
        return Decoded("", 0.0, (), (), matched=False)
    labels = np.asarray(best, dtype=np.int64)
    frames = _viterbi(lp, labels)
    assert frames is not None  # the beam reached `best` along a path of non-zero probability
    return _decoded(lp, labels, frames)


def beam_many(readings: Sequence[torch.Tensor | np.ndarray], beam_width: int = 8,
              pattern: Pattern | None = None, first: Decoded | None = None) -> Decoded:  # fmt: skip
    """One row read several ways (the reader's `inference.row_ink_fractions`: the row at several ink heights), each
    a (T_i, K) array: every reading's `beam` string is a candidate, and the one with the highest mean log P(text)
    over all the readings wins (a product of experts: a string each reading finds likely). Its confidence is that
    mean as a probability (the geometric mean of its probabilities); its frames and character confidences are the
    first reading's (whose geometry places the boxes). One reading: exactly `beam`. When no candidate has a non-zero
    probability under every reading (a reading too short for a long string), the first reading's `beam` answers.
    `first`, when the caller already has it, is `beam(readings[0], beam_width, pattern)` and is not searched again."""
    if isinstance(readings, np.ndarray | torch.Tensor) or not readings:
        raise ValueError("beam_many: readings must be a non-empty list of (T, K) log-probability arrays, one per "
                         f"reading of the row; got {type(readings).__name__}")  # fmt: skip
    lps = [_checked_row(r, "beam_many") for r in readings]
    if first is None:
        first = beam(readings[0], beam_width, pattern)
    if len(lps) == 1:
        return first
    texts = [first.text] if first.matched else []
    for lp in lps[1:]:
        d = beam(lp, beam_width, pattern)
        if d.matched and d.text not in texts:
            texts.append(d.text)
    if not texts:
        return first

    def mean_log_prob(text: str) -> float:
        labels = _labels(text, "beam_many")
        return sum(_forward(lp, labels) for lp in lps) / len(lps)

    # ties go to the shorter, then the smaller string, as in `beam`
    score, best = max(((mean_log_prob(t), t) for t in texts), key=lambda s: (s[0], -len(s[1]), [-ord(c) for c in s[1]]))
    if score == _NEG_INF:
        return first
    labels = _labels(best, "beam_many")
    frames = _viterbi(lps[0], labels)
    assert frames is not None  # finite under every reading, the first included
    return Decoded(best, min(1.0, math.exp(score)), _char_confidences(lps[0], labels, frames),
                   tuple((int(a), int(b)) for a, b in frames.tolist()))  # fmt: skip
