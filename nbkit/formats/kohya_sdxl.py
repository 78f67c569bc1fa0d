"""kohya sd-scripts SDXL LoRA names (interop spec §1, SDXL rows): pure functions, no models.

kohya trains SDXL on its own U-Net (``library/sdxl_original_unet.py``), whose module paths are the
SGM/LDM ones (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), and on two transformers text
encoders. ``networks/lora.py::LoRANetwork`` (``is_sdxl``) names a module ``lora_unet_`` + the SGM
path with ``_``, ``lora_te1_`` + the CLIP-L path, ``lora_te2_`` + the OpenCLIP-bigG path (both
``text_model.encoder.layers.N...``: transformers 4 names, which A1111/ComfyUI map). A diffusers
U-Net path becomes the SGM path with the same prefix map the single-file writer uses
(:func:`nbkit.formats.ldm_checkpoint.unet_prefix_map`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from nbkit.formats.ldm_checkpoint import _rename_key, unet_prefix_map

UNET_PREFIX = "lora_unet_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"
PREFIXES = {"unet": UNET_PREFIX, "text_encoder": TE1_PREFIX, "text_encoder_2": TE2_PREFIX}
BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL
Tensors = dict[str, torch.Tensor]


def sgm_unet_path(path: str, unet_config: Mapping[str, Any]) -> str:
    """The SGM module path of a diffusers U-Net module path (``down_blocks.1.attentions.0.proj_in``
    -> ``input_blocks.4.1.proj_in``); ValueError for a path the SGM layout has no name for."""
    sgm = _rename_key(f"{path}.weight", unet_prefix_map(unet_config))
    if sgm is None or not sgm.endswith(".weight"):
        raise ValueError(f"U-Net module {path!r} has no SGM (kohya SDXL) name")
    return sgm.removesuffix(".weight")


def unet_stem(path: str, unet_config: Mapping[str, Any]) -> str:
    """kohya SDXL stem of a diffusers U-Net module path: ``lora_unet_input_blocks_4_1_proj_in``."""
    return UNET_PREFIX + sgm_unet_path(path, unet_config).replace(".", "_")


def te_stem(path: str, part: str) -> str:
    """kohya SDXL stem of a text-encoder module path (``part``: ``text_encoder``/``text_encoder_2``),
    always with ``text_model_`` (transformers >= 5.6 dropped it from ``CLIPTextModel`` paths)."""
    return PREFIXES[part] + "text_model_" + path.removeprefix("text_model.").replace(".", "_")


def stem_of(part: str, path: str, unet_config: Mapping[str, Any]) -> str:
    return unet_stem(path, unet_config) if part == "unet" else te_stem(path, part)


def _split(key: str) -> tuple[str, str]:
    """``'a.b.lora_A.weight'`` / ``'a.b.lora_A.default.weight'`` -> ``('a.b', 'lora_A')``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("lora_A", "lora_B") and parts[-1] == "weight" and len(parts) - i in (2, 3):
            return ".".join(parts[:i]), parts[i]
    raise ValueError(f"peft key {key!r} cannot be written in kohya format: only lora_A/lora_B weights are supported")


def peft_to_kohya_sdxl(
    sds: Mapping[str, Mapping[str, torch.Tensor] | None],
    *,
    alphas: Mapping[str, float],
    unet_config: Mapping[str, Any],
) -> Tensors:
    """kohya SDXL state dict from peft state dicts ``{"unet"|"text_encoder"|"text_encoder_2": sd}``.

    ``alphas``: ``{"<part>.<path>": alpha}`` (alpha 0 means alpha = rank, as kohya). Per module:
    ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight`` and a 0-dim float32 ``<stem>.alpha``.
    """
    out: Tensors = {}
    for part, sd in sds.items():
        if part not in PREFIXES:
            raise ValueError(f"unknown SDXL part {part!r}: one of {list(PREFIXES)}")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in (sd or {}).items():
            path, which = _split(key)
            modules.setdefault(path, {})[which] = tensor
        for path, pair in modules.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise ValueError(f"{part} {path}: needs both lora_A and lora_B, has {sorted(pair)}")
            stem = stem_of(part, path, unet_config)
            if f"{stem}.alpha" in out:
                raise ValueError(f"two {part} modules map to the same kohya name {stem!r}")
            down, up = (pair[w].detach().clone().contiguous() for w in ("lora_A", "lora_B"))
            alpha = float(alphas[f"{part}.{path}"])
            out[f"{stem}.lora_down.weight"] = down
            out[f"{stem}.lora_up.weight"] = up
            out[f"{stem}.alpha"] = torch.tensor(float(down.shape[0]) if alpha == 0.0 else alpha, dtype=torch.float32)
    if not out:
        raise ValueError("peft_to_kohya_sdxl: every state dict is empty; was the LoRA injected?")
    return out


