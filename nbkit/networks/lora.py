"""kohya-compatible LoRA (and LoCon) on top of peft.

The module set is chosen exactly as kohya sd-scripts ``networks/lora.py::LoRANetwork`` chooses it
(interop spec §1.2): walk ``named_modules()``; inside every module whose *class name* is in a target
list, every ``Linear``/``Conv2d`` descendant is adapted. 1×1 convs count as linear and use
``network_dim``; 3×3 convs are adapted only with ``conv_dim`` (LoCon) and use ``conv_dim``/``conv_alpha``.

peft's scale is ``lora_alpha / r`` and kohya's is ``alpha / dim``, so ``lora_alpha = alpha`` makes
the two identical; peft's default init (kaiming_uniform(a=√5) down, zeros up) is kohya's.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

UNET_TARGET_REPLACE_MODULE = ("Transformer2DModel",)
UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# transformers <4.48 had CLIPSdpaAttention/CLIPFlashAttention2; 5.x has only CLIPAttention.
TEXT_ENCODER_TARGET_REPLACE_MODULE = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
_INITS: dict[str, bool | str] = {"kohya": True, "gaussian": "gaussian"}


def _unwrap(module: nn.Module) -> nn.Module:
    """The original layer of a peft-wrapped module (or the module itself)."""
    base = getattr(module, "base_layer", None)
    return _unwrap(base) if isinstance(base, nn.Module) else module


def _is_adapter_internal(path: str) -> bool:
    return any(part == "base_layer" or part.startswith("lora_") for part in path.split("."))


def _walk_targets(model: nn.Module, kind: str, conv_dim: int | None) -> list[tuple[str, bool]]:
    """``[(module_path, uses_conv_dim)]`` in kohya's order."""
    if kind == "unet":
        classes = UNET_TARGET_REPLACE_MODULE + (UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 if conv_dim else ())
    elif kind == "text_encoder":
        classes = TEXT_ENCODER_TARGET_REPLACE_MODULE
    else:
        raise ValueError(f"kind must be 'unet' or 'text_encoder', got {kind!r}")
    found: dict[str, bool] = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in classes or _is_adapter_internal(name):
            continue
        for child_name, child in module.named_modules():
            if not child_name or _is_adapter_internal(child_name):
                continue
            layer = _unwrap(child)
            is_linear = isinstance(layer, nn.Linear)
            is_conv = isinstance(layer, nn.Conv2d)
            is_1x1 = is_conv and tuple(layer.kernel_size) == (1, 1)
            path = f"{name}.{child_name}" if name else child_name
            if is_linear or is_1x1:
                found.setdefault(path, False)
            elif is_conv and conv_dim:
                found.setdefault(path, True)
    return list(found.items())


def kohya_lora_targets(model: nn.Module, kind: str, conv_dim: int | None = None) -> list[str]:
    """Module paths kohya's ``LoRANetwork`` adapts in ``model`` (``kind``: ``"unet"`` or ``"text_encoder"``).

    SD1/SD2 UNet: 16 Transformer2DModel blocks × 12 = 192 modules; CLIP text encoder: layers × 6.
    With ``conv_dim`` also the ResnetBlock2D/Downsample2D/Upsample2D convs and ``time_emb_proj``.
    """
    return [path for path, _ in _walk_targets(model, kind, conv_dim)]


def kohya_alpha(alpha: float | None, rank: int) -> float:
    """kohya: an alpha of None or 0 means alpha = rank (scale 1)."""
    return float(rank) if alpha is None or float(alpha) == 0.0 else float(alpha)


def _lora_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            yield name, module


def has_adapter(model: nn.Module | None, adapter_name: str = "default") -> bool:
    """Whether ``model`` carries a peft LoRA adapter called ``adapter_name``."""
    return model is not None and any(True for _ in _lora_layers(model, adapter_name))


