"""Forms generated from the config dataclasses: round trips, typed input, messages, presets, TOML."""

from __future__ import annotations

import dataclasses

import pytest

from nbkit.config import ConfigError, load_toml, save_toml
from nbkit.presets import apply_preset, presets_for
from nbkit.train.config import LoRATrainConfig
from nbkit.train.dreambooth_config import DreamBoothTrainConfig
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig
from nbkit.train.run_file import load_run_config
from nbkit.train.textual_inversion_config import TextualInversionTrainConfig
from nbkit.ui.fields import UNSET, describe_fields, parse_text
from nbkit.ui.forms import CONFIG_CLASSES, METHODS, ConfigForm

IDS = [c.__name__ for c in CONFIG_CLASSES]
FLOATS = (3e-7, 1e-4, 0.1 + 0.2, 12345.678, 5e-324)  # repr must read back bit for bit
TEXT_WITH_RULES = {"learning_rate": "5e-5:100, 5e-6:1500, 5e-7", "clip_grad_value": "0.05:200, 0.01",
                   "layer_structure": "1, 1.5, 1.5, 1", "activation_func": "relu"}
VALID = {  # several non-default values per class that pass the trainers' whole-config checks
    LoRATrainConfig: dict(learning_rate=3e-7, unet_lr=1e-4, network_dim=32, network_alpha=0.5, v2=True,
                          optimizer_args=["weight_decay=0.01", "betas=(0.9,0.99)"], max_token_length=150,
                          noise_offset=0.0357, clip_skip=2, save_every_n_steps=None, lr_warmup_steps=0.05),
    DreamBoothTrainConfig: dict(learning_rate=2e-6, learning_rate_te=1e-6, train_text_encoder=True,
                                stop_text_encoder_training=100, num_class_images=50, class_prompt="photo of a dog",
                                save_precision="bf16", save_model_as="diffusers"),
    HypernetworkTrainConfig: dict(learning_rate="5e-5:100, 5e-6:1500", enable_sizes=[768, 320], clip_grad_mode="norm",
                                  layer_structure="1, 2, 2, 1", activation_func="swish", normal_std=3e-7),
    TextualInversionTrainConfig: dict(token_string="mychar", output_name="mychar", init_word="girl",
                                      num_vectors_per_token=4, learning_rate=5e-3, template_file="style.txt"),
}


def _other(info, index: int):
    """A value different from the field's default, of the field's type."""
    if info.name in TEXT_WITH_RULES and info.kind == "str":
        return TEXT_WITH_RULES[info.name]
    if info.kind == "bool":
        return not info.default
    if info.kind == "optbool":
        return True if info.default is None else None
    if info.kind == "choice":
        others = [c for c in (*info.choices, None) if c != info.default and (c is not None or info.optional)]
        return others[0] if others else info.default  # a single allowed value
    if info.kind == "list":
        return ["weight_decay=0.01", "betas=(0.9, 0.99)", "a 'b'"] if info.item is str else [768, 320]
    if info.kind == "int":
        return (info.default or 0) + 3
    if info.kind == "float":
        return FLOATS[index % len(FLOATS)]
    return f"value {index}, with spaces " if info.default is None or info.default else " x "


def _mutated(cls):
    return cls(**{info.name: _other(info, i) for i, info in enumerate(describe_fields(cls))})


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_defaults_round_trip(cls):
    assert ConfigForm(cls).config() == cls()
    assert ConfigForm(cls()).config() == cls()


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_every_field_changed_round_trips_exactly(cls):
    config = _mutated(cls)
    assert config != cls()
    form = ConfigForm(config)
    assert form.config(check=False) == config  # check=False: the values contradict each other on purpose
    floats = [i.name for i in describe_fields(cls) if i.kind == "float" and getattr(config, i.name) is not None]
    for name in floats:  # the text shown parses back to the very same float
        assert float(form.controls[name].input.value) == getattr(config, name)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_valid_non_default_config_round_trips_with_checks(cls):
    values = VALID.get(cls) or {i.name: _other(i, n) for n, i in list(enumerate(describe_fields(cls)))[:8]}
    config = dataclasses.replace(cls(), **values)
    assert ConfigForm(config).config() == config


