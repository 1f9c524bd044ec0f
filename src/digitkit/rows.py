"""Rows of digits for the sequence reader: how a row is brought to the model's height, and rows composed from
single MNIST digits for training and measuring it.

One geometry for every row the model sees (`normalize_row`): the ink is cropped, scaled so its height is
`ink_fraction` x `height`, thin pen strokes thickened to MNIST's width, and centred in a `height`-px band with a
margin of two frames either side. Training rows, validation rows and a photo read by `digitkit read` all pass
through it, so the reader is trained on exactly the geometry it is given.

Composed rows (`compose`) are made from the digits of one Dataset only: the training portion trains, the
validation portion chooses the epoch, the MNIST test digits are for the report. Each digit carries the
per-digit augmentation of the run's recipe (geometry, stroke, blur, low resolution, contrast), then the digits are
laid out left to right with gaps, touching or overlapping neighbours, baseline jitter, and the row gets its
pixel noise as a whole (noise drawn per 28x28 digit would leave a noisy box around each one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from digitkit.augment import AugmentConfig, augment_batch
from digitkit.data import Dataset
from digitkit.errors import ConfigError, DataError
from digitkit.models.crnn import FRAME_PX
from digitkit.preprocess import MNIST_STROKE_PX, MNIST_THIN_STROKE_PX, _dilate_disk, _peak, _resize, stroke_width

MNIST_DIGIT_PX = 20
"""MNIST digits fill a 20 px box: stroke widths measured on MNIST are relative to that height."""


@dataclass
class RowsConfig:
    """Rows composed from single digits (task: sequence) and the geometry every row is read at."""

    height: int = 32
    """Row height the model reads, in pixels (a multiple of 8)."""
    ink_fraction: float = 0.75
    """Share of `height` the row's ink fills (the rest is margin above and below)."""
    max_width: int = 2048
    """Widest normalized row accepted, in pixels (about 80 digits); a wider input is refused with the reason."""
    min_digits: int = 1
    max_digits: int = 12
    """Digits per training row, uniform in [min_digits, max_digits]."""
    touch: float = 0.35
    """Probability that a digit is pushed into its left neighbour (touching or overlapping strokes)."""
    gap_min: float = 0.05
    gap_max: float = 0.6
    """Gap between separated neighbours' ink boxes, uniform in [gap_min, gap_max] x a digit's height (20 px)."""
    max_overlap: float = 0.3
    """A touching pair's ink boxes overlap by up to this x a digit's height."""
    baseline_jitter: float = 0.08
    """Vertical offset of each digit, uniform in +-this x a digit's height."""
    rows_per_epoch: int = 40_000
    """Training rows per epoch, composed afresh every epoch from the training portion's digits."""
    val_rows: int = 2_000
    """Validation rows (1-8 digits, a third touching, no augmentation: the report's test rows alike), composed once
    from the validation portion; the epoch and checkpoint are chosen on their exact-string accuracy and CTC loss."""
    test_rows: int = 2_000
    """Report rows composed from the MNIST test digits, read once when training ends."""
    font_share: float = 0.0
    """Share of the training rows' digits drawn from printed faces instead of MNIST (TRAINING_FONTS, slanted
    -12..12 degrees; the run's augmentation applies to them too): handwriting-style fonts and printed forms are
    not MNIST's hands. The faces in HELD_OUT_FONTS never train (they measure the effect); synth's
    handwriting fonts neither."""

    def __post_init__(self) -> None:
        if self.height % 8 or self.height < 16:
            raise ConfigError(f"rows.height = {self.height}: expected a multiple of 8, at least 16 (32 is typical)")
        if not 0.3 <= self.ink_fraction <= 1.0:
            raise ConfigError(f"rows.ink_fraction = {self.ink_fraction}: expected a share in [0.3, 1] such as 0.75")
        if not 1 <= self.min_digits <= self.max_digits <= 64:
            raise ConfigError(f"rows.min_digits = {self.min_digits}, rows.max_digits = {self.max_digits}: expected "
                              "1 <= min_digits <= max_digits <= 64")  # fmt: skip
        if not 0 <= self.touch <= 1 or not 0 <= self.gap_min <= self.gap_max or not 0 <= self.max_overlap < 1:
            raise ConfigError("rows.touch must be a probability, 0 <= rows.gap_min <= rows.gap_max, and "
                              "rows.max_overlap in [0, 1)")  # fmt: skip
        if not 0 <= self.font_share <= 1:
            raise ConfigError(f"rows.font_share = {self.font_share}: expected a share in [0, 1] (0: MNIST digits only)")
        if self.max_width < 8 * self.height or self.rows_per_epoch < 1 or self.val_rows < 0 or self.test_rows < 0:
            raise ConfigError("rows.max_width must be at least 8 x rows.height, rows.rows_per_epoch positive, "
                              "rows.val_rows and rows.test_rows >= 0")  # fmt: skip


