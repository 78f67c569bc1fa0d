"""Optimizers by their kohya sd-scripts name (``--optimizer_type`` / ``--optimizer_args``).

The table follows kohya's ``library/train_util.py::get_optimizer``: the same case-insensitive
names, the same extra arguments (``key=value`` strings read with ``ast.literal_eval``) and the
same special cases:

* ``SGDNesterov`` / ``SGDNesterov8bit`` default to ``momentum=0.9`` and always use ``nesterov=True``;
* ``DAdaptation`` is ``DAdaptAdamPreprint``; D-Adaptation and Prodigy expect ``learning_rate`` near 1.0;
* ``Adafactor`` defaults to ``relative_step=True``: it then computes its own step size, the
  learning rates are dropped (``lr=None``) and the schedule must be ``lr_scheduler=adafactor``
  (see :func:`nbkit.train.schedules.make_lr_scheduler`);
* any other name is a class path, ``module.Class``, or a class in ``torch.optim``.

Optimizers from packages nbkit does not install (Lion, Prodigy, D-Adaptation) come with the
``nbkit[optimizers]`` extra; a missing one is a :class:`~nbkit.config.ConfigError` that says
what to install.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from nbkit.config import ConfigError

OptionArgs = Sequence[str] | Mapping[str, Any] | str | None
"""``optimizer_args`` / ``lr_scheduler_args``: kohya's ``["key=value", ...]`` or a ready dict."""

EXTRA = "nbkit[optimizers]"
ARGS_ATTRIBUTE = "nbkit_optimizer_args"
"""Attribute set on each optimizer built here: the keyword arguments as kohya records them."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One row of the table: where the class lives and what kohya adds to the user's arguments."""

    name: str
    module: str
    attr: str
    package: str
    min_version: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)  # set when the user did not
    fixed: Mapping[str, Any] = field(default_factory=dict)  # always passed, not recorded (kohya)


def _spec(name: str, module: str, attr: str, package: str, **kwargs: Any) -> tuple[str, OptimizerSpec]:
    return name.lower(), OptimizerSpec(name, module, attr, package, **kwargs)


_BNB = {"package": "bitsandbytes", "min_version": ">=0.50"}
_NESTEROV = {"defaults": {"momentum": 0.9}, "fixed": {"nesterov": True}}

OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType(dict([
    _spec("AdamW", "torch.optim", "AdamW", "torch"),
    _spec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", **_BNB),
    _spec("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", **_BNB),
    _spec("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", **_BNB),
    _spec("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", **_BNB),
    _spec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
    _spec("Lion8bit", "bitsandbytes.optim", "Lion8bit", **_BNB),
    _spec("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", **_BNB),
    _spec("SGDNesterov", "torch.optim", "SGD", "torch", **_NESTEROV),
    # bitsandbytes' SGD8bit accepts nesterov=True but runs plain momentum SGD (as under kohya).
    _spec("SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", **_BNB, **_NESTEROV),
    _spec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt"),
    _spec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    _spec("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation"),
    _spec("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", "dadaptation"),
    _spec("DAdaptAdam", "dadaptation", "DAdaptAdam", "dadaptation"),
    _spec("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", "dadaptation"),
    _spec("DAdaptAdan", "dadaptation", "DAdaptAdan", "dadaptation"),
    _spec("DAdaptSGD", "dadaptation", "DAdaptSGD", "dadaptation"),
    _spec("DAdaptLion", "dadaptation", "DAdaptLion", "dadaptation"),
    _spec("Adafactor", "transformers.optimization", "Adafactor", "transformers"),
]))

OPTIMIZER_NAMES: tuple[str, ...] = tuple(spec.name for spec in OPTIMIZERS.values())
"""Every name of the table in kohya's spelling (any ``module.Class`` is accepted as well)."""

_ADAPTIVE_PACKAGES = ("prodigyopt", "dadaptation")


