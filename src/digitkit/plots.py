"""Figures and image grids: the only module in digitkit that writes pictures.

Training curves and confusion matrices are drawn with matplotlib's object-oriented API (``Figure`` +
``FigureCanvasAgg``), which never touches pyplot's global figure registry or backend: nothing to close,
nothing that grows across calls, safe in servers and tests. Image grids are plain numpy + PIL so their pixel
layout is exact arithmetic (see ``image_grid``). Every ``save_*`` function creates parent folders and writes
atomically.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

PAD_GRAY = 96  # grid padding: clearly neither the black background nor the white strokes of a digit
LABEL_FILL = 255
SEPARATOR_RGB = (230, 120, 30)  # orange: cannot be mistaken for a digit stroke or for padding
SEPARATOR_PX = 4
MAX_ANNOTATED_CLASSES = 20  # above this, per-cell numbers in a confusion matrix are unreadable
HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


# ---------------------------------------------------------------------------------------------------------
# saving


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temp file next to ``path`` then rename it: a crash never leaves half a file.

    The temp name keeps ``path``'s suffix so PIL and matplotlib pick the format from it as usual.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: it creates the file 0600 and os.replace would keep that; the writer creates it
    # with the usual umask-respecting mode instead.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_figure(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot, so the figure is freed with its last reference
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


# ---------------------------------------------------------------------------------------------------------
# training history


def save_history(
    rows: list[dict], path: Path, title: str | None = None, checkpoint_epoch: int | None = None
) -> Path:
    """Plot per-epoch loss and accuracy (train and val) and mark the epoch of the kept checkpoint.

    ``checkpoint_epoch`` is the epoch whose weights were kept (chosen on validation); without it the epoch
    with the lowest val loss is marked.

    ``rows``: one dict per epoch with ``epoch`` (1-based), ``train_loss``, ``train_acc``, ``val_loss``,
    ``val_acc`` (accuracies as fractions in [0, 1]); ``lr`` is optional and, when it changes during the run,
    gets its own thin panel underneath. Other keys (e.g. ``seconds``) are ignored. NaN values are skipped.
    """
    if not rows:
        raise ValueError(
            "save_history got no rows; expected one dict per epoch with keys " + ", ".join(HISTORY_KEYS)
        )
    for i, row in enumerate(rows):
        missing = [k for k in HISTORY_KEYS if k not in row]
        if missing:
            raise ValueError(f"history row {i} is missing {missing}; every row needs {list(HISTORY_KEYS)}")
    rows = sorted(rows, key=lambda r: r["epoch"])
    col = {k: np.array([float(r[k]) for r in rows]) for k in HISTORY_KEYS}
    epoch = col["epoch"]
    has_val = bool(np.isfinite(col["val_loss"]).any() or np.isfinite(col["val_acc"]).any())  # none: val_fraction 0
    for k in ("train_acc", "val_acc"):
        if np.isfinite(col[k]).any() and np.nanmax(col[k]) > 1.0 + 1e-9:
            raise ValueError(
                f"{k} goes up to {np.nanmax(col[k]):g}, but accuracies must be fractions in [0, 1]; "
                "if they are percentages, divide by 100"
            )
    lr = np.array([float(r.get("lr", np.nan)) for r in rows])
    finite_lr = lr[np.isfinite(lr)]
    show_lr = finite_lr.size > 1 and not np.allclose(finite_lr, finite_lr[0])

    fig = Figure(figsize=(11, 5.6 if show_lr else 4.4), layout="constrained")
    if show_lr:
        grid = fig.add_gridspec(2, 2, height_ratios=(4, 1))
        ax_loss, ax_acc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
        ax_lr = fig.add_subplot(grid[1, :], sharex=ax_loss)
    else:
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_lr = None
    style = {"marker": "o", "markersize": 3} if len(rows) <= 30 else {}

    ax_loss.plot(epoch, col["train_loss"], label="train", color="C0", **style)
    if has_val:
        ax_loss.plot(epoch, col["val_loss"], label="val", color="C1", **style)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    losses = np.concatenate([col["train_loss"], col["val_loss"]])
    losses = losses[np.isfinite(losses)]
    # Losses fall by orders of magnitude; on a linear axis the late epochs, the ones that matter, look flat.
    if losses.size and losses.min() > 0 and losses.max() / losses.min() > 10:
        ax_loss.set_yscale("log")

    ax_acc.plot(epoch, 100 * col["train_acc"], label="train", color="C0", **style)
    if has_val:
        ax_acc.plot(epoch, 100 * col["val_acc"], label="val", color="C1", **style)
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")

    if checkpoint_epoch is not None and checkpoint_epoch in epoch:
        best = int(np.flatnonzero(epoch == checkpoint_epoch)[0])
        marker = "checkpoint"
    elif np.isfinite(col["val_loss"]).any():
        best = int(np.nanargmin(col["val_loss"]))
        marker = "best val loss"
    else:
        best = None
    if best is not None:
        best_epoch = int(epoch[best])
        label = f"{marker} @ epoch {best_epoch}"
        if np.isfinite(col["val_loss"][best]):
            label += f": val loss {col['val_loss'][best]:.4g}"
        if np.isfinite(col["val_acc"][best]):
            label += f"\nval acc there {100 * col['val_acc'][best]:.2f}%"
        for ax in (ax_loss, ax_acc, ax_lr):
            if ax is not None:
                ax.axvline(best_epoch, color="0.35", linestyle="--", linewidth=1)
        ax_loss.plot([], [], color="0.35", linestyle="--", linewidth=1, label=label)  # legend entry only
        ax_acc.plot(
            [], [], color="0.35", linestyle="--", linewidth=1, label=f"{marker} (epoch {best_epoch})"
        )

    if ax_lr is not None:
        ax_lr.plot(epoch, lr, color="C2", **style)
        ax_lr.set(xlabel="epoch", ylabel="lr")
        if finite_lr.min() > 0 and finite_lr.max() / finite_lr.min() > 20:
            ax_lr.set_yscale("log")
        ax_loss.set_xlabel("")
        ax_acc.set_xlabel("")
    else:
        if finite_lr.size:
            ax_acc.set_title(f"accuracy  (lr {finite_lr[0]:.3g} throughout)")

    for ax in (ax_loss, ax_acc, ax_lr):
        if ax is not None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    if len(rows) == 1:  # a single point: give it some room instead of matplotlib's +-5% of nothing
        ax_loss.set_xlim(epoch[0] - 1, epoch[0] + 1)
        ax_acc.set_xlim(epoch[0] - 1, epoch[0] + 1)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# confusion matrix


def _check_confusion(cm: np.ndarray, class_names: list[str]) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(
            "confusion matrix must be square (K, K) with rows = true class and columns = predicted class; "
            f"got shape {cm.shape}"
        )
    if cm.shape[0] < 1:
        raise ValueError("confusion matrix is empty; expected at least one class")
    if not np.issubdtype(cm.dtype, np.number) or not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("confusion matrix must hold non-negative finite counts")
    if (cm != np.round(cm)).any():
        raise ValueError(
            "confusion matrix must hold whole counts, not rates; pass the counts, the % are derived"
        )
    if len(class_names) != cm.shape[0]:
        raise ValueError(
            f"got {len(class_names)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix"
        )
    return cm.astype(np.int64)


def _confusion_panel(
    fig: Figure,
    ax: Axes,
    values: np.ndarray,
    vmax_diag: float,
    annotate: Callable[[int, int], str] | None,
    unit: str,
) -> None:
    """Draw one (K, K) panel. The diagonal and the errors get separate colour maps.

    Why: on MNIST the diagonal holds ~1000 per class and the errors 0-20. On one linear scale every error is
    white; on a log scale the eye still compares errors against the diagonal. Giving the errors their own map,
    scaled to the largest error, makes the worst confusion the darkest red and any non-zero error visible,
    while the diagonal (blue) reads as "correct" at a glance.
    """
    k = values.shape[0]
    diag = np.eye(k, dtype=bool)
    off = np.ma.masked_where(diag, values)
    on = np.ma.masked_where(~diag, values)
    off_max = float(off.max()) if off.count() and off.max() > 0 else 1.0
    im_off = ax.imshow(off, cmap="Reds", norm=Normalize(0, off_max), interpolation="nearest")
    im_on = ax.imshow(on, cmap="Blues", norm=Normalize(0, vmax_diag), interpolation="nearest")

    fontsize = 9 if k <= 10 else 7 if k <= 15 else 6
    if annotate is not None:
        for i in range(k):
            for j in range(k):
                text = annotate(i, j)
                if not text:
                    continue
                level = values[i, j] / (vmax_diag if i == j else off_max)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if level > 0.55 else "black",
                )

    tick_size = 9 if k <= 15 else 7 if k <= 30 else 6
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.tick_params(labelsize=tick_size, length=2)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    cb_off = fig.colorbar(im_off, ax=ax, fraction=0.04, pad=0.02)
    cb_off.set_label(f"errors ({unit})", fontsize=8)
    cb_on = fig.colorbar(im_on, ax=ax, fraction=0.04, pad=0.02)
    cb_on.set_label(f"correct ({unit})", fontsize=8)
    for cb in (cb_off, cb_on):
        cb.ax.tick_params(labelsize=7)


def save_confusion(cm: np.ndarray, class_names: list[str], path: Path, title: str | None = None) -> Path:
    """Save a two-panel confusion matrix: counts, and percentages of each true class (row).

    ``cm``: (K, K) counts, rows = true class, columns = predicted class, 1 <= K (tested up to 47).
    Cells are annotated for K <= 20; for larger K only colours and colour bars remain.
    """
    cm = _check_confusion(cm, class_names)
    k = cm.shape[0]
    row_sum = cm.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * cm, row_sum, out=np.zeros(cm.shape), where=row_sum > 0)
    annotated = k <= MAX_ANNOTATED_CLASSES

    def count_text(i: int, j: int) -> str:
        return str(cm[i, j])

    def pct_text(i: int, j: int) -> str:
        if cm[i, j] == 0:
            return ""  # zeros are the majority of cells; leaving them blank makes the errors stand out
        return "<0.1" if pct[i, j] < 0.05 else f"{pct[i, j]:.1f}"

    side = max(4.2, 0.42 * k) if annotated else max(4.2, 0.24 * k)
    # each panel carries two colour bars (~1.7 in); without that width the square heatmaps shrink
    fig = Figure(figsize=(2 * (side + 1.7), side + 1.1), layout="constrained")
    ax_count, ax_pct = fig.subplots(1, 2)
    _confusion_panel(
        fig,
        ax_count,
        cm.astype(float),
        max(1.0, float(np.diag(cm).max())),
        count_text if annotated else None,
        "count",
    )
    _confusion_panel(fig, ax_pct, pct, 100.0, pct_text if annotated else None, "% of row")
    ax_count.set_title("counts")
    ax_pct.set_title("% of true class (diagonal = recall)")
    for ax in (ax_count, ax_pct):
        ax.set_xticklabels(class_names, rotation=90 if k > 10 or max(map(len, class_names)) > 3 else 0)
        ax.set_yticklabels(class_names)

    total = int(cm.sum())
    accuracy = f"accuracy {100 * np.trace(cm) / total:.2f}% of n={total}" if total else "no samples"
    fig.suptitle(f"{title}\n{accuracy}" if title else accuracy)
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# image grids


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_height() -> int:
    """Height of a text band: the default font's tallest glyph box plus a pixel above and below."""
    return int(_font().getbbox("0Ag|")[3]) + 2


