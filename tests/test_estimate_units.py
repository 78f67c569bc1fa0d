"""Fast checks of the estimator's parts that need no model: the allocator model, optimizer state
sizes, settings read from the training configs, units."""

from __future__ import annotations

import pytest

from nbkit.estimate import optimizer_memory
from nbkit.estimate.allocator import SMALL_SEGMENT, CachingAllocator, round_size, segment_size
from nbkit.estimate.calibration import TABLE
from nbkit.estimate.fit_constants import published_rows
from nbkit.estimate.setting import GB, GIB, GPU_MEMORY_GIB, Setting, setting_from_config


def test_allocator_rounds_reuses_splits_and_merges():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert segment_size(1000) == SMALL_SEGMENT and segment_size(5 << 20) == 20 << 20
    assert segment_size((10 << 20) + 1) == 12 << 20  # large requests: rounded up to 2 MiB
    alloc = CachingAllocator()
    a = alloc.malloc(8 << 20, "x")  # opens a 20 MiB segment; the 12 MiB rest is a cached free block
    assert alloc.reserved == 20 << 20 and alloc.allocated == 8 << 20
    b = alloc.malloc(8 << 20, "x")  # carved from the rest: no new segment
    assert alloc.reserved == 20 << 20
    alloc.free(a)
    alloc.free(b)  # merges with a and the 4 MiB tail: one 20 MiB free block
    c = alloc.malloc(19 << 20, "x")  # the 1 MiB rest is too small to split off: the whole block is used
    assert alloc.reserved == 20 << 20 and alloc.allocated == 20 << 20
    alloc.free(c)
    alloc.malloc(30 << 20, "y")  # nothing cached is big enough: a new segment; reserved never shrinks
    assert alloc.reserved == 50 << 20 and alloc.peak_reserved == 50 << 20
    assert alloc.peak_allocated == 30 << 20 and alloc.at_peak == {"x": 0, "y": 30 << 20}


def test_optimizer_state_sizes():
    n = 1280 * 1280
    assert optimizer_memory.state_bytes("AdamW", (1280, 1280), 4) == 8 * n
    eight = optimizer_memory.state_bytes("AdamW8bit", (1280, 1280), 4)
    assert 2 * n < eight < 2.05 * n  # two uint8 states + an fp32 absmax per 256 elements
    assert optimizer_memory.state_bytes("adamw8bit", (320,), 4) == 8 * 320  # under 4096 elements: fp32
    assert optimizer_memory.state_bytes("Adafactor", (1280, 1280), 4) == 4 * (1280 + 1280)  # factored
    assert optimizer_memory.state_bytes("Lion", (10, 10), 4) == 400
    assert optimizer_memory.state_bytes("Prodigy", (10, 10), 4) == 1600
    shapes = [(1000,), (3000,)]
    assert optimizer_memory.step_temporaries("AdamW", shapes, 4, None) == [4000, 12000]  # foreach sqrt copy
    assert optimizer_memory.step_temporaries("AdamW", shapes, 4, False) == [12000, 12000]  # torch 1.12 loop


def test_setting_from_the_three_configs():
    from nbkit.presets import apply_preset
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    lora = setting_from_config(apply_preset(LoRATrainConfig(), "T4 LoRA"), "lora")
    assert (lora.method, lora.arch, lora.train_batch_size, lora.network_dim) == ("lora", "sd15", 2, 32)
    assert lora.train_text_encoder  # network_train_unet_only is false
    unet_only = setting_from_config(LoRATrainConfig(network_train_unet_only=True, v2=True), "lora")
    assert not unet_only.train_text_encoder and unet_only.arch == "sd21"
    db = setting_from_config(DreamBoothTrainConfig(v2=True, v_parameterization=True, use_ema=True), "dreambooth")
    assert (db.arch, db.cache_text_encoder_outputs, db.use_ema, db.ema_on_cpu) == ("sd21-v", True, True, True)
    assert setting_from_config(DreamBoothTrainConfig(network_module="networks.lora"), "dreambooth").method == "lora"
    hn = setting_from_config(HypernetworkTrainConfig(layer_structure="1, 1.5, 1"), "hypernetwork")
    assert hn.layer_structure == (1.0, 1.5, 1.0) and hn.cache_text_encoder_outputs and not hn.train_text_encoder
    assert setting_from_config(HypernetworkTrainConfig(shuffle_tags=True)).text_encoder_on_gpu


def test_setting_rejects_bad_values_and_units_are_stated():
    with pytest.raises(ValueError, match="method"):
        Setting("textual_inversion")
    with pytest.raises(ValueError, match="multiple of 64"):
        Setting("lora", resolution=500)
    assert GPU_MEMORY_GIB["T4"] == 15.0 and GIB == 2**30 and GB == 10**9
    fitted = [r for r in published_rows() if r.memory_fit]  # issue 11's three rows, the rest held out
    assert {r.published.gb for r in fitted} == {9.92, 13.67, 15.79} and len(TABLE) == 9
    tiny = Setting("lora", unet_config={"block_out_channels": [32, 64]})
    assert tiny.unet_config_key and tiny.replace(unet_config={"a": 1}).unet_config_key != tiny.unet_config_key


def test_calibration_holds_data_only():
    """The published rows and their source, nothing fitted or computed: no functions, no constants of
    the estimator, no nbkit imports (the fit is fit_constants.py, its output constants.py)."""
    import ast
    import inspect

    from nbkit.estimate import calibration

    tree = ast.parse(inspect.getsource(calibration))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses"}, imported
    names = {t.id for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)
             for t in (n.targets if isinstance(n, ast.Assign) else [n.target])}
    assert names == {"SOURCE", "FIXED_IN", "BEFORE_FIX_ITS", "SETUP", "TABLE"}, names
    assert all(isinstance(r.gb, float) and isinstance(r.its, float) for r in calibration.TABLE)