def parse_option_args(items: OptionArgs, option: str, raw_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Read kohya's ``key=value`` strings into keyword arguments.

    Values are Python literals (``ast.literal_eval``, as kohya): ``weight_decay=0.01``,
    ``betas=(0.9,0.99)``, ``relative_step=True``, ``name='text'``; lower-case ``true``/``false``/
    ``none`` (TOML habits) are accepted too. Keys in ``raw_keys`` keep their text as it is
    (surrounding quotes removed), for values such as an A1111 schedule string. A mapping is
    copied unchanged; a single string is one item.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, str):
        items = [items] if items.strip() else []
    raw = set(raw_keys)
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{option}: {item!r} is not key=value (for example weight_decay=0.01)")
        parsed[key] = _unquote(text) if key in raw else _literal(text, key, option)
    return parsed


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _literal(text: str, key: str, option: str) -> Any:
    lowered = {"true": True, "false": False, "none": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"{option}: cannot read the value of {key}={text!r}: write a Python literal such as 0.01, True, "
            f"(0.9, 0.99) or, for text, {key}='{text}'"
        ) from None


def make_optimizer(
    optimizer_type: str,
    param_groups: list[dict] | Iterable[torch.nn.Parameter],
    learning_rate: float,
    optimizer_args: OptionArgs = None,
) -> torch.optim.Optimizer:
    """Build the optimizer kohya builds for ``--optimizer_type`` and ``--optimizer_args``.

    ``param_groups`` are torch parameter groups (dicts with ``params`` and maybe ``lr``) or
    plain parameters; the dicts are copied, never changed. ``learning_rate`` is the default lr of
    groups without their own. The keyword arguments kohya would record in ``ss_optimizer`` are
    kept on the optimizer for :func:`describe_optimizer`.
    """
    kwargs = parse_option_args(optimizer_args, "optimizer_args")
    groups = _copy_groups(param_groups)
    spec = OPTIMIZERS.get(optimizer_type.strip().lower())
    if spec is None:
        cls, label = _custom_class(optimizer_type.strip()), optimizer_type.strip()
        fixed: Mapping[str, Any] = {}
    else:
        cls, label, fixed = _spec_class(spec), f"optimizer_type={spec.name}", spec.fixed
        for key, value in spec.defaults.items():
            kwargs.setdefault(key, value)
        if spec.package in _ADAPTIVE_PACKAGES:
            _warn_adaptive_lr(spec.name, groups, learning_rate)
    lr: float | None = learning_rate
    if spec is not None and spec.name == "Adafactor":
        lr = _adafactor_lr(groups, learning_rate, kwargs)
    try:
        optimizer = cls(groups, lr=lr, **kwargs, **fixed)
    except TypeError as err:
        raise ConfigError(f"{label}: {err}. {_accepted_args(cls)}") from None
    except ValueError as err:
        raise ConfigError(f"{label} with optimizer_args {kwargs}: {err}") from None
    setattr(optimizer, ARGS_ATTRIBUTE, dict(kwargs))
    return optimizer


def _copy_groups(param_groups: list[dict] | Iterable[torch.nn.Parameter]) -> list[dict]:
    items = list(param_groups)
    if not items:
        raise ConfigError("make_optimizer: there are no trainable parameters (empty param_groups)")
    if isinstance(items[0], Mapping):
        return [dict(group) for group in items]
    return [{"params": items}]


def _spec_class(spec: OptimizerSpec) -> type:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise ConfigError(_missing_message(spec, err)) from None
    cls = getattr(module, spec.attr, None)
    if cls is None:
        raise ConfigError(
            f"optimizer_type={spec.name}: {spec.module} has no {spec.attr}; the installed {spec.package} is too old: "
            f"pip install -U '{spec.package}{spec.min_version}'"
        )
    return cls


