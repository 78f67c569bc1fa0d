"""Run files: one TOML with the training options, and the dataset inline or by reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from nbkit.config import ConfigError, flatten_run_toml, from_dict, load_toml, to_dict
from nbkit.data.dataset_config import DatasetSpec, load_dataset_config, parse_dataset_config
from nbkit.train.config import Where

T = TypeVar("T")


def load_run_config(path: str | Path, cls: type[T]) -> tuple[T, dict[str, Any], Path]:
    """Return (config, inline dataset tables, folder relative paths start from), checked
    (``config.checked``: values no run can train with are refused before any model loads)."""
    config, inline, base_dir = _read_run_file(path, cls)
    return checked_config(config, str(path)), inline, base_dir


def _read_run_file(path: str | Path, cls: type[T]) -> tuple[T, dict[str, Any], Path]:
    path = Path(path)
    options, inline = flatten_run_toml(load_toml(path))
    config = from_dict(cls, options, where=str(path))
    return config, inline, path.parent.resolve()


def checked_config(config: T, where: Where = "config") -> T:
    """``config.checked(where)`` for the training configs (others are returned as they are)."""
    check = getattr(config, "checked", None)
    return check(where) if callable(check) else config


def resolve_datasets(config, inline: dict[str, Any] | None, base_dir: Path | None) -> list[DatasetSpec]:
    """Datasets from the run file's inline tables, or from ``dataset_config``."""
    defaults = {"resolution": config.resolution, "batch_size": config.train_batch_size}
    base_dir = base_dir or Path.cwd()
    if inline:
        if config.dataset_config:
            raise ConfigError("the run file has both dataset_config and inline [[datasets]]: keep one")
        return parse_dataset_config(inline, "run file datasets", base_dir, defaults)
    if not config.dataset_config:
        raise ConfigError(
            "no dataset: set dataset_config = \"dataset.toml\" or add [[datasets]] / [[datasets.subsets]] tables"
        )
    dataset_path = Path(config.dataset_config).expanduser()
    if not dataset_path.is_absolute():
        dataset_path = base_dir / dataset_path
    return load_dataset_config(dataset_path, defaults)


def run_config_dict(config, datasets_raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run TOML dict (options, then inline datasets if given)."""
    out = to_dict(config)
    if datasets_raw:
        out.update(datasets_raw)
    return out


def config_from_args(args, cls: type[T]) -> tuple[T, dict[str, Any], Path]:
    """(config, inline datasets, base folder) from ``--config run.toml`` plus the CLI flags over it."""
    import dataclasses

    from nbkit.config import merge_cli

    run_file = getattr(args, "config", None)
    explicit = set(vars(args))  # flags given (argparse leaves the others out of the namespace)
    if run_file:
        config, inline, base_dir = _read_run_file(run_file, cls)
        explicit |= set(flatten_run_toml(load_toml(Path(run_file)))[0])
    else:
        config, inline, base_dir = cls(), {}, Path.cwd()
    config = merge_cli(config, args)
    if getattr(args, "auto_fit", None):  # `nbkit train <method> --auto_fit [GPU]`: fit the GPU by the estimator
        from nbkit.estimate.cli import apply_auto_fit

        fixed = explicit & {f.name for f in dataclasses.fields(config)}  # what the user set is kept
        config = apply_auto_fit(config, args.auto_fit, fixed=tuple(sorted(fixed)))
    # Checked once the flags are merged (a flag may fix a value of the file), before any model loads.
    flags = set(vars(args))
    if run_file:
        config = _anchor_folders(config, base_dir, flags)

    def where(name: str) -> str:
        return "command line" if name in flags or not run_file else str(run_file)

    return checked_config(config, where), inline, base_dir


# kohya folder options: a relative one in a run file means a folder beside that file, as the
# dataset paths do (folder_datasets). Anchored once here, so the class images DreamBooth generates
# land in the folder its datasets read, whatever the current directory. Flags stay relative to it.
FOLDER_OPTIONS = ("train_data_dir", "reg_data_dir", "class_data_dir")


def _anchor_folders(config: T, base_dir: Path, flags: set[str]) -> T:
    import dataclasses

    changes = {}
    for name in FOLDER_OPTIONS:
        value = getattr(config, name, None)
        if value and name not in flags and not Path(value).expanduser().is_absolute():
            changes[name] = str(base_dir / Path(value).expanduser())
    return dataclasses.replace(config, **changes) if changes else config