def _as_image_stack(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) uint8; a (N, 1, H, W) batch is accepted and squeezed since that is how models see digits."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, H, W) stack of images; got shape {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 (0 = background, 255 = stroke); got {x.dtype}. "
            "For floats in [0, 1] pass (x * 255).round().astype(np.uint8)"
        )
    return x


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut to ``width`` pixels; arrows spelled in ASCII, which PIL's built-in font lacks."""
    text = text.replace("\u2192", "->").replace("\u2190", "<-")
    while len(text) > 1 and draw.textlength(text, font=_font()) > width:
        text = text[:-1]
    return text


def image_grid(
    images: np.ndarray, nrow: int, pad: int = 2, scale: int = 2, labels: list[str] | None = None
) -> Image.Image:
    """Tile (N, H, W) uint8 images into one 'L' image, ``nrow`` images per row, padding in gray.

    Each cell is upscaled by ``scale`` (nearest neighbour). With ``labels``, a text band of height
    ``T`` (the default font's line height) sits above each cell. With ``c = min(nrow, N)`` columns and
    ``r = ceil(N / c)`` rows the result is exactly ``width = pad + c * (W * scale + pad)`` by
    ``height = pad + r * (T + H * scale + pad)``, T = 0 without labels.
    Image i sits in row ``i // c``, column ``i % c``; unused trailing cells are padding.
    """
    x = _as_image_stack(images, "images")
    n, h, w = x.shape
    if nrow < 1 or scale < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1, scale >= 1, pad >= 0; got nrow={nrow}, scale={scale}, pad={pad}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images; pass one label per image or none")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    cell_h, cell_w = h * scale, w * scale
    text_h = _text_height() if labels is not None else 0

    canvas = np.full((pad + rows * (text_h + cell_h + pad), pad + cols * (cell_w + pad)), PAD_GRAY, np.uint8)
    big = x.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        r, c = divmod(i, cols)
        top = pad + r * (text_h + cell_h + pad) + text_h
        left = pad + c * (cell_w + pad)
        canvas[top : top + cell_h, left : left + cell_w] = big[i]
    grid = Image.fromarray(canvas, mode="L")

    if labels is not None:
        draw = ImageDraw.Draw(grid)
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            text = _fit_text(draw, str(label), cell_w + pad)
            centre_x = pad + c * (cell_w + pad) + cell_w / 2
            band_top = pad + r * (text_h + cell_h + pad)
            draw.text((centre_x, band_top + text_h / 2), text, fill=LABEL_FILL, font=_font(), anchor="mm")
    return grid


