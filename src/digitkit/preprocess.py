"""Real-world image -> 28x28 MNIST-like tensor: the ONE preprocessing that the CLI, the API, the web page and the
exported model share.

A model with 99% on MNIST gets far less on photos, scans and canvases because they look nothing like MNIST. This
module makes them look like it, the way MNIST itself was made (LeCun et al.: "normalized to fit in a 20x20 pixel
box while preserving their aspect ratio ... centered in a 28x28 image by computing the center of mass"):

1. decode anything PIL reads (EXIF orientation applied, alpha handled, huge images shrunk) -> gray in [0, 1];
2. survey (`_survey`, the one place that decides what the image is): which way the ink goes, whether there is
   lighting to remove, and the kind, record["input_kind"] (INPUT_KINDS: clean, canvas, scan, photo). Where the
   evidence is split, the other readings are made too and offered as `candidates` for the model to choose;
3. background: a photo's local paper level (the grey opening of a block-averaged copy: strokes are narrower
   than its window, gradients, vignettes and shadows crossing the page wider) is divided out; flat paper keeps
   one level, so a clean grey digit keeps its grey levels exactly;
4. threshold (Otsu with hysteresis) -> ink mask, which only picks the ink: drop specks and (in photos) border
   shadows, keep the most inked component and its parts; the output takes the ink's own grey levels, with the
   whole soft edge on flat paper;
5. crop, thicken strokes that would come out thinner than MNIST's, fit into a 20x20 box keeping the aspect
   ratio (softening two-level input such as a fax), and place in 28x28 with the centre of mass at the centre;
   optionally deskew by moments.

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

def _q(a: np.ndarray, *percents: float) -> Any:
    """np.percentile(a, percents) (linear interpolation) from one partition of the flattened array, without
    np.percentile's per-call overhead, which dominated the time for small images. One percent -> a float."""
    v = np.asarray(a).ravel()
    n = v.size
    if n == 0:
        raise ValueError("quantile of an empty array")
    pos = [min(max(q, 0.0), 100.0) / 100.0 * (n - 1) for q in percents]
    kth = sorted({min(int(p) + d, n - 1) for p in pos for d in (0, 1)})
    part = np.partition(v, kth)
    out = []
    for p in pos:
        i = int(p)
        lo, hi = float(part[i]), float(part[min(i + 1, n - 1)])
        out.append(lo + (hi - lo) * (p - i))
    return out[0] if len(out) == 1 else out


POLARITIES = ("auto", "dark-on-light", "light-on-dark")
THRESHOLDS = ("otsu", "adaptive", "none")
CENTERS = ("mass", "box")
INPUT_KINDS = ("clean", "canvas", "scan", "photo", "mnist")
"""What `preprocess` decides an image is (record["input_kind"]): clean (a grey digit on a flat, noise-free
background: kept as it is, no lighting removed), canvas (strokes drawn on a transparent or one-colour canvas),
scan (flat paper: noisy, two-level like a fax, or a thick digit cut tight), photo (uneven lighting, shadows,
texture: the local paper level is divided out and shadows along the border are dropped) or mnist (already in
MNIST's format: the fast path, `mnist_format`, with record["fast_path"] true; the survey never says mnist)."""
FORMATS = "PNG, JPEG, BMP, TIFF, WebP or GIF"
MAX_PIXELS = 64_000_000
"""Images with more pixels are refused before decoding (a 48 MP phone photo is 48.8 M; PIL's own bomb warning
starts at 89 M). Anything smaller but larger than `max_side` is decoded at reduced size (JPEG draft) and shrunk."""

