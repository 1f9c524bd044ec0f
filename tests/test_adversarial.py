"""adversarial.py: attacks stay in their budget, hurt a trained model more as the budget grows (PGD at least as
much as FGSM), are reproducible, and leave the model (weights, batch-norm statistics, modes, grads) untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from digitkit.adversarial import fgsm, noisy_probs, pgd, robustness_curves
from digitkit.errors import ConfigError
from digitkit.models import create_model

from .conftest import synthetic_images

SIZE = 20
EPSILONS = (0.0, 0.1, 0.2, 0.3)
SIGMA = 0.3
TOL = 0.03  # about 3 images of 96: room for the noise of a small sample, not for a wrong attack


def bars(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, SIZE, SIZE) uint8 bars at 4 angles, and their labels."""
    labels = np.arange(n) % 4
    np.random.default_rng(seed).shuffle(labels)
    images = synthetic_images(labels, size=SIZE, seed=seed)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def small_cnn() -> torch.nn.Module:
    return create_model("cnn2", num_classes=4, img_size=SIZE, channels=(8, 16), dropout=0.0)


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    images, y = bars(256, seed=0)
    x = images.float() / 255
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return bars(96, seed=1)


@pytest.fixture(scope="module")
def curves(trained, test_set) -> dict:
    images, labels = test_set
    return robustness_curves(
        trained, images, labels, epsilons=EPSILONS, defence_sigma=SIGMA, defence_samples=4, pgd_steps=5,
        batch_size=40, seed=0,
    )  # fmt: skip


