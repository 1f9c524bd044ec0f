"""Realistic test inputs built from real digit images: what users actually send, made from MNIST digits.

Each generator takes a 28x28 digit (uint8, white on black, MNIST format; `font_digit` makes one from a font) and
returns an image as a user would supply it: a pen drawing on paper, a phone photo, a scan, a web-canvas export,
a tiny or a huge digit, a rotated or an inverted one. All randomness comes from a seeded numpy Generator, so
`kind(digit, seed)` is the same image on every run. `make_set` builds labelled sets; `strip` builds multi-digit
rows with known boxes for segmentation.

Rendering: a digit is redrawn at the target size either from its own anti-aliased shape (`pen=None`: upscaled
bicubically and cut at half intensity, so the writer's stroke width scales with it) or as a pen of a given
width following its centre line (Zhang-Suen skeleton at 4x, drawn as round-capped segments, 2x supersampled).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage

Seed = int | np.random.Generator

FONTS: dict[str, tuple[str, str, str]] = {
    "sans": ("DejaVu Sans", "normal", "normal"),
    "sans-bold": ("DejaVu Sans", "bold", "normal"),
    "sans-oblique": ("DejaVu Sans", "normal", "oblique"),
    "serif": ("DejaVu Serif", "normal", "normal"),
    "serif-bold-italic": ("DejaVu Serif", "bold", "italic"),
    "mono": ("DejaVu Sans Mono", "normal", "normal"),
    "stix": ("STIXGeneral", "normal", "normal"),
}
"""Font name -> (family, weight, style), all shipped with matplotlib."""


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------
# Digits: 28x28 sources, and redrawing them at any size.


def font_digit(d: int, font: str = "sans", size: int = 28, box: int = 20, slant_degrees: float = 0.0) -> np.ndarray:
    """A printed digit in MNIST format: (size, size) uint8 white on black, longer side `box`, centred by mass.
    `font` is a key of FONTS; `slant_degrees` shears it (positive leans right)."""
    if font not in FONTS:
        raise ValueError(f"unknown font {font!r}; expected one of {', '.join(FONTS)}")
    family, weight, style = FONTS[font]
    path = font_manager.findfont(font_manager.FontProperties(family=family, weight=weight, style=style))
    face = ImageFont.truetype(path, 160)
    canvas = Image.new("L", (320, 320), 0)
    ImageDraw.Draw(canvas).text((80, 40), str(int(d)), fill=255, font=face)
    ink = np.asarray(canvas, np.float32) / 255
    if slant_degrees:
        ink = _shear(ink, math.tan(math.radians(slant_degrees)))
    return (to_mnist(ink, size, box) * 255).round().astype(np.uint8)


def to_mnist(ink: np.ndarray, size: int = 28, box: int = 20) -> np.ndarray:
    """Any white-on-black ink (h, w) in [0, 1] -> (size, size) float: crop, fit the longer side to `box` keeping
    the aspect ratio (area-averaged), place the centre of mass at the centre (as MNIST was made)."""
    ys, xs = np.nonzero(ink > 0.02)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    s = box / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = np.clip(np.asarray(Image.fromarray(crop.astype(np.float32)).resize((nw, nh), Image.Resampling.BOX)), 0, 1)
    small = small / max(float(small.max()), 1e-6)
    yy, xx = np.mgrid[0:nh, 0:nw]
    cy, cx = (small * yy).sum() / small.sum(), (small * xx).sum() / small.sum()
    top = int(np.clip(round(size / 2 - cy), 0, size - nh))
    left = int(np.clip(round(size / 2 - cx), 0, size - nw))
    out = np.zeros((size, size), np.float32)
    out[top : top + nh, left : left + nw] = small
    return out


def render(digit: np.ndarray, height: float, pen: float | None = None, level: float = 0.5) -> np.ndarray:
    """Redraw a 28x28 digit so its ink is `height` pixels tall: float (h, w) ink in [0, 1], white on black,
    cropped to the ink. `pen=None` keeps the digit's own shape, cut at `level` (higher = thinner strokes);
    a number draws a round pen of that width along the digit's centre line."""
    src = np.asarray(digit, np.float32) / (255.0 if np.asarray(digit).dtype == np.uint8 else 1.0)
    ys, _ = np.nonzero(src > 0.3)
    scale = height / max(int(ys.max() - ys.min() + 1), 1) if len(ys) else height / 20
    if pen is None and scale <= 1.5:  # small: area-average the digit as it is
        up = np.clip(_resize(src, round(28 * scale), round(28 * scale), Image.Resampling.BOX), 0, 1)
        ink = up / max(float(up.max()), 1e-6)
    elif pen is None:
        up = _resize(src, round(28 * scale), round(28 * scale), Image.Resampling.BICUBIC)
        # A soft cut at `level`: MNIST edges are ~1.5 px wide, so after upscaling the edge ramps over ~1.5 output
        # pixels (and the background is exactly 0), like anti-aliased ink.
        ink = np.clip((up - level) * max(scale / 1.5, 1 / level) + 0.5, 0, 1)
    else:
        ink = _pen_drawing(src, scale, pen)
    return _crop(ink)


