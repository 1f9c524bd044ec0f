"""digitkit.corruptions: the MNIST-C style suite, on 300 real MNIST test images (a few seconds in all)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from digitkit import corruptions as C
from digitkit import data
from digitkit.errors import ConfigError

from .conftest import MNIST_DIR

SEEDLESS = {"brightness", "canny_edges"}  # no randomness, in MNIST-C too
GEOMETRIC = ("rotate", "shear", "translate")  # move ink around without creating or destroying it


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return data.load_split(MNIST_DIR, "test").images[:300].clone()


@pytest.fixture(scope="module")
def suite(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every corruption of x at seed 0, computed once for the module."""
    return C.corruption_suite(x, seed=0)


def ink(images: torch.Tensor) -> torch.Tensor:
    """(N,) total ink per image."""
    return images.float().sum((1, 2, 3))


def dilate(mask: torch.Tensor, r: int) -> torch.Tensor:
    return F.max_pool2d(mask.float(), 2 * r + 1, stride=1, padding=r) > 0


def test_names_and_table() -> None:
    assert C.CORRUPTIONS == (
        "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
        "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges",
    )  # fmt: skip
    assert set(C.PARAMS) == set(C.CORRUPTIONS)
    for name, (levels, default) in C.PARAMS.items():
        assert len(levels) in (1, 5), name
        assert 1 <= default <= len(levels), name


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_dtype_change_and_determinism(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    before = x.clone()
    y = suite[name]
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(x, before), "the input must not be modified"
    mad = (y.float() - x.float()).abs().mean().item()
    assert mad > 2.0, f"{name} barely changes the images (mean |diff| {mad:.2f} gray levels)"
    assert torch.equal(C.corrupt(x, name, seed=0), y), "same seed, different bytes"
    if name in SEEDLESS:
        assert torch.equal(C.corrupt(x, name, seed=1), y)
    else:
        other = C.corrupt(x, name, seed=1)
        assert not torch.equal(other, y)
        # Different per image, not only somewhere: each image gets its own draws.
        assert (other != y).flatten(1).any(1).float().mean() > 0.5


@pytest.mark.parametrize("name", sorted(set(C.CORRUPTIONS) - SEEDLESS))
def test_each_image_gets_its_own_draws(x: torch.Tensor, name: str) -> None:
    copies = C.corrupt(x[:1].repeat(20, 1, 1, 1), name)
    distinct = {bytes(c.flatten().tolist()) for c in copies}
    # stripe draws from ~140 discrete bands, so a few repeats among 20 are expected
    assert len(distinct) >= 15, f"{name}: 20 copies of one image gave only {len(distinct)} different results"


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_slices_and_chunks_give_the_same_bytes(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    full = suite[name][:60]
    assert torch.equal(C.corrupt(x[:60], name, chunk_size=16), full)
    assert torch.equal(C.corrupt(x[23:51], name, offset=23), full[23:51])
    if name not in SEEDLESS:  # without the offset, the slice is a different set of draws
        assert not torch.equal(C.corrupt(x[23:51], name), full[23:51])


def test_unknown_name_and_bad_arguments(x: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="unknown corruption 'gaussian_noise'.*shot_noise, impulse_noise.*"
                                          "canny_edges"):  # fmt: skip
        C.corrupt(x[:2], "gaussian_noise")
    with pytest.raises(ConfigError, match="severity = 6, expected an integer 1..5"):
        C.corrupt(x[:2], "rotate", severity=6)
    with pytest.raises(ConfigError, match="'zigzag' has no severity levels.*shot_noise"):
        C.corrupt(x[:2], "zigzag", severity=2)
    with pytest.raises(ConfigError, match="offset = -1"):
        C.corrupt(x[:2], "rotate", offset=-1)
    with pytest.raises(ValueError, match="uint8"):
        C.corrupt(x[:2].float(), "rotate")
    assert C.corrupt(x[:0], "fog").shape == (0, 1, 28, 28)


def test_severity_levels(x: torch.Tensor) -> None:
    xs = x[:100]
    for name in ("impulse_noise", "shot_noise", "brightness", "rotate", "fog"):
        _, default = C.PARAMS[name]
        assert torch.equal(C.corrupt(xs, name, severity=default), C.corrupt(xs, name)), name
        mads = [(C.corrupt(xs, name, severity=s).float() - xs.float()).abs().mean().item() for s in range(1, 6)]
        assert mads == sorted(mads), f"{name}: higher severity should change images more: {mads}"


def test_brightness_raises_the_mean(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["brightness"].float()
    c = C.PARAMS["brightness"][0][C.PARAMS["brightness"][1] - 1]
    assert (y >= x.float()).all()
    background = y[x == 0].unique()  # a flat gray
    assert len(background) == 1 and abs(background.item() - 255 * c) <= 1


def test_impulse_noise_is_salt_and_pepper_everywhere(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y, amount = suite["impulse_noise"], C.PARAMS["impulse_noise"][0][C.PARAMS["impulse_noise"][1] - 1]
    changed = y != x
    assert set(y[changed].unique().tolist()) <= {0, 255}
    background, bright_ink = x == 0, x == 255
    assert (y[background] == 255).float().mean().item() == pytest.approx(amount / 2, abs=0.01)  # salt on black
    assert (y[bright_ink] == 0).float().mean().item() == pytest.approx(amount / 2, abs=0.02)  # pepper on ink


def test_shot_noise_perturbs_the_ink_not_the_black(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    # Poisson(c * x) / c, as in MNIST-C: a black pixel has rate 0 and stays black; ink is grainy but unbiased
    # (apart from clipping at white).
    y = suite["shot_noise"]
    assert (y[x == 0] == 0).all()
    gray = (x > 50) & (x < 200)
    assert (y[gray] != x[gray]).float().mean() > 0.8
    assert (y[gray].float().mean() / x[gray].float().mean()).item() == pytest.approx(1.0, abs=0.03)
    assert ink(y).sum() / ink(x).sum() > 0.9


@pytest.mark.parametrize("name", GEOMETRIC + ("glass_blur", "motion_blur"))
def test_ink_is_conserved(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    y = suite[name]
    ratio = ink(y) / ink(x)
    assert ratio.median() == pytest.approx(1.0, abs=0.03), name
    assert (ratio > 0.75).all() and (ratio < 1.1).all(), name
    assert (y != x).flatten(1).any(1).all(), f"{name} left some images untouched"


def test_rotate_and_shear_keep_the_centre_translate_moves_it(x: torch.Tensor,
                                                              suite: dict[str, torch.Tensor]) -> None:
    def centroid(images: torch.Tensor) -> torch.Tensor:  # (N, 2) as (x, y)
        m = images[:, 0].float()
        total = m.sum((1, 2))
        idx = torch.arange(m.shape[-1], dtype=torch.float32)
        return torch.stack([(m.sum(1) * idx).sum(1) / total, (m.sum(2) * idx).sum(1) / total], 1)

    c0 = centroid(x)
    for name in ("rotate", "shear"):  # both about the image centre, which MNIST's centre of mass is close to
        assert (centroid(suite[name]) - c0).norm(dim=1).median() < 1.5, name
    shift = (centroid(suite["translate"]) - c0).abs()
    lo, hi = C.PARAMS["translate"][0][C.PARAMS["translate"][1] - 1]
    assert (shift.median(0).values > lo - 0.5).all() and (shift.median(0).values < hi + 0.5).all()


def test_scale_shrinks_the_digit(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    lo, hi = C.PARAMS["scale"][0][C.PARAMS["scale"][1] - 1]
    ratio = ink(suite["scale"]) / ink(x)  # area scales with s**2
    assert (ratio > 0.8 * lo**2).all() and (ratio < 1.2 * hi**2).all()

    def height(images: torch.Tensor) -> torch.Tensor:
        rows = (images[:, 0] > 64).any(2).float()
        idx = torch.arange(rows.shape[1], dtype=torch.float32)
        return (rows * idx).amax(1) - torch.where(rows > 0, idx, 1e9).amin(1) + 1

    assert (height(suite["scale"]) < height(x)).all()


@pytest.mark.parametrize("name", ["stripe", "dotted_line", "zigzag"])
def test_drawn_corruptions_add_ink_on_black(x: torch.Tensor, suite: dict[str, torch.Tensor], name: str) -> None:
    y = suite[name]
    new_ink = ((x == 0) & (y > 128)).flatten(1).sum(1)
    assert (new_ink >= 8).all(), f"{name}: some images got (almost) no new ink: min {new_ink.min().item()}"
    if name != "stripe":  # lines are drawn over the digit, never erasing it
        assert (y >= x).all()


def test_stripe_inverts_a_full_band(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    inverted = suite["stripe"].int() == 255 - x.int()
    full_col, full_row = inverted[:, 0].all(1), inverted[:, 0].all(2)  # (N, W), (N, H)
    widths = torch.maximum(full_col.sum(1), full_row.sum(1))
    lo, hi = C.PARAMS["stripe"][0][0]
    assert ((widths >= lo) & (widths <= hi)).all()
    assert full_col.any(1).any() and full_row.any(1).any(), "both orientations should occur"


def test_fog_covers_the_background_and_dims_the_digit(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["fog"]
    assert (y[x == 0] > 0).float().mean() > 0.9
    assert y.flatten(1).amax(1).float().mean() < 0.95 * x.flatten(1).amax(1).float().mean()
    # the digit is still brighter than the fog around it
    assert y[x > 200].float().mean() > y[x == 0].float().mean() + 60


def test_spatter_paints_gray_blobs(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["spatter"]
    gray = round(255 * C._MUD_GRAY)
    on_black = y[(x == 0) & (y != x)]
    assert len(on_black) > 1000
    assert (on_black <= gray).all() and (on_black >= 0.8 * gray - 1).all()  # the mask is >= 0.8 or 0
    covered_ink = (x > 200) & (y < x)
    assert (y[covered_ink] <= gray + 0.2 * 255 + 1).all()  # what a blob covers is hidden, not just dimmed
    assert ((y != x).flatten(1).any(1)).float().mean() > 0.5


def test_canny_edges_are_thin_and_on_the_boundary(x: torch.Tensor, suite: dict[str, torch.Tensor]) -> None:
    y = suite["canny_edges"]
    assert set(y.unique().tolist()) == {0, 255}
    edges, digit = y > 0, x >= 128
    assert (edges.flatten(1).sum(1) < (x > 0).flatten(1).sum(1)).all(), "thin edges: fewer pixels than the ink"
    boundary = dilate(digit, 1) & dilate(~digit, 1)  # pixels within 1 px of where the mask changes
    assert (edges & ~dilate(boundary, 1)).sum() == 0, "every edge pixel lies near the digit's outline"
    assert not (edges & ~dilate(~digit, 2)).any(), "no edges deep inside strokes"
    assert (edges.flatten(1).sum(1) > 10).all()
    # thin: no 2 x 2 block of edge pixels is fully lit more than rarely
    blocks = F.avg_pool2d(edges.float(), 2, stride=1) == 1
    assert blocks.sum() < 0.02 * edges.sum()
