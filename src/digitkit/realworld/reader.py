"""The row reader: an image of a row of handwritten digits -> the string, a confidence for it and for each digit,
a box per digit, and the pattern check. What `digitkit read`, `/v1/read` and the drawing page use.

The image takes the one preprocessing path (`preprocess.ink_image`: polarity, lighting, specks, shadows), the
ink is brought to the model's row height (`rows.normalize_row`), a sequence model (task: sequence, e.g. crnn)
scores every frame, and the CTC decoder (`realworld.ctc`) reads the string: a beam search, which with `pattern`
keeps only strings the pattern can still match. Nothing is cut into digits first, so touching and overlapping
digits are read as they are written.

A reading's `rejected` is None or one of ROW_REASONS:
  unreadable      the file is not an image we can decode (the message says why)
  empty, no-ink   nothing to read (as for single digits: preprocess)
  too-wide        the row is wider than rows.max_width at the model's height: crop to the field
  no-match        `pattern` was given and no string the model can read matches it (text is then the best
                  reading without the pattern, for the record)
  low-confidence  the string's probability is below inference.reject_below_row_confidence
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from digitkit import checkpoint
from digitkit.config import Config, InferenceConfig
from digitkit.errors import ConfigError, DataError
from digitkit.models.crnn import FRAME_PX
from digitkit.preprocess import PreprocessConfig, ink_candidates, load_image_info
from digitkit.realworld import ctc
from digitkit.realworld.pattern import Pattern, compile_pattern
from digitkit.rows import RowGeometry, RowsConfig, normalize_row, normalize_row_geometry, stack_rows

ROW_REASONS = ("unreadable", "empty", "no-ink", "too-wide", "no-match", "low-confidence")
BEAM_WIDTH = 8
"""Prefixes kept per frame by the beam search. On the validation rows 8 reads as well as 32 (issue 23)."""
CHUNK = 32
"""Rows per forward pass when many are read at once (rows of like width are batched together)."""


class RowLogProbs(NamedTuple):
    """One row as the model saw it (SequenceReader.readings)."""

    lps: list[np.ndarray]
    """(T_i, K) frame log-probabilities per height the row was read at, rows.ink_fraction first."""
    geom: RowGeometry
    """Where the first height's row sits in the ink it was cut from (places the boxes)."""
    first: ctc.Decoded | None = None
    """The first height's beam search (BEAM_WIDTH, no pattern) when it was run to decide on reading again."""


@dataclass
class RowReading:
    """What was read in one row."""

    text: str
    confidence: float
    """The probability of `text` under the model: the sum over every CTC alignment of it (0 when rejected before
    the model ran)."""
    digits: list[dict[str, Any]] = field(default_factory=list)
    """Per character: digit, confidence (the highest probability of it over its frames), box [x0, y0, x1, y1] in
    the input image's pixels (x1, y1 exclusive)."""
    rejected: str | None = None
    why: str | None = None
    pattern: str | None = None
    pattern_ok: bool | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {**extra, "reader": "sequence", "text": self.text,
                               "confidence": round(self.confidence, 6), "rejected": self.rejected}  # fmt: skip
        if self.why:
            out["why"] = self.why
        out["complete"] = self.rejected is None and bool(self.text)
        out["digits"] = self.digits
        out["mean_confidence"] = (round(sum(d["confidence"] for d in self.digits) / len(self.digits), 6)
                                  if self.digits else 0.0)  # fmt: skip
        if self.pattern is not None:
            out.update(pattern=self.pattern, pattern_ok=self.pattern_ok)
        out["record"] = self.record
        return out


