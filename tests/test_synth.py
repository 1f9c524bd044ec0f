"""digitkit.synth: deterministic, realistic user images made from 28x28 digits (fonts here, no MNIST needed)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from digitkit import synth
from digitkit.preprocess import preprocess


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
        synth.make_set(batch, labels, "telex", 0)
    faxes = synth.make_set(batch, labels, "fax", seed=5)  # the issue-22 kinds too
    assert [y for _, y in faxes] == labels and np.array_equal(faxes[0][0], synth.fax(digits[0], [5, 0]))


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


# ----------------------------------------------------------------------------------------------------------
# Issue 22: the extra kinds and the non-digits.

# (ndim, channels (a set), (min side, max side) of the image), measured over seeds 0-59 with margin
EXTRA_SPECS = {
    "lowres_scan": (2, None, (20, 200)),
    "thumbnail": (3, {3}, (16, 40)),
    "fax": (2, None, (40, 500)),
    "pencil": (3, {3}, (96, 630)),
    "handwriting_photo": (3, {3}, (156, 1600)),
    "canvas_stroke": (3, {3, 4}, (200, 960)),
}


def test_extra_kinds_are_apart_from_kinds() -> None:
    assert set(EXTRA_SPECS) == set(synth.EXTRA_KINDS)
    assert not set(synth.KINDS) & set(synth.EXTRA_KINDS)
    assert synth.ALL_KINDS == {**synth.KINDS, **synth.EXTRA_KINDS}


@pytest.mark.parametrize("kind", list(EXTRA_SPECS))
def test_extra_kinds_are_deterministic_and_as_documented(digits, kind: str) -> None:
    ndim, channels, (lo, hi) = EXTRA_SPECS[kind]
    make = synth.EXTRA_KINDS[kind]
    made = [make(d, seed) for seed, d in enumerate(digits)]
    assert np.array_equal(made[0], make(digits[0], np.random.default_rng(0)))  # an int seed or its Generator
    for a in made:
        assert a.dtype == np.uint8 and a.ndim == ndim and (channels is None or a.shape[2] in channels)
        assert lo <= min(a.shape[:2]) and max(a.shape[:2]) <= hi, a.shape
    assert not np.array_equal(made[0], make(digits[0], 1))


@pytest.fixture(scope="module")
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """3,012 MNIST training digits (images, labels): the first 3,000 are the references of a 1-nearest-neighbour
    reader, the last 12 are drawn."""
    from digitkit import data

    from .conftest import MNIST_DIR

    ds = data.load_split(MNIST_DIR, "train")
    return ds.images[:3012, 0].numpy(), ds.labels[:3012].numpy()


def nearest_label(x: np.ndarray, refs: np.ndarray, labels: np.ndarray) -> int:
    """The label of the reference most correlated with x: a reader without a trained model (on these 12 MNIST
    digits themselves it is right 11 times)."""
    def unit(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), -1).astype(np.float32)
        a = a - a.mean(1, keepdims=True)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-6)

    return int(labels[np.argmax(unit(refs) @ unit(x[None])[0])])


def plain_read(image: np.ndarray) -> np.ndarray:
    """For images on plain, evenly lit paper: darkness relative to the paper (its 99th percentile), faint pixels
    dropped, fitted MNIST-style. Independent of digitkit.preprocess, so legibility is the image's, not the
    pipeline's (which is what the benchmark measures)."""
    g = gray_of(image[..., :3] if image.ndim == 3 else image)
    paper = np.percentile(g, 99)
    ink = np.clip((paper - g) / max(paper - g.min(), 1e-6), 0, 1)
    ink[ink < 0.15] = 0
    return synth.to_mnist(ink)


