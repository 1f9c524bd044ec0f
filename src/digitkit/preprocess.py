"""Real-world image -> 28x28 MNIST-like tensor: the ONE preprocessing that the CLI, the API, the web page and the
exported model share.

A model with 99% on MNIST gets far less on photos, scans and canvases because they look nothing like MNIST. This
module makes them look like it, the way MNIST itself was made (LeCun et al.: "normalized to fit in a 20x20 pixel
box while preserving their aspect ratio ... centered in a 28x28 image by computing the center of mass"):

1. decode anything PIL reads (EXIF orientation applied, alpha handled, huge images shrunk) -> gray in [0, 1];
2. polarity: find which way the ink goes and make it white on black;
3. lighting: fit a smooth background (quadratic surface, robust to the ink) and divide it out, so paper texture,
   gradients and vignettes vanish; the ink keeps its anti-aliased grey levels (never binarized);
4. threshold (Otsu with hysteresis) -> ink mask; drop specks and border shadows; the digit is what is left;
5. crop, thicken strokes that would come out thinner than MNIST's, fit into a 20x20 box keeping the aspect
   ratio, and place in 28x28 with the centre of mass at the centre; optionally deskew by moments.

On data already in MNIST format the whole pipeline is near-identity (tests/test_preprocess.py measures it on 500
MNIST test images), which is what makes it safe for the API's raw `pixels` and for canvases alike.

Numbers measured on the 10,000 MNIST test images (tests and the constants below refer to them): the centre of
mass sits at (14.0, 14.0) (5-95%: 13.5-14.5, i.e. an integer shift); the longer side of the ink box is 20 px in
99.8%; stroke width (2 x area / edge transitions at half maximum) has median 2.0 px and 5th percentile 1.3 px;
at most 40% of an image's pixels carry ink.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from digitkit.errors import ConfigError, DataError, plain_message


@functools.cache
def _ndimage() -> Any:
    """scipy.ndimage, imported on first use: it costs about 0.3 s, and the config (hence every command) imports
    this module for PreprocessConfig."""
    from scipy import ndimage

    return ndimage

POLARITIES = ("auto", "dark-on-light", "light-on-dark")
THRESHOLDS = ("otsu", "adaptive", "none")
CENTERS = ("mass", "box")
FORMATS = "PNG, JPEG, BMP, TIFF, WebP or GIF"
MAX_PIXELS = 64_000_000
"""Images with more pixels are refused before decoding (a 48 MP phone photo is 48.8 M; PIL's own bomb warning
starts at 89 M). Anything smaller but larger than `max_side` is decoded at reduced size (JPEG draft) and shrunk."""

# MNIST stroke width (see the module docstring): strokes that would come out thinner than its 5th percentile are
# thickened to its median, so a thin pen on a big photo does not become a faint hairline once shrunk 50x.
MNIST_THIN_STROKE_PX = 1.3
MNIST_STROKE_PX = 2.0
_NOISE_RATIO = 4.0  # "empty" when the ink is not this many noise standard deviations above the background
_LOWRES_SIDE = 64  # the lighting is fitted on a block-averaged copy this size: ink blurs, lighting does not
_POLARITY_SIDE = 256  # polarity statistics on a block-averaged copy: averages out pixel noise and salt/pepper
_THICKEN_BELOW_SCALE = 0.75  # only digits shrunk this much get thickened: MNIST-sized input stays as it is
_FLAT_RETRY_SIDE = 256  # images up to this size a side are read again with a flat background when needed (_ink)
_TINY_SIDE = 24  # images with a shorter side are enlarged before the ink is looked for (28x28 MNIST input is not)
_STRAY_GAP = 0.3  # a small component further than this x the digit's size from it is a stray mark, not a part


@dataclass
class PreprocessConfig:
    """How an image becomes a 28x28 MNIST-like digit. The defaults are what the CLI, the API and the web use."""

    polarity: str = "auto"
    """auto (decided from the image: the ink is the extreme furthest from the median gray), dark-on-light
    (pen on paper) or light-on-dark (MNIST, chalk, a white-on-black canvas)."""
    threshold: str = "otsu"
    """How the ink mask is found after the lighting is flattened: otsu (global, with hysteresis), adaptive (local
    mean over adaptive_block pixels) or none (every pixel above the noise floor). Only the mask is thresholded:
    the output keeps the ink's grey levels."""
    adaptive_block: int = 41
    """Odd window size in pixels (after shrinking to max_side) for threshold: adaptive."""
    remove_lighting: bool = True
    """Fit a smooth background (quadratic surface, robust to the ink) and divide it out: removes gradients,
    vignettes and paper tone. Off: the background is one constant level."""
    min_speck_area_fraction: float = 0.02
    """Ink components smaller than this fraction of the largest one are specks (dust, paper grain, noise)."""
    ignore_border_components: bool = True
    """Drop components that touch the image border and look like shadows or page edges (solid, running along
    half a side or more). A digit that merely touches the border of a tight crop is kept."""
    box: int = 20
    """The digit is scaled so its longer side is this many pixels, keeping its aspect ratio (MNIST: 20)."""
    size: int = 28
    """Output is size x size pixels (MNIST: 28)."""
    center: str = "mass"
    """Place the digit's centre of mass (MNIST) or its bounding box's centre at the image centre."""
    deskew: bool = False
    """Remove slant by image moments (shear by -mu11/mu02), as in the classic MNIST deskew. A model must be
    trained with the same deskew (deskew_batch) for this to help."""
    min_ink_fraction: float = 1e-4
    """Reject as no-ink when the digit's ink pixels are fewer than this fraction of the image."""
    blank_contrast: float = 0.08
    """Reject as empty when the ink is less than this much darker (or lighter) than the background, relative to
    the background level (0.08 = 8%); pencil on paper is ~0.3, pen ~0.7."""
    max_side: int = 1024
    """Images with a longer side beyond this are shrunk (area-averaged) first: speed and memory. Digits should
    be at least ~1/50 of the image to survive it."""
    thicken_strokes: bool = True
    """Thicken strokes that would come out thinner than MNIST's (a thin pen on a big image) to MNIST's median
    width; strokes already MNIST-like are left alone."""

    def __post_init__(self) -> None:
        _choice("preprocess.polarity", self.polarity, POLARITIES)
        _choice("preprocess.threshold", self.threshold, THRESHOLDS)
        _choice("preprocess.center", self.center, CENTERS)
        if self.adaptive_block < 3 or self.adaptive_block % 2 == 0:
            raise ConfigError(f"preprocess.adaptive_block = {self.adaptive_block}: expected an odd integer >= 3 "
                              "(a window in pixels, e.g. 41)")
        if not 8 <= self.size <= 1024 or not 4 <= self.box <= self.size:
            raise ConfigError(f"preprocess.box = {self.box}, size = {self.size}: expected 4 <= box <= size and "
                              "8 <= size <= 1024 (MNIST: box 20, size 28)")
        for name in ("min_speck_area_fraction", "min_ink_fraction", "blank_contrast"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"preprocess.{name} = {getattr(self, name)}: expected a fraction in [0, 1)")
        if self.max_side < max(64, self.size):
            raise ConfigError(f"preprocess.max_side = {self.max_side}: expected at least 64 pixels (default 1024)")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(allowed)}")


