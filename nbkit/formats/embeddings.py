"""Textual-inversion embedding files: pure functions between files and ``{encoder: [n, dim]}`` tensors.

Layouts (``/work/shared/specs/interop-formats.md`` §4):

* SD1/SD2 ``.safetensors``: ``{"emb_params": [n, dim]}`` (kohya ``train_textual_inversion.py::
  save_weights``). A1111 (single-tensor dict), ComfyUI (first value) and diffusers
  (``load_textual_inversion(file, token=...)``: a single-key dict) read it;
* SDXL ``.safetensors``: ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (kohya
  ``sdxl_train_textual_inversion.py::save_weights``; A1111 ``create_embedding_from_data``'s SDXL branch,
  ComfyUI ``sd1_clip.py::load_embed``);
* A1111 ``.pt`` (``modules/textual_inversion/textual_inversion.py::Embedding.save``):
  ``{"string_to_token": {"*": 265}, "string_to_param": {"*": [n, dim]}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}``, written with torch's legacy (non-zip) serialization so
  A1111's restricted unpickler accepts it (§2.4: torch >= 2.1 zips carry a ``byteorder`` record it
  refuses), fp32/fp16 only (no bf16 storage in its allow-list). SDXL has no A1111 ``.pt`` layout
  of its own: the ``.pt`` then holds exactly ``{"clip_l", "clip_g"}`` (A1111's SDXL branch converts
  every value of the dict, so no other field may be beside them).

In memory an embedding is ``{"text_encoder": [n, dim]}`` (SD1/SD2) or ``{"text_encoder": ...,
"text_encoder_2": ...}`` (SDXL), keyed like the pipeline's text encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: file key of each text encoder's rows
SD_KEY = "emb_params"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
A1111_TOKEN_ID = 265  # what A1111 always writes in string_to_token (its value is never read)
SAVED_DTYPES = (torch.float32, torch.float16)


class EmbeddingFormatError(ValueError):
    """An embedding file is malformed or does not fit; the message names the file and the fix."""


def _rows(tensor: torch.Tensor, dtype: torch.dtype | None, allow_bf16: bool = True) -> torch.Tensor:
    """A contiguous CPU ``[n, dim]`` copy in ``dtype`` (default: as given)."""
    tensor = tensor.detach().cpu()
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if dtype is not None:
        tensor = tensor.to(dtype)
    if not allow_bf16 and tensor.dtype not in SAVED_DTYPES:
        tensor = tensor.float()  # A1111's pickle allow-list has no BFloat16Storage
    return tensor.contiguous().clone()


def to_file_dict(embedding: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                 allow_bf16: bool = True) -> dict[str, torch.Tensor]:
    """``{"emb_params"}`` for one text encoder, ``{"clip_l", "clip_g"}`` for SDXL's two."""
    if set(embedding) == {"text_encoder"}:
        return {SD_KEY: _rows(embedding["text_encoder"], dtype, allow_bf16)}
    if set(embedding) == set(SDXL_KEYS):
        vectors = {len(_rows(t, None)) for t in embedding.values()}
        if len(vectors) != 1:
            raise EmbeddingFormatError(f"SDXL embedding with {sorted(vectors)} vectors per encoder: both text "
                                       "encoders need the same number of rows")
        return {SDXL_KEYS[k]: _rows(embedding[k], dtype, allow_bf16) for k in SDXL_KEYS}
    raise EmbeddingFormatError(f"embedding for {sorted(embedding)}: expected 'text_encoder' (SD1/SD2) or "
                               "'text_encoder' and 'text_encoder_2' (SDXL)")


def save_safetensors_embedding(embedding: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None,
                               metadata: dict[str, str] | None = None) -> Path:
    """Write kohya's ``.safetensors`` (atomically: a Colab disconnect leaves no half file)."""
    from nbkit.io import save_safetensors_atomic

    return save_safetensors_atomic(to_file_dict(embedding, dtype), path, metadata)


def a1111_pt_dict(embedding: dict[str, torch.Tensor], name: str, step: int | None = None,
                  sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None,
                  dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The dict A1111's ``Embedding.save`` writes (SD1/SD2), or ``{"clip_l", "clip_g"}`` (SDXL)."""
    tensors = to_file_dict(embedding, dtype, allow_bf16=False)
    if SD_KEY not in tensors:
        return tensors  # SDXL: A1111 and ComfyUI read exactly these two keys
    return {
        "string_to_token": {"*": A1111_TOKEN_ID},
        "string_to_param": {"*": tensors[SD_KEY]},
        "name": str(name),
        "step": None if step is None else int(step),
        "sd_checkpoint": sd_checkpoint,
        "sd_checkpoint_name": sd_checkpoint_name,
    }


def save_a1111_embedding(embedding: dict[str, torch.Tensor], path: str | Path, name: str, step: int | None = None,
                         sd_checkpoint: str | None = None, sd_checkpoint_name: str | None = None,
                         dtype: torch.dtype | None = None) -> Path:
    """Write an A1111 ``.pt`` in the legacy serialization A1111's pickle gate accepts (atomically)."""
    from nbkit.formats.a1111_hypernetwork import save_legacy_torch

    return save_legacy_torch(a1111_pt_dict(embedding, name, step, sd_checkpoint, sd_checkpoint_name, dtype), path)


def from_file_dict(data: Any, source: str = "embedding") -> dict[str, torch.Tensor]:
    """``{"text_encoder": [n, dim]}`` or SDXL's two, from any layout the readers accept: A1111's
    ``string_to_param``, SDXL ``clip_l``/``clip_g``, kohya ``emb_params`` or a diffusers
    ``{token: tensor}`` (a single tensor either way; kohya ``load_weights``, A1111
    ``create_embedding_from_data``). A 1-D vector is one row."""
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{source}: holds a {type(data).__name__}, not a dict: not an embedding file")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # A1111: files of torch 1.11
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFormatError(f"{source}: string_to_param must hold exactly one tensor (A1111 refuses "
                                       "files with several terms)")
        tensor = next(iter(params.values()))
    elif "clip_l" in data or "clip_g" in data:
        missing = [key for key in ("clip_l", "clip_g") if not isinstance(data.get(key), torch.Tensor)]
        if missing:
            raise EmbeddingFormatError(f"{source}: an SDXL embedding without {missing[0]}: both clip_l and clip_g "
                                       "are needed")
        out = {name: _rows(data[key], None) for name, key in SDXL_KEYS.items()}
        to_file_dict(out)  # same number of rows in both
        return out
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(data) != 1 or len(tensors) != 1:
            raise EmbeddingFormatError(f"{source}: keys {sorted(map(str, data))[:5]}: not an embedding (expected "
                                       "emb_params, string_to_param, clip_l/clip_g or one {token: tensor})")
        tensor = tensors[0]
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise EmbeddingFormatError(f"{source}: the embedding is not a [vectors, dim] tensor")
    return {"text_encoder": _rows(tensor, None)}


def load_embedding_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(embedding, extra fields) of a ``.safetensors`` (metadata) or ``.pt``/``.bin`` file (A1111's
    ``name``, ``step``, ...); a ``.pt`` is read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as fh:
                extra: dict[str, Any] = dict(fh.metadata() or {})
            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            extra = {k: v for k, v in data.items() if not isinstance(v, (torch.Tensor, dict))} \
                if isinstance(data, dict) else {}
    except Exception as err:  # safetensors/torch raise many kinds for a truncated or foreign file
        raise EmbeddingFormatError(f"{path}: cannot be read as an embedding ({err}): is it complete?") from None
    return from_file_dict(data, str(path)), extra
