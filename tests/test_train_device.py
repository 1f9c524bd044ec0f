"""GPU readiness without a GPU: the training steps on the `meta` device.

A meta tensor has a shape and a device but no values, so every operation that needs a value on the host (`.item()`,
`bool(tensor)`, `nonzero`, a data-dependent shape) fails there, as each of them would make the host wait for a GPU.
Running fit()'s own steps (`train.run_steps`) on it checks that a step never waits for the device: the batch is
gathered where the data lives, the augmentation's draws reach the device in non-blocking copies, and the running
sums stay on the device. A dispatch mode also refuses blocking host-to-device copies (each one a wait on a GPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from digitkit import config, train
from digitkit.data import Dataset
from digitkit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


class BlockingCopies(TorchDispatchMode):
    """Records every copy from host memory to the meta device that is not non_blocking."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("aten._to_copy") and args[0].device.type == "cpu" and kwargs.get("device") == META \
                and not kwargs.get("non_blocking", False):  # fmt: skip
            self.found.append(f"{name} {tuple(args[0].shape)}")
        if name.startswith("aten.copy_") and args[0].device == META and args[1].device.type == "cpu" \
                and not (len(args) > 2 and args[2]):  # fmt: skip
            self.found.append(f"{name} {tuple(args[1].shape)}")
        return func(*args, **kwargs)


def steps_on_meta(cfg: config.Config, reporter: train.Reporter, steps: int = 3) -> tuple:
    t = cfg.train
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (steps * t.batch_size + 7, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (len(images),), generator=g)
    ds = Dataset(images.to(META), labels.to(META), list(range(10)))
    model = create_model(cfg.model.name, **cfg.model.args).to(META, memory_format=torch.channels_last)
    opt, sched, every, ema, _ = train.training_state(model, t, steps, None)
    g, perm = train.epoch_draws(cfg.seed, 1, len(ds))
    plan = train.EpochPlan(ds, perm, g, steps, t.batch_size, META, torch.channels_last)

    def step(m, o, x, y):  # noqa: ANN001, ANN202
        return train.train_step(m, o, x, y, t.label_smoothing)

    with BlockingCopies() as copies:
        out = train.run_steps(plan, cfg, step, model, opt, reporter, ema=ema,
                              sched=sched if every == "batch" else None)  # fmt: skip
    return out, copies.found


LADDER = sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                if p.name.startswith(("fast", "default", "best")))  # fmt: skip


@pytest.mark.parametrize("name", LADDER)
def test_a_quiet_training_step_never_waits_for_the_device(name):
    cfg = config.load(ROOT / "configs" / name)
    (loss_sum, correct, seen), copies = steps_on_meta(cfg, train.SilentReporter())
    assert loss_sum.device == META and correct.device == META  # the sums stayed on the device
    assert seen == 3 * cfg.train.batch_size
    assert copies == [], f"blocking host-to-device copies in a step: {copies}"


def test_the_progress_bar_is_the_one_reader_of_device_values():
    """The check can fail: a reporter that shows progress reads the running sums, which meta tensors refuse."""

    class Shows(train.SilentReporter.__mro__[0].__base__):  # a Reporter that is not silent
        def epoch_start(self, *a): ...
        def batch(self, *a): ...
        def epoch_end(self, *a): ...

    cfg = config.load(ROOT / "configs" / "fast.yaml")
    with pytest.raises((RuntimeError, NotImplementedError)):
        steps_on_meta(cfg, Shows())


def test_every_rung_of_the_ladder_is_a_config_the_readme_reports():
    """benchmarks/speedrun.py's rungs: each config loads and trains with validation (the ladder's honesty: validation
    chooses the checkpoint, the test set is read once), and the README's ladder table has a row for each."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("speedrun", ROOT / "benchmarks" / "speedrun.py")
    speedrun = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speedrun)
    readme = (ROOT / "README.md").read_text()
    assert {"fast", "fast-995", "fast-997"} <= set(speedrun.RUNGS)
    for name, (path, accuracy, seconds) in speedrun.RUNGS.items():
        cfg = config.load(ROOT / path)
        assert cfg.data.val_fraction > 0 and cfg.train.checkpoint_metric != "last", name
        assert 0.99 <= accuracy < 1 and seconds > 0
        assert f"| `{path}` |" in readme, f"the README's ladder has no row for {path}"
