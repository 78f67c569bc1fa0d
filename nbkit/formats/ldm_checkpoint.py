"""diffusers Stable Diffusion -> original (LDM/CompVis) single-file checkpoints, and reading them back.

The layout is the one A1111, ComfyUI, kohya sd-scripts and diffusers' ``from_single_file`` read
(interop-formats.md §3.1):

- UNet under ``model.diffusion_model.`` (``input_blocks``/``middle_block``/``output_blocks``);
  block and layer indices are derived from the UNet config, so non-SD1.5 depths map too;
- VAE under ``first_stage_model.``, mid-block attention q/k/v/proj_out as 1x1 convs (4-D);
- SD1 text encoder under ``cond_stage_model.transformer.text_model.`` (transformers >= 5.6
  dropped the ``text_model.`` segment from ``CLIPTextModel``: it is put back here), with the
  int64 ``embeddings.position_ids`` real SD1 files carry;
- SD2 text encoder under ``cond_stage_model.model.`` in OpenCLIP names, q/k/v concatenated into
  ``in_proj_*``, plus the 24th resblock diffusers drops (a copy of the last one, as kohya's
  ``make_dummy_weights`` does; SD2 runs the penultimate layer so it is never used),
  ``text_projection`` and ``logit_scale``.

The conversions are pure functions over state dicts; they run on meta tensors too (the loader
uses that to predict a file's shapes from a config).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nbkit.formats.checkpoint_io import (  # noqa: F401  (re-exported for the loader)
    UnsafeCheckpointError,
    inspect_single_file,
    read_safetensors_header,
    read_single_file,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."
SD2_TE_PREFIX = "cond_stage_model.model."
CONFIG_METADATA_KEY = "nbkit.diffusers_config"
IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"

#: nbkit arch -> (modelspec.architecture, is SD2)
ARCHITECTURES = {
    "sd15": ("stable-diffusion-v1", False),
    "sd21": ("stable-diffusion-v2-512", True),
    "sd21-v": ("stable-diffusion-v2-768-v", True),
}

Renames = Mapping[str, str]
PrefixMap = dict[str, tuple[str, Renames | None]]

_UNET_RESNET: Renames = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_VAE_RESNET: Renames = {
    "norm1.": "norm1.",
    "conv1.": "conv1.",
    "norm2.": "norm2.",
    "conv2.": "conv2.",
    "conv_shortcut.": "nin_shortcut.",
}
# Current diffusers names first, then the pre-0.14 ones (query/key/value/proj_attn).
_VAE_ATTN: Renames = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER: Renames = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


# ----------------------------------------------------------------------------- key maps


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_prefix_map(config: Mapping[str, Any]) -> PrefixMap:
    """diffusers module prefix -> (LDM prefix, child renames) for a ``UNet2DConditionModel`` config."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down_types)
    layers = _per_block(config["layers_per_block"], n)
    out: PrefixMap = {k: (v, None) for k, v in _UNET_TOP.items()}
    idx = 1
    for i in range(n):
        for j in range(layers[i]):
            out[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{idx}.0.", _UNET_RESNET)
            out[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{idx}.1.", None)
            idx += 1
        if i < n - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{idx}.0.op.", None)
            idx += 1
    idx = 0
    for i, (block_type, n_layers) in enumerate(zip(up_types, reversed(layers))):
        for j in range(n_layers + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{idx}.0.", _UNET_RESNET)
            out[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{idx}.1.", None)
            if j == n_layers and i < n - 1:
                slot = 2 if "Attn" in block_type else 1
                out[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{idx}.{slot}.", None)
            idx += 1
    out["mid_block.attentions.0."] = ("middle_block.1.", None)
    for j in range(2):
        out[f"mid_block.resnets.{j}."] = (f"middle_block.{2 * j}.", _UNET_RESNET)
    if config.get("addition_embed_type") == "text_time":
        # SDXL's size/crop + pooled-text embedding (kohya sdxl_model_util.py::make_unet_conversion_map)
        out["add_embedding.linear_1."] = ("label_emb.0.0.", None)
        out["add_embedding.linear_2."] = ("label_emb.0.2.", None)
    return out


def vae_prefix_map(config: Mapping[str, Any]) -> PrefixMap:
    """diffusers module prefix -> (LDM prefix, child renames) for an ``AutoencoderKL`` config."""
    n = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    out: PrefixMap = {"quant_conv.": ("quant_conv.", None), "post_quant_conv.": ("post_quant_conv.", None)}
    for i in range(n):
        for j in range(layers):
            out[f"encoder.down_blocks.{i}.resnets.{j}."] = (f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
        for j in range(layers + 1):
            out[f"decoder.up_blocks.{i}.resnets.{j}."] = (f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
        if i < n - 1:
            out[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", None)
            out[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n - 1 - i}.upsample.", None)
    for part in ("encoder", "decoder"):
        for j in range(2):
            out[f"{part}.mid_block.resnets.{j}."] = (f"{part}.mid.block_{j + 1}.", _VAE_RESNET)
        out[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTN)
        out[f"{part}.conv_in."] = (f"{part}.conv_in.", None)
        out[f"{part}.conv_out."] = (f"{part}.conv_out.", None)
        out[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", None)
    return out


def _rename_key(key: str, prefixes: PrefixMap) -> str | None:
    parts = key.split(".")
    for k in range(min(5, len(parts) - 1), 0, -1):
        prefix = ".".join(parts[:k]) + "."
        if prefix in prefixes:
            new_prefix, renames = prefixes[prefix]
            rest = key[len(prefix) :]
            if renames is None:
                return new_prefix + rest
            for old, new in renames.items():
                if rest.startswith(old):
                    return new_prefix + new + rest[len(old) :]
            return None
    return None


def _convert(state_dict: Mapping[str, torch.Tensor], prefixes: PrefixMap, out_prefix: str, what: str) -> dict:
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = _rename_key(key, prefixes)
        if new is None:
            unknown.append(key)
        else:
            out[out_prefix + new] = value
    if unknown:
        raise KeyError(
            f"cannot map {len(unknown)} {what} key(s) to the original SD layout, e.g. {unknown[:3]}: "
            "the model has modules SD1/SD2 checkpoints do not have (LoRA adapters still injected? fuse and "
            "unload them first; otherwise save it as a diffusers folder)"
        )
    return out


# ----------------------------------------------------------------------------- conversions


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> ``model.diffusion_model.*``."""
    return _convert(state_dict, unet_prefix_map(config), UNET_PREFIX, "UNet")


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers VAE state dict -> ``first_stage_model.*`` (mid attention as 1x1 convs)."""
    out = _convert(state_dict, vae_prefix_map(config), VAE_PREFIX, "VAE")
    for key, value in out.items():
        is_attn = ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
        if is_attn and value.dim() == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def text_encoder_to_ldm(
    state_dict: Mapping[str, torch.Tensor], *, v2: bool, extras: bool = True
) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict (with or without ``text_model.``) -> SD1 or SD2 (OpenCLIP) layout.

    ``extras`` adds what real files carry and diffusers does not use: SD1 ``position_ids``;
    SD2 the extra last resblock, ``text_projection`` and ``logit_scale``.
    """
    flat = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if not v2:
        out = {f"{SD1_TE_PREFIX}text_model.{k}": v for k, v in flat.items()}
        if extras:
            pos = flat["embeddings.position_embedding.weight"]
            ids = torch.arange(pos.shape[0], dtype=torch.int64, device=pos.device).unsqueeze(0)
            out[f"{SD1_TE_PREFIX}text_model.embeddings.position_ids"] = ids
        return out
    out = _openclip_from_clip(flat)
    if extras:
        _add_openclip_extras(out)
    return out


def _openclip_from_clip(flat: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in flat.items():
        if key in _OPENCLIP_TOP:
            out[SD2_TE_PREFIX + _OPENCLIP_TOP[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        q = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[2]) if m else None
        if q:
            qkv.setdefault((int(m[1]), q[2]), {})[q[1]] = value
            continue
        new = next((n + m[2][len(o) :] for o, n in _OPENCLIP_LAYER.items() if m and m[2].startswith(o)), None)
        if new is None:
            unknown.append(key)
        else:
            out[f"{SD2_TE_PREFIX}transformer.resblocks.{m[1]}.{new}"] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"text encoder layer {layer} lacks some of q/k/v_proj.{kind}")
        out[f"{SD2_TE_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    if unknown:
        raise KeyError(f"cannot map text encoder key(s) to the OpenCLIP layout, e.g. {unknown[:3]}")
    return out


def _add_openclip_extras(out: dict[str, torch.Tensor]) -> None:
    base = SD2_TE_PREFIX + "transformer.resblocks."
    last = max(int(k[len(base) :].split(".")[0]) for k in out if k.startswith(base))
    src, dst = f"{base}{last}.", f"{base}{last + 1}."
    for key in [k for k in out if k.startswith(src)]:
        out[dst + key[len(src) :]] = out[key].clone()
    ref = out[SD2_TE_PREFIX + "token_embedding.weight"]
    out[SD2_TE_PREFIX + "text_projection"] = torch.eye(ref.shape[1], dtype=ref.dtype, device=ref.device)
    out[SD2_TE_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0), dtype=ref.dtype, device=ref.device)


def pipeline_to_ldm(pipe: Any, *, v2: bool, extras: bool = True) -> dict[str, torch.Tensor]:
    """The whole original-layout state dict of a ``StableDiffusionPipeline`` (UNet + VAE + TE)."""
    out = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    out.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    out.update(text_encoder_to_ldm(pipe.text_encoder.state_dict(), v2=v2, extras=extras))
    return out


# ----------------------------------------------------------------------------- writing


def _check_arch(pipe: Any, arch: str) -> tuple[str, bool, str]:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    architecture, v2 = ARCHITECTURES[arch]
    act = getattr(pipe.text_encoder.config, "hidden_act", None)
    if act in ("gelu", "quick_gelu") and (act == "gelu") != v2:
        raise ValueError(
            f"arch {arch!r} does not match the pipeline: its text encoder uses {act} "
            f"({'OpenCLIP, SD2' if act == 'gelu' else 'OpenAI CLIP, SD1'}); pass the right arch"
        )
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if v2 and (prediction == "v_prediction") != (arch == "sd21-v"):
        raise ValueError(
            f"arch {arch!r} contradicts the scheduler's prediction_type {prediction!r}: "
            "use arch='sd21-v' for v-prediction SD2 models and 'sd21' for epsilon ones"
        )
    return architecture, v2, "v" if prediction == "v_prediction" else prediction


def single_file_metadata(pipe: Any, arch: str, title: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """String metadata for a full checkpoint: ``format``, ``modelspec.*`` and ``nbkit.diffusers_config``."""
    architecture, _, prediction = _check_arch(pipe, arch)
    return checkpoint_metadata(pipe, architecture, prediction, title, extra)


def checkpoint_metadata(pipe: Any, architecture: str, prediction: str, title: str,
                        extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``format``, ``modelspec.*`` (SD1/SD2 and SDXL alike) and ``nbkit.diffusers_config``, plus ``extra``."""
    from nbkit.models.config_dirs import diffusers_config_payload

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = int(pipe.unet.config.sample_size) * scale
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.prediction_type": prediction,
        CONFIG_METADATA_KEY: json.dumps(diffusers_config_payload(pipe), sort_keys=True),
    }
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"safetensors metadata values must be str: {key!r} is {type(value).__name__}")
        meta[key] = value
    return meta


def save_pipeline_as_single_file(
    pipe: Any,
    target: str | Path,
    arch: str,
    *,
    half: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``pipe`` as one original-layout ``.safetensors`` file (atomically); return its path.

    ``half`` stores floating tensors as fp16. ``metadata`` entries (str -> str) are added to,
    and may override, the generated ones.
    """
    from nbkit.io import save_safetensors_atomic

    target = Path(target)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: nbkit writes full checkpoints as .safetensors only; rename the target")
    meta = single_file_metadata(pipe, arch, target.stem, metadata)
    dtype = torch.float16 if half else None
    tensors = {}
    for key, value in pipeline_to_ldm(pipe, v2=ARCHITECTURES[arch][1]).items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    return save_safetensors_atomic(tensors, target, metadata=meta)
