"""digitkit.augment: configs, recipes and the batched ops, on small synthetic digits (no MNIST files)."""

from __future__ import annotations

import math
from dataclasses import fields, replace
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from digitkit import augment as A
from digitkit.errors import ConfigError


def digits(b: int = 8, h: int = 28, w: int = 28, c: int = 1) -> torch.Tensor:
    """(b, c, h, w) copies of a '7'-like glyph: a top bar and a stem, well inside the frame, soft edges."""
    x = torch.zeros(b, c, h, w)
    cy, cx = h // 2, w // 2
    x[:, :, cy - 8 : cy + 8, cx - 2 : cx + 2] = 1.0
    x[:, :, cy - 8 : cy - 5, cx - 6 : cx + 6] = 1.0
    x[:, :, cy - 8 : cy + 8, cx + 2] = 0.5
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centroid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2) ink centre of mass as (x, y) in pixels, for x (B, 1, H, W)."""
    _, _, h, w = x.shape
    m = x[:, 0]
    total = m.sum((1, 2))
    cy = (m.sum(2) * torch.arange(h)).sum(1) / total
    cx = (m.sum(1) * torch.arange(w)).sum(1) / total
    return torch.stack([cx, cy], 1)


def only(op: str, **kw: float) -> A.AugmentConfig:
    """A config with just one op switched on."""
    return A.config_from_dict({op: kw})


def changed(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which samples differ at all."""
    return (y != x).flatten(1).any(1)


# Each op alone at p = 1, strong enough that every sample must change.
STRONG = {
    "rotation": {"p": 1.0, "degrees": 30.0},
    "translate": {"p": 1.0, "pixels": 3.0},
    "scale": {"p": 1.0, "min": 0.7, "max": 0.8},
    "shear": {"p": 1.0, "degrees": 20.0},
    "elastic": {"p": 1.0},
    "noise": {"p": 1.0},
    "erasing": {"p": 1.0, "value": 0.5},  # gray, so that erasing black background is a change too
    "pixels": {"p": 1.0, "drop": 0.2, "add": 0.05},
    "stroke": {"p": 1.0},
    "blur": {"p": 1.0, "sigma_min": 0.8, "sigma_max": 1.5},
    "lowres": {"p": 1.0, "min_size": 8, "max_size": 12},
    "contrast": {"p": 1.0, "min": 0.5, "max": 0.8},
}


def test_identity_config_returns_an_equal_new_tensor():
    cfg = A.AugmentConfig()
    x = digits()
    y = A.augment_batch(x, cfg, gen())
    assert not cfg.enabled
    assert torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("shape", [(8, 1, 28, 28), (4, 2, 20, 36)], ids=["mnist", "nonsquare-2ch"])
