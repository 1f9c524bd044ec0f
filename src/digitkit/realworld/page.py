"""Pages with several fields: a form, a check, a label -> each digit field's box, text and confidence.

The page takes the one preprocessing path (`preprocess.ink_image`), then its ink marks are grouped into fields:
two marks belong to one field when they share a line (their vertical extents overlap by at least half the shorter
one) and the gap between them is under `GAP_HEIGHTS` x the taller one's height: digits in a number sit closer than
that, the next field on the line or the text beside it further. Every field is read by the row reader in one
batch (rows.normalize_row, the sequence model, the CTC beam; SequenceReader.readings), so a page costs one forward
pass, two when some fields are read again at other heights.

Printed words around the handwriting (labels such as "Amount", "ZIP") are fields too; they read as digit strings
of low probability, so they are rejected (`inference.reject_below_row_confidence`, and `MIN_FIELD_CONFIDENCE` at
least) unless a named field's pattern picks them. With `fields` (name -> pattern, `digitkit read --field
NAME=REGEX`), each name gets the field whose reading under its pattern is most probable, each field at most one
name (strongest first); a name no field matches is reported missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from digitkit.errors import DataError
from digitkit.preprocess import ink_image, load_image_info
from digitkit.realworld.pattern import compile_pattern
from digitkit.realworld.reader import BEAM_WIDTH, RowReading, SequenceReader, kept_ink

GAP_HEIGHTS = 1.2
"""Marks further apart than this x the taller one's height start a new field."""
LINE_OVERLAP = 0.5
"""Marks are on one line when their vertical extents overlap by this share of the shorter one."""
MIN_HEIGHT_PX = 6
"""Fields shorter than this (in the possibly shrunk page) are dust or rules, not writing."""
SPECK_AREA = 0.05
"""Marks with less ink than this share of the page's median mark are specks."""
MAX_MARKS = 4000
"""A page with more ink marks than this (after specks) is refused: a photo of texture, not a form."""
MAX_FIELDS = 64
"""Fields read per page (the largest first); a form holds far fewer."""
MAX_NAMED_FIELDS = 16
"""`--field` names per request."""
MIN_FIELD_CONFIDENCE = 0.5
"""Unnamed fields whose string is less probable than this are not digit fields (printed words, rules, logos)."""


@dataclass
class PageReading:
    fields: list[dict[str, Any]] = field(default_factory=list)
    """Per field, top to bottom then left to right: box [x0, y0, x1, y1] in the input's pixels, text, confidence,
    digits (each with its box), rejected/why, and name/pattern/pattern_ok for a named field."""
    missing: list[str] = field(default_factory=list)
    """Named fields no field on the page matched."""
    rejected: str | None = None
    why: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        out = {**extra, "reader": "sequence", "page": True, "fields": self.fields, "missing": self.missing,
               "rejected": self.rejected}  # fmt: skip
        if self.why:
            out["why"] = self.why
        out["record"] = self.record
        return out


def field_boxes(mask: np.ndarray) -> tuple[list[tuple[int, int, int, int]], np.ndarray]:
    """The ink mask of a page -> field boxes (x0, y0, x1, y1), top to bottom then left to right, and the label image
    whose labels 1..n are the fields (a field's ink is where labels == its index + 1)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return [], labels
    slices = ndimage.find_objects(labels)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = area >= SPECK_AREA * float(np.median(area))
    idx = np.flatnonzero(keep)
    if len(idx) > MAX_MARKS:
        raise DataError(f"the page has {len(idx):,} separate ink marks (at most {MAX_MARKS:,} are grouped): it looks "
                        "like texture or noise, not a form; crop it to the fields to read")  # fmt: skip
    y0 = np.array([slices[i][0].start for i in idx])
    y1 = np.array([slices[i][0].stop for i in idx])
    x0 = np.array([slices[i][1].start for i in idx])
    x1 = np.array([slices[i][1].stop for i in idx])
    h = y1 - y0
    # Pairwise (vectorised; MAX_MARKS bounds it): same line, and close enough along it.
    overlap = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
    same_line = overlap >= LINE_OVERLAP * np.minimum(h[:, None], h[None])
    gap = np.maximum(x0[:, None], x0[None]) - np.minimum(x1[:, None], x1[None])
    near = gap <= GAP_HEIGHTS * np.maximum(h[:, None], h[None])
    group = _components(same_line & near)
    fields = []
    out = np.zeros_like(labels)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        box = (int(x0[members].min()), int(y0[members].min()), int(x1[members].max()), int(y1[members].max()))
        if box[3] - box[1] >= MIN_HEIGHT_PX:
            fields.append((box, idx[members] + 1))
    fields.sort(key=lambda f: (f[0][1] + f[0][3]) // 2)  # top to bottom
    fields = _rows_then_columns(fields)
    for k, (_, members) in enumerate(fields, start=1):
        out[np.isin(labels, members)] = k
    return [f[0] for f in fields], out


def _components(adjacent: np.ndarray) -> np.ndarray:
    """Connected components of a symmetric boolean adjacency matrix: a label per node."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    return connected_components(csr_matrix(adjacent), directed=False)[1]


