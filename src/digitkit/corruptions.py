"""MNIST-C's corruptions (Mu & Gilmer 2019, "MNIST-C: A Robustness Benchmark for Computer Vision"), batched.

``corrupt(x, name, seed)`` turns (N, 1, H, W) uint8 images, white ink on black, into a corrupted copy of the
same shape and dtype; ``corruption_suite`` does all 15 of ``CORRUPTIONS``. The settings live in ``PARAMS``
below, one entry per corruption: its severity levels (five, or one if it has none) and the level used when
``severity`` is None.

The settings are MNIST-C's, from google-research/mnist-c's corruptions.py (commit aa07569), the code that made
the dataset: every ladder is that file's, and every default is the severity its function defaults to, the one
the released dataset uses. At the defaults, on 28 x 28 images:

  corruption     default setting (level)                             implementation
  shot_noise     Poisson(3 x) / 3 (5 of 5)                           MNIST-C's
  impulse_noise  17 % of the pixels set to 0 or 1, half each (4)     MNIST-C's (skimage s&p)
  glass_blur     sigma 0.7, swaps within 1 px, 2 sweeps (1)          MNIST-C's, vertical blur included
  motion_blur    radius 10, sigma 3, angle U(-45, 45) degrees (1)    ImageMagick's MotionBlurImage
  shear          skimage shear angle +-0.4 rad (2)                   MNIST-C's warp
  scale          zoom out to 0.7 about the centre (3)                MNIST-C's warp
  rotate         +-0.4 rad, 23 degrees (2)                           MNIST-C's warp
  brightness     x + 0.5, clipped (5)                                exact
  translate      +-3 px in x and +-3 px in y (3)                     MNIST-C's warp
  stripe         columns 0-6 and 21-27 inverted                      exact
  fog            x + 3 * plasma(decay 1.4), rescaled (5)             MNIST-C's; normalization approximated
  spatter        mud blobs of gray 63/255 (4)                        MNIST-C's
  dotted_line    dashed line between 2 random rows                   MNIST-C's
  zigzag         zigzag, a = b = 2 px, over columns 2-25             MNIST-C's
  canny_edges    skimage.feature.canny's defaults                    simpler non-maximum suppression

"MNIST-C's" means the same computation on the same kind of random numbers, but not the same numbers: MNIST-C
draws from numpy's global stream and this module from a torch generator per image, so no output is
byte-identical to the released dataset. Fed the same draws, numpy/scipy ports of MNIST-C's dotted_line, zigzag
and translate, and of ImageMagick's motion blur, give the same bytes; rotate, shear, scale and glass_blur differ
by 1 gray level in under 0.1 % of the pixels (float32 against float64 rounding).

Where this differs from MNIST-C, or follows a quirk of its code:
- rotate defaults to level 2 (0.4 rad), as upstream (``def rotate(x, severity=2)``); some ports of that file
  default to level 3 (0.6 rad). The warps are MNIST-C's inverse maps about the centre ((W - 1) / 2, (H - 1) / 2)
  = (13.5, 13.5), bilinear with black outside, as skimage.transform.warp samples. shear is the
  AffineTransform(shear=s) of the scikit-image MNIST-C was made with, whose inverse map is
  (x, y) -> (x - sin(s) y, cos(s) y): the digit slants by tan(s) and also grows 1 / cos(s) taller (8.6 % at
  0.4 rad). Later scikit-image releases changed what shear= means.
- glass_blur blurs along columns only, before and after the swaps, because that is what MNIST-C's
  ``gaussian(x, sigma, multichannel=True)`` does to a 2-D image (it takes the last axis for colour channels).
  The first blur is truncated to whole gray levels as MNIST-C's np.uint8 does, in float64 like numpy. The
  sweep is MNIST-C's: each interior pixel, bottom-right to top-left, is swapped with probability 1/2 with the
  one at an offset of randint(-delta, delta) per axis (numpy's randint, so -delta .. delta - 1).
- motion_blur is ImageMagick's MotionBlurImage, which MNIST-C calls through Wand: 2 * ceil(radius) + 1 taps of
  a one-sided Gaussian exp(-i^2 / (2 sigma^2)), normalized, tap i read from the whole pixel
  (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) away, the edge pixel repeating beyond the border. It sums in
  float rather than in ImageMagick's 16-bit quantum, and leaves out the last taps once what is left of the
  kernel weighs under 1e-6.
- fog crops the top-left H x W of a 256 x 256 plasma fractal as MNIST-C does, so the fog under the digit is a
  small, smooth patch of the fractal. MNIST-C normalizes by the min and max of the whole map; here the two
  finest of its eight diamond-square levels are computed only under the image (the rest would cost about 10x
  more), so the min and max are those of the 64 x 64 map before them. Against whole maps, in 1,024 draws at
  the default severity, 6 % of the images had a pixel off by more than half a gray level and none by more than
  2; at severities 1 to 3 none did. _FOG_FINE_LEVELS = 0 computes whole maps.
- canny_edges follows skimage.feature.canny's defaults (sigma 1, thresholds 0.1 / 0.2 on the Sobel magnitude
  of an image in [0, 1]) with the common 4-direction non-maximum suppression instead of skimage's
  interpolated one; hysteresis grows the strong edges inside the weak mask by repeated 3x3 dilation.
- dotted_line and zigzag keep the quirks of MNIST-C's line_from_points: the ink falls off with the vertical,
  not the perpendicular, distance from the line, and dotted_line's last column stays blank.

Determinism. Image i is corrupted with its own torch.Generator, seeded from a hash of (seed, name, offset + i),
so its result depends only on those and on the image itself: not on the batch it came in, nor on
``chunk_size``. ``corrupt(x, name, seed)[a:b]`` equals ``corrupt(x[a:b], name, seed, offset=a)``. Seeding one
generator per image is the only Python loop over samples (about 10 us each); all the image work is batched.
brightness, scale, stripe and canny_edges use no randomness (nor do they in MNIST-C), so their seed is
ignored; rotate and shear draw only a sign per image, and translate two, so they have 2 and 4 outcomes.
All 15 on the 10,000 MNIST test images take about 6 s on one CPU core (0.05 s to 1 s each).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from digitkit.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# The settings: name -> (levels 1..5, default level used when severity is None). An entry with one level has
# no severities. All are MNIST-C's (google-research/mnist-c, corruptions.py).

PARAMS: dict[str, tuple[tuple[Any, ...], int]] = {
    # Photon-counting noise: Poisson(c * x) / c; fewer photons c = noisier. Black stays black (rate 0).
    "shot_noise": ((60, 25, 12, 5, 3), 5),
    # Salt and pepper: a fraction `amount` of pixels set to 0 or 1, half each.
    "impulse_noise": ((0.03, 0.06, 0.09, 0.17, 0.27), 4),
    # Frosted glass: vertical blur (sigma), `iterations` sweeps of coin-flip swaps within max_delta px, blur again.
    # (sigma, max_delta, iterations)
    "glass_blur": (((0.7, 1, 2), (0.9, 2, 1), (1.0, 2, 3), (1.1, 3, 2), (1.5, 4, 2)), 1),
    # Camera shake: ImageMagick motion blur (radius px, sigma px) at a random angle in [-45, 45] degrees.
    "motion_blur": (((10, 3.0), (15, 5.0), (15, 8.0), (15, 12.0), (20, 15.0)), 1),
    # Slant: scikit-image's shear angle s (radians), random sign: x' = x + tan(s) y, y' = y / cos(s).
    "shear": ((0.2, 0.4, 0.6, 0.8, 1.0), 2),
    # Size: zoom out about the centre by this factor (the digit shrinks).
    "scale": ((0.9, 0.8, 0.7, 0.6, 0.5), 3),
    # Rotation about the centre by this angle (radians), random sign.
    "rotate": ((0.2, 0.4, 0.6, 0.8, 1.0), 2),
    # Over-exposure: x + c, clipped (a gray background).
    "brightness": ((0.1, 0.2, 0.3, 0.4, 0.5), 5),
    # Off-centre digit: a shift of this many px in x and in y, each with a random sign.
    "translate": ((1, 2, 3, 4, 5), 3),
    # Inverted bands at the sides: (width px at the left edge, width px at the right edge).
    "stripe": (((7, 7),), 1),
    # Fog: c * plasma fractal (diamond-square, 256 x 256, cropped) added, then rescaled: (c, wibble decay).
    "fog": (((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)), 5),
    # Mud spatter: blobs thresholded from blurred Gaussian noise, painted gray over the image.
    # (noise mean, noise std, noise blur sigma, threshold, mask blur sigma)
    "spatter": (((0.65, 0.3, 4, 0.69, 0.6), (0.65, 0.3, 3, 0.68, 0.6), (0.65, 0.3, 2, 0.68, 0.5),
                 (0.65, 0.3, 1, 0.65, 1.5), (0.67, 0.4, 1, 0.65, 1.5)), 4),
    # A dashed line from the first to the last column: (line width d0 px, dash length px). Ink 1 + ln(1 - d / d0)
    # at vertical distance d from the line, clipped to [0, 1].
    "dotted_line": (((2.3, 2),), 1),
    # A zigzag across columns 2 .. W - 3: (line width d0 px, segment length a px, amplitude b px, max rise px).
    "zigzag": (((2.3, 2.0, 2.0, 5),), 1),
    # The digit replaced by its Canny edge map: (sigma, low threshold, high threshold).
    "canny_edges": (((1.0, 0.1, 0.2),), 1),
}
CORRUPTIONS: tuple[str, ...] = (
    "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
    "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
)  # fmt: skip
CHUNK_SIZE = 2048  # images per batched pass: bounds memory
_MUD = 63 / 255  # MNIST-C's spatter colour
_FOG_MAP = 256  # MNIST-C's plasma_fractal(mapsize=256)
_FOG_FINE_LEVELS = 2  # the finest diamond-square levels, computed only under the image
_FOG_BLOCK = 256  # images per plasma pass (faster on CPU than bigger passes)


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


def _signs(keys: list[int], k: int) -> torch.Tensor:
    """(N, k) random signs, -1 or +1 with probability 1/2 each (numpy's choice([-1, 1])), per image."""
    return torch.where(_rand(keys, k) < 0.5, -1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Shared image ops, on x (N, 1, H, W) float


def _blur_matrix(sigma: float, size: int, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(size, size) matrix B with B @ column = 1-D Gaussian blur (scipy's truncate=4 radius).

    mode "nearest" repeats the edge pixel (skimage.filters.gaussian's default), "constant" pads with 0.
    """
    r = int(4.0 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=dtype)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    cols = torch.arange(size)[:, None] + torch.arange(-r, r + 1)
    weight = g.expand(size, -1) if mode == "nearest" else g * ((cols >= 0) & (cols < size))
    return torch.zeros(size, size, dtype=dtype).scatter_add_(1, cols.clamp(0, size - 1), weight)


def _blur(x: torch.Tensor, sigma: float, mode: str = "nearest") -> torch.Tensor:
    """Separable Gaussian blur as two matmuls (much faster on CPU than conv2d with one channel)."""
    if int(4.0 * sigma + 0.5) == 0:
        return x
    h, w = x.shape[-2:]
    return _blur_matrix(sigma, h, mode) @ x @ _blur_matrix(sigma, w, mode).T


def _warp_about_centre(x: torch.Tensor, m: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """skimage.transform.warp(x, inverse_map) with MNIST-C's maps about the centre c: output pixel p (x, y)
    samples the input at c + m (p - c) + shift, bilinear, black outside. m (N, 2, 2), shift (N, 2) in pixels."""
    n, _, h, w = x.shape
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2])
    size = torch.tensor([w, h], dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    p = torch.stack([xs.flatten() - centre[0], ys.flatten() - centre[1], torch.ones(h * w)])  # (3, H*W)
    # grid_sample with align_corners=False puts pixel i's centre at (2i + 1) / size - 1: fold that into the
    # (N, 2, 3) map and apply it as one matmul (a batched one is several times slower on CPU).
    offset = centre if shift is None else centre + shift
    theta = torch.cat([m, offset.expand(n, 2)[:, :, None]], 2) * (2 / size)[:, None]
    theta[:, :, 2] += 1 / size - 1
    grid = (theta.reshape(2 * n, 3) @ p).view(n, 2, h, w).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _line_from_points(c0: torch.Tensor, r0: torch.Tensor, c1: torch.Tensor, r1: torch.Tensor, h: int, w: int,
                      d0: float) -> torch.Tensor:
    """(N, H, W) MNIST-C's line_from_points: ink 1 + ln(1 - d / d0) clipped to [0, 1], d the vertical distance
    from pixel (col, row) to the line through (c0, r0) and (c1, r1) (N,), on columns floor(c0) .. ceil(c1) - 1.
    Blank where c1 == c0."""
    run = c1 - c0
    flat = run == 0
    slope = (r1 - r0) / torch.where(flat, 1.0, run)
    cols = torch.arange(w, dtype=torch.float32)
    line_row = slope[:, None] * (cols - c0[:, None]) + r0[:, None]  # (N, W)
    keep = (cols >= c0.floor()[:, None]) & (cols < c1.ceil()[:, None]) & ~flat[:, None]  # (N, W)
    ink = torch.arange(h, dtype=torch.float32)[:, None] - line_row[:, None, :]  # (N, H, W), in place from here
    ink.abs_().clamp_(max=d0 * (1 - 1e-6)).div_(-d0).log1p_().add_(1).clamp_(0, 1)
    return ink.mul_(keep[:, None, :])


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
    # MNIST-C's gaussian(x, sigma, multichannel=True) on a 2-D image blurs along the rows axis only.
    column_blur = _blur_matrix(sigma, h, "nearest", torch.float64)
    # MNIST-C goes through np.uint8 here, which truncates: in float64 like numpy, so that the same pixels land
    # just below a whole gray level (the 1e-9 keeps a flat 255 * (sum of weights) from flooring to 254).
    x = torch.floor(column_blur @ (x.double() * 255).round_() + 1e-9).float() / 255
    # The sweep, bottom-right to top-left: with probability 1/2 swap a pixel with the one at (dx, dy), each in
    # [-delta, delta) (numpy's randint excludes the top, so swaps lean up and left). One draw per step encodes
    # the coin and both offsets. Each swap depends on the ones before it, so the sweep is a loop over
    # positions, batched over images.
    rows, cols = torch.arange(h - delta, delta, -1), torch.arange(w - delta, delta, -1)
    here = (rows[:, None] * w + cols).flatten().repeat(iterations)  # (steps,)
    side = 2 * delta
    code = _draw(keys, (len(here),), lambda row, g: row.random_(0, 2 * side * side, generator=g), torch.long)
    offset = torch.arange(side * side)
    offset = (offset // side - delta) * w + offset % side - delta  # code 2k + 1: swap with dy * W + dx
    jump = torch.stack([torch.zeros_like(offset), offset], 1).flatten()  # code 2k: no swap
    flat = x.reshape(n, h * w).T.contiguous()  # (H*W, N): one position of all images is one contiguous row
    flat_1d = flat.view(-1)
    # (steps, N) indices into flat_1d of the pixel each image swaps with at each step
    where_1d = (jump[code.T] + here[:, None]).mul_(n).add_(torch.arange(n))
    for step, i in enumerate(here.tolist()):
        j = where_1d[step]
        mine = flat[i].clone()
        flat[i] = torch.take(flat_1d, j)  # an image that does not swap has j pointing at its own pixel i: a no-op
        flat_1d.scatter_(0, j, mine)
    return (column_blur.float() @ flat.T.reshape(n, 1, h, w)).clamp(0, 1)


def _motion_blur(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    radius, sigma = setting
    n, _, h, w = x.shape
    angle = torch.deg2rad(_rand(keys, 1)[:, 0].double() * 90 - 45)  # numpy's uniform(-45, 45)
    # ImageMagick's MotionBlurImage: a one-sided Gaussian over 2 * ceil(radius) + 1 taps, tap i read from the
    # whole pixel nearest i * (cos a, sin a), rounding halves down; outside the image the edge pixel repeats.
    taps = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    weight = torch.exp(-(taps**2) / (2 * sigma**2))
    weight = weight / weight.sum()
    # Taps whose weights, with all after them, sum to < 1e-6 (a 2.5e-4 gray level) are left out.
    weight = weight[weight.flip(0).cumsum(0).flip(0) >= 1e-6].tolist()
    dx = torch.ceil(taps * torch.cos(angle)[:, None] - 0.5).long()  # (N, taps)
    dy = torch.ceil(taps * torch.sin(angle)[:, None] - 0.5).long()
    pad = len(taps) - 1  # the farthest tap: the padded border repeats the edge as far as any tap reads
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate").reshape(n, -1)
    wp = w + 2 * pad
    base = ((torch.arange(h)[:, None] + pad) * wp + torch.arange(w) + pad).flatten()  # (H*W,) in padded
    shift = dy * wp + dx  # (N, taps)
    out = torch.zeros(n, h * w)
    for t, wt in enumerate(weight):
        out.add_(padded.gather(1, base + shift[:, t, None]), alpha=wt)
    return out.view(n, 1, h, w).clamp(0, 1)


def _shear(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    # The inverse map of skimage's AffineTransform(shear=s) as MNIST-C ran it: (x, y) -> (x - sin(s) y, cos(s) y).
    s = c * _signs(keys, 1)[:, 0]
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    m = torch.stack([torch.stack([one, -torch.sin(s)], -1), torch.stack([zero, torch.cos(s)], -1)], -2)
    return _warp_about_centre(x, m).clamp(0, 1)


def _scale(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    # MNIST-C's inverse map scales by 1 / c: the content shrinks by c.
    return _warp_about_centre(x, torch.eye(2).expand(len(x), 2, 2) / c).clamp(0, 1)


def _rotate(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    a = c * _signs(keys, 1)[:, 0]
    cos, sin = torch.cos(a), torch.sin(a)
    m = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return _warp_about_centre(x, m).clamp(0, 1)


def _brightness(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    # MNIST-C adds c to the HSV value of the gray image: for a gray pixel that is x + c.
    return (x + c).clamp(0, 1)


def _translate(x: torch.Tensor, keys: list[int], c: float) -> torch.Tensor:
    shift = c * _signs(keys, 2)  # (dx, dy), signs independent
    return _warp_about_centre(x, torch.eye(2).expand(len(x), 2, 2), shift).clamp(0, 1)


def _stripe(x: torch.Tensor, keys: list[int], setting: tuple[int, int]) -> torch.Tensor:
    left, right = setting
    cols = torch.arange(x.shape[-1])
    return torch.where((cols < left) | (cols >= x.shape[-1] - right), 1 - x, x)


def _plasma_plan(size: int, crop: int) -> list[tuple[int, int]]:
    """The windows (start, length), in the corner grid of each of the _FOG_FINE_LEVELS finest levels (coarsest
    first), that the top-left crop x crop corner of the map needs. Rows and columns alike; starts may be
    negative (the map wraps around). Empty (whole maps) if the first window would wrap onto itself."""
    plan, start, length = [], 0, crop
    for _ in range(_FOG_FINE_LEVELS):
        # A window of L corners from p gives the next grid 2L - 4 points from 2p + 2 (see _plasma_level).
        p = (start - 2) // 2
        length = -(-(start + length - 2 * p - 2) // 2) + 2
        plan.append((p, length))
        start = p
    return plan[::-1] if not plan or plan[-1][1] <= size >> len(plan) else []


def _plasma_draws(size: int, crop: int) -> int:
    """How many uniforms _plasma consumes per image."""
    plan = _plasma_plan(size, crop)
    coarse = (size >> len(plan)) ** 2 - 1  # the whole map down to the fine levels
    return coarse + sum((n - 1) ** 2 + 2 * (n - 2) ** 2 for _, n in plan)


def _plasma_level(u: torch.Tensor, noise: Callable[[tuple[int, ...]], torch.Tensor],
                  window: bool) -> torch.Tensor:
    """One square + diamond step of ImageNet-C's plasma_fractal, on the corners u (N, n, n) of one level.

    Not window: u is the whole (wrapping) map; returns the next level's (N, 2n, 2n). Window: u holds the
    corners p .. p + n - 1 of each axis; returns the next level's points 2p + 2 .. 2p + 2n - 3.
    """
    if not window:
        right = u.roll(-1, 2)
        c = u + right
        c += c.roll(-1, 1)
        c.mul_(0.25).add_(noise(c.shape))  # centres of the squares: the mean of their 4 corners + noise
        # Diamonds: mid-edges, the mean of the 2 corners and the 2 centres around them + noise.
        e = c.roll(1, 1).add_(c).add_(u).add_(right).mul_(0.25).add_(noise(c.shape))
        s = c.roll(1, 2).add_(c).add_(u).add_(u.roll(-1, 1)).mul_(0.25).add_(noise(c.shape))
    else:
        c = u[:, :-1, :-1] + u[:, 1:, :-1]
        c += u[:, :-1, 1:]
        c += u[:, 1:, 1:]
        c.mul_(0.25).add_(noise(c.shape))
        inner = u[:, 1:-1, 1:-1]
        e = (c[:, :-1, 1:] + c[:, 1:, 1:]).add_(inner).add_(u[:, 1:-1, 2:]).mul_(0.25).add_(noise(inner.shape))
        s = (c[:, 1:, :-1] + c[:, 1:, 1:]).add_(inner).add_(u[:, 2:, 1:-1]).mul_(0.25).add_(noise(inner.shape))
        u, c = inner, c[:, 1:, 1:]
    b, n = u.shape[:2]
    out = torch.empty(b, n, 2, n, 2)
    out[:, :, 0, :, 0], out[:, :, 0, :, 1], out[:, :, 1, :, 0], out[:, :, 1, :, 1] = u, e, s, c
    return out.view(b, 2 * n, 2 * n)


def _plasma(u01: torch.Tensor, size: int, decay: float, crop: int) -> torch.Tensor:
    """(N, crop, crop): the top-left corner of ImageNet-C's plasma_fractal(size, decay) in [0, 1], batched.

    u01 (N, _plasma_draws(size, crop)) holds the uniforms, consumed in order. The coarse levels are computed
    on the whole map, whose min and max then normalize the crop; the _FOG_FINE_LEVELS finest only on the
    windows the crop needs (_plasma_plan). The real min and max can lie a little beyond (see the docstring).
    """
    b, used, wibble = len(u01), 0, 100.0

    def noise(shape: tuple[int, ...]) -> torch.Tensor:  # ImageNet-C: wibble * uniform(-wibble, wibble)
        nonlocal used
        k = math.prod(shape[1:])
        v = u01[:, used : used + k].reshape(shape) * (2 * wibble * wibble) - wibble * wibble
        used += k
        return v

    plan = _plasma_plan(size, crop)
    m = torch.zeros(b, 1, 1)  # the map's first corner is 0
    for _ in range(size.bit_length() - 1 - len(plan)):
        m = _plasma_level(m, noise, window=False)
        wibble /= decay
    lo, hi = m.amin((1, 2))[:, None, None], m.amax((1, 2))[:, None, None]
    if not plan:  # the whole map: exact min and max
        return ((m[:, :crop, :crop] - lo) / (hi - lo)).clamp_(0, 1)
    idx = torch.arange(plan[0][1]).add_(plan[0][0]).remainder_(m.shape[1])
    m = m[:, idx][:, :, idx]
    for level, (p, _) in enumerate(plan):
        m = _plasma_level(m, noise, window=True)
        wibble /= decay
        start, length = plan[level + 1] if level + 1 < len(plan) else (0, crop)
        m = m[:, start - 2 * p - 2 :, start - 2 * p - 2 :][:, :length, :length]
    return ((m - lo) / (hi - lo)).clamp_(0, 1)


def _fog(x: torch.Tensor, keys: list[int], setting: tuple[float, float]) -> torch.Tensor:
    c, decay = setting
    n, _, h, w = x.shape
    crop = max(h, w)
    size = max(_FOG_MAP, 1 << (crop - 1).bit_length())
    draws = _plasma_draws(size, crop)
    fog = torch.cat([_plasma(_rand(keys[i : i + _FOG_BLOCK], draws), size, decay, crop)
                     for i in range(0, n, _FOG_BLOCK)])[:, None, :h, :w]  # fmt: skip
    peak = x.amax((1, 2, 3), keepdim=True)
    return ((x + c * fog) * peak / (peak + c)).clamp(0, 1)


def _spatter(x: torch.Tensor, keys: list[int], setting: tuple[float, ...]) -> torch.Tensor:
    mean, std, sigma, threshold, mask_sigma = setting
    liquid = _draw(keys, x.shape[1:], lambda row, g: row.normal_(mean, std, generator=g))
    liquid = _blur(liquid, sigma)
    mask = _blur((liquid > threshold).float(), mask_sigma)
    mask = torch.where(mask < 0.8, 0.0, mask)
    return (x * (1 - mask) + _MUD * mask).clamp(0, 1)


def _dotted_line(x: torch.Tensor, keys: list[int], setting: tuple[float, int]) -> torch.Tensor:
    d0, dash = setting
    n, _, h, w = x.shape
    r = _draw(keys, (2,), lambda row, g: row.random_(0, h - 1, generator=g), torch.long).float()  # randint(0, 27)
    line = _line_from_points(torch.zeros(n), r[:, 0], torch.full((n,), w - 1.0), r[:, 1], h, w, d0)
    dashes = torch.arange(w) // dash % 2 == 1  # columns 0-1 off, 2-3 on, 4-5 off, ...
    return (x + line[:, None] * dashes).clamp(0, 1)


def _zigzag(x: torch.Tensor, keys: list[int], setting: tuple[float, float, float, int]) -> torch.Tensor:
    d0, a, b, rise = setting
    n, _, h, w = x.shape
    c0, c1 = 2, w - 3

    def fill(row: torch.Tensor, g: torch.Generator) -> None:  # r0 = randint(0, 27), r1 - r0 = randint(-5, 5)
        row[:1].random_(0, h - 1, generator=g)
        row[1:].random_(-rise, rise, generator=g)

    r = _draw(keys, (2,), fill, torch.long).double()
    theta = torch.atan(r[:, 1] / (c1 - c0))
    d = (c1 - c0) / torch.cos(theta)  # the length of the zigzag's axis
    # MNIST-C's vertices along the axis: (0, 0), then ((2i + 1) a, (-1)^i b) for i < k, then an end point.
    k = torch.floor((d - a) / (2 * a)).long() + 1  # (N,)
    most = int(k.max())
    i = torch.arange(most, dtype=torch.float64)
    along = torch.cat([torch.zeros(1, dtype=torch.float64), (2 * i + 1) * a]).expand(n, -1)
    across = torch.cat([torch.zeros(1, dtype=torch.float64), (-1.0) ** i * b]).expand(n, -1)
    whole = 2 * a * torch.floor(d / (2 * a))
    last_across = torch.where(k % 2 == 1, b, -b)
    end = torch.where(d != whole, last_across / (2 * (d - whole)), last_across)
    end_along = torch.where(d != whole, d, (2 * k - 1) * a)
    j = torch.arange(most + 2)
    pick = j.clamp(max=most).expand(n, -1)
    past = j > k[:, None]  # after an image's last zigzag vertex: its end point, repeated (empty segments)
    along = torch.where(past, end_along[:, None], along.gather(1, pick))
    across = torch.where(past, end[:, None], across.gather(1, pick))
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    cs, rs = (along * cos - across * sin + c0).float(), (along * sin + across * cos + r[:, :1]).float()
    ink = x.new_zeros(n, h, w)
    for s in range(most + 1):
        ink += _line_from_points(cs[:, s], rs[:, s], cs[:, s + 1], rs[:, s + 1], h, w, d0)
    return (x + ink[:, None]).clamp(0, 1)


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