def inject_lora_modules(
    model: nn.Module,
    modules: Mapping[str, tuple[int, float]],
    *,
    adapter_name: str = "default",
    init_lora_weights: bool | str = True,
) -> list[str]:
    """Inject one peft LoRA adapter into exactly ``modules`` (``{path: (rank, alpha)}``).

    The most common (rank, alpha) pair becomes ``r``/``lora_alpha``; the others go to
    ``rank_pattern``/``alpha_pattern`` with fully escaped paths. Afterwards only this adapter's
    LoRA parameters are trainable, and they are float32.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not modules:
        raise ValueError("inject_lora_modules: no modules to adapt")
    if has_adapter(model, adapter_name):
        raise ValueError(
            f"{type(model).__name__} already has a LoRA adapter named {adapter_name!r}: "
            "pass another adapter_name, or start from a fresh model"
        )
    (rank, alpha), _ = Counter(modules.values()).most_common(1)[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(modules),
        rank_pattern={re.escape(p): r for p, (r, _) in modules.items() if r != rank},
        alpha_pattern={re.escape(p): a for p, (_, a) in modules.items() if a != alpha},
        init_lora_weights=init_lora_weights,
        lora_dropout=0.0,
        bias="none",
    )
    # peft's own API, for the UNet and the text encoder alike. ``PreTrainedModel.add_adapter`` and
    # ``ModelMixin.add_adapter`` only wrap this call behind their own peft version gates
    # (transformers 5.25 demands a peft that does not exist yet), so going through them lets a
    # newer transformers or diffusers break training. ``inject_adapter_in_model`` sets
    # ``model.peft_config`` itself, which is all ``get_peft_model_state_dict`` needs.
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if hasattr(model, "_hf_peft_config_loaded"):  # what add_adapter sets, so the libraries' own adapter
        model._hf_peft_config_loaded = True  # API (disable_adapters, set_adapters, ...) sees this adapter
    adapted = [name for name, _ in _lora_layers(model, adapter_name)]
    missing = sorted(set(modules) - set(adapted))
    if missing or len(adapted) != len(modules):
        raise RuntimeError(
            f"peft adapted {len(adapted)} modules of {type(model).__name__}, expected {len(modules)}; "
            f"not adapted: {missing[:5]}"
        )
    for name, layer in _lora_layers(model, adapter_name):
        r_want = modules[name][0]
        if layer.r[adapter_name] != r_want:
            raise RuntimeError(f"{name}: peft rank {layer.r[adapter_name]} != requested {r_want}")
        layer.lora_A[adapter_name].float()
        layer.lora_B[adapter_name].float()
    _train_only_adapter(model, adapter_name)
    return adapted


def _train_only_adapter(model: nn.Module, adapter_name: str) -> None:
    model.requires_grad_(False)
    for _, layer in _lora_layers(model, adapter_name):
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)


def inject_lora(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    *,
    network_dim: int,
    network_alpha: float,
    train_unet: bool = True,
    train_text_encoder: bool = True,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    adapter_name: str = "default",
    init: str = "kohya",
) -> dict[str, list[str]]:
    """Inject kohya's default LoRA module set into the UNet and/or the CLIP text encoder.

    ``network_alpha`` of 0 means alpha = dim (kohya). ``conv_dim`` turns on LoCon for the 3×3
    convs; ``conv_alpha`` defaults to 1.0 as in kohya's ``create_network``. ``init="kohya"`` is
    kaiming_uniform(a=√5) down / zeros up; ``"gaussian"`` is peft's gaussian init. A model that is
    not trained is frozen. Returns ``{"unet": [...], "text_encoder": [...]}`` adapted module paths.
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {sorted(_INITS)}, got {init!r}")
    if network_dim < 1:
        raise ValueError(f"network_dim must be >= 1, got {network_dim}")
    alpha = kohya_alpha(network_alpha, network_dim)
    c_alpha = 1.0 if conv_alpha is None else kohya_alpha(conv_alpha, conv_dim or 1)
    result: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    jobs = (("unet", unet, train_unet), ("text_encoder", text_encoder, train_text_encoder))
    for kind, model, train in jobs:
        if model is None:
            if train:
                raise ValueError(f"train_{kind}=True but no {kind} was given")
            continue
        if not train:
            model.requires_grad_(False)
            continue
        targets = _walk_targets(model, kind, conv_dim if kind == "unet" else None)
        if not targets:
            raise ValueError(f"no kohya LoRA targets found in the {kind} ({type(model).__name__})")
        modules = {p: ((conv_dim, c_alpha) if conv else (network_dim, alpha)) for p, conv in targets}
        result[kind] = inject_lora_modules(model, modules, adapter_name=adapter_name, init_lora_weights=_INITS[init])
    return result


