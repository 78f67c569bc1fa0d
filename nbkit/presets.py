"""Named starting points for the training configs: the forms' preset menu and ``nbkit train --preset``.

A preset is a method plus the kohya option values it sets; everything else keeps the config's
defaults. The T4 presets are checked against the VRAM estimator (``nbkit.estimate``) by a test,
so "fits a free Colab T4" is a number the estimator computed, not a hope.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

METHODS = ("lora", "dreambooth", "hypernetwork")


@dataclass(frozen=True)
class Preset:
    name: str
    method: str  # one of METHODS
    description: str
    values: dict[str, Any] = field(default_factory=dict)
    gpu_gib: float | None = 15.0  # the GPU memory the preset is meant to fit (None: CPU)
    arch: str = "sd15"  # the base model family it is made for (nbkit.estimate's arch names): sd15 | sdxl


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "T4 LoRA", "lora",
            "SD1.5 LoRA at 512 px on a free Colab T4: dim 32/alpha 16, batch 2, fp16 autocast, AdamW8bit, "
            "gradient checkpointing, cached latents; text encoder trained at a lower rate.",
            {"resolution": 512, "train_batch_size": 2, "network_dim": 32, "network_alpha": 16.0,
             "mixed_precision": "fp16", "optimizer_type": "AdamW8bit", "gradient_checkpointing": True,
             "cache_latents": True, "sdpa": True, "learning_rate": 1e-4, "unet_lr": 1e-4, "text_encoder_lr": 5e-5},
        ),
        Preset(
            "T4 SDXL LoRA", "lora",
            "SDXL LoRA (SDXL base, Pony, Illustrious, NoobAI) at 1024 px on a free Colab T4: U-Net only, dim 32/alpha "
            "16, batch 1, fp16 autocast with an fp32 VAE for the latents, AdamW8bit, gradient checkpointing, cached "
            "latents and text-encoder outputs (both text encoders leave the GPU).",
            {"resolution": 1024, "train_batch_size": 1, "network_dim": 32, "network_alpha": 16.0,
             "mixed_precision": "fp16", "no_half_vae": True, "optimizer_type": "AdamW8bit",
             "gradient_checkpointing": True, "cache_latents": True, "cache_text_encoder_outputs": True,
             "network_train_unet_only": True, "sdpa": True, "learning_rate": 1e-4, "unet_lr": 1e-4},
            arch="sdxl",
        ),
        Preset(
            "T4 LoHa (LyCORIS)", "lora",
            "SD1.5 LyCORIS LoHa at 512 px on a free Colab T4 (kohya: --network_module lycoris.kohya --network_args "
            "algo=loha ...): dim 8/alpha 4 (a LoHa of dim 8 can express rank 64), attention and MLP layers plus "
            "ResNet convs at dim 4, batch 2, fp16 autocast, AdamW8bit, gradient checkpointing, cached latents.",
            {"resolution": 512, "train_batch_size": 2, "network_module": "lycoris.kohya", "network_dim": 8,
             "network_alpha": 4.0, "network_args": ["algo=loha", "preset=full", "conv_dim=4", "conv_alpha=1"],
             "mixed_precision": "fp16", "optimizer_type": "AdamW8bit", "gradient_checkpointing": True,
             "cache_latents": True, "sdpa": True, "learning_rate": 2e-4, "unet_lr": 2e-4, "text_encoder_lr": 1e-4},
        ),
        Preset(
            "T4 DreamBooth", "dreambooth",
            "SD1.5 DreamBooth (full U-Net) at 512 px on a free Colab T4: batch 1, fp32 master weights under fp16 "
            "autocast, AdamW8bit, gradient checkpointing, frozen text encoder with cached outputs.",
            {"resolution": 512, "train_batch_size": 1, "mixed_precision": "fp16", "optimizer_type": "AdamW8bit",
             "gradient_checkpointing": True, "cache_latents": True, "cache_text_encoder_outputs": True,
             "train_text_encoder": False, "sdpa": True, "learning_rate": 1e-6},
        ),
        Preset(
            "T4 hypernetwork", "hypernetwork",
            "A1111 hypernetwork at 512 px on a free Colab T4: batch 1, fp16 autocast, AdamW as A1111, "
            "gradient checkpointing.",
            {"resolution": 512, "train_batch_size": 1, "mixed_precision": "fp16", "optimizer_type": "AdamW",
             "gradient_checkpointing": True, "cache_latents": True, "sdpa": True, "learning_rate": "0.00001"},
        ),
        Preset(
            "CPU demo", "lora",
            "Seconds-long run on the tiny bundled model (64 px, fp32, plain AdamW): for trying the notebooks on a CPU.",
            {"resolution": 64, "train_batch_size": 2, "network_dim": 4, "network_alpha": 4.0,
             "mixed_precision": "no", "optimizer_type": "AdamW", "gradient_checkpointing": False,
             "learning_rate": 1e-3, "max_train_steps": 20, "save_every_n_steps": None},
            gpu_gib=None,
        ),
    )
}


def presets_for(method: str) -> list[Preset]:
    """Presets usable with a method (the CPU demo preset is a LoRA preset)."""
    return [p for p in PRESETS.values() if p.method == method]


def apply_preset(config, name: str):
    """A copy of ``config`` with the preset's values; unknown preset names list the valid ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in PRESETS[name].values.items() if k in names})