def save_image_grid(
    images: np.ndarray,
    path: Path,
    nrow: int,
    *,
    pad: int = 2,
    scale: int = 2,
    labels: list[str] | None = None,
) -> Path:
    """``image_grid(images, nrow, pad, scale, labels)`` saved to ``path`` (format from the suffix)."""
    grid = image_grid(images, nrow, pad=pad, scale=scale, labels=labels)
    return _atomic_write(path, grid.save)


def pairs_grid(originals: np.ndarray, augmented: np.ndarray, title: str | None = None) -> Image.Image:
    """One row per original: the original, an orange separator bar, then its K augmented copies ('RGB').

    ``originals`` (N, H, W) uint8, ``augmented`` (N, K, H, W) uint8. Built from two ``image_grid`` calls
    (default pad 2, scale 2) joined by a ``SEPARATOR_PX`` bar; a title adds one text band on top.
    """
    x = _as_image_stack(originals, "originals")
    aug = np.asarray(augmented)
    n, h, w = x.shape
    if aug.ndim != 4 or aug.shape[0] != n or aug.shape[2:] != (h, w) or aug.shape[1] == 0:
        raise ValueError(
            f"augmented must be (N, K, H, W) = ({n}, K>=1, {h}, {w}) to match originals of shape {x.shape}; "
            f"got {aug.shape}"
        )
    k = aug.shape[1]
    left = image_grid(x, nrow=1)
    right = image_grid(_as_image_stack(aug.reshape(n * k, h, w), "augmented"), nrow=k)
    title_h = _text_height() + 4 if title else 0

    out = Image.new("RGB", (left.width + SEPARATOR_PX + right.width, title_h + left.height), (PAD_GRAY,) * 3)
    out.paste(left.convert("RGB"), (0, title_h))
    out.paste(Image.new("RGB", (SEPARATOR_PX, left.height), SEPARATOR_RGB), (left.width, title_h))
    out.paste(right.convert("RGB"), (left.width + SEPARATOR_PX, title_h))
    if title:
        draw = ImageDraw.Draw(out)
        draw.text(
            (4, title_h / 2),
            _fit_text(draw, title, out.width - 8),
            fill=(255,) * 3,
            font=_font(),
            anchor="lm",
        )
    return out