def _type_like_a_user(form, info, value) -> None:
    """Set the widget the way a user would: pick a dropdown label, tick a box, type text."""
    control = form.controls[info.name]
    if info.kind == "bool":
        control.input.value = value
    elif info.kind in ("optbool", "choice"):
        control.input.value = UNSET if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    elif info.kind == "float":
        control.input.value = f"{value:.17e}" if value is not None else ""  # scientific notation
    elif info.kind == "list" and info.item is not str:
        control.input.value = " , ".join(map(str, value))
    elif info.kind == "list":
        control.input.value = " ".join(f'"{v}"' if " " in v else v for v in value)
    else:
        control.input.value = str(value)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_typed_widget_values_give_the_expected_config(cls):
    expected = _mutated(cls)
    form = ConfigForm(cls)
    for info in describe_fields(cls):
        _type_like_a_user(form, info, getattr(expected, info.name))
    assert form.config(check=False) == expected


def test_lora_form_reads_what_a_user_types():
    form = ConfigForm(LoRATrainConfig)
    typed = {"learning_rate": "1e-4", "unet_lr": "3E-7", "network_dim": "64", "save_every_n_steps": "1e3",
             "clip_skip": "", "optimizer_args": "weight_decay=0.01 'betas=(0.9, 0.99)'", "max_train_epochs": " 10 "}
    for name, text in typed.items():
        form.controls[name].input.value = text
    form.controls["mixed_precision"].input.value = "no"
    form.controls["v2"].input.value = "false"
    form.controls["cache_latents"].input.value = False
    assert form.config() == dataclasses.replace(
        LoRATrainConfig(), learning_rate=1e-4, unet_lr=3e-7, network_dim=64, save_every_n_steps=1000, clip_skip=None,
        optimizer_args=["weight_decay=0.01", "betas=(0.9, 0.99)"], max_train_epochs=10, mixed_precision="no",
        v2=False, cache_latents=False)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_invalid_values_show_a_message_next_to_the_field_and_block(cls):
    infos = describe_fields(cls)
    number = next(i for i in infos if i.kind == "int")
    choice = next(i for i in infos if i.kind == "choice" and not i.optional)
    form = ConfigForm(dataclasses.replace(cls(), **{choice.name: "not-a-choice"}))
    form.controls[number.name].input.value = "abc"
    with pytest.raises(ConfigError, match=number.name):
        form.config()
    assert set(form.errors) == {number.name, choice.name}
    assert "whole number" in form.errors[number.name] and "is not one of" in form.errors[choice.name]
    assert form.controls[number.name].message.layout.display is None  # shown under that field
    assert number.name in form.message.value  # and listed above the Save button
    form.controls[number.name].input.value = "7"
    form.controls[choice.name].input.value = str(choice.default)
    assert getattr(form.config(), number.name) == 7 and not form.errors


@pytest.mark.parametrize(("cls", "values", "field"), [
    (DreamBoothTrainConfig, {"stop_text_encoder_training": 5}, "stop_text_encoder_training"),  # TE not trained
    (HypernetworkTrainConfig, {"layer_structure": "2, 1"}, "layer_structure"),
    (HypernetworkTrainConfig, {"learning_rate": "fast"}, "learning_rate"),
    (HypernetworkTrainConfig, {"clip_grad_mode": "norm", "max_grad_norm": 1.0}, "clip_grad_mode"),
    (LoRATrainConfig, {"learning_rate": float("nan")}, "learning_rate"),
])
def test_trainer_checks_are_shown_at_the_field(cls, values, field):
    form = ConfigForm(dataclasses.replace(cls(), **values))
    with pytest.raises(ConfigError):
        form.config()
    assert list(form.errors) == [field]