def lora_parameters(model: nn.Module | None, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """Yield the trainable LoRA parameters of ``model`` (of one adapter if ``adapter_name`` is given)."""
    if model is None:
        return
    for name, param in model.named_parameters():
        parts = name.split(".")
        if not param.requires_grad or not ({"lora_A", "lora_B"} & set(parts)):
            continue
        if adapter_name is None or adapter_name in parts:
            yield param


def lora_alphas(model: nn.Module, adapter_name: str = "default") -> dict[str, float]:
    """kohya ``alpha`` per adapted module path (``lora_alpha``, or ``lora_alpha·√r`` under rsLoRA)."""
    out: dict[str, float] = {}
    for name, layer in _lora_layers(model, adapter_name):
        alpha = float(layer.lora_alpha[adapter_name])
        if getattr(layer, "use_rslora", {}).get(adapter_name, False):
            alpha *= math.sqrt(layer.r[adapter_name])
        out[name] = alpha
    return out


def export_kohya_state_dict(
    unet: nn.Module | None, text_encoder: nn.Module | None, *, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter of both models as a kohya state dict (``lora_unet_*``/``lora_te_text_model_*``)."""
    from peft import get_peft_model_state_dict

    from nbkit.formats.kohya_lora import peft_to_kohya

    sds: dict[str, dict[str, torch.Tensor] | None] = {"unet": None, "text_encoder": None}
    alphas: dict[str, float] = {}
    for kind, model in (("unet", unet), ("text_encoder", text_encoder)):
        if has_adapter(model, adapter_name):
            sds[kind] = get_peft_model_state_dict(model, adapter_name=adapter_name)
            alphas.update({f"{kind}.{k}": v for k, v in lora_alphas(model, adapter_name).items()})
    if sds["unet"] is None and sds["text_encoder"] is None:
        raise ValueError(f"neither the UNet nor the text encoder has a LoRA adapter named {adapter_name!r}")
    return peft_to_kohya(sds["unet"] or {}, sds["text_encoder"], alphas=alphas)


def export_kohya_sdxl_state_dict(models: Mapping[str, nn.Module | None], *, adapter_name: str = "default"):
    """The adapter of an SDXL U-Net and its two text encoders as a kohya SDXL state dict
    (``lora_unet_<SGM path>``, ``lora_te1_``, ``lora_te2_``: :mod:`nbkit.formats.kohya_sdxl`)."""
    from peft import get_peft_model_state_dict

    from nbkit.formats.kohya_sdxl import peft_to_kohya_sdxl

    sds: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        model = models.get(part)
        if has_adapter(model, adapter_name):
            sds[part] = get_peft_model_state_dict(model, adapter_name=adapter_name)
            alphas.update({f"{part}.{k}": v for k, v in lora_alphas(model, adapter_name).items()})
    if not sds:
        raise ValueError(f"no SDXL model has a LoRA adapter named {adapter_name!r}")
    return peft_to_kohya_sdxl(sds, alphas=alphas, unet_config=dict(models["unet"].config))


def _fit(tensor: torch.Tensor, shape: torch.Size, what: str) -> torch.Tensor:
    """Match a file tensor to the peft weight shape (1x1 conv <-> linear, as A1111/ComfyUI allow)."""
    if tensor.shape == shape:
        return tensor
    if tensor.dim() == 4 and len(shape) == 2 and tuple(tensor.shape[2:]) == (1, 1) and tensor.shape[:2] == shape:
        return tensor.flatten(1)
    if tensor.dim() == 2 and len(shape) == 4 and tuple(shape[2:]) == (1, 1) and tensor.shape == shape[:2]:
        return tensor[..., None, None]
    raise ValueError(f"{what} has shape {tuple(tensor.shape)} but the model needs {tuple(shape)}")


def load_kohya_lora(
    path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: torch.nn.Module | None,
    text_encoder: torch.nn.Module | None,
    *,
    text_encoder_2: torch.nn.Module | None = None,
    adapter_name: str = "default",
) -> dict[str, list[str]]:
    """Inject a peft adapter matching a kohya LoRA (ranks, alphas, conv shapes) and load its weights.

    For continuing training or previews. The LoRA parameters end up float32 and trainable.
    Returns ``{"unet": [...], "text_encoder": [...]}`` adapted module paths (and ``"text_encoder_2"``
    for SDXL). An SDXL model (``text_encoder_2`` given) or an SDXL file (``lora_te1_``/``lora_te2_``
    keys) is read with kohya's SDXL names (:func:`load_kohya_sdxl_lora`).
    """
    from nbkit.formats.kohya_lora import TE_PREFIX, UNET_PREFIX, kohya_to_peft

    sd, source = _read_lora(path_or_sd)
    if text_encoder_2 is not None or any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd):
        models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        return load_kohya_sdxl_lora(sd, models, adapter_name=adapter_name, source=source)
    models = {"unet": unet, "text_encoder": text_encoder}
    for kind, prefix in (("unet", UNET_PREFIX), ("text_encoder", TE_PREFIX)):
        if models[kind] is None and any(k.startswith(prefix) for k in sd):
            raise ValueError(f"{source}: the file has {kind} LoRA weights but no {kind} was given")
    names = {k: None if m is None else [n for n, _ in m.named_modules()] for k, m in models.items()}
    unet_sd, te_sd, alphas, ranks = kohya_to_peft(
        sd, unet_module_names=names["unet"], te_module_names=names["text_encoder"], source=source
    )
    result: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    for kind, peft_sd in (("unet", unet_sd), ("text_encoder", te_sd)):
        model = models[kind]
        if not peft_sd or model is None:
            continue
        result[kind] = _inject_and_load(model, kind, peft_sd, alphas, ranks, adapter_name, source)
    return result


def _read_lora(path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(path_or_sd, Mapping):
        return dict(path_or_sd), "kohya LoRA state dict"
    from safetensors.torch import load_file

    source = str(path_or_sd)
    if not source.endswith(".safetensors"):
        raise ValueError(f"{source}: only kohya .safetensors LoRA files are supported")
    return load_file(source), source


def _inject_and_load(model: nn.Module, kind: str, peft_sd: Mapping[str, torch.Tensor], alphas, ranks,
                     adapter_name: str, source: str) -> list[str]:
    """peft adapter on exactly the file's modules (their ranks and alphas), weights copied in."""
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd})
    modules = {p: (ranks[f"{kind}.{p}"], alphas[f"{kind}.{p}"]) for p in paths}
    adapted = inject_lora_modules(model, modules, adapter_name=adapter_name)
    with torch.no_grad():
        for p in paths:
            layer = model.get_submodule(p)
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)[adapter_name].weight
                weight.copy_(_fit(peft_sd[f"{p}.{part}.weight"], weight.shape, f"{source}: {kind} {p} {part}"))
    return adapted