def _resize(a: np.ndarray, w: int, h: int, resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((max(w, 1), max(h, 1)), resample))


def _crop(ink: np.ndarray, margin: int = 1) -> np.ndarray:
    ys, xs = np.nonzero(ink > 0.01)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32)
    y0, x0 = max(ys.min() - margin, 0), max(xs.min() - margin, 0)
    return ink[y0 : ys.max() + 1 + margin, x0 : xs.max() + 1 + margin].astype(np.float32)


def _pen_drawing(src: np.ndarray, scale: float, pen: float) -> np.ndarray:
    k = 4  # skeleton resolution: 4x MNIST, where strokes are ~8 px wide
    mask = _resize(src, 28 * k, 28 * k, Image.Resampling.BICUBIC) > 0.5
    skel = _skeleton(mask)
    ss = 2  # supersampling for anti-aliased pen edges
    f = scale / k * ss
    side = round(28 * scale * ss + pen * ss * 2 + 4)
    off = pen * ss + 2
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    ys, xs = np.nonzero(skel)
    r = pen * ss / 2
    on = set(zip(ys.tolist(), xs.tolist(), strict=True))
    for y, x in on:
        py, px = y * f + off, x * f + off
        draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            if (y + dy, x + dx) in on:
                draw.line((px, py, (x + dx) * f + off, (y + dy) * f + off), fill=255, width=max(1, round(2 * r)))
    ink = np.asarray(canvas, np.float32) / 255
    return _resize(ink, side // ss, side // ss, Image.Resampling.BOX)


def _skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (1984), vectorized: one-pixel-wide centre lines of a binary image."""
    img = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(np.roll(img, -dy, 0), -dx, 1) for dy, dx in
                 ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))]  # P2..P9 clockwise
            b = sum(p)
            a = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(np.uint8) for i in range(8))
            if step == 0:
                m1, m2 = p[0] * p[2] * p[4], p[2] * p[4] * p[6]
            else:
                m1, m2 = p[0] * p[2] * p[6], p[0] * p[4] * p[6]
            remove = (img == 1) & (b >= 2) & (b <= 6) & (a == 1) & (m1 == 0) & (m2 == 0)
            if remove.any():
                img[remove] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def _shear(ink: np.ndarray, s: float) -> np.ndarray:
    """Horizontal shear about the middle row (s > 0 leans the top to the right), canvas widened to fit."""
    h, w = ink.shape
    pad = int(abs(s) * h / 2) + 2
    a = np.pad(ink, ((0, 0), (pad, pad)))
    out = ndimage.affine_transform(a, [[1, 0], [-s, 1]], offset=[0, s * h / 2], order=1)
    return out.astype(np.float32)


def _rotate(ink: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(ink.astype(np.float32)).rotate(degrees, Image.Resampling.BILINEAR,
                                                                      expand=True))


def _paste(canvas: np.ndarray, ink: np.ndarray, top: int, left: int) -> None:
    h, w = ink.shape
    region = canvas[top : top + h, left : left + w]
    np.maximum(region, ink[: region.shape[0], : region.shape[1]], out=region)


def _place(rng: np.random.Generator, canvas: np.ndarray, ink: np.ndarray, margin: float = 0.05,
           x_range: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:  # fmt: skip
    """Paste `ink` at a random position (off-centre is normal) leaving `margin` of the canvas free; returns it."""
    H, W = canvas.shape
    h, w = ink.shape
    my, mx = int(margin * H), int(margin * W)
    lo_x = max(mx, int(x_range[0] * W))
    hi_x = max(lo_x, min(W - mx - w, int(x_range[1] * W) - w))
    top = int(rng.integers(my, max(my, H - my - h) + 1))
    left = int(rng.integers(lo_x, hi_x + 1))
    _paste(canvas, ink, top, left)
    return top, left


def _fit(ink: np.ndarray, max_h: int, max_w: int) -> np.ndarray:
    """Shrink ink (area-averaged) if it is larger than the room for it."""
    h, w = ink.shape
    s = min(1.0, max_h / h, max_w / w)
    if s >= 1.0:
        return ink
    return np.clip(_resize(ink, round(w * s), round(h * s), Image.Resampling.BOX), 0, 1)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (paper texture, blotches), made at low resolution."""
    k = max(1, int(sigma / 2))
    small = rng.standard_normal((shape[0] // k + 2, shape[1] // k + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / k)
    field = _resize(small, (shape[1] // k + 2) * k, (shape[0] // k + 2) * k, Image.Resampling.BILINEAR)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _pen(rng: np.random.Generator, height: float, pen: str | None) -> float | None:
    kind = pen or str(rng.choice(["thin", "medium", "thick"]))
    if kind == "natural":
        return None
    lo, hi = {"thin": (0.02, 0.04), "medium": (0.06, 0.09), "thick": (0.11, 0.15)}[kind]
    return max(1.5, float(rng.uniform(lo, hi)) * height)


# ----------------------------------------------------------------------------------------------------------
# The kinds of image users send.


def pen_on_paper(digit: np.ndarray, seed: Seed = 0, pen: str | None = None) -> np.ndarray:
    """Dark ink on white paper, 100-600 px, a smooth pen (thin, medium or thick; random if None): RGB uint8."""
    rng = _rng(seed)
    H = int(rng.integers(100, 601))
    W = int(H * rng.uniform(0.8, 1.25))
    height = rng.uniform(0.5, 0.8) * min(H, W)
    ink = _fit(render(digit, height, _pen(rng, height, pen)), int(0.9 * H), int(0.9 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink)
    paper = np.array([250, 249, 245], np.float32) / 255
    color = np.array([[20, 20, 25], [20, 30, 110], [40, 40, 40]][int(rng.integers(3))], np.float32) / 255
    img = paper * (1 - canvas[..., None]) + color * canvas[..., None]
    return _to_uint8(img)


def photo(digit: np.ndarray, seed: Seed = 0, long_side: int | None = None) -> np.ndarray:
    """A phone photo of a digit on paper: texture, colour cast, a lighting gradient and vignette, a shadow at one
    border, slight rotation and perspective, off-centre, blur and JPEG noise. RGB uint8, long side 480-960."""
    rng = _rng(seed)
    L = long_side or int(rng.integers(480, 961))
    S = int(L * rng.uniform(0.7, 0.8))
    H, W = (L, S) if rng.random() < 0.5 else (S, L)
    # The shadow: a band along one side, a quarter of the image at most; the digit stays clear of it.
    side = int(rng.integers(4))
    depth = rng.uniform(0.08, 0.2)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    pos = [yy / H, 1 - yy / H, xx / W, 1 - xx / W][side]
    shadow = 1 - rng.uniform(0.3, 0.5) * 0.5 * (1 - np.tanh((pos - depth) / 0.02))  # soft edge, ~2% wide
    height = rng.uniform(0.25, 0.5) * min(H, W)
    ink = render(digit, height, _pen(rng, height, None))
    ink = _rotate(ink, rng.uniform(-8, 8))
    ink = _perspective(rng, ink, 0.06)
    ink = _fit(ink, int(0.6 * H), int(0.6 * W))
    canvas = np.zeros((H, W), np.float32)
    free = depth + 0.05
    if side < 2:  # shadow at top or bottom: keep the digit in the other rows
        h = ink.shape[0]
        top = int(free * H) if side == 0 else int(0.05 * H)
        bottom = H - int(0.05 * H) - h if side == 0 else H - int(free * H) - h
        t = int(rng.integers(top, max(top, bottom) + 1))
        left = int(rng.integers(int(0.05 * W), max(int(0.05 * W), W - ink.shape[1] - int(0.05 * W)) + 1))
        _paste(canvas, ink, t, left)
    else:
        x_range = (free, 0.95) if side == 2 else (0.05, 1 - free)
        _place(rng, canvas, ink, x_range=x_range)
    paper = 0.9 + 0.03 * _smooth_noise(rng, (H, W), max(H, W) / 20) + 0.015 * rng.standard_normal((H, W))
    cast = np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95)], np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xx / W - 0.5) + np.sin(angle) * (yy / H - 0.5))
    lighting = (0.85 + 0.3 * ramp) * (1 - 0.35 * ((xx / W - 0.5) ** 2 + (yy / H - 0.5) ** 2) * 2)
    gray = paper * (1 - canvas * rng.uniform(0.8, 0.92)) * lighting * shadow
    img = np.clip(gray[..., None] * cast, 0, 1)
    pil = Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    return _jpeg(pil, int(rng.integers(55, 86)))


def _perspective(rng: np.random.Generator, ink: np.ndarray, amount: float) -> np.ndarray:
    """A mild keystone: each corner moved by up to `amount` of the size (canvas padded so nothing is cut)."""
    pad = int(amount * max(ink.shape)) + 2
    a = np.pad(ink, pad)
    h, w = a.shape
    d = rng.uniform(-amount, amount, 8) * np.array([w, h] * 4)
    corners = np.array([0, 0, w, 0, w, h, 0, h], np.float64)
    coeffs = _perspective_coeffs(corners + d, corners)
    out = Image.fromarray(a.astype(np.float32)).transform((w, h), Image.Transform.PERSPECTIVE, coeffs,
                                                           Image.Resampling.BILINEAR)
    return _crop(np.asarray(out))


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """The 8 coefficients PIL wants: output corner dst[i] samples input point src[i]."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst.reshape(4, 2), src.reshape(4, 2), strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.array(rows), np.array(rhs)).tolist()


def _jpeg(img: Image.Image, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(img.mode))


def scan(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A scanned form: faded low-contrast ink, grey paper, speckle and sensor noise, slight skew. Gray uint8,
    200-400 px."""
    rng = _rng(seed)
    H = int(rng.integers(200, 401))
    W = int(H * rng.uniform(0.8, 1.2))
    height = rng.uniform(0.45, 0.7) * min(H, W)
    ink = _rotate(render(digit, height, _pen(rng, height, None)), rng.uniform(-4, 4))
    ink = _fit(ink, int(0.9 * H), int(0.9 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink)
    paper = rng.uniform(0.85, 0.95)
    contrast = rng.uniform(0.3, 0.5)
    img = paper * (1 - contrast * canvas) + rng.normal(0, 0.02, (H, W))
    img = ndimage.gaussian_filter(img, 0.6)
    # Speckle: dust and toner dots, single pixels and 2x2 clusters, dark.
    n = int(rng.uniform(0.0005, 0.002) * H * W)
    ys, xs = rng.integers(0, H - 1, n), rng.integers(0, W - 1, n)
    big = rng.random(n) < 0.3
    img[ys, xs] = paper - contrast * rng.uniform(0.5, 1.0, n)
    img[ys[big] + 1, xs[big]] = img[ys[big], xs[big]]
    img[ys[big], xs[big] + 1] = img[ys[big], xs[big]]
    return _to_uint8(img)


def canvas_rgba(digit: np.ndarray, seed: Seed = 0, stroke: str | None = None) -> np.ndarray:
    """A web-canvas export: 280x280 RGBA, transparent background (RGB 0 under alpha 0, as browsers write it),
    strokes in black or white (random if None) with anti-aliased alpha. uint8 (280, 280, 4)."""
    rng = _rng(seed)
    color = stroke or str(rng.choice(["black", "white"]))
    if color not in ("black", "white"):
        raise ValueError(f"stroke = {stroke!r}: expected 'black', 'white' or None")
    height = rng.uniform(150, 230)
    ink = _fit(render(digit, height, float(rng.uniform(14, 22))), 260, 260)
    alpha = np.zeros((280, 280), np.float32)
    _place(rng, alpha, ink, margin=0.03)
    out = np.zeros((280, 280, 4), np.uint8)
    out[..., 3] = _to_uint8(alpha)
    if color == "white":
        out[..., :3] = np.where(alpha[..., None] > 0, 255, 0)
    return out


def tiny(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A digit 8-14 px tall in a 48-128 px field, dark on light with a little noise. Gray uint8."""
    rng = _rng(seed)
    size = int(rng.integers(48, 129))
    ink = render(digit, rng.uniform(8, 14))
    canvas = np.zeros((size, size), np.float32)
    _place(rng, canvas, ink, margin=0.1)
    img = 0.95 * (1 - 0.85 * canvas) + rng.normal(0, 0.01, canvas.shape)
    return _to_uint8(img)


def huge(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A digit filling a 2000 px image, drawn with a thin pen (0.5-1% of the height). Gray uint8."""
    rng = _rng(seed)
    H, W = 2000, int(rng.integers(1500, 2001))
    height = rng.uniform(0.7, 0.85) * H
    ink = _fit(render(digit, height, float(rng.uniform(0.005, 0.01) * height)), int(0.95 * H), int(0.95 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink, margin=0.02)
    return _to_uint8(0.97 * (1 - 0.9 * canvas))


def rotated(digit: np.ndarray, seed: Seed = 0, max_degrees: float = 25.0) -> np.ndarray:
    """Pen on paper, rotated by 10 to `max_degrees` degrees either way. RGB uint8."""
    rng = _rng(seed)
    angle = rng.uniform(min(10.0, max_degrees), max_degrees) * rng.choice([-1, 1])
    H = int(rng.integers(150, 401))
    height = rng.uniform(0.5, 0.65) * H
    ink = _fit(_rotate(render(digit, height, _pen(rng, height, "medium")), angle), int(0.9 * H), int(0.9 * H))
    canvas = np.zeros((H, H), np.float32)
    _place(rng, canvas, ink)
    return _to_uint8(np.repeat((0.97 * (1 - 0.9 * canvas))[..., None], 3, 2))


def inverted(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """Light ink on a dark background (chalk on a board, a dark-mode screen): textured, noisy. Gray uint8."""
    rng = _rng(seed)
    H = int(rng.integers(150, 401))
    W = int(H * rng.uniform(0.8, 1.25))
    height = rng.uniform(0.5, 0.75) * min(H, W)
    ink = _fit(render(digit, height, _pen(rng, height, None)), int(0.9 * H), int(0.9 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink)
    board = rng.uniform(0.1, 0.25) + 0.02 * _smooth_noise(rng, (H, W), H / 15)
    chalk = rng.uniform(0.75, 0.95)
    img = board + (chalk - board) * canvas + rng.normal(0, 0.02, (H, W))
    return _to_uint8(img)


KINDS: dict[str, Callable[..., Any]] = {
    "pen_on_paper": pen_on_paper,
    "photo": photo,
    "scan": scan,
    "canvas_rgba": canvas_rgba,
    "tiny": tiny,
    "huge": huge,
    "rotated": rotated,
    "inverted": inverted,
}


def make_set(source_images: Any, labels: Any, kind: str, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """[(image, label)]: each 28x28 source turned into `kind`, image i drawn from Generator([seed, i])."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    images = np.asarray(source_images)
    if images.ndim == 4:
        images = images[:, 0]
    return [(KINDS[kind](images[i], np.random.default_rng([seed, i])), int(labels[i])) for i in range(len(images))]


# ----------------------------------------------------------------------------------------------------------
# Multi-digit rows.


def strip(
    digits: list[Any],
    labels: list[int] | None = None,
    seed: Seed = 0,
    height: int = 64,
    gap: tuple[float, float] = (0.15, 0.5),
    touch: float = 0.0,
    max_overlap: float = 0.2,
    broken: float = 0.0,
    pen: str | None = "natural",
) -> tuple[np.ndarray, list[int], list[tuple[int, int, int, int]]]:
    """A row of handwritten digits on paper: (gray uint8 image, labels, true ink boxes (x0, y0, x1, y1), x1 and
    y1 exclusive, left to right).

    `digits` holds 28x28 arrays or ints (printed with a random font). Each digit is `height` px tall +-10% with
    its baseline jittered; gaps between neighbours are uniform in `gap` x height. With probability `touch` a pair
    is pushed together until the inks overlap by 1-3 px (touching digits), unless that would push their boxes
    more than `max_overlap` x height into each other (interlocking shapes such as a slanted 1 under a 7's bar):
    then the boxes overlap by that much and the inks may not meet. With probability `broken` a digit
    loses a horizontal band across its strokes (a pen that skipped: its parts stack vertically).
    """
    rng = _rng(seed)
    if labels is None:
        if not all(isinstance(d, (int, np.integer)) for d in digits):
            raise ValueError("labels are required when digits are images")
        labels = [int(d) for d in digits]
    fonts = list(FONTS)
    inks = []
    for d in digits:
        src = font_digit(int(d), fonts[int(rng.integers(len(fonts)))]) if isinstance(d, (int, np.integer)) else d
        h = height * rng.uniform(0.9, 1.1)
        ink = render(src, h, _pen(rng, h, pen))
        if rng.random() < broken:
            ink = _break(rng, ink)
        inks.append(ink)
    H = int(height * 1.6)
    pad = int(height * 0.3)
    lefts, tops = [], []
    x = pad
    for i, ink in enumerate(inks):
        top = int((H - ink.shape[0]) / 2 + rng.uniform(-0.05, 0.05) * height)
        top = int(np.clip(top, 0, H - ink.shape[0]))
        if i > 0:
            if rng.random() < touch:
                x = _touching_left(inks[i - 1], tops[-1], lefts[-1], ink, top) - int(rng.integers(1, 4))
                x = max(x, _ink_right(inks[i - 1], lefts[-1]) - _ink_left(ink) - int(max_overlap * height))
            else:
                x = lefts[-1] + inks[i - 1].shape[1] + int(rng.uniform(*gap) * height)
        lefts.append(x)
        tops.append(top)
    W = max(left + ink.shape[1] for left, ink in zip(lefts, inks, strict=True)) + pad
    canvas = np.zeros((H, W), np.float32)
    boxes = []
    for ink, top, left in zip(inks, tops, lefts, strict=True):
        _paste(canvas, ink, top, left)
        ys, xs = np.nonzero(ink > 0.5)
        boxes.append((int(left + xs.min()), int(top + ys.min()), int(left + xs.max() + 1), int(top + ys.max() + 1)))
    img = 0.96 * (1 - 0.9 * canvas) + rng.normal(0, 0.01, canvas.shape)
    return _to_uint8(img), list(labels), boxes


def _ink_right(ink: np.ndarray, left: int) -> int:
    return left + int(np.flatnonzero((ink > 0.5).any(0))[-1]) + 1


def _ink_left(ink: np.ndarray) -> int:
    return int(np.flatnonzero((ink > 0.5).any(0))[0])


def _touching_left(prev: np.ndarray, prev_top: int, prev_left: int, ink: np.ndarray, top: int) -> int:
    """The left position at which `ink` first touches `prev` when slid in from the right (ink > 0.5)."""
    a, b = prev > 0.5, ink > 0.5
    best = None
    for r in range(b.shape[0]):
        y = top + r - prev_top
        if not (0 <= y < a.shape[0]) or not b[r].any() or not a[y].any():
            continue
        right_of_prev = prev_left + np.flatnonzero(a[y])[-1]
        left_of_ink = np.flatnonzero(b[r])[0]
        x = right_of_prev + 1 - left_of_ink
        best = x if best is None else max(best, x)
    return best if best is not None else prev_left + prev.shape[1]


def _break(rng: np.random.Generator, ink: np.ndarray) -> np.ndarray:
    """Erase a horizontal band (6-12% of the height) at 30-70% of the height."""
    h = ink.shape[0]
    band = max(2, int(rng.uniform(0.06, 0.12) * h))
    y = int(rng.uniform(0.3, 0.7) * h)
    out = ink.copy()
    out[y : y + band] = 0
    return out
