"""kohya's dataset TOML: ``[general]`` < ``[[datasets]]`` < ``[[datasets.subsets]]``.

This module resolves the precedence, validates keys the way kohya's ``ConfigSanitizer`` does
(unknown keys are an error naming the closest valid key) and returns plain dataclasses.
Keys kohya knows but nbkit does not implement yet are refused with a message that says so,
rather than silently ignored, so a run never trains differently from what the file says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbkit.config import ConfigError, closest, load_toml

# Keys nbkit implements, and where they may appear.
DATASET_KEYS = {"resolution", "batch_size", "enable_bucket"}
SUBSET_KEYS = {
    "image_dir", "class_tokens", "num_repeats", "caption_extension", "is_reg",
    "shuffle_caption", "keep_tokens", "flip_aug", "caption_prefix", "caption_suffix",
}
# Keys of kohya's schema that nbkit does not implement yet (docs/config_README-en.md).
KOHYA_PENDING_KEYS = {
    "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "network_multiplier",
    "validation_split", "validation_seed", "resize_interpolation", "keep_tokens_separator",
    "secondary_separator", "caption_separator", "enable_wildcard", "color_aug", "random_crop",
    "face_crop_aug_range", "token_warmup_min", "token_warmup_step", "caption_dropout_rate",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "cache_info", "alpha_mask",
    "metadata_file", "conditioning_data_dir",
}


@dataclass
class SubsetSpec:
    image_dir: Path
    class_tokens: str | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"  # kohya's default (config_util.py)
    is_reg: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None


@dataclass
class DatasetSpec:
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    subsets: list[SubsetSpec] = field(default_factory=list)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str, source: str) -> None:
    for key in table:
        if key in allowed:
            continue
        if key in KOHYA_PENDING_KEYS:
            raise ConfigError(
                f"{source}: {where}: kohya key '{key}' is not supported by this nbkit version yet: "
                "remove it (or set it to its default) to train"
            )
        hint = closest(key, allowed | KOHYA_PENDING_KEYS)
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
        spec = DatasetSpec(
            resolution=_resolution(merged.get("resolution", 512), source),
            batch_size=int(merged.get("batch_size", 1)),
            enable_bucket=bool(merged.get("enable_bucket", False)),
        )
        if not subsets:
            raise ConfigError(f"{source}: {where} has no [[datasets.subsets]]: add one with image_dir = \"...\"")
        for s_index, subset in enumerate(subsets):
            s_where = f"{where} subset #{s_index + 1}"
            _check_keys(subset, SUBSET_KEYS, s_where, source)
            values = {k: v for k, v in {**general, **body, **subset}.items() if k in SUBSET_KEYS}
            if "image_dir" not in values:
                raise ConfigError(f"{source}: {s_where}: image_dir is required (the folder holding the images)")
            image_dir = Path(values.pop("image_dir")).expanduser()
            if not image_dir.is_absolute():
                image_dir = base_dir / image_dir
            if not image_dir.is_dir():
                raise ConfigError(f"{source}: {s_where}: image_dir '{image_dir}' is not a folder: fix the path")
            ext = values.get("caption_extension", ".caption")
            if ext and not ext.startswith("."):
                values["caption_extension"] = "." + ext
            spec.subsets.append(SubsetSpec(image_dir=image_dir, **values))
        out.append(spec)
    return out


def load_dataset_config(path: str | Path, defaults: dict[str, Any] | None = None) -> list[DatasetSpec]:
    path = Path(path)
    return parse_dataset_config(load_toml(path), str(path), path.parent, defaults)


def dataset_config_to_dict(datasets: list[DatasetSpec]) -> dict[str, Any]:
    """Write back kohya's schema (for a project's dataset TOML)."""
    out: dict[str, Any] = {"general": {}, "datasets": []}
    for ds in datasets:
        res = ds.resolution[0] if ds.resolution[0] == ds.resolution[1] else list(ds.resolution)
        table: dict[str, Any] = {"resolution": res, "batch_size": ds.batch_size, "subsets": []}
        for sub in ds.subsets:
            entry = {k: v for k, v in vars(sub).items() if v is not None}
            entry["image_dir"] = str(sub.image_dir)
            table["subsets"].append(entry)
        out["datasets"].append(table)
    return out
