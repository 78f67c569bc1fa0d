"""kohya sd-scripts LoRA ``.safetensors`` (interop spec §1): peft <-> kohya names, hashes, saving.

A file holds, per adapted module, ``<stem>.lora_down.weight``, ``<stem>.lora_up.weight`` and a 0-dim
``<stem>.alpha`` and nothing else. Stems are ``lora_unet_<diffusers path with _>`` and
``lora_te_text_model_<CLIP path with _>``: transformers >= 5.6 dropped the ``text_model.`` segment
from ``CLIPTextModel`` module paths, but A1111 and ComfyUI only map the old form, so it is put back
on writing and stripped on reading. Metadata lives in :mod:`nbkit.formats.kohya_metadata`; loading a
file into models (peft injection) is :func:`nbkit.networks.lora.load_kohya_lora`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from nbkit.formats.kohya_metadata import LoraTrainingInfo, build_metadata
from nbkit.formats.lycoris import check_lycoris_state_dict, is_lycoris_state_dict

__all__ = [
    "LoraTrainingInfo",
    "addnet_hash_legacy",
    "addnet_hash_safetensors",
    "build_metadata",
    "check_kohya_state_dict",
    "kohya_to_peft",
    "peft_to_kohya",
    "precalculate_safetensors_hashes",
    "save_kohya_lora",
    "te_stem",
    "unet_stem",
]

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE_STEM_PREFIX = "lora_te_text_model_"
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip
# Multi-token names in SD module paths: used to turn "_" back into "." when no model is given.
_COMPOUNDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
    "conv_norm_out", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1",
    "layer_norm2", "final_layer_norm",
})  # fmt: skip
Tensors = dict[str, torch.Tensor]


def unet_stem(path: str) -> str:
    """kohya stem of a diffusers UNet module path: ``lora_unet_down_blocks_0_…``."""
    return UNET_PREFIX + path.replace(".", "_")


def te_stem(path: str) -> str:
    """kohya stem of a CLIP text-encoder module path, always with ``text_model_`` (A1111/ComfyUI need it)."""
    return TE_STEM_PREFIX + path.removeprefix("text_model.").replace(".", "_")


def _split_peft_key(key: str) -> tuple[str, str]:
    """``'a.b.lora_A.weight'`` / ``'a.b.lora_A.default.weight'`` -> ``('a.b', 'lora_A')``."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in ("lora_A", "lora_B") and parts[-1] == "weight" and len(parts) - i in (2, 3):
            return ".".join(parts[:i]), parts[i]
    raise ValueError(
        f"peft key {key!r} cannot be written in kohya format: only lora_A/lora_B weights are supported "
        "(no DoRA magnitude vectors, no lora_bias, no embedding LoRA)"
    )


def _group_peft(sd: Mapping[str, torch.Tensor], kind: str) -> dict[str, dict[str, torch.Tensor]]:
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        path, part = _split_peft_key(key.removeprefix(f"{kind}."))
        mods.setdefault(path, {})[part] = tensor
    broken = [p for p, parts in mods.items() if set(parts) != {"lora_A", "lora_B"}]
    if broken:
        raise ValueError(f"{kind} LoRA modules without both lora_A and lora_B: {broken[:5]}")
    return mods


def _alpha_for(alphas: Mapping[str, float] | float, kind: str, path: str, rank: int) -> float:
    if isinstance(alphas, (int, float)):
        alpha = float(alphas)
    else:
        key = next((k for k in (f"{kind}.{path}", path) if k in alphas), None)
        if key is None:
            raise KeyError(f"no alpha for {kind} module {path!r}: pass a number or a mapping with key '{kind}.{path}'")
        alpha = float(alphas[key])
    return float(rank) if alpha == 0.0 else alpha  # kohya: alpha 0/None means alpha = rank


def peft_to_kohya(
    unet_sd: Mapping[str, torch.Tensor],
    te_sd: Mapping[str, torch.Tensor] | None = None,
    *,
    alphas: Mapping[str, float] | float,
) -> Tensors:
    """kohya state dict from ``peft.get_peft_model_state_dict`` outputs of the UNet and the text encoder.

    ``alphas``: one number for every module, or ``{"unet.<path>"|"text_encoder.<path>"|"<path>": alpha}``
    (see :func:`nbkit.networks.lora.lora_alphas`). Conv tensors stay 4-D; alphas are 0-dim float32.
    """
    out: Tensors = {}
    for kind, sd, stem_of in (("unet", unet_sd, unet_stem), ("text_encoder", te_sd, te_stem)):
        for path, parts in _group_peft(sd or {}, kind).items():
            stem = stem_of(path)
            if f"{stem}.alpha" in out:
                raise ValueError(f"two {kind} modules map to the same kohya name {stem!r}")
            down = parts["lora_A"].detach().clone().contiguous()
            up = parts["lora_B"].detach().clone().contiguous()
            if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
                raise ValueError(
                    f"{kind} {path}: incompatible LoRA shapes down {tuple(down.shape)} up {tuple(up.shape)}"
                )
            out[f"{stem}.lora_down.weight"] = down
            out[f"{stem}.lora_up.weight"] = up
            alpha = _alpha_for(alphas, kind, path, down.shape[0])
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if not out:
        raise ValueError("peft_to_kohya: both state dicts are empty; was the LoRA injected?")
    return out


