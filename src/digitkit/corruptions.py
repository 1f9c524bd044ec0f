"""MNIST-C style corruptions (Mu & Gilmer 2019, "MNIST-C: A Robustness Benchmark for Computer Vision").

``corrupt(x, name, seed)`` turns (N, 1, H, W) uint8 images, white ink on black, into a corrupted copy of the
same shape and dtype; ``corruption_suite`` does all 15 of ``CORRUPTIONS``. The settings live in ``PARAMS``
below, one entry per corruption: up to five severity levels and the level used when ``severity`` is None.

Determinism. Image i is corrupted with its own torch.Generator, seeded from a hash of (seed, name, offset + i),
so its result depends only on those and on the image itself: not on the batch it came in, nor on
``chunk_size``. ``corrupt(x, name, seed)[a:b]`` equals ``corrupt(x[a:b], name, seed, offset=a)``. Seeding one
generator per image is the only Python loop over samples (about 10 us each); all the image work is batched.
brightness and canny_edges use no randomness at all (nor do they in MNIST-C), so their seed is ignored.
All 15 on the 10,000 MNIST test images take about 4 s on one CPU core (0.04 s to 0.7 s each).

Where this differs from MNIST-C (whose code builds on ImageNet-C/CIFAR-C, skimage, Wand and OpenCV):
- The MNIST-C severities could not be checked while writing this (no network): the ladders are those of
  CIFAR-C (32 px images, the closest to 28 px) where one exists, and the default level is marked in PARAMS.
  The default shot-noise and impulse-noise settings are MNIST-C's as recalled; spatter defaults to level 4
  (the first "mud" level, see below); the others default to level 3.
- rotate, shear, scale and translate draw a random sign and a magnitude uniform in [lo, hi] per image;
  shear is a horizontal slant x' = x + k y about the centre (skimage's shear angle also squashes y).
- motion_blur uses ImageMagick's kernel (one-sided half Gaussian, 2 * radius + 1 taps along a random angle
  in [-45, 45] degrees) but samples the taps bilinearly instead of rounding them to whole pixels.
- spatter is only CIFAR-C's "mud" branch (gray blobs that hide what is under them): the "water" branch
  needs OpenCV's distance transform and colour blending, which mean little on a gray image.
- stripe inverts a vertical or horizontal band (white band, the digit black inside it); dotted_line and
  zigzag are drawn with our own anti-aliased segment renderer instead of skimage.draw.line_aa.
- canny_edges follows skimage.feature.canny's defaults (sigma 1, thresholds 0.1 / 0.2 on the Sobel magnitude
  of an image in [0, 1]) with the common 4-direction non-maximum suppression instead of skimage's
  interpolated one; hysteresis grows the strong edges inside the weak mask by repeated 3x3 dilation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from digitkit.augment import _warp
from digitkit.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# The settings: name -> (levels 1..5, default level used when severity is None). An entry with one level has
# no severities. Geometric magnitudes are (lo, hi) ranges; the sign is drawn at random.

PARAMS: dict[str, tuple[tuple[Any, ...], int]] = {
    # Photon-counting noise: Poisson(c * x) / c; fewer photons c = noisier. Black stays black (rate 0).
    "shot_noise": ((60, 25, 12, 5, 3), 1),
    # Salt and pepper: a fraction `amount` of pixels set to 0 or 1, half each.
    "impulse_noise": ((0.03, 0.06, 0.09, 0.17, 0.27), 5),
    # Frosted glass: blur (sigma), then `iterations` sweeps of local swaps within max_delta px, blur again.
    # (sigma, max_delta, iterations)
    "glass_blur": (((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), 3),
    # Camera shake: one-sided Gaussian streak (radius px, sigma px) at a random angle in [-45, 45] degrees.
    "motion_blur": (((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)), 3),
    # Slant: x' = x + k y, |k| uniform in [lo, hi].
    "shear": (((0.1, 0.2), (0.1, 0.4), (0.2, 0.8), (0.4, 1.0), (0.6, 1.2)), 3),
    # Size: zoom about the centre by s uniform in [lo, hi] (< 1 shrinks the digit).
    "scale": (((0.85, 0.95), (0.7, 0.9), (0.4, 0.8), (0.35, 0.6), (0.3, 0.5)), 3),
    # Rotation about the centre by |angle| uniform in [lo, hi] degrees.
    "rotate": (((5, 15), (10, 30), (20, 60), (30, 75), (45, 90)), 3),
    # Over-exposure: x + c, clipped (a gray background).
    "brightness": ((0.1, 0.2, 0.3, 0.4, 0.5), 3),
    # Off-centre digit: a shift of |d| uniform in [lo, hi] px on each axis, signs independent.
    "translate": (((0.5, 1.5), (1, 3), (2, 5), (3, 6), (4, 7)), 3),
    # An inverted band across the digit, vertical or horizontal: (min width px, max width px).
    "stripe": (((3, 6),), 1),
    # Fog: plasma fractal (diamond-square) of strength c added, rescaled: (c, wibble decay).
    "fog": (((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)), 3),
    # Mud spatter: blobs thresholded from blurred Gaussian noise, painted dark gray over the image.
    # (noise mean, noise std, noise blur sigma, threshold, mask blur sigma)
    "spatter": (((0.65, 0.1, 0.7, 0.72, 0.6), (0.65, 0.1, 0.7, 0.69, 0.6), (0.65, 0.1, 0.5, 0.68, 0.6),
                 (0.65, 0.3, 1.0, 0.65, 1.5), (0.67, 0.4, 1.0, 0.65, 1.5)), 4),
    # A dotted line across the image: (thickness px, dot period px, dot length px).
    "dotted_line": (((2.0, 4.0, 2.0),), 1),
    # A zigzag line across the image: (thickness px, segments, min amplitude px, max amplitude px).
    "zigzag": (((2.0, 4, 2.0, 5.0),), 1),
    # The digit replaced by its Canny edge map: (sigma, low threshold, high threshold).
    "canny_edges": (((1.0, 0.1, 0.2),), 1),
}
CORRUPTIONS: tuple[str, ...] = (
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
    "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
)  # fmt: skip
CHUNK_SIZE = 2048  # images per batched pass: bounds memory (the line renderer holds S x N x H x W floats)
_MUD_GRAY = (0.299 * 63 + 0.587 * 42 + 0.114 * 20) / 255  # CIFAR-C's mud brown (63, 42, 20) as gray


# ----------------------------------------------------------------------------------------------------------
# Public API


def corrupt(images: torch.Tensor, name: str, seed: int = 0, severity: int | None = None, offset: int = 0,
            chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """A corrupted copy of images (N, 1, H, W) uint8: same shape and dtype, white ink on black.

    severity: 1 (mild) .. 5, or None for the default level in PARAMS. offset: the global index of images[0]
    when corrupting a slice of a larger set, so the slice gets the same bytes as in the whole.
    """
    setting, fn = _setting(name, severity), _FUNCS[name]
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != torch.uint8:
        raise ValueError(f"corrupt needs images (N, 1, H, W) uint8, got {images.dtype} {tuple(images.shape)}")
    for key, value, low, example in (("seed", seed, None, 0), ("offset", offset, 0, 0),
                                     ("chunk_size", chunk_size, 1, CHUNK_SIZE)):
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"corrupt {key} = {value!r}: expected an integer"
                              f"{'' if low is None else f' >= {low}'}; use e.g. {example}")
    keys = _image_keys(seed, name, offset, len(images))
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk_size):
        x = images[start : start + chunk_size].float().div_(255)
        y = fn(x, keys[start : start + chunk_size], setting)
        out[start : start + len(x)] = y.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def corruption_suite(images: torch.Tensor, seed: int = 0,
                     names: tuple[str, ...] = CORRUPTIONS) -> dict[str, torch.Tensor]:
    """{name: corrupt(images, name, seed)} for each name, in order, at the default severities."""
    return {name: corrupt(images, name, seed) for name in names}


def _setting(name: str, severity: int | None) -> Any:
    """The parameters of corruption `name` at `severity` (None: its default level); ConfigError if unknown."""
    if name not in PARAMS:
        raise ConfigError(f"unknown corruption {name!r}; expected one of: {', '.join(CORRUPTIONS)}")
    levels, default = PARAMS[name]
    if severity is None:
        return levels[default - 1]
    if len(levels) == 1:
        with_levels = [n for n in CORRUPTIONS if len(PARAMS[n][0]) > 1]
        raise ConfigError(f"corruption {name!r} has no severity levels, got severity = {severity!r}; "
                          f"pass severity=None (these have levels 1..5: {', '.join(with_levels)})")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= len(levels):
        raise ConfigError(f"corruption {name!r}: severity = {severity!r}, expected an integer "
                          f"1..{len(levels)} (1 is mildest) or None for the default")
    return levels[severity - 1]


# ----------------------------------------------------------------------------------------------------------
# Per-image randomness


def _mix32(x: int) -> int:
    """lowbias32 (C. Wellons): a bijection on 32-bit integers with good avalanche."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _image_keys(seed: int, name: str, offset: int, n: int) -> list[int]:
    """n generator seeds for images offset..offset+n-1, distinct within (seed, name).

    32 bits, because torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
    """
    base = int.from_bytes(hashlib.blake2b(f"digitkit.corruptions/{name}/{seed}".encode(), digest_size=4).digest(),
                          "little")
    return [_mix32(base + offset + i) for i in range(n)]