def save_pairs_grid(
    originals: np.ndarray, augmented: np.ndarray, path: Path, title: str | None = None
) -> Path:
    """``pairs_grid(originals, augmented, title)`` saved to ``path``; used by ``digitkit augment preview``."""
    return _atomic_write(path, pairs_grid(originals, augmented, title).save)


# ------------------------------------------------------------------------------------------ evaluation figures
# (reliability diagram, error gallery, robustness and adversarial charts)


def save_reliability(calib: dict, path: Path, title: str | None = None) -> Path:
    """Reliability diagram from ``metrics.calibration``'s dict ``{ece, mce, bins: [{lo, hi, count, confidence,
    accuracy}]}``: per confidence bin the accuracy (bar) against the diagonal of perfect calibration, the gap
    to the bin's mean confidence hatched, and underneath the number of predictions per bin (log scale when
    they span decades: on a good digit model nearly all of them sit in the top bin). ECE and MCE in the title.
    """
    bins = calib.get("bins") if isinstance(calib, dict) else None
    if not bins or "ece" not in calib:
        raise ValueError("save_reliability needs metrics.calibration(...)'s dict {ece, mce, bins: [...]}")
    keys = ("lo", "hi", "count", "confidence", "accuracy")
    missing = [k for k in keys if any(k not in b for b in bins)]
    if missing:
        raise ValueError(f"every calibration bin needs {list(keys)}; some lack {missing}")
    lo, hi, count, conf, acc = (np.array([float(b[k]) for b in bins]) for k in keys)
    if (count < 0).any() or not (hi > lo).all() or ((acc < 0) | (acc > 1) | (conf < 0) | (conf > 1)).any():
        raise ValueError("calibration bins need counts >= 0, lo < hi, and accuracy and confidence in [0, 1]")
    filled = count > 0
    width = hi - lo

    fig = Figure(figsize=(6.0, 6.6), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], color="0.35", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar(lo[filled], acc[filled], width=width[filled], align="edge", color="C0", edgecolor="white",
           label="accuracy in bin")  # fmt: skip
    ax.bar(lo[filled], (conf - acc)[filled], bottom=acc[filled], width=width[filled], align="edge",
           color="C3", alpha=0.25, hatch="//", edgecolor="C3", linewidth=0, label="gap to mean confidence")  # fmt: skip
    ax.plot(conf[filled], acc[filled], "o", color="C1", markersize=4, label="(mean confidence, accuracy)")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    ax_n.bar(lo, count, width=width, align="edge", color="0.55", edgecolor="white")
    if filled.any() and count.max() / count[filled].min() > 20:
        ax_n.set_yscale("log")
    if len(bins) <= 20:
        for x, n in zip(lo + width / 2, count, strict=True):
            if n > 0:
                ax_n.annotate(f"{int(n):,}", (x, n), textcoords="offset points", xytext=(0, 2), ha="center",
                              fontsize=7)  # fmt: skip
    ax_n.set(xlabel="confidence (max probability)", ylabel="predictions")
    ax_n.grid(alpha=0.3, axis="y")

    total = int(count.sum())
    mce = f", MCE {100 * float(calib['mce']):.2f}%" if "mce" in calib else ""
    summary = f"ECE {100 * float(calib['ece']):.2f}%{mce} ({total:,} predictions, {len(bins)} bins)"
    fig.suptitle(f"{title}\n{summary}" if title else f"reliability: {summary}")
    return _save_figure(fig, path)