def _attack(kind: str, model, x, y, eps, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "fgsm":
        return fgsm(model, x, y, eps, generator=g)
    if kind == "pgd":
        return pgd(model, x, y, eps, steps=5, generator=g)
    if kind == "fgsm-eot":
        return fgsm(model, x, y, eps, defence_sigma=SIGMA, defence_samples=3, generator=g)
    return pgd(model, x, y, eps, steps=3, generator=g, defence_sigma=SIGMA, defence_samples=3)


ATTACK_KINDS = ("fgsm", "pgd", "fgsm-eot", "pgd-eot")


# ---------------------------------------------------------------------------------------------- the attacks


@pytest.mark.parametrize("kind", ATTACK_KINDS)
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_attacks_stay_in_the_budget_and_the_pixel_range(trained, test_set, kind: str, eps: float) -> None:
    images, y = test_set
    x = images[:16].float() / 255
    x_adv = _attack(kind, trained, x, y[:16], eps)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > eps / 2  # it moved


@pytest.mark.parametrize("kind", ATTACK_KINDS)
def test_attacks_raise_the_loss_and_are_reproducible(trained, test_set, kind: str) -> None:
    images, y = test_set
    x = images[:32].float() / 255
    x_adv = _attack(kind, trained, x, y[:32], 0.1)
    with torch.no_grad():
        assert F.cross_entropy(trained(x_adv), y[:32]) > 3 * F.cross_entropy(trained(x), y[:32])
    assert torch.equal(_attack(kind, trained, x, y[:32], 0.1), x_adv)
    if kind.endswith("-eot"):  # the adaptive attack follows the defence's noise, so its seed matters
        assert not torch.equal(_attack(kind, trained, x, y[:32], 0.1, seed=1), x_adv)
        assert not torch.equal(_attack(kind.removesuffix("-eot"), trained, x, y[:32], 0.1), x_adv)


def test_pgd_is_at_least_as_strong_as_fgsm(trained, test_set) -> None:
    images, y = test_set
    x = images.float() / 255
    with torch.no_grad():
        loss_fgsm = F.cross_entropy(trained(_attack("fgsm", trained, x, y, 0.2)), y)
        loss_pgd = F.cross_entropy(trained(_attack("pgd", trained, x, y, 0.2)), y)
    assert loss_pgd >= loss_fgsm


def test_one_pgd_step_from_the_centre_is_fgsm(trained, test_set) -> None:
    images, y = test_set
    x = images[:16].float() / 255
    one_step = pgd(trained, x, y[:16], 0.1, steps=1, alpha=0.1, random_start=False)
    assert torch.equal(one_step, fgsm(trained, x, y[:16], 0.1))


def test_eps_zero_returns_the_input(trained, test_set) -> None:
    images, y = test_set
    x = images[:8].float() / 255
    assert torch.equal(fgsm(trained, x, y[:8], 0.0), x)
    assert torch.equal(pgd(trained, x, y[:8], 0.0, generator=torch.Generator().manual_seed(0)), x)


def test_bad_budgets_and_attacks_are_config_errors(trained, test_set) -> None:
    images, y = test_set
    x = images[:2].float() / 255
    with pytest.raises(ConfigError, match="0 <= eps <= 1"):
        fgsm(trained, x, y[:2], -0.1)
    with pytest.raises(ConfigError, match="fgsm, pgd"):
        robustness_curves(trained, images[:2], y[:2], attacks=("cw",))
    with pytest.raises(ValueError, match="uint8"):
        robustness_curves(trained, x, y[:2])


# --------------------------------------------------------------------------------------------- the defence


def test_noisy_probs_without_noise_is_the_softmax(trained, test_set) -> None:
    x = test_set[0][:8].float() / 255
    with torch.no_grad():
        assert torch.equal(noisy_probs(trained, x, 0.0), trained(x).softmax(1))


def test_noisy_probs_is_a_seeded_average_of_distributions(trained, test_set) -> None:
    x = test_set[0][:8].float() / 255

    def run(seed: int) -> torch.Tensor:
        return noisy_probs(trained, x, SIGMA, samples=4, generator=torch.Generator().manual_seed(seed))

    probs = run(0)
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    assert torch.equal(run(0), probs)
    assert not torch.equal(run(1), probs)
    with torch.no_grad():
        assert not torch.allclose(probs, trained(x).softmax(1))


# ----------------------------------------------------------------------------------------- robustness curves


def test_curves_have_the_documented_shape(curves) -> None:
    name = f"{{}} + noise defence (sigma={SIGMA:g})"
    assert curves["epsilons"] == list(EPSILONS)
    assert set(curves["curves"]) == {"fgsm", "pgd", name.format("fgsm"), name.format("pgd")}
    assert all(len(accs) == len(EPSILONS) for accs in curves["curves"].values())
    assert curves["n"] == 96


def test_eps_zero_is_the_clean_accuracy(trained, test_set, curves) -> None:
    images, labels = test_set
    with torch.no_grad():
        clean = (trained(images.float() / 255).argmax(1) == labels).sum().item() / len(labels)
    assert curves["clean_accuracy"] == clean >= 0.9
    for name, accs in curves["curves"].items():
        expected = curves["clean_accuracy_defended"] if "defence" in name else clean
        assert accs[0] == expected, name


def test_accuracy_falls_with_eps_and_pgd_is_stronger(curves) -> None:
    c = curves["curves"]
    for name, accs in c.items():
        assert all(b <= a + TOL for a, b in zip(accs, accs[1:], strict=False)), (name, accs)
    clean = curves["clean_accuracy"]
    assert c["fgsm"][-1] <= clean - 0.2, c["fgsm"]
    assert c["pgd"][-1] <= clean - 0.3, c["pgd"]
    defended = [k for k in c if "defence" in k]
    for fgsm_name, pgd_name in (("fgsm", "pgd"), sorted(defended)):
        assert all(p <= f + TOL for f, p in zip(c[fgsm_name], c[pgd_name], strict=True)), (c[fgsm_name], c[pgd_name])
    # the adaptive attack must break the defence too, not just be reported beside it
    assert c[defended[1]][-1] <= curves["clean_accuracy_defended"] - 0.3


def test_curves_are_deterministic_with_the_seed(trained, test_set) -> None:
    images, labels = test_set

    def run() -> dict:
        return robustness_curves(trained, images[:24], labels[:24], epsilons=(0.0, 0.2), defence_sigma=SIGMA,
                                 defence_samples=2, pgd_steps=2, batch_size=10, seed=3)  # fmt: skip

    assert run() == run()


# ------------------------------------------------------------------------------------- the model is untouched


def test_attacks_leave_weights_statistics_modes_and_grads_alone(trained, test_set) -> None:
    model = small_cnn()
    model.load_state_dict(trained.state_dict())
    model.train()  # batch norm in train mode would update its running stats on every forward
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    images, y = test_set
    x = images[:16].float() / 255
    for kind in ATTACK_KINDS:
        _attack(kind, model, x, y[:16], 0.2)
    noisy_probs(model, x, SIGMA, samples=2)
    robustness_curves(model, images[:16], y[:16], epsilons=(0.0, 0.1), defence_sigma=SIGMA, defence_samples=2,
                      pgd_steps=2)  # fmt: skip
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), f"{k} changed"
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