def _missing_message(spec: OptimizerSpec, err: ImportError) -> str:
    text = (
        f"optimizer_type={spec.name} needs the Python package {spec.package!r}, which is not installed ({err}). "
        f"Fix: pip install '{spec.package}{spec.min_version}'"
    )
    if spec.package not in ("torch", "transformers", "bitsandbytes"):
        text += f" (or pip install '{EXTRA}', which brings every optional optimizer)"
    if spec.name == "Lion":
        text += ", or use optimizer_type=Lion8bit or bitsandbytes.optim.Lion (bitsandbytes comes with nbkit)"
    return text


def _custom_class(path: str) -> type:
    """``module.Class``, or a bare name looked up in ``torch.optim`` (kohya's rule)."""
    module_name, _, attr = path.rpartition(".")
    module_name = module_name or "torch.optim"
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"optimizer_type={path}: cannot import {module_name} ({err}); pip install the package "
                          "that provides it, or pick one of: " + ", ".join(OPTIMIZER_NAMES)) from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        candidates = [*OPTIMIZER_NAMES, *(n for n in dir(torch.optim) if n[:1].isupper())]
        close = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"optimizer_type={path!r} is not a known optimizer nor a torch Optimizer class in "
                          f"{module_name}: {hint}Use one of {', '.join(OPTIMIZER_NAMES)} or a path like torch.optim.RAdam")
    return cls


def _accepted_args(cls: type) -> str:
    try:
        names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params", "lr")]
    except (TypeError, ValueError):
        return "Check optimizer_args."
    return f"Check optimizer_args: {cls.__name__} accepts {', '.join(names)}."


def _warn_adaptive_lr(name: str, groups: list[dict], learning_rate: float) -> None:
    """D-Adaptation and Prodigy estimate the step size: lr is a multiplier around 1.0 (kohya warns)."""
    lrs = {group.get("lr", learning_rate) for group in groups}
    first = groups[0].get("lr", learning_rate)
    if first is not None and first <= 0.1:
        warnings.warn(f"optimizer_type={name}: learning_rate={first} is too low; D-Adaptation and Prodigy "
                      "expect about 1.0 (it multiplies the estimated step size)", stacklevel=3)
    if len(lrs) > 1:
        warnings.warn(f"optimizer_type={name}: several learning rates {sorted(lrs)} (unet_lr / text_encoder_lr); "
                      "D-Adaptation and Prodigy effectively use only the first group's", stacklevel=3)


def _adafactor_lr(groups: list[dict], learning_rate: float, kwargs: dict[str, Any]) -> float | None:
    """kohya's Adafactor rules; returns the lr to pass (None with ``relative_step``)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        warnings.warn("optimizer_type=Adafactor: warmup_init=True needs relative_step=True; setting it (as kohya)",
                      stacklevel=3)
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return learning_rate
    # relative_step: the step size is min(1e-2, 1/sqrt(step)) scaled by the weights' RMS; a
    # given lr is an error in transformers, so every lr goes (kohya drops unet_lr/text_encoder_lr too).
    dropped = [group.pop("lr") for group in groups if "lr" in group]
    if dropped:
        warnings.warn(f"optimizer_type=Adafactor with relative_step=True ignores the group learning rates {dropped} "
                      "(unet_lr / text_encoder_lr); pass optimizer_args relative_step=False to use them", stacklevel=3)
    return None


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """kohya's ``ss_optimizer`` text: ``module.Class(key=value,...)``, e.g.
    ``bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)``; no parentheses without arguments.

    Accepts an accelerate-wrapped optimizer. For optimizers not built by :func:`make_optimizer`
    the arguments are the ``defaults`` that differ from the class signature.
    """
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    cls = type(inner)
    args = getattr(inner, ARGS_ATTRIBUTE, None)
    if args is None:
        args = _non_default_args(inner)
    text = ",".join(f"{key}={value}" for key, value in args.items())
    name = f"{cls.__module__}.{cls.__name__}"
    return f"{name}({text})" if text else name


def _non_default_args(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    try:
        params = inspect.signature(type(optimizer).__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {
        key: value
        for key, value in optimizer.defaults.items()
        if key != "lr" and key in params and params[key].default is not inspect.Parameter.empty
        and params[key].default != value
    }
