"""The real SD1.5 / SD2.1 / SDXL models on the meta device, set up as nbkit's trainers set them up.

Built from the diffusers configs shipped in ``nbkit/models/configs`` (no weights, no download, no
tokenizer). Dtypes follow the trainers: frozen weights in the mixed-precision dtype, trainable ones
in fp32 (master weights), the VAE in fp32; LoRA is injected with nbkit's own ``inject_lora``
(kohya's module set), LyCORIS with the lycoris-lora package's own modules in nbkit's module set
(:mod:`nbkit.estimate.lycoris`), the hypernetwork with nbkit's ``apply_hypernetwork``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nbkit.estimate.setting import Setting

CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
FOLDERS = {"sd15": "sd15", "sd21": "sd21-base", "sd21-v": "sd21-v", "sdxl": "sdxl"}
META = torch.device("meta")


@dataclass
class MetaModels:
    unet: nn.Module
    text_encoders: list[nn.Module]  # the ones on the GPU during training (none when outputs are cached)
    vae: nn.Module | None  # on the GPU when latents are not cached
    trainable: list[nn.Parameter]
    frozen: list[torch.Tensor]  # frozen weights on the GPU
    context_dim: int
    sdxl: bool
    notes: list[str] = field(default_factory=list)
    device: torch.device = META  # where the step's inputs are made (a real device to measure a real step)


def weight_dtype(setting: Setting) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(setting.mixed_precision, torch.float32)


def unet_config(setting: Setting) -> dict:
    if setting.unet_config is not None:
        return dict(setting.unet_config)
    return json.loads((CONFIGS / FOLDERS[setting.arch] / "unet" / "config.json").read_text())


def _text_encoder(folder: Path, with_projection: bool) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _text_encoders(setting: Setting) -> list[nn.Module]:
    folder = CONFIGS / FOLDERS[setting.arch]
    if setting.arch == "sdxl":
        return [_text_encoder(folder / "text_encoder", False), _text_encoder(folder / "text_encoder_2", True)]
    return [_text_encoder(folder / "text_encoder", False)]


def build_models(setting: Setting) -> MetaModels:
    """Meta-device models for ``setting``, frozen/trainable and with the dtypes the trainer uses."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    low = weight_dtype(setting)
    master = low if setting.full_fp16 else torch.float32
    config = unet_config(setting)
    with META:
        unet = UNet2DConditionModel.from_config(config)
        encoders = _text_encoders(setting)
        vae = None
        if not setting.cache_latents and setting.unet_config is None:
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / FOLDERS[setting.arch] / "vae"))
    unet.set_attn_processor(AttnProcessor2_0())
    for model in (unet, *encoders):
        model.requires_grad_(False)
    full = setting.method == "dreambooth"
    # diffusers' "modules that should be kept in float32: []" notice on every cast is dropped by its
    # text where it is logged (nbkit.runtime.NOISE, set up by ``import nbkit``); nothing else is silenced
    unet.to(master if full else low)
    for te in encoders:
        te.to(master if full and setting.trains_text_encoder else low)
    notes: list[str] = []
    trainable = _add_trainables(setting, unet, encoders, master, notes)
    if setting.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if setting.trains_text_encoder:
            from nbkit.train.common import enable_te_checkpointing

            for te in encoders:
                enable_te_checkpointing(te)
    unet.train()
    on_gpu = encoders if setting.text_encoder_on_gpu else []
    for te in encoders:
        te.train(setting.trains_text_encoder)
    frozen = [p for m in (unet, *on_gpu) for p in m.parameters() if not p.requires_grad]
    if vae is not None:
        vae.requires_grad_(False)
        frozen += list(vae.parameters())
    return MetaModels(unet=unet, text_encoders=on_gpu, vae=vae, trainable=trainable, frozen=frozen,
                      context_dim=int(unet.config.cross_attention_dim), sdxl=setting.arch == "sdxl"
                      or unet.config.addition_embed_type == "text_time", notes=notes)


def _add_trainables(setting: Setting, unet: nn.Module, encoders: list[nn.Module], master: torch.dtype,
                    notes: list[str]) -> list:
    """Make the method's weights trainable (or add them) and return them in optimizer order."""
    if setting.method == "dreambooth":
        models = [unet, *encoders] if setting.trains_text_encoder else [unet]
        for model in models:
            model.requires_grad_(True)
        return [p for model in models for p in model.parameters()]
    if setting.method == "lora" and setting.lycoris:
        from nbkit.estimate.lycoris import add_lycoris

        return add_lycoris(setting, unet, encoders, master, notes)
    if setting.method == "lora":
        return _add_lora(setting, unet, encoders, master)
    return _add_hypernetwork(setting, unet)


def _add_lora(setting: Setting, unet: nn.Module, encoders: list[nn.Module], master: torch.dtype) -> list:
    from nbkit.networks.lora import inject_lora, lora_parameters

    with META:
        inject_lora(unet, encoders[0], network_dim=setting.network_dim, network_alpha=setting.network_dim / 2,
                    train_unet=True, train_text_encoder=setting.trains_text_encoder, conv_dim=setting.conv_dim)
        for te in encoders[1:] if setting.trains_text_encoder else []:  # SDXL's second text encoder
            inject_lora(None, te, network_dim=setting.network_dim, network_alpha=setting.network_dim / 2,
                        train_unet=False, train_text_encoder=True)
    params = list(lora_parameters(unet))
    if setting.trains_text_encoder:
        params += [p for te in encoders for p in lora_parameters(te)]
    for p in params:
        p.data = p.data.to(master)
        p.requires_grad_(True)
    return params


def _add_hypernetwork(setting: Setting, unet: nn.Module) -> list:
    from nbkit.networks.hypernetwork.apply import apply_hypernetwork, attention_modules
    from nbkit.networks.hypernetwork.module import Hypernetwork

    sizes = sorted({attn.to_k.in_features for _, attn in attention_modules(unet)})
    with META:
        hypernetwork = Hypernetwork("estimate", sizes, list(setting.layer_structure))
    apply_hypernetwork(unet, hypernetwork, 1.0)
    hypernetwork.train()
    return list(hypernetwork.parameters())
