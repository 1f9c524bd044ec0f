"""digitkit.corruptions: MNIST-C's suite, on 300 real MNIST test images (a few seconds in all).

Where MNIST-C's output is a known function of a few random draws (the lines, the warps), the outputs are checked
against small numpy/scipy restatements of MNIST-C's code (google-research/mnist-c, corruptions.py) over every
possible draw; elsewhere against the properties that MNIST-C's settings imply.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from digitkit import corruptions as C
from digitkit import data
from digitkit.errors import ConfigError

from .conftest import MNIST_DIR

SEEDLESS = {"brightness", "scale", "stripe", "canny_edges"}  # no randomness, in MNIST-C too
OUTCOMES = {"rotate": 2, "shear": 2, "translate": 4}  # a random sign per axis: few possible results
# MNIST-C's default settings (the severity each of its functions defaults to), pinned.
MNISTC_DEFAULTS = {
    "shot_noise": 3, "impulse_noise": 0.17, "glass_blur": (0.7, 1, 2), "motion_blur": (10, 3.0), "shear": 0.4,
    "scale": 0.7, "rotate": 0.4, "brightness": 0.5, "translate": 3, "fog": (3.0, 1.4),
    "spatter": (0.65, 0.3, 1, 0.65, 1.5),
}  # fmt: skip


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return data.load_split(MNIST_DIR, "test").images[:300].clone()


@pytest.fixture(scope="module")
def suite(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every corruption of x at seed 0, computed once for the module."""
    return C.corruption_suite(x, seed=0)


def default(name: str) -> object:
    levels, level = C.PARAMS[name]
    return levels[level - 1]


def ink(images: torch.Tensor) -> torch.Tensor:
    """(N,) total ink per image."""
    return images.float().sum((1, 2, 3))


def centroid(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) centre of mass as (x, y) pixels."""
    m = images[:, 0].float()
    total = m.sum((1, 2))
    idx = torch.arange(m.shape[-1], dtype=torch.float32)
    return torch.stack([(m.sum(1) * idx).sum(1) / total, (m.sum(2) * idx).sum(1) / total], 1)


def dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(mask.float(), 2 * r + 1, stride=1, padding=r) > 0


def best_match(x: torch.Tensor, y: torch.Tensor, candidates: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image, the largest |y - round(255 clip(x / 255 + candidate, 0, 1))| of the candidate (K, 28, 28)
    that fits it best, and which candidate that is."""
    cand = torch.from_numpy(candidates).float()
    errs, which = [], []
    for xs, ys in zip(x.split(10), y.split(10), strict=True):
        pred = (xs.float() / 255 + cand[None]).clamp(0, 1).mul(255).round()  # (n, K, 28, 28)
        err = (pred - ys.float()).abs().flatten(2).amax(2)
        errs.append(err.amin(1))
        which.append(err.argmin(1))
    return torch.cat(errs), torch.cat(which)


# ----------------------------------------------------------------------------------------------------------
# MNIST-C's code, restated in numpy for 28 x 28 images


