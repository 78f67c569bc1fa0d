"""Fast checks of the estimator's parts that need no model: the allocator model, optimizer state
sizes, settings read from the training configs, units."""

from __future__ import annotations

import pytest

from nbkit.estimate import optimizer_memory
from nbkit.estimate.allocator import SMALL_SEGMENT, CachingAllocator, round_size, segment_size
from nbkit.estimate.calibration import FIT_ROWS, ROWS
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
    assert len(FIT_ROWS) == 3 and {r.gb for r in FIT_ROWS} == {9.92, 13.67, 15.79} and len(ROWS) > 3
    tiny = Setting("lora", unet_config={"block_out_channels": [32, 64]})
    assert tiny.unet_config_key and tiny.replace(unet_config={"a": 1}).unet_config_key != tiny.unet_config_key
