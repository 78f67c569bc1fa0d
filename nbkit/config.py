"""Typed configs <-> TOML <-> CLI flags, one mechanism for every training method.

A config is a ``@dataclass`` whose field names are kohya sd-scripts option names and whose
``metadata`` carries the help text (``field(default=..., metadata=help_("...", group))``).
The same class drives the TOML file, the ``nbkit`` CLI flags and (later) the notebook forms.

Run files may also be kohya ``--config_file`` TOMLs, whose options sit in sections such as
``[model_arguments]``: any table other than the dataset tables is flattened, as kohya does.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from nbkit.errors import ConfigError

CONFIG_VERSION = 1
DATASET_TABLES = ("general", "datasets")
T = TypeVar("T")


def help_(text: str, group: str = "basic", choices: tuple | None = None) -> dict[str, Any]:
    """Field metadata: help text, form group ("basic"/"advanced") and allowed values."""
    return {"help": text, "group": group, "choices": choices}


def closest(name: str, options) -> str | None:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_error(key: str, valid, where: str) -> ConfigError:
    hint = closest(key, valid)
    fix = f"did you mean '{hint}'?" if hint else "remove it or check the spelling"
    return ConfigError(f"{where}: unknown key '{key}': {fix}")


def _base_type(tp) -> tuple[type, bool]:
    """Strip ``Optional``: return (inner type, optional?)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce_value(value: Any, tp, name: str, where: str) -> Any:
    base, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' may not be empty")
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split() if v] if item is str else [value]
            return [coerce_value(v, item, name, where) for v in value]
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: '{name}' must be {getattr(base, '__name__', base)}, got {value!r}"
        ) from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a flat dict; unknown keys name the closest valid key."""
    types_ = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key == "config_version":
            continue
        if key not in types_:
            raise unknown_key_error(key, types_, where)
        kwargs[key] = coerce_value(value, types_[key], key, where)
    obj = cls(**kwargs)
    _check_choices(obj, where)
    return obj


def _check_choices(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{where}: '{f.name}' = {value!r} is not one of {', '.join(map(str, choices))}")


def to_dict(obj, *, skip_none: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"config_version": CONFIG_VERSION}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and skip_none:
            continue  # TOML has no null; absent means default
        out[f.name] = value
    return out


def flatten_run_toml(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a run TOML into (options, inline dataset config). kohya sections are flattened."""
    options: dict[str, Any] = {}
    dataset: dict[str, Any] = {}
    for key, value in raw.items():
        if key in DATASET_TABLES:
            dataset[key] = value
        elif isinstance(value, dict):
            options.update(value)  # kohya --config_file: [model_arguments], [training_arguments], ...
        else:
            options[key] = value
    return options, dataset


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found: check the path (relative paths start at {Path.cwd()})")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}): fix the line it names") from None


def save_toml(data: dict[str, Any], path: str | Path) -> Path:
    from nbkit.io import atomic_write_text

    return atomic_write_text(path, tomli_w.dumps(data))


# ---------------------------------------------------------------- CLI generation
def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per field, typed, with the field's help (kohya flag names).

    argparse %-formats help texts (``%(default)s``), so a plain ``%`` in a field's help ("~20%
    slower") is doubled here; the metadata keeps the text as written for the notebook forms."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        base, _ = _base_type(types_[f.name])
        help_text = f.metadata.get("help", "").replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is list:
            kwargs["nargs"] = "*"
        else:
            kwargs["type"] = base if base in (int, float) else str
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)


def merge_cli(obj: T, namespace: argparse.Namespace, where: str = "command line") -> T:
    """Apply flags given on the command line over a config object."""
    names = {f.name for f in dataclasses.fields(obj)}
    given = {k: v for k, v in vars(namespace).items() if k in names}
    data = {k: v for k, v in to_dict(obj, skip_none=False).items() if k != "config_version"}
    data.update(given)
    return from_dict(type(obj), data, where)
