"""The estimator on SDXL (the T4 preset, auto-fit, full fine-tuning refused before loading), on LyCORIS
networks (parameter counts against the lycoris-lora package's own modules, the per-step weight
rebuild), and auto-fit choosing the fastest setting that fits."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from nbkit.config import ConfigError
from nbkit.estimate import Setting, auto_fit, estimate, estimate_step_seconds, largest_batch, setting_from_config
from nbkit.estimate.lycoris import factorization, parameter_shapes
from nbkit.presets import PRESETS, apply_preset
from nbkit.train.config import LoRATrainConfig

lycoris = pytest.importorskip("lycoris")


def _sdxl_folder(tmp_path):
    """What the estimator reads of an SDXL diffusers folder: its model_index.json."""
    folder = tmp_path / "sdxl-base"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                         "text_encoder": ["transformers", "CLIPTextModel"],
                                                         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    return folder


# ----------------------------------------------------------------------------------------------- SDXL
def test_t4_sdxl_lora_preset_fits_a_t4_with_one_gib_headroom():
    preset = PRESETS["T4 SDXL LoRA"]
    config = apply_preset(LoRATrainConfig(), preset.name)
    setting = setting_from_config(config, "lora", arch=preset.arch)
    assert (setting.arch, setting.resolution, setting.train_batch_size) == ("sdxl", 1024, 1)
    assert setting.cache_latents and not setting.text_encoder_on_gpu and not setting.train_text_encoder
    result = estimate(setting)
    assert result.fits(15.0, 1.0), result.summary()
    assert result.peak_gib > 5.5  # the fp16 SDXL U-Net alone is 4.8 GiB: a real SDXL estimate, not SD1.5's


def test_auto_fit_on_an_sdxl_lora_config_read_from_its_model_folder(tmp_path, capsys):
    from nbkit.estimate.cli import apply_auto_fit

    config = apply_preset(LoRATrainConfig(pretrained_model_name_or_path=str(_sdxl_folder(tmp_path))), "T4 SDXL LoRA")
    assert setting_from_config(config).arch == "sdxl"  # told from the folder, no arch= needed
    greedy = dataclasses.replace(config, train_batch_size=2, gradient_checkpointing=False)
    fitted = apply_auto_fit(greedy, "T4")
    out = capsys.readouterr().out
    assert "auto-fit (sdxl, T4)" in out and "fastest setting that fits" in out
    assert fitted.train_batch_size * fitted.gradient_accumulation_steps == 2  # the effective batch is kept
    assert estimate(setting_from_config(fitted)).fits(15.0, 1.0)


def test_full_sdxl_dreambooth_is_refused_before_loading_with_the_gpu_it_needs(tmp_path):
    from nbkit.estimate.guard import refuse_if_unfit
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig

    config = apply_preset(DreamBoothTrainConfig(pretrained_model_name_or_path=str(_sdxl_folder(tmp_path)),
                                                resolution=1024), "T4 DreamBooth")
    config = dataclasses.replace(config, resolution=1024)
    with pytest.raises(ConfigError) as refused:
        refuse_if_unfit(config, "T4")
    message = str(refused.value)
    assert "dreambooth sdxl at 1024 px does not fit T4" in message and "A100-40GB" in message
    assert "T4 SDXL LoRA" in message
    assert refuse_if_unfit(config, 80.0).peak_gib < 80  # it fits an 80 GiB card: no refusal there
    sd15 = apply_preset(DreamBoothTrainConfig(), "T4 DreamBooth")
    assert refuse_if_unfit(sd15, "T4").fits(15.0, 1.0)  # the T4 preset is not refused


# -------------------------------------------------------------------------------------------- LyCORIS
def test_lokr_factorization_is_lycoris():
    from lycoris.functional.general import factorization as theirs

    for dimension in (127, 128, 250, 320, 360, 640, 768, 1280, 2048, 5120):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dimension, factor) == theirs(dimension, factor), (dimension, factor)


LAYERS = {"linear": nn.Linear(640, 320), "conv3x3": nn.Conv2d(320, 640, 3, padding=1), "conv1x1": nn.Conv2d(640, 1280, 1)}
OPTIONS = [
    ("locon", {}), ("locon", {"use_tucker": True}), ("loha", {}), ("loha", {"use_tucker": True}),
    ("lokr", {"factor": 8}), ("lokr", {"factor": -1}), ("lokr", {"factor": 4, "decompose_both": True}),
    ("lokr", {"factor": 16, "use_tucker": True}), ("lokr", {"factor": 8, "full_matrix": True}),
    ("lokr", {"factor": 8, "unbalanced_factorization": True}),
    ("loha", {"dora_wd": True}), ("lokr", {"factor": 8, "dora_wd": True}),
    ("locon", {"dora_wd": True, "wd_on_output": False}), ("loha", {"use_scalar": True}),
]


@pytest.mark.parametrize("rank", [4, 32])
@pytest.mark.parametrize("algo,options", OPTIONS)
def test_parameter_shapes_are_those_of_lycoris_modules(algo, options, rank):
    """Each formula against the module the lycoris-lora package builds (nbkit's plug-in builds the same)."""
    import lycoris.modules as modules

    cls = {"locon": modules.LoConModule, "loha": modules.LohaModule, "lokr": modules.LokrModule}[algo]
    kwargs = {"weight_decompose": options.get("dora_wd", False), "wd_on_out": options.get("wd_on_output", True),
              **{k: v for k, v in options.items() if k not in ("dora_wd", "wd_on_output")}}
    for name, layer in LAYERS.items():
        real = cls(f"lora_unet_{name}", layer, 1.0, rank, rank / 2, **kwargs)
        formula = parameter_shapes(tuple(layer.weight.shape), algo, rank, **options)
        assert sorted(tuple(p.shape) for p in real.parameters()) == sorted(formula), (name, algo, options)


@pytest.mark.parametrize("args", [["algo=loha"], ["algo=lokr", "factor=8"], ["algo=lokr", "factor=8", "dora_wd=True"],
                                  ["algo=locon", "conv_dim=8"], ["algo=loha", "preset=attn-mlp"]])
def test_estimated_parameters_are_those_of_nbkit_lycoris_network(args):
    """The estimator's trainable count on the tiny U-Net against nbkit's own LyCORIS plug-in on it."""
    from nbkit.models.tiny import build_tiny_components
    from nbkit.networks.lycoris import LycorisNetwork

    unet = build_tiny_components("sd15")["unet"]
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=args, network_dim=4, network_alpha=2,
                             network_train_unet_only=True)
    network = LycorisNetwork(config)
    network.inject({"unet": unet})
    real = sum(p.numel() for p in network.parameters("unet"))
    setting = setting_from_config(config, "lora").replace(unet_config=dict(unet.config), resolution=64,
                                                          cache_text_encoder_outputs=True)
    assert estimate(setting).params["trainable"] == real > 0