@pytest.mark.parametrize("kind", ["lowres_scan", "thumbnail", "fax", "pencil", "canvas_stroke"])
def test_extra_kinds_are_legible(mnist_digits, kind: str) -> None:
    """Read by the nearest MNIST digit, at least 9 of 12 right (measured: 9-11; the reader itself gets 11 of these
    12 MNIST digits). Plain paper is read directly; fax specks and pencil grain need preprocess. handwriting_photo,
    whose slant a nearest-neighbour reader cannot follow, has its own test."""
    images, labels = mnist_digits
    right = 0
    for j, i in enumerate(range(3000, 3012)):
        img = synth.EXTRA_KINDS[kind](images[i], j)
        if kind in ("fax", "pencil"):
            pre = preprocess(img)
            x = pre.tensor[0].numpy() if pre.rejected is None else None
        else:
            x = plain_read(img)
        right += x is not None and nearest_label(x, images[:3000], labels[:3000]) == labels[i]
    assert right >= 9, right


def test_handwriting_photo_keeps_the_ink_visible_at_any_size(mnist_digits) -> None:
    """Whatever the paper, light and camera do, the strokes stay clearly darker than the paper right around them;
    and the digits come small and large."""
    images, _ = mnist_digits
    heights = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        canvas = synth._handwriting_canvas(rng, images[3000 + seed])
        img = synth._photo_look(rng, canvas)
        if seed == 0:  # the photo is this canvas with this look
            assert np.array_equal(img, synth.handwriting_photo(images[3000 + seed], seed))
        g = gray_of(img)
        ink = canvas > 0.5
        around = ndimage.binary_dilation(ink, iterations=6) & ~ndimage.binary_dilation(ink, iterations=3)
        assert np.median(g[ink]) < 0.85 * np.median(g[around]), seed
        ys, _ = np.nonzero(ink)
        heights.append((ys.max() - ys.min() + 1) / min(g.shape))
    assert min(heights) < 0.25 and max(heights) > 0.3, heights


def test_lowres_scan_is_small_grey_ink_enlarged(digits) -> None:
    clean = synth.lowres_scan(digits[0], 3, clean=True).astype(np.float32)
    border = np.concatenate([clean[0], clean[-1], clean[:, 0], clean[:, -1]])
    assert border.std() == 0 and border[0] >= 237  # clean: white or near-white paper, noise-free
    assert 20 <= clean.min() <= 140  # dark grey ink (40-110, bicubic overshoot aside), never black
    ys, xs = np.nonzero(clean < border[0] - 20)
    h, w = clean.shape
    assert abs((ys.min() + ys.max()) / 2 - h / 2) <= 0.08 * h and abs((xs.min() + xs.max()) / 2 - w / 2) <= 0.08 * w
    # Enlarged with smoothing: neighbouring pixels change by little, and many grey levels lie between ink and paper.
    assert np.abs(np.diff(clean, axis=1)).max() < 0.6 * (border[0] - clean.min())
    assert len(np.unique(clean)) > 30
    noisy = [synth.lowres_scan(digits[0], s, clean=False) for s in range(4)]
    assert all(np.concatenate([n[0], n[-1]]).std() > 0 for n in noisy)


def test_fax_is_one_bit_and_thumbnail_is_small(digits) -> None:
    for seed in range(6):
        f = synth.fax(digits[1], seed)
        assert set(np.unique(f)) <= {0, 255} and 0.002 < (f == 0).mean() < 0.4
        t = synth.thumbnail(digits[1], seed)
        ink = t.mean(-1) < np.median(t.mean(-1)) - 60
        ys, _ = np.nonzero(ink)
        assert ys.max() - ys.min() + 1 >= 0.5 * t.shape[0]  # the digit fills most of the height


def test_pencil_is_light_and_grainy(digits) -> None:
    g = gray_of(synth.pencil(digits[2], 1))
    paper = np.median(g)
    ink = g < paper - 0.05
    assert 0.15 < (paper - g.min()) / paper < 0.6  # light strokes: at most about half as dark as the paper
    strokes = ndimage.binary_closing(ink, np.ones((3, 3)))
    assert (strokes & ~ink).sum() > 0.05 * strokes.sum()  # grain: gaps inside the strokes