HELD_OUT_FONTS = ("serif-italic", "cm-sans", "stix-bold", "mono")
"""Printed faces (digitkit.synth) kept out of training, for measuring what font_share does."""


def training_fonts() -> list[str]:
    """synth's matplotlib faces (FONTS, EXTRA_FONTS) but HELD_OUT_FONTS."""
    from digitkit import synth

    return [f for f in (*synth.FONTS, *synth.EXTRA_FONTS) if f not in HELD_OUT_FONTS]


def font_digits(fonts: list[str], slants: tuple[float, ...] = (-12.0, -6.0, 0.0, 6.0, 12.0)) -> Dataset:
    """Every digit in every face of `fonts` at every slant, MNIST-style 28x28 (synth.font_digit)."""
    from digitkit import synth

    images, labels = [], []
    for font in fonts:
        for slant in slants:
            for d in range(10):
                images.append(torch.from_numpy(synth.font_digit(d, font, slant_degrees=slant)))
                labels.append(d)
    return Dataset(torch.stack(images)[:, None], torch.tensor(labels), [str(d) for d in range(10)], "fonts")


@dataclass
class RowBatch:
    """x (B, 1, height, W) float in [0, 1], zero-padded on the right; widths (B,) each row's own width;
    targets (sum of lengths,) digit classes 1..10 (0 is the CTC blank) concatenated; lengths (B,); texts."""

    x: torch.Tensor
    widths: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]
    touching: torch.Tensor
    """(B,) True where the row has at least one touching or overlapping pair."""

    def frames(self) -> torch.Tensor:
        """(B,) output frames per row (the CTC input lengths)."""
        return self.widths // FRAME_PX

    def __len__(self) -> int:
        return len(self.texts)


# ----------------------------------------------------------------------------------------------------------
# Geometry: one for every row.


@dataclass(frozen=True)
class RowGeometry:
    """Where a normalized row came from: input pixel (x, y) sits at ((x - x0) * scale + left, (y - y0) * scale +
    top) in the normalized row (to within the thickening's pixel or two)."""

    x0: int
    y0: int
    scale: float
    left: int
    top: int

    def to_input_x(self, x: float) -> float:
        return self.x0 + (x - self.left) / self.scale


def normalize_row(ink: np.ndarray, cfg: RowsConfig | None = None) -> np.ndarray:
    """ink (h, w) white-on-black in [0, 1] -> (height, W) float32: cropped to the ink, scaled so the ink is
    ink_fraction x height tall, strokes thinner than MNIST's thickened, centred with two frames of margin either
    side, W a multiple of the frame width. DataError when there is no ink or the row is wider than max_width."""
    return normalize_row_geometry(ink, cfg)[0]