@pytest.mark.parametrize("op", sorted(STRONG))
def test_each_op_alone_changes_every_sample_and_keeps_shape_dtype_range(op, shape):
    x = digits(shape[0], shape[2], shape[3], shape[1])
    cfg = only(op, **STRONG[op])
    assert cfg.enabled
    y = A.augment_batch(x, cfg, gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert changed(y, x).all()
    assert torch.equal(x, digits(shape[0], shape[2], shape[3], shape[1]))  # input left alone


def test_float64_input_keeps_its_dtype():
    x = digits(4).double()
    y = A.augment_batch(x, A.load_recipe("combinatorial"), gen())
    assert y.dtype == torch.float64 and changed(y, x).any()


def test_p0_ops_are_noops_and_draw_no_random_numbers():
    d = A.config_to_dict(A.AugmentConfig())
    for op in d:
        d[op].update({k: v for k, v in STRONG[op].items() if k != "p"})
        d[op]["p"] = 0.0
    cfg = A.config_from_dict(d)
    g = gen()
    before = g.get_state()
    x = digits()
    assert torch.equal(A.augment_batch(x, cfg, g), x)
    assert torch.equal(g.get_state(), before)


def test_same_seed_same_output_other_seed_other_output():
    cfg = A.config_from_dict({op: kw for op, kw in STRONG.items()})
    x = digits(16)
    a = A.augment_batch(x, cfg, gen(1))
    b = A.augment_batch(x, cfg, gen(1))
    c = A.augment_batch(x, cfg, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_used_without_a_generator():
    cfg = A.load_recipe("standard")
    torch.manual_seed(5)
    a = A.augment_batch(digits(16), cfg)
    torch.manual_seed(5)
    b = A.augment_batch(digits(16), cfg)
    assert torch.equal(a, b)


def test_each_sample_draws_its_own_parameters():
    y = A.augment_batch(digits(16), only("rotation", p=1.0, degrees=30.0), gen())
    flat = y.flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert float(distance.min()) > 1e-3


@pytest.mark.parametrize("h,w", [(28, 28), (20, 40)])
def test_warp_translates_by_exact_pixels_in_the_right_direction(h, w):
    x = digits(1, h, w)
    shift = torch.tensor([[3.0, -2.0]])  # 3 px right, 2 px up (y grows downward)
    y = A._warp(x, torch.zeros(1), shift, torch.ones(1), torch.zeros(1))
    moved = centroid(y) - centroid(x)
    assert torch.allclose(moved, shift, atol=1e-3)
    assert torch.allclose(y[:, :, :-2, 3:], x[:, :, 2:, :-3], atol=1e-5)  # y[r, c] = x[r + 2, c - 3], exactly


def test_translate_op_stays_within_pixels_and_goes_both_ways():
    x = digits(64)
    y = A.augment_batch(x, only("translate", p=1.0, pixels=2.5), gen())
    moved = centroid(y) - centroid(x)
    assert float(moved.abs().max()) <= 2.5 + 1e-3
    assert float(moved.min()) < -1.0 and float(moved.max()) > 1.0


def test_elastic_displacement_is_in_pixels_and_samples_from_the_displaced_point():
    x = digits(1, 20, 40)
    field = torch.tensor([-3.0, 2.0]).expand(1, 20, 40, 2)  # out(q) = in(q + d): the ink moves by -d
    y = A._warp(x, torch.zeros(1), torch.zeros(1, 2), torch.ones(1), torch.zeros(1), field)
    shifted = A._warp(x, torch.zeros(1), torch.tensor([[3.0, -2.0]]), torch.ones(1), torch.zeros(1))
    assert torch.allclose(y, shifted, atol=1e-5)


def test_warp_rotates_90_degrees_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 28, 28)
    x[:, :, 13:15, 19:21] = 1.0  # right of centre
    y = A._warp(x, torch.tensor([90.0]), torch.zeros(1, 2), torch.ones(1), torch.zeros(1))
    assert torch.allclose(y, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4)
    assert torch.allclose(centroid(y), torch.tensor([[13.5, 7.5]]), atol=1e-3)  # now above centre


def bar_orientation(x: torch.Tensor) -> torch.Tensor:
    """(B,) orientation in degrees of the main axis of the ink, from second moments."""
    m = x[:, 0]
    _, h, w = m.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=m.dtype), torch.arange(w, dtype=m.dtype), indexing="ij")
    c = centroid(x)
    dx, dy = xs - c[:, 0, None, None], ys - c[:, 1, None, None]
    sxx, syy, sxy = ((m * dx * dx).sum((1, 2)), (m * dy * dy).sum((1, 2)), (m * dx * dy).sum((1, 2)))
    return torch.rad2deg(0.5 * torch.atan2(2 * sxy, sxx - syy))


def test_rotation_op_angles_stay_within_degrees_and_spread_both_ways():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 13:15, 6:22] = 1.0  # horizontal bar: orientation 0
    y = A.augment_batch(x, only("rotation", p=1.0, degrees=30.0), gen())
    angle = bar_orientation(y)
    assert float(angle.abs().max()) <= 31.0
    assert float(angle.min()) < -15.0 and float(angle.max()) > 15.0


def test_dilation_adds_ink_and_erosion_removes_it():
    x = digits(64)
    y = A.augment_batch(x, only("stroke", p=1.0, max_radius=2), gen())
    grown = (y >= x).flatten(1).all(1)
    shrunk = (y <= x).flatten(1).all(1)
    assert bool((grown ^ shrunk).all())  # each sample is exactly one of the two, and changed
    assert 10 < int(grown.sum()) < 54
    assert (y.sum((1, 2, 3))[grown] > x[0].sum()).all()
    assert (y.sum((1, 2, 3))[shrunk] < x[0].sum()).all()


@pytest.mark.parametrize("op,p", [("rotation", 0.3), ("noise", 0.7), ("erasing", 0.5)])
def test_probability_p_is_respected(op, p):
    kw = dict(STRONG[op], p=p)
    x = digits(2000, 12, 12)
    y = A.augment_batch(x, only(op, **kw), gen())
    fraction = float(changed(y, x).float().mean())
    assert abs(fraction - p) < 0.045  # 4 standard deviations of a binomial(2000, p) fraction