def test_canvas_stroke_is_opaque(digits) -> None:
    images = [synth.canvas_stroke(digits[0], s) for s in range(12)]
    assert {im.shape[2] for im in images} == {3, 4}
    for im in images:
        assert im.shape[2] == 3 or (im[..., 3] == 255).all()
        assert np.median(im[..., :3]) >= 230  # a light, opaque background


def test_extra_fonts_print_digits() -> None:
    for font in synth.EXTRA_FONTS:
        a = synth.font_digit(4, font)
        y0, x0, y1, x1 = ink_box(a > 0)
        assert a.dtype == np.uint8 and max(y1 - y0, x1 - x0) == 20
    assert not np.array_equal(synth.font_digit(4, "cm-roman"), synth.font_digit(4, "serif"))


def test_glyph_and_its_errors() -> None:
    a = synth.glyph("K", "cm-sans")
    assert a.shape == (28, 28) and a.dtype == np.uint8 and a.max() == 255
    assert synth.has_glyph("€", "sans") and not synth.has_glyph("€", "cm-roman")
    with pytest.raises(ValueError, match="no glyph"):
        synth.glyph("€", "cm-roman")
    with pytest.raises(ValueError, match="unknown font"):
        synth.glyph("A", "comic")
    with pytest.raises(ValueError, match="one character"):
        synth.glyph("AB")
    assert not set(synth.LETTERS) & set(synth.LOOKALIKES) and not set(synth.LETTERS + synth.SYMBOLS) & set("0123456789")


@pytest.mark.parametrize("kind", synth.ALL_NEGATIVE_KINDS)
def test_negatives_are_deterministic_images(digits, kind: str) -> None:
    made = [synth.negative(kind, seed, np.stack(digits)) for seed in range(2)]
    assert np.array_equal(made[0], synth.negative(kind, np.random.default_rng(0), np.stack(digits)))
    for a in made:
        assert a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)))
        assert 16 <= min(a.shape[:2]) and max(a.shape[:2]) <= 1600
    assert not np.array_equal(made[0], made[1])


def test_negatives_hold_what_their_kind_says(digits) -> None:
    # Doubled digits: two digits in one source, wider than tall.
    src = synth._digit_source(np.random.default_rng(0), np.stack(digits), [2, 7, 4])
    assert any(np.array_equal(src, d) for d in digits)
    assert synth._doubled(np.random.default_rng(1), src, src).shape[1] > 28
    # Partial digits: some ink is left, less than the whole digit would have (same size and place).
    for seed in range(4):
        g = gray_of(synth.negative("partial_digit", seed, np.stack(digits)))
        assert (g < np.median(g) - 0.15).any()
    assert set(synth.LOOKALIKES) >= set("OIZSBgq")  # drawn only by the lookalike kind
    # A blank canvas export (RGBA) is all transparent: seed 9 draws one.
    canvas = synth.negative("blank_paper", 9)
    assert canvas.shape[2] == 4 and (canvas[..., 3] == 0).all()


def test_partial_digits_skip_ones_and_errors(digits) -> None:
    one, seven = synth.font_digit(1, "sans"), digits[1]
    for seed in range(10):
        got = synth._digit_source(np.random.default_rng(seed), np.stack([one, seven]), [1, 7], exclude=(1,))
        assert np.array_equal(got, seven)
    with pytest.raises(ValueError, match="no digits to draw from"):
        synth._digit_source(np.random.default_rng(0), np.stack([one]), [1], exclude=(1,))
    with pytest.raises(ValueError, match="unknown negative kind"):
        synth.negative("cat", 0)


def test_make_negatives_tags_and_cycles_kinds() -> None:
    got = synth.make_negatives(6, seed=3, kinds=["letter", "blank_paper", "scribble"])
    assert [k for _, k in got] == ["letter", "blank_paper", "scribble"] * 2
    assert np.array_equal(got[4][0], synth.negative("blank_paper", np.random.default_rng([3, 4])))
    assert "lookalike" not in synth.NEGATIVE_KINDS and "lookalike" in synth.ALL_NEGATIVE_KINDS
    with pytest.raises(ValueError, match="negative kinds"):
        synth.make_negatives(2, 0, kinds=["letter", "dog"])
