"""digitkit.segment: rows of digits -> one box per digit, on drawn shapes and on synth strips of MNIST digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from digitkit import preprocess as P
from digitkit import synth
from digitkit.data import load_split
from digitkit.errors import ConfigError
from digitkit.segment import Box, SegmentConfig, segment, segment_digits
from tests.conftest import MNIST_DIR


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    ds = load_split(MNIST_DIR, "test")
    return ds.images[:, 0].numpy(), ds.labels.numpy()


def drawing(width: int, shapes: list[tuple[str, tuple[int, ...]]], height: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(ink, mask) of white shapes drawn on black: ("line", (x0, y0, x1, y1)) or ("ellipse", (x0, y0, x1, y1))."""
    img = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(img)
    for kind, xy in shapes:
        if kind == "line":
            d.line(xy, fill=255, width=8)
        else:
            d.ellipse(xy, outline=255, width=8)
    ink = np.asarray(img, np.float32) / 255
    return ink, ink > 0.5


def iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_config_checks() -> None:
    SegmentConfig()
    for bad in ({"merge_max_height": 1.5}, {"valley_fraction": -0.1}, {"split_width_ratio": 0.4},
                {"split_width_ratio": 2.0}, {"digit_width_ratio": 0.0}):  # fmt: skip
        with pytest.raises(ConfigError, match="segment\\."):
            SegmentConfig(**bad)


def test_empty_and_single() -> None:
    assert segment(np.zeros((50, 80)), np.zeros((50, 80), bool)) == []
    ink, mask = drawing(120, [("line", (60, 10, 60, 90))])
    boxes = segment(ink, mask)
    assert len(boxes) == 1 and isinstance(boxes[0], Box)
    ys, xs = np.nonzero(mask)
    assert boxes[0] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    with pytest.raises(ValueError, match="same shape"):
        segment(ink, mask[:, :-1])


def test_separate_digits_left_to_right_and_specks_dropped() -> None:
    ink, mask = drawing(400, [("ellipse", (250, 10, 310, 90)), ("line", (40, 10, 40, 90)),
                              ("ellipse", (120, 10, 180, 90))])  # fmt: skip
    mask[50:52, 350:352] = True  # a speck
    boxes = segment(ink, mask)
    assert [b.x0 for b in boxes] == sorted(b.x0 for b in boxes) and len(boxes) == 3
    assert boxes[0].x1 < 60 and boxes[1].x0 > 100 and boxes[2].x0 > 240


def test_broken_strokes_are_merged() -> None:
    # A "5" whose bar does not touch the body, and a "1" drawn as a dotted line: one digit each.
    ink, mask = drawing(300, [("line", (40, 12, 100, 12)), ("line", (40, 24, 40, 50)), ("ellipse", (30, 44, 100, 92)),
                              ("line", (200, 10, 200, 30)), ("line", (200, 40, 200, 60)), ("line", (200, 70, 200, 90))])
    boxes = segment(ink, mask)
    assert len(boxes) == 2
    assert boxes[0].y0 < 12 and boxes[0].y1 > 88 and boxes[1].y0 <= 10 and boxes[1].y1 >= 88


def test_touching_digits_are_split_and_crops_keep_only_their_ink() -> None:
    # Two "0"s joined by a stroke at mid height: one component, thin where the digits meet.
    zeros_and_bridge = [("ellipse", (20, 10, 80, 90)), ("line", (76, 50, 104, 50)), ("ellipse", (100, 10, 160, 90))]
    ink, mask = drawing(180, zeros_and_bridge)
    assert ndimage.label(mask, np.ones((3, 3)))[1] == 1
    parts = segment_digits(ink, mask)
    assert len(parts) == 2
    (a, crop_a), (b, crop_b) = parts
    assert 78 <= a.x1 <= 102 and 78 <= b.x0 <= 102 and a.x1 <= b.x0
    assert a.x1 - a.x0 < 85 and b.x1 - b.x0 < 85  # each a "0" with at most a stub of the joining stroke
    assert crop_a.shape == (a.y1 - a.y0, a.x1 - a.x0) and crop_a.max() == 1.0
    assert crop_b.shape == (b.y1 - b.y0, b.x1 - b.x0) and crop_b.max() == 1.0
    assert P.normalize_digit(crop_a).shape == (28, 28)