def test_warnings_are_notes_not_errors():
    config = DreamBoothTrainConfig(network_module="networks.lora")  # a full fine-tuning rate for a LoRA
    assert ConfigForm(config).config() == config
    form = ConfigForm(config)
    form.config()
    assert "Note" in form.message.value and "learning_rate" in form.message.value


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_presets_apply(cls):
    method = METHODS.get(cls)
    form = ConfigForm(cls)
    assert [p.name for p in form.presets] == [p.name for p in presets_for(method)] if method else not form.presets
    for preset in form.presets:
        form = ConfigForm(cls)
        form.preset_menu.value = preset.name
        assert form.config() == apply_preset(cls(), preset.name)
        assert preset.description[:20] in form.preset_help.value


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=IDS)
def test_save_and_load_round_trip_through_toml(cls, tmp_path):
    run = tmp_path / "run.toml"
    datasets = {"datasets": [{"subsets": [{"image_dir": "dataset/10_sks dog", "num_repeats": 10}]}]}
    save_toml(datasets, run)  # a project's run.toml with its dataset: Save must keep it
    config = dataclasses.replace(cls(), **VALID.get(cls, {}))
    form = ConfigForm(config, path=run)
    form.save_button.click()
    assert "saved" in form.status.value
    assert load_toml(run)["datasets"] == datasets["datasets"]
    assert load_run_config(run, cls)[0] == config
    assert ConfigForm(cls, path=run).config() == config  # a new form starts from the file
    other = ConfigForm(cls, path=run)
    other.set_config(cls())
    other.load_button.click()
    assert "loaded" in other.status.value and other.config() == config


def test_save_notes_unset_fields_that_toml_cannot_hold(tmp_path):
    form = ConfigForm(DreamBoothTrainConfig(save_precision=None), path=tmp_path / "run.toml")
    form.save()
    assert "save_precision unset: the file leaves it out" in form.status.value


def test_save_refuses_an_invalid_form(tmp_path):
    form = ConfigForm(LoRATrainConfig, path=tmp_path / "run.toml")
    form.controls["network_dim"].input.value = "sixteen"
    form.save_button.click()
    assert "network_dim" in form.status.value and not (tmp_path / "run.toml").exists()
    with pytest.raises(ConfigError, match="network_dim"):
        form.save()


def test_text_parsing_rules():
    info = {i.name: i for i in describe_fields(LoRATrainConfig)}
    assert parse_text(info["network_dim"], "1e2") == 100
    with pytest.raises(ValueError, match="whole number"):
        parse_text(info["network_dim"], "1.5")
    with pytest.raises(ValueError, match="finite"):
        parse_text(info["learning_rate"], "inf")
    with pytest.raises(ValueError, match="required"):
        parse_text(info["learning_rate"], " ")
    with pytest.raises(ValueError, match="quot"):
        parse_text(info["optimizer_args"], "a='b")
    assert parse_text(info["clip_skip"], "") is None and parse_text(info["output_name"], "") == ""


def test_base_model_menu_sets_the_architecture_defaults():
    form = ConfigForm(LoRATrainConfig(pretrained_model_name_or_path="gsdf/Counterfeit-V2.5"))
    assert form.base_menu.value == "counterfeit-v2.5"  # a known source shows as its entry
    form.base_menu.value = "noobai-xl-vpred-1.0"
    config = form.config()
    assert (config.pretrained_model_name_or_path, config.resolution) == ("Laxhar/noobai-XL-Vpred-1.0", 1024)
    assert config.v_parameterization and config.zero_terminal_snr and config.network_train_unet_only
    assert "fair-ai-public-license" in form.base_help.value
    form.base_menu.value = "sd21"
    assert (form.config().resolution, form.config().v2, form.config().v_parameterization) == (768, True, True)
    form.set_config(LoRATrainConfig(pretrained_model_name_or_path="/content/drive/MyDrive/mine.safetensors"))
    assert form.base_menu.value == ""  # "my own file, URL or Drive path"
    assert form.config().pretrained_model_name_or_path.endswith("mine.safetensors")


# ----------------------------------------------------------------------------- friendly labels and hints
DATASET_FIELDS = ("dataset_config", "train_data_dir", "reg_data_dir", "class_data_dir", "caption_extension",
                  "resolution", "train_batch_size", "max_train_steps", "max_train_epochs")


@pytest.mark.parametrize("cls", list(METHODS), ids=lambda c: METHODS[c])
def test_every_field_a_beginner_sees_has_a_plain_label_with_the_option_name_beside_it(cls):
    """Basic fields of every training method (and the dataset fields) read in plain words; the kohya
    name stays beside the label and the help text is on hover, so TOML and CLI users find their option."""
    from nbkit.ui.fields import LABELS

    form = ConfigForm(cls)
    basic = [c for c in form.controls.values() if c.info.group != "advanced"]
    shown = [c for c in form.controls.values() if c.info.group != "advanced" or c.info.name in DATASET_FIELDS]
    assert not [c.info.name for c in shown if c.info.name not in LABELS], "add a label in nbkit.ui.fields.LABELS"
    assert basic
    for control in shown:
        description = control.input.description
        assert description.startswith(LABELS[control.info.name].replace("&", "&amp;"))
        assert f">{control.info.name}</small>" in description and control.input.description_allow_html
        assert control.info.help in control.input.tooltip and control.info.name in control.input.tooltip


