"""Config dataclasses <-> TOML <-> CLI, and kohya's dataset TOML schema."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from nbkit.config import ConfigError, from_dict, load_toml, save_toml, to_dict
from nbkit.data.dataset_config import load_dataset_config
from nbkit.train.config import LoRATrainConfig, TrainConfig
from nbkit.train.run_file import load_run_config, resolve_datasets

CONFIG_CLASSES = [TrainConfig, LoRATrainConfig]


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_toml_round_trip_every_config_class(cls, tmp_path):
    config = cls(pretrained_model_name_or_path="model", learning_rate=3e-4, clip_skip=2, seed=7)
    path = save_toml(to_dict(config), tmp_path / "run.toml")
    loaded = from_dict(cls, load_toml(path), str(path))
    assert loaded == config
    assert load_toml(path)["config_version"] == 1


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        assert f.metadata.get("group") in ("basic", "advanced")


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'network_dims'.*'network_dim'"):
        from_dict(LoRATrainConfig, {"network_dims": 8}, "run.toml")


def test_bad_type_and_choice_are_clear():
    with pytest.raises(ConfigError, match="'network_dim' must be int"):
        from_dict(LoRATrainConfig, {"network_dim": "big"})
    with pytest.raises(ConfigError, match="loss_type.*not one of"):
        from_dict(LoRATrainConfig, {"loss_type": "l3"})
    import torch

    from nbkit.train.optimizers import make_optimizer

    with pytest.raises(ConfigError, match="Adam9bit"):  # free text (module.Class allowed), checked when built
        make_optimizer("Adam9bit", [{"params": [torch.nn.Parameter(torch.zeros(1))]}], 1e-3)


def test_kohya_sectioned_config_file_is_flattened(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "run.toml").write_text(
        '[model_arguments]\npretrained_model_name_or_path = "m"\n'
        "[training_arguments]\nmax_train_steps = 5\nseed = 3\n"
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\nclass_tokens = "sks dog"\n'
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    config, inline, base = load_run_config(tmp_path / "run.toml", LoRATrainConfig)
    assert (config.max_train_steps, config.seed) == (5, 3)
    datasets = resolve_datasets(config, inline, base)
    assert datasets[0].subsets[0].image_dir == tmp_path / "img"


def test_dataset_precedence_general_dataset_subset(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "ds.toml").write_text(
        "[general]\nresolution = 256\ncaption_extension = '.txt'\nnum_repeats = 2\n"
        "[[datasets]]\nresolution = [320, 256]\nbatch_size = 4\n"
        "[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeats = 10\n"
        "[[datasets.subsets]]\nimage_dir = 'b'\nis_reg = true\ncaption_extension = 'caption'\n"
    )
    (ds,) = load_dataset_config(tmp_path / "ds.toml", defaults={"resolution": 512, "batch_size": 1})
    assert ds.resolution == (320, 256) and ds.batch_size == 4
    a, b = ds.subsets
    assert (a.num_repeats, a.caption_extension, a.is_reg) == (10, ".txt", False)
    assert (b.num_repeats, b.caption_extension, b.is_reg) == (2, ".caption", True)


def test_dataset_unknown_and_pending_keys(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nnum_repeat = 3\n")
    with pytest.raises(ConfigError, match=r"ds.toml.*unknown key 'num_repeat'.*'num_repeats'"):
        load_dataset_config(tmp_path / "ds.toml")
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nmetadata_file = 'm.json'\n")
    with pytest.raises(ConfigError, match="metadata_file.*not supported"):
        load_dataset_config(tmp_path / "ds.toml")
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nkeep_tokens = 'two'\n")
    with pytest.raises(ConfigError, match="keep_tokens' must be int"):
        load_dataset_config(tmp_path / "ds.toml")
    (tmp_path / "ds.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'missing'\n")
    with pytest.raises(ConfigError, match="missing.*not a folder"):
        load_dataset_config(tmp_path / "ds.toml")


def test_cli_flags_generated_from_dataclass():
    from nbkit.cli import build_parser
    from nbkit.config import merge_cli

    args = build_parser().parse_args(
        ["train", "lora", "--network_dim", "32", "--no-gradient_checkpointing", "--clip_skip", "2"]
    )
    config = merge_cli(LoRATrainConfig(), args)
    assert (config.network_dim, config.gradient_checkpointing, config.clip_skip) == (32, False, 2)
    assert config.network_alpha == LoRATrainConfig().network_alpha  # untouched flags keep defaults
