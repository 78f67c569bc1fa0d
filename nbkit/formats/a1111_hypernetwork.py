"""AUTOMATIC1111 hypernetwork ``.pt`` files: pure functions between the saved dict and plain data.

The saved dict (``modules/hypernetworks/hypernetwork.py::Hypernetwork.save``) maps every enabled
context size (an ``int``) to a ``(k_state_dict, v_state_dict)`` pair and holds the structure
fields next to them (see ``/work/shared/specs/interop-formats.md`` §2.1).

Writer rules (§2.3, §2.4), so A1111's restricted unpickler and ComfyUI's loader accept the file:

* ``torch.save(..., _use_new_zipfile_serialization=False)``: the legacy (non-zip) format, because
  torch >= 2.1 adds a ``byteorder`` record to zip files that A1111's zip-name check refuses;
* fp32/fp16 tensors only (no bf16 storage class in A1111's allow-list), in plain ``dict``s in
  ``Sequential`` order (ComfyUI rebuilds the layers from the order of the ``.weight`` keys);
* every field stored explicitly: ``activation_func`` as a string (ComfyUI refuses ``None``),
  ``activate_output`` (A1111 and ComfyUI default it differently), ``dropout_structure`` with one
  entry per ``layer_structure`` entry, first and last 0.

Reading applies A1111's defaults for missing fields (older A1111 and ComfyUI-era files).
The optimizer goes into a ``<file>.optim`` sidecar that names the ``.pt`` by its hash.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# A1111 ``Hypernetwork.load`` defaults for fields a file does not have.
A1111_DEFAULTS: dict[str, Any] = {
    "layer_structure": [1, 2, 1],
    "activation_func": None,
    "weight_initialization": "Normal",
    "is_layer_norm": False,
    "activate_output": True,
    "last_layer_dropout": False,
    "use_dropout": False,
    "step": 0,
    "sd_checkpoint": None,
    "sd_checkpoint_name": None,
    "optional_info": None,
}
# The activations ComfyUI's ``load_hypernetwork_patch`` knows (it refuses the file otherwise).
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")
SAVED_DTYPES = (torch.float32, torch.float16)
# A1111 ``fix_old_state_dict``: the first hypernetworks had two named Linear layers.
_OLD_KEYS = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
             "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}
_SEQ_KEY = re.compile(r"^linear\.(\d+)\.(weight|bias)$")

StateDict = dict[str, torch.Tensor]


class HypernetworkFormatError(ValueError):
    """A hypernetwork file or dict is malformed; the message names the file and the fix."""


@dataclass
class HypernetworkData:
    """Everything a hypernetwork ``.pt`` holds, as plain values (A1111 field names)."""

    layers: dict[int, tuple[StateDict, StateDict]]
    name: str | None
    layer_structure: list[float]
    activation_func: str | None
    weight_initialization: str = "Normal"
    is_layer_norm: bool = False
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] = field(default_factory=list)
    last_layer_dropout: bool = False
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None


def parse_dropout_structure(layer_structure: list[float] | None, use_dropout: bool,
                            last_layer_dropout: bool) -> list[float]:
    """A1111's ``parse_dropout_structure``: ``[0] + [0.3]*(n-3) + [0.3 or 0] + [0]``, or all zeros."""
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


def _ordered_state(state: StateDict, where: str) -> StateDict:
    """A plain dict in ``Sequential`` order, fp32/fp16, contiguous CPU tensors."""
    def order(key: str) -> tuple[int, int]:
        match = _SEQ_KEY.match(key)
        if not match:
            raise HypernetworkFormatError(f"{where}: key {key!r} is not linear.<index>.weight/bias: "
                                          "build the state dict from HypernetworkModule.state_dict()")
        return int(match[1]), 0 if match[2] == "weight" else 1

    out: StateDict = {}
    for key in sorted(state, key=order):
        tensor = state[key].detach().cpu()
        if tensor.dtype not in SAVED_DTYPES:
            tensor = tensor.float()  # bf16 has no storage class in A1111's allow-list
        out[key] = tensor.contiguous().clone()
    return out


def to_saved_dict(data: HypernetworkData) -> dict[Any, Any]:
    """The dict A1111's ``Hypernetwork.save`` writes, with every field explicit (§2.3)."""
    where = f"hypernetwork {data.name!r}"
    if data.activation_func is None:
        raise HypernetworkFormatError(f"{where}: activation_func is None: store 'linear' (ComfyUI refuses None)")
    structure = [float(x) for x in data.layer_structure]
    dropout = [float(x) for x in (data.dropout_structure or [0.0] * len(structure))]
    if len(dropout) != len(structure) or dropout[0] != 0 or dropout[-1] != 0:
        raise HypernetworkFormatError(f"{where}: dropout_structure {dropout} must have {len(structure)} entries "
                                      "(one per layer_structure entry), the first and last 0")
    if structure[0] != 1 or structure[-1] != 1:
        raise HypernetworkFormatError(f"{where}: layer_structure {structure} must start and end with 1")
    saved: dict[Any, Any] = {}
    for size in sorted(data.layers):
        k_state, v_state = data.layers[size]
        saved[int(size)] = (_ordered_state(k_state, f"{where} size {size} k"),
                            _ordered_state(v_state, f"{where} size {size} v"))
    saved.update({
        "step": int(data.step),
        "name": None if data.name is None else str(data.name),
        "layer_structure": structure,
        "activation_func": str(data.activation_func),
        "is_layer_norm": bool(data.is_layer_norm),
        "weight_initialization": str(data.weight_initialization),
        "sd_checkpoint": data.sd_checkpoint,
        "sd_checkpoint_name": data.sd_checkpoint_name,
        "activate_output": bool(data.activate_output),
        "use_dropout": bool(data.use_dropout),
        "dropout_structure": dropout,
        "last_layer_dropout": dropout[-2] != 0,  # A1111 derives it from the structure on save
        "optional_info": data.optional_info or None,
    })  # fmt: skip
    return saved


