"""Reading single-file checkpoints safely: ``.safetensors`` headers and weights-only pickles.

Pickled checkpoints (``.ckpt``/``.pt``) can run code when unpickled. They are only ever loaded
with ``torch.load(weights_only=True)``; anything that references a class or function is refused
with ``UnsafeCheckpointError``, which names the file and the way out (a ``.safetensors`` copy).
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint references code or classes; nbkit loads weights-only files."""


def _refuse(path: Path, error: Exception) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f" (it references {found[1]})" if found else ""
    return UnsafeCheckpointError(
        f"{path}: refused to load this pickled checkpoint{what}. nbkit only loads weights-only "
        "checkpoints (tensors, numbers, strings, lists and dicts), because unpickling anything else can "
        "run arbitrary code. Convert the file to .safetensors (only on a machine where you trust its "
        "source, e.g. torch.load(path, weights_only=False) then safetensors.torch.save_file), or use a "
        ".safetensors release of the model."
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise _refuse(path, e) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e}); is the download complete?") from e


def _scalar(value: Any) -> str | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta: dict[str, str] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        for key in ("global_step", "epoch"):
            if key not in meta and _scalar(obj.get(key)) is not None:
                meta[key] = _scalar(obj.get(key))
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path}: holds no tensors; is it a model checkpoint?")
    return tensors, meta


def read_single_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load an original-layout checkpoint: ``(state_dict, metadata)``.

    ``.safetensors``: tensors + header metadata. ``.ckpt``/``.pt``/``.pth``/``.bin``: loaded with
    ``weights_only=True`` (memory-mapped when the file is a zip), nested ``"state_dict"`` unwrapped,
    ``global_step``/``epoch`` returned as metadata. A pickle referencing any class or function
    raises ``UnsafeCheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), read_safetensors_header(path)[1]
    return _unwrap(_torch_load(path), path)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and metadata of a ``.safetensors`` file, read from its header only (no tensor data)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short to be a .safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError(f"{path}: not a .safetensors file (header length {size})")
        header = json.loads(f.read(size))
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, dict(meta)


def inspect_single_file(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``(key -> shape, metadata)`` of a checkpoint, as cheaply as the format allows."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        return read_safetensors_header(path)
    tensors, meta = read_single_file(path)
    return {k: tuple(v.shape) for k, v in tensors.items()}, meta
