"""Batched data augmentation for digit images: (B, C, H, W) floats in [0, 1], white ink on black.

Every op draws its own Bernoulli(p) and its own parameters per sample, but the work is done on the whole
batch at once (the cifar10-airbench habit): no Python loop over samples. Rotation, translation, scale and
shear compose into one (B, 2, 3) affine matrix, the elastic field is added to the same sampling grid, and a
single ``F.grid_sample`` warps only the samples that need it. Order: geometry (incl. elastic), stroke,
contrast, pixels, noise, erasing, then clamp to [0, 1]. An op with p = 0 draws no random numbers at all.

Configs are typed dataclasses; the named recipes are YAML files in ``digitkit/recipes`` (``list_recipes``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
import torch.nn.functional as F
import yaml

from digitkit.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Config: one dataclass per op, all defaults are the identity (p = 0).


def _fail(key: str, value: Any, expected: str, fix: str) -> NoReturn:
    raise ConfigError(f"{key} = {value!r}: expected {expected}; {fix}")


class _Op:
    """Shared checks: field types (int -> float coerced so YAML `p: 1` works) and p in [0, 1]."""

    key: ClassVar[str]

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            name, value = f"augment.{self.key}.{f.name}", getattr(self, f.name)
            if f.type in ("str", str):
                if not isinstance(value, str):
                    _fail(name, value, "a word", "e.g. both, dilate or erode")
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    _fail(name, value, "an integer", "write a whole number without quotes")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                _fail(name, value, "a finite number", "write a plain number without quotes")
            else:
                setattr(self, f.name, float(value))
        p = self.p  # type: ignore[attr-defined]
        if not 0.0 <= p <= 1.0:
            _fail(f"augment.{self.key}.p", p, "a probability in [0, 1]", "0 is off, 1 is always")
        self._check()

    def _check(self) -> None:
        """Op-specific range checks."""

    def _at_least(self, name: str, low: float, strict: bool = False) -> None:
        value = getattr(self, name)
        if value < low or (strict and value == low):
            _fail(f"augment.{self.key}.{name}", value, f"a number {'>' if strict else '>='} {low:g}",
                  "give a magnitude; the sign, where there is one, is drawn at random")

    def _ordered(self, lo: str, hi: str) -> None:
        if getattr(self, lo) > getattr(self, hi):
            _fail(f"augment.{self.key}.{lo}", getattr(self, lo), f"{lo} <= {hi} (= {getattr(self, hi)!r})",
                  "swap or fix the two bounds")


@dataclass
class Rotation(_Op):
    """Rotate by an angle uniform in [-degrees, +degrees] (positive = counter-clockwise on screen)."""

    p: float = 0.0
    degrees: float = 10.0
    key: ClassVar[str] = "rotation"

    def _check(self) -> None:
        self._at_least("degrees", 0.0)


@dataclass
class Translate(_Op):
    """Shift by a distance uniform in [-pixels, +pixels], independently per axis."""

    p: float = 0.0
    pixels: float = 2.0
    key: ClassVar[str] = "translate"

    def _check(self) -> None:
        self._at_least("pixels", 0.0)


@dataclass
class Scale(_Op):
    """Zoom about the centre by a factor uniform in [min, max] (> 1 makes the digit bigger)."""

    p: float = 0.0
    min: float = 0.9
    max: float = 1.1
    key: ClassVar[str] = "scale"

    def _check(self) -> None:
        self._at_least("min", 0.0, strict=True)
        self._ordered("min", "max")


@dataclass
class Shear(_Op):
    """Horizontal shear (slant) by an angle uniform in [-degrees, +degrees]."""

    p: float = 0.0
    degrees: float = 10.0
    key: ClassVar[str] = "shear"

    def _check(self) -> None:
        self._at_least("degrees", 0.0)
        if self.degrees >= 90.0:
            _fail("augment.shear.degrees", self.degrees, "an angle below 90", "10-20 degrees is usual")


@dataclass
class Elastic(_Op):
    """Elastic distortion (Simard et al. 2003): uniform(-1, 1) field, blurred (sigma px), times alpha."""

    p: float = 0.0
    alpha: float = 34.0
    sigma: float = 4.0
    key: ClassVar[str] = "elastic"

    def _check(self) -> None:
        self._at_least("alpha", 0.0)
        self._at_least("sigma", 0.0, strict=True)


@dataclass
class Noise(_Op):
    """Additive Gaussian noise with standard deviation sigma (images in [0, 1]; clamped afterwards)."""

    p: float = 0.0
    sigma: float = 0.1
    key: ClassVar[str] = "noise"

    def _check(self) -> None:
        self._at_least("sigma", 0.0)


@dataclass
class Erasing(_Op):
    """Random erasing (Zhong et al. 2020): one rectangle of random area and aspect set to value."""

    p: float = 0.0
    area_min: float = 0.02
    area_max: float = 0.2
    ratio_min: float = 0.3
    ratio_max: float = 3.3
    value: float = 0.0
    key: ClassVar[str] = "erasing"

    def _check(self) -> None:
        self._at_least("area_min", 0.0, strict=True)
        self._ordered("area_min", "area_max")
        if self.area_max > 1.0:
            _fail("augment.erasing.area_max", self.area_max, "a fraction of the image <= 1", "use e.g. 0.2")
        self._at_least("ratio_min", 0.0, strict=True)
        self._ordered("ratio_min", "ratio_max")
        if not 0.0 <= self.value <= 1.0:
            _fail("augment.erasing.value", self.value, "a gray level in [0, 1]", "0 is background, 1 ink")


@dataclass
class Pixels(_Op):
    """Salt and pepper on the ink: a fraction `drop` of pixels set to 0 and a fraction `add` set to 1."""

    p: float = 0.0
    drop: float = 0.05
    add: float = 0.0
    key: ClassVar[str] = "pixels"

    def _check(self) -> None:
        for name in ("drop", "add"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"augment.pixels.{name}", getattr(self, name), "a fraction in [0, 1]", "use e.g. 0.05")
        if self.drop + self.add > 1.0:
            _fail("augment.pixels.add", self.add, f"drop + add <= 1 (drop = {self.drop!r})", "lower either")


@dataclass
class Stroke(_Op):
    """Thicken (dilate) or thin (erode) strokes by a radius uniform in 1..max_radius: `mode` both (each with
    prob 1/2), dilate or erode. Eroding MNIST's ~2 px strokes by one pixel deletes much of them (`digitkit
    augment check` measures it), so recipes for real-world input use dilate."""

    p: float = 0.0
    max_radius: int = 1
    mode: str = "both"
    key: ClassVar[str] = "stroke"

    def _check(self) -> None:
        if self.max_radius < 1:
            _fail("augment.stroke.max_radius", self.max_radius, "an integer >= 1", "1 is one pixel each side")
        if self.mode not in ("both", "dilate", "erode"):
            _fail("augment.stroke.mode", self.mode, "both, dilate or erode", "dilate thickens, erode thins")


@dataclass
class Blur(_Op):
    """Gaussian blur with sigma uniform in [sigma_min, sigma_max] pixels: out-of-focus photos, soft scans."""

    p: float = 0.0
    sigma_min: float = 0.3
    sigma_max: float = 1.0
    key: ClassVar[str] = "blur"

    def _check(self) -> None:
        self._at_least("sigma_min", 0.0, strict=True)
        self._ordered("sigma_min", "sigma_max")


UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "mixed")


@dataclass
class LowRes(_Op):
    """Down-sample to a side drawn uniformly from [min_size, max_size] pixels, then back up: a tiny digit in a
    photo or a coarse scan, enlarged by preprocessing (on 28x28 MNIST, whose digits fill 20 px, a side of 11 leaves
    a digit 8 px tall). `upsample` is how it comes back: bilinear (a smooth enlargement), bicubic (sharper, with
    overshoot), nearest (blocky, as a fax or a pixel-art thumbnail is enlarged), or mixed (each image one of the
    three: bilinear half the time, the others a quarter each)."""

    p: float = 0.0
    min_size: int = 10
    max_size: int = 18
    upsample: str = "bilinear"
    key: ClassVar[str] = "lowres"

    def _check(self) -> None:
        if self.min_size < 2 or self.max_size < self.min_size:
            _fail("augment.lowres", f"{self.min_size}..{self.max_size}", "2 <= min_size <= max_size",
                  "e.g. min_size: 10, max_size: 18 for 28x28 digits")
        if self.upsample not in UPSAMPLE_MODES:
            _fail("augment.lowres.upsample", self.upsample, f"one of {', '.join(UPSAMPLE_MODES)}",
                  "mixed draws one of the others per image")


@dataclass
class Contrast(_Op):
    """Gray: x -> c * x**gamma, c uniform in [min, max], gamma log-uniform in [gamma_min, gamma_max]."""

    p: float = 0.0
    min: float = 0.6
    max: float = 1.0
    gamma_min: float = 0.7
    gamma_max: float = 1.4
    key: ClassVar[str] = "contrast"

    def _check(self) -> None:
        self._at_least("min", 0.0)
        self._ordered("min", "max")
        self._at_least("gamma_min", 0.0, strict=True)
        self._ordered("gamma_min", "gamma_max")


@dataclass
class AugmentConfig:
    """Which ops run, with what probability and strength. Default-constructed, it is the identity."""

    rotation: Rotation = field(default_factory=Rotation)
    translate: Translate = field(default_factory=Translate)
    scale: Scale = field(default_factory=Scale)
    shear: Shear = field(default_factory=Shear)
    elastic: Elastic = field(default_factory=Elastic)
    noise: Noise = field(default_factory=Noise)
    erasing: Erasing = field(default_factory=Erasing)
    pixels: Pixels = field(default_factory=Pixels)
    stroke: Stroke = field(default_factory=Stroke)
    blur: Blur = field(default_factory=Blur)
    lowres: LowRes = field(default_factory=LowRes)
    contrast: Contrast = field(default_factory=Contrast)

    def __post_init__(self) -> None:
        for f in fields(self):
            op, cls = getattr(self, f.name), _OPS[f.name]
            if not isinstance(op, cls):
                raise ConfigError(f"augment.{f.name} = {op!r}: expected a {cls.__name__}; "
                                  f"build it with {cls.__name__}(...) or use config_from_dict")
            op._validate()  # again: the op may have been mutated since it was built

    @property
    def enabled(self) -> bool:
        """True if any op can fire (p > 0)."""
        return any(getattr(self, f.name).p > 0 for f in fields(self))


_OP_CLASSES = (Rotation, Translate, Scale, Shear, Elastic, Noise, Erasing, Pixels, Stroke, Blur, LowRes, Contrast)
_OPS: dict[str, type[_Op]] = {cls.key: cls for cls in _OP_CLASSES}


# ----------------------------------------------------------------------------------------------------------
# Recipes and dicts. The only file I/O in this module: reading recipe YAML files.


def _shipped() -> dict[str, Any]:
    return {p.name[: -len(".yaml")]: p for p in (resources.files("digitkit") / "recipes").iterdir()
            if p.name.endswith(".yaml")}


def list_recipes() -> list[str]:
    """Names of the recipes shipped with digitkit, sorted."""
    return sorted(_shipped())


def load_recipe(name_or_path: str) -> AugmentConfig:
    """A shipped recipe by name (see ``list_recipes``), or a YAML recipe file in the same format."""
    return _load(name_or_path, chain=(), base_dir=None)


def config_from_dict(d: dict) -> AugmentConfig:
    """``{"recipe": "standard", "rotation": {"p": 0.5}}``: the recipe ("none" if absent), then overrides.

    Strict: an unknown op or key, or a value of the wrong type, raises ConfigError naming it.
    """
    return _from_dict(d, chain=(), base_dir=None, where="")


def config_to_dict(cfg: AugmentConfig) -> dict:
    """Every op and key written out (no "recipe" key), so a saved run does not depend on the recipe files."""
    return {f.name: asdict(getattr(cfg, f.name)) for f in fields(cfg)}


def _load(ref: str, chain: tuple[str, ...], base_dir: Path | None) -> AugmentConfig:
    if not isinstance(ref, str):
        raise ConfigError(f"augment.recipe = {ref!r}: expected a recipe name or a YAML path; "
                          f"known names: {', '.join(list_recipes())}")
    shipped = _shipped()
    if ref in shipped:
        ident, text, here = f"recipe '{ref}'", shipped[ref].read_text(encoding="utf-8"), None
    else:
        path = Path(ref).expanduser()
        # A recipe that extends "base.yaml" means the file next to it, not one in the working directory.
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        if not path.is_file():
            if path.suffix in (".yaml", ".yml") or "/" in ref or "\\" in ref:
                raise ConfigError(f"recipe file {str(path)!r} not found; check the path (a relative path "
                                  f"starts from the working directory or from the recipe that extends it)")
            raise ConfigError(f"unknown augmentation recipe {ref!r}: expected one of "
                              f"{', '.join(list_recipes())}, or a path to a YAML recipe file")
        path = path.resolve()
        ident, here = str(path), path.parent
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"recipe file {ident!r}: cannot read ({e.strerror}); check the file") from None
    if ident in chain:
        raise ConfigError(f"recipe cycle: {' -> '.join((*chain, ident))}; remove one of the `recipe:` keys")
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = str(e).replace("\n", " ")
        raise ConfigError(f"{ident}: not valid YAML ({problem}); fix the file") from None
    return _from_dict({} if d is None else d, (*chain, ident), here, where=f" (in {ident})")


def _from_dict(d: Any, chain: tuple[str, ...], base_dir: Path | None, where: str) -> AugmentConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"augment = {d!r}{where}: expected a mapping like {{recipe: standard, "
                          f"rotation: {{p: 0.5}}}}; write one op per key")
    valid = ["recipe", *_OPS]
    for k in d:
        if k not in valid:
            raise ConfigError(f"augment.{k}{where}: unknown op; expected one of {', '.join(valid)}")
    base = d.get("recipe")
    cfg = AugmentConfig() if base is None else _load(base, chain, base_dir)
    ops = {}
    for name, cls in _OPS.items():
        over = d.get(name, {})
        if not isinstance(over, dict):
            raise ConfigError(f"augment.{name} = {over!r}{where}: expected a mapping like {{p: 0.5}}; "
                              f"indent the op's keys under it")
        keys = [f.name for f in fields(cls)]
        for k in over:
            if k not in keys:
                known = ", ".join(keys)
                raise ConfigError(f"augment.{name}.{k}{where}: unknown key; expected one of {known}")
        try:
            ops[name] = replace(getattr(cfg, name), **over)
        except ConfigError as e:
            raise ConfigError(f"{e}{where}") from None
    return AugmentConfig(**ops)


# ----------------------------------------------------------------------------------------------------------
# The augmentation itself.


def _draw_device(gen: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random numbers are drawn: on the generator's device, so the stream does not depend on x's."""
    return gen.device if gen is not None else device


def _rand(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1), drawn on the generator's device and moved to device."""
    return torch.rand(shape, generator=gen, device=_draw_device(gen, device)).to(device, non_blocking=True)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(shape, gen, device)


def _pick(b: int, p: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Indices (K,) of the samples, out of b, that an op with probability p applies to."""
    coins = torch.rand((b,), generator=gen, device=_draw_device(gen, device)) < p
    return coins.nonzero().squeeze(1).to(device, non_blocking=True)


def _affine_theta(
    angle_deg: torch.Tensor,
    shift_px: torch.Tensor,
    scale: torch.Tensor,
    shear_deg: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """The (N, 2, 3) ``affine_grid`` matrix for per-sample angle (N,), shift (N, 2) as (x, y), scale, shear.

    The forward map on centred pixel coordinates (y down) is out = A p + t with A = R S Sh. grid_sample needs
    the inverse, out -> p, in normalized coordinates u = p / (W/2, H/2) (align_corners=False):
    theta = D^-1 A^-1 D and offset -D^-1 A^-1 t.
    Working in pixels first keeps rotations angle-true on non-square images.
    """
    a, k = torch.deg2rad(angle_deg), torch.tan(torch.deg2rad(shear_deg))
    c, s, one, zero = torch.cos(a), torch.sin(a), torch.ones_like(a), torch.zeros_like(a)
    rot_inv = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    shear_inv = torch.stack([torch.stack([one, -k], -1), torch.stack([zero, one], -1)], -2)
    a_inv = shear_inv @ rot_inv / scale[:, None, None]
    # D = diag(W/2, H/2) as Python numbers: a tensor built from them would be a blocking copy to a GPU.
    ratio = torch.ones(2, 2, dtype=a_inv.dtype, device=a_inv.device)
    ratio[0, 1], ratio[1, 0] = height / width, width / height  # d[j] / d[i] at (i, j)
    lin = a_inv * ratio
    shift = -(a_inv @ shift_px[:, :, None]).squeeze(2)
    shift = torch.stack([shift[:, 0] / (width / 2), shift[:, 1] / (height / 2)], 1)
    return torch.cat([lin, shift[:, :, None]], dim=2)


def _elastic_field(n: int, height: int, width: int, alpha: float, sigma: float, gen: torch.Generator | None,
                   device: torch.device) -> torch.Tensor:
    """(N, H, W, 2) displacements (dx, dy) in pixels: uniform(-1, 1) noise, Gaussian-smoothed, times alpha."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    # A circular blur keeps the statistics the same at the border as in the middle without drawing a padded
    # field: the random draws, not the blur, are the cost here. The separable blur is two matmuls with
    # circulant matrices, about 20x faster on CPU than the equivalent depthwise conv2d.
    u = _uniform((n, 2, height, width), -1.0, 1.0, gen, device)
    u = _blur_matrix(g, height) @ u @ _blur_matrix(g, width).T
    return alpha * u.permute(0, 2, 3, 1)


def _blur_matrix(g: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size) circulant matrix: row i holds the kernel g (K,) centred on column i, wrapping around."""
    r = len(g) // 2
    cols = (torch.arange(size, device=g.device)[:, None] + torch.arange(-r, r + 1, device=g.device)) % size
    return torch.zeros(size, size, device=g.device).scatter_add_(1, cols, g.expand(size, -1))


def _warp(x: torch.Tensor, angle_deg: torch.Tensor, shift_px: torch.Tensor, scale: torch.Tensor,
          shear_deg: torch.Tensor, displacement_px: torch.Tensor | None = None) -> torch.Tensor:
    """Warp x (N, C, H, W) by per-sample affine parameters (see ``_affine_theta``) plus an optional
    (N, H, W, 2) elastic displacement in pixels, with one bilinear ``grid_sample``; outside is black (0)."""
    n, _, h, w = x.shape
    theta = _affine_theta(angle_deg, shift_px, scale, shear_deg, h, w).to(x.dtype)
    # The grid F.affine_grid would build (align_corners=False: pixel centres at (2i + 1)/W - 1), as one
    # batched matmul, which is about 4x faster than affine_grid on CPU.
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) * 2 + 1) / h - 1
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones_like(xs).expand(h, w)], -1)
    grid = (base.view(1, h * w, 3) @ theta.transpose(1, 2)).view(n, h, w, 2)
    if displacement_px is not None:
        # One pixel is 2/W (x) or 2/H (y) grid units with align_corners=False.
        disp = displacement_px.to(x.dtype)
        grid = grid + torch.stack([disp[..., 0] * (2 / w), disp[..., 1] * (2 / h)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) blurred with a per-sample sigma (N,) in pixels: one separable depthwise convolution with
    per-sample kernels (the batch folded into channels), zero padding (the background is black)."""
    n, c, h, w = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(y, k[:, None, None, :], padding=(0, r), groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], padding=(r, 0), groups=n * c)
    return y.reshape(n, c, h, w)


def _geometry(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None) -> torch.Tensor:
    """x (B, C, H, W) after rotation, translation, scale, shear, elastic; x itself if no sample drew any.

    The per-sample parameters and the choice of samples stay where they are drawn (the generator's device) and
    reach x's device in one copy each: on a GPU fed by a CPU generator, nothing here waits for the GPU."""
    b, _, h, w = x.shape
    dev, dd = x.device, _draw_device(gen, x.device)
    angle, shear = torch.zeros(b, device=dd), torch.zeros(b, device=dd)
    shift, scale = torch.zeros(b, 2, device=dd), torch.ones(b, device=dd)
    need = torch.zeros(b, dtype=torch.bool, device=dd)
    if cfg.rotation.p > 0:
        i = _pick(b, cfg.rotation.p, gen, dd)
        angle[i] = _uniform((len(i),), -cfg.rotation.degrees, cfg.rotation.degrees, gen, dd)
        need[i] = True
    if cfg.translate.p > 0:
        i = _pick(b, cfg.translate.p, gen, dd)
        shift[i] = _uniform((len(i), 2), -cfg.translate.pixels, cfg.translate.pixels, gen, dd)
        need[i] = True
    if cfg.scale.p > 0:
        i = _pick(b, cfg.scale.p, gen, dd)
        scale[i] = _uniform((len(i),), cfg.scale.min, cfg.scale.max, gen, dd)
        need[i] = True
    if cfg.shear.p > 0:
        i = _pick(b, cfg.shear.p, gen, dd)
        shear[i] = _uniform((len(i),), -cfg.shear.degrees, cfg.shear.degrees, gen, dd)
        need[i] = True
    elastic = None
    if cfg.elastic.p > 0:
        elastic = _pick(b, cfg.elastic.p, gen, dd)
        need[elastic] = True
    rows = need.nonzero().squeeze(1)  # on the draw device: its size is known without asking x's device
    if len(rows) == 0:
        return x
    field_px = None
    if elastic is not None and len(elastic):
        # Fields only for the samples that drew elastic, placed at their positions among the warped rows.
        field_px = torch.zeros(len(rows), h, w, 2, device=dev)
        field_px[torch.searchsorted(rows, elastic).to(dev)] = _elastic_field(
            len(elastic), h, w, cfg.elastic.alpha, cfg.elastic.sigma, gen, dev
        )
    # Only the samples that drew some geometry are resampled: the others stay bit-identical and cost nothing.
    params = (angle[rows], shift[rows], scale[rows], shear[rows])
    rows = rows.to(dev, non_blocking=True)
    out = x.clone()
    out[rows] = _warp(x[rows], *(p.to(dev, non_blocking=True) for p in params), field_px)
    return out


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A new (B, C, H, W) tensor: x (B, C, H, W) float in [0, 1], augmented per sample, clamped to [0, 1].

    All randomness comes from ``generator`` (the global RNG if None), drawn on the generator's device and
    moved to x's, so a seeded generator gives the same result on every call.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch needs a (B, C, H, W) float tensor, got {x.dtype} {tuple(x.shape)}")
    b, _, h, w = x.shape
    dev, gen = x.device, generator
    out = _geometry(x, cfg, gen)
    out = out.clone() if out is x else out  # the ops below write in place, never into the caller's tensor

    st = cfg.stroke
    if st.p > 0 and len(i := _pick(b, st.p, gen, dev)):
        radius = torch.randint(1, st.max_radius + 1, (len(i),), generator=gen, device=_draw_device(gen, dev))
        radius = radius.to(dev)
        # sign * maxpool(sign * x) is a dilation for +1 and an erosion (min-pool) for -1: one pool per radius.
        coin = _rand((len(i),), gen, dev) < {"both": 0.5, "dilate": 2.0, "erode": -1.0}[st.mode]
        sign = torch.where(coin, 1.0, -1.0).to(x.dtype)[:, None, None, None]
        for r in range(1, st.max_radius + 1):
            sel = radius == r
            if sel.any():
                j, sg = i[sel], sign[sel]
                out[j] = sg * F.max_pool2d(sg * out[j], kernel_size=2 * r + 1, stride=1, padding=r)

    bl = cfg.blur
    if bl.p > 0 and len(i := _pick(b, bl.p, gen, dev)):
        sigma = _uniform((len(i),), bl.sigma_min, bl.sigma_max, gen, dev)
        out[i] = _gaussian_blur(out[i], sigma)

    lr = cfg.lowres
    if lr.p > 0 and len(i := _pick(b, lr.p, gen, dev)):
        side = torch.randint(lr.min_size, lr.max_size + 1, (len(i),), generator=gen, device=_draw_device(gen, dev))
        if lr.upsample == "mixed":  # 0, 1: bilinear; 2: bicubic; 3: nearest
            mode = torch.randint(0, 4, (len(i),), generator=gen, device=_draw_device(gen, dev)).clamp(min=1) - 1
        else:
            mode = torch.full((len(i),), ("bilinear", "bicubic", "nearest").index(lr.upsample))
        for s, m in torch.stack([side.cpu(), mode.cpu()], 1).unique(dim=0).tolist():  # one resize per kind drawn
            j = i[((side.cpu() == s) & (mode.cpu() == m)).to(dev)]
            small = F.interpolate(out[j], size=(s, s), mode="area") if s < h else out[j]
            how = ("bilinear", "bicubic", "nearest")[m]
            kw = {"align_corners": False} if how != "nearest" else {}
            out[j] = F.interpolate(small, size=(h, w), mode=how, **kw)

    ct = cfg.contrast
    if ct.p > 0 and len(i := _pick(b, ct.p, gen, dev)):
        level = _uniform((len(i), 1, 1, 1), ct.min, ct.max, gen, dev).to(x.dtype)
        # Log-uniform gamma: 0.7 and 1/0.7 are equally likely, so darkening and lightening balance.
        log_gamma = _uniform((len(i), 1, 1, 1), math.log(ct.gamma_min), math.log(ct.gamma_max), gen, dev)
        gamma = torch.exp(log_gamma)
        out[i] = level * out[i].clamp(min=0).pow(gamma.to(x.dtype))

    px = cfg.pixels
    if px.p > 0 and len(i := _pick(b, px.p, gen, dev)):
        u = _rand((len(i), 1, h, w), gen, dev)  # one draw per pixel, shared by the channels
        y = out[i]
        y = torch.where(u < px.drop, 0.0, y)
        out[i] = torch.where((u >= px.drop) & (u < px.drop + px.add), 1.0, y)

    nz = cfg.noise
    if nz.p > 0 and len(i := _pick(b, nz.p, gen, dev)):
        y = out[i]
        eps = torch.randn(y.shape, generator=gen, device=_draw_device(gen, dev))
        out[i] = y + nz.sigma * eps.to(dev, x.dtype)

    er = cfg.erasing
    if er.p > 0 and len(i := _pick(b, er.p, gen, dev)):
        # Zhong et al. redraw a rectangle until it fits; clamping its sides to the image instead keeps the
        # whole batch in one pass (it only matters for area_max near 1 with extreme ratios).
        n = len(i)
        area = _uniform((n,), er.area_min, er.area_max, gen, dev) * (h * w)
        ratio = torch.exp(_uniform((n,), math.log(er.ratio_min), math.log(er.ratio_max), gen, dev))
        eh = torch.sqrt(area * ratio).round().clamp(1, h)
        ew = torch.sqrt(area / ratio).round().clamp(1, w)
        top = (_rand((n,), gen, dev) * (h - eh + 1)).floor()
        left = (_rand((n,), gen, dev) * (w - ew + 1)).floor()
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
        in_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
        rect = (in_y[:, :, None] & in_x[:, None, :])[:, None]
        out[i] = torch.where(rect, er.value, out[i])

    return out.clamp_(0.0, 1.0)


def augmented_copy(images: torch.Tensor, cfg: AugmentConfig, seed: int = 0, batch_size: int = 2000) -> torch.Tensor:
    """images (N, C, H, W) uint8 -> one augmented float copy in [0, 1], drawn from a generator seeded with `seed`
    (the same seed and batch_size give the same copy): what evaluation and `augment check` measure on."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([augment_batch(c.float().div(255), cfg, gen) for c in images.split(batch_size)])


def expand(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig, factor: int, seed: int = 0,
           batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """factor times the data: images (N, 1, H, W) uint8, labels (N,) -> (factor*N, 1, H, W), (factor*N,).

    The N originals come first, then factor - 1 augmented copies of the whole set, rounded back to uint8. The
    draws come from a CPU generator seeded with ``seed``, so a seed (and batch_size) gives the same data on
    any device up to float rounding.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ConfigError(f"expand factor = {factor!r}: expected an integer >= 1 (1: originals only); "
                          f"use e.g. 2 to add one augmented copy")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"expand batch_size = {batch_size!r}: expected an integer >= 1; use e.g. 4096")
    if images.ndim != 4 or images.dtype != torch.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"expand needs images (N, C, H, W) uint8 and labels (N,), got images {images.dtype} "
                         f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
    n = len(images)
    out = images.new_empty((factor * n, *images.shape[1:]))
    out[:n] = images
    gen = torch.Generator().manual_seed(seed)
    for copy in range(1, factor):
        for start in range(0, n, batch_size):
            x = images[start : start + batch_size].float().div_(255)
            y = augment_batch(x, cfg, gen)
            at = copy * n + start
            out[at : at + len(x)] = y.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    return out, labels.repeat(factor)


# ----------------------------------------------------------------------------------------------------------
# Non-digits made from digits (outlier exposure): partial and doubled digits, fresh every batch.

NOT_PARTIAL = (1,)
"""Digits never cut into a partial digit: what is left of a 1 is a shorter 1."""


def broken_digits(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator | None = None,
                  box: int = 20) -> torch.Tensor:  # fmt: skip
    """Non-digits made from digits: images (2K, 1, H, W) uint8 and their labels -> (K, 1, H, W) uint8.

    Output k is made from images k and K + k: half of them (and every one whose first digit is in NOT_PARTIAL)
    are doubled digits (the two side by side 0-4 px apart, overlapping by 3-12 px, or one in four drawn over the
    other shifted by up to 3 px), the rest partial digits (30-55% of the first digit's extent kept along a
    direction within 20 degrees of up, down, left or right, the rest erased). Each is then brought back to the
    format preprocessing gives a digit: its ink box scaled so the longer side is `box` px, its centre of mass at
    the centre. These are what `preprocess` makes of `synth`'s partial_digit and doubled_digit kinds, drawn
    batched on tensors, so a training run sees new ones every step instead of a fixed set.
    """
    if images.ndim != 4 or images.dtype != torch.uint8 or len(images) % 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"broken_digits needs an even number of images (2K, C, H, W) uint8 and their labels, "
                         f"got {images.dtype} {tuple(images.shape)} and labels {tuple(labels.shape)}")
    k = len(images) // 2
    dev = images.device
    x = images.float().div(255)
    a, b = x[:k], x[k:]
    _, c, h, w = a.shape
    if k == 0:
        return images[:0]
    doubled = (_rand((k,), gen, dev) < 0.5) | torch.isin(labels[:k], torch.tensor(NOT_PARTIAL, device=dev))
    # Partial: keep the ink whose projection on a direction falls below a quantile of the ink's projections.
    angle = (90 * torch.floor(_rand((k,), gen, dev) * 4) + _uniform((k,), -20, 20, gen, dev)) * (math.pi / 180)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=x.dtype), torch.arange(w, device=dev, dtype=x.dtype),
                            indexing="ij")  # fmt: skip
    proj = torch.cos(angle)[:, None, None] * xs + torch.sin(angle)[:, None, None] * ys  # (K, H, W)
    ink = a.amax(1) > 0.05
    flat = torch.where(ink, proj, torch.inf).flatten(1).sort(1).values
    count = ink.flatten(1).sum(1).clamp(min=1)
    q = _uniform((k,), 0.3, 0.55, gen, dev)
    cut = flat.gather(1, (q * count).long().clamp(max=h * w - 1)[:, None]).squeeze(1)
    partial = a * (proj <= cut[:, None, None])[:, None]
    # Doubled: b placed `shift` px right of a (20 - overlap, MNIST's 20 px box), or over it, on a 2W-wide canvas.
    over = _rand((k,), gen, dev) < 0.25
    side = _rand((k,), gen, dev) < 0.6 / 0.75
    overlap = torch.where(side, torch.floor(_uniform((k,), -4, 3, gen, dev)),
                          torch.floor(_uniform((k,), 3, 13, gen, dev)))  # fmt: skip
    dx = torch.where(over, torch.floor(_uniform((k,), -3, 4, gen, dev)), 20 - overlap)
    dy = torch.where(over, torch.floor(_uniform((k,), -3, 4, gen, dev)), torch.zeros_like(overlap))
    canvas = x.new_zeros((k, c, h, 2 * w))
    canvas[..., :w] = torch.where(doubled[:, None, None, None], a, partial)
    # b shifted by (dy, dx) px: sampled with a per-sample translation (integer shifts, so no blur).
    gy = (torch.arange(h, device=dev, dtype=x.dtype)[None, :, None] - dy[:, None, None]).long()
    gx = (torch.arange(2 * w, device=dev, dtype=x.dtype)[None, None] - dx[:, None, None]).long()
    valid = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
    idx = (gy.clamp(0, h - 1) * w + gx.clamp(0, w - 1)).expand(k, h, 2 * w)
    moved = b.flatten(2).gather(2, idx.flatten(1)[:, None].expand(k, c, h * 2 * w)).view(k, c, h, 2 * w)
    moved = moved * valid[:, None]
    canvas = torch.where(doubled[:, None, None, None], torch.maximum(canvas, moved), canvas)
    return _to_mnist_box(canvas, h, w, box).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def _to_mnist_box(canvas: torch.Tensor, h: int, w: int, box: int) -> torch.Tensor:
    """canvas (K, C, Hc, Wc) in [0, 1] -> (K, C, h, w): the ink box scaled so its longer side is `box` px (blurred
    first when shrinking, against aliasing), the centre of mass at the centre."""
    k, _, hc, wc = canvas.shape
    dev, dt = canvas.device, canvas.dtype
    mass = canvas.amax(1)  # (K, Hc, Wc)
    ink = mass > 0.05
    rows, cols = ink.any(2), ink.any(1)
    ar_h, ar_w = torch.arange(hc, device=dev, dtype=dt), torch.arange(wc, device=dev, dtype=dt)
    big = torch.tensor(1e9, device=dev, dtype=dt)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -big).amax(1)
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -big).amax(1)
    extent = torch.maximum(y1 - y0 + 1, x1 - x0 + 1).clamp(min=1)
    scale = box / extent  # output px per canvas px
    total = mass.sum((1, 2)).clamp(min=1e-6)
    cy = (mass.sum(2) * ar_h).sum(1) / total
    cx = (mass.sum(1) * ar_w).sum(1) / total
    shrink = scale < 1
    if bool(shrink.any()):
        sigma = torch.where(shrink, 0.5 * (1 / scale - 1).clamp(min=1e-3), torch.full_like(scale, 1e-3))
        canvas = _gaussian_blur(canvas, sigma)
    # Output pixel (u, v) samples the canvas at centre + (u - (w - 1) / 2) / scale (align_corners=False grid).
    u = torch.arange(w, device=dev, dtype=dt) - (w - 1) / 2
    v = torch.arange(h, device=dev, dtype=dt) - (h - 1) / 2
    px = cx[:, None] + u[None] / scale[:, None]  # (K, w) canvas x
    py = cy[:, None] + v[None] / scale[:, None]  # (K, h) canvas y
    gxn = (2 * px + 1) / wc - 1
    gyn = (2 * py + 1) / hc - 1
    grid = torch.stack(torch.broadcast_tensors(gxn[:, None, :], gyn[:, :, None]), -1)  # (K, h, w, 2)
    return F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
