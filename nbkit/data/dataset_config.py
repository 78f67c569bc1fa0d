"""kohya's dataset TOML: ``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``.

This module resolves the precedence, validates keys the way kohya's ``ConfigSanitizer`` does
(unknown keys are an error naming the closest valid key) and returns plain dataclasses.
Keys kohya knows but nbkit does not implement yet are refused with a message that says so,
rather than silently ignored, so a run never trains differently from what the file says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nbkit.config import ConfigError, closest, coerce_value, field_types, load_toml

UNSUPPORTED = {
    "metadata_file": "fine-tuning datasets with a metadata JSON are not supported yet: use image_dir with captions",
    "conditioning_data_dir": "ControlNet datasets are not supported",
}


@dataclass
class SubsetSpec:
    """A ``[[datasets.subsets]]`` table; field names and defaults are kohya's."""

    image_dir: Path
    class_tokens: str | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"  # kohya's default (config_util.py)
    is_reg: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: list[float] | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    cache_info: bool = False  # kohya caches image sizes; nbkit reads sizes from headers (cheap)
    alpha_mask: bool = False


@dataclass
class DatasetSpec:
    """A ``[[datasets]]`` table with its subsets."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    resize_interpolation: str | None = None
    subsets: list[SubsetSpec] = field(default_factory=list)


SUBSET_KEYS = {f.name for f in fields(SubsetSpec)}
DATASET_KEYS = {f.name for f in fields(DatasetSpec)} - {"subsets"}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, source: str) -> None:
    for key in table:
        if key in allowed:
            continue
        if key in UNSUPPORTED:
            raise ConfigError(f"{source}: {where}: '{key}': {UNSUPPORTED[key]}")
        hint = closest(key, allowed)
        fix = f"did you mean '{hint}'?" if hint else "remove it"
        raise ConfigError(f"{source}: {where}: unknown key '{key}': {fix}")


def _resolution(value: Any, source: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"{source}: resolution must be an integer or [width, height], got {value!r}")


def parse_dataset_config(
    raw: dict[str, Any], source: str = "dataset config", base_dir: Path | None = None, defaults: dict[str, Any] | None = None
) -> list[DatasetSpec]:
    """Resolve a kohya dataset config dict into datasets. ``defaults`` are the run's options
    (``resolution``, ``batch_size``) and sit below ``[general]``."""
    _check_keys(raw, {"general", "datasets"}, "top level", source)
    general = dict(raw.get("general", {}))
    _check_keys(general, DATASET_KEYS | SUBSET_KEYS, "[general]", source)
    if not raw.get("datasets"):
        raise ConfigError(f"{source}: no [[datasets]] table: add one with at least one [[datasets.subsets]] image_dir")
    base_dir = base_dir or Path.cwd()
    out = []
    for d_index, dataset in enumerate(raw["datasets"]):
        where = f"[[datasets]] #{d_index + 1}"
        subsets = dataset.get("subsets", [])
        body = {k: v for k, v in dataset.items() if k != "subsets"}
        _check_keys(body, DATASET_KEYS | SUBSET_KEYS, where, source)
        merged = {**(defaults or {}), **general, **body}
        spec = _dataset_spec(merged, source, where)
        if not subsets:
            raise ConfigError(f"{source}: {where} has no [[datasets.subsets]]: add one with image_dir = \"...\"")
        for s_index, subset in enumerate(subsets):
            s_where = f"{where} subset #{s_index + 1}"
            _check_keys(subset, SUBSET_KEYS, s_where, source)
            values = {k: v for k, v in {**general, **body, **subset}.items() if k in SUBSET_KEYS}
            spec.subsets.append(_subset_spec(values, base_dir, source, s_where))
        out.append(spec)
    return out


def _typed(cls, values: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    types = field_types(cls)
    return {k: coerce_value(v, types[k], k, f"{source}: {where}") for k, v in values.items()}


def _dataset_spec(merged: dict[str, Any], source: str, where: str) -> DatasetSpec:
    values = _typed(DatasetSpec, {k: v for k, v in merged.items() if k in DATASET_KEYS and k != "resolution"}, source, where)
    spec = DatasetSpec(resolution=_resolution(merged.get("resolution", 512), source), **values)
    if spec.network_multiplier != 1.0:
        raise ConfigError(f"{source}: {where}: network_multiplier other than 1.0 is not supported yet: remove it")
    if not 0.0 <= spec.validation_split < 1.0:
        raise ConfigError(f"{source}: {where}: validation_split must be in [0, 1), got {spec.validation_split}")
    if spec.resize_interpolation and spec.resize_interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"{source}: {where}: resize_interpolation {spec.resize_interpolation!r}: use one of {', '.join(INTERPOLATIONS)}"
        )
    if spec.enable_bucket and (spec.min_bucket_reso % spec.bucket_reso_steps or spec.max_bucket_reso % spec.bucket_reso_steps):
        raise ConfigError(f"{source}: {where}: min/max_bucket_reso must be multiples of bucket_reso_steps")
    return spec


def _subset_spec(values: dict[str, Any], base_dir: Path, source: str, where: str) -> SubsetSpec:
    if "image_dir" not in values:
        raise ConfigError(f"{source}: {where}: image_dir is required (the folder holding the images)")
    image_dir = Path(str(values.pop("image_dir"))).expanduser()
    if not image_dir.is_absolute():
        image_dir = base_dir / image_dir
    if not image_dir.is_dir():
        raise ConfigError(f"{source}: {where}: image_dir '{image_dir}' is not a folder: fix the path")
    values = _typed(SubsetSpec, values, source, where)
    ext = values.get("caption_extension", ".caption")
    if ext and not ext.startswith("."):
        values["caption_extension"] = "." + ext
    sub = SubsetSpec(image_dir=image_dir, **values)
    if sub.face_crop_aug_range is not None:
        raise ConfigError(
            f"{source}: {where}: face_crop_aug_range needs kohya's face-position file names and is not supported: remove it"
        )
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(sub, name) <= 1.0:
            raise ConfigError(f"{source}: {where}: {name} must be between 0 and 1")
    if sub.num_repeats < 1:
        raise ConfigError(f"{source}: {where}: num_repeats must be at least 1")
    return sub


def load_dataset_config(path: str | Path, defaults: dict[str, Any] | None = None) -> list[DatasetSpec]:
    path = Path(path)
    return parse_dataset_config(load_toml(path), str(path), path.parent, defaults)


def _non_default(obj, names: set[str]) -> dict[str, Any]:
    """Fields that differ from kohya's defaults (TOML has no null, so None is left out)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in names and value is not None and value != f.default:
            out[f.name] = value
    return out


def dataset_config_to_dict(datasets: list[DatasetSpec]) -> dict[str, Any]:
    """Write back kohya's schema (for a project's dataset TOML)."""
    out: dict[str, Any] = {"general": {}, "datasets": []}
    for ds in datasets:
        res = ds.resolution[0] if ds.resolution[0] == ds.resolution[1] else list(ds.resolution)
        table: dict[str, Any] = {"resolution": res, **_non_default(ds, DATASET_KEYS - {"resolution"}), "subsets": []}
        for sub in ds.subsets:
            entry = {"image_dir": str(sub.image_dir), **_non_default(sub, SUBSET_KEYS - {"image_dir"})}
            table["subsets"].append(entry)
        out["datasets"].append(table)
    return out