def test_labels_leave_the_option_names_of_the_file_alone(tmp_path):
    form = ConfigForm(LoRATrainConfig(network_dim=8))
    written = load_toml(form.save(tmp_path / "run.toml"))
    assert written["network_dim"] == 8 and "Network rank (dim)" not in (tmp_path / "run.toml").read_text()


def test_learning_rate_hint_follows_the_optimizer():
    form = ConfigForm(LoRATrainConfig(optimizer_type="AdamW8bit", learning_rate=1e-4))
    hint = form.controls["learning_rate"]
    assert "1e-4" in hint.hint_text and "#1b5e20" in hint.hint.value  # fine as it is: no warning colour
    form.controls["optimizer_type"].set("Prodigy")
    assert "1.0" in hint.hint_text and "Prodigy" in hint.hint_text and "#8a6d00" in hint.hint.value
    form.controls["learning_rate"].input.value = "1.0"  # as typed into the box
    assert "not" not in hint.hint_text and "#1b5e20" in hint.hint.value
    form.controls["optimizer_type"].set("AdamW")
    assert "diverges" in hint.hint_text  # 1.0 with AdamW: the beginner's mistake, named
    ti = ConfigForm(TextualInversionTrainConfig)
    assert "5e-3" in ti.controls["learning_rate"].hint_text


def _small_dataset(tmp_path, images: int = 3, repeats: int = 5):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir(parents=True)
    for i in range(images):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"sks, picture {i}\n", encoding="utf-8")
    toml = tmp_path / "dataset.toml"
    save_toml({"datasets": [{"subsets": [{"image_dir": str(folder), "num_repeats": repeats, "caption_extension": ".txt"}]}]}, toml)
    return toml


def test_steps_and_epochs_hints_do_the_arithmetic_for_this_dataset(tmp_path):
    """3 images × 5 repeats = 15 per epoch; batch 2 -> 8 steps per epoch (kohya rounds the last batch up)."""
    toml = _small_dataset(tmp_path)
    form = ConfigForm(LoRATrainConfig(dataset_config=str(toml), resolution=64, train_batch_size=2, max_train_steps=40))
    steps, epochs = form.controls["max_train_steps"], form.controls["max_train_epochs"]
    assert "3 images × repeats = 15 images per epoch / batch 2 = 8 steps per epoch" in steps.hint_text
    assert "40 steps = 5 epochs" in steps.hint_text
    assert "max_train_steps decides" in epochs.hint_text
    form.controls["train_batch_size"].input.value = "1"
    assert "= 15 steps per epoch" in steps.hint_text and "40 steps = 2.67 epochs" in steps.hint_text
    form.controls["max_train_epochs"].input.value = "3"
    assert "3 epochs × 15 steps = 45 steps" in epochs.hint_text and "decides (not this field)" in steps.hint_text
    form.controls["dataset_config"].input.value = str(tmp_path / "missing.toml")
    assert "not known yet" in steps.hint_text
    broken = _small_dataset(tmp_path / "broken")
    (tmp_path / "broken" / "img" / "0.txt").unlink()  # a dataset the trainer would refuse: the hint says why
    form.controls["dataset_config"].input.value = str(broken)
    assert "cannot count the dataset" in steps.hint_text and "0.txt" in steps.hint_text


def test_count_dataset_matches_the_pre_flight_count(tmp_path):
    from nbkit.data.train_data import collect_items, steps_per_epoch
    from nbkit.train.run_file import resolve_datasets
    from nbkit.ui.forms import count_dataset

    toml = _small_dataset(tmp_path, images=7, repeats=3)
    counts = count_dataset(toml, 64, 4)
    config = LoRATrainConfig(dataset_config=str(toml), resolution=64, train_batch_size=4)
    items = collect_items(resolve_datasets(config, None, None), 0)[0]
    assert (counts.images, counts.samples, counts.batch) == (7, 21, "4")
    assert counts.steps_per_epoch == steps_per_epoch(items) == 6
