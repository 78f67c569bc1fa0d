"""Write ``.safetensors`` files one tensor at a time, so a merge never holds a whole model in RAM.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (``__metadata__``
plus, per tensor, ``dtype``/``shape``/``data_offsets`` relative to the data start), padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes back to back. Every dtype and
shape is known before any data is computed (they come from the input headers), so the header is
written first and the tensors follow in header order.

The order is the one ``safetensors.torch.save_file`` uses (dtype from widest to narrowest, then
name), so for the same tensors and at most one metadata entry the output is byte-identical to
``save_file``'s (with more entries only the metadata order may differ: safetensors writes them in
hash-map order). Wide dtypes first also keeps every tensor aligned to its element size.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from nbkit.formats.checkpoint_io import MAX_HEADER as MAX_HEADER  # re-exported
from nbkit.formats.checkpoint_io import read_checked_header
from nbkit.io import atomic_path

#: safetensors dtype names <-> torch dtypes (those torch has).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# Declaration order of safetensors' Rust ``Dtype`` enum; save_file sorts by it, descending.
_DTYPE_RANK = {name: i for i, name in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
     "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
)}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, without its data: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))

    def meta(self) -> torch.Tensor:
        """An empty meta-device tensor with this dtype and shape (for shape-only conversions)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


Specs = Mapping[str, TensorSpec]


def read_safetensors_specs(path: str | Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """``({key: TensorSpec}, metadata)`` of a ``.safetensors`` file, from its header only.

    The header is checked against the file first (``DamagedCheckpointError`` for a file cut short
    or a header that lies), so a merge never starts on a damaged input."""
    path = Path(path)
    header, meta = read_checked_header(path)
    specs = {}
    for key, info in header.items():
        if info["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which torch cannot hold")
        specs[key] = TensorSpec(ST_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]))
    return specs, meta


def safetensors_order(specs: Specs) -> list[str]:
    """Keys in the order ``safetensors.torch.save_file`` writes them (widest dtype first, then name)."""
    for key, spec in specs.items():
        if spec.dtype not in TORCH_TO_ST:
            raise TypeError(f"tensor {key!r}: dtype {spec.dtype} cannot be stored in .safetensors")
    return sorted(specs, key=lambda k: (-_DTYPE_RANK[TORCH_TO_ST[specs[k].dtype]], k))


def build_header(specs: Specs, metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """``(8-byte length + padded JSON header, key order)`` for tensors with these specs."""
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be str; not str: {bad[:5]}")
        header["__metadata__"] = dict(metadata)
    order = safetensors_order(specs)
    offset = 0
    for key in order:
        spec = specs[key]
        header[key] = {"dtype": TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                       "data_offsets": [offset, offset + spec.nbytes]}  # fmt: skip
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without copying when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class StreamingSafetensorsWriter:
    """Write a ``.safetensors`` file tensor by tensor, in :attr:`order`, through a temp file + rename.

    >>> with StreamingSafetensorsWriter(path, specs, metadata) as w:   # doctest: +SKIP
    ...     for key in w.order:
    ...         w.write(key, compute(key))

    Each tensor must match its spec exactly; on any error (or a missing tensor) the temp file is
    removed and ``path`` is left untouched.
    """

    def __init__(self, path: str | Path, specs: Specs, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = dict(specs)
        self._header, self.order = build_header(self.specs, metadata)
        self._next = 0
        self._file: BinaryIO | None = None
        self._stack = contextlib.ExitStack()

    @property
    def size(self) -> int:
        """Bytes of the finished file."""
        return len(self._header) + sum(spec.nbytes for spec in self.specs.values())

    def __enter__(self) -> StreamingSafetensorsWriter:
        with contextlib.ExitStack() as stack:  # a failure here (a full disk) unwinds: no temp file is left
            tmp = stack.enter_context(atomic_path(self.path, size_hint=self.size))  # no room: refused here
            self._file = stack.enter_context(open(tmp, "wb"))
            self._file.write(self._header)
            self._stack = stack.pop_all()
        return self

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``key``; keys must come in :attr:`order`."""
        if self._file is None:
            raise RuntimeError("use StreamingSafetensorsWriter as a context manager")
        if self._next >= len(self.order) or self.order[self._next] != key:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing more"
            raise RuntimeError(f"{self.path}: wrote {key!r} out of order; expected {expected!r}")
        spec = self.specs[key]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"the header promised {spec.dtype} {spec.shape}"
            )
        if spec.nbytes:
            self._file.write(tensor_bytes(tensor))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._next != len(self.order):
            missing = self.order[self._next : self._next + 3]
            exc = RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors never written, e.g. {missing}")
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        self._stack.__exit__(exc_type, exc, tb)


def stream_safetensors(
    path: str | Path,
    specs: Specs,
    produce: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    progress: bool = True,
    desc: str = "writing",
) -> Path:
    """Write ``{key: produce(key)}`` for every key of ``specs``, one tensor in memory at a time."""
    from tqdm.auto import tqdm

    with StreamingSafetensorsWriter(path, specs, metadata) as writer:
        for key in tqdm(writer.order, desc=desc, unit="tensor", disable=not progress, leave=False):
            tensor = produce(key)
            writer.write(key, tensor)
            del tensor
    return Path(path)


def save_ckpt(tensors: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """A flat ``{key: tensor}`` ``.ckpt`` in torch's legacy (non-zip) format, atomically.

    A1111's restricted unpickler rejects the zip records torch >= 2.1 adds (``byteorder``,
    ``.data/serialization_id``; interop spec §2.4) but reads the legacy format.
    """
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 200 * len(tensors)  # + pickle records
    with atomic_path(path, size_hint=size) as tmp, open(tmp, "wb") as f:
        torch.save(dict(tensors), f, _use_new_zipfile_serialization=False)
    return Path(path)
