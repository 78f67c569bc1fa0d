"""kohya's dataset TOML: ``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``.

This module resolves the precedence, validates keys the way kohya's ``ConfigSanitizer`` does
(unknown keys are an error naming the closest valid key) and returns plain dataclasses.
Keys kohya knows but nbkit does not implement yet are refused with a message that says so,
rather than silently ignored, so a run never trains differently from what the file says.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields, replace
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
    if spec.batch_size < 1:
        raise ConfigError(f"{source}: {where}: batch_size = {spec.batch_size}: images per step must be at least 1; "
                          "set batch_size = 1 (or 2 on a T4 at 512 px)")
    return _on_bucket_grid(spec, f"{source}: {where}")


def _on_bucket_grid(spec: DatasetSpec, at: str) -> DatasetSpec:
    """The resolution and bucket limits on the ``bucket_reso_steps`` grid, as kohya puts them there."""
    step, (width, height) = spec.bucket_reso_steps, spec.resolution
    if step < 1 or (spec.enable_bucket and step % 64):
        # kohya train_network.py::assert_extra_args -> train_util.py::verify_bucket_reso_steps(64) for SD1/SD2
        raise ConfigError(f"{at}: bucket_reso_steps = {step}: SD's latent grid needs a multiple of 64; "
                          "set bucket_reso_steps = 64")
    if min(width, height) < step:
        raise ConfigError(f"{at}: resolution {width}x{height} is smaller than bucket_reso_steps {step}: set "
                          "resolution = 512 (SD1.x, SD2.x-base) or 768 (SD2.x-v)")
    if width % step or height % step:
        if spec.enable_bucket:  # kohya model_util.py::make_bucket_resolutions floors every bucket to the grid
            side = int(math.sqrt(width * height) // step) * step
            warnings.warn(f"{at}: resolution {width}x{height} is not a multiple of bucket_reso_steps {step}: the "
                          f"buckets are (kohya's make_bucket_resolutions); the largest square bucket is {side}x{side}",
                          stacklevel=3)
        else:  # the single fixed bucket, floored as kohya floors its buckets (BucketManager.round_to_steps)
            width, height = width - width % step, height - height % step
            warnings.warn(f"{at}: resolution {spec.resolution[0]}x{spec.resolution[1]} is not a multiple of "
                          f"bucket_reso_steps {step}: training at {width}x{height}, as kohya's buckets are floored; "
                          f"set resolution = [{width}, {height}] to silence this note", stacklevel=3)
    if not spec.enable_bucket:
        return replace(spec, resolution=(width, height))
    return _bucket_limits(spec, at)


def _bucket_limits(spec: DatasetSpec, at: str) -> DatasetSpec:
    """kohya train_util.py::BaseDataset.adjust_min_max_bucket_reso_by_steps: min floored, max raised to the
    grid (with a warning), then the resolution must lie between them."""
    step, low, high = spec.bucket_reso_steps, spec.min_bucket_reso, spec.max_bucket_reso
    new_low, new_high = low - low % step, high + (step - high % step) % step
    changed = [f"{name} {old} -> {new}" for name, old, new in
               (("min_bucket_reso", low, new_low), ("max_bucket_reso", high, new_high)) if old != new]
    if changed:
        warnings.warn(f"{at}: adjusted to multiples of bucket_reso_steps {step}, as kohya does: {', '.join(changed)}",
                      stacklevel=4)
    resolution = "x".join(map(str, spec.resolution))
    if max(spec.resolution) > new_high:
        raise ConfigError(f"{at}: max_bucket_reso {new_high} is below the resolution {resolution}: set "
                          f"max_bucket_reso = {max(1024, max(spec.resolution))} or lower the resolution")
    if min(spec.resolution) < new_low:
        raise ConfigError(f"{at}: min_bucket_reso {new_low} is above the resolution {resolution}: set "
                          f"min_bucket_reso = {min(256, min(spec.resolution) // step * step)} or raise the resolution")
    return replace(spec, min_bucket_reso=new_low, max_bucket_reso=new_high)


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


def kohya_subdirs(root: Path) -> tuple[list[tuple[Path, int, str | None]], list[tuple[Path, str]]]:
    """kohya's reading of a ``train_data_dir`` (config_util.py::generate_dreambooth_subsets_config_by_subdirs):
    every subfolder ``N_tokens`` is a subset with ``N`` repeats and class tokens ``tokens``. Returns
    ``([(folder, repeats, class_tokens)], [(ignored folder, why)])``: a name whose part before the first
    ``_`` is not a number is ignored ("ignore directory without repeats"), and so is ``N < 1``
    (kohya skips it silently; it is never read as 1 repeat). Hidden folders (backups) are left out."""
    found, ignored = [], []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        head, _, tokens = folder.name.partition("_")
        try:
            repeats = int(head)
        except ValueError:
            ignored.append((folder, "has no repeat count (kohya: 'ignore directory without repeats')"))
            continue
        if repeats < 1:
            ignored.append((folder, f"has {repeats} repeats (kohya trains only N >= 1)"))
            continue
        found.append((folder, repeats, tokens.strip() or None))
    return found, ignored


def detect_caption_extension(folder: Path) -> str:
    """The caption extension most images of ``folder`` have (``.txt`` when there are none)."""
    from nbkit.data.images import IMAGE_EXTENSIONS
    from nbkit.data.safe_extract import CAPTION_EXTENSIONS

    stems = {p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    counts = {ext: sum(1 for s in stems if (folder / f"{s}{ext}").is_file()) for ext in CAPTION_EXTENSIONS}
    best = max(CAPTION_EXTENSIONS, key=lambda ext: counts[ext])
    return best if counts[best] else ".txt"


def kohya_subdir_subsets(root: Path, is_reg: bool = False, caption_extension: str | None = None) -> list[SubsetSpec]:
    """The subsets of a kohya ``train_data_dir`` (or ``reg_data_dir``), warning about each ignored
    folder as kohya does; the caption extension is detected per folder unless given."""
    found, ignored = kohya_subdirs(root)
    for folder, why in ignored:
        warnings.warn(f"{folder}: ignored: it {why}; rename it to '<repeats>_<class tokens>' to train it",
                      stacklevel=2)
    subsets = []
    for folder, repeats, tokens in found:
        ext = caption_extension or detect_caption_extension(folder)
        subsets.append(SubsetSpec(image_dir=folder, class_tokens=tokens, num_repeats=repeats, is_reg=is_reg,
                                  caption_extension=ext if ext.startswith(".") else "." + ext))
    return subsets


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
