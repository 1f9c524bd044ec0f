"""Optimizers and learning-rate schedules in plain tensor code: Adam, AdamW and SGD (Nesterov momentum); the
one-cycle, cosine and plateau schedules. The update rules, defaults and state-dict layout are torch.optim's, so a
`last.pt` written with torch.optim resumes here and tests/test_optim.py checks every step against torch.optim.

Why not torch.optim itself: every torch.optim.Optimizer imports torch._dynamo on its first `zero_grad` or `step`
(its methods are wrapped to keep the compiler out of them). That import takes about 1.3 s on 2 cores, a fifth of
fast.yaml's whole 6-second budget, and nothing here needs the compiler. The updates use torch._foreach_* kernels:
one call per operation for all parameters, as torch.optim does on a GPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch

from digitkit.errors import ConfigError

Group = dict[str, Any]


class Optimizer:
    """A single parameter group (all of a model's parameters) and per-parameter state, as in torch.optim."""

    defaults: dict[str, Any]

    def __init__(self, params: Iterable[torch.Tensor], **hyper: Any) -> None:
        params = list(params)
        if not params:
            raise ConfigError(f"{type(self).__name__}: no parameters to optimize; is the model empty?")
        if hyper["lr"] <= 0:
            raise ConfigError(f"learning rate {hyper['lr']}: expected a number > 0")
        self.defaults = dict(hyper)
        self.param_groups: list[Group] = [{"params": params, **hyper}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, [p.grad for p in params])

    def _update(self, group: Group, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _steps(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's step count (a float32 scalar tensor, as torch.optim saves it), advanced by one."""
        steps = [self.state.setdefault(p, {}).setdefault("step", torch.zeros((), dtype=torch.float32)) for p in params]
        torch._foreach_add_(steps, 1)
        return steps

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}: torch.optim's layout."""
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state = {index[id(p)]: dict(s) for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore hyperparameters (the schedule's current learning rate among them) and state. Refuses a state
        that belongs to a different model (another number or shape of parameters)."""
        groups = saved.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ConfigError(f"optimizer state has {len(groups) if isinstance(groups, list) else 'no'} parameter "
                              f"groups, expected {len(self.param_groups)}; it was saved for another model")  # fmt: skip
        params = [p for g in self.param_groups for p in g["params"]]
        for group, old in zip(self.param_groups, groups, strict=True):
            if len(old["params"]) != len(group["params"]):
                raise ConfigError(f"optimizer state covers {len(old['params'])} parameters, this model has "
                                  f"{len(group['params'])}; it was saved for another model")  # fmt: skip
            group.update({k: v for k, v in old.items() if k != "params"})
        self.state = {}
        for i, s in saved.get("state", {}).items():
            p = params[int(i)]
            restored = {}
            for key, value in s.items():
                if key != "step" and value.shape != p.shape:
                    raise ConfigError(f"optimizer state {key!r} of parameter {i} has shape {tuple(value.shape)}, "
                                      f"the parameter {tuple(p.shape)}; it was saved for another model")  # fmt: skip
                dtype = torch.float32 if key == "step" else p.dtype
                restored[key] = value.to(device="cpu" if key == "step" else p.device, dtype=dtype)
            self.state[p] = restored


class Adam(Optimizer):
    """Adam (Kingma and Ba); with decoupled=True it is AdamW (Loshchilov and Hutter): the weight decay shrinks the
    weights directly instead of being added to the gradient."""

    decoupled = False

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:  # fmt: skip
        super().__init__(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

    def _update(self, group: Group, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        steps = self._steps(params)
        for p in params:
            s = self.state[p]
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if wd:
            if self.decoupled:
                torch._foreach_mul_(params, 1 - lr * wd)
            else:
                grads = torch._foreach_add(grads, params, alpha=wd)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [float(s) for s in steps]
        step_sizes = [-lr / (1 - beta1**n) for n in counts]
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**n) for n in counts])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)


class AdamW(Adam):
    __doc__ = Adam.__doc__
    decoupled = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:  # fmt: skip
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class SGD(Optimizer):
    """Stochastic gradient descent with (Nesterov) momentum and L2 weight decay."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:  # fmt: skip
        if nesterov and momentum <= 0:
            raise ConfigError("Nesterov momentum needs momentum > 0")
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, dampening=0.0)

    def _update(self, group: Group, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
        if momentum:
            bufs = []
            for p, g in zip(params, grads, strict=True):
                s = self.state.setdefault(p, {})
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = g.clone()  # the first step starts the buffer at the gradient
                else:
                    s["momentum_buffer"].mul_(momentum).add_(g, alpha=1 - group["dampening"])
                bufs.append(s["momentum_buffer"])
            if group["nesterov"]:
                torch._foreach_add_(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)


# ----------------------------------------------------------------------------------------------------------
# Schedules. step() moves to the next step (or epoch, for Plateau) and writes the group's "lr" (and, for one-cycle,
# its momentum); construction applies step 0, as torch.optim.lr_scheduler does.


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


class OneCycle:
    """Smith's one-cycle policy (torch's OneCycleLR, cosine, two phases): the learning rate rises from
    max_lr/div_factor to max_lr over the first pct_start of the steps, then falls to 1/final_div_factor of its
    start; momentum (Adam's beta1, SGD's momentum) moves the opposite way between max_momentum and base_momentum.
    Unlike OneCycleLR, plain SGD without momentum stays without: a momentum of 0 is not cycled up to 0.95."""

    def __init__(self, opt: Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, base_momentum: float = 0.85,
                 max_momentum: float = 0.95) -> None:  # fmt: skip
        if total_steps < 2 or not 0 < pct_start < 1 or pct_start * total_steps <= 1:
            raise ConfigError(f"one-cycle schedule over {total_steps} steps with pct_start {pct_start}: expected a "
                              "warm-up of more than one step; use the cosine schedule for so short a run")  # fmt: skip
        self.opt, self.total_steps = opt, total_steps
        self.phases = ((float(pct_start * total_steps) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                       (float(total_steps - 1), "max_lr", "min_lr", "base_momentum", "max_momentum"))  # fmt: skip
        self.momentum_key = "betas" if "betas" in opt.defaults else "momentum" if opt.defaults.get("momentum") else ""
        for group in opt.param_groups:
            group.update(initial_lr=max_lr / div_factor, max_lr=max_lr, min_lr=max_lr / div_factor / final_div_factor)
            if self.momentum_key:
                group.update(base_momentum=base_momentum, max_momentum=max_momentum)
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        n = self.last_epoch
        if n > self.total_steps:
            raise ConfigError(f"one-cycle schedule stepped {n} times; it was made for {self.total_steps} steps")
        for group in self.opt.param_groups:
            start = 0.0
            for i, (end, lr_from, lr_to, m_from, m_to) in enumerate(self.phases):
                if n <= end or i == len(self.phases) - 1:
                    pct = (n - start) / (end - start)
                    group["lr"] = _cos_anneal(group[lr_from], group[lr_to], pct)
                    if self.momentum_key:
                        m = _cos_anneal(group[m_from], group[m_to], pct)
                        group[self.momentum_key] = (m, group["betas"][1]) if self.momentum_key == "betas" else m
                    break
                start = end

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "total_steps": self.total_steps}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("total_steps", self.total_steps) != self.total_steps:
            raise ConfigError(f"schedule state is for {saved['total_steps']} steps, this run has {self.total_steps}; "
                              "train.epochs or the batch size changed since it was saved")  # fmt: skip
        self.last_epoch = int(saved["last_epoch"])


class Cosine:
    """Cosine annealing from the initial learning rate to 0 over total_steps (torch's CosineAnnealingLR, in closed
    form)."""

    def __init__(self, opt: Optimizer, total_steps: int) -> None:
        self.opt, self.total_steps = opt, max(1, total_steps)
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        for group in self.opt.param_groups:
            group["lr"] = _cos_anneal(group["initial_lr"], 0.0, self.last_epoch / self.total_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.last_epoch = int(saved["last_epoch"])


class Plateau:
    """Multiply the learning rate by `factor` when the validation loss has not improved (by a relative 1e-4) for
    more than `patience` epochs (torch's ReduceLROnPlateau in "min" mode)."""

    threshold = 1e-4
    eps = 1e-8

    def __init__(self, opt: Optimizer, factor: float = 0.1, patience: int = 10) -> None:
        if not 0 < factor < 1:
            raise ConfigError(f"plateau factor {factor}: expected a number between 0 and 1")
        self.opt, self.factor, self.patience = opt, factor, patience
        self.best, self.num_bad_epochs, self.last_epoch = math.inf, 0, 0

    def step(self, metric: float) -> None:
        self.last_epoch += 1
        if metric < self.best * (1 - self.threshold):
            self.best, self.num_bad_epochs = float(metric), 0
        else:
            self.num_bad_epochs += 1
        if self.num_bad_epochs > self.patience:
            for group in self.opt.param_groups:
                new = group["lr"] * self.factor
                if group["lr"] - new > self.eps:
                    group["lr"] = new
            self.num_bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs, "last_epoch": self.last_epoch}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.best, self.num_bad_epochs = float(saved["best"]), int(saved["num_bad_epochs"])
        self.last_epoch = int(saved["last_epoch"])


class WeightAverage(torch.nn.Module):
    """An exponential moving average of a model's weights and buffers (batch-norm statistics): `module` is the
    averaged copy. The first update copies the model; each later one moves every floating-point tensor a share
    (1 - decay) of the way to the model's (other buffers, such as batch counts, are copied).

    torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn computes the same average, and its state dict
    (module.*, n_averaged) is the same, so last.pt files written with it resume here. It keeps its count on the CPU
    and copies it to the device, and reads it back, on every update: on a GPU, a wait for the device each step.
    Here whether the first update is done is a Python flag, and the count stays on the model's device."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"an average's decay of {decay}: expected a value in (0, 1) such as 0.999")
        self.module = copy.deepcopy(model)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=device))
        self._started = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(mine) != len(theirs):
            raise ValueError(f"the model has {len(theirs)} tensors, its average {len(mine)}: not the same model")
        floats = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        if not self._started:
            torch._foreach_copy_(mine, theirs)
            self._started = True
        elif floats:
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1.0 - self.decay)
            for a, b in zip(mine, theirs, strict=True):
                if not a.is_floating_point():
                    a.copy_(b)
        self.n_averaged.add_(1)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._started = bool(self.n_averaged.item() > 0)  # read once, when a run resumes
        return out
