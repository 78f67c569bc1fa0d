"""Reading single-file checkpoints safely: ``.safetensors`` headers and weights-only pickles.

Pickled checkpoints (``.ckpt``/``.pt``) can run code when unpickled. They are only ever loaded
with ``torch.load(weights_only=True)``; anything that references a class or function is refused
with ``UnsafeCheckpointError``, which names the file and the way out (a ``.safetensors`` copy).

A ``.safetensors`` header is checked against the file before any tensor is read: every tensor's
``data_offsets`` back to back, as long as its dtype and shape say, and inside the file. A file cut
short by an interrupted download, or whose header lies, raises ``DamagedCheckpointError``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from nbkit.config import ConfigError

MAX_HEADER = 100_000_000
#: bits per element of every safetensors dtype (sub-byte float formats included)
ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint references code or classes; nbkit loads weights-only files."""


class DamagedCheckpointError(ConfigError):
    """A checkpoint file is cut short or its header does not describe its bytes (an interrupted download)."""


def damaged(path: Path, what: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"{path}: this file is damaged or incomplete ({what}). An interrupted download or copy leaves files like "
        "this: download it again (or copy it again from where it came from)."
    )


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
        raise damaged(path, f"not a readable PyTorch checkpoint: {e}") from e


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

        meta = read_safetensors_header(path)[1]  # checks the file first
        return load_file(str(path)), meta
    return _unwrap(_torch_load(path), path)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Shapes and metadata of a ``.safetensors`` file, read from its header only (no tensor data)."""
    header, meta = read_checked_header(path)
    return {k: tuple(v["shape"]) for k, v in header.items()}, meta


def read_checked_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """``({key: {"dtype", "shape", "data_offsets"}}, metadata)`` of a ``.safetensors`` file, after checking
    the header against the file's size (8 bytes + the JSON header are read, no tensor data)."""
    path = Path(path)
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) != 8:
            raise damaged(path, f"{file_size} bytes, too short to be a .safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > MAX_HEADER:
            raise damaged(path, f"not a .safetensors file: header length {size:,}; a failed download can save an "
                                "error page under the model's name")  # fmt: skip
        if 8 + size > file_size:
            raise damaged(path, f"the header says it is {size:,} bytes long, the whole file is {file_size:,} bytes")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise damaged(path, f"the header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise damaged(path, "the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise damaged(path, "__metadata__ is not a JSON object")
    _check_offsets(path, header, file_size - 8 - size)
    return header, {str(k): str(v) for k, v in meta.items()}


def _check_offsets(path: Path, header: dict, data_size: int) -> None:
    """Tensors back to back from byte 0 of the data to its end, each as long as dtype x shape."""
    spans = []
    for key, info in header.items():
        try:
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise damaged(path, f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        if begin < 0 or end < begin or any(d < 0 for d in shape):
            raise damaged(path, f"tensor {key!r} has shape {shape} and data_offsets [{begin}, {end}]")
        bits = ST_DTYPE_BITS.get(dtype)
        if bits is not None and end - begin != math.ceil(math.prod(shape) * bits / 8):
            raise damaged(path, f"tensor {key!r} is {dtype} {shape}, which is {math.ceil(math.prod(shape) * bits / 8):,} "
                                f"bytes, but its data_offsets span {end - begin:,} bytes")  # fmt: skip
        spans.append((begin, end, key))
    spans.sort()
    last = max((end for _, end, _ in spans), default=0)
    if last > data_size:
        raise damaged(path, f"cut short: the header describes {last:,} bytes of tensor data, the file holds "
                            f"{data_size:,}")  # fmt: skip
    position = 0
    for begin, end, key in spans:
        if begin != position:
            raise damaged(path, f"tensor {key!r} starts at data byte {begin:,}, the tensor before it ends at {position:,}")
        position = end
    if position != data_size:
        raise damaged(path, f"{data_size - position:,} bytes follow the last tensor")


def inspect_single_file(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``(key -> shape, metadata)`` of a checkpoint, as cheaply as the format allows."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        return read_safetensors_header(path)
    tensors, meta = read_single_file(path)
    return {k: tuple(v.shape) for k, v in tensors.items()}, meta