def test_lycoris_memory_counts_its_parameters_and_the_weight_rebuilt_each_step():
    from nbkit.models.tiny import build_tiny_components

    tiny = dict(build_tiny_components("sd15")["unet"].config)
    base = Setting("lora", unet_config=tiny, resolution=128, network_dim=4, train_text_encoder=False,
                   cache_text_encoder_outputs=True, gradient_checkpointing=False)
    lora = estimate(base)
    lokr = estimate(base.replace(network_module="lycoris.kohya", network_args=("algo=lokr", "factor=8")))
    dora = estimate(base.replace(network_module="lycoris.kohya", network_args=("algo=lokr", "factor=8", "dora_wd=True")))
    loha = estimate(base.replace(network_module="lycoris.kohya", network_args=("algo=loha",)))
    activations = "activations and temporaries"
    # every adapted layer's rebuilt weight is kept for the backward; DoRA adds its norms on top
    assert lokr.breakdown[activations] > lora.breakdown[activations]
    assert dora.breakdown[activations] > lokr.breakdown[activations]
    assert dora.params["trainable"] > lokr.params["trainable"]
    # LoHa's two rank-4 pairs per layer hold about twice LoRA's one pair (and LyCORIS adapts more layers)
    assert loha.params["trainable"] > 2 * lora.params["trainable"] * 0.9
    assert loha.breakdown["trainable weights"] > lora.breakdown["trainable weights"]


# -------------------------------------------------------------------------------- fastest setting
def _largest_batch_first(setting: Setting, gpu: float) -> Setting:
    """The former auto-fit: the largest batch up to the config's, without checkpointing when it reaches it."""
    best = None
    for gc in (False, True):
        batch, _ = largest_batch(setting.replace(gradient_checkpointing=gc), gpu, 1.0, setting.train_batch_size)
        if batch and (best is None or batch > best[0]):
            best = (batch, gc)
        if batch == setting.train_batch_size:
            break
    return setting.replace(train_batch_size=best[0], gradient_checkpointing=best[1])


def test_auto_fit_picks_the_fastest_setting_not_the_largest_batch():
    """SD1.5 LoRA at 768 px, batch 4 asked for, on a 10 GiB card: batch 4 fits only with gradient
    checkpointing; batch 2 fits without. Largest-batch-first takes batch 4 with checkpointing; batch 2
    with 2 accumulation steps and no checkpointing trains the same 4 images per step faster."""
    config = LoRATrainConfig(resolution=768, train_batch_size=4, network_dim=32, network_train_unet_only=True,
                             cache_text_encoder_outputs=True, gradient_checkpointing=True)
    setting = setting_from_config(config, "lora")
    old = _largest_batch_first(setting, 10.0)
    assert (old.train_batch_size, old.gradient_checkpointing) == (4, True)
    fitted, found, changes = auto_fit(config, "lora", gpu_gib=10.0)
    new = setting_from_config(fitted, "lora")
    assert (new.train_batch_size, new.gradient_accumulation_steps, new.gradient_checkpointing) == (2, 2, False)
    assert found.fits(10.0, 1.0)
    images_per_second = lambda s: 4 / estimate_step_seconds(s, "T4")  # noqa: E731
    assert images_per_second(new) > images_per_second(old) * 1.02
    assert any("fastest setting that fits" in c for c in changes)
    assert any(c.startswith("gradient_accumulation_steps 1 -> 2") for c in changes)
    # what the user fixed stays as it is: checkpointing kept on, so batch 4 it is
    fitted, _, changes = auto_fit(config, "lora", gpu_gib=10.0, fixed={"gradient_checkpointing"})
    assert (fitted.train_batch_size, fitted.gradient_accumulation_steps, fitted.gradient_checkpointing) == (4, 1, True)
    assert not any("gradient_checkpointing" in c for c in changes)


def test_text_encoder_caching_is_a_lever_only_for_fixed_captions():
    config = LoRATrainConfig(resolution=512, train_batch_size=1, network_dim=8, network_train_unet_only=True,
                             cache_text_encoder_outputs=False, gradient_checkpointing=True)
    fitted, _, _ = auto_fit(config, "lora", gpu_gib="T4")
    assert not fitted.cache_text_encoder_outputs  # captions may change (shuffle_caption...): never turned on
    fitted, _, changes = auto_fit(config, "lora", gpu_gib="T4", fixed_captions=True)
    assert fitted.cache_text_encoder_outputs and any("cache_text_encoder_outputs on" in c for c in changes)
    assert torch.isfinite(torch.tensor(estimate(setting_from_config(fitted)).peak_gib))