def test_wide_single_digits_are_rarely_cut(mnist_test) -> None:
    """The widest MNIST digits (wider than 1.2x their height: 2.3% of the test set), alone in a strip: cutting
    them would often leave a flat piece (a 2's tail, a 5's bar), which min_part_height_ratio forbids. Measured:
    27 of these 40 stay whole (0.68); the rest are cut in two (at 1.5x the height a cut is forced)."""
    x, y = mnist_test
    m = x > 64
    aspect = np.array([np.ptp(np.nonzero(r.any(0))[0]) / max(np.ptp(np.nonzero(r.any(1))[0]), 1) for r in m[:3000]])
    wide = np.flatnonzero(aspect > 1.2)[:40]
    whole = 0
    for i in wide:
        img, _, _ = synth.strip([x[i]], labels=[int(y[i])], seed=int(i))
        ink, mask, _ = P.ink_image(P.load_image(img))
        whole += len(segment(ink, mask)) == 1
    assert whole / len(wide) >= 0.6


def strips(x: np.ndarray, y: np.ndarray, n: int, kmin: int, kmax: int, **kw: float) -> list[tuple]:
    """(ink, mask, true boxes) for n synth strips of kmin..kmax MNIST digits, through preprocess.ink_image."""
    out = []
    for s in range(n):
        rng = np.random.default_rng([21, s])
        k = int(rng.integers(kmin, kmax + 1))
        idx = rng.integers(0, len(x), k)
        img, _, boxes = synth.strip(list(x[idx]), labels=list(y[idx]), seed=rng, **kw)
        ink, mask, _ = P.ink_image(P.load_image(img))
        out.append((ink, mask, boxes))
    return out


def rates(items: list[tuple]) -> tuple[float, float]:
    """(share of strips with the right number of boxes, share with every box at IoU > 0.5 with the truth)."""
    count = good = 0
    for ink, mask, truth in items:
        got = segment(ink, mask)
        assert [b.x0 + b.x1 for b in got] == sorted(b.x0 + b.x1 for b in got)  # left to right
        if len(got) == len(truth):
            count += 1
            good += all(iou(a, b) > 0.5 for a, b in zip(got, truth, strict=True))
    return count / len(items), good / len(items)


# Measured on seeds [21, s] and [31, s] (the parameters were tuned on other seeds, [11, s]), 60 strips of 3-6
# digits each unless said: separated 0.95 / 0.90 of strips with the right count (every box IoU > 0.5 in all of
# them); every digit broken 0.90 / 0.88; touching pairs (2 digits whose inks form one component) 0.55 / 0.60
# (0.53 / 0.54 with both boxes right); 30% touching and 30% broken 0.62 / 0.70. Rows where every pair touches
# are the hard case: 0.30 — width and ink valleys alone cannot tell "11" from a wide 4.


def test_separated_strips(mnist_test) -> None:
    count, good = rates(strips(*mnist_test, 40, 3, 6))
    assert count >= 0.8 and good >= 0.8


def test_broken_strips(mnist_test) -> None:
    count, good = rates(strips(*mnist_test, 40, 3, 6, broken=1.0))
    assert count >= 0.75 and good >= 0.75


def test_touching_pairs(mnist_test) -> None:
    items = [s for s in strips(*mnist_test, 60, 2, 2, touch=1.0) if ndimage.label(s[1], np.ones((3, 3)))[1] == 1]
    assert len(items) >= 40
    count, good = rates(items)
    assert count >= 0.4 and good >= 0.4


def test_mixed_strips(mnist_test) -> None:
    count, good = rates(strips(*mnist_test, 40, 3, 6, touch=0.3, broken=0.3))
    assert count >= 0.5 and good >= 0.45