GALLERY_SCALE = 3  # 28 px digits become 84 px tiles: strokes readable at 1:1 in a report


def save_error_gallery(
    images: np.ndarray,
    groups: list[dict],
    classes: list[str],
    path: Path,
    per_group: int = 8,
    max_groups: int = 12,
    title: str | None = None,
) -> Path:
    """One row per (true -> predicted) group from ``metrics.error_groups``, largest group first: its
    ``per_group`` most confident errors, each captioned with the confidence of the wrong answer, the row
    labelled "7 -> 1 (23)" (23 errors in the group). At most ``max_groups`` rows; a footer counts the rest.

    ``images`` (N, 1, H, W) or (N, H, W) uint8, indexed by the groups' ``indices``; ``classes`` names the
    groups' ``true`` and ``predicted`` class indices.
    """
    if per_group < 1 or max_groups < 1:
        raise ValueError(f"need per_group >= 1 and max_groups >= 1; got {per_group} and {max_groups}")
    if not groups:
        raise ValueError("save_error_gallery got no error groups: there are no errors to show")
    x = _as_image_stack(images, "images")
    shown = groups[:max_groups]
    rows: list[tuple[str, Image.Image]] = []
    for g in shown:
        idx = [int(i) for i in g["indices"][:per_group]]
        conf = [float(c) for c in g["confidences"][:per_group]]
        if not idx or len(conf) != len(idx):
            raise ValueError(f"group {g.get('true')} -> {g.get('predicted')} needs indices and as many confidences")
        if min(idx) < 0 or max(idx) >= len(x):
            raise ValueError(f"group indices go up to {max(idx)} but there are only {len(x)} images")
        t, p = int(g["true"]), int(g["predicted"])
        if not (0 <= t < len(classes) and 0 <= p < len(classes)):
            raise ValueError(f"group {t} -> {p} names a class outside the {len(classes)} class names")
        grid = image_grid(x[idx], per_group, pad=2, scale=GALLERY_SCALE, labels=[f"{100 * c:.1f}%" for c in conf])
        rows.append((f"{classes[t]} -> {classes[p]} ({g['count']})", grid))

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 16 + int(max(draw.textlength(label, font=_font()) for label, _ in rows))
    row_gap = 4
    grid_w = 2 + per_group * (x.shape[2] * GALLERY_SCALE + 2)
    text_h = _text_height() + 4
    rest = groups[len(shown) :]
    lines = [title or "most confident errors", "row: true -> predicted (errors in group); caption: confidence"]
    head_h = text_h * len(lines)
    foot_h = text_h if rest else 0
    width = max(label_w + grid_w, 360)
    height = head_h + sum(grid.height + row_gap for _, grid in rows) + foot_h
    out = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((6, text_h * i + text_h / 2), _fit_text(draw, line, width - 12), fill=(255,) * 3, font=_font(),
                  anchor="lm")  # fmt: skip
    top = head_h
    for label, grid in rows:
        out.paste(Image.new("RGB", (width, grid.height), (PAD_GRAY,) * 3), (0, top))
        out.paste(grid.convert("RGB"), (label_w, top))
        draw.text((8, top + grid.height / 2), label, fill=(255,) * 3, font=_font(), anchor="lm")
        top += grid.height + row_gap
    if rest:
        more = f"+ {len(rest)} more groups with {sum(int(g['count']) for g in rest)} errors (see errors.csv)"
        draw.text((6, top + text_h / 2), _fit_text(draw, more, width - 12), fill=(255,) * 3, font=_font(), anchor="lm")
    return _atomic_write(path, out.save)


