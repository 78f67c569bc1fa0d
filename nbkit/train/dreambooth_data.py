"""DreamBooth's datasets: kohya's train_data_dir/reg_data_dir folders, else a run file's datasets or a
dataset TOML (kept apart from the options in ``dreambooth_config``, which the estimator reads)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from nbkit.config import ConfigError
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, folder_datasets


def _reg_dir_awaits_class_images(config: DreamBoothTrainConfig, base_dir: Path | None) -> bool:
    """A reg_data_dir with no 'N_class' subfolder yet (or none at all) while num_class_images is set:
    class image generation fills ``<reg_data_dir>/1_<class>``, so it is no error here."""
    from nbkit.data.importer import parse_kohya_folder_name

    if not (config.reg_data_dir and config.num_class_images):
        return False
    root = Path(config.reg_data_dir).expanduser()
    root = root if root.is_absolute() or base_dir is None else base_dir / root
    if root.exists() and not root.is_dir():
        return False  # folder_datasets reports it
    return not root.is_dir() or not any(p.is_dir() and parse_kohya_folder_name(p.name).class_name
                                        for p in root.iterdir())


def resolve_dreambooth_datasets(config: DreamBoothTrainConfig, inline: dict[str, Any] | None, base_dir: Path | None):
    """train_data_dir/reg_data_dir folders, else the run file's datasets or dataset_config (kohya TOML).

    A reg_data_dir still empty while num_class_images is set adds no subset: the class images are
    generated into it (``<reg_data_dir>/1_<class>``, see :mod:`nbkit.train.class_images`)."""
    from nbkit.train.run_file import resolve_datasets

    if _reg_dir_awaits_class_images(config, base_dir):
        config = replace(config, reg_data_dir=None)
    if config.train_data_dir:
        if inline or config.dataset_config:
            raise ConfigError("train_data_dir and a dataset config are both set: keep one")
        return folder_datasets(config, base_dir)
    if config.reg_data_dir:
        datasets = resolve_datasets(config, inline, base_dir)
        extra = folder_datasets(replace(config, train_data_dir=None), base_dir)[0].subsets
        return [replace(datasets[0], subsets=datasets[0].subsets + extra), *datasets[1:]]
    return resolve_datasets(config, inline, base_dir)