def _config_default(owner: type, name: str):
    import dataclasses

    spec = next(f for f in dataclasses.fields(owner) if f.name == name)
    return spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()


def test_setting_takes_the_training_options_from_the_configs():
    """Every training option of Setting is a config field with the config's default, type and help
    (read from the config class, DreamBooth's included)."""
    import dataclasses

    from nbkit.estimate.setting import MIRRORED, parse_layer_structure
    from nbkit.train.config import LoRATrainConfig, TrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    classes = {c.__name__: c for c in (TrainConfig, LoRATrainConfig, DreamBoothTrainConfig, HypernetworkTrainConfig)}
    fields = {f.name: f for f in dataclasses.fields(Setting)}
    assert len(MIRRORED) == 18 and set(MIRRORED) <= set(fields)
    assert {name for name, owner in MIRRORED.items() if owner == "DreamBoothTrainConfig"} == {
        "train_text_encoder", "use_ema", "ema_on_cpu"}
    for name, owner in MIRRORED.items():
        config_field = next(f for f in dataclasses.fields(classes[owner]) if f.name == name)
        default = _config_default(classes[owner], name)
        if name == "layer_structure":
            default = parse_layer_structure(default)
        assert fields[name].default == default, name
        assert fields[name].metadata["mirrors"] == f"{owner}.{name}"
        if name not in ("layer_structure", "network_args"):  # tuples here (hashable), lists there
            assert fields[name].type == config_field.type, name
            assert fields[name].metadata.get("help") == config_field.metadata.get("help"), name
    assert Setting("lora").layer_structure == (1.0, 2.0, 1.0)


def test_a_changed_config_default_reaches_the_setting_and_a_removed_option_is_named(monkeypatch):
    import dataclasses

    from nbkit.estimate import setting as setting_module
    from nbkit.train.config import TrainConfig

    changed = dataclasses.make_dataclass("TrainConfig", [("resolution", int, dataclasses.field(default=768))],
                                         bases=(TrainConfig,))
    classes = {**setting_module._config_classes(), "TrainConfig": changed}
    monkeypatch.setattr(setting_module, "_config_classes", lambda: classes)
    assert setting_module._make_setting()("lora").resolution == 768
    gone = dataclasses.make_dataclass("LoRATrainConfig", [("rank", int, dataclasses.field(default=4))])
    monkeypatch.setattr(setting_module, "_config_classes", lambda: {**classes, "LoRATrainConfig": gone})
    with pytest.raises(TypeError, match="LoRATrainConfig.network_dim"):
        setting_module._make_setting()


# a value different from every config's default, for each option a Setting mirrors
CHANGED = {"resolution": 640, "train_batch_size": 3, "gradient_checkpointing": False, "optimizer_type": "Lion",
           "mixed_precision": "bf16", "network_dim": 48, "conv_dim": 4, "use_ema": True, "cache_latents": False,
           "cache_text_encoder_outputs": True, "gradient_accumulation_steps": 2, "ema_on_cpu": False, "sdpa": False,
           "max_token_length": 150, "layer_structure": "1, 1.5, 1", "train_text_encoder": True,
           "network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"]}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_setting_from_config_reads_each_mirrored_option(name):
    """setting_from_config passes every mirrored option on (read as the trainer reads it)."""
    import dataclasses

    from nbkit.estimate.setting import MIRRORED, parse_layer_structure
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    assert set(CHANGED) == set(MIRRORED)
    owners = {"LoRATrainConfig": (LoRATrainConfig, "lora"), "DreamBoothTrainConfig": (DreamBoothTrainConfig, "dreambooth"),
              "HypernetworkTrainConfig": (HypernetworkTrainConfig, "hypernetwork"),
              "TrainConfig": (LoRATrainConfig, "lora")}
    cls, method = owners[MIRRORED[name]]
    base = cls()
    value = CHANGED[name]
    assert getattr(base, name) != value
    setting = setting_from_config(dataclasses.replace(base, **{name: value}), method)
    expected = {"layer_structure": parse_layer_structure, "network_args": tuple}.get(name, lambda v: v)(value)
    assert getattr(setting, name) == expected != getattr(setting_from_config(base, method), name)


def test_cli_flag_defaults_are_the_setting_defaults():
    from nbkit.cli import build_parser
    from nbkit.estimate.cli import setting_from_args

    args = build_parser().parse_args(["estimate"])
    setting = setting_from_args(args)
    default = Setting(args.method)
    for name in ("arch", "resolution", "train_batch_size", "gradient_accumulation_steps", "optimizer_type",
                 "mixed_precision", "network_dim", "conv_dim", "max_token_length", "cache_latents"):
        assert getattr(setting, name) == getattr(default, name), name
    assert not setting.gradient_checkpointing  # the CLI's flag: off unless given (as before)


def test_building_meta_models_leaves_library_logging_alone():
    """Only diffusers' empty 'kept in float32: []' notice is dropped (nbkit.runtime), not the logger."""
    import logging

    from nbkit.estimate.models import build_models

    logger = logging.getLogger("diffusers.models.modeling_utils")
    before = logger.level
    build_models(Setting("hypernetwork", cache_text_encoder_outputs=True))
    assert logger.level == before and logger.getEffectiveLevel() <= logging.WARNING

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning("a real warning")
        logger.warning("There are modules in UNet that should be kept in float32: []. Casting directly ...")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == ["a real warning"]