def check_kohya_state_dict(sd: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` listing every way ``sd`` breaks kohya's SD1/SD2 LoRA rules (spec §1.1)."""
    problems: list[str] = []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        stem, _, part = key.partition(".")
        if not stem.startswith((UNET_PREFIX, TE_PREFIX, "lora_te1_", "lora_te2_")) or part not in PARTS:  # te1/te2: SDXL
            problems.append(f"{key}: not lora_unet_*/lora_te_* + .lora_down.weight/.lora_up.weight/.alpha")
            continue
        groups.setdefault(stem, {})[part] = tensor
    for stem, parts in groups.items():
        if set(parts) != set(PARTS):
            problems.append(f"{stem}: has {sorted(parts)}, needs all of {list(PARTS)}")
            continue
        down, up, alpha = (parts[p] for p in PARTS)
        if alpha.dim() != 0:
            problems.append(f"{stem}.alpha: must be 0-dim, has shape {tuple(alpha.shape)}")
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            problems.append(f"{stem}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a LoRA pair")
        elif up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            problems.append(f"{stem}.lora_up.weight: conv kernel must be 1x1, is {tuple(up.shape[2:])}")
    if not groups and not problems:
        problems.append("no LoRA modules at all")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        hint = " (a LyCORIS state dict: nbkit.formats.lycoris checks those)" if is_lycoris_state_dict(sd) else ""
        raise ValueError("not a valid kohya LoRA state dict" + hint + ": " + "; ".join(problems[:8]) + more)


def _group_kohya(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        stem, _, part = key.partition(".")
        if part in PARTS and stem.startswith((UNET_PREFIX, TE_PREFIX)):
            groups.setdefault(stem, {})[part] = tensor
        else:
            unknown.append(key)
    if unknown and is_lycoris_state_dict(sd):
        raise ValueError(
            f"{source}: a LyCORIS file (LoHa/LoKr/tucker LoCon/DoRA keys, e.g. {unknown[:3]}), not a networks.lora "
            "LoRA: read it with nbkit.formats.lycoris, train on from it with network_module = \"lycoris.kohya\", "
            "merge it with `nbkit merge lora-into`"
        )
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys are not SD1/SD2 kohya LoRA keys, e.g. {unknown[:5]}. Only "
            "lora_unet_*/lora_te_* with .lora_down.weight/.lora_up.weight/.alpha load here; SDXL "
            "(lora_te1_/lora_te2_) files do not."
        )
    broken = [s for s, p in groups.items() if not {"lora_down.weight", "lora_up.weight"} <= set(p)]
    if broken:
        raise ValueError(f"{source}: modules missing lora_down or lora_up: {broken[:5]}")
    return groups


def _guess_path(rest: str) -> str:
    """``'down_blocks_0_attentions_0_proj_in'`` -> ``'down_blocks.0.attentions.0.proj_in'`` (SD names only)."""
    tokens, out, i = rest.split("_"), [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            cand = "_".join(tokens[i : i + n])
            if n == 1 or cand in _COMPOUNDS:
                out.append(cand)
                i += n
                break
    return ".".join(out)


def _name_index(names: Iterable[str], strip_text_model: bool) -> dict[str, str | None]:
    """``{path with _: path}``; ``None`` marks an underscore form two module paths share."""
    index: dict[str, str | None] = {}
    for name in names:
        if not name:
            continue
        key = (name.removeprefix("text_model.") if strip_text_model else name).replace(".", "_")
        index[key] = name if index.get(key, name) == name else None
    return index


def kohya_to_peft(
    kohya_sd: Mapping[str, torch.Tensor],
    *,
    unet_module_names: Iterable[str] | None = None,
    te_module_names: Iterable[str] | None = None,
    source: str = "kohya LoRA",
) -> tuple[Tensors, Tensors, dict[str, float], dict[str, int]]:
    """Split a kohya state dict into peft-style dicts: ``(unet_sd, te_sd, alphas, ranks)``.

    Keys of the first two are ``<module path>.lora_A.weight``/``.lora_B.weight``; ``alphas``/``ranks``
    are keyed ``"unet.<path>"``/``"text_encoder.<path>"``. Since ``_`` is ambiguous, stems are
    resolved against the given module names (``[n for n, _ in model.named_modules()]``); without
    them a SD-vocabulary heuristic is used. TE stems may come with or without ``text_model_``.
    A missing alpha means alpha = rank (kohya).
    """
    groups = _group_kohya(kohya_sd, source)
    indexes = {
        "unet": None if unet_module_names is None else _name_index(unet_module_names, False),
        "text_encoder": None if te_module_names is None else _name_index(te_module_names, True),
    }
    sds: dict[str, Tensors] = {"unet": {}, "text_encoder": {}}
    alphas: dict[str, float] = {}
    ranks: dict[str, int] = {}
    unresolved: dict[str, list[str]] = {"unet": [], "text_encoder": []}
    for stem, parts in groups.items():
        kind = "unet" if stem.startswith(UNET_PREFIX) else "text_encoder"
        rest = stem.removeprefix(UNET_PREFIX if kind == "unet" else TE_PREFIX)
        if kind == "text_encoder":
            rest = rest.removeprefix("text_model_")
        index = indexes[kind]
        path = _guess_path(rest) if index is None else index.get(rest)
        if path is None:
            unresolved[kind].append(stem)
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        sds[kind][f"{path}.lora_A.weight"] = down
        sds[kind][f"{path}.lora_B.weight"] = up
        rank = int(down.shape[0])
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
        alphas[f"{kind}.{path}"] = float(rank) if alpha == 0.0 else alpha
        ranks[f"{kind}.{path}"] = rank
    for kind, stems in unresolved.items():
        if stems:
            raise ValueError(
                f"{source}: {len(stems)} LoRA modules match no module of the {kind}, e.g. {stems[:5]}. "
                "Is the LoRA made for another base model (SD1 vs SD2 vs SDXL)?"
            )
    return sds["unet"], sds["text_encoder"], alphas, ranks


@contextlib.contextmanager
def _stream(data: bytes | str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield io.BytesIO(bytes(data))
    elif isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            yield f
    else:
        yield data


def addnet_hash_safetensors(data: bytes | str | os.PathLike | BinaryIO) -> str:
    """sd-webui-additional-networks "new" hash: sha256 of everything after the 8+N-byte header."""
    digest = hashlib.sha256()
    with _stream(data) as f:
        f.seek(0)
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def addnet_hash_legacy(data: bytes | str | os.PathLike | BinaryIO) -> str:
    """sd-webui-additional-networks "old" hash: sha256 of bytes [0x100000, 0x110000), first 8 hex digits."""
    with _stream(data) as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def precalculate_safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya ``train_util.precalculate_safetensors_hashes``.

    Both are computed on a serialization that holds only the ``ss_*`` metadata, so user metadata
    (modelspec, titles) can change later without changing the hash.
    """
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save(dict(tensors), ss_only)
    return addnet_hash_safetensors(blob), addnet_hash_legacy(blob)


def _as_dtype(save_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(save_dtype, torch.dtype):
        if save_dtype not in _DTYPES.values():
            raise ValueError(f"save_dtype must be fp16, bf16 or fp32, got {save_dtype}")
        return save_dtype
    if save_dtype not in _DTYPES:
        raise ValueError(f"save_dtype must be one of {sorted(_DTYPES)}, got {save_dtype!r}")
    return _DTYPES[save_dtype]


def save_kohya_lora(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    save_dtype: torch.dtype | str = "fp16",
) -> Path:
    """Write a kohya LoRA atomically: every tensor (alpha too) cast to ``save_dtype``, plus ``sshs_*`` hashes.

    A LyCORIS state dict (``lycoris.kohya``: LoHa, LoKr, DoRA, ...) is checked by its own rules
    (:func:`nbkit.formats.lycoris.check_lycoris_state_dict`) and written the same way.
    """
    from nbkit.io import save_safetensors_atomic

    if not str(path).endswith(".safetensors"):
        raise ValueError(
            f"{path}: kohya LoRA files must be .safetensors (A1111 reads .pt LoRAs only via its unpickler)"
        )
    if is_lycoris_state_dict(state_dict):  # a lycoris.kohya network (LoHa, LoKr, ...): LyCORIS's own rules
        check_lycoris_state_dict(state_dict)
    else:
        check_kohya_state_dict(state_dict)
    dtype = _as_dtype(save_dtype)
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in state_dict.items()}
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"{path}: safetensors metadata values must be str; not str: {bad[:5]} (use build_metadata)")
    meta.pop("sshs_model_hash", None)
    meta.pop("sshs_legacy_hash", None)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
    return save_safetensors_atomic(tensors, path, metadata=meta)