def load_kohya_sdxl_lora(
    path_or_sd: str | os.PathLike | Mapping[str, torch.Tensor],
    models: Mapping[str, nn.Module | None],
    *,
    adapter_name: str = "default",
    source: str | None = None,
) -> dict[str, list[str]]:
    """:func:`load_kohya_lora` for kohya's SDXL names: ``lora_unet_<SGM path>`` onto the diffusers
    U-Net's modules, ``lora_te1_``/``lora_te2_`` onto the two text encoders (kohya
    ``networks/lora.py::create_network_from_weights`` with ``is_sdxl``: dim from ``lora_down``, alpha
    from ``.alpha``). ``models``: ``{"unet", "text_encoder", "text_encoder_2"}`` (None: not given)."""
    from nbkit.formats.kohya_sdxl import kohya_sdxl_to_peft

    sd, read_from = _read_lora(path_or_sd)
    source = source or read_from
    unet = models.get("unet")
    if unet is None:
        raise ValueError(f"{source}: an SDXL LoRA needs the SDXL U-Net to resolve its SGM module names")
    names = {part: None if m is None else [n for n, _ in m.named_modules() if not _is_adapter_internal(n)]
             for part, m in models.items()}  # fmt: skip
    sds, alphas, ranks = kohya_sdxl_to_peft(sd, names, dict(unet.config), source=source)
    result: dict[str, list[str]] = {"unet": [], "text_encoder": [], "text_encoder_2": []}
    for part, peft_sd in sds.items():
        result[part] = _inject_and_load(models[part], part, peft_sd, alphas, ranks, adapter_name, source)
    return result
