"""SDXL models for the LoRA merges: configs, meta models, and where an adapted module's weight sits.

kohya's SDXL LoRA names (``lora_unet_<SGM path>``, ``lora_te1_``, ``lora_te2_``;
:mod:`nbkit.formats.kohya_sdxl`) are resolved against the diffusers U-Net and the two transformers
text encoders built on the meta device from the model's configs; a module's weight is then found

- in an SGM single file through the key pairs of :func:`nbkit.formats.sgm_checkpoint.key_pairs`
  (kohya ``library/sdxl_model_util.py``): the U-Net under ``model.diffusion_model.``, CLIP-L under
  ``conditioner.embedders.0.transformer.text_model.``, and bigG's q/k/v projections as thirds of
  OpenCLIP's ``attn.in_proj_weight`` (rows ``[i·h, (i+1)·h)``, q then k then v), as kohya
  ``networks/sdxl_merge_lora.py::merge_to_sd_model`` merges into its own modules before saving them
  with ``convert_text_encoder_2_state_dict_to_sdxl``;
- in a diffusers folder under the component's own key (``text_encoder_2/…``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY
from nbkit.merge.sources import SDXLDiffusersSource, TensorSource, read_config

PARTS = ("unet", "text_encoder", "text_encoder_2")


def sdxl_configs(source: TensorSource, config_dir: str | Path | None = None) -> dict[str, dict]:
    """``{unet, vae, text_encoder, text_encoder_2: config}`` of an SDXL model: its folder, ``config_dir``,
    the embedded ``nbkit.diffusers_config``, or nbkit's shipped SDXL base configs."""
    from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS

    if isinstance(source, SDXLDiffusersSource):
        return source.configs
    names = (*PARTS, "vae")
    if config_dir is None and CONFIG_METADATA_KEY in source.metadata:
        payload = json.loads(source.metadata[CONFIG_METADATA_KEY])
        if all(name in payload for name in names):
            return {name: payload[name] for name in names}
    folder = Path(config_dir) if config_dir is not None else CONFIGS_ROOT / SHIPPED_CONFIGS["sdxl"]
    return {name: read_config(folder / name) for name in names}


def meta_sdxl_models(configs: Mapping[str, dict]) -> dict[str, torch.nn.Module]:
    """The SDXL U-Net, CLIP-L (``CLIPTextModel``) and bigG (``CLIPTextModelWithProjection``) on the meta
    device (module names and weight shapes only)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(part: str) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in configs[part].items() if not k.startswith("_")})

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                "text_encoder": CLIPTextModel(text_config("text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(text_config("text_encoder_2"))}  # fmt: skip


def sgm_weight_keys(models: Mapping[str, torch.nn.Module], configs: Mapping[str, dict]):
    """``{(part, module state-dict key): (SGM file key, rows or None)}`` for every U-Net and text-encoder
    tensor: the single-file writer's own pairs, so merging uses exactly the names the file has."""
    from nbkit.formats.sgm_checkpoint import key_pairs

    keys = {part: list(models[part].state_dict()) for part in PARTS}
    pairs = key_pairs({**keys, "vae": []}, configs["unet"], configs["vae"])
    out: dict[tuple[str, str], tuple[str, tuple[int, int] | None]] = {}
    hidden = int(configs["text_encoder_2"]["hidden_size"])
    for pair in pairs:
        for i, key in enumerate(pair.keys):
            rows = (i * hidden, (i + 1) * hidden) if pair.kind == "qkv" else None
            out[(pair.component, key)] = (pair.file_key, rows)
    return out
