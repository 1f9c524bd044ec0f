"""digitkit.synth: deterministic, realistic user images made from 28x28 digits (fonts here, no MNIST needed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from digitkit import synth


@pytest.fixture(scope="module")
def digits() -> list[np.ndarray]:
    return [synth.font_digit(d, font) for d, font in ((2, "sans"), (7, "serif"), (4, "mono"))]


def ink_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def gray_of(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32).mean(-1) / 255 if img.ndim == 3 else img.astype(np.float32) / 255


# (kind, ndim, channels, (min side, max side) of the image)
SPECS = {
    "pen_on_paper": (3, 3, (80, 600)),
    "photo": (3, 3, (336, 960)),
    "scan": (2, None, (160, 480)),
    "canvas_rgba": (3, 4, (280, 280)),
    "tiny": (2, None, (48, 128)),
    "huge": (2, None, (1500, 2000)),
    "rotated": (3, 3, (150, 400)),
    "inverted": (2, None, (120, 500)),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_kinds_are_deterministic_and_as_documented(digits, kind: str) -> None:
    ndim, channels, (lo, hi) = SPECS[kind]
    make = synth.KINDS[kind]
    for seed, d in enumerate(digits[:2] if kind == "huge" else digits):
        a, b = make(d, seed), make(d, np.random.default_rng(seed))
        assert np.array_equal(a, b)  # an int seed and a Generator from it draw the same image
        assert a.dtype == np.uint8 and a.ndim == ndim and (channels is None or a.shape[2] == channels)
        assert lo <= min(a.shape[:2]) and max(a.shape[:2]) <= hi, a.shape
    assert not np.array_equal(make(digits[0], 0), make(digits[0], 1))


@pytest.mark.parametrize("kind", ["pen_on_paper", "photo", "scan", "tiny", "huge", "rotated"])
def test_dark_ink_on_light_paper_where_expected(digits, kind: str) -> None:
    for seed, d in enumerate(digits[:2]):
        g = gray_of(synth.KINDS[kind](d, seed))
        paper = np.median(g)
        assert paper > 0.5
        ink = ndimage.median_filter(g, 3) < paper - 0.12  # the median filter removes scan speckle
        assert 0.0005 < ink.mean() < 0.3
        # The ink is one digit-sized cluster: most of it inside a box that is a fraction of the image.
        y0, x0, y1, x1 = ink_box(ink)
        side = max(y1 - y0, x1 - x0)
        if kind == "tiny":
            assert 6 <= y1 - y0 <= 18
        else:
            assert 0.15 * min(g.shape) <= side <= max(g.shape)


def test_photo_has_uneven_light_and_colour_cast(digits) -> None:
    img = synth.photo(digits[0], 3).astype(np.float32) / 255
    g = img.mean(-1)
    h, w = g.shape
    quarters = [np.median(q) for q in (g[: h // 2, : w // 2], g[: h // 2, w // 2 :], g[h // 2 :, : w // 2],
                                       g[h // 2 :, w // 2 :])]  # fmt: skip
    assert max(quarters) - min(quarters) > 0.05  # lighting gradient, vignette, shadow
    r, _, b = (np.median(img[..., c]) for c in range(3))
    assert r - b > 0.03  # a warm cast


def test_inverted_is_light_ink_on_dark(digits) -> None:
    g = gray_of(synth.inverted(digits[1], 0))
    assert np.median(g) < 0.35 and np.percentile(g, 99.5) > 0.6


@pytest.mark.parametrize("stroke", ["black", "white"])
def test_canvas_rgba_is_a_transparent_canvas(digits, stroke: str) -> None:
    a = synth.canvas_rgba(digits[0], 0, stroke=stroke)
    alpha, rgb = a[..., 3], a[..., :3]
    assert (alpha == 0).mean() > 0.7 and alpha.max() == 255
    assert 0 < ((alpha > 0) & (alpha < 255)).sum()  # anti-aliased edges
    assert (rgb[alpha == 0] == 0).all()  # browsers write transparent pixels as black
    assert (rgb[alpha > 0] == (0 if stroke == "black" else 255)).all()
    with pytest.raises(ValueError, match="stroke"):
        synth.canvas_rgba(digits[0], 0, stroke="red")


def test_huge_has_thin_strokes(digits) -> None:
    g = gray_of(synth.huge(digits[0], 0))
    ink = g < 0.5
    y0, x0, y1, x1 = ink_box(ink)
    assert y1 - y0 > 1000
    dist = ndimage.distance_transform_edt(ink)
    assert 2 * dist.max() < 0.02 * (y1 - y0)  # the pen is at most ~1% of the height


def test_rotated_is_rotated() -> None:
    one = synth.font_digit(1, "sans")
    g = gray_of(synth.rotated(one, 0)) < 0.5
    ys, xs = np.nonzero(g)
    slope = np.polyfit(ys, xs, 1)[0]  # an upright "1" has x nearly constant along y
    assert abs(np.degrees(np.arctan(slope))) > 8


def test_font_digit() -> None:
    for font in synth.FONTS:
        a = synth.font_digit(8, font)
        assert a.shape == (28, 28) and a.dtype == np.uint8 and a.max() == 255
        y0, x0, y1, x1 = ink_box(a > 0)
        assert max(y1 - y0, x1 - x0) == 20
        yy, xx = np.mgrid[0:28, 0:28]
        assert abs((a * yy).sum() / a.sum() - 14) <= 1 and abs((a * xx).sum() / a.sum() - 14) <= 1
    assert not np.array_equal(synth.font_digit(3, "sans"), synth.font_digit(3, "serif"))
    slanted = synth.font_digit(1, "sans", slant_degrees=20)
    assert not np.array_equal(slanted, synth.font_digit(1, "sans"))
    with pytest.raises(ValueError, match="unknown font"):
        synth.font_digit(1, "comic")


def test_render_sizes_and_pens(digits) -> None:
    for height in (10, 50, 300):
        ink = synth.render(digits[0], height)
        y0, _, y1, _ = ink_box(ink > 0.5)
        assert abs((y1 - y0) - height) <= max(2, 0.08 * height)
    thin, thick = synth.render(digits[0], 300, pen=4), synth.render(digits[0], 300, pen=30)
    assert (thin > 0.5).sum() * 3 < (thick > 0.5).sum()
    assert ndimage.label(thick > 0.5)[1] <= 2  # the pen follows the centre line without breaking it


def test_skeleton_is_thin_and_inside() -> None:
    mask = np.zeros((40, 60), bool)
    mask[10:20, 5:55] = True
    skel = synth._skeleton(mask)
    assert skel.any() and (skel <= mask).all()
    assert skel.sum() < 70 and skel.sum(0).max() <= 2  # about one pixel across the bar


def test_make_set(digits) -> None:
    labels = [2, 7, 4]
    batch = np.stack(digits)[:, None]  # (N, 1, 28, 28) like Dataset.images
    out = synth.make_set(batch, labels, "scan", seed=5)
    assert [y for _, y in out] == labels
    again = synth.make_set(np.stack(digits), labels, "scan", seed=5)
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(out, again, strict=True))
    other = synth.make_set(np.stack(digits), labels, "scan", seed=6)
    assert not np.array_equal(out[0][0], other[0][0])
    with pytest.raises(ValueError, match="unknown kind"):
        synth.make_set(batch, labels, "fax", 0)


def test_strip_separated(digits) -> None:
    img, labels, boxes = synth.strip([3, 1, 4, 1, 5], seed=0)
    assert img.dtype == np.uint8 and img.ndim == 2 and labels == [3, 1, 4, 1, 5] and len(boxes) == 5
    ink = img < 128
    for (x0, y0, x1, y1), nxt in zip(boxes, boxes[1:] + [None], strict=True):
        assert 0 <= x0 < x1 <= img.shape[1] and 0 <= y0 < y1 <= img.shape[0]
        assert ink[y0:y1, x0:x1].any()
        if nxt is not None:
            assert x1 <= nxt[0]  # left to right, apart
    assert ink.sum() == sum(ink[y0:y1, x0:x1].sum() for x0, y0, x1, y1 in boxes)  # no ink outside the boxes
    img2, _, boxes2 = synth.strip([3, 1, 4, 1, 5], seed=0)
    assert np.array_equal(img, img2) and boxes == boxes2
    arrays, labels2, _ = synth.strip(digits, labels=[2, 7, 4], seed=1)
    assert labels2 == [2, 7, 4] and arrays.shape[0] > 64
    with pytest.raises(ValueError, match="labels"):
        synth.strip(digits)


def test_strip_touching_and_broken() -> None:
    img, _, boxes = synth.strip([2, 3, 5, 6, 8, 9], seed=2, touch=1.0)
    ink = ndimage.label(img < 128, structure=np.ones((3, 3)))[1]
    assert ink < 6  # touching digits merge into fewer components
    assert all(a[2] > b[0] for a, b in zip(boxes, boxes[1:], strict=False))  # boxes overlap horizontally
    whole = synth.strip([5] * 8, seed=3, pen="medium")[0]
    broken = synth.strip([5] * 8, seed=3, broken=1.0, pen="medium")[0]
    count = [ndimage.label(ndimage.median_filter(i, 3) < 128, structure=np.ones((3, 3)))[1] for i in (whole, broken)]
    assert count[1] >= count[0] + 4  # most of the eight 5s are cut in two
