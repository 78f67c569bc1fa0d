"""The base model's family from a training config, without loading it: what the estimator simulates.

Read cheaply from what is already on disk: a diffusers folder's ``model_index.json``, a
``.safetensors`` file's header (its key names), or the Hugging Face cache's ``model_index.json`` of a
repo id. SDXL is told apart by its second text encoder (``text_encoder_2`` / ``conditioner.embedders.*``),
as the loader tells it (``nbkit.models.load``); SD2 and v-prediction by the config's ``v2`` /
``v_parameterization``. A model not on disk yet (a URL, a repo not downloaded, a ``.ckpt``) reads as
SD1/SD2 from those options: pass ``arch=`` where it matters.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

SDXL_FILE_PREFIX = "conditioner.embedders."  # SGM-layout SDXL single files


def config_arch(config) -> str:
    """``"sdxl"`` when the config's base model is an SDXL model on disk, else sd15 / sd21 / sd21-v from
    ``v2`` / ``v_parameterization``."""
    if is_sdxl_model(getattr(config, "pretrained_model_name_or_path", "") or ""):
        return "sdxl"
    if getattr(config, "v2", None):
        return "sd21-v" if getattr(config, "v_parameterization", None) else "sd21"
    return "sd15"


def is_sdxl_model(name: str) -> bool:
    """True for an SDXL diffusers folder, SDXL ``.safetensors`` file or cached SDXL Hub repo; False for
    anything else, or what cannot be read without a download."""
    if not name:
        return False
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            return _index_is_sdxl(path / "model_index.json")
        if path.is_file():
            return path.suffix == ".safetensors" and any(k.startswith(SDXL_FILE_PREFIX) for k in _header_keys(path))
    except (OSError, ValueError):
        return False
    if "://" in name or name.count("/") != 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "model_index.json")
    except Exception:  # an invalid repo id, no cache: not known to be SDXL
        return False
    return isinstance(cached, str) and _index_is_sdxl(Path(cached))


def _index_is_sdxl(index: Path) -> bool:
    if not index.is_file():
        return False
    data = json.loads(index.read_text(encoding="utf-8"))
    return str(data.get("_class_name", "")).startswith("StableDiffusionXL") or "text_encoder_2" in data


def _header_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (its JSON header only)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise ValueError("not a safetensors header")
        return [k for k in json.loads(f.read(length)) if k != "__metadata__"]
