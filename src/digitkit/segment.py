"""Multi-digit segmentation: the ink of a row of handwritten digits -> one box per digit, left to right.

Works on what `preprocess.ink_image` returns (white-on-black ink and its mask, specks and border shadows already
gone), for one row of digits. Three steps on the connected components of the mask:

1. drop specks (tiny against the largest component);
2. merge the pieces of one digit: a pen that skipped leaves pieces shorter than the row (the bar of a 5, a dotted
   stroke); each joins the neighbour its x-range overlaps most. Full-height components stay separate digits;
3. split what is too wide to be one digit (touching digits). The median digit height sets the scale: on MNIST a
   digit's box is 0.8 x its height wide (median; 95th percentile 1.1, 99th 1.4), so a wider group holds k ~
   width / (0.75 x height) digits. Each of the k - 1 cuts goes to the column crossed by the least ink (the
   valley of the vertical projection) near the even split, among the cuts that leave two full-height parts;
   below 1.5 x the height a cut is made only at a clear valley, so wide single digits mostly stay whole.

Measured rates (and what is hard: rows where every pair touches) are in tests/test_segment.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from digitkit.errors import ConfigError
from digitkit.preprocess import grow


class Box(NamedTuple):
    """A digit's box in pixels; x1 and y1 are exclusive (crop with ink[y0:y1, x0:x1])."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass
class SegmentConfig:
    """How a row of digits is cut into single digits. Sizes are relative to the median digit height."""

    min_speck_area_fraction: float = 0.02
    """Components smaller than this fraction of the largest one are specks and dropped."""
    merge_max_height: float = 0.75
    """A component shorter than this fraction of the row's height is a piece of a digit (the bar of a 5, a
    skipped stroke), not a digit: it joins the neighbour its x-range overlaps most (or the one less than a tenth
    of the height away). Full-height components are digits, however much they overlap."""
    split_width_ratio: float = 1.1
    """A group wider than this x the digit height may hold several digits. Single MNIST digits: median width 0.8
    x the height, 95th percentile 1.1, 99th 1.4; touching pairs: median 1.4."""
    sure_split_width_ratio: float = 1.5
    """A group wider than this x the digit height is always split; between split_width_ratio and this, only at
    a clear valley (valley_fraction)."""
    valley_fraction: float = 0.8
    """A cut is clear when the ink in its column is below this fraction of the group's median column ink.
    Measured on synth strips: groups over 1.1 x the height with such a valley are 71% of touching pairs and
    1.3% of single digits."""
    search_fraction: float = 0.4
    """Each cut is searched within this fraction of a digit width either side of the even split."""
    position_weight: float = 2.0
    """How much a cut prefers the even split of the group (k digits of equal width) over a deeper valley: cost
    per digit height of distance, against ink crossed in median columns."""
    digit_width_ratio: float = 0.75
    """Expected width of one touching digit as a fraction of the height: sets how many digits a wide group holds
    and where the cuts should fall (MNIST median 0.8, a little less since touching digits overlap)."""
    min_part_width_ratio: float = 0.25
    """No cut leaves a part narrower than this fraction of the height (a "1" is ~0.25-0.4)."""
    min_part_height_ratio: float = 0.6
    """No cut leaves a part shorter than this fraction of the height: cutting off the tail of a 2 or the bar of a
    5 leaves a flat piece, cutting between touching digits leaves two full-height ones."""

    def __post_init__(self) -> None:
        for name in ("min_speck_area_fraction", "merge_max_height", "valley_fraction", "min_part_width_ratio",
                     "min_part_height_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"segment.{name} = {getattr(self, name)}: expected a fraction in [0, 1]")
        if not 2 * self.min_part_width_ratio < self.split_width_ratio <= self.sure_split_width_ratio:
            raise ConfigError(f"segment.split_width_ratio = {self.split_width_ratio}: expected more than twice "
                              f"min_part_width_ratio ({self.min_part_width_ratio}) and at most "
                              f"sure_split_width_ratio ({self.sure_split_width_ratio})")
        if self.digit_width_ratio <= 0:
            raise ConfigError(f"segment.digit_width_ratio = {self.digit_width_ratio}: expected a positive ratio")


@dataclass
class _Group:
    """One digit candidate: some components, restricted to columns [cut0, cut1) when it came from a split."""

    labels: list[int]
    box: Box
    area: int
    cut0: int = 0
    cut1: int = 1 << 30


def segment(ink: np.ndarray, mask: np.ndarray, cfg: SegmentConfig | None = None) -> list[Box]:
    """Boxes of the digits in `mask` (H, W) bool, left to right. `ink` (H, W) float white-on-black weighs the
    projection used to cut touching digits."""
    return [box for box, _ in segment_digits(ink, mask, cfg)]


def segment_digits(ink: np.ndarray, mask: np.ndarray,
                   cfg: SegmentConfig | None = None) -> list[tuple[Box, np.ndarray]]:  # fmt: skip
    """Like `segment`, with each digit's own ink: a crop of `ink` to its box holding only that digit's pixels
    (its components, on its side of a cut, plus the soft stroke edges next to them), ready for
    preprocess.normalize_digit."""
    cfg = cfg or SegmentConfig()
    ink = np.asarray(ink, np.float32)
    mask = np.asarray(mask, bool)
    if ink.shape != mask.shape:
        raise ValueError(f"ink {ink.shape} and mask {mask.shape} must have the same shape")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    area = np.bincount(labels.ravel(), minlength=n + 1)
    slices = ndimage.find_objects(labels)
    groups = [_Group([i], _box(slices[i - 1]), int(area[i])) for i in range(1, n + 1)
              if area[i] >= cfg.min_speck_area_fraction * area[1:].max()]
    groups = _merge(groups, _row_height(labels), cfg)
    height = _median_height(groups)
    weight = np.where(mask, np.maximum(ink, 0.5), 0.0)  # the mask counts even where the ink is faint
    out: list[_Group] = []
    for g in groups:
        out.extend(_split(g, labels, weight, height, cfg))
    out.sort(key=lambda g: (g.box.x0 + g.box.x1) / 2)
    return [(g.box, _crop(ink, labels, g)) for g in out]


def _box(sl: tuple[slice, slice]) -> Box:
    return Box(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)


def _union(a: Box, b: Box) -> Box:
    return Box(min(a.x0, b.x0), min(a.y0, b.y0), max(a.x1, b.x1), max(a.y1, b.y1))


def _row_height(labels: np.ndarray) -> float:
    """The height of the row of digits: the vertical span of its ink (0.5th to 99.5th percentile of the ink
    pixels' rows, so a stray mark does not stretch it). Pieces of broken digits are shorter than this."""
    ys = np.nonzero(labels)[0]
    lo, hi = np.percentile(ys, [0.5, 99.5])
    return float(hi - lo + 1)


def _median_height(groups: list[_Group]) -> float:
    big = max(g.area for g in groups)
    return float(np.median([g.box.y1 - g.box.y0 for g in groups if g.area >= big / 3]))


def _merge(groups: list[_Group], row_height: float, cfg: SegmentConfig) -> list[_Group]:
    """Short pieces join the group their x-range overlaps most, one at a time, until none is left over."""
    groups = sorted(groups, key=lambda g: g.box.x0)
    while True:
        short = [g for g in groups if g.box.y1 - g.box.y0 < cfg.merge_max_height * row_height]
        best = None  # (overlap as a fraction of the piece's width, piece, partner)
        for piece in short:
            for other in groups:
                if other is piece:
                    continue
                overlap = min(piece.box.x1, other.box.x1) - max(piece.box.x0, other.box.x0)
                score = overlap / max(piece.box.x1 - piece.box.x0, 1)
                if overlap > -0.1 * row_height and (best is None or score > best[0]):
                    best = (score, piece, other)
        if best is None:
            return groups
        _, piece, other = best
        merged = _Group(other.labels + piece.labels, _union(other.box, piece.box), other.area + piece.area)
        groups = [merged if g is other else g for g in groups if g is not piece]


def _split(g: _Group, labels: np.ndarray, weight: np.ndarray, height: float, cfg: SegmentConfig) -> list[_Group]:
    """Cut a group too wide for one digit into k parts (k from its width), each cut at the column with the
    least ink near where an even split would put it."""
    width = g.box.x1 - g.box.x0
    if width <= cfg.split_width_ratio * height:
        return [g]
    rows, cols = slice(g.box.y0, g.box.y1), slice(g.box.x0, g.box.x1)
    own = np.isin(labels[rows, cols], g.labels)
    profile = ndimage.uniform_filter1d((weight[rows, cols] * own).sum(0), 3)
    typical = float(np.median(profile[profile > 0])) if (profile > 0).any() else 1.0
    # Per column, the top and bottom of the group's ink (empty columns: +inf / -inf), to know how tall the part
    # on each side of a cut would be.
    any_ink = own.any(0)
    top = np.where(any_ink, own.argmax(0), np.inf)
    bottom = np.where(any_ink, own.shape[0] - own[::-1].argmax(0), -np.inf)
    k = max(2, round(width / (cfg.digit_width_ratio * height)))
    step = width / k
    margin = max(1, int(cfg.min_part_width_ratio * height))
    min_height = cfg.min_part_height_ratio * height
    cuts: list[int] = []
    for i in range(1, k):
        start = cuts[-1] if cuts else 0
        lo = max(int(i * step - cfg.search_fraction * step), start + margin)
        hi = min(int(i * step + cfg.search_fraction * step), width - margin)
        if hi <= lo:
            continue
        x = np.arange(lo, hi)
        end = min(width, int((i + 1) * step + cfg.search_fraction * step)) if i < k - 1 else width
        left_h = _running_height(top[start:hi], bottom[start:hi])[lo - start - 1 : hi - start - 1]
        right_h = _running_height(top[lo:end][::-1], bottom[lo:end][::-1])[::-1][: hi - lo]
        # Ink crossed, in typical columns, plus the distance from the even split: on touching MNIST pairs the
        # deepest valley alone lands in the right place 24% of the time, with this pull 39% (and within 0.15 x
        # the height 76%), since digits have valleys of their own (the tail of a 2, the waist of an 8).
        cost = profile[lo:hi] / typical + cfg.position_weight * np.abs(x - i * step) / height
        cost[(left_h < min_height) | (right_h < min_height)] = np.inf
        if not np.isfinite(cost).any():
            continue
        best = int(x[np.argmin(cost)])
        if profile[best] < cfg.valley_fraction * typical or width > cfg.sure_split_width_ratio * height:
            cuts.append(best)
    parts = []
    for c0, c1 in zip([0, *cuts], [*cuts, width], strict=True):
        part = _Group(g.labels, g.box, g.area, g.box.x0 + c0, g.box.x0 + c1)
        box = _pixel_box(labels, part)
        if box is not None:
            parts.append(_Group(g.labels, box, g.area, part.cut0, part.cut1))
    return parts


def _running_height(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Height of the ink in columns [0, j] for every j (0 while there is none)."""
    h = np.maximum.accumulate(bottom) - np.minimum.accumulate(top)
    return np.where(np.isfinite(h), h, 0)


def _columns(g: _Group, cols: slice) -> np.ndarray:
    x = np.arange(cols.start, cols.stop)
    return ((x >= g.cut0) & (x < g.cut1))[None, :]


def _pixel_box(labels: np.ndarray, g: _Group) -> Box | None:
    """The tight box of the group's pixels (its components within its columns), None if there are none."""
    rows, cols = slice(g.box.y0, g.box.y1), slice(max(g.box.x0, g.cut0), min(g.box.x1, g.cut1))
    if cols.stop <= cols.start:
        return None
    ys, xs = np.nonzero(np.isin(labels[rows, cols], g.labels))
    if len(ys) == 0:
        return None
    return Box(cols.start + int(xs.min()), rows.start + int(ys.min()), cols.start + int(xs.max()) + 1,
               rows.start + int(ys.max()) + 1)


def _crop(ink: np.ndarray, labels: np.ndarray, g: _Group) -> np.ndarray:
    rows, cols = slice(g.box.y0, g.box.y1), slice(g.box.x0, g.box.x1)
    lab = labels[rows, cols]
    inside = _columns(g, cols)
    own = np.isin(lab, g.labels) & inside
    # Soft edges: ink in no component, next to this digit's pixels.
    edge = grow(own) & (lab == 0) & inside
    return np.where(own | edge, ink[rows, cols], 0.0).astype(np.float32)
