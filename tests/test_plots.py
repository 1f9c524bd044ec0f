"""plots.py: every figure is a non-blank PNG; image grids follow their documented pixel arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitkit import plots


def _open_png(path: Path, min_width: int = 300, min_height: int = 200) -> np.ndarray:
    """Open ``path`` with PIL, check it is a sensible, non-blank PNG and return it as a gray array."""
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_width and img.height >= min_height, img.size
        gray = np.asarray(img.convert("L"), dtype=np.float64)
    assert gray.var() > 0, "image is blank"
    return gray


def _constant_images(n: int, h: int = 6, w: int = 5) -> tuple[np.ndarray, list[int]]:
    """n images, each one distinct constant gray that differs from the padding gray."""
    values = [v for v in range(10, 250, 7) if v != plots.PAD_GRAY][:n]
    assert len(values) == n
    return np.stack([np.full((h, w), v, np.uint8) for v in values]), values


def _history(epochs: int, lr_varies: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 0.5 * 0.8**e + 0.01,
                "train_acc": 1 - 0.1 * 0.8**e,
                "val_loss": 0.3 * 0.85**e + 0.03 + 0.001 * max(0, e - 12) ** 2,
                "val_acc": 0.98 + 0.01 * (1 - 0.85**e),
                "lr": 0.1 / e if lr_varies else 0.01,
                "seconds": 2.5,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# image_grid


@pytest.mark.parametrize(
    ("n", "nrow", "pad", "scale"),
    [(1, 8, 2, 2), (7, 3, 2, 3), (12, 4, 0, 1), (5, 10, 3, 2), (9, 1, 1, 4)],
)
def test_image_grid_size_is_exact_arithmetic(n: int, nrow: int, pad: int, scale: int) -> None:
    h, w = 6, 5
    grid = plots.image_grid(np.zeros((n, h, w), np.uint8), nrow=nrow, pad=pad, scale=scale)
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    assert grid.size == (pad + cols * (w * scale + pad), pad + rows * (h * scale + pad))
    assert grid.mode in ("L", "RGB")


def test_image_grid_puts_image_i_in_its_cell_upscaled() -> None:
    n, nrow, pad, scale, h, w = 7, 3, 2, 3, 6, 5
    images, values = _constant_images(n, h, w)
    grid = np.asarray(plots.image_grid(images, nrow=nrow, pad=pad, scale=scale).convert("L"))
    cell_h, cell_w = h * scale, w * scale
    for i, value in enumerate(values):
        r, c = divmod(i, nrow)
        top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        assert grid[top + cell_h // 2, left + cell_w // 2] == value, f"image {i} is not in cell ({r}, {c})"
        # the whole upscaled cell is that image, and the padding right around it is gray
        assert (grid[top : top + cell_h, left : left + cell_w] == value).all()
        assert grid[top - 1, left] == plots.PAD_GRAY and grid[top, left - 1] == plots.PAD_GRAY
    # 7 images in rows of 3: the last two cells of the third row are padding
    last_top = pad + 2 * (cell_h + pad)
    assert (grid[last_top:, pad + cell_w + pad :] == plots.PAD_GRAY).all()


def test_image_grid_upscales_with_nearest_neighbour() -> None:
    img = np.zeros((1, 4, 4), np.uint8)
    img[0, 1, 2] = 255
    grid = np.asarray(plots.image_grid(img, nrow=1, pad=0, scale=3).convert("L"))
    expected = np.zeros((12, 12), np.uint8)
    expected[3:6, 6:9] = 255
    np.testing.assert_array_equal(grid, expected)


def test_image_grid_labels_add_a_drawn_band_per_row() -> None:
    images = np.zeros((6, 28, 28), np.uint8)
    plain = plots.image_grid(images, nrow=3)
    labelled = plots.image_grid(images, nrow=3, labels=[str(i) for i in range(6)])
    assert labelled.width == plain.width
    band = (labelled.height - plain.height) / 2  # two rows, one text band each
    assert band == int(band) and band >= 8
    top_band = np.asarray(labelled.convert("L"))[2 : 2 + int(band), 2 : 2 + 56]
    assert (top_band != plots.PAD_GRAY).any(), "label text was not drawn above the first cell"


def test_image_grid_rejects_bad_input() -> None:
    images = np.zeros((3, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        plots.image_grid(images.astype(np.float32), nrow=2)
    with pytest.raises(ValueError, match="labels"):
        plots.image_grid(images, nrow=2, labels=["a", "b"])
    with pytest.raises(ValueError, match="nrow"):
        plots.image_grid(images, nrow=0)
    with pytest.raises(ValueError, match="non-empty"):
        plots.image_grid(images[:0], nrow=2)


def test_save_image_grid_writes_png_atomically_into_new_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    path = tmp_path / "a" / "b" / "grid.png"
    assert plots.save_image_grid(images, path, nrow=5, labels=list("0123456789")) == path
    _open_png(path, min_width=100, min_height=50)
    with Image.open(path) as img:
        assert img.size == plots.image_grid(images, nrow=5, labels=list("0123456789")).size
    assert list(path.parent.iterdir()) == [path], "a temp file was left behind"


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "grid.png"
    images = np.zeros((2, 28, 28), np.uint8)
    plots.save_image_grid(images, path, nrow=2)
    old = path.read_bytes()

    def crash_half_way(self: Image.Image, fp: str, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        plots.save_image_grid(images + 255, path, nrow=2)
    assert path.read_bytes() == old, "a failed save damaged the previous file"
    assert list(tmp_path.iterdir()) == [path], "a temp file was left behind"


# ---------------------------------------------------------------------------------------------------------
# save_pairs_grid


def test_save_pairs_grid_shape_arithmetic_and_layout(tmp_path: Path) -> None:
    h = w = 28
    cell = 2 * 28 + 2  # default scale 2 and pad 2

    def size(n: int, k: int, title: str | None = None) -> tuple[int, int]:
        path = plots.save_pairs_grid(
            np.zeros((n, h, w), np.uint8),
            np.full((n, k, h, w), 255, np.uint8),
            tmp_path / f"{n}_{k}.png",
            title,
        )
        with Image.open(path) as img:
            return img.size

    w23, h23 = size(2, 3)
    assert size(2, 4) == (w23 + cell, h23), "one more augmented copy adds one cell of width"
    assert size(3, 3) == (w23, h23 + cell), "one more original adds one row"
    titled = size(2, 3, "augment preview")
    assert titled[0] == w23 and titled[1] > h23

    # exact layout: [original grid][separator][augmented grid], each grid as image_grid lays it out
    originals, values = _constant_images(2, h, w)
    augmented = np.stack([np.full((3, h, w), 255 - v, np.uint8) for v in values])
    pairs = np.asarray(plots.pairs_grid(originals, augmented))
    left_width = plots.image_grid(originals, nrow=1).width
    assert pairs.shape == (2 + 2 * cell, left_width + plots.SEPARATOR_PX + 2 + 3 * cell, 3)
    assert (pairs[:, left_width : left_width + plots.SEPARATOR_PX] == plots.SEPARATOR_RGB).all()
    for i, v in enumerate(values):
        centre_y = 2 + i * cell + 28
        assert (pairs[centre_y, 2 + 28] == v).all(), f"original {i} misplaced"
        for j in range(3):
            x = left_width + plots.SEPARATOR_PX + 2 + j * cell + 28
            assert (pairs[centre_y, x] == 255 - v).all(), f"augmented copy {j} of original {i} misplaced"


def test_save_pairs_grid_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="augmented"):
        plots.save_pairs_grid(
            np.zeros((2, 28, 28), np.uint8), np.zeros((3, 4, 28, 28), np.uint8), tmp_path / "x.png"
        )
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------
# save_confusion


@pytest.mark.parametrize("k", [2, 10, 30])
def test_save_confusion_is_a_readable_png(tmp_path: Path, k: int) -> None:
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 5, size=(k, k)) + np.diag(rng.integers(50, 100, size=k))
    path = tmp_path / "figs" / f"cm{k}.png"
    assert plots.save_confusion(cm, [f"c{i}" for i in range(k)], path, title=f"K={k}") == path
    gray = _open_png(path, min_width=600, min_height=300)
    # bigger K gets a bigger figure, so cells do not shrink to nothing
    assert gray.shape[0] >= 300 + 8 * max(0, k - 10)


def test_save_confusion_makes_a_single_error_stand_out(tmp_path: Path) -> None:
    """One error among 3000 correct answers must still colour its cell strongly, not near-white."""

    def strong_red_pixels(cm: np.ndarray, name: str) -> int:
        path = plots.save_confusion(cm, ["a", "b", "c"], tmp_path / name)
        _open_png(path)
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        return int(((rgb[..., 0] > 90) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())

    clean = np.diag([1000, 1000, 1000])
    one_error = clean.copy()
    one_error[0, 1] = 1
    # the colour bars are red in both; the difference is the error cell in the counts and % panels
    assert strong_red_pixels(one_error, "err.png") - strong_red_pixels(clean, "clean.png") > 2 * 2000


def test_save_confusion_rejects_bad_matrices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square"):
        plots.save_confusion(np.ones((3, 4), int), ["a", "b", "c"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="class names"):
        plots.save_confusion(np.ones((3, 3), int), ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="non-negative"):
        plots.save_confusion(-np.ones((2, 2), int), ["a", "b"], tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


# ---------------------------------------------------------------------------------------------------------
# save_history


@pytest.mark.parametrize("epochs", [1, 20])
def test_save_history_is_a_readable_png(tmp_path: Path, epochs: int) -> None:
    path = tmp_path / "runs" / "history.png"
    assert plots.save_history(_history(epochs), path, title="test run") == path
    _open_png(path, min_width=600, min_height=300)


def test_save_history_adds_lr_panel_only_when_lr_changes(tmp_path: Path) -> None:
    def green_pixels(path: Path) -> int:  # the lr curve is drawn in matplotlib's C2 green, (44, 160, 44)
        _open_png(path)
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        return int((np.abs(rgb - np.array([44, 160, 44])).sum(axis=-1) < 30).sum())

    varying = plots.save_history(_history(5, lr_varies=True), tmp_path / "a.png")
    constant = plots.save_history(_history(5, lr_varies=False), tmp_path / "b.png")
    assert green_pixels(varying) > 100
    assert green_pixels(constant) == 0


def test_save_history_rejects_bad_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        plots.save_history([], tmp_path / "h.png")
    rows = _history(3)
    del rows[1]["val_loss"]
    with pytest.raises(ValueError, match="val_loss"):
        plots.save_history(rows, tmp_path / "h.png")
    percent = [dict(r, val_acc=100 * r["val_acc"]) for r in _history(3)]
    with pytest.raises(ValueError, match="divide by 100"):
        plots.save_history(percent, tmp_path / "h.png")


def test_no_pyplot_figures_are_left_open(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plots.save_history(_history(2), tmp_path / "h.png")
    plots.save_confusion(np.eye(3, dtype=int) * 5, ["a", "b", "c"], tmp_path / "cm.png")
    assert len(plt.get_fignums()) == before


# ------------------------------------------------------------------------------------------ explanation figures


def _explanation_inputs() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    yy, xx = np.mgrid[0:28, 0:28]
    image = ((np.abs(xx - 14) < 2) & (np.abs(yy - 14) < 9)).astype(np.float64)  # a "1"
    heat = np.exp(-((xx - 14) ** 2 + (yy - 8) ** 2) / 20.0)
    return image, {"saliency": heat, "gradcam": heat.T}


def test_save_explanation_is_one_readable_row(tmp_path: Path) -> None:
    image, maps = _explanation_inputs()
    one = plots.save_explanation(image, {"saliency": maps["saliency"]}, "1", 0.9934, tmp_path / "one.png")
    two = plots.save_explanation(image, maps, "1", 0.9934, tmp_path / "sub" / "two.png", title="test image 3")
    _open_png(one, min_width=300, min_height=200)
    gray = _open_png(two, min_width=500, min_height=200)
    assert gray.shape[1] > 1.5 * gray.shape[0], "input + 2 x (map, overlay) should be a wide single row"
    with Image.open(one) as a, Image.open(two) as b:
        assert b.width > a.width  # one map + overlay pair more


def test_save_explanation_rejects_mismatched_maps(tmp_path: Path) -> None:
    image, maps = _explanation_inputs()
    with pytest.raises(ValueError, match="shape"):
        plots.save_explanation(image, {"saliency": maps["saliency"][:20]}, "1", 0.5, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no maps"):
        plots.save_explanation(image, {}, "1", 0.5, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------
# evaluation figures: reliability, error gallery, robustness, attack curves


def _calibration_dict(n: int = 500, seed: int = 0) -> dict:
    from digitkit import metrics

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    logits = rng.normal(size=(n, 10)) * 2
    logits[np.arange(n), labels] += 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return metrics.calibration(probs, labels, bins=15)


def test_save_reliability_is_a_readable_png(tmp_path: Path) -> None:
    path = tmp_path / "eval" / "reliability.png"
    assert plots.save_reliability(_calibration_dict(), path, title="test split") == path
    _open_png(path, min_width=500, min_height=500)


def test_save_reliability_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        plots.save_reliability({}, tmp_path / "r.png")
    cal = _calibration_dict()
    del cal["bins"][3]["accuracy"]
    with pytest.raises(ValueError, match="accuracy"):
        plots.save_reliability(cal, tmp_path / "r.png")
    cal = _calibration_dict()
    cal["bins"][14]["accuracy"] = 98.0  # a percentage
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.save_reliability(cal, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def _gallery_inputs() -> tuple[np.ndarray, list[dict], list[int]]:
    """30 constant images (value 10 + 8 i, never the padding gray) and their error groups: (1 -> 7) with 10
    errors at confidences falling with the index, (4 -> 9) with 3, (3 -> 5) with 1."""
    from digitkit import metrics

    values = [v for v in range(10, 250, 8) if v not in (plots.PAD_GRAY, 40)][:30]
    images = np.stack([np.full((1, 28, 28), v, np.uint8) for v in values])
    labels = np.array([1] * 10 + [4] * 3 + [3] + [0] * 16)
    preds = np.array([7] * 10 + [9] * 3 + [5] + [0] * 16)
    conf = np.linspace(0.99, 0.5, 30)
    probs = np.full((30, 10), 0.0)
    probs[:] = ((1 - conf) / 9)[:, None]
    probs[np.arange(30), preds] = conf
    return images, metrics.error_groups(labels, probs), values


def _tile_shown(gallery: np.ndarray, value: int) -> bool:
    return int((gallery == value).sum()) >= (28 * plots.GALLERY_SCALE) ** 2


def test_save_error_gallery_shows_the_most_confident_errors_per_group(tmp_path: Path) -> None:
    images, groups, values = _gallery_inputs()
    path = tmp_path / "errors.png"
    classes = [str(i) for i in range(10)]
    assert plots.save_error_gallery(images, groups, classes, path, per_group=4, title="errors") == path
    gray = _open_png(path, min_width=400, min_height=200)
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    assert (rgb[..., 0] == rgb[..., 2]).all()  # gray tiles and white text only
    for i in (0, 1, 2, 3, 10, 11, 12, 13):  # the 4 most confident of (1 -> 7), all of (4 -> 9) and (3 -> 5)
        assert _tile_shown(gray, values[i]), f"error {i} is missing"
    for i in (4, 9, 14):  # beyond per_group, and a correct prediction
        assert not _tile_shown(gray, values[i]), f"image {i} should not be shown"

    capped = plots.save_error_gallery(images[:, 0], groups, classes, tmp_path / "capped.png", max_groups=2)
    capped_gray = _open_png(capped, min_width=400, min_height=150)
    assert capped_gray.shape[0] < gray.shape[0]  # one row fewer (the footer counts the rest)
    assert not _tile_shown(capped_gray, values[13])
    assert _tile_shown(capped_gray, values[4])  # per_group 8 by default


def test_save_error_gallery_rejects_bad_input(tmp_path: Path) -> None:
    images, groups, _ = _gallery_inputs()
    classes = [str(i) for i in range(10)]
    with pytest.raises(ValueError, match="no error groups"):
        plots.save_error_gallery(images, [], classes, tmp_path / "e.png")
    with pytest.raises(ValueError, match="only 5 images"):
        plots.save_error_gallery(images[:5], groups, classes, tmp_path / "e.png")
    with pytest.raises(ValueError, match="uint8"):
        plots.save_error_gallery(images.astype(np.float32), groups, classes, tmp_path / "e.png")
    with pytest.raises(ValueError, match="class names"):
        plots.save_error_gallery(images, groups, classes[:5], tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_save_robustness_is_a_readable_png(tmp_path: Path) -> None:
    results = {"clean": 0.993, "augmented": 0.975, "gaussian noise": 0.96, "blur": 0.91, "fog": 0.62}
    path = plots.save_robustness(results, tmp_path / "robustness.png", title="cnn3")
    _open_png(path, min_width=500, min_height=200)
    with pytest.raises(ValueError, match="divide by 100"):
        plots.save_robustness({"clean": 99.3}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no results"):
        plots.save_robustness({}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_save_attack_curves_is_a_readable_png(tmp_path: Path) -> None:
    curves = {
        "FGSM": [(0.0, 0.99), (0.05, 0.9), (0.1, 0.7), (0.2, 0.3)],
        "PGD": [(0.2, 0.05), (0.0, 0.99), (0.1, 0.4), (0.05, 0.8)],  # any order
        "FGSM + noise defence": [(0.0, 0.98), (0.05, 0.93), (0.1, 0.8), (0.2, 0.5)],
    }
    path = plots.save_attack_curves(curves, tmp_path / "adversarial.png")
    _open_png(path, min_width=500, min_height=300)
    with pytest.raises(ValueError, match="no curves"):
        plots.save_attack_curves({}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="pairs"):
        plots.save_attack_curves({"FGSM": [0.1, 0.2]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="divide by 100"):
        plots.save_attack_curves({"FGSM": [(0.0, 99.0)]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
