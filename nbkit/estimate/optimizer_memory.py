"""GPU memory of an optimizer: its state per trainable tensor and the temporaries of one step.

The states are allocated at the first ``optimizer.step()`` (lazily, every optimizer here), after the
first backward. Byte counts follow each implementation:

- torch ``AdamW``: ``exp_avg`` + ``exp_avg_sq`` in the parameter's dtype (8 bytes per fp32 param).
  Its default on a GPU since torch 2.0 is the *foreach* path, whose ``_foreach_sqrt(exp_avg_sqs)``
  makes one more parameter-sized copy of every tensor during the step (4 bytes/param, transient);
  torch 1.12's loop made it one tensor at a time.
- bitsandbytes 8-bit optimizers (``AdamW8bit``, ``Lion8bit``, ``SGDNesterov8bit``, paged variants):
  one uint8 byte per state per element plus an fp32 absmax per 256-element block; tensors under
  4,096 elements (``min_8bit_size``) keep fp32 states. Paged states live in unified memory and
  count as GPU memory until the driver pages them out under pressure.
- ``Adafactor`` (transformers): factored second moment for tensors with 2+ dims (a row and a column
  vector of the last two dims), full for 1-D ones, no first moment (``beta1=None``).
- ``Lion`` (lion-pytorch): one momentum; ``Prodigy``: ``exp_avg``, ``exp_avg_sq``, ``s`` and a copy of
  the initial weights ``p0``; D-Adaptation: ``exp_avg``, ``exp_avg_sq`` and ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

BLOCK = 256  # bitsandbytes blockwise quantisation block (absmax per block)
MIN_8BIT_SIZE = 4096

# name (lower case) -> (states, bits): states per element, 8 or 32 bits each.
_STATE_TABLE: dict[str, tuple[int, int]] = {
    "adamw": (2, 32), "pagedadamw": (2, 32), "pagedadamw32bit": (2, 32), "adam": (2, 32),
    "adamw8bit": (2, 8), "pagedadamw8bit": (2, 8), "adam8bit": (2, 8),
    "lion": (1, 32), "lion8bit": (1, 8), "pagedlion8bit": (1, 8),
    "sgdnesterov": (1, 32), "sgdnesterov8bit": (1, 8), "sgd": (1, 32),
    "prodigy": (4, 32), "dadaptation": (3, 32), "dadaptadampreprint": (3, 32), "dadaptadam": (3, 32),
    "dadaptadan": (5, 32), "dadaptadanip": (5, 32), "dadaptadagrad": (3, 32), "dadaptsgd": (3, 32),
    "dadaptlion": (2, 32),
}
# torch optimizers whose GPU default is the foreach path with a parameter-sized temporary per tensor.
_FOREACH_TEMPORARY = {"adamw": 1, "adam": 1}


def known(name: str) -> bool:
    key = name.strip().lower()
    return key in _STATE_TABLE or key == "adafactor"


def state_tensors(name: str, shape: tuple[int, ...], element_size: int) -> list[int]:
    """Byte sizes of the optimizer state tensors of one trainable tensor of ``shape``.

    An unknown optimizer (a ``module.Class``) is counted as Adam: two states of the parameter's size."""
    key = name.strip().lower()
    numel = math.prod(shape)
    if key == "adafactor":
        if len(shape) >= 2:
            return [4 * math.prod(shape[:-1]), 4 * math.prod(shape[:-2]) * shape[-1]]
        return [4 * numel]
    states, bits = _STATE_TABLE.get(key, (2, 32))
    if bits == 8 and numel >= MIN_8BIT_SIZE:
        return [numel] * states + [4 * math.ceil(numel / BLOCK)] * states
    return [numel * element_size] * states  # 32-bit states take the parameter's dtype (fp32 master weights)


def state_bytes(name: str, shape: tuple[int, ...], element_size: int) -> int:
    return sum(state_tensors(name, shape, element_size))


def step_temporaries(name: str, shapes: Iterable[tuple[int, ...]], element_size: int,
                     foreach: bool | None) -> list[int]:
    """Byte sizes of the temporaries alive together at the peak of one ``optimizer.step()``."""
    key = name.strip().lower()
    sizes = [math.prod(s) * element_size for s in shapes]
    if not sizes:
        return []
    if key in _FOREACH_TEMPORARY and foreach is not False:
        return sizes * _FOREACH_TEMPORARY[key]  # _foreach_sqrt(exp_avg_sqs): one copy of every tensor
    return [max(sizes)] * 2  # one tensor at a time: a couple of parameter-sized temporaries (Adafactor, Lion, ...)


def describe(name: str) -> str:
    key = name.strip().lower()
    if key == "adafactor":
        return "Adafactor: factored second moment (row + column vectors), no first moment"
    states, bits = _STATE_TABLE.get(key, (2, 32))
    unknown = "" if key in _STATE_TABLE else " (unknown optimizer: counted as Adam)"
    return f"{name}: {states} state{'s' if states > 1 else ''} per element in {bits}-bit{unknown}"