def test_small_area_preserving_affine_keeps_the_ink_mass():
    cfg = A.config_from_dict({"rotation": {"p": 1.0, "degrees": 10.0}, "translate": {"p": 1.0, "pixels": 2.0},
                              "shear": {"p": 1.0, "degrees": 10.0}})
    x = digits(32)
    y = A.augment_batch(x, cfg, gen())
    ratio = y.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert float((ratio - 1).abs().max()) < 0.05


def test_scale_changes_the_ink_mass_by_the_area_factor():
    x = digits(8)
    y = A.augment_batch(x, only("scale", p=1.0, min=0.5, max=0.5), gen())
    ratio = y.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert torch.allclose(ratio, torch.full((8,), 0.25), atol=0.02)


def test_elastic_field_is_smooth_and_of_the_expected_size():
    f = A._elastic_field(64, 28, 28, 34.0, 4.0, gen(), torch.device("cpu"))
    assert f.shape == (64, 28, 28, 2)
    # U(-1, 1) noise (std 1/sqrt 3) blurred by a unit-sum 2-D Gaussian keeps 1/(2 sqrt(pi) sigma) of it.
    expected = 34.0 / math.sqrt(3) / (2 * math.sqrt(math.pi) * 4.0)
    assert abs(float(f.std()) / expected - 1) < 0.2
    assert float((f[:, 1:] - f[:, :-1]).std()) < 0.3 * float(f.std())


def test_fixed_parameter_pointwise_ops():
    x = digits(4)
    half = A.augment_batch(x, only("contrast", p=1.0, min=0.5, max=0.5, gamma_min=1.0, gamma_max=1.0), gen())
    assert torch.allclose(half, 0.5 * x)
    square = {"min": 1.0, "max": 1.0, "gamma_min": 2.0, "gamma_max": 2.0}
    squared = A.augment_batch(x, only("contrast", p=1.0, **square), gen())
    assert torch.allclose(squared, x**2)
    dark = A.augment_batch(x, only("pixels", p=1.0, drop=1.0), gen())
    white = A.augment_batch(x, only("pixels", p=1.0, drop=0.0, add=1.0), gen())
    assert torch.equal(dark, torch.zeros_like(x)) and torch.equal(white, torch.ones_like(x))
    whole = {"area_min": 1.0, "area_max": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}
    full = A.augment_batch(x, only("erasing", p=1.0, value=0.25, **whole), gen())
    assert torch.equal(full, torch.full_like(x, 0.25))
    assert torch.equal(A.augment_batch(x, only("noise", p=1.0, sigma=0.0), gen()), x)


def test_pixels_drop_and_add_the_given_fractions():
    x = torch.full((16, 1, 28, 28), 0.5)
    y = A.augment_batch(x, only("pixels", p=1.0, drop=0.3, add=0.2), gen())
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.02
    assert abs(float((y == 1).float().mean()) - 0.2) < 0.02
    assert abs(float((y == 0.5).float().mean()) - 0.5) < 0.02


def test_elastic_goes_to_the_samples_that_drew_it_among_the_warped_ones():
    # Rotation by 0 degrees warps every sample (an identity up to float rounding); elastic picks some of them.
    cfg = A.config_from_dict({"rotation": {"p": 1.0, "degrees": 0.0}, "elastic": {"p": 0.5}})
    x = digits(64)
    y = A.augment_batch(x, cfg, gen(3))
    distorted = (y - x).abs().flatten(1).amax(1) > 0.01
    k = int(distorted.sum())
    assert 16 < k < 48
    assert not bool(distorted[:k].all())  # not simply the first k samples
    assert float((y - x)[~distorted].abs().max()) < 1e-4


def test_erasing_rectangle_has_the_drawn_area():
    x = torch.ones(200, 1, 20, 20)
    y = A.augment_batch(x, only("erasing", p=1.0, area_min=0.1, area_max=0.2), gen())
    erased = (y == 0).flatten(1).float().mean(1)
    assert float(erased.min()) > 0.05 and float(erased.max()) < 0.3  # rounding of the sides blurs the bounds


def test_recipes_ship_with_a_citation_comment_and_load():
    names = A.list_recipes()
    assert names == sorted(names)
    assert {"none", "mild", "standard", "combinatorial", "erasing", "corruption"} <= set(names)
    folder = resources.files("digitkit") / "recipes"
    for name in names:
        assert (folder / f"{name}.yaml").read_text().startswith(f"# {name}:")
        assert isinstance(A.load_recipe(name), A.AugmentConfig)
    assert not A.load_recipe("none").enabled
    assert A.load_recipe("combinatorial").elastic.p > 0
    assert replace(A.load_recipe("combinatorial"), elastic=A.Elastic()) == A.load_recipe("standard")