# MNIST stroke width (see the module docstring): strokes that would come out thinner than its 5th percentile are
# thickened to its median, so a thin pen on a big photo does not become a faint hairline once shrunk 50x.
MNIST_THIN_STROKE_PX = 1.3
MNIST_STROKE_PX = 2.0
_NOISE_RATIO = 4.0  # "empty" when the ink is not this many noise standard deviations above the background
_SURVEY_SIDE = 64  # the lighting is read on a block-averaged copy this size: ink blurs, lighting does not
_OPEN_FRACTION = 0.25  # the paper level is the grey opening over this share of that copy's shorter side
_FLAT_RANGE = 0.05  # paper whose level varies less than this (of the room for ink) has no lighting to remove
_FLAT_PAPER = 0.045  # ... and paper whose lightest 5% is within this of its usual level is flat, whatever the ink
_SURE_SHARE = 0.7  # the polarity is sure when its background covers at least this share of the image
_SURE_BORDER = 0.9  # ... and this share of its border
_PAPER_LIGHT = 0.6  # a level this light may be paper
_DARK_GROUND = 0.35  # a median gray below this is a dark ground (board, screen): light ink on it is expected
_SOLID_EDGE = 0.3  # what the opening keeps is surely ink, not lighting, when its edges are this sharp (share of
_SOLID_DEPTH = 0.8  # its range per block-averaged pixel), it is this dark (share of the ink's) and off the border
_CLEAN_NOISE = 0.01  # flat images with less pixel noise than this are "clean": read as they are
_SAMPLE_PIXELS = 8192  # global statistics (noise, Otsu) are read from a regular sample of about this many pixels
_SOFTEN_PX = 0.6  # two-level input (fax, 1-bit scan) is blurred this much at 28x28: MNIST's edges are soft
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity
_POLARITY_SIDE = 256  # polarity statistics on a block-averaged copy: averages out pixel noise and salt/pepper
_THICKEN_BELOW_SCALE = 0.75  # only digits shrunk this much get thickened: MNIST-sized input stays as it is
_FLAT_RETRY_SIDE = 256  # images up to this size a side may be tight crops, whose uneven "lighting" is the digit
_TINY_SIDE = 24  # images with a shorter side are enlarged before the ink is looked for (28x28 MNIST input is not)
_STRAY_GAP = 0.3  # a small component further than this x the digit's size from it is a stray mark, not a part
_PART_MIN = 0.04  # ... and one with less ink than this share of the digit's is a speck (toner, dust) even nearby


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
    """Where the survey finds uneven lighting (a photo), divide out the local paper level: removes gradients,
    vignettes, shadows and paper tone. Off, or on flat paper: the background is one constant level."""
    min_speck_area_fraction: float = 0.02
    """Ink components with less ink than this fraction of the most inked one are specks (dust, paper grain,
    noise); ink is counted as how far the pixels rise above the threshold, so faint texture weighs little."""
    ignore_border_components: bool = True
    """Drop components that touch the image border and look like shadows or page edges: in photos, solid ones
    running along half a side or more; on flat paper, thin strips lining a side. A digit that merely touches the
    border of a tight crop is kept."""
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
    rejected), `rejected` None or the reason ("empty", "no-ink"), and a JSON-serializable `record` of each step
    (record["input_kind"]: one of INPUT_KINDS).

    `candidates`: empty when the reading is sure. When the evidence is split (the polarity, or whether the
    uneven background of a small image is lighting or a thick digit), the few readings worth trying, as
    (name, (1, size, size) tensor), the first being `tensor` itself: a recognizer runs them as one batch and
    keeps the one its model is most sure of."""

    tensor: torch.Tensor
    rejected: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    candidates: list[tuple[str, torch.Tensor]] = field(default_factory=list)


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
            if own and img.format == "JPEG":
                # Decode straight to gray (libjpeg keeps the luma, exactly what convert("L") computes: 2.5x faster)
                # and, for a big photo, at 1/2, 1/4 or 1/8 scale from the DCT: a 12 MP photo in a few ms.
                big = bool(max_side) and max(img.size) > 2 * max_side
                img.draft("L" if img.mode in ("RGB", "YCbCr") else img.mode,
                          (max_side, max_side) if big else img.size)  # fmt: skip
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
    target = "LA" if mode in ("RGBA", "RGBa", "LA", "La", "PA") else "L"
    if mode != target:  # (converting to its own mode would only copy it: a JPEG is decoded straight to L)
        img = img.convert(target)
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BOX)
    a = np.divide(np.asarray(img), np.float32(255.0), dtype=np.float32)  # the same float32 division, in one pass
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


def ink_candidates(gray: np.ndarray, cfg: PreprocessConfig | None = None
                   ) -> list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:  # fmt: skip
    """ink_image's reading first, then each other reading the survey was unsure between (as `preprocess` offers
    them as candidates): [(name, ink, mask, record)]. A reader that can score its input (the row reader's string
    probability) lets that choose, as the classifier's confidence chooses among preprocess's candidates."""
    cfg = cfg or PreprocessConfig()
    gray = np.asarray(gray, dtype=np.float32)
    survey = _survey(gray, cfg)
    out = []
    for reading in [survey.reading, *(r for _, r in survey.alternatives)]:
        ink, mask, _, record = _ink(gray, cfg, survey, reading)
        out.append((_reading_name(reading), ink, mask, record))
    return out


@dataclass
class _Components:
    labels: np.ndarray  # (H, W) int32: the kept components' labels (their soft edges included), 0 elsewhere
    area: np.ndarray  # thresholded pixels per label (0 for dropped ones)
    boxes: list[Any]  # ndimage.find_objects slices per label, soft edges included
    mass: np.ndarray  # how far each label's clearly inked pixels rise above the threshold, summed: how much ink


@dataclass
class _Reading:
    """One way to read an image: which way the ink goes and what the background is."""

    light_background: bool
    local: bool  # the background is the local paper level (lighting removed), else one constant level


@dataclass
class _Survey:
    """What the image is (`kind`, one of INPUT_KINDS), the reading to use, and the other readings worth trying
    when the evidence is split (at most two, named)."""

    kind: str
    reading: _Reading
    polarity: dict[str, Any]
    record: dict[str, Any]
    z: np.ndarray  # the gray image block-averaged to about _SURVEY_SIDE px
    factor: int  # z's block size in pixels
    alternatives: list[tuple[str, _Reading]] = field(default_factory=list)
    levels: dict[bool, np.ndarray] = field(default_factory=dict)  # paper levels already found, by polarity
    flat_levels: dict[bool, float] = field(default_factory=dict)


def _ink(gray: np.ndarray, cfg: PreprocessConfig, survey: _Survey | None = None,
         reading: _Reading | None = None) -> tuple[np.ndarray, np.ndarray, _Components, dict[str, Any]]:  # fmt: skip
    """Like ink_image, plus the kept components: the image surveyed (or `survey` given), then read its way."""
    survey = survey or _survey(gray, cfg)
    out = _read(gray, cfg, survey, reading or survey.reading)
    out[3].update(input_kind=survey.kind, polarity=survey.polarity, survey=survey.record)
    return out


def _survey(gray: np.ndarray, cfg: PreprocessConfig, alpha: str = "") -> _Survey:
    """Decide what the image is, once, from block-averaged copies: the one place that does.

    - polarity: the ink is the extreme further from the median gray (dark pen on paper, chalk on a board), and
      the border is background (a crop's border is paper except where strokes end). When the two disagree the
      border wins on flat paper (a thick digit cut tight covers more than half its crop), the median in a photo
      (a shadow along the border is darker than the paper). Light ink is then only believed on a ground that is
      a clear majority of a flat image and of its border (MNIST, a board), or dark: a thick digit filling its
      crop, or a page mostly in shadow, is dark ink. When the evidence is split the other polarity is an
      alternative;
    - lighting: the paper level under the ink is the grey opening of the ink-positive copy (strokes are narrower
      than the window, shadows and gradients wider), which follows a shadow's edge across the page as well as a
      gradient. Paper whose level varies less than _FLAT_RANGE has no lighting to remove. What the opening keeps
      may also be ink too wide for the window (a thick digit cut tight, a filled blob): then the paper itself is
      flat (its lightest part is within _FLAT_PAPER of its usual level) and the image is small, or the kept part
      is sharp-edged, as dark as the ink and clear of the border, which a shadow is not; it is read flat, with
      the photo reading as an alternative unless that is sure;
    - kind (INPUT_KINDS): canvas (the alpha channel is the ink, or a digital background of one exact value),
      clean (flat, noise-free: grey levels kept), scan (flat paper: noisy, two-level, or solid ink), photo.
    """
    small, z, factor = _survey_copies(gray)
    med, lo, hi = _q(small, 50), float(small.min()), float(small.max())
    ring = np.concatenate([z[0], z[-1], z[1:-1, 0], z[1:-1, -1]])
    by_median = med - lo > hi - med
    border = _q(ring, 50)
    by_border = border > (lo + hi) / 2
    polarity: dict[str, Any] = {"median": round(med, 4), "darkest": round(lo, 4), "lightest": round(hi, 4),
                                "border": round(border, 4)}  # fmt: skip
    k = max(3, round(_OPEN_FRACTION * min(z.shape)))
    small_image = max(gray.shape) <= _FLAT_RETRY_SIDE
    levels: dict[bool, np.ndarray] = {}  # per polarity: the local paper level (grey opening of the copy)
    flat_levels: dict[bool, float] = {}  # ... and the flat paper level (median of the paper class)

    def lighting(light: bool) -> dict[str, Any]:
        x = 1.0 - z if light else z
        b = _paper_level(x, k)
        levels[light] = b
        b2, b98 = _q(b, 2, 98)
        room = max(1.0 - float(b2), 0.1)
        spread = float(b98 - b2) / room
        # The paper's own spread: how much lighter than its usual level (the histogram's mode) the lightest paper
        # is. Soft stroke edges are all on the ink side of the mode, lighting spreads it both ways.
        mode = _mode(x)
        paper_spread = max(mode - _q(x, 5), 0.0) / room
        flat_levels[light] = mode
        solid = sure = False
        if spread > _FLAT_RANGE and paper_spread <= _FLAT_PAPER:
            # Sure it is ink: as dark as the darkest ink, sharp-edged (the kept part's steepest edges; a small
            # image's are blurred by its upscaling) and clear of the border, which a shadow always reaches.
            if min(b.shape) >= 2:
                gy, gx = np.gradient(b)
                edge = _q(np.hypot(gx, gy), 99.5) / max(b98 - b2, 1e-3)
            else:  # a copy one pixel thin (a 1xN image read as a row): no edges to measure
                edge = 0.0
            depth = (b98 - b2) / max(_q(x, 99.9) - b2, 1e-3)
            rim = np.concatenate([b[0], b[-1], b[1:-1, 0], b[1:-1, -1]])
            touches = float(np.mean(rim > b2 + 0.5 * (b98 - b2)))
            sure = depth >= _SOLID_DEPTH and touches <= 0.05 and (edge >= _SOLID_EDGE or small_image)
            solid = sure or small_image
        return {"lighting_range": round(spread, 4), "paper_spread": round(paper_spread, 4), "solid_ink": solid,
                "solid_sure": sure, "flat": spread <= _FLAT_RANGE or solid}  # fmt: skip

    if cfg.polarity != "auto":
        light, why = cfg.polarity == "dark-on-light", "set in the config"
        seen = lighting(light)
    elif by_median == by_border:
        light, why = by_median, "the median and the border agree"
        seen = lighting(light)
    else:
        seen = lighting(by_border)
        if seen["flat"]:
            light, why = by_border, "the border is the background (flat paper: the digit may fill its crop)"
        else:
            light, why = by_median, "the median (uneven lighting: the border may be in shadow)"
            seen = lighting(by_median)
    unsure = cfg.polarity == "auto" and by_median != by_border
    # The background's share of the image: far more than half on a page or a board; about half or less when a
    # thick digit is cut tight, and then dark ink on light paper is the likelier reading.
    # The background's share of the image and (on flat paper) of its border: nearly all of both on a page, a
    # board or MNIST; much less when a thick digit is cut tight, and then dark ink on light paper is likelier.
    split = (lo + hi) / 2
    share = float(np.mean(small > split)) if light else float(np.mean(small < split))
    ring_share = float(np.mean(ring > split)) if light else float(np.mean(ring < split))
    polarity.update(background_share=round(share, 3), border_share=round(ring_share, 3))
    # (In a photo a shadow takes a share of the paper to the dark side: there the two rules above decide.)
    clear = not seen["flat"] or (share >= _SURE_SHARE and ring_share >= _SURE_BORDER)
    if cfg.polarity == "auto" and not light and ((not clear and hi >= _PAPER_LIGHT) or
                                                 (med >= _DARK_GROUND and not seen["flat"])):  # fmt: skip
        # Light ink on a ground that is no clear majority while a paper-light level is there, or on a ground
        # neither dark (a board, a screen) nor flat: far more likely dark ink filling its crop, or a page whose
        # larger part is in shadow.
        light, unsure = True, True
        why = "dark ink filling its crop or paper in shadow, more likely than light ink on this ground"
        seen = lighting(True)
    elif cfg.polarity == "auto" and not clear:
        unsure = True
    polarity.update(decided="dark-on-light" if light else "light-on-dark", why=why)
    record: dict[str, Any] = dict(seen)
    flat = seen["flat"] or not cfg.remove_lighting
    if alpha.startswith("alpha is the ink"):
        kind, flat = "canvas", True
    elif flat:
        # Digital (a canvas or a rendering): most of the background is one exact value, noise-free.
        q = np.round(small * 255).astype(np.uint8).ravel()
        counts = np.bincount(q, minlength=256)
        exact = counts.max() / q.size
        if np.sort(counts)[-2:].sum() / q.size >= 0.995 and exact < 0.99:
            kind, record["two_level"] = "scan", True  # two levels only: a fax, a 1-bit scan
        elif seen["solid_ink"]:
            kind = "scan"
        elif exact >= 0.5 and max(gray.shape) >= 64:
            kind = "canvas"
        else:
            record["pixel_noise"] = round(_pixel_noise(gray), 4)
            kind = "clean" if record["pixel_noise"] <= _CLEAN_NOISE else "scan"
    else:
        kind = "photo"
    reading = _Reading(light, not flat)
    alternatives: list[tuple[str, _Reading]] = []
    if unsure:
        alternatives.append(("polarity", _Reading(not light, reading.local)))
    if seen["solid_ink"] and not seen["solid_sure"] and cfg.remove_lighting:
        alternatives.append(("lighting or solid ink", _Reading(light, True)))
    record["why"] = {"canvas": "the alpha channel or one exact background value: drawn, not photographed",
                     "clean": "flat, noise-free background: grey levels kept as they are",
                     "scan": "flat paper: noisy, two-level, or ink too wide to be lighting",
                     "photo": "uneven lighting: the local paper level is divided out"}[kind]  # fmt: skip
    return _Survey(kind, reading, polarity, record, z, factor, alternatives, levels, flat_levels)


def _mode(a: np.ndarray) -> float:
    """The most common value of `a` (in [0, 1], 1/255 bins, lightly smoothed): the paper's level, which soft ink
    edges, however many, do not move the way they move a median."""
    q = np.clip(np.multiply(a, 255, dtype=np.float32), 0, 255).astype(np.uint8).ravel()
    counts = np.bincount(q, minlength=256).astype(np.float32)
    smooth = 2 * counts
    smooth[1:] += counts[:-1]
    smooth[:-1] += counts[1:]
    return (int(np.argmax(smooth)) + 0.5) / 255.0


def _paper_noise(sample: np.ndarray) -> tuple[float, float]:
    """(level, noise sigma) of flat paper from a sample of the ink-positive image: its mode, and the spread of the
    values below it (half-normal), where no ink is: ink only ever adds."""
    mode = _mode(np.clip(sample, 0.0, 1.0))
    near = sample[np.abs(sample - mode) <= 1.5 / 255.0]
    level = float(near.mean()) if near.size else mode  # the mode's own values: exactly 0 on MNIST's black
    below = level - sample[sample < level - 0.5 / 255.0]
    # No value below the paper at all: a digital image, noise-free (MNIST, a canvas); every rise is ink.
    return level, 1.4826 * _q(below, 50) if below.size >= 16 else 0.0


def _survey_copies(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(copy block-averaged to about _POLARITY_SIDE, to about _SURVEY_SIDE, the second's block size)."""
    small = _block_mean(gray, _POLARITY_SIDE)
    z = _block_mean(small, _SURVEY_SIDE)
    return small, z, _block_size(gray.shape, _POLARITY_SIDE) * _block_size(small.shape, _SURVEY_SIDE)


def _pixel_noise(a: np.ndarray) -> float:
    """Pixel noise: the median absolute difference of horizontal neighbours (strokes barely move it), as a
    standard deviation."""
    rows = a[:: max(1, a.shape[0] // 128)]
    if rows.shape[1] < 2:
        return 0.0
    return 1.4826 * _q(np.abs(rows[:, 1:] - rows[:, :-1]), 50) / math.sqrt(2)


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


def _read(gray: np.ndarray, cfg: PreprocessConfig, survey: _Survey, reading: _Reading
          ) -> tuple[np.ndarray, np.ndarray, _Components, dict[str, Any]]:  # fmt: skip
    h, w = gray.shape
    record: dict[str, Any] = {"rejected": None}
    light = reading.light_background
    photo = reading.local  # a photo's reading: texture, shadows along the border, soft edges only next to the ink
    # The ink-positive image x (1 - gray for dark ink) relative to its background b: f = (x - b) / (1 - b). For pen
    # on paper this is 1 - I / B, the ink's reflectance relative to the local paper, which makes a shadowed stroke
    # as black as a lit one; for light-on-dark it is the rise above the local background. Written f = A + B gray,
    # with A and B made where b is and brought to full size: for pen on paper B is minus the paper's inverse, whose
    # interpolation follows a shadow's edge more closely (on blank shadowed photos) than the paper level's does.
    b, record["lighting"] = _background(survey, light, reading.local)
    # The room for ink is never taken below half the typical paper's: a shadow (at most about half as bright) is
    # divided out in full, while darker ground (a table around the page, the lit side of a board read light-on-
    # dark) is not magnified 5-10x, with the slightest error of the fit at its edge.
    room = np.maximum(1.0 - b, max(0.5 * (1.0 - _q(b, 50)), 0.1) if np.ndim(b) else 0.1)
    inv = 1.0 / room
    scale_a, scale_b = ((1.0 - b) * inv, -inv) if light else (-b * inv, inv)
    if np.ndim(b):
        # Made in place in B's full-size copy (a new array): B gray, then + A.
        f = _upsample(scale_b, h, w)
        f *= gray
        # Pen on paper with no ground darker than the limit: A is exactly 1 everywhere, no need to bring it over.
        unclamped = light and bool(np.all(room == 1.0 - b))
        f += np.float32(1.0) if unclamped else _upsample(scale_a, h, w)
    else:
        f = np.multiply(gray, scale_b, dtype=np.float32)
        f += np.float32(scale_a)

    step = max(1, math.ceil(math.sqrt(h * w / _SAMPLE_PIXELS)))  # global statistics from a regular sample
    sample = f[::step, ::step]
    if reading.local:
        med, sigma, record["noise"] = _background_level(f, sample)
    else:  # flat paper: its level and noise are the paper's own, whatever share of the image the digit covers
        med, sigma = _paper_noise(sample)
        record["noise"] = {"level": round(med, 4), "from": "paper mode"}
    # In a photo the paper's texture sits above the opening, and a small digit is a few hundred of its pixels:
    # Otsu's split and the pixels above it are texture. The strokes' level is then the brightest block of a
    # block-averaged copy (pixel noise averages out there, a stroke does not).
    level = float(_block_mean(f, _POLARITY_SIDE).max()) if photo else 0.0
    t, t_low = _thresholds(f, sample, med, sigma, cfg, level)
    strong = f > t
    contrast = _q(f[strong], 90) - med if strong.any() else 0.0
    record["threshold"] = {"method": cfg.threshold, "value": round(_q(t, 50) if np.ndim(t) else float(t), 4),
                           "low": round(t_low, 4), "noise_sigma": round(sigma, 4), "contrast": round(contrast, 4)}
    empty = np.zeros((h, w), np.float32), np.zeros((h, w), bool), _Components(np.zeros((h, w), np.int32),
                                                                                 np.zeros(1, np.int64), [], np.zeros(1))
    if contrast < cfg.blank_contrast or contrast < _NOISE_RATIO * sigma:
        record["rejected"] = "empty"
        record["why"] = (f"the darkest marks differ from the background by {contrast:.3f}, below blank_contrast "
                         f"{cfg.blank_contrast}: a blank page" if contrast < cfg.blank_contrast else
                         f"the darkest marks ({contrast:.3f} above the background) are within {_NOISE_RATIO:g}x the "
                         f"noise level ({sigma:.3f}): noise, not ink")
        return *empty, record

    # Hysteresis: faint parts of a stroke (weak) count when they touch a clearly inked pixel (strong).
    labels, n, region = _label(f > t_low)
    keep, area, boxes, mass = _keep_components(labels, n, strong, f, t, cfg, record, photo=photo, region=region)
    if not keep.any():
        record["rejected"] = "no-ink"
        record["why"] = "every ink component was a speck or a border shadow"
        return *empty, record
    # (Half a grey level above noise-free paper, so that float rounding never makes the whole page soft ink.)
    floor = max(med + max(2.0 * sigma, 0.5 / 255.0), 0.0)
    if photo:
        # The soft edge: pixels next to the kept ink that rise above the noise (texture would leak further).
        r = _union([boxes[i - 1] for i in np.flatnonzero(keep)], 1, (h, w))
        lab = np.where(keep[labels[r]], labels[r], 0).astype(np.int32)
        m = lab > 0
        soft = m | (grow(m) & (f[r] > floor))
    else:
        # Flat paper: the strokes' whole soft edge down to the noise floor, however blurred (a low-dpi scan
        # enlarged with smoothing ramps over many pixels), as long as it is connected to kept ink.
        r = (slice(0, h), slice(0, w))
        lab = np.where(keep[labels], labels, 0).astype(np.int32)
        m = lab > 0
        soft = m | (f > floor)
    fr = f[r]
    # Each soft pixel takes the label of the kept ink it is connected to; soft areas touching no kept ink go.
    around, n_around = _ndimage().label(soft, structure=_EIGHT)
    owner = np.zeros(n_around + 1, np.int32)
    owner[around[m]] = lab[m]
    lab = np.where(m, lab, owner[around])
    inked = m & (fr > t if np.ndim(t) == 0 else fr > t[r])
    peak = _q(fr[inked], 90) if inked.any() else float(fr[m].max())
    ink = np.zeros((h, w), np.float32)
    ink[r] = np.where(lab > 0, np.clip((fr - floor) / max(peak - floor, 1e-3), 0.0, 1.0), 0.0)
    mask = np.zeros((h, w), bool)
    mask[r] = m
    full = np.zeros((h, w), np.int32)
    full[r] = lab
    y0, x0 = r[0].start, r[1].start
    found = _ndimage().find_objects(lab, max_label=n)  # the kept labels' boxes, soft edges included
    boxes = [(slice(fb[0].start + y0, fb[0].stop + y0), slice(fb[1].start + x0, fb[1].stop + x0))
             if fb is not None else ob for fb, ob in zip(found, boxes, strict=True)]
    record["ink"] = {"floor": round(floor, 4), "peak": round(peak, 4)}
    return ink, mask, _Components(full, np.where(keep, area, 0), boxes, np.where(keep, mass, 0.0)), record


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
    p16, med = _q(sample, 15.87, 50)
    sigma = max(med - p16, 0.0)
    if max(f.shape) > _FLAT_RETRY_SIDE:  # a photo or a page: its texture and shading would pass for a covering digit
        return med, sigma, {"level": round(med, 4), "from": "median"}
    rows = f[:: max(1, f.shape[0] // 256)]
    diffs = np.abs(rows[:, 1:] - rows[:, :-1]) if rows.shape[1] > 1 else np.zeros(1, np.float32)
    pixel_noise = 1.4826 * _q(diffs, 50) / math.sqrt(2)
    if sigma <= 3.0 * pixel_noise + 0.02:
        return med, sigma, {"level": round(med, 4), "from": "median"}
    background = sample[sample <= _otsu(sample)]
    # Texture and shading also spread the lower half of a photo; what marks a digit covering the image is that the
    # upper class (the ink, its halo) is a large share of it: a quarter or more, where a digit on a page is a few %.
    if not 0.1 * sample.size <= background.size <= 0.75 * sample.size:
        return med, sigma, {"level": round(med, 4), "from": "median"}
    p16, level = _q(background, 15.87, 50)
    spread = max(level - p16, pixel_noise)
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


def _block_size(shape: tuple[int, ...], side: int) -> int:
    """The block _block_mean averages over for an image of `shape` (1: the image is used as it is)."""
    h, w = shape
    k = max(1, math.ceil(max(h, w) / side))
    return 1 if k == 1 or h // k == 0 or w // k == 0 else k


def _block_mean(a: np.ndarray, side: int) -> np.ndarray:
    h, w = a.shape
    k = _block_size(a.shape, side)
    if k == 1:
        return a
    hh, ww = h // k * k, w // k * k
    # Sums of k strided row slices, then of k column slices: 2k - 2 additions of shrinking arrays, 10-20x faster
    # than summing the 4-d view (a reduction over a short inner axis).
    c = a[:hh, :ww]
    rows = c[0::k]
    for i in range(1, k):
        rows = rows + c[i::k]
    out = rows[:, 0::k]
    for j in range(1, k):
        out = out + rows[:, j::k]
    return out * np.float32(1.0 / (k * k))


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """A small (zh, zw) array brought to (h, w) by bilinear interpolation between pixel centres, clamped at the
    edges as PIL's resize does (to float rounding), done separably with gathers: 3x faster than PIL on a float
    image, and no BLAS call (whose threads would fight a training job for the cores). Returns a new array (or `a`
    itself when it is already (h, w))."""
    a = np.asarray(a, np.float32)
    if a.shape == (h, w):
        return a
    # Columns first, on the few rows of the small array; then whole rows, which gather as contiguous copies.
    lo, frac = _interpolation(w, a.shape[1])
    cols = _lerp(a, lo, frac, 1)
    lo, frac = _interpolation(h, a.shape[0])
    return _lerp(cols, lo, frac[:, None], 0)


def _lerp(a: np.ndarray, lo: np.ndarray, frac: np.ndarray, axis: int) -> np.ndarray:
    """a[lo] + (a[hi] - a[lo]) * frac along `axis`, hi being lo's next sample (lo itself at the last): the
    differences are taken on the small array and gathered with np.take (several times faster than fancy indexing
    here), two full-size gathers instead of three, and every pixel gets the same float operations."""
    step = np.diff(a, axis=axis, append=np.take(a, [-1], axis=axis))  # the last sample's step: itself minus itself
    out = np.take(step, lo, axis=axis)
    out *= frac
    out += np.take(a, lo, axis=axis)
    return out


@functools.lru_cache(maxsize=64)
def _interpolation(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(lower index, weight of the next one) for linear interpolation from m samples to n, pixel centres aligned.
    Cached: a server sees the same few sizes again and again."""
    pos = np.clip((np.arange(n) + 0.5) * (m / n) - 0.5, 0, m - 1)
    lo = np.floor(pos).astype(np.intp)
    return lo, (pos - lo).astype(np.float32)


def _paper_level(z: np.ndarray, k: int) -> np.ndarray:
    """The grey opening of the ink-positive `z` over k x k: what is left once everything narrower than the
    window (the strokes) is shaved off. The image is first extended by point reflection, which continues a
    gradient or a vignette past the border (a flat or mirrored extension would bend it, and the paper level along
    the border would come out too low: a bright frame of false ink)."""
    pad = k // 2 + 1
    if min(z.shape) > pad:
        ext = _point_reflect(z, pad)
    else:
        ext = np.pad(z, pad, mode="reflect", reflect_type="odd") if min(z.shape) > 1 else np.pad(z, pad, mode="edge")
    # ndimage.grey_opening(ext, size=(k, k), mode="nearest") as the four 1-d passes it makes (the erosion's min
    # along each axis, then the dilation's max, whose origin is shifted by one for an even window), without the
    # cost of its wrappers, which is most of the time on an array this small.
    nd = _ndimage()
    origin = -1 if k % 2 == 0 else 0
    out = nd.minimum_filter1d(ext, k, 0, mode="nearest")
    nd.minimum_filter1d(out, k, 1, output=out, mode="nearest")
    nd.maximum_filter1d(out, k, 0, output=out, mode="nearest", origin=origin)
    nd.maximum_filter1d(out, k, 1, output=out, mode="nearest", origin=origin)
    return out[pad:-pad, pad:-pad]


def _point_reflect(z: np.ndarray, pad: int) -> np.ndarray:
    """np.pad(z, pad, mode="reflect", reflect_type="odd") for pad < min(z.shape): 2 x edge - mirror image, made
    directly (np.pad's general machinery costs more than the arithmetic on a copy this small). Rows first, then
    columns over the extended rows, as np.pad does, so the corners come out the same."""
    h, w = z.shape
    ext = np.empty((h + 2 * pad, w + 2 * pad), z.dtype)
    ext[pad:-pad, pad:-pad] = z
    ext[:pad, pad:-pad] = 2 * z[0] - z[pad:0:-1]
    ext[-pad:, pad:-pad] = 2 * z[-1] - z[-2 : -2 - pad : -1]
    ext[:, :pad] = 2 * ext[:, pad : pad + 1] - ext[:, 2 * pad : pad : -1]
    ext[:, -pad:] = 2 * ext[:, -pad - 1 : -pad] - ext[:, -pad - 2 : -2 * pad - 2 : -1]
    return ext


def _background(survey: _Survey, light: bool, local: bool) -> tuple[Any, dict[str, Any]]:
    """The background of the ink-positive image (1 - gray if `light`, else gray) from the survey's block-averaged
    copy (ink blurs there, lighting does not): the grey opening of the copy over a window wider than any stroke,
    at the copy's size (local), or one level, the median of the paper class (flat). The survey found them for the
    polarities it looked at."""
    z = 1.0 - survey.z if light else survey.z
    k = max(3, round(_OPEN_FRACTION * min(z.shape)))
    if not local:
        if light not in survey.flat_levels:
            paper = z[z <= _otsu(z)]
            survey.flat_levels[light] = _q(paper if paper.size else z, 50)
        level = float(np.clip(survey.flat_levels[light], 0.0, 0.95))
        return level, {"removed": False, "background": round(level, 4)}
    if light not in survey.levels:
        survey.levels[light] = _paper_level(z, k)
    low = np.clip(survey.levels[light], 0.0, 0.95)
    return low, {"removed": True, "background_min": round(float(low.min()), 4),
               "background_max": round(float(low.max()), 4), "window": k}


def _thresholds(f: np.ndarray, sample: np.ndarray, med: float, sigma: float, cfg: PreprocessConfig,
                ink_level: float = 0.0) -> tuple[Any, float]:  # fmt: skip
    """(strong threshold, weak threshold); the strong one is an array for the adaptive method. Otsu's split is a
    global statistic, read from `sample` (a regular subsample of `f`). `ink_level`: the strokes' level where it
    is known better than from the pixels above Otsu's threshold (photos)."""
    noise_floor = med + 3.0 * sigma
    if cfg.threshold == "none":
        t = max(noise_floor, med + 0.02)
        return t, t
    t_otsu = max(_otsu(sample), noise_floor, med + 0.02)
    # Otsu drifts low when the ink is a few percent of the image and the background has a tail (residual
    # lighting, texture): never below a third of the ink's level, the way a half-maximum cut would do.
    above = sample[sample > t_otsu]
    if above.size:
        t_otsu = max(t_otsu, med + (max(_q(above, 90), ink_level) - med) / 3)
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


def _label(mask: np.ndarray) -> tuple[np.ndarray, int, tuple[slice, slice] | None]:
    """ndimage.label (8-connected) of `mask`: (labels, count, a region holding every label, None for the whole
    image). Labelled on the bounding box of the mask's pixels only, often a small part of a photo (labelling,
    counting and boxing the labels cost ~5 ns a pixel): the labels are the same, since cutting away empty rows and
    columns changes neither the raster order in which components are met and numbered nor which pixels touch."""
    h, w = mask.shape
    # (Under about 128x128 the cut costs more than it saves.)
    rows = np.flatnonzero(mask.any(1)) if h * w > 16384 else []
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(0)) if len(rows) else []
    if len(rows) == 0 or (len(rows) == h and len(cols) == w):  # nothing to cut away
        labels, n = _ndimage().label(mask, structure=_EIGHT)
        return labels, n, None
    region = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    part, n = _ndimage().label(mask[region], structure=_EIGHT)
    labels = np.zeros((h, w), part.dtype)
    labels[region] = part
    return labels, n, region


def _keep_components(labels: np.ndarray, n: int, strong: np.ndarray, f: np.ndarray, threshold: Any,
                     cfg: PreprocessConfig, record: dict[str, Any], photo: bool = True,
                     region: tuple[slice, slice] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[Any], np.ndarray]:  # fmt: skip
    """(Boolean lookup over labels 0..n: which weak components are ink that counts, areas, boxes, ink masses).
    Border shadows are looked for in photos; on flat paper only strips lining a side (a page edge) are dropped,
    since there a component along the border is a digit cut tight. Specks are small in ink mass (how far their
    clearly inked pixels rise above the threshold, summed) next to the most inked component: paper texture and
    shadow remnants graze the threshold, strokes rise well above it. `region`: where all the labels are (areas
    and boxes are counted there; the rest is background)."""
    keep = np.zeros(n + 1, bool)
    comps = {"found": int(n), "without_strong_pixels": 0, "border_shadows": 0, "specks": 0}
    record["components"] = comps
    inside = labels[region] if region is not None else labels
    area = np.bincount(inside.ravel(), minlength=n + 1)
    if region is not None:
        area[0] += labels.size - inside.size
    if n == 0:
        return keep, area, [], np.zeros(1)
    boxes = _ndimage().find_objects(inside)
    y0, x0 = (region[0].start, region[1].start) if region is not None else (0, 0)
    if y0 or x0:
        boxes = [(slice(b[0].start + y0, b[0].stop + y0), slice(b[1].start + x0, b[1].stop + x0))
                 if b is not None else None for b in boxes]  # fmt: skip
    on = labels[strong]
    # Each clearly inked pixel weighs by how far it rises above the strong threshold: texture grazes it.
    mass = np.bincount(on, weights=f[strong] - float(np.min(threshold)), minlength=n + 1)
    has_strong = np.bincount(on, minlength=n + 1) > 0
    has_strong[0] = False
    keep[:] = has_strong
    comps["without_strong_pixels"] = int(n - has_strong[1:].sum())
    if cfg.ignore_border_components:
        shadows, spanning = _border_shadows(labels, n, area, boxes, np.flatnonzero(keep), photo)
        shadows &= keep
        if shadows.any() and not (keep & ~shadows).any():
            # Nothing else left. A digit in a tight crop can look like a shadow (a thick "1" is solid, a "7"'s
            # bar runs along the top), but a shadow band runs from corner to corner, touching both neighbouring
            # sides; a lone component that does not is the digit.
            shadows &= spanning
        keep &= ~shadows
        comps["border_shadows"] = int(shadows.sum())
    if keep.any():
        specks = keep & (mass < cfg.min_speck_area_fraction * mass[keep].max())
        keep &= ~specks
        comps["specks"] = int(specks.sum())
    comps["kept"] = int(keep.sum())
    return keep, area, boxes, mass


def _border_shadows(labels: np.ndarray, n: int, area: np.ndarray, boxes: list[Any],
                    candidates: np.ndarray, photo: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
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
        if photo:
            shadow[i] = lines_a_side or (along and area[i] >= 0.5 * bh * bw)
        else:  # a strip: lines a side, and thin across it
            shadow[i] = any(c[i] >= 0.9 * side and depth <= 0.1 * other for c, side, depth, other in
                            zip(contact, (w, w, h, h), (bh, bh, bw, bw), (h, h, w, w), strict=True))  # fmt: skip
        top, bottom, left, right = (bool(c[i]) for c in contact)
        spanning[i] = ((top or bottom) and left and right) or ((left or right) and top and bottom)
    return shadow, spanning


# ----------------------------------------------------------------------------------------------------------
# The digit: crop, thicken, fit into the box, centre.


def normalize_digit(ink_crop: np.ndarray, cfg: PreprocessConfig | None = None) -> np.ndarray:
    """A cropped digit (h, w) white-on-black in [0, 1] -> (size, size) float32, MNIST-style: longer side scaled to
    `box` keeping the aspect ratio, thin strokes thickened, centre of mass (or box centre) at the centre."""
    return _normalize(np.asarray(ink_crop, dtype=np.float32), cfg or PreprocessConfig())[0]


def _normalize(crop: np.ndarray, cfg: PreprocessConfig, soften: float = 0.0) -> tuple[np.ndarray, dict[str, Any]]:
    """`soften`: a Gaussian blur of this many output pixels, for two-level input (a fax, a 1-bit scan) whose hard,
    dithered edges MNIST's anti-aliased strokes never have."""
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
        # Work at 3x the box, where the dilation radius is a pixel or a few (2x cost 1.5 points on `huge`, 4x
        # read the same as 3x and is slower), then area-average down. The width measure reads diagonal strokes thin
        # (as it does on MNIST, where its median is 2.0), so the radius is corrected until the result measures
        # like MNIST's median.
        k = 3
        s = k * cfg.box / max(h, w)
        g = _resize(crop, max(1, round(w * s)), max(1, round(h * s)),
                    Image.Resampling.BOX if s < 1 else Image.Resampling.BICUBIC)
        g = np.clip(np.clip(g, 0, None) / max(_peak(g), 1e-6), 0, 1)
        # A dilation by r adds about 2r to a straight stroke but less to the measure on curves and diagonals:
        # starting at 1.6x the naive radius, one pass is enough for ~80% of digits (measured on photos).
        radius = 1.6 * (k * MNIST_STROKE_PX - width * s) / 2
        for _ in range(3):
            pad = math.ceil(radius) + 1
            digit = _to_box(_dilate_disk(np.pad(g, pad), pad, radius), cfg.box)
            achieved = stroke_width(digit >= 0.5)
            if achieved >= MNIST_STROKE_PX - 0.2:
                break
            radius += (MNIST_STROKE_PX - achieved) * k / 2
        rec["thickened_radius_px"] = round(radius / k, 3)
    rec["box_wh"] = [int(digit.shape[1]), int(digit.shape[0])]
    if soften > 0:
        pad = math.ceil(2 * soften)
        digit = _ndimage().gaussian_filter(np.pad(digit, pad), soften, mode="constant")
        # Back into the box: the blur's halo counts as ink, as MNIST's anti-aliased edge does.
        digit = _to_box(np.where(digit >= 0.3 * float(digit.max()), digit, 0.0).astype(np.float32), cfg.box)
        rec["softened_px"] = soften
    out, rec["center_shift"] = _place(digit, cfg)
    return out, rec


@functools.lru_cache(maxsize=64)
def _disk(pad: int, radius: float) -> np.ndarray:
    """A (2 pad + 1)^2 boolean disk footprint of `radius` (cached: the thickening asks for the same few)."""
    yy, xx = np.mgrid[-pad : pad + 1, -pad : pad + 1]
    return xx**2 + yy**2 <= radius**2


def _dilate_disk(a: np.ndarray, pad: int, radius: float) -> np.ndarray:
    """ndimage.grey_dilation(a, footprint=_disk(pad, radius)) for `a` >= 0 framed by `pad` zero rows and columns
    (beyond its border that reads 0 as well, as it does here): the max over the disk taken as the max over its
    rows, each a centred run: one maximum_filter1d along the rows per run length, then one np.maximum per row of
    the disk, shifted. The same values (a max is exact in any order), 1.5-10x faster than the 2-d filter (the
    larger the disk, the more)."""
    disk = _disk(pad, radius)
    half = disk.sum(1) // 2  # row pad + dy of the disk: columns -half..half
    runs: dict[int, np.ndarray] = {}
    for n in set(half[disk.any(1)].tolist()):
        runs[n] = _ndimage().maximum_filter1d(a, 2 * n + 1, axis=1, mode="constant") if n else a
    out = runs[int(half[pad])].copy()
    h = a.shape[0]  # (at least 2 pad + 1)
    for dy in range(1, min(pad, h - 1) + 1):
        for row in (pad + dy, pad - dy):  # out[y] takes the run at y + dy, then at y - dy
            if disk[row].any():
                run = runs[int(half[row])]
                if row > pad:
                    np.maximum(out[: h - dy], run[dy:], out=out[: h - dy])
                else:
                    np.maximum(out[dy:], run[: h - dy], out=out[dy:])
    return out


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
    return _q(a[a >= 0.5 * top], 90)


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels of a binary digit: 2 x area / edge transitions (a stroke of width w and length
    L has area wL and ~2L transitions across it). Diagonal strokes read ~20% thin; MNIST's median is 2.0 px."""
    m = np.asarray(mask, bool)
    # Edge transitions as if the mask were padded with background (its outer rows and columns count too).
    inner = np.count_nonzero(m[1:] != m[:-1]) + np.count_nonzero(m[:, 1:] != m[:, :-1])
    outer = np.count_nonzero(m[0]) + np.count_nonzero(m[-1]) + np.count_nonzero(m[:, 0]) + np.count_nonzero(m[:, -1])
    transitions = int(inner + outer)
    return 2.0 * float(np.count_nonzero(m)) / transitions if transitions else 0.0


def _place(digit: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, list[int]]:
    """Paste into size x size with an integer shift (no resampling blur) putting the centre of mass (or the box
    centre) at size/2 — where MNIST has it — clamped so the digit stays inside the frame."""
    bh, bw = digit.shape
    size = cfg.size
    total = float(digit.sum(dtype=np.float64))
    if cfg.center == "mass" and total > 0:  # in float64: the rounding below must not flip on float32 error
        cy = float(digit.sum(1, dtype=np.float64) @ np.arange(bh, dtype=np.float64)) / total
        cx = float(digit.sum(0, dtype=np.float64) @ np.arange(bw, dtype=np.float64)) / total
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
    # Moments from row and column sums (as deskew_batch): two passes over the pixels instead of six, in float64 so
    # that E[y^2] - E[y]^2 keeps its precision.
    rows, cols = a.sum(1, dtype=np.float64), a.sum(0, dtype=np.float64)
    total = float(rows.sum())
    if total <= 0:
        return a.copy(), 0.0
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    cy, cx = float(rows @ ys) / total, float(cols @ xs) / total
    mu02 = float(rows @ (ys * ys)) / total - cy * cy
    mu11 = float((a @ xs) @ ys) / total - cx * cy
    alpha = min(max(mu11 / mu02, -max_shear), max_shear) if mu02 > 1e-6 else 0.0
    # Output (r, c) samples the input at (r - h/2 + cy, c - w/2 + cx + alpha (r - h/2)).
    matrix = np.array([[1.0, 0.0], [alpha, 1.0]])
    offset = np.array([cy, cx]) - matrix @ np.array([h / 2, w / 2])
    out = _ndimage().affine_transform(a, matrix, offset=offset, order=1, mode="grid-constant", cval=0.0)
    return out.astype(np.float32), alpha


def deskew_batch(x: torch.Tensor, max_shear: float = 1.0) -> torch.Tensor:
    """x (B, 1, H, W) float -> the same, each image deskewed exactly like `deskew` (one grid_sample for all)."""
    return deskew_batch_shear(x, max_shear)[0]


def deskew_batch_shear(x: torch.Tensor, max_shear: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`deskew_batch`'s result and each image's shear alpha (B,), as `deskew` returns it."""
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
    return out, alpha


def deskew_uint8(x: torch.Tensor) -> torch.Tensor:
    """x (B, 1, H, W) uint8 or float in [0, 1] -> deskew_batch's result as uint8: how a data set is deskewed
    (runs.deskewed) and how an ensemble's deskewed member reads plain input (ensemble.Deskewed)."""
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    return deskew_batch(x).mul(255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline.


def preprocess(image: Any, cfg: PreprocessConfig | None = None, fast: bool = True) -> Preprocessed:
    """Any image source (see load_image) -> Preprocessed: an MNIST-like (1, size, size) tensor plus a record.

    Unreadable input raises DataError; an image without a digit is not an error but `rejected` ("empty": no
    contrast, "no-ink": nothing left after dropping specks and shadows) with a zero tensor. An image already in
    MNIST's format (`mnist_format`) takes the fast path unless `fast` is False: its strokes levelled and deskewed
    as the full path would, at a small share of the cost; record["input_kind"] is then "mnist" and
    record["fast_path"] true. Any other image is surveyed once (`_survey`: record["input_kind"]); when the survey is
    unsure, the other readings come as `candidates`.
    """
    result = preprocess_many([image], cfg, fast)[0]
    if isinstance(result, DataError):
        raise result
    return result


def _preprocess_decoded(gray: np.ndarray, info: dict[str, Any], cfg: PreprocessConfig) -> Preprocessed:
    """The full path from the decoded gray image."""
    gray, enlarged = _enlarge_tiny(gray)
    h, w = gray.shape
    work_scale = w / info["width"] if "width" in info else 1.0
    survey = _survey(gray, cfg, info.get("alpha", ""))
    tensor, record = _digit(gray, cfg, survey, survey.reading, work_scale)
    record = {"input": info, "work_size": [w, h], "input_kind": survey.kind, "polarity": survey.polarity,
              "survey": survey.record, **record}
    if enlarged > 1:
        record["enlarged"] = {"factor": enlarged, "why": f"the image is under {_TINY_SIDE} px a side: its noise, "
                              "background and specks are judged on a smooth enlargement"}  # fmt: skip
    if record["rejected"]:
        return Preprocessed(tensor, record["rejected"], _jsonable(record))
    candidates = [(_reading_name(survey.reading), tensor)]
    for _, reading in survey.alternatives:
        other, _ = _digit(gray, cfg, survey, reading, work_scale)
        # A reading that finds nothing, or the same digit, is no candidate.
        if other.any() and float((other - tensor).abs().max()) > 0.1:
            candidates.append((_reading_name(reading), other))
    if len(candidates) > 1:
        unsure = ", ".join(why for why, _ in survey.alternatives)
        record["candidates"] = {"names": [n for n, _ in candidates],
                                "why": f"unsure ({unsure}): the model's confidence chooses"}
    else:
        candidates = []
    return Preprocessed(tensor, None, _jsonable(record), candidates)


# ----------------------------------------------------------------------------------------------------------
# The fast path: input already in MNIST's format (a 28x28 test digit, what a client that has MNIST data sends).

_FAST_BACKGROUND = 0.55
"""The fast path's flat background: at least this share of the pixels exactly 0 (or exactly 1, the inverse). The
MNIST test digits have at least 60% of their pixels at exactly 0; noise, lighting or texture leave far fewer."""
_FAST_PEAK = 0.9
"""... and its strokes reach at least this level (MNIST's brightest pixel is 254 or 255 of 255)."""
_FAST_STROKE = 1 / 3
"""The stroke level is read from the pixels over this share of the brightest (the full path's Otsu threshold is
never below a third of the ink's level, and sits at 0.33-0.37 on MNIST)."""
_EIGHT_2D = np.zeros((3, 3, 3), bool)
_EIGHT_2D[1] = True  # 8-connectivity within each image of a (B, H, W) stack, none across images


@dataclass
class MnistFormat:
    """`mnist_format`'s verdict on a stack of images: per image whether it is in MNIST's format and, if so, the
    digit as the full path would make it before deskewing (white on black, strokes at 1), else why not."""

    ok: np.ndarray
    """(B,) bool."""
    why: list[str]
    """Per image: "" when ok, else the first condition it fails."""
    digits: np.ndarray
    """(B, H, W) float32: the digits of the images that are ok (the others' rows are meaningless)."""
    inverted: np.ndarray
    """(B,) bool: a dark digit on white, read inverted."""
    ink_bbox: np.ndarray
    """(B, 4) int: x0, y0, x1, y1 of the ink."""


def mnist_format(gray: np.ndarray, cfg: PreprocessConfig | None = None) -> MnistFormat:
    """Are decoded images, (H, W) or a stack (B, H, W) of gray in [0, 1], already in MNIST's format? A few array
    passes over the whole stack (a few microseconds an image in a batch), all of which must hold:
      - size x size pixels (cfg.size);
      - a flat, noise-free background: at least _FAST_BACKGROUND of the pixels exactly 0 (bright digit on black)
        or exactly 1 (the inverse, read inverted); noise, lighting, texture or a photo leave no such majority;
      - grey levels (anti-aliased edges), not two levels only (a fax, a binarized digit, which the full path
        softens), and strokes at full level (max >= _FAST_PEAK: a faint digit is stretched by the full path);
      - the ink is one 8-connected piece: nothing for the full path's speck, stray-mark and shadow rules to drop;
      - its longer side is exactly cfg.box and centring by mass would not move it: nothing to scale or shift.
    What the full path would then still do is level the strokes at 1 (which the fast path does the same way, from
    the same statistics up to how the threshold is found) and deskew. On the 10,000 MNIST test images 97% pass (the
    others have a speck, a broken stroke or a 19 px box) and the digits answered agree with the full path's
    (tests/test_serve_fast.py)."""
    cfg = cfg or PreprocessConfig()
    g = np.asarray(gray, np.float32)
    g = g[None] if g.ndim == 2 else g
    b = len(g)
    size = cfg.size
    why = [""] * b
    fail = np.zeros(b, bool)

    def reject(bad: np.ndarray, reason: str) -> None:
        if bad.any():  # (most calls find nothing: a server sees one MNIST-format image at a time)
            for i in np.flatnonzero(bad & ~fail):
                why[i] = reason
            fail[:] |= bad

    if g.ndim != 3 or g.shape[1:] != (size, size):
        shape = "x".join(str(v) for v in g.shape[1:])
        return MnistFormat(np.zeros(b, bool), [f"{shape} pixels, not {size}x{size}"] * b, g, np.zeros(b, bool),
                           np.zeros((b, 4), int))  # fmt: skip
    n = size * size
    flat = g.reshape(b, n)
    black = np.count_nonzero(flat == 0, axis=1) >= _FAST_BACKGROUND * n
    inverted = ~black & (np.count_nonzero(flat == 1, axis=1) >= _FAST_BACKGROUND * n)
    reject(~black & ~inverted, "no flat background: fewer than 55% of the pixels exactly black or white")
    x = np.where(inverted[:, None, None], 1.0 - g, g).astype(np.float32) if inverted.any() else g
    top = x.reshape(b, n).max(1)
    reject(top < _FAST_PEAK, "faint strokes: the full path stretches them")
    levels = np.rint(x.reshape(b, n) * 255).astype(np.intp) + 256 * np.arange(b)[:, None]
    counts = np.sort(np.bincount(levels.ravel(), minlength=256 * b).reshape(b, 256), axis=1)
    reject(counts[:, -2:].sum(1) >= 0.995 * n, "two levels only: the full path softens the edges")
    mask = x > 0
    rows, cols = mask.any(2), mask.any(1)  # (B, size)
    y0, y1 = rows.argmax(1), size - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), size - cols[:, ::-1].argmax(1)
    side = np.maximum(y1 - y0, x1 - x0)
    reject(side != cfg.box, f"the ink's longer side is not {cfg.box} px")
    # Labels are numbered in raster order through the stack, so each image's are a run: max - min + 1 of them.
    labels = _ndimage().label(mask & ~fail[:, None, None], structure=_EIGHT_2D)[0].reshape(b, n)
    first = np.where(labels > 0, labels, np.iinfo(labels.dtype).max).min(1)
    pieces = np.where(labels.max(1) > 0, labels.max(1) - first + 1, 0)
    reject(~fail & (pieces != 1), "the ink is in several pieces: the full path decides which belong to the digit")
    # Level the strokes at 1 as the full path does: the ink's 90th percentile over the stroke threshold goes to 1,
    # then the 90th percentile of what is over half the maximum (_peak, the box fit's levelling).
    digits = x / np.maximum(_percentile_over(x, _FAST_STROKE * top, 90), 1e-6)[:, None, None]
    np.minimum(digits, 1.0, out=digits)  # (never below 0: x >= 0 over a positive level)
    digits /= np.maximum(_percentile_over(digits, 0.5 * digits.reshape(b, n).max(1), 90), 1e-6)[:, None, None]
    np.minimum(digits, 1.0, out=digits)
    # Centring by mass (as _place, in float64 so that the rounding cannot flip on float32 error) must not move it.
    mass = digits.sum((1, 2), dtype=np.float64)
    ok_mass = mass > 0
    ramp = np.arange(size, dtype=np.float64)
    if cfg.center == "mass":
        cy = digits.sum(2, dtype=np.float64) @ ramp / np.where(ok_mass, mass, 1) - y0
        cx = digits.sum(1, dtype=np.float64) @ ramp / np.where(ok_mass, mass, 1) - x0
    else:
        cy, cx = (y1 - y0 - 1) / 2, (x1 - x0 - 1) / 2
    place_top = np.minimum(np.maximum(np.round(size / 2 - cy), 0), size - (y1 - y0))
    place_left = np.minimum(np.maximum(np.round(size / 2 - cx), 0), size - (x1 - x0))
    reject(~ok_mass | (place_top != y0) | (place_left != x0), "off-centre: centring by mass would move the ink")
    return MnistFormat(~fail, why, digits.astype(np.float32, copy=False), inverted,
                       np.stack([x0, y0, x1, y1], 1))  # fmt: skip


def _percentile_over(x: np.ndarray, floor: np.ndarray, q: float) -> np.ndarray:
    """Per image of x (B, H, W): the q-th percentile (linear interpolation, as _q) of its pixels >= floor[i], or 1
    where there are none. One sort of the stack: the pixels under the floor go first, so each image's chosen pixels
    are the last of its sorted row."""
    b = len(x)
    if b == 1:  # one image (a server's request): a partition of the chosen pixels, not a sort of them all
        v = x.ravel()
        chosen1 = v[v >= floor[0]]
        return np.array([_q(chosen1, q) if chosen1.size else 1.0], np.float32)
    flat = x.reshape(b, -1)
    chosen = flat >= floor[:, None]
    count = chosen.sum(1)
    ordered = np.sort(np.where(chosen, flat, -1.0), axis=1)
    pos = (flat.shape[1] - count) + q / 100 * np.maximum(count - 1, 0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, flat.shape[1] - 1)
    rows = np.arange(b)
    out = ordered[rows, lo] + (ordered[rows, hi] - ordered[rows, lo]) * (pos - lo)
    return np.where(count > 0, out, 1.0).astype(np.float32)


def fast_path(found: MnistFormat, infos: list[dict[str, Any]], cfg: PreprocessConfig) -> list[Preprocessed]:
    """The Preprocessed of each image `mnist_format` accepted (in `found`'s order, the others left out): its digit,
    deskewed when cfg.deskew (deskew_batch: one pass for the whole stack)."""
    idx = np.flatnonzero(found.ok)
    digits = found.digits[idx]
    alphas = [0.0] * len(idx)
    if cfg.deskew and len(idx):
        digits, alphas = _deskew_stack(digits)
    x = torch.from_numpy(np.ascontiguousarray(digits, dtype=np.float32)).unsqueeze(1)
    out = []
    for k, i in enumerate(idx):
        inverted = bool(found.inverted[i])
        record: dict[str, Any] = {
            "input": infos[i], "work_size": [cfg.size, cfg.size], "input_kind": "mnist", "fast_path": True,
            "polarity": {"decided": "dark-on-light" if inverted else "light-on-dark",
                         "why": f"the background: most pixels exactly {'white' if inverted else 'black'}"},
            "rejected": None, "ink_bbox": [int(v) for v in found.ink_bbox[i]],
        }  # fmt: skip
        if cfg.deskew:
            a = alphas[k]
            record["deskew"] = {"shear": round(a, 4), "degrees": round(math.degrees(math.atan(a)), 2)}
        out.append(Preprocessed(x[k], None, record))
    return out


_SMALL_STACK = 3
"""Up to this many images are deskewed one by one (`deskew`'s own resampling, a single C call each); more go
through deskew_batch's one grid_sample, whose fixed cost is that of about three single images (2 vCPU AMD EPYC,
one thread: 1 image 51 us alone against 147 us as a stack, 4 images 201 against 157, 8 images 455 against 257)."""


def _deskew_stack(digits: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """(B, H, W) -> (deskewed, each image's shear): as `deskew` for a few images, as deskew_batch (the same
    transform, to float rounding) for many."""
    if len(digits) <= _SMALL_STACK:
        done = [deskew(d) for d in digits]
        return np.stack([d for d, _ in done]), [a for _, a in done]
    x = torch.from_numpy(np.ascontiguousarray(digits, dtype=np.float32)).unsqueeze(1)
    out, alpha = deskew_batch_shear(x)
    return out[:, 0].numpy(), alpha.tolist()


def preprocess_many(images: list[Any], cfg: PreprocessConfig | None = None, fast: bool = True
                    ) -> list[Preprocessed | DataError]:  # fmt: skip
    """`preprocess` for several images, in order; an unreadable one is its DataError (the others go on). Images
    already in MNIST's format are recognised and prepared together (`mnist_format`, `fast_path`: a few array passes
    and one deskew for the whole stack), the others one by one through the full path."""
    cfg = cfg or PreprocessConfig()
    out: list[Preprocessed | DataError | None] = [None] * len(images)
    decoded: list[tuple[int, np.ndarray, dict[str, Any]]] = []
    for i, image in enumerate(images):
        try:
            gray, info = _load(image, cfg.max_side)
        except DataError as e:
            out[i] = e
            continue
        if fast and "alpha" not in info and gray.shape == (cfg.size, cfg.size):
            decoded.append((i, gray, info))
        else:
            out[i] = _preprocess_decoded(gray, info, cfg)
    if decoded:
        found = mnist_format(np.stack([gray for _, gray, _ in decoded]), cfg)
        done = iter(fast_path(found, [info for _, _, info in decoded], cfg))
        for (i, gray, info), ok in zip(decoded, found.ok, strict=True):
            out[i] = next(done) if ok else _preprocess_decoded(gray, info, cfg)
    return out  # type: ignore[return-value]


def _reading_name(reading: _Reading) -> str:
    polarity = "dark-on-light" if reading.light_background else "light-on-dark"
    return f"{polarity}, {'lighting removed' if reading.local else 'flat background'}"


def _digit(gray: np.ndarray, cfg: PreprocessConfig, survey: _Survey, reading: _Reading,
           work_scale: float) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """One reading of the image -> ((1, size, size) tensor, zeros when rejected; its record)."""
    h, w = gray.shape
    ink, mask, comps, record = _read(gray, cfg, survey, reading)
    if record["rejected"]:
        return torch.zeros(1, cfg.size, cfg.size), record
    # Clean and drawn images have no toner or dust: every nearby mark is part of the digit.
    selected = _select_digit(comps, record, 0.0 if survey.kind in ("clean", "canvas") else _PART_MIN)
    inked = int(comps.area[selected].sum())
    if inked < max(cfg.min_ink_fraction * h * w, 4):
        record["rejected"] = "no-ink"
        record["why"] = (f"{inked} ink pixels, fewer than min_ink_fraction {cfg.min_ink_fraction} of the image: "
                         "a dot or a smudge, not a digit")
        return torch.zeros(1, cfg.size, cfg.size), record
    # The selected components with their soft edges, nothing of the others.
    r = _union([comps.boxes[i] for i in np.flatnonzero(selected[1:])], 0, (h, w))
    digit = np.where(selected[comps.labels[r]], ink[r], 0.0)
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    digit = digit[y0:y1, x0:x1].astype(np.float32)
    y0, y1, x0, x1 = y0 + r[0].start, y1 + r[0].start, x0 + r[1].start, x1 + r[1].start
    record["ink_bbox"] = [round(v / work_scale) for v in (x0, y0, x1, y1)]  # in input pixels, x0 y0 x1 y1
    out, record["normalize"] = _normalize(digit, cfg, _SOFTEN_PX if survey.record.get("two_level") else 0.0)
    if cfg.deskew:
        out, alpha = deskew(out)
        record["deskew"] = {"shear": round(alpha, 4), "degrees": round(math.degrees(math.atan(alpha)), 2)}
    return torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(0), record


def _select_digit(comps: _Components, record: dict[str, Any], part_min: float = _PART_MIN) -> np.ndarray:
    """Lookup over labels: the most inked component plus every part near it or big (a broken 5, a dotted
    stroke); small marks far away (a stray dot, a note in the margin) and specks nearby (with less than
    `part_min` of the main part's ink) are left out."""
    area, boxes = comps.mass, comps.boxes
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
            if (gap <= reach and area[i] >= part_min * area[main]) or area[i] >= 0.25 * area[main]:
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
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