def expected_stems(module_paths: Mapping[str, Iterable[str]], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """``{stem: "<part>.<path>"}`` for the given adapted module paths per part: the inverse of the
    naming, for checks and for reading a kohya SDXL file back onto diffusers/transformers models."""
    return {stem_of(part, path, unet_config): f"{part}.{path}" for part, paths in module_paths.items() for path in paths}


# ----------------------------------------------------------------------------- reading files back

PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def part_of_stem(stem: str) -> str | None:
    """``unet`` | ``text_encoder`` | ``text_encoder_2`` for a kohya SDXL stem (None: not an SDXL stem)."""
    return next((part for part, prefix in PREFIXES.items() if stem.startswith(prefix)), None)


def stem_index(
    module_names: Mapping[str, Iterable[str] | None], unet_config: Mapping[str, Any]
) -> dict[str, tuple[str, str] | None]:
    """``{stem: (part, module path)}`` for every module of the given parts that has a kohya SDXL name
    (the inverse of :func:`stem_of`, built from the models' own module names, so ``_`` in a stem is never
    guessed); ``None`` marks a stem two module paths share. U-Net modules without an SGM name
    (``time_embedding``, ``add_embedding``: kohya never adapts them) are left out."""
    index: dict[str, tuple[str, str] | None] = {}
    for part, names in module_names.items():
        if names is None:
            continue
        if part not in PREFIXES:
            raise ValueError(f"unknown SDXL part {part!r}: one of {list(PREFIXES)}")
        for name in names:
            if not name:
                continue
            try:
                stem = stem_of(part, name, unet_config)
            except ValueError:
                continue
            index[stem] = (part, name) if index.get(stem, (part, name)) == (part, name) else None
    return index


def group_kohya_sdxl(sd: Mapping[str, torch.Tensor], source: str = "kohya SDXL LoRA") -> dict[str, dict[str, torch.Tensor]]:
    """``{stem: {"lora_down.weight", "lora_up.weight"[, "alpha"]}}``; ValueError naming the keys that are
    not kohya SDXL LoRA keys (a LyCORIS file, an SD1/SD2 ``lora_te_`` file, diffusers/peft names)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in sd.items():
        stem, _, part = key.partition(".")
        if part in PARTS and part_of_stem(stem) is not None:
            groups.setdefault(stem, {})[part] = tensor
        else:
            unknown.append(key)
    if unknown:
        sd1 = any(k.startswith("lora_te_") for k in unknown)
        raise ValueError(
            f"{source}: {len(unknown)} keys are not kohya SDXL LoRA keys (lora_unet_/lora_te1_/lora_te2_ + "
            f".lora_down.weight/.lora_up.weight/.alpha), e.g. {unknown[:4]}"
            + ("; lora_te_ is an SD1.x/SD2.x text encoder: a LoRA for another base model" if sd1 else "")
        )
    broken = [s for s, p in groups.items() if not {"lora_down.weight", "lora_up.weight"} <= set(p)]
    if broken:
        raise ValueError(f"{source}: modules missing lora_down or lora_up: {broken[:5]}")
    if not groups:
        raise ValueError(f"{source}: no LoRA modules")
    return groups


def kohya_sdxl_to_peft(
    sd: Mapping[str, torch.Tensor],
    module_names: Mapping[str, Iterable[str] | None],
    unet_config: Mapping[str, Any],
    *,
    source: str = "kohya SDXL LoRA",
) -> tuple[dict[str, Tensors], dict[str, float], dict[str, int]]:
    """A kohya SDXL state dict as peft-style dicts per part: ``({part: {"<path>.lora_A.weight": down,
    "<path>.lora_B.weight": up}}, alphas, ranks)``, ``alphas``/``ranks`` keyed ``"<part>.<path>"``.

    Stems are resolved against each part's module names (``module_names[part]``, None for a part not
    given); a missing alpha means alpha = rank (kohya). ValueError for stems that match no module.
    """
    groups = group_kohya_sdxl(sd, source)
    index = stem_index(module_names, unet_config)
    sds: dict[str, Tensors] = {part: {} for part in PREFIXES}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    unresolved: list[str] = []
    missing: dict[str, list[str]] = {}
    for stem, parts in groups.items():
        part = part_of_stem(stem)
        if module_names.get(part) is None:
            missing.setdefault(part, []).append(stem)
            continue
        where = index.get(stem)
        if where is None:
            unresolved.append(stem)
            continue
        _, path = where
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        sds[part][f"{path}.lora_A.weight"] = down
        sds[part][f"{path}.lora_B.weight"] = up
        rank = int(down.shape[0])
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
        alphas[f"{part}.{path}"] = float(rank) if alpha == 0.0 else alpha
        ranks[f"{part}.{path}"] = rank
    for part, stems in missing.items():
        raise ValueError(f"{source}: the file has {part} LoRA weights but no {part} was given, e.g. {stems[:3]}")
    if unresolved:
        raise ValueError(
            f"{source}: {len(unresolved)} LoRA modules match no module of the SDXL model, e.g. {unresolved[:5]}. "
            "Is the LoRA made for another base model (SD1 vs SD2 vs SDXL)?"
        )
    return {p: s for p, s in sds.items() if s}, alphas, ranks
