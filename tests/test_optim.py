"""digitkit.optim against torch.optim: the same updates and learning rates step by step, state dicts that move
between the two, and a training step that never imports torch._dynamo (the reason digitkit.optim exists)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from digitkit import config, optim, train
from digitkit.errors import ConfigError
from digitkit.models import create_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10))  # fmt: skip


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _train(model: nn.Module, opt, sched, batches, every: str = "batch") -> list[float]:
    lrs = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if every == "batch":
            sched.step()
        elif every == "epoch":
            sched.step(1.0)  # a validation loss that never improves
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


OPTIMIZERS = {
    "adam": (lambda p: optim.Adam(p, lr=3e-3, weight_decay=1e-3),
             lambda p: torch.optim.Adam(p, lr=3e-3, weight_decay=1e-3)),
    "adamw": (lambda p: optim.AdamW(p, lr=3e-3, weight_decay=5e-2),
              lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=5e-2)),
    "sgd": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd_heavy_ball": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                       lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
}  # fmt: skip
SCHEDULES = {
    "onecycle": (lambda o: optim.OneCycle(o, max_lr=0.01, total_steps=30, pct_start=0.25),
                 lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.01, total_steps=30, pct_start=0.25),
                 "batch"),
    "cosine": (lambda o: optim.Cosine(o, total_steps=30),
               lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30), "batch"),
    "plateau": (lambda o: optim.Plateau(o, factor=0.5, patience=2),
                lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2), "epoch"),
}  # fmt: skip


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
def test_updates_and_learning_rates_match_torch_optim(opt_name, sched_name):
    ours_opt, torch_opt = OPTIMIZERS[opt_name]
    ours_sched, torch_sched, every = SCHEDULES[sched_name]
    a, b = _net(), _net()
    oa, ob = ours_opt(a.parameters()), torch_opt(b.parameters())
    sa, sb = ours_sched(oa), torch_sched(ob)
    batches = _batches(30)
    lrs_a, lrs_b = _train(a, oa, sa, batches, every), _train(b, ob, sb, batches, every)
    assert lrs_a == pytest.approx(lrs_b, rel=1e-9)
    assert len(set(lrs_a)) > 1  # the schedule did move the learning rate
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    if "betas" in oa.param_groups[0]:
        assert oa.param_groups[0]["betas"] == pytest.approx(ob.param_groups[0]["betas"])
    else:
        assert oa.param_groups[0]["momentum"] == pytest.approx(ob.param_groups[0]["momentum"])


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_a_torch_optim_state_resumes_here_and_ours_resumes_in_torch(opt_name):
    """A last.pt written by an older digitkit (torch.optim) continues exactly, and the layout is torch's."""
    ours_opt, torch_opt = OPTIMIZERS[opt_name]
    batches = _batches(20)
    ref, ref_opt = _net(), None
    ref_opt = torch_opt(ref.parameters())
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.01, total_steps=20, pct_start=0.25)
    _train(ref, ref_opt, ref_sched, batches[:10])
    saved = copy.deepcopy((ref.state_dict(), ref_opt.state_dict(), ref_sched.state_dict()))
    _train(ref, ref_opt, ref_sched, batches[10:])

    resumed = _net()
    opt = ours_opt(resumed.parameters())
    sched = optim.OneCycle(opt, max_lr=0.01, total_steps=20, pct_start=0.25)
    resumed.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    _train(resumed, opt, sched, batches[10:])
    for pa, pb in zip(resumed.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)

    back = _net()
    back_opt = torch_opt(back.parameters())
    back_opt.load_state_dict(opt.state_dict())  # torch.optim reads our layout too
    assert back_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_a_state_for_another_model_is_refused():
    a = optim.AdamW(create_model("cnn1").parameters(), lr=1e-3)
    b = optim.AdamW(create_model("cnn2").parameters(), lr=1e-3)
    with pytest.raises(ConfigError, match="saved for another model"):
        a.load_state_dict(b.state_dict())
    sched = optim.OneCycle(a, max_lr=1e-3, total_steps=100)
    with pytest.raises(ConfigError, match="train.epochs or the batch size changed"):
        sched.load_state_dict({"last_epoch": 3, "total_steps": 50})


def test_bad_settings_are_refused():
    params = list(create_model("cnn1").parameters())
    with pytest.raises(ConfigError, match="learning rate"):
        optim.AdamW(params, lr=0.0)
    with pytest.raises(ConfigError, match="no parameters"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ConfigError, match="warm-up of more than one step"):
        optim.OneCycle(optim.AdamW(params), max_lr=1e-3, total_steps=4, pct_start=0.25)
    sched = optim.OneCycle(optim.AdamW(params), max_lr=1e-3, total_steps=10)
    with pytest.raises(ConfigError, match="made for 10 steps"):
        for _ in range(11):
            sched.step()


def test_training_never_imports_the_compiler():
    """fit's optimizer and schedule stay clear of torch._dynamo (about 1.3 s to import on 2 cores)."""
    code = """
import sys, torch
from digitkit import config, train
from digitkit.models import create_model
cfg = config.load(None, ["train.optimizer=adamw", "train.schedule=onecycle", "train.epochs=1"]).train
model = create_model("cnn_fast")
opt = train.make_optimizer(model.parameters(), cfg)
sched, _ = train.make_schedule(opt, cfg, steps_per_epoch=10)
x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
for _ in range(3):
    train.train_step(model, opt, x, y, 0.1)
    sched.step()
opt.load_state_dict(opt.state_dict())
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_config_choices_all_build_with_digitkit_optim():
    for name in config.OPTIMIZERS:
        cfg = config.load(None, [f"train.optimizer={name}"]).train
        assert isinstance(train.make_optimizer(create_model("cnn1").parameters(), cfg), optim.Optimizer)


def test_a_loss_scaler_drives_it_like_torch_optim():
    """The float16 GPU path steps through torch.amp.GradScaler; on the CPU the scaler works the same way."""
    a, b = _net(), _net()
    oa, ob = optim.AdamW(a.parameters(), lr=3e-3), torch.optim.AdamW(b.parameters(), lr=3e-3)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in _batches(5):
        for model, opt, scaler in ((a, oa, sa), (b, ob, sb)):
            opt.zero_grad(set_to_none=True)
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    assert sa.get_scale() == sb.get_scale()


def test_one_cycle_leaves_sgd_without_momentum_alone():
    opt = optim.SGD(create_model("cnn1").parameters(), lr=0.1)
    sched = optim.OneCycle(opt, max_lr=0.1, total_steps=20)
    for _ in range(20):
        sched.step()
        assert opt.param_groups[0]["momentum"] == 0.0


def test_weight_average_is_torch_ema_and_reads_its_state():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from digitkit.models import create_model
    from digitkit.optim import WeightAverage

    torch.manual_seed(0)
    model = create_model("cnn3_tiny")
    ours = WeightAverage(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(4):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        ours.update_parameters(model)
        theirs.update_parameters(model)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, msg=f"{name} differs")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 4
    resumed = WeightAverage(model, 0.9)  # a last.pt written by torch's AveragedModel resumes here
    resumed.load_state_dict(theirs.state_dict())
    assert resumed._started
    with torch.no_grad():
        before = [p.clone() for p in resumed.module.parameters()]
        resumed.update_parameters(model)  # an average, not a copy of the model
        moved = [p for p, q, m in zip(resumed.module.parameters(), before, model.parameters(), strict=True)
                 if not torch.equal(p, m) and not torch.equal(p, q)]  # fmt: skip
    assert moved
    with pytest.raises(Exception, match="decay"):
        WeightAverage(model, 1.0)