class SequenceReader:
    """A trained row reader plus how it prepares rows (preprocess, rows configs) and when it refuses (inference).

    `engine`, when given, computes the frame logits instead of `model`: any object with `logits(x) -> (B, T, K)`
    (digitkit.engine.OnnxSequenceModel for an exported file)."""

    def __init__(self, model: torch.nn.Module | None, rows_cfg: RowsConfig | None = None,
                 preprocess_cfg: PreprocessConfig | None = None, inference: InferenceConfig | None = None,
                 engine: Any = None) -> None:  # fmt: skip
        if model is None and engine is None:
            raise ValueError("SequenceReader needs a model or an engine")
        self.model = model.eval() if model is not None else None
        self.engine = engine
        self.rows_cfg = rows_cfg or RowsConfig()
        self.preprocess_cfg = preprocess_cfg or PreprocessConfig()
        self.inference = inference or InferenceConfig()

    @classmethod
    def open(cls, path: str | Path) -> SequenceReader:
        """From a run folder or checkpoint trained with task: sequence (configs/read.yaml)."""
        ckpt = checkpoint.load(path)
        if ckpt.get("task") != "sequence":
            raise ConfigError(f"{path}: a single-digit classifier ({ckpt.get('model')}), not a row reader; read "
                              "with it by cutting the row into digits (`digitkit read --reader segment`), or train a "
                              "row reader with `digitkit train --config configs/read.yaml`")  # fmt: skip
        cfg = _config(ckpt, path)
        return cls(checkpoint.model_from_checkpoint(ckpt), cfg.rows, cfg.preprocess, cfg.inference)

    # ------------------------------------------------------------------------------------------ core
    def log_probs(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Normalized rows (height, W_i) -> per-row frame log-probabilities (W_i / FRAME_PX, K), batched by width."""
        out: list[np.ndarray | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: rows[i].shape[1])
        for s in range(0, len(order), CHUNK):
            idx = order[s : s + CHUNK]
            x, widths = stack_rows([rows[i] for i in idx])
            if self.engine is not None:
                logits = torch.as_tensor(self.engine.logits(x))
            else:
                with torch.inference_mode():
                    logits = self.model(x)
            lp = logits.float().log_softmax(2).numpy()
            for j, i in enumerate(idx):
                out[i] = lp[j, : int(widths[j]) // FRAME_PX]
        return out  # type: ignore[return-value]

    def read(self, source: Any, pattern: str | None = None, beam_width: int = BEAM_WIDTH) -> RowReading:
        """One image of a row -> RowReading. A bad pattern raises PatternError before any work; an undecodable
        image is a reading rejected as `unreadable`."""
        return self.read_many([source], pattern, beam_width)[0]

    def read_many(self, sources: list[Any], pattern: str | None = None,
                  beam_width: int = BEAM_WIDTH) -> list[RowReading]:  # fmt: skip
        """Many rows at once (one batched forward pass per CHUNK rows, and one more for the rows read again at other
        heights: `readings`). Where preprocessing is unsure how to read
        an image (preprocess.ink_candidates: lighting or solid ink, polarity), each reading is read and the more
        probable string wins; its record says so."""
        compiled = compile_pattern(pattern) if pattern is not None else None
        readings: list[RowReading | None] = [None] * len(sources)
        prepared: list[tuple[int, np.ndarray | None, np.ndarray, float, dict]] = []
        for i, src in enumerate(sources):
            try:
                gray, info = load_image_info(src, self.preprocess_cfg.max_side)
            except DataError as e:
                readings[i] = RowReading("", 0.0, rejected="unreadable", why=str(e), pattern=pattern)
                continue
            scale = info["width"] / gray.shape[1] if "width" in info else 1.0
            candidates = ink_candidates(gray, self.preprocess_cfg)
            names = [c[0] for c in candidates]
            for name, ink, mask, record in candidates:
                if len(names) > 1 and not record.get("rejected"):
                    record = {**record, "reading": name, "candidates": names}
                prepared.append((i, None if record.get("rejected") else kept_ink(ink, mask), mask, scale, record))
        read = iter(self.readings([p[1] for p in prepared if p[1] is not None]))
        best: dict[int, RowReading] = {}
        for i, ink, mask, scale, record in prepared:  # without a reading, the first candidate's reason answers
            if ink is None:
                if readings[i] is None:
                    readings[i] = RowReading("", 0.0, rejected=record["rejected"], pattern=pattern, record=record)
                continue
            got = next(read)
            if isinstance(got, DataError):
                if readings[i] is None:
                    readings[i] = RowReading("", 0.0, rejected="too-wide" if "wide" in str(got) else "no-ink",
                                             why=str(got), pattern=pattern, record=record)  # fmt: skip
                continue
            r = self.decode(got.lps, got.geom, mask, scale, record, compiled, pattern, beam_width, first=got.first)
            if i not in best or _rank(r) > _rank(best[i]):
                best[i] = r
        for i, r in best.items():
            readings[i] = r
        return readings  # type: ignore[return-value]

    def readings(self, inks: list[np.ndarray]) -> list[RowLogProbs | DataError]:
        """Each row's ink -> RowLogProbs: its frame log-probabilities at every height it is read at, the RowGeometry
        of the first (rows.ink_fraction, which places the boxes) and, when it was needed, the first height's beam
        search; a DataError (no ink, too wide) for a row that cannot be read. The other heights of
        inference.row_ink_fractions are read only for rows whose string at the first is less probable than
        inference.reread_below_row_confidence: two batched passes at most."""
        inf = self.inference
        out: list[Any] = [None] * len(inks)
        first: list[tuple[int, np.ndarray]] = []
        for k, ink in enumerate(inks):
            try:
                row, geom = normalize_row_geometry(ink, self.rows_cfg)
            except DataError as e:
                out[k] = e
                continue
            out[k] = RowLogProbs([], geom)
            first.append((k, row))
        again: list[tuple[int, np.ndarray]] = []
        heights = [f for f in inf.row_ink_fractions if f != self.rows_cfg.ink_fraction]
        for (k, _), lp in zip(first, self.log_probs([row for _, row in first]), strict=True):
            out[k].lps.append(lp)
            if not heights:
                continue
            searched = ctc.beam(lp, BEAM_WIDTH)
            out[k] = out[k]._replace(first=searched)
            if searched.confidence < inf.reread_below_row_confidence:
                for f in heights:
                    try:
                        again.append((k, normalize_row(inks[k], dataclasses.replace(self.rows_cfg, ink_fraction=f))))
                    except DataError:  # too wide at this height: read at the others
                        continue
        for (k, _), lp in zip(again, self.log_probs([row for _, row in again]), strict=True):
            out[k].lps.append(lp)
        return out

    def decode(self, lps: np.ndarray | list[np.ndarray], geom: RowGeometry, mask: np.ndarray, scale: float,
               record: dict, compiled: Pattern | None = None, pattern: str | None = None,
               beam_width: int = BEAM_WIDTH, fallback: bool = True,
               first: ctc.Decoded | None = None) -> RowReading:  # fmt: skip
        """One row's frame log-probabilities -> RowReading, its digits boxed in the input's pixels (`geom` and
        `mask`: normalize_row_geometry's and the ink mask the row was cut from; `scale` input px per mask px).
        `lps` is one (T, K) array, or one per height the row was read at (`readings`, the first height first: the
        string most probable over all of them wins, ctc.beam_many). Without a match for `compiled`, the reading
        without it is given (unless not `fallback`). `first` is RowLogProbs.first (the first height's search at
        BEAM_WIDTH without a pattern), reused where the same search would be run again."""
        lps = [lps] if isinstance(lps, np.ndarray) else list(lps)
        first = first if beam_width == BEAM_WIDTH else None
        decoded = ctc.beam_many(lps, beam_width, compiled, None if compiled is not None else first)
        matched = decoded.matched
        rejected = why = None
        if not matched:
            decoded = ctc.beam_many(lps, beam_width, first=first) if fallback else decoded
            rejected, why = "no-match", f"no reading of the row matches the pattern {pattern!r}"
        elif decoded.confidence < self.inference.reject_below_row_confidence:
            rejected = "low-confidence"
            why = (f"the string's probability {decoded.confidence:.3f} is below "
                   f"inference.reject_below_row_confidence {self.inference.reject_below_row_confidence:g}")
        boxes = char_boxes(decoded.char_frames, geom, mask, scale)
        digits = [{"digit": ch, "confidence": round(conf, 6), "box": box}
                  for ch, conf, box in zip(decoded.text, decoded.char_confidences, boxes, strict=True)]  # fmt: skip
        return RowReading(decoded.text, decoded.confidence, digits, rejected, why, pattern,
                          None if pattern is None else matched, record)  # fmt: skip


def _rank(r: RowReading) -> tuple[bool, float]:
    """Which of an image's readings to answer with: one that matches the pattern, then the more probable string."""
    return (r.rejected != "no-match", r.confidence)


def kept_ink(ink: np.ndarray, mask: np.ndarray, grow_px: int = 2) -> np.ndarray:
    """The ink on and just around the kept strokes (`mask`, grown by `grow_px` for the soft edges), 0 elsewhere.
    On a photo the grey levels keep some of the paper's shading and vignette around a row; read as ink, that haze
    makes the row's box the whole image and the digits specks in it. Rows are trained on a clean background."""
    if not mask.any():
        return ink
    from scipy import ndimage

    return np.where(ndimage.binary_dilation(mask, iterations=grow_px), ink, 0).astype(np.float32)


def char_boxes(frames: tuple[tuple[int, int], ...], geom: RowGeometry, mask: np.ndarray,
               scale: float) -> list[list[int]]:  # fmt: skip
    """Each character's box in the input image: its columns run from halfway to the previous character's frames to
    halfway to the next one's, narrowed to the ink in them; its rows are that ink's extent. `mask` is the ink mask
    of the (possibly shrunk) image the row was cut from, `scale` the input pixels per mask pixel."""
    boxes = []
    h, w = mask.shape
    centres = [((a + b + 1) / 2) * FRAME_PX for a, b in frames]
    for k, (a, b) in enumerate(frames):
        lo = (a * FRAME_PX + (frames[k - 1][1] + 1) * FRAME_PX) / 2 if k else a * FRAME_PX - FRAME_PX
        hi = ((b + 1) * FRAME_PX + frames[k + 1][0] * FRAME_PX) / 2 if k + 1 < len(frames) else (b + 2) * FRAME_PX
        lo, hi = min(lo, centres[k] - 1), max(hi, centres[k] + 1)
        x0 = int(np.clip(np.floor(geom.to_input_x(lo)), 0, w - 1))
        x1 = int(np.clip(np.ceil(geom.to_input_x(hi)), x0 + 1, w))
        cols = mask[:, x0:x1]
        ys, xs = np.flatnonzero(cols.any(1)), np.flatnonzero(cols.any(0))
        if len(ys):
            x0, x1, y0, y1 = x0 + int(xs[0]), x0 + int(xs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1
        else:
            y0, y1 = geom.y0, geom.y0 + 1
        boxes.append([round(v * scale) for v in (x0, y0, x1, y1)])
    return boxes


def _config(ckpt: dict[str, Any], path: Any) -> Config:
    from digitkit import config

    try:
        return config.from_dict(ckpt.get("config") or {})
    except ConfigError as e:
        raise DataError(f"{path}: the config stored in the checkpoint is not valid here ({e})") from None