def _state_pair(value: Any, size: int, source: str) -> tuple[StateDict, StateDict]:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(isinstance(v, dict) for v in value):
        raise HypernetworkFormatError(f"{source}: size {size} must hold a (k_state_dict, v_state_dict) pair: "
                                      "this is not an A1111 hypernetwork file")
    pair = []
    for state in value:
        state = dict(state)
        for old, new in _OLD_KEYS.items():  # A1111 fix_old_state_dict
            if old in state:
                state[new] = state.pop(old)
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise HypernetworkFormatError(f"{source}: size {size} key {key!r} is not a tensor")
        pair.append(state)
    return pair[0], pair[1]


def from_saved_dict(saved: dict[Any, Any], source: str = "hypernetwork") -> HypernetworkData:
    """Read a saved dict the way A1111's ``Hypernetwork.load`` does (its defaults for missing keys)."""
    if not isinstance(saved, dict):
        raise HypernetworkFormatError(f"{source}: holds a {type(saved).__name__}, not a dict: not a hypernetwork file")
    layers = {size: _state_pair(value, size, source) for size, value in saved.items() if type(size) is int}
    if not layers:
        raise HypernetworkFormatError(f"{source}: no integer size keys (768, 320, ...): not a hypernetwork file "
                                      "(a LoRA or embedding? those load elsewhere)")
    get = lambda key: saved.get(key, A1111_DEFAULTS[key])  # noqa: E731
    structure = [float(x) for x in get("layer_structure")]
    dropout = saved.get("dropout_structure")
    # A1111: a non-zero dropout structure means dropout is used, whatever use_dropout says.
    use_dropout = True if dropout is not None and any(dropout) else bool(get("use_dropout"))
    if dropout is None:
        dropout = parse_dropout_structure(structure, use_dropout, bool(get("last_layer_dropout")))
    return HypernetworkData(
        layers=layers, name=saved.get("name"), layer_structure=structure,
        activation_func=get("activation_func"), weight_initialization=get("weight_initialization") or "Normal",
        is_layer_norm=bool(get("is_layer_norm")), activate_output=bool(get("activate_output")),
        use_dropout=use_dropout, dropout_structure=[float(x) for x in dropout],
        last_layer_dropout=bool(get("last_layer_dropout")), step=int(get("step") or 0),
        sd_checkpoint=get("sd_checkpoint"), sd_checkpoint_name=get("sd_checkpoint_name"),
        optional_info=get("optional_info"),
    )  # fmt: skip


# ---------------------------------------------------------------- files


def save_legacy_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` in the legacy (non-zip) format A1111's pickle gate accepts, via a temp file."""
    from nbkit.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh, _use_new_zipfile_serialization=False)
    return Path(path)


def save_hypernetwork_file(data: HypernetworkData, path: str | Path) -> Path:
    """Write ``data`` as an A1111 ``.pt`` (atomically: a Colab disconnect leaves no half file)."""
    return save_legacy_torch(to_saved_dict(data), path)


def load_saved_dict(path: str | Path) -> dict[Any, Any]:
    """The raw saved dict, loaded with ``weights_only=True`` (what ComfyUI does)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"hypernetwork file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise HypernetworkFormatError(f"{path}: cannot be read as a hypernetwork .pt ({err}): "
                                      "is it complete, and really a hypernetwork?") from None


def load_hypernetwork_file(path: str | Path) -> HypernetworkData:
    """Read an A1111- or ComfyUI-era hypernetwork ``.pt`` with A1111's defaults for missing fields."""
    return from_saved_dict(load_saved_dict(path), str(path))


def file_shorthash(path: str | Path) -> str:
    """A1111's ``Hypernetwork.shorthash``: the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:10]


def optimizer_sidecar_path(path: str | Path) -> Path:
    """``<file>.pt.optim``, where A1111 looks for the optimizer state."""
    return Path(f"{path}.optim")


def save_optimizer_sidecar(path: str | Path, optimizer_name: str, optimizer_state_dict: dict) -> Path:
    """Write ``<path>.optim`` = ``{optimizer_name, hash: sha256(<path>)[:10], optimizer_state_dict}``;
    call it after the ``.pt`` is written (the hash ties the two together)."""
    sidecar = {"optimizer_name": optimizer_name, "hash": file_shorthash(path),
               "optimizer_state_dict": optimizer_state_dict}
    return save_legacy_torch(sidecar, optimizer_sidecar_path(path))


def load_optimizer_sidecar(path: str | Path) -> tuple[str, dict] | None:
    """``(optimizer_name, optimizer_state_dict)`` from ``<path>.optim``, or None when there is no
    sidecar or it belongs to another version of the file (its hash differs; a warning says so)."""
    sidecar = optimizer_sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        saved = torch.load(sidecar, map_location="cpu", weights_only=True)
    except Exception as err:
        warnings.warn(f"{sidecar}: unreadable ({err}); the optimizer starts fresh", stacklevel=2)
        return None
    if not isinstance(saved, dict) or saved.get("hash") != file_shorthash(path):
        warnings.warn(f"{sidecar}: written for another version of {Path(path).name} (hash mismatch); the optimizer "
                      "starts fresh. Delete the .optim file to silence this.", stacklevel=2)
        return None
    state = saved.get("optimizer_state_dict")
    return (str(saved.get("optimizer_name") or "AdamW"), state) if state else None