def _draw(keys: list[int], shape: tuple[int, ...], fill: Callable[[torch.Tensor, torch.Generator], Any],
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, *shape): row i filled in place by fill(row, generator), the generator seeded with keys[i]."""
    out, g = torch.empty(len(keys), *shape, dtype=dtype), torch.Generator()
    for row, key in zip(out, keys, strict=True):
        fill(row, g.manual_seed(key))
    return out


def _rand(keys: list[int], *shape: int) -> torch.Tensor:
    """(N, *shape) uniform [0, 1), per image."""
    return _draw(keys, shape, lambda row, g: row.uniform_(generator=g))


def _signed(u_sign: torch.Tensor, u_mag: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """A magnitude uniform in [lo, hi] with a random sign, from two uniforms of the same shape."""
    return torch.where(u_sign < 0.5, -1.0, 1.0) * (lo + (hi - lo) * u_mag)


# ----------------------------------------------------------------------------------------------------------
# Shared image ops, on x (N, 1, H, W) float


def _blur_matrix(sigma: float, size: int, mode: str) -> torch.Tensor:
    """(size, size) matrix B with B @ column = 1-D Gaussian blur (scipy's truncate=4 radius).

    mode "nearest" repeats the edge pixel (skimage.filters.gaussian's default), "constant" pads with 0.
    """
    r = int(4.0 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    cols = torch.arange(size)[:, None] + torch.arange(-r, r + 1)
    weight = g.expand(size, -1) if mode == "nearest" else g * ((cols >= 0) & (cols < size))
    return torch.zeros(size, size).scatter_add_(1, cols.clamp(0, size - 1), weight)


def _blur(x: torch.Tensor, sigma: float, mode: str = "nearest") -> torch.Tensor:
    """Separable Gaussian blur as two matmuls (much faster on CPU than conv2d with one channel)."""
    if int(4.0 * sigma + 0.5) == 0:
        return x
    h, w = x.shape[-2:]
    return _blur_matrix(sigma, h, mode) @ x @ _blur_matrix(sigma, w, mode).T


def _affine(x: torch.Tensor, angle_deg: torch.Tensor | None = None, shift_px: torch.Tensor | None = None,
            scale: torch.Tensor | None = None, shear: torch.Tensor | None = None) -> torch.Tensor:
    """x warped about its centre, bilinear, black outside; shear is the slant factor k in x' = x + k y."""
    n = len(x)
    zero = torch.zeros(n)
    return _warp(x, zero if angle_deg is None else angle_deg, torch.zeros(n, 2) if shift_px is None else shift_px,
                 torch.ones(n) if scale is None else scale,
                 zero if shear is None else torch.rad2deg(torch.atan(shear)))


def _segments(p0: torch.Tensor, p1: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (N, S, H, W) from each pixel centre to each segment p0 -> p1 (N, S, 2) as (x, y) pixels,
    and the arc length along the segment (px from p0) of the closest point."""
    x0, y0 = p0[..., 0, None, None], p0[..., 1, None, None]  # (N, S, 1, 1)
    dx, dy = p1[..., 0, None, None] - x0, p1[..., 1, None, None] - y0
    length2 = (dx * dx + dy * dy).clamp(min=1e-9)
    vx = torch.arange(w, dtype=torch.float32) - x0  # (N, S, 1, W): x and y apart, broadcast only at the end
    vy = torch.arange(h, dtype=torch.float32)[:, None] - y0  # (N, S, H, 1)
    t = ((vx * dx + vy * dy) / length2).clamp_(0, 1)
    dist = torch.hypot(vx - t * dx, vy - t * dy)
    return dist, t * length2.sqrt()


def _line_ink(dist: torch.Tensor, thickness: float) -> torch.Tensor:
    """Anti-aliased line intensity in [0, 1] from the distance to its centre line: 1 inside, a 1 px ramp."""
    return (thickness / 2 + 0.5 - dist).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# The corruptions: fn(x (N, 1, H, W) float in [0, 1], keys, setting) -> (N, 1, H, W) float in [0, 1].


def _shot_noise(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    # Inverse-CDF sampling: x came from uint8, so there are only 256 rates c * k / 255. Their CDFs, row k
    # offset by k, form one sorted list; a pixel's count is how many entries of its row lie below its uniform.
    levels = torch.arange(256, dtype=torch.float64)[:, None] / 255 * c
    n_max = int(c + 12 * math.sqrt(c) + 12)  # P(count >= n_max) < 1e-20 for rates up to c
    k = torch.arange(n_max, dtype=torch.float64)
    cdf = torch.exp(torch.xlogy(k, levels) - levels - torch.lgamma(k + 1)).cumsum(1).clamp(max=1.0)
    table = (cdf + torch.arange(256, dtype=torch.float64)[:, None]).flatten()
    level = (x * 255).round().long()
    u = _rand(keys, *x.shape[1:]).double()
    counts = torch.searchsorted(table, level + u, right=True) - level * n_max
    return (counts.float() / c).clamp(0, 1)


def _impulse_noise(x: torch.Tensor, keys: list[int], amount: float) -> torch.Tensor:
    u = _rand(keys, *x.shape[1:])
    return torch.where(u < amount / 2, 0.0, torch.where(u < amount, 1.0, x))


def _glass_blur(x: torch.Tensor, keys: list[int], setting: tuple[float, int, int]) -> torch.Tensor:
    sigma, delta, iterations = setting
    n, _, h, w = x.shape
    # CIFAR-C goes through np.uint8 here, which truncates (the 1e-3 keeps k / 255 * 255 from flooring to k - 1).
    x = torch.floor(_blur(x, sigma) * 255 + 1e-3) / 255
    # CIFAR-C's sweep, bottom-right to top-left: swap each pixel with one at an offset in [-delta, delta)
    # (numpy's randint excludes the top, so swaps lean up and left). Each swap depends on the ones before it,
    # so the sweep is a loop over positions, batched over images.
    rows, cols = torch.arange(h - delta, delta, -1), torch.arange(w - delta, delta, -1)
    here = (rows[:, None] * w + cols).flatten().repeat(iterations)  # (steps,)
    dxy = _draw(keys, (len(here), 2), lambda row, g: row.random_(-delta, delta, generator=g), torch.long)
    there = here + dxy[:, :, 1] * w + dxy[:, :, 0]
    flat = x.reshape(n, h * w).T.contiguous()  # (H*W, N): one position is one contiguous row
    images = torch.arange(n)
    for step, i in enumerate(here.tolist()):
        j = there[:, step]
        mine, theirs = flat[i].clone(), flat[j, images]
        flat[i] = theirs
        flat[j, images] = mine
    return _blur(flat.T.reshape(n, 1, h, w), sigma).clamp(0, 1)


def _motion_blur(x: torch.Tensor, keys: list[int], setting: tuple[int, float]) -> torch.Tensor:
    radius, sigma = setting
    angle = torch.deg2rad(_rand(keys, 1)[:, 0] * 90 - 45)
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], 1)  # (N, 2) as (x, y)
    taps = torch.arange(2 * radius + 1, dtype=torch.float32)
    weight = torch.exp(-(taps**2) / (2 * sigma**2))
    weight = weight / weight.sum()
    out = torch.zeros_like(x)
    for i, wt in zip(taps.tolist(), weight.tolist(), strict=True):
        if wt < 1e-4:  # the half Gaussian is negligible long before 2 * radius + 1 taps
            break
        # out(p) += wt * x(p + i * direction): content moves by -i * direction.
        out += wt * (x if i == 0 else _affine(x, shift_px=-i * direction))
    return out.clamp(0, 1)


def _shear(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    u = _rand(keys, 2)
    return _affine(x, shear=_signed(u[:, 0], u[:, 1], *setting)).clamp(0, 1)


def _scale(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    lo, hi = setting
    return _affine(x, scale=lo + (hi - lo) * _rand(keys, 1)[:, 0]).clamp(0, 1)


def _rotate(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    u = _rand(keys, 2)
    return _affine(x, angle_deg=_signed(u[:, 0], u[:, 1], *setting)).clamp(0, 1)


def _brightness(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    return (x + c).clamp(0, 1)


def _translate(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    u = _rand(keys, 4)
    return _affine(x, shift_px=_signed(u[:, :2], u[:, 2:], *setting)).clamp(0, 1)


def _stripe(x: torch.Tensor, keys: list[int], setting: tuple[int, int]) -> torch.Tensor:
    lo, hi = setting
    _, _, h, w = x.shape
    u = _rand(keys, 3)
    vertical = u[:, 0] < 0.5
    width = (lo + u[:, 1] * (hi - lo + 1)).floor()
    # The band starts 4 px or more from the edge, so it crosses the 20 x 20 box MNIST centres digits in.
    start = (4 + u[:, 2] * (torch.where(vertical, w, h) - 8 - width + 1).clamp(min=1)).floor()
    cols, rows = torch.arange(w)[None, None, :], torch.arange(h)[None, :, None]
    pos = torch.where(vertical[:, None, None], cols, rows)  # (N, H, W) the coordinate across the band
    band = ((pos >= start[:, None, None]) & (pos < (start + width)[:, None, None]))[:, None]
    return torch.where(band, 1 - x, x)


def _plasma(u: torch.Tensor, size: int, decay: float) -> torch.Tensor:
    """(N, size, size) plasma fractal in [0, 1] by diamond-square (ImageNet-C's plasma_fractal), batched.

    u (N, M) holds the uniforms, consumed in order; size is a power of 2 and M = size**2 - 1.
    """
    n = len(u)
    m = torch.zeros(n, size, size)
    step, wibble, used = size, 100.0, 0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        nonlocal used
        k = total[0].numel()
        noise = u[:, used : used + k].reshape(total.shape) * 2 - 1
        used += k
        return total / 4 + wibble * wibble * noise  # ImageNet-C: wibble * uniform(-wibble, wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, ::step, ::step]
        squares = corner + corner.roll(-1, 1)
        m[:, half::step, half::step] = wibbled_mean(squares + squares.roll(-1, 2))
        down_right, up_left = m[:, half::step, half::step], m[:, ::step, ::step]
        left = down_right + down_right.roll(1, 1) + up_left + up_left.roll(-1, 2)
        m[:, ::step, half::step] = wibbled_mean(left)
        top = down_right + down_right.roll(1, 2) + up_left + up_left.roll(-1, 1)
        m[:, half::step, ::step] = wibbled_mean(top)
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _fog(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    c, decay = setting
    _, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()  # the smallest power of 2 >= H, W
    fog = _plasma(_rand(keys, size * size - 1), size, decay)[:, None, :h, :w]
    peak = x.amax((1, 2, 3), keepdim=True)
    return ((x + c * fog) * peak / (peak + c)).clamp(0, 1)


def _spatter(x: torch.Tensor, keys: list[int], setting: tuple[float, ...]) -> torch.Tensor:
    mean, std, sigma, threshold, mask_sigma = setting
    liquid = _draw(keys, x.shape[1:], lambda row, g: row.normal_(mean, std, generator=g))
    liquid = _blur(liquid, sigma)
    mask = _blur((liquid > threshold).float(), mask_sigma)
    mask = torch.where(mask < 0.8, 0.0, mask)
    return (x * (1 - mask) + _MUD_GRAY * mask).clamp(0, 1)


def _line_through(u: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A point (N, 2) within 5 px of the image centre, a random direction (N, 2) and its normal, from the
    uniforms u[:, :3]."""
    angle = u[:, 0] * math.pi
    direction = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    normal = torch.stack([-direction[:, 1], direction[:, 0]], 1)
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2]) + (u[:, 1:3] * 10 - 5)
    return centre, direction, normal


def _dotted_line(x: torch.Tensor, keys: list[int], setting: tuple[float, float, float]) -> torch.Tensor:
    thickness, period, dot = setting
    _, _, h, w = x.shape
    u = _rand(keys, 4)
    centre, direction, _ = _line_through(u, h, w)
    reach = math.hypot(h, w)  # endpoints beyond the image: the line crosses it
    dist, along = _segments((centre - reach * direction)[:, None], (centre + reach * direction)[:, None], h, w)
    phase = (along + u[:, 3, None, None, None] * period) % period
    ink = _line_ink(dist, thickness) * (phase < dot)
    return torch.maximum(x, ink)


def _zigzag(x: torch.Tensor, keys: list[int], setting: tuple[float, int, float, float]) -> torch.Tensor:
    thickness, segments, lo, hi = setting
    _, _, h, w = x.shape
    u = _rand(keys, 5)
    centre, direction, normal = _line_through(u, h, w)
    # Vertices evenly spaced along the axis across the image, alternately amplitude left and right of it.
    along = torch.linspace(-max(h, w) / 2, max(h, w) / 2, segments + 1)
    side = torch.where(torch.arange(segments + 1) % 2 == 0, 1.0, -1.0)
    across = _signed(u[:, 3, None], u[:, 4, None], lo, hi) * side  # (N, V)
    vertices = centre[:, None] + along[None, :, None] * direction[:, None] + across[..., None] * normal[:, None]
    dist, _ = _segments(vertices[:, :-1], vertices[:, 1:], h, w)
    return torch.maximum(x, _line_ink(dist.amin(1, keepdim=True), thickness))


def _dilate3(mask: torch.Tensor) -> torch.Tensor:
    """3 x 3 binary dilation of a bool (N, 1, H, W) mask, as separable ORs of shifted slices (max_pool2d is
    several times slower on CPU)."""
    p = F.pad(mask, (1, 1, 1, 1))
    rows = p[..., :-2, :] | p[..., 1:-1, :] | p[..., 2:, :]
    return rows[..., :-2] | rows[..., 1:-1] | rows[..., 2:]


def _canny_edges(x: torch.Tensor, keys: list[int], setting: tuple[float, float, float]) -> torch.Tensor:
    sigma, low, high = setting
    smooth = _blur(x, sigma, mode="constant")
    h, w = x.shape[-2:]
    # Sobel (scipy.ndimage.sobel's unnormalized [1, 2, 1] x [-1, 0, 1]) from shifted slices: a one-channel
    # conv2d is about 20x slower on CPU.
    p = F.pad(smooth, (1, 1, 1, 1))
    diff_x = p[..., 2:] - p[..., :-2]  # (N, 1, H + 2, W)
    diff_y = p[..., 2:, :] - p[..., :-2, :]  # (N, 1, H, W + 2)
    gx = diff_x[..., :-2, :] + 2 * diff_x[..., 1:-1, :] + diff_x[..., 2:, :]
    gy = diff_y[..., :-2] + 2 * diff_y[..., 1:-1] + diff_y[..., 2:]
    mag = torch.hypot(gx, gy)
    # Non-maximum suppression: keep a pixel if it is a maximum along its gradient, quantized to 4 directions.
    m = F.pad(mag, (1, 1, 1, 1))

    def shifted(dy: int, dx: int) -> torch.Tensor:  # mag at (y + dy, x + dx), 0 outside
        return m[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    tan22 = math.tan(math.pi / 8)
    horizontal = gy.abs() <= tan22 * gx.abs()  # gradient along x: compare left and right
    vertical = gx.abs() <= tan22 * gy.abs()
    falling = gx * gy > 0  # gradient towards down-right (y grows downwards): compare that diagonal
    before = torch.where(horizontal, shifted(0, -1), torch.where(vertical, shifted(-1, 0),
                         torch.where(falling, shifted(-1, -1), shifted(-1, 1))))  # fmt: skip
    after = torch.where(horizontal, shifted(0, 1), torch.where(vertical, shifted(1, 0),
                        torch.where(falling, shifted(1, 1), shifted(1, -1))))  # fmt: skip
    peak = (mag >= before) & (mag > after)
    peak[..., [0, -1], :] = False  # skimage drops the outermost pixels
    peak[..., :, [0, -1]] = False
    weak, strong = peak & (mag >= low), peak & (mag >= high)
    # Hysteresis: a weak pixel survives if it connects (8-neighbours) to a strong one; grow until stable.
    while True:
        grown = weak & _dilate3(strong)
        if torch.equal(grown, strong):
            return grown.float()
        strong = grown


_FUNCS: dict[str, Callable[[torch.Tensor, list[int], Any], torch.Tensor]] = {
    "shot_noise": _shot_noise, "impulse_noise": _impulse_noise, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "shear": _shear, "scale": _scale, "rotate": _rotate, "brightness": _brightness,
    "translate": _translate, "stripe": _stripe, "fog": _fog, "spatter": _spatter, "dotted_line": _dotted_line,
    "zigzag": _zigzag, "canny_edges": _canny_edges,
}  # fmt: skip