def _rows_then_columns(fields: list) -> list:
    """Order fields as a person reads a form: by line (fields whose vertical centres lie within the other's height
    share a line), then left to right."""
    lines: list[list] = []
    for f in fields:
        (x0, y0, x1, y1), _ = f
        centre = (y0 + y1) / 2
        for line in lines:
            ly0, ly1 = line[0][0][1], line[0][0][3]
            if ly0 <= centre <= ly1:
                line.append(f)
                break
        else:
            lines.append([f])
    return [f for line in lines for f in sorted(line, key=lambda f: f[0][0])]


def read_page(reader: SequenceReader, source: Any, fields: dict[str, str] | None = None,
              beam_width: int = BEAM_WIDTH) -> PageReading:  # fmt: skip
    """Every digit field on a page, read in one batch; `fields` names the ones to find (name -> pattern). Patterns
    are compiled (and refused with PatternError) before any work."""
    named = dict(fields or {})
    if len(named) > MAX_NAMED_FIELDS:
        raise DataError(f"{len(named)} named fields: at most {MAX_NAMED_FIELDS} per page")
    compiled = {name: compile_pattern(p) for name, p in named.items()}
    try:
        gray, info = load_image_info(source, reader.preprocess_cfg.max_side)
    except DataError as e:
        return PageReading(rejected="unreadable", why=str(e), missing=list(named))
    scale = info["width"] / gray.shape[1] if "width" in info else 1.0
    ink, mask, record = ink_image(gray, reader.preprocess_cfg)
    if record.get("rejected"):
        return PageReading(rejected=record["rejected"], missing=list(named), record=record)
    boxes, owner = field_boxes(mask)
    order = sorted(range(len(boxes)), key=lambda k: -(boxes[k][2] - boxes[k][0]) * (boxes[k][3] - boxes[k][1]))
    chosen = sorted(order[:MAX_FIELDS])
    crops, masks, origins = [], [], []
    for k in chosen:
        x0, y0, x1, y1 = boxes[k]
        own = owner[y0:y1, x0:x1] == k + 1
        # Only this field's marks (soft edges included): a neighbour's descender in the box is not read.
        crops.append(kept_ink(ink[y0:y1, x0:x1], own))
        masks.append(own)
        origins.append((x0, y0))
    read = reader.readings(crops)
    # a field wider than a row can be (a rule across the page) is not a digit field
    keep = [j for j, got in enumerate(read) if not isinstance(got, DataError)]
    rows = [read[j] for j in keep]
    masks, origins = [masks[j] for j in keep], [origins[j] for j in keep]

    def decode(i: int, compiled: Any = None, pattern: str | None = None) -> RowReading:
        r = reader.decode(rows[i].lps, rows[i].geom, masks[i], scale, {}, compiled, pattern, beam_width,
                          fallback=False, first=rows[i].first)  # fmt: skip
        dx, dy = origins[i]
        for d in r.digits:  # from the field's crop to the page
            d["box"] = [d["box"][0] + round(dx * scale), d["box"][1] + round(dy * scale),
                        d["box"][2] + round(dx * scale), d["box"][3] + round(dy * scale)]  # fmt: skip
        return r

    readings = [decode(i) for i in range(len(keep))]
    page = PageReading(record=record)
    names: dict[int, tuple[str, RowReading]] = {}
    if named:
        candidates = []
        for name, pattern in compiled.items():
            for i in range(len(keep)):
                r = decode(i, pattern, named[name])
                if r.pattern_ok:  # a match of low confidence is still the field, answered with its reason
                    candidates.append((r.confidence, name, i, r))
        taken: set[str] = set()
        for _, name, i, r in sorted(candidates, key=lambda c: -c[0]):
            if name not in taken and i not in names:
                names[i] = (name, r)
                taken.add(name)
        page.missing = [n for n in named if n not in taken]
    floor = max(MIN_FIELD_CONFIDENCE, reader.inference.reject_below_row_confidence)
    for i, r in enumerate(readings):
        name = None
        if i in names:
            name, r = names[i]
        elif r.rejected is None and r.confidence < floor:
            r.rejected, r.why = "low-confidence", (f"the string's probability {r.confidence:.3f} is below "
                                                   f"{floor:g}: not a digit field")  # fmt: skip
        fx0, fy0, fx1, fy1 = _field_box(masks[i])
        dx, dy = origins[i]
        box = [round(v * scale) for v in (fx0 + dx, fy0 + dy, fx1 + dx, fy1 + dy)]
        entry = {**({"name": name} if name else {}), "box": box,
                 **{k: v for k, v in r.to_json().items() if k not in ("record", "reader")}}  # fmt: skip
        page.fields.append(entry)
    return page


def _field_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1