def mnistc_line(c0: float, r0: float, c1: float, r1: float) -> np.ndarray:
    """line_from_points: ink log(1 - d / 2.3) + 1 at vertical distance d, on columns floor(c0) .. ceil(c1) - 1."""
    if c1 == c0:
        return np.zeros((28, 28))
    cc, rr = np.meshgrid(np.arange(28.0), np.arange(28.0), sparse=True)
    dist = np.clip(np.abs(rr - ((r1 - r0) / (c1 - c0) * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    line = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1)
    line[:, : int(np.floor(c0))] = 0
    line[:, int(np.ceil(c1)) :] = 0
    return line


def mnistc_dotted_line(r0: int, r1: int) -> np.ndarray:
    line = mnistc_line(0, r0, 27, r1)
    idx, off = np.arange(0, 30, 2), True
    for i in range(1, len(idx)):
        if off:
            line[:, idx[i - 1] : idx[i]] = 0
        off = not off
    return line


def mnistc_zigzag(r0: int, rise: int) -> np.ndarray:
    a = b = 2.0
    c0, c1, r1 = 2, 25, r0 + rise
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)
    points = [(0.0, 0.0)]
    for i in range(int((d - a) // (2 * a)) + 1):
        points.append(((2 * i + 1) * a, (-1) ** i * b))
    last = points[-1][1]
    whole = 2 * a * (d // (2 * a))
    if d != whole:
        points.append((d, last / (2 * (d - whole))))
    cs, rs = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.array(points).T
    cs, rs = cs + c0, rs + r0
    return sum(mnistc_line(cs[i - 1], rs[i - 1], cs[i], rs[i]) for i in range(1, len(cs)))


def mnistc_warp(image: np.ndarray, a: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """skimage.transform.warp(image / 255, inverse_map) * 255 for MNIST-C's maps p -> c + a (p - c) + shift,
    c = (13.5, 13.5): bilinear, 0 outside."""
    rr, cc = np.mgrid[0:28, 0:28].astype(float) - 13.5
    src_c = a[0, 0] * cc + a[0, 1] * rr + 13.5 + shift[0]
    src_r = a[1, 0] * cc + a[1, 1] * rr + 13.5 + shift[1]
    return ndimage.map_coordinates(image / 255.0, [src_r, src_c], order=1, mode="grid-constant") * 255


def mnistc_glass_blur(image: np.ndarray, sigma: float, delta: int, iterations: int,
                      rng: np.random.Generator) -> np.ndarray:
    """glass_blur: gaussian(multichannel=True) on a 2-D image blurs along axis 0 only; np.uint8 truncates."""
    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=[sigma, 0], mode="nearest", truncate=4.0)

    a = np.uint8(blur(image / 255.0) * 255)
    sweep = [(h, w) for h in range(28 - delta, delta, -1) for w in range(28 - delta, delta, -1)] * iterations
    swaps, offsets = rng.random(len(sweep)) < 0.5, rng.integers(-delta, delta, (len(sweep), 2))
    for (h, w), swap, (dx, dy) in zip(sweep, swaps, offsets, strict=True):
        if swap:
            a[h, w], a[h + dy, w + dx] = a[h + dy, w + dx], a[h, w]
    return np.clip(blur(a / 255.0), 0, 1) * 255


def rotation(s: float) -> np.ndarray:
    return np.array([[math.cos(s), -math.sin(s)], [math.sin(s), math.cos(s)]])


def skimage_shear(s: float) -> np.ndarray:
    """AffineTransform(shear=s).params[:2, :2] in the scikit-image MNIST-C was made with."""
    return np.array([[1.0, -math.sin(s)], [0.0, math.cos(s)]])


# ----------------------------------------------------------------------------------------------------------
# The table and the API


def test_names_and_table() -> None:
    assert C.CORRUPTIONS == (
        "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
        "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
    )  # fmt: skip
    assert set(C.PARAMS) == set(C.CORRUPTIONS)
    for name, (levels, level) in C.PARAMS.items():
        assert len(levels) in (1, 5), name
        assert 1 <= level <= len(levels), name
    for name, setting in MNISTC_DEFAULTS.items():
        assert default(name) == setting, name
        assert len(C.PARAMS[name][0]) == 5, name
    # the ladders that MNIST-C walks up in one parameter
    assert C.PARAMS["shot_noise"][0] == (60, 25, 12, 5, 3)
    assert C.PARAMS["rotate"][0] == C.PARAMS["shear"][0] == (0.2, 0.4, 0.6, 0.8, 1.0)
    assert C.PARAMS["scale"][0] == (0.9, 0.8, 0.7, 0.6, 0.5)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_change_and_determinism(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    before = x.clone()
    y = suite[name]
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(x, before), "the input must not be modified"
    mad = (y.float() - x.float()).abs().mean().item()
    assert mad > 2.0, f"{name} barely changes the images (mean |diff| {mad:.2f} gray levels)"
    assert torch.equal(C.corrupt(x, name, seed=0), y), "same seed, different bytes"
    if name in SEEDLESS:
        assert torch.equal(C.corrupt(x, name, seed=1), y)
    else:
        other = C.corrupt(x, name, seed=1)
        # Different per image, not only somewhere: each image gets its own draws. With k outcomes, two seeds
        # agree on an image 1 / k of the time.
        expected = 1 - 1 / OUTCOMES.get(name, math.inf)
        assert (other != y).flatten(1).any(1).float().mean() > 0.6 * expected


@pytest.mark.parametrize("name", sorted(set(C.CORRUPTIONS) - SEEDLESS))
def test_each_image_gets_its_own_draws(x: torch.Tensor, name: str) -> None:
    copies = C.corrupt(x[:1].repeat(40, 1, 1, 1), name)
    distinct = len({bytes(c.flatten().tolist()) for c in copies})
    if name in OUTCOMES:  # every sign combination shows up among 40 copies
        assert distinct == OUTCOMES[name], f"{name}: {distinct} different results of {OUTCOMES[name]}"
    else:
        # zigzag has 270 possible lines, and motion_blur rounds its taps to whole pixels, so that close angles
        # coincide: repeats among 40 are expected there.
        least = 25 if name in ("zigzag", "motion_blur") else 38
        assert distinct >= least, f"{name}: 40 copies of one image gave only {distinct} different results"


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_slices_and_chunks_give_the_same_bytes(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    full = suite[name][:60]
    assert torch.equal(C.corrupt(x[:60], name, chunk_size=16), full)
    assert torch.equal(C.corrupt(x[23:51], name, offset=23), full[23:51])
    if name not in SEEDLESS:  # without the offset, the slice is a different set of draws
        assert not torch.equal(C.corrupt(x[23:51], name), full[23:51])


def test_unknown_name_and_bad_arguments(x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="unknown corruption 'gaussian_noise'.*shot_noise, impulse_noise.*"
                                          "canny_edges"):  # fmt: skip
        C.corrupt(x[:2], "gaussian_noise")
    with pytest.raises(ConfigError, match="severity = 6, expected an integer 1..5"):
        C.corrupt(x[:2], "rotate", severity=6)
    with pytest.raises(ConfigError, match="'zigzag' has no severity levels.*shot_noise"):
        C.corrupt(x[:2], "zigzag", severity=2)
    with pytest.raises(ConfigError, match="offset = -1"):
        C.corrupt(x[:2], "rotate", offset=-1)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(x[:2].float(), "rotate")
    assert C.corrupt(x[:0], "fog").shape == (0, 1, 28, 28)


def test_severity_levels(x: torch.Tensor) -> None:
    xs = x[:100]
    # The ones whose ladder walks up one strength; MNIST-C's motion_blur saturates at the top and its spatter
    # ladder is not ordered by how much it covers.
    for name in ("impulse_noise", "shot_noise", "brightness", "rotate", "shear", "scale", "translate"):
        _, level = C.PARAMS[name]
        assert torch.equal(C.corrupt(xs, name, severity=level), C.corrupt(xs, name)), name
        mads = [(C.corrupt(xs, name, severity=s).float() - xs.float()).abs().mean().item() for s in range(1, 6)]
        assert mads == sorted(mads), f"{name}: higher severity should change images more: {mads}"
    for name in ("fog", "glass_blur", "motion_blur"):
        mild, harsh = (C.corrupt(xs, name, severity=s).float() for s in (1, 5))
        assert (harsh - xs.float()).abs().mean() > (mild - xs.float()).abs().mean(), name


# ----------------------------------------------------------------------------------------------------------
# Each corruption


def test_brightness_raises_the_mean(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["brightness"].float()
    assert (y >= x.float()).all()
    background = y[x == 0].unique()  # a flat gray
    assert len(background) == 1 and abs(background.item() - 255 * default("brightness")) <= 1
    # x + c clipped, to within rounding (x + 127.5 lies halfway between two gray levels)
    assert ((y - (x.float() + 255 * default("brightness")).clamp(max=255)).abs() <= 0.501).all()


def test_impulse_noise_is_salt_and_pepper_everywhere(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y, amount = suite["impulse_noise"], default("impulse_noise")
    changed = y != x
    assert set(y[changed].unique().tolist()) <= {0, 255}
    background, bright_ink = x == 0, x == 255
    assert (y[background] == 255).float().mean().item() == pytest.approx(amount / 2, abs=0.01)  # salt on black
    assert (y[bright_ink] == 0).float().mean().item() == pytest.approx(amount / 2, abs=0.02)  # pepper on ink


def test_shot_noise_is_poisson_counts(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # Poisson(c x) / c, clipped, as in MNIST-C: every pixel is k / c for a whole count k, and a black pixel
    # has rate 0 and stays black.
    y, c = suite["shot_noise"], default("shot_noise")
    assert set(y.unique().tolist()) <= {round(255 * min(k / c, 1)) for k in range(c + 1)}
    assert (y[x == 0] == 0).all()
    gray = (x > 50) & (x < 200)
    assert (y[gray] != x[gray]).float().mean() > 0.8
    # The mean of min(K / c, 1) over the gray pixels, K ~ Poisson(c x): below x, from the clipping.
    rate = c * x[gray].double() / 255
    pmf = torch.stack([torch.exp(k * torch.log(rate) - rate - math.lgamma(k + 1)) for k in range(c)])
    expected = sum(pmf[k] * k / c for k in range(c)) + (1 - pmf.sum(0))
    assert (y[gray].double().mean() / 255).item() == pytest.approx(expected.mean().item(), rel=0.02)


@pytest.mark.parametrize("name", ["rotate", "translate", "glass_blur", "motion_blur", "shear"])
def test_ink_is_conserved(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    # MNIST-C's shear also stretches the digit vertically by 1 / cos(s), and so its ink.
    expected = 1 / math.cos(default("shear")) if name == "shear" else 1.0
    y = suite[name]
    ratio = ink(y) / ink(x)
    assert ratio.median() == pytest.approx(expected, abs=0.02), name
    assert (ratio > 0.9 * expected).all() and (ratio < 1.05 * expected).all(), name
    assert (y != x).flatten(1).any(1).all(), f"{name} left some images untouched"


@pytest.mark.parametrize("name", ["rotate", "shear", "translate", "scale"])
def test_warps_are_mnistc_inverse_maps(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    # skimage.transform.warp with MNIST-C's AffineTransforms about (13.5, 13.5): each image must be one of the
    # outcomes (both signs, or all four sign pairs) to within a gray level of rounding, and every outcome occurs.
    c = default(name)
    if name == "rotate":
        outcomes = [(rotation(s * c), (0, 0)) for s in (-1, 1)]
    elif name == "shear":
        outcomes = [(skimage_shear(s * c), (0, 0)) for s in (-1, 1)]
    elif name == "scale":
        outcomes = [(np.eye(2) / c, (0, 0))]
    else:
        outcomes = [(np.eye(2), (sx * c, sy * c)) for sx, sy in itertools.product((-1, 1), repeat=2)]
    xs, ys = x[:60], suite[name][:60].float()
    errs = torch.stack([torch.stack([(torch.from_numpy(mnistc_warp(img[0].numpy().astype(float), a, t)).round()
                                      - out[0]).abs().amax() for a, t in outcomes])
                        for img, out in zip(xs, ys, strict=True)])  # fmt: skip
    assert (errs.amin(1) <= 1).all(), f"{name}: worst {errs.amin(1).max().item()} gray levels from MNIST-C"
    assert len(set(errs.argmin(1).tolist())) == len(outcomes)


def test_rotate_and_shear_keep_the_centre_translate_moves_it(x: torch.Tensor,
                                                              suite: dict[str, torch.Tensor]) -> None:
    c0 = centroid(x)
    for name in ("rotate", "shear", "scale"):  # about the image centre, which MNIST's centre of mass is close to
        assert (centroid(suite[name]) - c0).norm(dim=1).median() < 1.0, name
    shift = centroid(suite["translate"]) - c0
    # 3 px on each axis (less where ink leaves the frame), each sign about half the time
    assert (shift.abs().median(0).values - default("translate")).abs().max() < 0.1
    assert ((shift > 0).float().mean(0) - 0.5).abs().max() < 0.15


def test_scale_shrinks_the_digit(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    s = default("scale")
    ratio = ink(suite["scale"]) / ink(x)  # area scales with s**2
    assert ratio.median() == pytest.approx(s**2, rel=0.03)
    assert (ratio > 0.9 * s**2).all() and (ratio < 1.1 * s**2).all()

    def height(images: torch.Tensor) -> torch.Tensor:
        rows = (images[:, 0] > 64).any(2).float()
        idx = torch.arange(rows.shape[1], dtype=torch.float32)
        return (rows * idx).amax(1) - torch.where(rows > 0, idx, 1e9).amin(1) + 1

    heights = height(suite["scale"]) / height(x)
    assert heights.median() == pytest.approx(s, abs=0.02) and (heights - s).abs().max() < 0.1


def test_motion_blur_streaks_one_way(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # ImageMagick's kernel is one-sided: each pixel averages the ones ahead of it along an angle in [-45, 45]
    # degrees, so the ink trails left (about sigma * sqrt(2 / pi) * cos(angle) px) and spreads less up or down.
    shift = centroid(suite["motion_blur"]) - centroid(x)
    sigma = default("motion_blur")[1]
    assert shift[:, 0].median() == pytest.approx(-sigma * math.sqrt(2 / math.pi) * 0.9, abs=0.4)
    assert (shift[:, 0] < 0).float().mean() > 0.95
    assert shift[:, 1].abs().median() < 0.5 * shift[:, 0].abs().median()


def test_glass_blur_blurs_down_the_columns(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # MNIST-C's gaussian(..., multichannel=True) on a 2-D image blurs along the columns only: vertical
    # differences between neighbours shrink much more than horizontal ones (an isotropic blur keeps their
    # ratio, 0.91 on these digits; this one takes it to about 0.67).
    def vertical_over_horizontal(images: torch.Tensor) -> float:
        f = images.float()
        return ((f[..., 1:, :] - f[..., :-1, :]).abs().mean() / (f[..., 1:] - f[..., :-1]).abs().mean()).item()

    assert vertical_over_horizontal(suite["glass_blur"]) < 0.85 * vertical_over_horizontal(x)


def test_glass_blur_matches_mnistc_on_average(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # Different random draws, so compare how far the images move: MNIST-C's sweep with numpy's generator
    # against ours. Swapping always instead of half the time moves them about a third further.
    rng = np.random.default_rng(0)
    reference = np.stack([mnistc_glass_blur(img[0].numpy().astype(float), *default("glass_blur"), rng)
                          for img in x[:60]]).round()  # fmt: skip
    moved = (suite["glass_blur"][:60, 0].float() - x[:60, 0].float()).abs().mean()
    moved_in_mnistc = np.abs(reference - x[:60, 0].numpy()).mean()
    assert moved.item() == pytest.approx(moved_in_mnistc, rel=0.05)


def test_stripe_inverts_the_side_columns(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["stripe"]
    left, right = C.PARAMS["stripe"][0][0]
    assert (left, right) == (7, 7)  # MNIST-C: x[:, :7] and x[:, 21:]
    sides = torch.zeros(28, dtype=torch.bool)
    sides[:left], sides[28 - right :] = True, True
    assert torch.equal(y[..., sides], 255 - x[..., sides])
    assert torch.equal(y[..., ~sides], x[..., ~sides])


@pytest.mark.parametrize("name", ["dotted_line", "zigzag"])
def test_lines_are_mnistc_lines(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    # Each image plus one of MNIST-C's lines, over all its draws: rows r0, r1 in [0, 27) for dotted_line;
    # r0 in [0, 27) and a rise in [-5, 5) for zigzag. Lines are added, never erasing the digit.
    if name == "dotted_line":
        draws = list(itertools.product(range(27), range(27)))
        candidates = np.stack([mnistc_dotted_line(r0, r1) for r0, r1 in draws])
    else:
        draws = list(itertools.product(range(27), range(-5, 5)))
        candidates = np.stack([mnistc_zigzag(r0, rise) for r0, rise in draws])
    y = suite[name]
    assert (y >= x).all()
    err, which = best_match(x[:60], y[:60], candidates)
    assert (err == 0).all(), f"{name}: images {torch.nonzero(err).flatten().tolist()} match no MNIST-C line"
    assert len(set(which.tolist())) > 40, "the lines should vary from image to image"
    if name == "dotted_line":  # ink only in columns 2-3, 6-7, ..., 26 (the last column stays blank)
        on = torch.tensor([c // 2 % 2 == 1 and c < 27 for c in range(28)])
        assert torch.equal(y[..., ~on], x[..., ~on])


def test_fog_is_a_smooth_veil_and_dims_the_digit(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # MNIST-C: y = (x + c f) * m / (m + c), f the top-left 28 x 28 of a 256 x 256 plasma fractal in [0, 1] and m
    # the image's max. Recover f from y: it must lie in [0, 1], vary smoothly, and, as a small patch of a big
    # map, span only part of [0, 1].
    c = default("fog")[0]
    y, xf = suite["fog"].double() / 255, x.double() / 255
    m = xf.amax((1, 2, 3), keepdim=True)
    f = (y * (m + c) / m - xf) / c
    assert f.min() > -0.005 and f.max() < 1.005  # up to half a gray level of rounding, scaled by (m + c) / (m c)
    span = f.amax((1, 2, 3)) - f.amin((1, 2, 3))
    assert 0.15 < span.median() < 0.45 and span.max() < 0.9
    assert (f[..., 1:] - f[..., :-1]).abs().mean() < 0.02
    assert (suite["fog"][x == 0] > 0).float().mean() > 0.99  # fog over all the background
    # the digit is dimmed to m / (m + c) of itself, but still brighter than the fog around it
    assert y.flatten(1).amax(1).mean() < 0.75
    assert y[x > 200].mean() > y[x == 0].mean() + 0.15


def test_spatter_paints_gray_blobs(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["spatter"]
    gray = round(255 * C._MUD)
    assert gray == 63  # MNIST-C's mud colour
    on_black = y[(x == 0) & (y != x)]
    assert len(on_black) > 1000
    assert (on_black <= gray).all() and (on_black >= 0.8 * gray - 1).all()  # the mask is >= 0.8 or 0
    covered_ink = (x > 200) & (y < x)
    assert (y[covered_ink] <= gray + 0.2 * 255 + 1).all()  # what a blob covers is hidden, not just dimmed
    assert ((y != x).flatten(1).any(1)).float().mean() > 0.5


def test_canny_edges_are_thin_and_on_the_boundary(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["canny_edges"]
    assert set(y.unique().tolist()) == {0, 255}
    edges, digit = y > 0, x >= 128
    assert (edges.flatten(1).sum(1) < (x > 0).flatten(1).sum(1)).all(), "thin edges: fewer pixels than the ink"
    boundary = dilate(digit, 1) & dilate(~digit, 1)  # pixels within 1 px of where the mask changes
    assert (edges & ~dilate(boundary, 1)).sum() == 0, "every edge pixel lies near the digit's outline"
    assert not (edges & ~dilate(~digit, 2)).any(), "no edges deep inside strokes"
    assert (edges.flatten(1).sum(1) > 10).all()
    # thin: no 2 x 2 block of edge pixels is fully lit more than rarely
    blocks = F.avg_pool2d(edges.float(), 2, stride=1) == 1
    assert blocks.sum() < 0.02 * edges.sum()