@pytest.mark.parametrize("name", ["none", "mild", "standard", "combinatorial", "erasing", "corruption"])
def test_recipes_give_legible_outputs(name):
    x = digits(64)
    y = A.augment_batch(x, A.load_recipe(name), gen())
    similarity = F.cosine_similarity(y.flatten(1), x.flatten(1), dim=1)
    assert float((y - x).abs().mean()) < 0.1
    assert float(similarity.mean()) > 0.7
    if name == "none":
        assert torch.equal(y, x)
    else:
        assert changed(y, x).float().mean() > 0.5


def test_unknown_recipe_lists_the_known_names():
    with pytest.raises(ConfigError, match=r"'nonesuch'.*combinatorial.*standard.*YAML"):
        A.load_recipe("nonesuch")
    with pytest.raises(ConfigError, match="not found"):
        A.load_recipe("missing/recipe.yaml")


@pytest.mark.parametrize(
    "d,pattern",
    [
        ({"rotaton": {"p": 0.5}}, r"augment\.rotaton: unknown op; expected one of recipe, rotation"),
        ({"rotation": {"degree": 5}}, r"augment\.rotation\.degree: unknown key; expected one of p, degrees"),
        ({"rotation": {"p": "0.5"}}, r"augment\.rotation\.p = '0\.5': expected a finite number"),
        ({"rotation": {"p": 1.5}}, r"augment\.rotation\.p = 1\.5: expected a probability in \[0, 1\]"),
        ({"stroke": {"max_radius": 1.5}}, r"augment\.stroke\.max_radius = 1\.5: expected an integer"),
        ({"scale": {"min": 1.2, "max": 1.1}}, r"augment\.scale\.min = 1\.2: expected min <= max"),
        ({"noise": {"sigma": -0.1}}, r"augment\.noise\.sigma = -0\.1: expected a number >= 0"),
        ({"pixels": {"drop": 0.7, "add": 0.5}}, r"augment\.pixels\.add = 0\.5: expected drop \+ add <= 1"),
        ({"rotation": 0.5}, r"augment\.rotation = 0\.5: expected a mapping"),
        ({"recipe": 3}, r"augment\.recipe = 3: expected a recipe name"),
        (["rotation"], r"expected a mapping"),
    ],
)
def test_config_from_dict_is_strict_and_names_the_key(d, pattern):
    with pytest.raises(ConfigError, match=pattern):
        A.config_from_dict(d)


def test_dataclasses_validate_on_construction():
    with pytest.raises(ConfigError, match=r"augment\.rotation\.p = 1\.5"):
        A.Rotation(p=1.5)
    with pytest.raises(ConfigError, match=r"augment\.rotation = \{'p': 1\}: expected a Rotation"):
        A.AugmentConfig(rotation={"p": 1})  # type: ignore[arg-type]
    cfg = A.AugmentConfig()
    cfg.contrast.gamma_min = 0.0  # mutated after construction: caught when a config is rebuilt from it
    with pytest.raises(ConfigError, match=r"augment\.contrast\.gamma_min = 0\.0"):
        A.AugmentConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})
    assert A.Rotation(p=1).p == 1.0 and isinstance(A.Rotation(p=1).p, float)


def test_overrides_apply_per_key_on_top_of_the_recipe():
    cfg = A.config_from_dict({"recipe": "standard", "rotation": {"p": 0.9}, "stroke": {"p": 0.1}})
    standard = A.load_recipe("standard")
    assert cfg.rotation == A.Rotation(p=0.9, degrees=standard.rotation.degrees)
    assert cfg.stroke.p == 0.1
    assert cfg.translate == standard.translate and cfg.noise == standard.noise
    assert A.config_from_dict({}) == A.AugmentConfig() == A.config_from_dict({"recipe": "none"})


@pytest.mark.parametrize("name", ["none", "standard", "combinatorial", "erasing", "corruption"])
def test_config_to_dict_round_trips_exactly(name):
    cfg = A.load_recipe(name)
    d = A.config_to_dict(cfg)
    assert "recipe" not in d
    assert set(d) == {f.name for f in fields(A.AugmentConfig)}
    assert set(d["erasing"]) == {f.name for f in fields(A.Erasing)}
    assert A.config_from_dict(d) == cfg