def _eval_percent(values: list[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name} must be non-empty finite accuracies")
    if (x < 0).any() or (x > 1.0 + 1e-9).any():
        raise ValueError(f"{name} must be fractions in [0, 1]; if they are percentages, divide by 100")
    return 100 * x


ROBUSTNESS_REFERENCES = ("clean", "augmented")  # drawn apart from the corruptions and left out of their mean


def save_robustness(results: dict[str, float], path: Path, title: str | None = None) -> Path:
    """Horizontal bars of accuracy per test set ({name: accuracy in [0, 1]}), best on top, each value in its
    label. "clean" and "augmented" get their own colours; the dashed line is the mean over the other entries
    (the corruptions), or over all entries when there are no others.
    """
    if not results:
        raise ValueError("save_robustness got no results; expected {test set name: accuracy}")
    names = sorted(results, key=lambda k: (-float(results[k]), k))
    acc = _eval_percent([results[k] for k in names], "robustness accuracies")
    others = [a for k, a in zip(names, acc, strict=True) if k not in ROBUSTNESS_REFERENCES]
    pool = others or list(acc)
    mean = float(np.mean(pool))
    colours = {"clean": "C0", "augmented": "C2"}

    fig = Figure(figsize=(7.5, 1.4 + 0.34 * len(names)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]  # barh counts from the bottom; the best goes on top
    ax.barh(y, acc, color=[colours.get(k, "C1") for k in names], height=0.7)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{k}  {a:.2f}%" for k, a in zip(names, acc, strict=True)], fontsize=8)
    what = f"mean of {len(others)} corruptions" if others else "mean"
    ax.axvline(mean, color="0.2", linestyle="--", linewidth=1.2, label=f"{what}: {mean:.2f}%")
    low = float(acc.min())
    left = 0.0 if low < 50 else 10 * math.floor((low - 5) / 10)  # zoom in; the labels carry the exact values
    ax.set_xlim(left, 100)
    ax.set_xlabel("accuracy (%)" + (f", axis from {left:g}%" if left > 0 else ""))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="lower right")  # sorted best on top: the bottom right is where bars are shortest
    head = f"accuracy per test set (worst: {names[-1]} {acc[-1]:.2f}%)"
    fig.suptitle(f"{title}\n{head}" if title else head)
    return _save_figure(fig, path)


def save_attack_curves(curves: dict[str, list[tuple[float, float]]], path: Path, title: str | None = None) -> Path:
    """Accuracy against the attack budget epsilon (L-infinity, pixel units in [0, 1]), one line per attack or
    attack + defence ({"FGSM": [(0.0, 0.99), (0.1, 0.71), ...], "PGD": ..., "FGSM + noise defence": ...}).
    """
    if not curves:
        raise ValueError("save_attack_curves got no curves; expected {name: [(epsilon, accuracy), ...]}")
    fig = Figure(figsize=(6.5, 4.4), layout="constrained")
    ax = fig.subplots()
    markers = "osD^vP*X"
    for i, (name, points) in enumerate(curves.items()):
        pts = np.asarray(points, dtype=float)
        if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] != 2:
            raise ValueError(f"curve {name!r} must be a non-empty list of (epsilon, accuracy) pairs")
        eps = pts[:, 0]
        if not np.isfinite(eps).all() or (eps < 0).any():
            raise ValueError(f"curve {name!r}: epsilons must be finite and >= 0")
        order = np.argsort(eps, kind="stable")
        acc = _eval_percent(pts[order, 1].tolist(), f"curve {name!r}'s accuracies")
        ax.plot(eps[order], acc, marker=markers[i % len(markers)], color=f"C{i % 10}", markersize=5,
                label=f"{name} ({acc[-1]:.1f}% at {eps[order][-1]:g})")  # fmt: skip
    ax.set(xlabel="epsilon (L-infinity, pixel scale [0, 1])", ylabel="accuracy (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    head = "accuracy under attack"
    fig.suptitle(f"{title}\n{head}" if title else head)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------------------- explanation figures
# (input, attribution map, overlay)


def save_explanation(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    pred_label: str,
    prob: float,
    path: Path,
    title: str | None = None,
) -> Path:
    """One row: the input as the model sees it, then for each method its attribution map and the overlay.

    ``image`` (H, W) floats in [0, 1] (the preprocessed 28x28, not the raw upload); ``maps`` method name ->
    (H, W) attribution in [0, 1], as ``explain.attribute`` returns them. The title states the prediction
    explained, e.g. "predicted 7 (p = 0.993)".
    """
    from digitkit.explain import overlay  # lazy: explain imports torch, which the other figures never need

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"save_explanation needs one (H, W) image; got shape {img.shape}")
    if not maps:
        raise ValueError("save_explanation got no maps; pass {method name: (H, W) attribution}")
    arrays = {name: np.asarray(m, dtype=np.float64) for name, m in maps.items()}
    for name, m in arrays.items():
        if m.shape != img.shape:
            raise ValueError(f"map {name!r} has shape {m.shape} but the image is {img.shape}; they must match")

    cols = 1 + 2 * len(arrays)
    fig = Figure(figsize=(max(4.0, 1.9 * cols), 2.9), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    axes[0].imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    for i, (name, m) in enumerate(arrays.items()):
        axes[1 + 2 * i].imshow(m, cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
        axes[1 + 2 * i].set_title(name, fontsize=9)
        axes[2 + 2 * i].imshow(overlay(img, m), interpolation="nearest")
        axes[2 + 2 * i].set_title(f"{name} overlay", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    headline = f"predicted {pred_label} (p = {prob:.3f})"
    fig.suptitle(f"{title}\n{headline}" if title else headline)
    return _save_figure(fig, path)


# ------------------------------------------------------------------------------------------ comparison figures
# (cross-validation folds, config comparison)


def _as_percent(values: list[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name} must be a non-empty list of finite accuracies; got {values!r}")
    if (x < 0).any() or (x > 1.0 + 1e-9).any():
        raise ValueError(f"{name} must be fractions in [0, 1]; if they are percentages, divide by 100")
    return 100 * x


def save_cv(fold_accuracies: list[float], path: Path, title: str | None = None) -> Path:
    """Per-fold validation accuracy (dots), the mean (line) and mean +- sample std (ddof=1, shaded band).

    ``fold_accuracies``: fractions in [0, 1], fold 1 first; at least two folds (a std needs two values).
    """
    acc = _as_percent(fold_accuracies, "fold_accuracies")
    if acc.size < 2:
        raise ValueError("save_cv needs at least two folds")
    n, mean, std = acc.size, float(acc.mean()), float(acc.std(ddof=1))
    folds = np.arange(1, n + 1)
    fig = Figure(figsize=(max(5.0, 0.55 * n + 3.0), 4.0), layout="constrained")
    ax = fig.subplots()
    ax.axhspan(mean - std, mean + std, color="C0", alpha=0.15, label="mean +- std")
    ax.axhline(mean, color="C0", linewidth=1.5, label=f"mean {mean:.2f}%")
    ax.plot(folds, acc, "o", color="C1", markersize=7, label="held-out fold")
    for f, a in zip(folds, acc, strict=True):
        ax.annotate(f"{a:.2f}", (f, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    spread = max(float(acc.max() - acc.min()), 2 * std, 0.05)  # all folds equal: still show a readable band
    ax.set_ylim(min(acc.min(), mean - std) - 0.6 * spread, max(acc.max(), mean + std) + 0.6 * spread)
    ax.set_xlim(0.4, n + 0.6)
    ax.set_xticks(folds)
    ax.set(xlabel="fold (held out: validation)", ylabel="validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    summary = f"accuracy {mean:.2f} +- {std:.2f}% (n={n} folds, sample std)"
    fig.suptitle(f"{title}\n{summary}" if title else summary)
    return _save_figure(fig, path)


def save_comparison(
    names: list[str],
    accuracies: list[list[float]],
    path: Path,
    params: list[int | None] | None = None,
    title: str | None = None,
) -> Path:
    """Test accuracy per entry: each seed a dot, the mean a wide tick with +- sample std (ddof=1) error bars.

    ``accuracies[i]``: entry i's per-seed accuracies as fractions in [0, 1] (one seed: the mean alone, no error
    bar). ``params[i]``, when given, is written under the entry's name.
    """
    if not names or len(names) != len(accuracies) or (params is not None and len(params) != len(names)):
        raise ValueError(f"got {len(names)} names, {len(accuracies)} accuracy lists and "
                         f"{'no' if params is None else len(params)} params; pass one of each per entry")  # fmt: skip
    values = [_as_percent(a, f"accuracies[{i}]") for i, a in enumerate(accuracies)]
    fig = Figure(figsize=(max(5.0, 1.3 * len(names) + 2.0), 4.6), layout="constrained")
    ax = fig.subplots()
    for i, v in enumerate(values):
        mean = float(v.mean())
        std = float(v.std(ddof=1)) if v.size > 1 else 0.0
        ax.errorbar(i, mean, yerr=std if v.size > 1 else None, fmt="_", markersize=22, color="C0",
                    capsize=6, elinewidth=1.5, zorder=2)  # fmt: skip
        offsets = np.linspace(-0.12, 0.12, v.size) if v.size > 1 else np.zeros(1)
        ax.plot(i + offsets, v, "o", color="C1", markersize=5, alpha=0.8, zorder=3)
        label = f"{mean:.2f}" + (f" +- {std:.2f}" if v.size > 1 else "") + f"\nn={v.size}"
        ax.annotate(label, (i, max(float(v.max()), mean + std)), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)  # fmt: skip
    ticks = []
    for i, name in enumerate(names):
        p = params[i] if params is not None else None
        ticks.append(name if p is None else f"{name}\n{p / 1e3:,.1f}k params")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(ticks, fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    everything = np.concatenate(values)
    spread = max(float(everything.max() - everything.min()), 0.05)
    ax.set_ylim(everything.min() - 0.4 * spread, everything.max() + 0.5 * spread)
    ax.set_ylabel("test accuracy (%)")
    ax.plot([], [], "_", color="C0", markersize=12, label="mean +- std")
    ax.plot([], [], "o", color="C1", markersize=5, label="one seed")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    note = "test accuracy: reported, never used to choose"
    fig.suptitle(f"{title}\n{note}" if title else note)
    return _save_figure(fig, path)


def save_sparsity_curve(
    rows: list[dict[str, float | None]],
    path: Path,
    source: dict[str, float | None] | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy against pruning sparsity: each row has ``sparsity`` and ``val_accuracy``, optionally
    ``test_accuracy`` and ``val_before_finetune`` (fractions in [0, 1]); ``source`` (``val_accuracy``,
    ``test_accuracy``) is drawn at sparsity 0."""
    if not rows:
        raise ValueError("no pruned models to plot; pass one row per sparsity")
    pts = sorted(rows, key=lambda r: float(r["sparsity"]))
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for key, label, style in (("test_accuracy", "test (reported only)", "o-"), ("val_accuracy", "validation", "s--"),
                              ("val_before_finetune", "validation before fine-tuning", "x:")):  # fmt: skip
        xs, ys = [], []
        if source is not None and source.get(key) is not None:
            xs.append(0.0)
            ys.append(100 * float(source[key]))
        for r in pts:
            if r.get(key) is not None:
                xs.append(100 * float(r["sparsity"]))
                ys.append(100 * float(r[key]))
        if len(xs) > (1 if source is not None and source.get(key) is not None else 0):
            ax.plot(xs, ys, style, label=label, markersize=5)
            for x, y in zip(xs, ys, strict=True):
                if key == "test_accuracy":
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "accuracy against sparsity")
    return _save_figure(fig, path)