def normalize_row_geometry(ink: np.ndarray, cfg: RowsConfig | None = None) -> tuple[np.ndarray, RowGeometry]:
    """normalize_row, and the RowGeometry that maps the result back to `ink`'s pixels (for each digit's box)."""
    cfg = cfg or RowsConfig()
    ink = np.asarray(ink, dtype=np.float32)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if len(rows) == 0:
        raise DataError("no ink in the row: nothing to read")
    y0, x0 = int(rows[0]), int(cols[0])
    crop = ink[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    h, w = crop.shape
    ink_h = round(cfg.height * cfg.ink_fraction)
    scale = ink_h / h
    bw = max(1, round(w * scale))
    if bw + 4 * FRAME_PX > cfg.max_width:
        raise DataError(f"the row is {bw} px wide at {cfg.height} px tall (width/height {w / h:.0f}); at most "
                        f"{cfg.max_width - 4 * FRAME_PX} px are read (about {cfg.max_width // cfg.height:.0f} "
                        "digits): crop the image to the row or field to read")  # fmt: skip
    if (bw, ink_h) != (w, h):
        crop = np.clip(_resize(crop, bw, ink_h, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC), 0, 1)
    crop = np.clip(crop / max(_peak(crop), 1e-6), 0, 1)
    # A thin pen on a big photo becomes a hairline once shrunk: thicken to MNIST's stroke at this height.
    target = MNIST_STROKE_PX * ink_h / MNIST_DIGIT_PX
    width = stroke_width(crop >= 0.5)
    grown = 0
    if scale < 0.75 and 0 < width < MNIST_THIN_STROKE_PX * ink_h / MNIST_DIGIT_PX:
        radius = 1.6 * (target - width) / 2  # stroke_width reads curves and diagonals thin (preprocess._normalize)
        pad = math.ceil(radius) + 1
        grown = pad
        crop = _dilate_disk(np.pad(crop, pad), pad, radius)
        crop = crop[pad:-pad]  # the height stays ink_h; the width gains the dilation either side
    hh, ww = crop.shape
    width_out = math.ceil((ww + 4 * FRAME_PX) / FRAME_PX) * FRAME_PX
    out = np.zeros((cfg.height, width_out), np.float32)
    top = max(0, (cfg.height - hh) // 2)
    left = 2 * FRAME_PX
    hh = min(hh, cfg.height - top)
    out[top : top + hh, left : left + ww] = crop[:hh]
    return out, RowGeometry(x0, y0, scale, left + grown, top)


def stack_rows(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized rows (height, W_i) -> x (B, 1, height, max W) zero-padded on the right, widths (B,)."""
    if not rows:
        raise ValueError("stack_rows needs at least one row")
    widths = torch.tensor([r.shape[1] for r in rows])
    x = torch.zeros(len(rows), 1, rows[0].shape[0], int(widths.max()))
    for i, r in enumerate(rows):
        x[i, 0, :, : r.shape[1]] = torch.from_numpy(r)
    return x, widths


# ----------------------------------------------------------------------------------------------------------
# Rows composed from single digits.


def compose(
    ds: Dataset,
    n: int,
    g: torch.Generator,
    cfg: RowsConfig,
    augment: AugmentConfig | None = None,
    digits: tuple[int, int] | None = None,
    touch: float | None = None,
    touching_rows: float | None = None,
    fonts: Dataset | None = None,
) -> RowBatch:
    """`n` rows of digits drawn (with replacement) from `ds` by `g`: each row holds a uniform number of digits in
    `digits` (default rows.min_digits..max_digits); each pair touches with probability `touch` (default
    rows.touch). With `touching_rows` instead, that share of the rows (of 2+ digits) are touching rows, where each
    pair touches with probability `touch` and at least one does, and the other rows have no touching pair (the
    report's "a third of the rows touching"). `fonts` (font_digits) supplies rows.font_share of the digits.
    `augment` (the run's recipe) is applied to each digit, its pixel noise to the whole row."""
    lo, hi = digits or (cfg.min_digits, cfg.max_digits)
    p_touch = cfg.touch if touch is None else touch
    counts = torch.randint(lo, hi + 1, (n,), generator=g)
    row_flags = torch.rand(n, generator=g) < touching_rows if touching_rows is not None else None
    forced = torch.rand(n, generator=g)  # which pair of a touching row is sure to touch
    total = int(counts.sum())
    idx = torch.randint(len(ds), (total,), generator=g)
    x = ds.images[idx].float().div_(255)
    labels = ds.labels[idx].clone()
    if fonts is not None and cfg.font_share > 0:
        swap = torch.rand(total, generator=g) < cfg.font_share
        pick = torch.randint(len(fonts), (int(swap.sum()),), generator=g)
        x[swap] = fonts.images[pick].float().div_(255)
        labels[swap] = fonts.labels[pick]
    noise = None
    if augment is not None and augment.enabled:
        per_digit = dataclasses.replace(augment, noise=type(augment.noise)(), pixels=type(augment.pixels)(),
                                        erasing=type(augment.erasing)())  # fmt: skip
        x = augment_batch(x, per_digit, g)
        noise = AugmentConfig(noise=augment.noise)
    cols = (x[:, 0] > 0.1).any(1)  # (N, 28) which columns hold ink
    has = cols.any(1)
    first = torch.where(has, cols.float().argmax(1), 0)
    last = torch.where(has, cols.shape[1] - 1 - cols.flip(1).float().argmax(1), cols.shape[1] - 1)
    # All per-pair draws at once, in a fixed order, so a seed gives the same rows on every machine.
    touches = torch.rand(total, generator=g) < p_touch
    gaps = torch.empty(total).uniform_(cfg.gap_min, cfg.gap_max, generator=g) * MNIST_DIGIT_PX
    overlaps = torch.rand(total, generator=g) * cfg.max_overlap * MNIST_DIGIT_PX
    shifts = ((torch.rand(total, generator=g) * 2 - 1) * cfg.baseline_jitter * MNIST_DIGIT_PX).round().long()
    side = x.shape[-1]
    rows, texts, touching = [], [], []
    start = 0
    for r, count in enumerate(counts.tolist()):
        band = side + 2 * int(shifts.abs().max()) + 2
        lefts, pos, any_touch = [], 0.0, False
        sure = start + 1 + int(forced[r] * (count - 1)) if row_flags is not None and row_flags[r] else -1
        for k in range(start, start + count):
            if k > start:
                pair_touches = bool(touches[k]) if row_flags is None else bool(row_flags[r]) and (
                    k == sure or bool(touches[k]))
                if pair_touches:
                    pos -= float(overlaps[k]) + 1.0  # at least a pixel into the neighbour's box: the inks meet
                    any_touch = True
                else:
                    pos += float(gaps[k])
            lefts.append(round(pos))
            pos += float(last[k] - first[k] + 1)
        offset = -min(lefts)
        canvas = torch.zeros(band, max(left + offset + int(last[k] - first[k]) + 1
                                       for left, k in zip(lefts, range(start, start + count), strict=True)))
        for left, k in zip(lefts, range(start, start + count), strict=True):
            top = (band - side) // 2 + int(shifts[k])
            piece = x[k, 0, :, int(first[k]) : int(last[k]) + 1]
            region = canvas[top : top + side, left + offset : left + offset + piece.shape[1]]
            torch.maximum(region, piece, out=region)
        try:
            rows.append(normalize_row(canvas.numpy(), cfg))
        except DataError:  # every digit augmented away (vanishingly rare): an empty row reads as ""
            rows.append(np.zeros((cfg.height, 8 * FRAME_PX), np.float32))
            labels[start : start + count] = -1
        texts.append("".join(str(int(v)) for v in labels[start : start + count] if v >= 0))
        touching.append(any_touch)
        start += count
    xb, widths = stack_rows(rows)
    if noise is not None and noise.enabled:
        xb = augment_batch(xb, noise, g) * (torch.arange(xb.shape[-1]) < widths[:, None, None, None])
    kept = labels[labels >= 0]
    lengths = torch.tensor([len(t) for t in texts])
    return RowBatch(xb, widths, kept + 1, lengths, texts, torch.tensor(touching))


def fixed_rows(ds: Dataset, n: int, seed: int, cfg: RowsConfig, digits: tuple[int, int] = (1, 8),
               touching_rows: float = 1 / 3, batch: int = 500) -> list[RowBatch]:  # fmt: skip
    """The same `n` rows every time for (ds, seed): plain digits (no augmentation), `digits` per row, a share
    `touching_rows` of them touching rows (each pair touching with probability 0.5, at least one); in batches of
    `batch` rows (validation and the report's test rows)."""
    g = torch.Generator().manual_seed(seed)
    return [compose(ds, min(batch, n - s), g, cfg, None, digits, 0.5, touching_rows) for s in range(0, n, batch)]