def test_user_yaml_recipe_extends_shipped_and_user_recipes(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# mine\nrecipe: standard\nrotation: {p: 1.0}\n")
    child = tmp_path / "child.yaml"
    child.write_text("recipe: base.yaml\nstroke:\n  p: 0.25\n  max_radius: 2\n")
    standard = A.load_recipe("standard")
    mine = A.load_recipe(str(base))
    assert mine == replace(standard, rotation=A.Rotation(p=1.0, degrees=standard.rotation.degrees))
    assert A.load_recipe(str(child)) == replace(mine, stroke=A.Stroke(p=0.25, max_radius=2))
    assert A.config_from_dict({"recipe": str(child)}) == A.load_recipe(str(child))


def test_bad_user_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rotation: {p: 0.5, degres: 4}\n")
    with pytest.raises(ConfigError, match=r"augment\.rotation\.degres .*bad\.yaml"):
        A.load_recipe(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("rotation: {p: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        A.load_recipe(str(broken))


def test_a_cycle_in_recipe_extension_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("recipe: b.yaml\n")
    (tmp_path / "b.yaml").write_text("recipe: a.yaml\n")
    (tmp_path / "self.yaml").write_text("recipe: self.yaml\n")
    with pytest.raises(ConfigError, match=r"recipe cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        A.load_recipe(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="recipe cycle"):
        A.load_recipe(str(tmp_path / "self.yaml"))


def test_expand_puts_originals_first_then_augmented_copies():
    images = (digits(10) * 255).round().to(torch.uint8)
    labels = torch.arange(10)
    cfg = A.load_recipe("standard")
    x, y = A.expand(images, labels, cfg, factor=3, seed=7, batch_size=4)
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:10], images)
    assert torch.equal(y, labels.repeat(3))
    assert not torch.equal(x[10:20], images) and not torch.equal(x[10:20], x[20:30])
    again, _ = A.expand(images, labels, cfg, factor=3, seed=7, batch_size=4)
    other, _ = A.expand(images, labels, cfg, factor=3, seed=8, batch_size=4)
    assert torch.equal(x, again) and not torch.equal(x, other)
    one, _ = A.expand(images, labels, cfg, factor=1)
    assert torch.equal(one, images)


@pytest.mark.parametrize("factor", [0, -1, 1.5, True])
def test_expand_rejects_a_bad_factor(factor):
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="expand factor"):
        A.expand(images, torch.zeros(2, dtype=torch.int64), A.AugmentConfig(), factor=factor)


def test_combinatorial_runs_on_a_full_batch():
    x = digits(512)
    y = A.augment_batch(x, A.load_recipe("combinatorial"), gen())
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert 0.3 < float(changed(y, x).float().mean()) < 1.0


def test_blur_spreads_ink_and_lowres_loses_detail_but_keep_the_digit():
    x = digits(16)
    blurred = A.augment_batch(x, only("blur", p=1.0, sigma_min=1.0, sigma_max=1.0), gen())
    # A blur lowers the peak and lights pixels next to the strokes, keeping the mass (away from the border).
    assert float(blurred.amax()) < float(x.amax())
    assert ((blurred > 0.05) & (x == 0)).any()
    assert float(blurred.sum()) == pytest.approx(float(x.sum()), rel=0.05)
    low = A.augment_batch(x, only("lowres", p=1.0, min_size=7, max_size=7), gen())
    again = torch.nn.functional.interpolate(torch.nn.functional.interpolate(x, size=(7, 7), mode="area"),
                                            size=(x.shape[2], x.shape[3]), mode="bilinear", align_corners=False)
    assert torch.allclose(low, again.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("mode, grows", [("dilate", True), ("erode", False)])
def test_stroke_mode_dilates_or_erodes_every_sample(mode, grows):
    x = digits(8)
    y = A.augment_batch(x, only("stroke", p=1.0, max_radius=1, mode=mode), gen())
    ink_x, ink_y = (x > 0.25).sum((1, 2, 3)), (y > 0.25).sum((1, 2, 3))
    assert ((ink_y > ink_x) if grows else (ink_y < ink_x)).all()


def test_stroke_mode_is_checked():
    with pytest.raises(ConfigError, match=r"augment\.stroke\.mode = 'thicker': expected both, dilate or erode"):
        A.config_from_dict({"stroke": {"p": 1.0, "mode": "thicker"}})
    with pytest.raises(ConfigError, match=r"augment\.stroke\.mode = 3: expected a word"):
        A.config_from_dict({"stroke": {"p": 1.0, "mode": 3}})
