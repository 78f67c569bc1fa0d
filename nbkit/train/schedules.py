"""Learning-rate schedules by their kohya sd-scripts name, plus the two hypernetwork schedules.

:func:`make_lr_scheduler` follows kohya's ``library/train_util.py::get_scheduler_fix`` (the
``transformers.optimization`` schedule functions): constant, constant_with_warmup, linear, cosine,
cosine_with_restarts (``lr_scheduler_num_cycles``), polynomial (``lr_scheduler_power``),
cosine_with_min_lr (``lr_scheduler_min_lr_ratio``), inverse_sqrt, piecewise_constant (diffusers,
``step_rules``), adafactor and any ``module.Class``; extra arguments are ``lr_scheduler_args``. Plus:

* ``a1111``: AUTOMATIC1111's rate string (:class:`A1111Schedule`), given as
  ``lr_scheduler_args=["schedule=5e-5:100, 5e-6:1500, 5e-7"]`` *or* directly as the name, as an
  A1111 user types it in the "Learning rate" box;
* ``cosine_annealing_warm_restarts``: the hypernetwork extension's schedule (:class:`CosineAnnealingWarmUpRestarts`).

Every scheduler here resumes from ``state_dict()`` (its lr is a function of the step count or of
state the dict carries); load the optimizer's state too, as ``accelerator.load_state`` does.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from nbkit.config import ConfigError
from nbkit.train.optimizers import OptionArgs, parse_option_args

_RAW_KEYS = ("schedule", "step_rules")
_A1111_HELP = 'like "5e-5:100, 5e-6:1500, 5e-7" (rate 5e-5 until step 100, 5e-6 until 1500, then 5e-7)'


# ---------------------------------------------------------------- AUTOMATIC1111 schedule string


def a1111_schedule(text: str, max_steps: int, cur_step: int = 0) -> list[tuple[float, int]]:
    """The ``(rate, end_step)`` pairs of an A1111 learning-rate string, exactly as
    ``modules/textual_inversion/learn_schedule.py::LearnScheduleIterator`` reads it.

    Items are split on ``,`` then ``:``. ``rate:step`` applies while the step is below ``step``;
    items with ``step <= cur_step`` are skipped (resume); ``step`` is clamped to ``max_steps``
    and reading stops after a step above ``max_steps``; ``rate:-1`` and a bare ``rate`` last
    until ``max_steps`` and end the reading. An item with more than one ``:`` is read as a bare
    rate (A1111 does the same).
    """
    rates: list[tuple[float, int]] = []
    try:
        for item in text.split(","):
            if not item.strip():
                continue
            parts = item.split(":")
            if len(parts) != 2:
                rates.append((float(parts[0]), max_steps))
                break
            step = int(parts[1])
            if step > cur_step:
                rates.append((float(parts[0]), min(step, max_steps)))
                if step > max_steps:
                    break
            elif step == -1:
                rates.append((float(parts[0]), max_steps))
                break
    except ValueError:
        rates = []
    if not rates:
        raise ConfigError(f"invalid A1111 learning-rate schedule {text!r} (max_steps={max_steps}, resuming at step "
                          f"{cur_step}): write a number or a list {_A1111_HELP}")
    return rates


def is_a1111_schedule(text: str) -> bool:
    """True when ``text`` looks like an A1111 rate string (digits, ``.eE+-:,`` and spaces)."""
    return bool(re.fullmatch(r"[\d.eE+\-:,\s]*\d[\d.eE+\-:,\s]*", text))


class _ReappliesOnLoad(LRScheduler):
    """After ``load_state_dict`` the optimizer's groups get the restored lr right away, so a
    resume continues identically even when only the scheduler's state was saved."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr


class A1111Schedule(_ReappliesOnLoad):
    """AUTOMATIC1111's ``LearnRateScheduler`` as a torch scheduler.

    Step ``k`` (``cur_step + last_epoch``) applies A1111's rule once per step: when the step
    reaches the current pair's end, move to the next pair (one per step, as A1111) and set *every*
    param group's lr to its rate. When the pairs run out, :attr:`finished` becomes True and the
    lr stays: A1111 stops training there, so the loop should check it before each step (see
    :func:`schedule_finished` when the scheduler is wrapped by accelerate).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str, max_steps: int, cur_step: int = 0) -> None:
        self.schedule = schedule
        self.max_steps = max_steps
        self.start_step = cur_step
        self.pairs = a1111_schedule(schedule, max_steps, cur_step)
        self.pair_index = 0
        self.learn_rate, self.end_step = self.pairs[0]
        self._finished = False
        self._applied_step = cur_step - 1
        super().__init__(optimizer)

    @property
    def finished(self) -> bool:
        """True once the schedule has no pair left for the current step (A1111 stops training)."""
        return self._finished

    @property
    def global_step(self) -> int:
        """The A1111 step number the current lr is for (``cur_step`` + steps taken)."""
        return self.start_step + self.last_epoch

    def get_lr(self) -> list[float]:
        while self._applied_step < self.global_step:  # idempotent: each step is applied once
            self._applied_step += 1
            if self._applied_step >= self.end_step and not self._finished:
                if self.pair_index + 1 < len(self.pairs):
                    self.pair_index += 1
                    self.learn_rate, self.end_step = self.pairs[self.pair_index]
                else:
                    self._finished = True
        return [self.learn_rate for _ in self.optimizer.param_groups]


# ---------------------------------------------------------------- hypernetwork extension schedule


class CosineAnnealingWarmUpRestarts(_ReappliesOnLoad):
    """Cosine annealing with linear warm-up and warm restarts, as the hypernetwork extension's
    ``patches/scheduler.py`` (after katsura-jp's ``CosineAnnealingWarmupRestarts``).

    Each cycle warms up linearly from ``min_lr`` to its peak over ``warmup_steps``, then follows a
    cosine down to ``min_lr``. Cycle ``n`` lasts ``first_cycle_steps * cycle_mult**n`` steps and
    peaks at ``max_lr * gamma**n``. The lr of step ``k`` is computed as the extension computes it
    when it calls ``step(hypernetwork.step)`` before every optimizer step (its ``epoch`` branch), so
    it is a pure function of ``k`` and resumes exactly. ``max_lr=None`` uses each param group's own
    lr as its peak; a number sets every group's peak (as the extension, which has one group).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        first_cycle_steps: int,
        cycle_mult: float = 1.0,
        max_lr: float | None = None,
        min_lr: float = 0.0,
        warmup_steps: int = 0,
        gamma: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if first_cycle_steps < 1 or not 0 <= warmup_steps < first_cycle_steps:
            raise ConfigError(f"cosine_annealing_warm_restarts: need first_cycle_steps >= 1 and 0 <= warmup_steps < "
                              f"first_cycle_steps, got {first_cycle_steps} and {warmup_steps}")
        if cycle_mult < 1 or gamma <= 0 or min_lr < 0:
            raise ConfigError(f"cosine_annealing_warm_restarts: need cycle_mult >= 1, gamma > 0 and min_lr >= 0, got "
                              f"cycle_mult={cycle_mult}, gamma={gamma}, min_lr={min_lr}")
        self.first_cycle_steps = int(first_cycle_steps)
        self.cycle_mult = float(cycle_mult)
        self.max_lr = max_lr
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.gamma = float(gamma)
        super().__init__(optimizer, last_epoch)

    def cycle_position(self, step: int) -> tuple[int, float, float]:
        """``(cycle, step_in_cycle, cycle_steps)`` of ``step``, with the extension's arithmetic."""
        first, mult = self.first_cycle_steps, self.cycle_mult
        if step < first:
            return 0, step, first
        if mult == 1.0:
            return step // first, step % first, first
        n = int(math.log((step / first * (mult - 1) + 1), mult))
        return n, step - int(first * (mult**n - 1) / (mult - 1)), first * mult**n

    def lr_at(self, step: int, peak_lr: float) -> float:
        """The lr of optimizer step ``step`` for a group whose first-cycle peak is ``peak_lr``."""
        cycle, in_cycle, cycle_steps = self.cycle_position(step)
        peak = peak_lr * self.gamma**cycle
        if in_cycle < self.warmup_steps:
            return (peak - self.min_lr) * in_cycle / self.warmup_steps + self.min_lr
        angle = math.pi * (in_cycle - self.warmup_steps) / (cycle_steps - self.warmup_steps)  # same rounding
        return self.min_lr + (peak - self.min_lr) * (1 + math.cos(angle)) / 2

    def get_lr(self) -> list[float]:
        peaks = self.base_lrs if self.max_lr is None else [self.max_lr] * len(self.base_lrs)
        return [self.lr_at(self.last_epoch, float(peak)) for peak in peaks]

    def is_end_of_cycle(self, step: int | None = None) -> bool:
        """True when optimizer step ``step`` (default: the one just taken) closed its cycle; the
        extension saves and previews then ("when converge")."""
        step = self.last_epoch - 1 if step is None else step
        return self.cycle_position(step + 1)[0] != self.cycle_position(step)[0]


# ---------------------------------------------------------------- factory


@dataclass(frozen=True)
class ScheduleSettings:
    """The kohya options a schedule builder may read (warm-up in steps)."""

    num_training_steps: int
    warmup_steps: int
    num_cycles: int
    power: float
    min_lr_ratio: float | None


def resolve_warmup_steps(lr_warmup_steps: int | float, num_training_steps: int) -> int:
    """``lr_warmup_steps`` in steps; a float below 1 is a ratio of ``num_training_steps`` (kohya)."""
    if lr_warmup_steps < 0:
        raise ConfigError(f"lr_warmup_steps={lr_warmup_steps} must be >= 0 (steps, or a ratio below 1)")
    if isinstance(lr_warmup_steps, float) and lr_warmup_steps < 1:
        return int(lr_warmup_steps * num_training_steps)
    return int(lr_warmup_steps)


def required_lr_scheduler(optimizer: torch.optim.Optimizer) -> str | None:
    """``"adafactor"`` when the optimizer sets its own step size (Adafactor with relative_step), else None."""
    topt = sys.modules.get("transformers.optimization")  # not imported: cannot be an Adafactor
    inner = _unwrap(optimizer)
    if topt is not None and isinstance(inner, topt.Adafactor) and inner.defaults.get("relative_step"):
        return "adafactor"
    return None


def schedule_finished(scheduler: Any) -> bool:
    """True when the schedule ended the run (an A1111 string ran out); sees through accelerate's wrapper."""
    inner = getattr(scheduler, "scheduler", scheduler)
    return bool(getattr(inner, "finished", False))


def _unwrap(optimizer: Any) -> Any:
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _no_warmup(name: str, settings: ScheduleSettings) -> None:
    if settings.warmup_steps:
        raise ConfigError(f"lr_scheduler={name} has no warm-up but lr_warmup_steps gives {settings.warmup_steps} steps: "
                          "set lr_warmup_steps=0, or use constant_with_warmup / linear / cosine")


_WT = ("num_warmup_steps", "num_training_steps")
_TRANSFORMERS: dict[str, tuple[str, tuple[str, ...]]] = {  # name: (transformers function, kohya settings it takes)
    "constant": ("get_constant_schedule", ()),
    "constant_with_warmup": ("get_constant_schedule_with_warmup", ("num_warmup_steps",)),
    "linear": ("get_linear_schedule_with_warmup", _WT),
    "cosine": ("get_cosine_schedule_with_warmup", _WT),
    "cosine_with_restarts": ("get_cosine_with_hard_restarts_schedule_with_warmup", (*_WT, "num_cycles")),
    "polynomial": ("get_polynomial_decay_schedule_with_warmup", (*_WT, "power")),
    "cosine_with_min_lr": ("get_cosine_with_min_lr_schedule_with_warmup", _WT),
    "inverse_sqrt": ("get_inverse_sqrt_schedule", ("num_warmup_steps",)),
}


def _transformers(name: str, optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict) -> LRScheduler:
    """kohya's call of the ``transformers.optimization`` schedule function for ``name``."""
    import transformers.optimization as topt

    function, keys = _TRANSFORMERS[name]
    if name == "constant":
        _no_warmup(name, s)
    values = {"num_warmup_steps": s.warmup_steps, "num_training_steps": s.num_training_steps,
              "num_cycles": s.num_cycles, "power": s.power}
    given: dict[str, Any] = {key: values[key] for key in keys}
    if name == "cosine_with_min_lr":
        given["num_cycles"] = s.num_cycles / 2  # kohya: one half-cosine per cycle
        if "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            if s.min_lr_ratio is None:
                raise ConfigError("lr_scheduler=cosine_with_min_lr needs lr_scheduler_min_lr_ratio (e.g. 0.1: "
                                  "the lr ends at 10% of learning_rate)")
            given["min_lr_rate"] = s.min_lr_ratio
    return getattr(topt, function)(optimizer, **given, **kwargs)


def _piecewise_constant(optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict[str, Any]) -> LRScheduler:
    from diffusers.optimization import get_piecewise_constant_schedule

    _no_warmup("piecewise_constant", s)
    if "step_rules" not in kwargs:
        raise ConfigError('lr_scheduler=piecewise_constant needs lr_scheduler_args step_rules="1:10,0.1:20,0.01" '
                          "(lr multiplier 1 until step 10, 0.1 until 20, then 0.01)")
    return get_piecewise_constant_schedule(optimizer, **kwargs)


def _adafactor(optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict[str, Any]) -> LRScheduler:
    from transformers.optimization import Adafactor, AdafactorSchedule

    _no_warmup("adafactor", s)
    if not isinstance(_unwrap(optimizer), Adafactor):
        raise ConfigError("lr_scheduler=adafactor only reports the step size that optimizer_type=Adafactor computes "
                          "itself: use optimizer_type=Adafactor, or another lr_scheduler")
    return AdafactorSchedule(optimizer, **kwargs)  # initial_lr: the lr reported before the first step


def _a1111(optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict[str, Any]) -> LRScheduler:
    _no_warmup("a1111", s)
    if "schedule" not in kwargs:
        raise ConfigError(f"lr_scheduler=a1111 needs lr_scheduler_args schedule=..., {_A1111_HELP}")
    return A1111Schedule(optimizer, kwargs.pop("schedule"), kwargs.pop("max_steps", s.num_training_steps), **kwargs)


def _warm_restarts(optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict[str, Any]) -> LRScheduler:
    kwargs.setdefault("first_cycle_steps", max(1, s.num_training_steps // max(1, s.num_cycles)))
    kwargs.setdefault("warmup_steps", s.warmup_steps)
    if "min_lr" not in kwargs and s.min_lr_ratio is not None:
        peak = kwargs.get("max_lr") or optimizer.param_groups[0]["lr"]
        kwargs["min_lr"] = s.min_lr_ratio * peak
    return CosineAnnealingWarmUpRestarts(optimizer, **kwargs)


_BUILDERS: dict[str, Callable[..., LRScheduler]] = {
    **{name: functools.partial(_transformers, name) for name in _TRANSFORMERS},
    "piecewise_constant": _piecewise_constant,
    "adafactor": _adafactor,
    "a1111": _a1111,
    "cosine_annealing_warm_restarts": _warm_restarts,
}

LR_SCHEDULER_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""Every named schedule (an A1111 rate string or a ``module.Class`` path is accepted as well)."""


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    num_training_steps: int,
    lr_warmup_steps: int | float = 0,
    lr_scheduler_num_cycles: int = 1,
    lr_scheduler_power: float = 1.0,
    lr_scheduler_min_lr_ratio: float | None = None,
    lr_scheduler_args: OptionArgs = None,
) -> LRScheduler:
    """The scheduler kohya builds for ``--lr_scheduler`` and its options (see the module doc).

    ``num_training_steps`` counts ``scheduler.step()`` calls; under ``accelerate`` with several
    processes the wrapper steps once per process, so pass ``max_train_steps * num_processes`` as
    kohya does. ``name`` may also be an A1111 rate string, ``adafactor:<initial_lr>`` (kohya's
    spelling) or a ``module.Class`` path (a bare class name is looked up in
    ``torch.optim.lr_scheduler``), built as ``Class(optimizer, **lr_scheduler_args)``.
    """
    kwargs = parse_option_args(lr_scheduler_args, "lr_scheduler_args", raw_keys=_RAW_KEYS)
    key = name.strip()
    if is_a1111_schedule(key):
        kwargs["schedule"], key = key, "a1111"
    elif key.lower().startswith("adafactor:"):
        key, initial = key.split(":", 1)
        kwargs.setdefault("initial_lr", parse_option_args([f"initial_lr={initial}"], "lr_scheduler")["initial_lr"])
    key = key.lower() if key.lower() in _BUILDERS else key
    warmup_steps = resolve_warmup_steps(lr_warmup_steps, num_training_steps)
    settings = ScheduleSettings(num_training_steps, warmup_steps, lr_scheduler_num_cycles, lr_scheduler_power,
                                lr_scheduler_min_lr_ratio)
    required = required_lr_scheduler(optimizer)
    if required is not None and key != required:
        raise ConfigError(
            f"optimizer_type=Adafactor with relative_step=True (its default) computes its own step size from the step "
            f"count, so learning_rate and lr_scheduler={name} would have no effect. Set lr_scheduler=adafactor (kohya "
            f"switches to it silently), or pass optimizer_args relative_step=False scale_parameter=False "
            f"warmup_init=False to train with learning_rate and lr_scheduler={name}"
        )
    builder = _BUILDERS.get(key) or _custom_builder(key)
    try:
        return builder(optimizer, settings, kwargs)
    except TypeError as err:
        raise ConfigError(f"lr_scheduler={name}: {err}; check lr_scheduler_args {sorted(kwargs)}") from None


def _custom_builder(path: str) -> Callable[..., LRScheduler]:
    module_name, _, attr = path.rpartition(".")
    module_name = module_name or "torch.optim.lr_scheduler"
    try:
        cls = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:
        cls = None
    if not inspect.isclass(cls):
        close = difflib.get_close_matches(path.lower(), LR_SCHEDULER_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"lr_scheduler={path!r} is unknown: {hint}use one of {', '.join(LR_SCHEDULER_NAMES)}, an "
                          f"A1111 rate string {_A1111_HELP}, or a class path like torch.optim.lr_scheduler.OneCycleLR")

    def build(optimizer: torch.optim.Optimizer, s: ScheduleSettings, kwargs: dict[str, Any]) -> LRScheduler:
        _no_warmup(path, s)
        return cls(optimizer, **kwargs)

    return build
