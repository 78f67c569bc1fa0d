"""diffusers <-> SGM single-file checkpoints (SDXL), one tensor at a time.

The SGM layout (Stability's ``generative-models``; what A1111, ComfyUI and kohya write for SDXL,
interop-formats.md §3.1) is the LDM layout of SD1/2 with a different text-conditioning part:

- U-Net under ``model.diffusion_model.`` (``input_blocks``/``middle_block``/``output_blocks``, block indices
  from the config, plus ``label_emb.0.{0,2}`` for SDXL's ``add_embedding``), VAE under ``first_stage_model.``
  (mid-block attention as 1x1 convs): the maps of :mod:`nbkit.formats.ldm_checkpoint`;
- CLIP-L under ``conditioner.embedders.0.transformer.text_model.*`` (Hugging Face names);
- OpenCLIP bigG under ``conditioner.embedders.1.model.*``: ``transformer.resblocks.N.attn.in_proj_{weight,bias}``
  = cat(q, k, v), ``attn.out_proj``, ``ln_1/2``, ``mlp.c_fc/c_proj``, ``token_embedding.weight``,
  ``positional_embedding``, ``ln_final``, ``text_projection`` (= diffusers ``text_projection.weight``
  transposed) and ``logit_scale``;
- a v-prediction model carries an empty ``v_pred`` tensor, and a zero-terminal-SNR one also ``ztsnr``
  (ComfyUI's markers: ``comfy/supported_models.py::SDXL.model_type`` reads them; its checkpoint save writes
  ``torch.tensor([])`` for each, as NoobAI-XL v-pred files carry them).

Matched against kohya sd-scripts ``library/sdxl_model_util.py`` (``make_unet_conversion_map``,
``convert_sdxl_text_encoder_2_checkpoint``, ``convert_text_encoder_2_state_dict_to_sdxl``) and diffusers
``loaders/single_file_utils.py::convert_open_clip_checkpoint``.

The map is a list of :class:`KeyPair`, built from the module state-dict keys and configs (no tensors),
so it runs on meta modules too. Each pair converts one file tensor to its module tensor(s) and back
(:func:`sgm_to_diffusers`, :func:`diffusers_to_sgm`): a loader can stream a file tensor by tensor, and a
writer can stream a model. The SD1/SD2 LDM layout comes out of the same code (:func:`sd_key_pairs`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbkit.formats.ldm_checkpoint import (
    _OPENCLIP_LAYER,
    _OPENCLIP_TOP,
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    _rename_key,
    unet_prefix_map,
    vae_prefix_map,
)
from nbkit.formats.text_encoder_keys import canonical_text_encoder_key as _canonical  # text_model.* names

TE1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, Hugging Face names (text_model.*)
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG names
V_PRED_KEY = "v_pred"  # ComfyUI: present -> v-prediction
ZTSNR_KEY = "ztsnr"  # ComfyUI: present (with v_pred) -> zero-terminal-SNR schedule
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"  # modelspec.architecture of SDXL base checkpoints

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

_VAE_CONV1X1 = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


@dataclass(frozen=True)
class KeyPair:
    """One tensor of the single file and the module tensor(s) it holds.

    ``kind``: ``"same"`` (one tensor, same shape), ``"qkv"`` (OpenCLIP ``in_proj_*`` = cat of the three
    ``keys`` q, k, v), ``"conv1x1"`` (VAE attention: Linear ``[C, C]`` <-> conv ``[C, C, 1, 1]``),
    ``"transpose"`` (OpenCLIP ``text_projection`` = ``text_projection.weight``.T).
    """

    file_key: str
    component: str
    keys: tuple[str, ...]
    kind: str = "same"


@dataclass(frozen=True)
class TextEncoderSlot:
    """Where a text encoder sits in the file: its module, key prefix, and naming scheme."""

    component: str
    prefix: str
    openclip: bool


SDXL_TEXT_ENCODERS = (
    TextEncoderSlot("text_encoder", TE1_PREFIX, openclip=False),
    TextEncoderSlot("text_encoder_2", TE2_PREFIX, openclip=True),
)


# ----------------------------------------------------------------------------- the key map


def _clip_pairs(slot: TextEncoderSlot, keys: Iterable[str]) -> list[KeyPair]:
    return [
        KeyPair(slot.prefix + _canonical(k), slot.component, (k,))
        for k in keys
        if not k.endswith("position_ids")
    ]


def _openclip_pairs(slot: TextEncoderSlot, keys: Iterable[str]) -> list[KeyPair]:
    """kohya ``convert_text_encoder_2_state_dict_to_sdxl``: q/k/v -> in_proj, text_projection transposed."""
    pairs, qkv, unknown = [], {}, []
    for key in keys:
        name = _canonical(key).removeprefix("text_model.")
        if name.endswith("position_ids"):
            continue
        if name in _OPENCLIP_TOP:
            pairs.append(KeyPair(slot.prefix + _OPENCLIP_TOP[name], slot.component, (key,)))
            continue
        if name == "text_projection.weight":
            pairs.append(KeyPair(slot.prefix + "text_projection", slot.component, (key,), "transpose"))
            continue
        m = _LAYER.fullmatch(name)
        q = _QKV.fullmatch(m[2]) if m else None
        if q:
            qkv.setdefault((int(m[1]), q[2]), {})[q[1]] = key
            continue
        new = next((n + m[2][len(o) :] for o, n in _OPENCLIP_LAYER.items() if m and m[2].startswith(o)), None)
        if new is None:
            unknown.append(key)
        else:
            pairs.append(KeyPair(f"{slot.prefix}transformer.resblocks.{m[1]}.{new}", slot.component, (key,)))
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"{slot.component} layer {layer} lacks some of q/k/v_proj.{kind}")
        keys3 = (parts["q"], parts["k"], parts["v"])
        pairs.append(KeyPair(f"{slot.prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}", slot.component, keys3, "qkv"))
    if unknown:
        raise KeyError(f"cannot map {slot.component} key(s) to the OpenCLIP layout, e.g. {unknown[:3]}")
    return pairs


def _renamed_pairs(component: str, keys: Iterable[str], prefixes, out_prefix: str) -> list[KeyPair]:
    pairs, unknown = [], []
    for key in keys:
        new = _rename_key(key, prefixes)
        if new is None:
            unknown.append(key)
            continue
        file_key = out_prefix + new
        kind = "conv1x1" if component == "vae" and _VAE_CONV1X1.search(file_key) else "same"
        pairs.append(KeyPair(file_key, component, (key,), kind))
    if unknown:
        raise KeyError(
            f"cannot map {len(unknown)} {component} key(s) to the single-file layout, e.g. {unknown[:3]} "
            "(LoRA adapters still injected? fuse and unload them first)"
        )
    return pairs


def key_pairs(
    module_keys: Mapping[str, Iterable[str]],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoders: Sequence[TextEncoderSlot] = SDXL_TEXT_ENCODERS,
) -> list[KeyPair]:
    """Every tensor of a single file, paired with the module keys it holds.

    ``module_keys``: ``{component: state-dict keys}`` for ``unet``, ``vae`` and the text encoders named
    in ``text_encoders`` (flattened transformers-5 or ``text_model.`` keys alike; the pairs keep the
    module's own spelling). Raises ``KeyError`` for a module key the layout has no place for.
    """
    pairs = _renamed_pairs("unet", module_keys["unet"], unet_prefix_map(unet_config), UNET_PREFIX)
    pairs += _renamed_pairs("vae", module_keys["vae"], vae_prefix_map(vae_config), VAE_PREFIX)
    for slot in text_encoders:
        make = _openclip_pairs if slot.openclip else _clip_pairs
        pairs += make(slot, module_keys[slot.component])
    seen: dict[str, KeyPair] = {}
    for pair in pairs:
        if pair.file_key in seen:
            raise KeyError(f"two module tensors map to {pair.file_key}: {seen[pair.file_key].keys} and {pair.keys}")
        seen[pair.file_key] = pair
    return pairs


def sd_key_pairs(module_keys: Mapping[str, Iterable[str]], unet_config, vae_config, *, v2: bool) -> list[KeyPair]:
    """The SD1 (CLIP under ``cond_stage_model.transformer.``) or SD2 (OpenCLIP under ``cond_stage_model.model.``)
    LDM layout, through the same pairs. The SD2 file's 24th resblock, ``text_projection`` and ``logit_scale``
    have no module tensor (diffusers' SD2 text encoder has 23 layers and no projection), so no pair."""
    slot = TextEncoderSlot("text_encoder", SD2_TE_PREFIX if v2 else SD1_TE_PREFIX, openclip=v2)
    return key_pairs(module_keys, unet_config, vae_config, (slot,))


# ----------------------------------------------------------------------------- tensors, both directions


def sgm_to_diffusers(pair: KeyPair, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The module tensor(s) held by one file tensor, in ``pair.keys`` order (views where possible)."""
    if pair.kind == "qkv":
        if tensor.shape[0] % 3:
            raise ValueError(f"{pair.file_key}: {tuple(tensor.shape)} does not split into q, k and v")
        return list(tensor.chunk(3, dim=0))
    if pair.kind == "conv1x1" and tensor.dim() == 4:
        return [tensor.reshape(tensor.shape[0], tensor.shape[1])]
    if pair.kind == "transpose":
        return [tensor.t()]
    return [tensor]


def diffusers_to_sgm(pair: KeyPair, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The file tensor for ``pair`` from its module tensor(s) (``pair.keys`` order)."""
    if len(tensors) != len(pair.keys):
        raise ValueError(f"{pair.file_key} needs {len(pair.keys)} tensor(s), got {len(tensors)}")
    if pair.kind == "qkv":
        return torch.cat(list(tensors), dim=0)
    (tensor,) = tensors
    if pair.kind == "conv1x1" and tensor.dim() == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    if pair.kind == "transpose":
        return tensor.t().contiguous()
    return tensor


def iter_sgm_tensors(
    pairs: Iterable[KeyPair], state_dicts: Mapping[str, Mapping[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(file key, tensor)`` from the components' state dicts, one pair at a time."""
    for pair in pairs:
        state = state_dicts[pair.component]
        yield pair.file_key, diffusers_to_sgm(pair, [state[k] for k in pair.keys])


def sgm_extras(state: Mapping[str, torch.Tensor], *, v_pred: bool = False, ztsnr: bool = False) -> dict[str, torch.Tensor]:
    """What real SDXL files carry beyond the module tensors: CLIP-L ``position_ids`` (int64), bigG
    ``logit_scale`` (log 100, as OpenCLIP initialises it) and the ComfyUI prediction markers."""
    pos = state[TE1_PREFIX + "text_model.embeddings.position_embedding.weight"]
    out = {
        TE1_PREFIX + "text_model.embeddings.position_ids": torch.arange(pos.shape[0], dtype=torch.int64).unsqueeze(0),
        TE2_PREFIX + "logit_scale": torch.tensor(math.log(100.0), dtype=pos.dtype),
    }
    if v_pred or ztsnr:
        out[V_PRED_KEY] = torch.tensor([])
    if ztsnr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out


# ----------------------------------------------------------------------------- whole pipelines


def sdxl_pipeline_pairs(pipe: Any) -> list[KeyPair]:
    """The key pairs of a ``StableDiffusionXLPipeline`` (real or on the meta device)."""
    keys = {name: list(getattr(pipe, name).state_dict()) for name in COMPONENTS}
    return key_pairs(keys, pipe.unet.config, pipe.vae.config)


def sdxl_pipeline_to_sgm(pipe: Any, *, extras: bool = True, v_pred: bool = False, ztsnr: bool = False) -> dict:
    """The whole SGM state dict of a ``StableDiffusionXLPipeline`` (tensors shared with the model where possible)."""
    states = {name: getattr(pipe, name).state_dict() for name in COMPONENTS}
    out = dict(iter_sgm_tensors(sdxl_pipeline_pairs(pipe), states))
    if extras:
        out.update(sgm_extras(out, v_pred=v_pred, ztsnr=ztsnr))
    return out


def sdxl_metadata(pipe: Any, title: str, *, v_pred: bool, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``format``, ``modelspec.*`` and ``nbkit.diffusers_config`` for an SDXL checkpoint."""
    from nbkit.formats.ldm_checkpoint import checkpoint_metadata

    return checkpoint_metadata(pipe, SDXL_ARCHITECTURE, "v" if v_pred else "epsilon", title, extra)


def save_sdxl_pipeline_as_single_file(
    pipe: Any,
    target: str | Path,
    *,
    half: bool = False,
    ztsnr: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an SDXL pipeline as one SGM-layout ``.safetensors`` file (atomically); return its path.

    A ``v_prediction`` scheduler adds the ``v_pred`` marker (``ztsnr`` adds ``ztsnr`` too); ``half`` stores
    floating tensors as fp16; ``metadata`` entries are added to, and may override, the generated ones.
    """
    from nbkit.io import save_safetensors_atomic

    target = Path(target)
    if target.suffix.lower() != ".safetensors":
        raise ValueError(f"{target}: nbkit writes full checkpoints as .safetensors only; rename the target")
    v_pred = pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    meta = sdxl_metadata(pipe, target.stem, v_pred=v_pred, extra=metadata)
    tensors = {}
    for key, value in sdxl_pipeline_to_sgm(pipe, v_pred=v_pred, ztsnr=ztsnr).items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point() and value.numel():
            value = value.to(torch.float16)
        tensors[key] = value.contiguous()
    return save_safetensors_atomic(tensors, target, metadata=meta)
