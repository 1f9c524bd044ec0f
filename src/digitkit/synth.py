"""Realistic test inputs built from real digit images: what users actually send, made from MNIST digits.

Each generator takes a 28x28 digit (uint8, white on black, MNIST format; `font_digit` makes one from a font) and
returns an image as a user would supply it: a pen drawing on paper, a phone photo, a scan, a web-canvas export,
a tiny or a huge digit, a rotated or an inverted one. All randomness comes from a seeded numpy Generator, so
`kind(digit, seed)` is the same image on every run. `make_set` builds labelled sets; `strip` builds multi-digit
rows with known boxes for segmentation.

KINDS are the first kinds; EXTRA_KINDS (issue 22) add what users reported failing: low-resolution scans enlarged
with smoothing, thumbnails, faxes, pencil, handwriting-style phone photos at any size and strokes on an opaque
canvas (kept apart so that sets built over KINDS stay byte for byte as they were). `negative(kind, seed)` and
`make_negatives` draw non-digits tagged by kind (letters, symbols, blank and textured paper, scribbles, photos of
objects, partial and doubled digits) the same ways, for measuring rejection and for training against outliers.

Rendering: a digit is redrawn at the target size either from its own anti-aliased shape (`pen=None`: upscaled
bicubically and cut at half intensity, so the writer's stroke width scales with it) or as a pen of a given
width following its centre line (Zhang-Suen skeleton at 4x, drawn as round-capped segments, 2x supersampled).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path
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

EXTRA_FONTS: dict[str, tuple[str, str, str]] = {
    "cm-roman": ("cmr10", "normal", "normal"),
    "cm-sans": ("cmss10", "normal", "normal"),
    "cm-typewriter": ("cmtt10", "normal", "normal"),
    "cm-bold": ("cmb10", "normal", "normal"),
    "cm-italic": ("cmti10", "normal", "normal"),
    "stix-italic": ("STIXGeneral", "normal", "italic"),
    "stix-bold": ("STIXGeneral", "bold", "normal"),
    "serif-italic": ("DejaVu Serif", "normal", "italic"),
    "mono-bold": ("DejaVu Sans Mono", "bold", "normal"),
}
"""More printed faces shipped with matplotlib (Computer Modern, more STIX and DejaVu styles), for the issue-22 sets;
kept apart from FONTS so that the sets and rows drawn over FONTS stay as they were. Computer Modern's math italic
(cmmi10) is left out: its digits are old-style figures. matplotlib ships no handwriting-style font."""


def _rng(seed: Seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------------------
# Digits: 28x28 sources, and redrawing them at any size.


def font_digit(d: int, font: str = "sans", size: int = 28, box: int = 20, slant_degrees: float = 0.0) -> np.ndarray:
    """A printed digit in MNIST format: (size, size) uint8 white on black, longer side `box`, centred by mass.
    `font` is a key of FONTS, EXTRA_FONTS or (when installed) HANDWRITING_FONTS; `slant_degrees` shears it (positive
    leans right)."""
    face = ImageFont.truetype(_font_path(font), 160)
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
    a number draws a round pen of that width along the digit's centre line. Sources of other sizes at MNIST's
    resolution (two digits side by side, 28x52) work the same way."""
    src = np.asarray(digit, np.float32) / (255.0 if np.asarray(digit).dtype == np.uint8 else 1.0)
    sh, sw = src.shape
    ys, _ = np.nonzero(src > 0.3)
    scale = height / max(int(ys.max() - ys.min() + 1), 1) if len(ys) else height / 20
    if pen is None and scale <= 1.5:  # small: area-average the digit as it is
        up = np.clip(_resize(src, round(sw * scale), round(sh * scale), Image.Resampling.BOX), 0, 1)
        ink = up / max(float(up.max()), 1e-6)
    elif pen is None:
        up = _resize(src, round(sw * scale), round(sh * scale), Image.Resampling.BICUBIC)
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
    sh, sw = src.shape
    mask = _resize(src, sw * k, sh * k, Image.Resampling.BICUBIC) > 0.5
    skel = _skeleton(mask)
    ss = 2  # supersampling for anti-aliased pen edges
    f = scale / k * ss
    side_w, side_h = round(sw * scale * ss + pen * ss * 2 + 4), round(sh * scale * ss + pen * ss * 2 + 4)
    off = pen * ss + 2
    canvas = Image.new("L", (side_w, side_h), 0)
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
    return _resize(ink, side_w // ss, side_h // ss, Image.Resampling.BOX)


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


# ----------------------------------------------------------------------------------------------------------
# More kinds (issue 22, "real-world input v2"): what users sent that the kinds above did not cover. They live in
# EXTRA_KINDS, not KINDS, so that every set and test built over KINDS stays byte for byte what it was.

PAPERS: dict[str, tuple[float, float, float]] = {
    "white": (0.93, 0.93, 0.91), "cream": (0.95, 0.91, 0.80), "yellow-pad": (0.97, 0.93, 0.62),
    "blue": (0.80, 0.87, 0.95), "pink": (0.97, 0.84, 0.87), "green": (0.82, 0.93, 0.80), "grey": (0.80, 0.80, 0.79),
    "kraft": (0.80, 0.68, 0.50),
}
"""Paper colours (linear-ish RGB in [0, 1]) for photos: white and tinted notepads, grey recycled paper, kraft."""
INKS: dict[str, tuple[float, float, float]] = {
    "black": (0.08, 0.08, 0.10), "blue-ballpoint": (0.12, 0.16, 0.55), "dark-blue": (0.05, 0.10, 0.35),
    "red": (0.62, 0.08, 0.10), "green": (0.05, 0.33, 0.15), "graphite": (0.30, 0.30, 0.33),
}
"""Ink colours for photos; every one is at least 0.4 darker than every paper in gray."""


def _choice(rng: np.random.Generator, options: Any) -> Any:
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _small_field(rng: np.random.Generator, ink: np.ndarray, fill: tuple[float, float],
                 centred: bool) -> np.ndarray:  # fmt: skip
    """A canvas around `ink` whose height the ink fills by `fill` (uniform range), at least 1 px free each side;
    the ink centred (bounding box) or anywhere."""
    h, w = ink.shape
    H = max(h + 2, round(h / rng.uniform(*fill)))
    W = max(w + 2, round(H * rng.uniform(0.8, 1.25)))
    canvas = np.zeros((H, W), np.float32)
    if centred:
        _paste(canvas, ink, (H - h) // 2, (W - w) // 2)
    else:
        _paste(canvas, ink, int(rng.integers(1, H - h)), int(rng.integers(1, W - w)))
    return canvas


def lowres_scan(digit: np.ndarray, seed: Seed = 0, clean: bool | None = None) -> np.ndarray:
    """A digit digitized small and enlarged with smoothing: a form field scanned at low dpi, a fax or a thumbnail
    blown up by a viewer or an upscaler. The digit is 8-16 px tall at the source resolution (area-averaged, as a
    sensor does): its own shape or, from 11 px, a medium, thick or marker pen (1.5 px or more; a marker is 16-22%
    of the height: a felt-tip in a form box). Three in ten are cropped to the digit's own box (as a detector or
    a careful user crops a field), the others sit in a field they fill 50-95% of. Then the image is scaled up
    bilinearly or bicubically so its longer side is 28-200 px: soft, blocky-blurred strokes in dark grey ink
    (40-110 of 255) on white or near-white paper (237-255). `clean` (one in four when None) is centred,
    noise-free and unblurred: the plain legible case; the others get light sensor noise before and after the
    enlargement, and half of them a slight blur (0.2-0.45 source px). Gray uint8."""
    rng = _rng(seed)
    draw = rng.random()
    clean = bool(draw < 0.25) if clean is None else bool(clean)
    height = rng.uniform(8, 16)
    style = _choice(rng, ["natural", "natural", "medium", "thick", "marker"]) if height >= 11 else "natural"
    marker = max(1.5, float(rng.uniform(0.16, 0.22)) * height)
    ink = render(digit, height, marker if style == "marker" else _pen(rng, height, style))
    if rng.random() < 0.3:
        canvas = _crop(ink, margin=0)
    else:
        canvas = _small_field(rng, ink, (0.5, 0.95), centred=clean)
    paper = rng.uniform(0.93, 1.0)
    level = rng.uniform(40, 110) / 255
    small = paper - (paper - level) * canvas
    if not clean:
        small = small + rng.normal(0, rng.uniform(0.004, 0.015), small.shape)
    H, W = small.shape
    target = int(rng.integers(max(28, max(H, W)), 201))
    factor = target / max(H, W)
    resample = _choice(rng, [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
    img = _resize(small.astype(np.float32), round(W * factor), round(H * factor), resample)
    if not clean:
        if rng.random() < 0.5:
            img = ndimage.gaussian_filter(img, rng.uniform(0.2, 0.45) * factor)
        img = img + rng.normal(0, rng.uniform(0.002, 0.01), img.shape)
    return _to_uint8(img)


def thumbnail(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A small picture of a digit, 16-40 px a side, the digit filling 65-90% of its height: an icon, a preview,
    a form field cut out and downsampled by a browser or a phone. Drawn at 8x (the digit's own shape or a medium
    or thick pen; dark ink on white or tinted paper), shrunk with a box, bilinear or Lanczos filter, and saved as
    JPEG (quality 30-80) one time in two. RGB uint8."""
    rng = _rng(seed)
    H = int(rng.integers(16, 41))
    W = int(np.clip(round(H * rng.uniform(0.75, 1.25)), 16, 40))
    k = 8
    height = rng.uniform(0.65, 0.9) * H * k
    ink = render(digit, height, _pen(rng, height, _choice(rng, ["natural", "medium", "thick"])))
    ink = _fit(ink, int(0.95 * H * k), int(0.95 * W * k))
    canvas = np.zeros((H * k, W * k), np.float32)
    _place(rng, canvas, ink, margin=0.02)
    paper = np.array(PAPERS[_choice(rng, ["white", "white", "cream", "grey", "blue"])], np.float32) * 1.05
    color = np.array(INKS[_choice(rng, ["black", "blue-ballpoint", "dark-blue"])], np.float32)
    a = canvas[..., None] * rng.uniform(0.85, 1.0)
    big = Image.fromarray(_to_uint8(paper * (1 - a) + color * a))
    small = big.resize((W, H), _choice(rng, [Image.Resampling.BOX, Image.Resampling.BILINEAR,
                                             Image.Resampling.LANCZOS]))  # fmt: skip
    if rng.random() < 0.5:
        return _jpeg(small, int(rng.integers(30, 81)))
    return np.asarray(small)


def fax(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A faxed or 1-bit scanned form: the digit 12-28 px tall at the fax's horizontal resolution (standard mode,
    two times in five, halves the vertical resolution: 10-14 rows); sensor noise, then binarized by a hard
    threshold at 30-50% of the ink's darkness, or one time in three Floyd-Steinberg dithered (a thick pen, 18-28
    px: grey ink becomes a dot pattern); toner specks in most, a dropped scan line now and then; enlarged 2-6x
    without smoothing, as a viewer shows it: jagged 1-bit edges. Gray uint8 holding only 0 and 255."""
    rng = _rng(seed)
    dither = rng.random() < 1 / 3
    standard = rng.random() < 0.4
    height = rng.uniform(20 if standard else 18 if dither else 12, 28)
    if dither:
        pen = _pen(rng, height, "thick")
    else:
        pen = None if rng.random() < 0.5 else _pen(rng, height, "medium")
    ink = render(digit, height, pen)
    H = round(ink.shape[0] / rng.uniform(0.45, 0.8)) + 2
    W = max(ink.shape[1] + 2, round(H * rng.uniform(0.8, 1.4)))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink, margin=0.04)
    contrast = rng.uniform(0.75 if dither else 0.6, 1.0)
    gray = 1 - contrast * canvas + rng.normal(0, rng.uniform(0.01, 0.05), canvas.shape)
    if standard:
        gray = _resize(gray.astype(np.float32), W, H // 2, Image.Resampling.BOX)
    if dither:
        white = np.array(Image.fromarray(_to_uint8(gray)).convert("1"), bool)  # PIL dithers (Floyd-Steinberg)
    else:
        white = gray > 1 - contrast * rng.uniform(0.3, 0.5)
    h, w = white.shape
    if rng.random() < 0.7:  # toner specks: single dots and a few 2x1 pairs
        n = int(rng.uniform(0.001, 0.006) * h * w) + 1
        ys, xs = rng.integers(0, h, n), rng.integers(0, w - 1, n)
        white[ys, xs] = False
        pair = rng.random(n) < 0.3
        white[ys[pair], xs[pair] + 1] = False
    if rng.random() < 0.25:  # a scan line lost in transmission
        white[int(rng.integers(0, h)), :] = True
    k = int(rng.integers(2, 7))
    big = np.repeat(np.repeat(white, k * (2 if standard else 1), 0), k, 1)
    return np.where(big, 255, 0).astype(np.uint8)


def pencil(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """Pencil on paper: thin grey strokes only 20-50% darker than the paper at full pressure, grainy where the
    graphite catches the paper's tooth, pressure varying along the strokes; off-white paper with fibre texture
    and a faint tint; 120-500 px. RGB uint8."""
    rng = _rng(seed)
    H = int(rng.integers(120, 501))
    W = int(H * rng.uniform(0.8, 1.25))
    height = rng.uniform(0.45, 0.8) * min(H, W)
    ink = render(digit, height, max(1.5, float(rng.uniform(0.02, 0.06)) * height))
    ink = _fit(_rotate(ink, rng.uniform(-5, 5)), int(0.9 * H), int(0.9 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink)
    tooth = np.clip(0.6 + 0.45 * _smooth_noise(rng, (H, W), 1.0), 0, 1)
    pressure = np.clip(1 + 0.25 * _smooth_noise(rng, (H, W), height / 4), 0.5, 1.3)
    mark = np.clip(canvas * tooth * pressure, 0, 1) * rng.uniform(0.2, 0.5)
    paper = (rng.uniform(0.9, 0.98) + 0.012 * _smooth_noise(rng, (H, W), 3.0)
             + 0.012 * _smooth_noise(rng, (H, W), max(H, W) / 10))  # fmt: skip
    tint = np.array([1.0, rng.uniform(0.97, 1.0), rng.uniform(0.9, 0.99)], np.float32)
    return _to_uint8((paper * (1 - mark))[..., None] * tint)


def handwriting_photo(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A phone photo of a handwritten digit in its writer's style, at any size: 8-70% of the short side
    (log-uniform, at least 16 px) of a 240-1600 px photo; the digit's own shape or a thin, medium or thick pen,
    slanted -25..25 degrees, narrowed or widened (0.75-1.3), rotated a little, in perspective, anywhere. Paper
    white or tinted (PAPERS), ink of INKS; `_photo_look`: fibre texture, a lighting gradient, vignette, soft
    shadows that may cross the digit, a colour cast, exposure, sensor noise, blur and JPEG. RGB uint8."""
    rng = _rng(seed)
    return _photo_look(rng, _handwriting_canvas(rng, digit))


def _handwriting_canvas(rng: np.random.Generator, digit: np.ndarray) -> np.ndarray:
    """handwriting_photo's ink: white on black (H, W) in [0, 1], before the paper and the camera."""
    L = int(rng.integers(240, 1601))
    S = int(L * rng.uniform(0.65, 0.85))
    H, W = (L, S) if rng.random() < 0.5 else (S, L)
    height = max(16.0, math.exp(rng.uniform(math.log(0.08), math.log(0.7))) * min(H, W))
    ink = render(digit, height, _pen(rng, height, _choice(rng, ["natural", "thin", "medium", "thick"])))
    ink = _shear(ink, math.tan(math.radians(rng.uniform(-25, 25))))
    ink = np.clip(_resize(ink, max(1, round(ink.shape[1] * rng.uniform(0.75, 1.3))), ink.shape[0],
                          Image.Resampling.BILINEAR), 0, 1)  # fmt: skip
    ink = _perspective(rng, _rotate(ink, rng.uniform(-10, 10)), 0.05)
    ink = _fit(ink, int(0.9 * H), int(0.9 * W))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink, margin=0.04)
    return canvas


def _photo_look(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """White-on-black ink (H, W) in [0, 1] -> a phone photo of it on paper (see handwriting_photo). RGB uint8."""
    H, W = canvas.shape
    paper = np.array(PAPERS[_choice(rng, PAPERS)], np.float32)
    color = np.array(INKS[_choice(rng, INKS)], np.float32)
    a = (canvas * rng.uniform(0.8, 0.95))[..., None]
    img = paper * (1 - a) + color * a
    fibre = 1 + 0.025 * _smooth_noise(rng, (H, W), max(H, W) / 20) + 0.015 * _smooth_noise(rng, (H, W), 1.5)
    return _camera(rng, img * fibre[..., None])


def canvas_stroke(digit: np.ndarray, seed: Seed = 0) -> np.ndarray:
    """A digit drawn with the mouse or a finger on an opaque drawing canvas (a page that fills its canvas before
    drawing, a paint program): white, light grey or cream background; a round brush 2-14% of the digit's height
    following its centre line, black, dark blue, grey or a saturated colour, anti-aliased or (one in four)
    aliased; 200-600 px tall, as wide or up to 1.6x wider; the digit 40-90% of the height, anywhere. RGB, or one
    in five an opaque RGBA (alpha 255 everywhere); one in four saved as JPEG (quality 70-95). uint8. (canvas_rgba
    is the transparent export.)"""
    rng = _rng(seed)
    H = int(rng.integers(200, 601))
    W = int(H * _choice(rng, [1.0, 1.0, rng.uniform(1.0, 1.6)]))
    height = rng.uniform(0.4, 0.9) * H
    ink = render(digit, height, max(2.0, float(rng.uniform(0.02, 0.14)) * height))
    ink = _fit(ink, int(0.96 * H), int(0.96 * W))
    if rng.random() < 0.25:
        ink = (ink > 0.5).astype(np.float32)
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, ink, margin=0.02)
    background = np.array(_choice(rng, [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.94, 0.94, 0.94), (0.99, 0.97, 0.9)]))
    color = np.array(_choice(rng, [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.1, 0.1, 0.45), (0.25, 0.25, 0.25),
                                   (0.85, 0.1, 0.1), (0.1, 0.5, 0.15), (0.2, 0.3, 0.9)]))  # fmt: skip
    a = canvas[..., None]
    img = _to_uint8(background * (1 - a) + color * a)
    r = rng.random()
    if r < 0.2:
        return np.concatenate([img, np.full((H, W, 1), 255, np.uint8)], 2)
    if r < 0.45:
        return _jpeg(Image.fromarray(img), int(rng.integers(70, 96)))
    return img


EXTRA_KINDS: dict[str, Callable[..., Any]] = {
    "lowres_scan": lowres_scan,
    "thumbnail": thumbnail,
    "fax": fax,
    "pencil": pencil,
    "handwriting_photo": handwriting_photo,
    "canvas_stroke": canvas_stroke,
}
"""The issue-22 kinds (see each function): not in KINDS, so the sets built over KINDS stay as they were."""

ALL_KINDS: dict[str, Callable[..., Any]] = {**KINDS, **EXTRA_KINDS}


def make_set(source_images: Any, labels: Any, kind: str, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """[(image, label)]: each 28x28 source turned into `kind` (a key of KINDS or EXTRA_KINDS), image i drawn from
    Generator([seed, i])."""
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(ALL_KINDS)}")
    images = np.asarray(source_images)
    if images.ndim == 4:
        images = images[:, 0]
    make = ALL_KINDS[kind]
    return [(make(images[i], np.random.default_rng([seed, i])), int(labels[i])) for i in range(len(images))]


# ----------------------------------------------------------------------------------------------------------
# Non-digits (issue 22): what a digit reader should refuse, drawn the way the digits are (the same kinds, papers,
# pens and cameras) so that only the content differs. `negative(kind, seed)` draws one; `make_negatives` a set
# tagged by kind (for the rejection benchmark, and for outlier exposure in training).

LETTERS = "ACEFHJKLMNPRTUVWXYacdefhkmnprtuvwxy"
"""Letters a person does not read as a digit. The others are drawn only by the `lookalike` kind (LOOKALIKES)."""
LOOKALIKES = "ODQoIlijZzSsBGbgq"
"""Letters a person may well read as a digit (O D Q o as 0; I l i j as 1; Z z as 2; S s as 5; G b as 6; B as 8;
g q as 9): not in NEGATIVE_KINDS, since answering them with a digit is not wrong; reported on their own."""
SYMBOLS = "+=%&@#$?*<>~€£¥×÷πΩΔΣλμφΨ♥★✓→"
"""Symbols, each drawn only in the fonts that have its glyph. Left out as too digit-like: | / \\ ! ( ) [ ] (a 1),
§ (an 8 or a 5)."""
NEGATIVE_KINDS = ("letter", "symbol", "blank_paper", "textured_paper", "scribble", "object_photo", "partial_digit",
                  "doubled_digit")  # fmt: skip
"""What `make_negatives` draws by default: everything here should be refused."""
ALL_NEGATIVE_KINDS = (*NEGATIVE_KINDS, "lookalike")
LOOK_KINDS = tuple(k for k in ALL_KINDS if k != "huge")
"""The digit kinds a glyph-like negative (letter, symbol, lookalike, scribble, partial or doubled digit) is drawn
as, one at random: every way digits arrive but `huge` (2000 px, slow to draw)."""


def _font_path(font: str) -> str:
    if font in HANDWRITING_FONTS:
        path = HANDWRITING_FONTS[font]
        if not Path(path).is_file():
            raise ValueError(f"font {font!r} is not installed ({path}); install Debian's fonts-humor-sans, "
                             "fonts-comic-neue and fonts-dancingscript, or use handwriting_fonts() to list what is")
        return path
    if font not in FONTS and font not in EXTRA_FONTS:
        raise ValueError(f"unknown font {font!r}; expected one of {', '.join([*FONTS, *EXTRA_FONTS])}")
    family, weight, style = FONTS[font] if font in FONTS else EXTRA_FONTS[font]
    return font_manager.findfont(font_manager.FontProperties(family=family, weight=weight, style=style))


HANDWRITING_FONTS: dict[str, str] = {
    "humor-sans": "/usr/share/fonts/truetype/humor-sans/Humor-Sans.ttf",
    "comic-neue": "/usr/share/fonts/opentype/comic-neue/ComicNeue-Regular.otf",
    "comic-neue-italic": "/usr/share/fonts/opentype/comic-neue/ComicNeue-Italic.otf",
    "comic-neue-light": "/usr/share/fonts/opentype/comic-neue/ComicNeue-Light.otf",
    "dancing-script": "/usr/share/fonts/opentype/dancingscript/DancingScript-Regular.otf",
    "dancing-script-bold": "/usr/share/fonts/opentype/dancingscript/DancingScript-Bold.otf",
}
"""Handwriting-style faces from Debian packages (fonts-humor-sans: xkcd's hand; fonts-comic-neue; fonts-dancingscript:
a casual script), for the row benchmark (benchmarks/read.py installs them); matplotlib ships none. Only digits."""


def handwriting_fonts() -> list[str]:
    """The HANDWRITING_FONTS installed on this machine."""
    return [name for name, path in HANDWRITING_FONTS.items() if Path(path).is_file()]


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib import ft2font

    return frozenset(ft2font.FT2Font(path).get_charmap())


def has_glyph(char: str, font: str) -> bool:
    """Whether `font` (a key of FONTS or EXTRA_FONTS) draws `char` itself rather than a fallback box."""
    return ord(char) in _charmap(_font_path(font))


def glyph(char: str, font: str = "sans", size: int = 28, box: int = 20, slant_degrees: float = 0.0) -> np.ndarray:
    """Any character in MNIST format, like `font_digit`: (size, size) uint8 white on black, longer side `box`,
    centred by mass. Raises ValueError when the font lacks the character (see has_glyph)."""
    if len(char) != 1:
        raise ValueError(f"glyph({char!r}): expected one character")
    if not has_glyph(char, font):
        raise ValueError(f"font {font!r} has no glyph for {char!r}; check with has_glyph(char, font) first")
    face = ImageFont.truetype(_font_path(font), 160)
    left, top, right, bottom = face.getbbox(char)
    canvas = Image.new("L", (right - left + 80, bottom - top + 80), 0)
    ImageDraw.Draw(canvas).text((40 - left, 40 - top), char, fill=255, font=face)
    ink = np.asarray(canvas, np.float32) / 255
    if ink.max() <= 0.02:
        raise ValueError(f"{char!r} draws nothing in font {font!r}; expected a visible character")
    if slant_degrees:
        ink = _shear(ink, math.tan(math.radians(slant_degrees)))
    return (to_mnist(ink, size, box) * 255).round().astype(np.uint8)


def _glyph_source(rng: np.random.Generator, chars: str) -> np.ndarray:
    fonts = [*FONTS, *EXTRA_FONTS]
    while True:  # every font has the letters; a symbol is retried in another font until one has it
        char, font = _choice(rng, chars), _choice(rng, fonts)
        if has_glyph(char, font):
            return glyph(char, font, slant_degrees=float(rng.uniform(-12, 12)))


def _digit_source(rng: np.random.Generator, digits: Any, labels: Any, exclude: tuple[int, ...] = ()) -> np.ndarray:
    """A 28x28 uint8 digit: one of `digits` (N, 28, 28) (skipping labels in `exclude` when labels are given), or
    without digits a printed one (FONTS and EXTRA_FONTS, slanted up to 12 degrees)."""
    if digits is None:
        d = _choice(rng, [d for d in range(10) if d not in exclude])
        return font_digit(d, _choice(rng, [*FONTS, *EXTRA_FONTS]), slant_degrees=float(rng.uniform(-12, 12)))
    images = np.asarray(digits)
    if images.ndim == 4:
        images = images[:, 0]
    pool = np.arange(len(images))
    if labels is not None and exclude:
        pool = pool[~np.isin(np.asarray(labels), exclude)]
    if len(pool) == 0:
        raise ValueError(f"no digits to draw from (all {len(images)} excluded: labels {exclude}); pass other digits")
    image = images[int(_choice(rng, pool))]
    return (image * 255).round().astype(np.uint8) if image.dtype != np.uint8 else image


def _partial(rng: np.random.Generator, src: np.ndarray) -> np.ndarray:
    """A digit of which only 30-55% is left (by extent along a direction near up, down, left or right; the rest
    erased or never written), at the size and place the whole digit would have: pen on paper, a phone photo, a
    faded scan or a low-resolution scan. RGB or gray uint8."""
    look = _choice(rng, ["paper", "photo", "scan", "lowres"])
    H = int(rng.integers(12, 33) if look == "lowres" else rng.integers(120, 601))
    W = int(H * rng.uniform(0.8, 1.25))
    height = rng.uniform(0.5, 0.8) * min(H, W)
    ink = render(src, height, None if look == "lowres" else _pen(rng, height, None))
    canvas = np.zeros((H, W), np.float32)
    _place(rng, canvas, _fit(ink, int(0.9 * H), int(0.9 * W)))
    ys, xs = np.nonzero(canvas > 0.05)
    angle = math.radians(90 * int(rng.integers(4)) + rng.uniform(-20, 20))
    proj = np.cos(angle) * xs + np.sin(angle) * ys
    drop = proj > np.quantile(proj, rng.uniform(0.3, 0.55))
    canvas[ys[drop], xs[drop]] = 0
    if look == "photo":
        return _photo_look(rng, canvas)
    if look == "paper":
        color = np.array(INKS[_choice(rng, ["black", "blue-ballpoint", "dark-blue"])], np.float32)
        a = canvas[..., None]
        return _to_uint8(np.array([0.98, 0.976, 0.96], np.float32) * (1 - a) + color * a)
    if look == "scan":
        paper = rng.uniform(0.85, 0.95)
        img = paper * (1 - rng.uniform(0.3, 0.6) * canvas) + rng.normal(0, 0.02, canvas.shape)
        return _to_uint8(ndimage.gaussian_filter(img, 0.6))
    small = 0.97 - (0.97 - rng.uniform(40, 110) / 255) * canvas
    side = int(rng.integers(max(28, H, W), 201))
    f = side / max(H, W)
    return _to_uint8(_resize(small.astype(np.float32), round(W * f), round(H * f), Image.Resampling.BILINEAR))


def _doubled(rng: np.random.Generator, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two digits in one source, 28 high: side by side 0-4 px apart, overlapping by 3-12 px, or (one in four)
    drawn over each other, shifted by up to 3 px."""
    mode = rng.random()
    if mode < 0.25:
        out = np.zeros((28, 34), np.uint8)
        out[:, 3:31] = a
        dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
        np.maximum(out[:, 3 + dx : 31 + dx], np.roll(b, dy, 0), out=out[:, 3 + dx : 31 + dx])
        return out
    overlap = int(rng.integers(-4, 3)) if mode < 0.6 else int(rng.integers(3, 13))
    # MNIST digits sit in 20 px boxes with 4 px margins: "overlap" is between the boxes' contents.
    shift = 20 - overlap
    out = np.zeros((28, 28 + shift), np.uint8)
    out[:, :28] = a
    np.maximum(out[:, shift:], b, out=out[:, shift:])
    return out


def _scribble(rng: np.random.Generator) -> np.ndarray:
    """A scribble in MNIST format (28x28 uint8): a random walk, a zigzag, a crossing-out hatch or a tangle of
    curves, drawn at 4x with an MNIST-like pen and area-averaged down."""
    k = 112
    img = Image.new("L", (k, k), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(6, 12))
    style = _choice(rng, ["walk", "zigzag", "hatch", "tangle"])
    if style == "walk":
        pts = np.cumsum(rng.normal(0, 22, (int(rng.integers(7, 14)), 2)), 0)
        lines = [pts]
    elif style == "zigzag":
        n = int(rng.integers(5, 10))
        x = np.linspace(0, 100, n) + rng.normal(0, 4, n)
        y = np.where(np.arange(n) % 2, 0, rng.uniform(25, 60)) + rng.normal(0, 5, n)
        lines = [np.stack([x, y], 1)]
        if rng.random() < 0.5:
            lines.append(np.stack([x[::-1], y[::-1] + rng.uniform(20, 40)], 1))
    elif style == "hatch":
        lines = []
        for angle in (rng.uniform(20, 70), rng.uniform(110, 160)):
            d = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
            normal = np.array([-d[1], d[0]])
            for off in np.linspace(-30, 30, int(rng.integers(3, 6))):
                c = normal * off
                lines.append(np.stack([c - 45 * d, c + 45 * d]))
    else:
        t = np.linspace(0, 1, 200)
        lines = []
        for _ in range(int(rng.integers(2, 4))):
            f = rng.uniform(1, 4, 2)
            ph = rng.uniform(0, 2 * np.pi, 2)
            lines.append(40 * np.sin(2 * np.pi * np.outer(t, f) + ph))
    allpts = np.concatenate(lines)
    lo, hi = allpts.min(0), allpts.max(0)
    s = 90 / max(float((hi - lo).max()), 1e-6)
    for pts in lines:
        p = (pts - lo) * s + 11
        draw.line([tuple(v) for v in p.tolist()], fill=255, width=width, joint="curve")
    ink = np.asarray(img, np.float32) / 255
    return (to_mnist(ink) * 255).round().astype(np.uint8)


def _camera(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """An RGB float image of a lit scene -> a phone photo of it: lighting gradient, vignette, a soft shadow now and
    then, colour cast, exposure, sensor noise, blur, JPEG. RGB uint8."""
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    u, v = xx / W - 0.5, yy / H - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0.1, 0.5) * (np.cos(angle) * u + np.sin(angle) * v)
    light *= 1 - rng.uniform(0, 0.4) * 2 * (u**2 + v**2)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        edge = rng.uniform(-0.3, 0.3) + np.cos(angle) * u + np.sin(angle) * v
        light *= 1 - rng.uniform(0.2, 0.45) * 0.5 * (1 + np.tanh(edge / rng.uniform(0.03, 0.12)))
    cast = [np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.75, 0.95)]),
            np.array([rng.uniform(0.85, 0.97), rng.uniform(0.95, 1.0), 1.0]), np.ones(3)][int(rng.integers(3))]
    img = img * (light * rng.uniform(0.75, 1.1))[..., None] * cast.astype(np.float32)
    img = img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape)
    pil = Image.fromarray(_to_uint8(img)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    return _jpeg(pil, int(rng.integers(40, 91)))


def _page(rng: np.random.Generator, look: str, texture: np.ndarray | None = None) -> np.ndarray:
    """A page without a digit, the way each kind of input shows paper. `texture` (H, W) in [0, 1] darkens it
    (lines, grain, fibres); its shape sets the size for the photo and scan looks."""
    if look == "photo":
        H, W = texture.shape if texture is not None else (int(rng.integers(240, 1200)), int(rng.integers(240, 1200)))
        return _photo_look(rng, texture if texture is not None else np.zeros((H, W), np.float32))
    if look == "scan":
        H, W = texture.shape if texture is not None else (int(rng.integers(200, 401)), int(rng.integers(200, 401)))
        t = texture if texture is not None else 0.0
        img = rng.uniform(0.85, 0.95) * (1 - rng.uniform(0.3, 0.6) * t) + rng.normal(0, 0.02, (H, W))
        return _to_uint8(ndimage.gaussian_filter(img, 0.6))
    if look == "canvas":
        H = int(rng.integers(200, 601))
        if rng.random() < 0.3:
            return np.zeros((H, H, 4), np.uint8)  # an untouched transparent canvas
        return np.full((H, H, 3), _choice(rng, [255, 255, 240]), np.uint8)
    if look == "lowres":
        h = int(rng.integers(10, 33))
        small = rng.uniform(0.93, 1.0) + rng.normal(0, rng.uniform(0.0, 0.015), (h, h))
        side = int(rng.integers(max(28, h), 201))
        return _to_uint8(_resize(small.astype(np.float32), side, side, Image.Resampling.BILINEAR))
    if look == "thumbnail":
        side = int(rng.integers(16, 41))
        rgb = np.array(PAPERS[_choice(rng, ["white", "cream", "grey", "blue"])]) * 1.05
        img = Image.fromarray(_to_uint8(np.broadcast_to(rgb, (side, side, 3)) + rng.normal(0, 0.01, (side, side, 3))))
        return _jpeg(img, int(rng.integers(30, 81))) if rng.random() < 0.5 else np.asarray(img)
    if look == "fax":
        h, w = int(rng.integers(30, 80)), int(rng.integers(30, 80))
        white = rng.random((h, w)) > rng.uniform(0.0, 0.006)
        k = int(rng.integers(2, 7))
        return np.where(np.repeat(np.repeat(white, k, 0), k, 1), 255, 0).astype(np.uint8)
    raise ValueError(f"unknown page look {look!r}; expected photo, scan, canvas, lowres, thumbnail or fax")


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A paper texture as darkening in [0, 1] over a 240-900 px page: ruled or squared paper, a dot grid,
    recycled-paper flecks, fibres, kraft or cardboard grain, or creases."""
    H, W = int(rng.integers(240, 900)), int(rng.integers(240, 900))
    style = _choice(rng, ["ruled", "squared", "dots", "flecks", "fibres", "grain", "creases"])
    t = np.zeros((H, W), np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    if style in ("ruled", "squared", "dots"):
        step = rng.uniform(0.03, 0.08) * max(H, W)
        width = max(1.0, step / rng.uniform(12, 25))
        dist_y = np.abs(((yy - rng.uniform(0, step)) % step) - step / 2)
        dist_x = np.abs(((xx - rng.uniform(0, step)) % step) - step / 2)
        on_y = np.clip(width / 2 + 0.5 - (step / 2 - dist_y), 0, 1)
        on_x = np.clip(width / 2 + 0.5 - (step / 2 - dist_x), 0, 1)
        t = {"ruled": on_y, "squared": np.maximum(on_y, on_x), "dots": on_y * on_x}[style] * rng.uniform(0.25, 0.6)
        if style == "ruled" and rng.random() < 0.5:  # the red margin line
            x0 = rng.uniform(0.08, 0.2) * W
            t = np.maximum(t, np.clip(width + 0.5 - np.abs(xx - x0), 0, 1) * 0.5)
    elif style == "flecks":
        n = int(rng.uniform(0.0005, 0.003) * H * W)
        t[rng.integers(0, H, n), rng.integers(0, W, n)] = rng.uniform(0.3, 1.0, n)
        t = np.clip(ndimage.gaussian_filter(t, rng.uniform(0.5, 1.5)) * 4, 0, 1)
    elif style == "fibres":
        img = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.uniform(0.0002, 0.001) * H * W)):
            x, y = rng.uniform(0, W), rng.uniform(0, H)
            a, length = rng.uniform(0, np.pi), rng.uniform(5, 25)
            draw.line((x, y, x + length * math.cos(a), y + length * math.sin(a)), fill=int(rng.integers(40, 140)))
        t = np.asarray(img, np.float32) / 255
    elif style == "grain":
        noise = _smooth_noise(rng, (H, W * 4), 2.0)
        t = np.clip(0.3 + 0.15 * np.asarray(Image.fromarray(noise).resize((W, H), Image.Resampling.BILINEAR)), 0, 1)
    else:
        for _ in range(int(rng.integers(2, 6))):
            a, c = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * max(H, W)
            d = np.cos(a) * (xx - W / 2) + np.sin(a) * (yy - H / 2) - c
            t += rng.uniform(0.05, 0.2) * np.exp(-np.abs(d) / rng.uniform(3, 15)) * np.sign(d)
        t = np.clip(t + 0.1 * _smooth_noise(rng, (H, W), max(H, W) / 10), 0, 1)
    return t.astype(np.float32)


def _objects(rng: np.random.Generator) -> np.ndarray:
    """A phone photo of things on a table: 1-4 shaded shapes (ellipses, boxes, polygons, rings, blobs) with soft
    shadows on a textured surface. RGB uint8, 240-1000 px."""
    H, W = int(rng.integers(240, 1000)), int(rng.integers(240, 1000))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    table = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    grain = _smooth_noise(rng, (H, W), rng.uniform(2, 20))
    img = table * (1 + 0.08 * grain)[..., None]
    for _ in range(int(rng.integers(1, 5))):
        mask_img = Image.new("L", (W, H), 0)
        draw = ImageDraw.Draw(mask_img)
        size = rng.uniform(0.15, 0.6) * min(H, W)
        cx, cy = rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H
        shape = _choice(rng, ["ellipse", "box", "polygon", "ring", "blob"])
        box = (cx - size / 2, cy - size * rng.uniform(0.3, 0.6), cx + size / 2, cy + size * rng.uniform(0.3, 0.6))
        if shape == "ellipse":
            draw.ellipse(box, fill=255)
        elif shape == "box":
            draw.rounded_rectangle(box, radius=rng.uniform(0, 0.2) * size, fill=255)
        elif shape == "polygon":
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = size / 2 * rng.uniform(0.6, 1.0, n)
            draw.polygon(list(zip((cx + r * np.cos(ang)).tolist(), (cy + r * np.sin(ang)).tolist(), strict=True)),
                         fill=255)  # fmt: skip
        elif shape == "ring":
            draw.ellipse(box, outline=255, width=max(2, int(size * rng.uniform(0.15, 0.3))))
        else:
            blob = 1 - ((xx - cx) ** 2 + (yy - cy) ** 2) / (size / 2) ** 2 + 0.4 * _smooth_noise(rng, (H, W), size / 5)
            mask_img = Image.fromarray(_to_uint8(blob > 0))
        mask = np.asarray(mask_img.filter(ImageFilter.GaussianBlur(1.0)), np.float32) / 255
        shadow = ndimage.shift(ndimage.gaussian_filter(mask, size / 15), (size / 12, size / 12), order=1)
        img = img * (1 - 0.5 * shadow[..., None])
        color = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        shade = 1 + 0.35 * (np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)) / size
        img = img * (1 - mask[..., None]) + (color * np.clip(shade, 0.4, 1.4)[..., None]) * mask[..., None]
    return _camera(rng, img)


def negative(kind: str, seed: Seed = 0, digits: Any = None, labels: Any = None) -> np.ndarray:
    """One non-digit image of `kind` (ALL_NEGATIVE_KINDS), deterministic from `seed`:
      letter          a letter of LETTERS in one of 16 fonts (FONTS, EXTRA_FONTS), slanted up to 12 degrees,
                      drawn as one of LOOK_KINDS (pen on paper, photo, scan, canvas, low-res scan, fax, ...)
      symbol          a symbol of SYMBOLS (+ = % & @ # $ ? ...), likewise
      lookalike       a letter of LOOKALIKES (O, I, Z, S, B, g, ...): not in NEGATIVE_KINDS (see LOOKALIKES)
      blank_paper     a page without marks, as a photo, scan, canvas (opaque or transparent), low-res scan,
                      thumbnail or fax shows it
      textured_paper  ruled or squared paper, a dot grid, recycled flecks, fibres, kraft grain or creases, as a
                      photo or a scan
      scribble        a random walk, zigzag, crossing-out hatch or tangle, drawn as one of LOOK_KINDS
      object_photo    a phone photo of shaded shapes on a table (no paper, no writing)
      partial_digit   a digit of which 30-55% is left, erased from one side, at the whole digit's size and place,
                      on paper, in a photo, a scan or a low-res scan (never a 1: a cut 1 is still a 1)
      doubled_digit   two digits side by side, overlapping, or drawn over each other
    `digits` (N, 28, 28) supplies the handwritten digits for the last two (with `labels`, 1s are skipped for
    partial_digit); without them printed digits are used. Returns uint8, gray (H, W), RGB or RGBA."""
    if kind not in ALL_NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; expected one of {', '.join(ALL_NEGATIVE_KINDS)}")
    rng = _rng(seed)
    if kind == "blank_paper":
        return _page(rng, _choice(rng, ["photo", "scan", "canvas", "lowres", "thumbnail", "fax"]))
    if kind == "textured_paper":
        return _page(rng, _choice(rng, ["photo", "scan"]), _texture(rng))
    if kind == "object_photo":
        return _objects(rng)
    if kind in ("letter", "symbol", "lookalike"):
        src = _glyph_source(rng, {"letter": LETTERS, "symbol": SYMBOLS, "lookalike": LOOKALIKES}[kind])
    elif kind == "scribble":
        src = _scribble(rng)
    elif kind == "partial_digit":
        return _partial(rng, _digit_source(rng, digits, labels, exclude=(1,)))
    else:
        src = _doubled(rng, _digit_source(rng, digits, labels), _digit_source(rng, digits, labels))
    return ALL_KINDS[_choice(rng, LOOK_KINDS)](src, rng)


def make_negatives(n: int, seed: int = 0, kinds: Any = None, digits: Any = None,
                   labels: Any = None) -> list[tuple[np.ndarray, str]]:  # fmt: skip
    """[(image, kind)]: n non-digits, image i of kind kinds[i % len(kinds)] (default NEGATIVE_KINDS) drawn from
    Generator([seed, i]). `digits`/`labels`: see `negative`."""
    kinds = tuple(NEGATIVE_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in ALL_NEGATIVE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"negative kinds {unknown or 'none'}: expected some of {', '.join(ALL_NEGATIVE_KINDS)}")
    return [(negative(kinds[i % len(kinds)], np.random.default_rng([seed, i]), digits, labels), kinds[i % len(kinds)])
            for i in range(n)]  # fmt: skip


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
    as_ink: bool = False,
) -> tuple[np.ndarray, list[int], list[tuple[int, int, int, int]]]:
    """A row of handwritten digits on paper: (gray uint8 image, labels, true ink boxes (x0, y0, x1, y1), x1 and
    y1 exclusive, left to right).

    `digits` holds 28x28 arrays or ints (printed with a random font). Each digit is `height` px tall +-10% with
    its baseline jittered; gaps between neighbours are uniform in `gap` x height. With probability `touch` a pair
    is pushed together until the inks overlap by 1-3 px (touching digits), unless that would push their boxes
    more than `max_overlap` x height into each other (interlocking shapes such as a slanted 1 under a 7's bar):
    then the boxes overlap by that much and the inks may not meet. With probability `broken` a digit
    loses a horizontal band across its strokes (a pen that skipped: its parts stack vertically). `as_ink` returns
    the white-on-black ink (float in [0, 1]) instead of the paper image.
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
    if as_ink:
        return canvas, list(labels), boxes
    img = 0.96 * (1 - 0.9 * canvas) + rng.normal(0, 0.01, canvas.shape)
    return _to_uint8(img), list(labels), boxes


FORM_LABELS = ("ZIP", "Amount", "Meter", "Account", "Date", "Ref", "Total", "Code", "Phone", "Order", "Qty", "Box")
"""Printed words beside a form's fields (no digits: the digit fields are the handwritten ones)."""


def form_page(fields: list[tuple[list[Any], list[int]]], seed: Seed = 0, photo: bool = True,
              width: int = 900) -> tuple[np.ndarray, list[dict[str, Any]]]:  # fmt: skip
    """A form with a handwritten digit field per line: each of `fields` ((digits, labels): strip's sources) is
    written 24-48 px tall after a printed label (FORM_LABELS, in a FONTS face), some over a ruled line, under a
    printed title; then photographed (handwriting_photo's paper and camera) or, with photo False, scanned flat.
    Returns (image: RGB photo or gray scan, uint8) and per field {"label", "text", "box": [x0, y0, x1, y1]} (the
    handwriting's ink box in the image)."""
    rng = _rng(seed)
    heights = [float(rng.uniform(24, 48)) for _ in fields]
    height = int(sum(1.9 * h for h in heights) + 140)
    canvas = np.zeros((height, width), np.float32)
    face = ImageFont.truetype(_font_path(_choice(rng, list(FONTS))), 26)
    title = Image.new("L", (width, 60), 0)
    ImageDraw.Draw(title).text((40, 14), _choice(rng, ["ORDER FORM", "Meter reading", "Delivery note", "Payment"]),
                               fill=255, font=face)  # fmt: skip
    canvas[:60] = np.asarray(title, np.float32) / 255
    truths = []
    y = 80
    for (digits, labels), h in zip(fields, heights, strict=True):
        label = _choice(rng, FORM_LABELS)
        words = Image.new("L", (260, int(h * 1.6)), 0)
        small = ImageFont.truetype(_font_path(_choice(rng, list(FONTS))), int(rng.uniform(16, 24)))
        ImageDraw.Draw(words).text((0, int(h * 0.4)), label + ":", fill=255, font=small)
        text_ink = np.asarray(words, np.float32) / 255
        _paste(canvas, text_ink[:, : int(np.flatnonzero(text_ink.any(0))[-1]) + 1], y, 40)
        ink, labels, _ = strip(digits, labels, rng, height=h, touch=float(rng.uniform(0, 0.5)), as_ink=True)
        ink = _crop(ink)
        left = int(40 + 150 + rng.uniform(0, 120))
        ink = ink[:, : max(1, min(ink.shape[1], width - left - 20))]
        top = y + int(h * 0.2)
        _paste(canvas, ink, top, left)
        ys, xs = np.nonzero(ink > 0.5)
        truths.append({"label": label, "text": "".join(map(str, labels)),
                       "box": [left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1,
                               top + int(ys.max()) + 1]})  # fmt: skip
        if rng.random() < 0.5:  # a ruled line to write on, under the label and the field
            rule = min(height - 1, top + ink.shape[0] + int(rng.uniform(2, 6)))
            canvas[rule, 30 : width - 30] = np.maximum(canvas[rule, 30 : width - 30], 0.6)
        y += int(1.9 * h)
    if photo:
        return _photo_look(rng, canvas), truths
    return _to_uint8(0.96 * (1 - 0.9 * canvas) + rng.normal(0, 0.01, canvas.shape)), truths


def touching(boxes: list[tuple[int, int, int, int]]) -> bool:
    """Whether some neighbours' ink boxes (strip's) meet or overlap: a row with touching digits."""
    return any(a[2] >= b[0] for a, b in zip(boxes, boxes[1:], strict=False))


def row_photo(digits: list[Any], labels: list[int] | None = None, seed: Seed = 0, touch: float = 0.0,
              max_overlap: float = 0.2) -> tuple[np.ndarray, list[int], bool]:  # fmt: skip
    """A phone photo of a row of handwritten digits on paper (a ZIP code, an amount, a meter reading): `strip`'s
    layout (`touch`, `max_overlap`, the natural pen) with the digits 20-90 px tall, slanted -15..15 degrees,
    rotated up to 3 degrees and in slight perspective, with a margin of 0.3-1.5 digit heights, then
    handwriting_photo's paper, ink and camera (`_photo_look`). Returns (RGB uint8, labels, whether some neighbours
    touch)."""
    rng = _rng(seed)
    height = float(math.exp(rng.uniform(math.log(20), math.log(90))))
    ink, labels, boxes = strip(digits, labels, rng, height=64, touch=touch, max_overlap=max_overlap, as_ink=True)
    scale = height / 64
    ink = np.clip(_resize(ink, round(ink.shape[1] * scale), round(ink.shape[0] * scale),
                          Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC), 0, 1)  # fmt: skip
    ink = _shear(_crop(ink), math.tan(math.radians(rng.uniform(-15, 15))))
    ink = _perspective(rng, _rotate(ink, rng.uniform(-3, 3)), 0.03)
    mh, mw = (int(height * rng.uniform(0.3, 1.5)) for _ in range(2))
    canvas = np.zeros((ink.shape[0] + 2 * mh, ink.shape[1] + 2 * mw), np.float32)
    _paste(canvas, ink, mh, mw)
    return _photo_look(rng, canvas), labels, touching(boxes)


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