@dataclass
class Preprocessed:
    """The result for one image: `tensor` (1, size, size) float32 in [0, 1], white digit on black (zeros when
    rejected), `rejected` None or the reason ("empty", "no-ink"), and a JSON-serializable `record` of each step."""

    tensor: torch.Tensor
    rejected: str | None = None
    record: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Loading: anything -> gray (H, W) float32 in [0, 1].


def load_image(source: Any, max_side: int | None = None) -> np.ndarray:
    """Decode bytes, a path, a file object, a PIL image or an array into gray (H, W) float32 in [0, 1].

    Arrays: (H, W), (H, W, 1|2|3|4) or (1, H, W); uint8/uint16/bool/float (floats in [0, 1], or 0-255 if larger).
    EXIF orientation is applied; GIFs give their first frame. Transparency: see `to_gray`. Images over
    MAX_PIXELS are refused; with `max_side`, larger images are shrunk (area-averaged) so the longer side fits.
    Raises DataError, never anything else, for input that is not a readable image.
    """
    return _load(source, max_side)[0]


def load_image_info(source: Any, max_side: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """`load_image` plus what was read (source, format, mode, original width and height, EXIF rotation): the
    multi-digit reader maps its boxes back to the original pixels with it."""
    return _load(source, max_side)


def _load(source: Any, max_side: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    if isinstance(source, Image.Image):
        return _from_pil(source, max_side, {"source": "PIL image"}, own=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DataError(f"empty input (0 bytes): expected the bytes of an image file ({FORMATS})")
        return _from_pil(_open(io.BytesIO(bytes(source)), "bytes"), max_side, {"source": f"{len(source)} bytes"})
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such image file; check the path")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes); expected an image file ({FORMATS})")
        return _from_pil(_open(path, str(path)), max_side, {"source": path.name})
    if hasattr(source, "read"):
        return _load(source.read(), max_side)
    try:
        arr = np.asarray(source)
    except Exception as e:  # noqa: BLE001 - anything unconvertible is the user's input, not our bug
        raise DataError(f"cannot read {type(source).__name__} as an image ({e}); expected bytes, a path, "
                        "a PIL image or an array") from None
    return _from_array(arr, max_side)


def _open(fp: Any, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad input; all mean "not an image"
        raise DataError(f"{name}: not an image PIL can read: {plain_message(e)}; expected {FORMATS}") from None
    return img



def _check_pixels(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise DataError(f"image is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {MAX_PIXELS / 1e6:.0f} MP "
                        "limit (a guard against decompression bombs); shrink it first")
    if w < 1 or h < 1:
        raise DataError(f"image is {w}x{h}: expected at least one pixel")


def _from_pil(img: Image.Image, max_side: int | None, info: dict[str, Any],
              own: bool = True) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    _check_pixels(*img.size)
    info.update(format=img.format, mode=img.mode, width=img.width, height=img.height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The first frame of an animation or the first page of a TIFF, and nothing else: a file opens at its
            # first frame, and `n_frames` is never asked (Pillow walks every frame of a GIF to count them: 0.75 s
            # for 360,000 frames of 1x1 in 8 MB).
            if not own and img.tell() != 0:
                img.seek(0)
            if own and max_side and img.format == "JPEG" and max(img.size) > 2 * max_side:
                # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT: a 12 MP photo in a few ms.
                img.draft(img.mode, (max_side, max_side))
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            if orientation not in (1, None):
                img = ImageOps.exif_transpose(img)
                info["exif_orientation"] = int(orientation)
                if orientation in (5, 6, 7, 8):  # quarter turns: the upright image is the other way round
                    info["width"], info["height"] = info["height"], info["width"]
            gray, alpha = _pil_channels(img, max_side)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data surfaces here, as many exception types
        raise DataError(f"{info['source']}: not an image PIL can read: {plain_message(e)}; expected "
                        f"{FORMATS}") from None
    return _finish(gray, alpha, max_side, info)


def _pil_channels(img: Image.Image, max_side: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(gray, alpha or None) as float32 arrays in [0, 1], from any PIL mode; 8-bit images are shrunk to
    `max_side` here, in PIL, which is several times faster than on floats."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "L")
        mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        kind = np.dtype(np.float32) if mode == "F" else np.dtype(np.int32)  # F: floats in [0, 1] (or 0-255)
        return _scale_numbers(np.asarray(img).astype(np.float32), kind), None
    img = img.convert("LA" if mode in ("RGBA", "RGBa", "LA", "La", "PA") else "L")
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BOX)
    a = np.asarray(img, dtype=np.float32) / 255.0
    return (a[..., 0], a[..., 1]) if a.ndim == 3 else (a, None)


def _scale_numbers(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Map sample values to [0, 1]: by the dtype's range for integers, by 1 or 255 for floats."""
    if not np.isfinite(a).all():
        raise DataError("image array contains NaN or infinite values; expected finite pixel values")
    if dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(dtype, np.integer):
        top = 255.0 if dtype.itemsize == 1 or a.max(initial=0) <= 255 else 65535.0
        return np.clip(a / top, 0, 1).astype(np.float32)
    top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    return np.clip(a / top, 0, 1).astype(np.float32)


def _from_array(arr: np.ndarray, max_side: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)) or arr.size == 0:
        raise DataError(f"image array of shape {arr.shape}: expected (H, W), (H, W, 3) RGB or (H, W, 4) RGBA")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise DataError(f"image array of dtype {arr.dtype}: expected uint8, uint16, bool or float pixels")
    _check_pixels(arr.shape[1], arr.shape[0])
    info = {"source": "array", "dtype": str(arr.dtype), "width": int(arr.shape[1]), "height": int(arr.shape[0]),
            "mode": {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}.get(arr.shape[-1])}[arr.ndim]}
    if arr.dtype == np.uint8:  # PIL converts and shrinks uint8 faster than numpy
        gray, alpha = _pil_channels(Image.fromarray(np.ascontiguousarray(arr)), max_side)
        return _finish(gray, alpha, max_side, info)
    a = _scale_numbers(arr.astype(np.float32), arr.dtype)
    alpha = None
    if a.ndim == 3:
        if a.shape[-1] in (2, 4):
            alpha = a[..., -1]
        a = a[..., 0] if a.shape[-1] == 2 else a[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return _finish(a.astype(np.float32), alpha, max_side, info)


def to_gray(image: np.ndarray | Image.Image) -> np.ndarray:
    """A decoded image (array or PIL) -> gray (H, W) float32 in [0, 1], transparency resolved.

    Transparency (some pixels at alpha < 0.5) means a canvas export or a cut-out, and the colour of transparent
    pixels is meaningless (often black). Two cases:
    - the opaque pixels are a minority and of one colour (std < 0.15): they are strokes on a transparent canvas,
      whatever their colour (black, white, grey, red), so alpha itself is the ink: gray = 1 - alpha;
    - otherwise (a photo or scan with transparent margins): composite onto the median colour of the opaque
      pixels, so the transparent part looks like the paper around the digit.
    """
    return _load(image, None)[0]


def _finish(gray: np.ndarray, alpha: np.ndarray | None, max_side: int | None,
            info: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    if alpha is not None:
        gray, info["alpha"] = _resolve_alpha(gray, alpha)
    h, w = gray.shape
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        gray = _resize(gray, max(1, round(w * s)), max(1, round(h * s)), Image.Resampling.BOX)
    if gray.shape != (info["height"], info["width"]):
        info["shrunk_to"] = [int(gray.shape[1]), int(gray.shape[0])]
    return np.ascontiguousarray(gray, dtype=np.float32), info


def _resolve_alpha(gray: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, str]:
    if alpha.min() > 0.5:
        return gray, "ignored (no transparent pixels)"
    opaque = alpha > 0.5
    if opaque.mean() < 0.5 and (not opaque.any() or gray[opaque].std() < 0.15):
        return (1.0 - alpha).astype(np.float32), "alpha is the ink (strokes on a transparent canvas)"
    background = float(np.median(gray[opaque]))
    return (alpha * gray + (1.0 - alpha) * background).astype(np.float32), (
        f"composited on the opaque pixels' median gray {background:.2f}")


def _resize(a: np.ndarray, w: int, h: int, resample: Image.Resampling) -> np.ndarray:
    """Resize a float image with PIL (antialiased for every filter but NEAREST)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((w, h), resample))


# ----------------------------------------------------------------------------------------------------------
# Ink: gray -> white-on-black ink with the background at exactly 0, plus the mask of the ink that counts.


def ink_image(gray: np.ndarray, cfg: PreprocessConfig | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Gray (H, W) in [0, 1] -> (ink (H, W) float32 white-on-black in [0, 1], mask (H, W) bool, record).

    `ink` is exactly 0 off the ink (background, specks and border shadows removed) and keeps anti-aliased grey
    levels on it, stretched so the strokes reach ~1. `mask` is the thresholded ink that was kept (components
    of the Otsu/adaptive mask), which segmentation works on; `ink > 0` is slightly wider (the soft stroke edges).
    The record says what was done (polarity, lighting, threshold, components dropped); its "rejected" is "empty"
    (no real contrast) or "no-ink" (only specks and shadows) with ink and mask all zero, else None.
    """
    ink, mask, _, record = _ink(np.asarray(gray, dtype=np.float32), cfg or PreprocessConfig())
    return ink, mask, record


@dataclass
class _Components:
    labels: np.ndarray  # (H, W) int32: the kept components' labels, 0 elsewhere
    area: np.ndarray  # pixels per label (0 for dropped ones)
    boxes: list[Any]  # ndimage.find_objects slices per label


def _ink(gray: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, _Components, dict[str, Any]]:
    """Like ink_image, plus the kept components.

    Removing the lighting assumes the paper is most of the image. When the digit covers most of it instead (a tight
    crop, a thumbnail scaled up) the fitted "lighting" rises into the strokes and eats them: if, in an image of at
    most _FLAT_RETRY_SIDE px a side, the first pass finds no ink or finds the digit covering most of the image, the
    image is read again with one constant background level, and that reading is kept when it finds the ink more
    clearly (a higher contrast over noise)."""
    out = _ink_once(gray, cfg, cfg.remove_lighting)
    record = out[3]
    # Only small images: a crop of a form field or a thumbnail, where a lighting gradient is rare and the digit
    # fills the frame. In a photo a flat reading would take shadows and vignetting for ink.
    small = max(gray.shape) <= _FLAT_RETRY_SIDE
    if cfg.remove_lighting and small and (record["rejected"] or record.get("noise", {}).get("from") != "median"):
        flat = _ink_once(gray, cfg, False)
        if not flat[3]["rejected"] and (record["rejected"] or _clarity(flat[3]) > _clarity(record)):
            first = record["rejected"] or f"contrast over noise {_clarity(record):.2f}"
            flat[3]["lighting"]["why"] = ("kept one background level: removing the lighting found the ink less "
                                          f"clearly ({first} against {_clarity(flat[3]):.2f})")
            return flat
    return out


def _enlarge_tiny(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """An image under _TINY_SIDE px a side (a thumbnail, a digit cut from a low-dpi form), enlarged smoothly by a
    whole factor to about 2x that: at 8-20 px every stroke edge is a large share of the pixels, so the noise level,
    the background and the speck sizes read from it are wrong, and a clean digit was judged empty."""
    h, w = gray.shape
    if min(h, w) >= _TINY_SIDE:
        return gray, 1
    k = math.ceil(2 * _TINY_SIDE / max(min(h, w), 1))
    k = max(1, min(k, 4096 // max(h, w, 1)))
    if k <= 1:
        return gray, 1
    return np.clip(_resize(gray, w * k, h * k, Image.Resampling.BICUBIC), 0.0, 1.0), k


def _clarity(record: dict[str, Any]) -> float:
    th = record.get("threshold", {})
    return th.get("contrast", 0.0) / max(th.get("noise_sigma", 0.0), 0.01)


def _ink_once(gray: np.ndarray, cfg: PreprocessConfig, remove_lighting: bool
              ) -> tuple[np.ndarray, np.ndarray, _Components, dict[str, Any]]:  # fmt: skip
    h, w = gray.shape
    record: dict[str, Any] = {"rejected": None}
    small = _block_mean(gray, _POLARITY_SIDE)
    light_background, record["polarity"] = _polarity(small, cfg.polarity)
    x = 1.0 - gray if light_background else gray  # ink-positive: the ink is now the bright part
    x_small = 1.0 - small if light_background else small

    b, record["lighting"] = _background(_block_mean(x_small, _LOWRES_SIDE), (h, w), remove_lighting)
    # For pen on paper this is 1 - I / B: the ink's reflectance relative to the local paper, which is what makes
    # a shadowed stroke as black as a lit one. For light-on-dark it is the rise above the local background.
    f = (x - b) / np.maximum(1.0 - b, 0.1)

    sample = f[:: max(1, h // 256), :: max(1, w // 256)]
    med, sigma, record["noise"] = _background_level(f, sample)
    t, t_low = _thresholds(f, med, sigma, cfg)
    strong = f > t
    contrast = float(np.percentile(f[strong], 90)) - med if strong.any() else 0.0
    record["threshold"] = {"method": cfg.threshold, "value": round(float(np.median(t)), 4), "low": round(t_low, 4),
                           "noise_sigma": round(sigma, 4), "contrast": round(contrast, 4)}
    empty = np.zeros((h, w), np.float32), np.zeros((h, w), bool), _Components(np.zeros((h, w), np.int32),
                                                                                 np.zeros(1, np.int64), [])
    if contrast < cfg.blank_contrast or contrast < _NOISE_RATIO * sigma:
        record["rejected"] = "empty"
        record["why"] = (f"the darkest marks differ from the background by {contrast:.3f}, below blank_contrast "
                         f"{cfg.blank_contrast}: a blank page" if contrast < cfg.blank_contrast else
                         f"the darkest marks ({contrast:.3f} above the background) are within {_NOISE_RATIO:g}x the "
                         f"noise level ({sigma:.3f}): noise, not ink")
        return *empty, record

    # Hysteresis: faint parts of a stroke (weak) count when they touch a clearly inked pixel (strong).
    labels, n = _ndimage().label(f > t_low, structure=np.ones((3, 3), bool))
    keep, area, boxes = _keep_components(labels, n, strong, cfg, record)
    if not keep.any():
        record["rejected"] = "no-ink"
        record["why"] = "every ink component was a speck or a border shadow"
        return *empty, record
    # Everything from here on happens inside the kept ink's bounding box (+1 px for the soft edge).
    r = _union([boxes[i - 1] for i in np.flatnonzero(keep)], 1, (h, w))
    lab = np.where(keep[labels[r]], labels[r], 0).astype(np.int32)
    fr, m = f[r], lab > 0
    inked = m & (fr > t if np.ndim(t) == 0 else fr > t[r])
    peak = float(np.percentile(fr[inked], 90)) if inked.any() else float(fr[m].max())
    floor = max(med + 2.0 * sigma, 0.0)
    # The soft edge of the strokes: pixels next to the kept ink that rise above the noise but are in no
    # component, so anti-aliasing survives (on MNIST this keeps the faintest grey pixels and the 20 px box).
    edge = grow(m) & (fr > floor) & (fr <= t_low)
    ink = np.zeros((h, w), np.float32)
    ink[r] = np.where(m | edge, np.clip((fr - floor) / max(peak - floor, 1e-3), 0.0, 1.0), 0.0)
    mask = np.zeros((h, w), bool)
    mask[r] = m
    labels = np.zeros((h, w), np.int32)
    labels[r] = lab
    record["ink"] = {"floor": round(floor, 4), "peak": round(peak, 4)}
    return ink, mask, _Components(labels, np.where(keep, area, 0), boxes), record


def _background_level(f: np.ndarray, sample: np.ndarray) -> tuple[float, float, dict[str, Any]]:
    """(background level, noise sigma, record) of the ink-positive image `f`.

    Usually the background is most of the image: its level is the median and its noise the spread of the lower
    half (ink is all on the upper side). A digit cropped tight, or small and blurred (a thumbnail scaled up, a
    low-dpi form field), covers so much of its image that the median and the lower half fall on the soft strokes:
    the spread read as noise is then the ink itself, and the digit was judged "empty". The pixel noise read from
    neighbouring pixels (the median absolute difference along rows, which strokes barely touch) tells the two
    apart: when the lower-half spread is far above it, the level and noise come from Otsu's background class. Only
    in images of at most _FLAT_RETRY_SIDE px a side (crops, thumbnails, form fields): in a photo, smooth texture and
    shading would pass for a covering digit."""
    med = float(np.median(sample))
    sigma = max(med - float(np.percentile(sample, 15.87)), 0.0)
    if max(f.shape) > _FLAT_RETRY_SIDE:  # a photo or a page: its texture and shading would pass for a covering digit
        return med, sigma, {"level": round(med, 4), "from": "median"}
    rows = f[:: max(1, f.shape[0] // 256)]
    diffs = np.abs(rows[:, 1:] - rows[:, :-1]) if rows.shape[1] > 1 else np.zeros(1, np.float32)
    pixel_noise = 1.4826 * float(np.median(diffs)) / math.sqrt(2)
    if sigma <= 3.0 * pixel_noise + 0.02:
        return med, sigma, {"level": round(med, 4), "from": "median"}
    background = sample[sample <= _otsu(sample)]
    # Texture and shading also spread the lower half of a photo; what marks a digit covering the image is that the
    # upper class (the ink, its halo) is a large share of it: a quarter or more, where a digit on a page is a few %.
    if not 0.1 * sample.size <= background.size <= 0.75 * sample.size:
        return med, sigma, {"level": round(med, 4), "from": "median"}
    level = float(np.median(background))
    spread = max(level - float(np.percentile(background, 15.87)), pixel_noise)
    return level, spread, {"level": round(level, 4), "from": "otsu background class",
                           "why": f"the lower half spreads {sigma:.3f}, far above the pixel noise {pixel_noise:.3f}: "
                                  "the digit covers most of the image"}  # fmt: skip


def grow(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation by shifted ORs (several times faster than ndimage.binary_dilation for this case)."""
    out = mask.copy()
    for a, b in ((out[1:], mask[:-1]), (out[:-1], mask[1:])):
        a |= b
    rows = out.copy()
    for a, b in ((out[:, 1:], rows[:, :-1]), (out[:, :-1], rows[:, 1:])):
        a |= b
    return out


def _union(boxes: list[Any], margin: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The bounding box of several find_objects boxes, grown by `margin` and clipped to the image."""
    y0 = max(min(b[0].start for b in boxes) - margin, 0)
    y1 = min(max(b[0].stop for b in boxes) + margin, shape[0])
    x0 = max(min(b[1].start for b in boxes) - margin, 0)
    x1 = min(max(b[1].stop for b in boxes) + margin, shape[1])
    return slice(y0, y1), slice(x0, x1)


def _polarity(small: np.ndarray, polarity: str) -> tuple[bool, dict[str, Any]]:
    """True if the background is light (dark ink). Auto: the ink is the extreme further from the median, in a
    block-averaged copy (`small`) where pixel noise and salt-and-pepper specks are averaged away."""
    if polarity != "auto":
        return polarity == "dark-on-light", {"decided": polarity, "why": "set in the config"}
    med, lo, hi = float(np.median(small)), float(small.min()), float(small.max())
    dark_on_light = med - lo > hi - med
    return dark_on_light, {
        "decided": "dark-on-light" if dark_on_light else "light-on-dark",
        "why": f"median gray {med:.2f}; darkest {lo:.2f} and lightest {hi:.2f} (block-averaged): the ink is the "
               f"extreme further from the median",
    }


def _block_mean(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape
    k = max(1, math.ceil(max(h, w) / side))
    if k == 1:
        return a
    hh, ww = h // k * k, w // k * k
    if hh == 0 or ww == 0:
        return a
    # Two single-axis sums: several times faster than .mean((1, 3)) over the strided 4-d view.
    return a[:hh, :ww].reshape(hh // k, k, ww // k, k).sum(3).sum(1) / (k * k)


def _background(z: np.ndarray, shape: tuple[int, int], remove_lighting: bool) -> tuple[Any, dict[str, Any]]:
    """The background of an ink-positive image of size `shape`, from `z`, a ~64 px block-averaged copy of it
    (ink blurs there, lighting does not): a quadratic surface fitted to the non-ink pixels, or one constant."""
    h, w = shape
    zh, zw = z.shape
    degree = 2 if remove_lighting else 0
    powers, design, pinv = _design(zh, zw, degree)
    target = z.ravel()
    # Start from the lower envelope (repeatedly clip the data to the fit from above, "modpoly"): the ink sits
    # above it whatever its share of the image. Then refit on the pixels near the envelope, for an unbiased level.
    y = target.copy()
    for _ in range(30):
        clipped = np.minimum(y, design @ (pinv @ y))
        if np.abs(clipped - y).max() < 1e-3:
            break
        y = clipped
    coef = pinv @ y
    ink_share = 0.0
    for _ in range(2):
        resid = target - design @ coef
        low = resid[resid <= np.median(resid)]
        sigma = max(1.4826 * float(np.median(np.abs(low - np.median(low)))), 0.005)
        ink = (resid > np.median(resid) + 3 * sigma).reshape(zh, zw)
        ink_share = float(ink.mean())
        keep = ~grow(ink).ravel()
        if keep.sum() < max(len(powers) * 3, 0.2 * target.size):
            keep = ~ink.ravel()  # thick ink in a small image: exclude the ink, not its neighbours too
        if keep.sum() < len(powers) * 3:
            break
        coef = np.linalg.lstsq(design[keep], target[keep], rcond=None)[0]
    if degree == 0:
        level = float(np.clip(coef[0], 0.0, 0.95))
        return level, {"removed": False, "background": round(level, 4)}
    # Evaluate at full size as V @ C @ U^T: one small matmul instead of six full-size passes.
    vf = (np.arange(h) + 0.5) / h * 2 - 1
    uf = (np.arange(w) + 0.5) / w * 2 - 1
    c = np.zeros((degree + 1, degree + 1))
    for (i, j), value in zip(powers, coef, strict=True):
        c[i, j] = value
    vpow = np.stack([vf**i for i in range(degree + 1)], 1).astype(np.float32)
    upow = np.stack([uf**j for j in range(degree + 1)], 1).astype(np.float32)
    b = np.clip(vpow @ c.astype(np.float32) @ upow.T, 0.0, 0.95)
    fit = np.clip(design @ coef, 0.0, 0.95)
    return b, {"removed": True, "background_min": round(float(fit.min()), 4),
               "background_max": round(float(fit.max()), 4), "ink_share": round(ink_share, 4)}


@functools.lru_cache(maxsize=64)
def _design(zh: int, zw: int, degree: int) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Polynomial terms v**i * u**j over a zh x zw grid of pixel-centre coordinates in [-1, 1] (the same at both
    resolutions), the design matrix and its pseudo-inverse. Cached: a server sees the same few sizes again and
    again, and for a 28x28 input building them is a third of the preprocessing time. Read-only arrays, shared."""
    v = (np.arange(zh) + 0.5) / zh * 2 - 1
    u = (np.arange(zw) + 0.5) / zw * 2 - 1
    powers = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    vv, uu = np.meshgrid(v, u, indexing="ij")
    design = np.stack([(vv**i * uu**j).ravel() for i, j in powers], 1)
    pinv = np.linalg.pinv(design)
    design.flags.writeable = False
    pinv.flags.writeable = False
    return powers, design, pinv


def _thresholds(f: np.ndarray, med: float, sigma: float, cfg: PreprocessConfig) -> tuple[Any, float]:
    """(strong threshold, weak threshold); the strong one is an array for the adaptive method."""
    noise_floor = med + 3.0 * sigma
    if cfg.threshold == "none":
        t = max(noise_floor, med + 0.02)
        return t, t
    t_otsu = max(_otsu(f), noise_floor, med + 0.02)
    # Otsu drifts low when the ink is a few percent of the image and the background has a tail (residual
    # lighting, texture): never below a third of the ink's level, the way a half-maximum cut would do.
    above = f[f > t_otsu]
    if above.size:
        t_otsu = max(t_otsu, med + (float(np.percentile(above, 90)) - med) / 3)
    t_low = max(med + 2.0 * sigma, 0.5 * t_otsu)
    if cfg.threshold == "otsu":
        return t_otsu, t_low
    local = _ndimage().uniform_filter(f, cfg.adaptive_block, mode="nearest")
    offset = max(3.0 * sigma, 0.05)
    return np.maximum(local + offset, max(noise_floor, med + 0.02)), max(med + 2.0 * sigma, med + 0.01)


def _otsu(f: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins): the split that maximizes between-class variance."""
    if f.size > 500_000:  # a global statistic: every other row and column is plenty, and 4x cheaper
        f = f[::2, ::2]
    q = np.multiply(f, 255, dtype=np.float32)
    counts = np.bincount(np.clip(q, 0, 255, out=q).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = counts / counts.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    between[~np.isfinite(between)] = -1
    return (int(np.argmax(between)) + 0.5) / 255.0


def _keep_components(labels: np.ndarray, n: int, strong: np.ndarray, cfg: PreprocessConfig,
                     record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[Any]]:  # fmt: skip
    """(Boolean lookup over labels 0..n: which weak components are ink that counts, areas, boxes)."""
    keep = np.zeros(n + 1, bool)
    comps = {"found": int(n), "without_strong_pixels": 0, "border_shadows": 0, "specks": 0}
    record["components"] = comps
    area = np.bincount(labels.ravel(), minlength=n + 1)
    if n == 0:
        return keep, area, []
    boxes = _ndimage().find_objects(labels)
    has_strong = np.bincount(labels[strong], minlength=n + 1) > 0
    has_strong[0] = False
    keep[:] = has_strong
    comps["without_strong_pixels"] = int(n - has_strong[1:].sum())
    if cfg.ignore_border_components:
        shadows, spanning = _border_shadows(labels, n, area, boxes, np.flatnonzero(keep))
        shadows &= keep
        if shadows.any() and not (keep & ~shadows).any():
            # Nothing else left. A digit in a tight crop can look like a shadow (a thick "1" is solid, a "7"'s
            # bar runs along the top), but a shadow band runs from corner to corner, touching both neighbouring
            # sides; a lone component that does not is the digit.
            shadows &= spanning
        keep &= ~shadows
        comps["border_shadows"] = int(shadows.sum())
    if keep.any():
        specks = keep & (area < cfg.min_speck_area_fraction * area[keep].max())
        keep &= ~specks
        comps["specks"] = int(specks.sum())
    comps["kept"] = int(keep.sum())
    return keep, area, boxes


def _border_shadows(labels: np.ndarray, n: int, area: np.ndarray, boxes: list[Any],
                    candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(shadow, crossing) lookups over labels. Shadows lie along a border: they touch 60% of a side, or they are
    solid (fill half their box) and touch a side over half their own extent along it and a tenth of the side:
    shadows, page edges, the table around the paper. A digit touches the border only where its strokes end, and
    strokes are not solid. Spanning: touches a side and both sides next to it (e.g. bottom, left and right)."""
    h, w = labels.shape
    contact = [np.bincount(edge, minlength=n + 1) for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1])]
    shadow, spanning = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    for i in candidates:
        sl = boxes[i - 1]
        bh, bw = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        along = any(c[i] >= 0.5 * extent and c[i] >= 0.1 * side
                    for c, extent, side in zip(contact, (bw, bw, bh, bh), (w, w, h, h), strict=True))
        lines_a_side = any(c[i] >= 0.6 * side for c, side in zip(contact, (w, w, h, h), strict=True))
        shadow[i] = lines_a_side or (along and area[i] >= 0.5 * bh * bw)
        top, bottom, left, right = (bool(c[i]) for c in contact)
        spanning[i] = ((top or bottom) and left and right) or ((left or right) and top and bottom)
    return shadow, spanning


# ----------------------------------------------------------------------------------------------------------
# The digit: crop, thicken, fit into the box, centre.


def normalize_digit(ink_crop: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """A cropped digit (h, w) white-on-black in [0, 1] -> (size, size) float32, MNIST-style: longer side scaled to
    `box` keeping the aspect ratio, thin strokes thickened, centre of mass (or box centre) at the centre."""
    return _normalize(np.asarray(ink_crop, dtype=np.float32), cfg or PreprocessConfig())[0]


def _normalize(crop: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, dict[str, Any]]:
    rec: dict[str, Any] = {}
    crop = _trim(crop)
    h, w = crop.shape
    scale = cfg.box / max(h, w)
    width = stroke_width(crop >= 0.5 * max(float(crop.max()), 1e-6))
    rec.update(scale=round(scale, 5), stroke_width_px=round(width * scale, 3))
    thicken = cfg.thicken_strokes and width * scale < MNIST_THIN_STROKE_PX and scale < _THICKEN_BELOW_SCALE
    if not thicken:
        digit = _to_box(crop, cfg.box)
    else:
        # Work at 4x the box, where the dilation radius is a few whole pixels, then area-average down. The
        # width measure reads diagonal strokes thin (as it does on MNIST, where its median is 2.0), so the radius
        # is corrected until the result measures like MNIST's median.
        k = 4
        s = k * cfg.box / max(h, w)
        g = _resize(crop, max(1, round(w * s)), max(1, round(h * s)),
                    Image.Resampling.BOX if s < 1 else Image.Resampling.BICUBIC)
        g = np.clip(np.clip(g, 0, None) / max(_peak(g), 1e-6), 0, 1)
        radius = (k * MNIST_STROKE_PX - width * s) / 2
        for _ in range(3):
            pad = math.ceil(radius) + 1
            yy, xx = np.mgrid[-pad : pad + 1, -pad : pad + 1]
            digit = _to_box(_ndimage().grey_dilation(np.pad(g, pad), footprint=xx**2 + yy**2 <= radius**2), cfg.box)
            achieved = stroke_width(digit >= 0.5)
            if achieved >= MNIST_STROKE_PX - 0.2:
                break
            radius += (MNIST_STROKE_PX - achieved) * k / 2
        rec["thickened_radius_px"] = round(radius / k, 3)
    out, rec["center_shift"] = _place(digit, cfg)
    rec["box_wh"] = [int(digit.shape[1]), int(digit.shape[0])]
    return out, rec


def _to_box(crop: np.ndarray, box: int) -> np.ndarray:
    """Trim, then resize so the longer side is `box` (aspect kept; area-averaged down, bicubic up) and put the
    strokes' level at 1."""
    crop = _trim(crop)
    h, w = crop.shape
    scale = box / max(h, w)
    bw, bh = max(1, round(w * scale)), max(1, round(h * scale))
    if (bw, bh) == (w, h):
        digit = crop
    else:
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC
        digit = np.clip(_resize(crop, bw, bh, resample), 0, 1)
    return np.clip(digit / max(_peak(digit), 1e-6), 0, 1)


def _trim(a: np.ndarray) -> np.ndarray:
    """Crop to the nonzero pixels (a 1x1 zero if there are none)."""
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    if len(rows) == 0:
        return np.zeros((1, 1), np.float32)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _peak(a: np.ndarray) -> float:
    """The stroke level: 90th percentile of the pixels above half the maximum (robust to a few hot pixels)."""
    top = float(a.max())
    if top <= 0:
        return 1.0
    return float(np.percentile(a[a >= 0.5 * top], 90))


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels of a binary digit: 2 x area / edge transitions (a stroke of width w and length
    L has area wL and ~2L transitions across it). Diagonal strokes read ~20% thin; MNIST's median is 2.0 px."""
    m = np.pad(np.asarray(mask, bool), 1)
    transitions = int((m[1:] != m[:-1]).sum() + (m[:, 1:] != m[:, :-1]).sum())
    return 2.0 * float(m.sum()) / transitions if transitions else 0.0


def _place(digit: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, list[int]]:
    """Paste into size x size with an integer shift (no resampling blur) putting the centre of mass (or the box
    centre) at size/2 — where MNIST has it — clamped so the digit stays inside the frame."""
    bh, bw = digit.shape
    size = cfg.size
    if cfg.center == "mass" and digit.sum() > 0:
        yy, xx = np.mgrid[0:bh, 0:bw]
        cy, cx = (digit * yy).sum() / digit.sum(), (digit * xx).sum() / digit.sum()
    else:
        cy, cx = (bh - 1) / 2, (bw - 1) / 2
    top = int(np.clip(round(size / 2 - cy), 0, size - bh))
    left = int(np.clip(round(size / 2 - cx), 0, size - bw))
    out = np.zeros((size, size), np.float32)
    out[top : top + bh, left : left + bw] = digit
    return out, [left + round((bw - 1) / 2) - size // 2, top + round((bh - 1) / 2) - size // 2]


# ----------------------------------------------------------------------------------------------------------
# Deskew: the classic moments shear, for one image (numpy) and for training batches (torch).


def deskew(image: np.ndarray, max_shear: float = 1.0) -> tuple[np.ndarray, float]:
    """(H, W) float -> (deskewed (H, W), shear alpha). Shears rows by alpha = mu11 / mu02 (x-y covariance over
    y variance) so the slant goes, and moves the centre of mass to (H/2, W/2); bilinear, zeros outside."""
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape
    total = float(a.sum())
    if total <= 0:
        return a.copy(), 0.0
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = float((a * yy).sum() / total), float((a * xx).sum() / total)
    mu02 = float((a * (yy - cy) ** 2).sum() / total)
    mu11 = float((a * (yy - cy) * (xx - cx)).sum() / total)
    alpha = float(np.clip(mu11 / mu02, -max_shear, max_shear)) if mu02 > 1e-6 else 0.0
    # Output (r, c) samples the input at (r - h/2 + cy, c - w/2 + cx + alpha (r - h/2)).
    matrix = np.array([[1.0, 0.0], [alpha, 1.0]])
    offset = np.array([cy, cx]) - matrix @ np.array([h / 2, w / 2])
    out = _ndimage().affine_transform(a, matrix, offset=offset, order=1, mode="grid-constant", cval=0.0)
    return out.astype(np.float32), alpha


def deskew_batch(x: torch.Tensor, max_shear: float = 1.0) -> torch.Tensor:
    """x (B, 1, H, W) float -> the same, each image deskewed exactly like `deskew` (one grid_sample for all)."""
    b, c, h, w = x.shape
    if c != 1:
        raise ValueError(f"deskew_batch expects (B, 1, H, W), got {tuple(x.shape)}")
    img = x[:, 0].float()
    yy = torch.arange(h, dtype=torch.float32, device=x.device).view(1, h, 1)
    xx = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, w)
    # Moments from row and column sums (one pass over the pixels, not five), in float64 so that
    # E[y^2] - E[y]^2 keeps its precision.
    ys, xs = yy.flatten().double(), xx.flatten().double()
    rows, cols = img.sum(2).double(), img.sum(1).double()  # (B, h), (B, w)
    mass = rows.sum(1)
    total = mass.clamp_min(1e-12)
    cy, cx = rows @ ys / total, cols @ xs / total
    mu02 = rows @ ys.square() / total - cy.square()
    mu11 = (img @ xx.view(w, 1)).view(b, h).double() @ ys / total - cx * cy
    alpha = torch.where(mu02 > 1e-6, mu11 / mu02.clamp_min(1e-6), torch.zeros_like(mu02)).clamp(-max_shear, max_shear)
    alpha = torch.where(mass > 0, alpha, torch.zeros_like(alpha)).float()
    cy, cx = cy.float(), cx.float()
    r = yy - h / 2  # (1, h, 1)
    # Output pixel (i, j) samples source (r_i + cy, j - w/2 + cx + alpha * r_i), in grid units where -1 and 1 are
    # the centres of the first and last pixels (align_corners=True, as in ndimage). Both coordinates are a per-row
    # offset plus at most a per-column term, written straight into the grid (no (B, h, w) temporaries).
    grid = torch.empty(b, h, w, 2, device=x.device)
    row_x = (cx.view(b, 1, 1) - w / 2 + alpha.view(b, 1, 1) * r) * (2 / (w - 1)) - 1  # (B, h, 1)
    torch.add(row_x, xx * (2 / (w - 1)), out=grid[..., 0])
    grid[..., 1] = (r + cy.view(b, 1, 1)) * (2 / (h - 1)) - 1
    out = F.grid_sample(img.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    empty = mass <= 0
    if empty.any():  # nothing to centre: the image as it was
        out[empty] = x[empty].float()
    return out


def deskew_uint8(x: torch.Tensor) -> torch.Tensor:
    """x (B, 1, H, W) uint8 or float in [0, 1] -> deskew_batch's result as uint8: how a data set is deskewed
    (runs.deskewed) and how an ensemble's deskewed member reads plain input (ensemble.Deskewed)."""
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    return deskew_batch(x).mul(255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline.


def preprocess(image: Any, cfg: PreprocessConfig | None = None) -> Preprocessed:
    """Any image source (see load_image) -> Preprocessed: an MNIST-like (1, size, size) tensor plus a record.

    Unreadable input raises DataError; an image without a digit is not an error but `rejected` ("empty": no
    contrast, "no-ink": nothing left after dropping specks and shadows) with a zero tensor.
    """
    cfg = cfg or PreprocessConfig()
    gray, info = _load(image, cfg.max_side)
    gray, enlarged = _enlarge_tiny(gray)
    h, w = gray.shape
    work_scale = w / info["width"] if "width" in info else 1.0
    ink, mask, comps, record = _ink(gray, cfg)
    if enlarged > 1:
        record["enlarged"] = {"factor": enlarged, "why": f"the image is under {_TINY_SIDE} px a side: its noise, "
                              "background and specks are judged on a smooth enlargement"}  # fmt: skip
    record = {"input": info, "work_size": [w, h], **record}
    zeros = torch.zeros(1, cfg.size, cfg.size)
    if record["rejected"]:
        return Preprocessed(zeros, record["rejected"], _jsonable(record))

    selected = _select_digit(comps, record)
    inked = int(comps.area[selected].sum())
    if inked < max(cfg.min_ink_fraction * h * w, 4):
        record["rejected"] = "no-ink"
        record["why"] = (f"{inked} ink pixels, fewer than min_ink_fraction {cfg.min_ink_fraction} of the image: "
                         "a dot or a smudge, not a digit")
        return Preprocessed(zeros, "no-ink", _jsonable(record))
    r = _union([comps.boxes[i] for i in np.flatnonzero(selected[1:])], 1, (h, w))
    sel = selected[comps.labels[r]]
    # The selected components and their soft edges (ink pixels in no component), nothing of the others.
    digit = np.where(sel | (grow(sel) & ~mask[r]), ink[r], 0.0)
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    digit = digit[y0:y1, x0:x1].astype(np.float32)
    y0, y1, x0, x1 = y0 + r[0].start, y1 + r[0].start, x0 + r[1].start, x1 + r[1].start
    record["ink_bbox"] = [round(v / work_scale) for v in (x0, y0, x1, y1)]  # in input pixels, x0 y0 x1 y1
    out, record["normalize"] = _normalize(digit, cfg)
    if cfg.deskew:
        out, alpha = deskew(out)
        record["deskew"] = {"shear": round(alpha, 4), "degrees": round(math.degrees(math.atan(alpha)), 2)}
    return Preprocessed(torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(0), None, _jsonable(record))


def _select_digit(comps: _Components, record: dict[str, Any]) -> np.ndarray:
    """Lookup over labels: the largest component plus every part near it or big (a broken 5, a dotted stroke);
    small marks far away (a stray dot, a note in the margin) are left out."""
    area, boxes = comps.area, comps.boxes
    selected = np.zeros(len(area), bool)
    present = [int(i) for i in np.flatnonzero(area[1:]) + 1]
    main = max(present, key=lambda i: area[i])
    selected[main] = True
    sy, sx = boxes[main - 1]
    y0, y1, x0, x1 = sy.start, sy.stop, sx.start, sx.stop
    changed = True
    while changed:
        changed = False
        reach = _STRAY_GAP * max(y1 - y0, x1 - x0)
        for i in present:
            if selected[i]:
                continue
            sy, sx = boxes[i - 1]
            gap = max(y0 - sy.stop, sy.start - y1, x0 - sx.stop, sx.start - x1, 0)
            if gap <= reach or area[i] >= 0.25 * area[main]:
                selected[i] = True
                y0, y1, x0, x1 = min(y0, sy.start), max(y1, sy.stop), min(x0, sx.start), max(x1, sx.stop)
                changed = True
    record["components"]["stray"] = int(len(present) - selected.sum())
    return selected


def preprocess_batch(images: list[Any], cfg: PreprocessConfig | None = None) -> tuple[torch.Tensor,
                                                                                      list[Preprocessed]]:
    """Several sources -> (x (B, 1, size, size), results); rejected images are zero rows (check `rejected`)."""
    cfg = cfg or PreprocessConfig()
    results = [preprocess(image, cfg) for image in images]
    if not results:
        return torch.zeros(0, 1, cfg.size, cfg.size), results
    return torch.stack([r.tensor for r in results]), results


def _jsonable(value: Any) -> Any:
    """Plain Python types only (numpy scalars become int/float), so the record goes straight to JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
