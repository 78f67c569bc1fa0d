"""The network plug-in contract: what the training loop asks of an add-on network.

A network family (kohya's ``network_module``: ``networks.lora`` for LoRA/LoCon, ``lycoris.kohya``
for LoHa/LoKr, ...) is one class with four jobs, in the spirit of kohya's ``network_module``
(``create_network`` / ``apply_to`` / ``prepare_optimizer_params`` / ``save_weights``) and peft's
tuner registry:

- ``inject(models)``: build the network from the config (or from ``network_weights``, a file to
  continue) and hook it into the base models, which are frozen;
- ``parameters(part)``: the trainable parameters of one base model (``"unet"``, ``"text_encoder"``,
  ``"text_encoder_2"``), for the optimizer's parameter groups and the resume state;
- ``state_dict()``: the tensors the file holds, under the names the file uses (kohya/LyCORIS
  names), ready for ``formats/`` to write;
- ``metadata(state=None)``: the fields of ``formats.kohya_metadata.LoraTrainingInfo`` that describe the
  trained network (``network_module``, ``network_dim``, ``network_alpha``, ``conv_dim``,
  ``conv_alpha``, ``network_args``), which become the file's ``ss_network_*`` keys.

``models`` maps part names to modules: ``{"unet": ..., "text_encoder": ...}`` for SD1/SD2, plus
``"text_encoder_2"`` for SDXL. A part the config does not train may be absent or frozen.

Registering a family is one line in ``NETWORKS``: the value names ``module:Class``, imported when
a run asks for it (a network whose extra package is not installed costs nothing until used).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from nbkit.errors import ConfigError

#: kohya ``network_module`` name -> "python.module:Class" of its plug-in
NETWORKS: dict[str, str] = {
    "networks.lora": "nbkit.networks.lora_network:LoRANetwork",
    "lycoris.kohya": "nbkit.networks.lycoris:LycorisNetwork",
}

#: the parts of a base model a network may adapt, in the order their parameter groups are built
PARTS = ("unet", "text_encoder", "text_encoder_2")


class Network(Protocol):
    """One trained add-on network; built with ``cls(config)`` (a ``LoRATrainConfig``-like object)."""

    module: str  # the kohya network_module this class implements (ss_network_module)

    def inject(self, models: Mapping[str, nn.Module]) -> None: ...

    def parameters(self, part: str) -> list[nn.Parameter]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def metadata(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, object]: ...


def network_class(module: str) -> type[Network]:
    """The plug-in class for a kohya ``network_module`` name; a clear error for unknown names."""
    target = NETWORKS.get(module)
    if target is None:
        known = ", ".join(repr(name) for name in NETWORKS)
        raise ConfigError(f"network_module = {module!r} is not a network nbkit trains: use one of {known}")
    path, name = target.split(":")
    return getattr(importlib.import_module(path), name)


def make_network(config) -> Network:
    return network_class(config.network_module)(config)


def split_network_args(network_args, where="config") -> dict[str, str]:
    """kohya ``--network_args k=v ...`` -> ``{k: v}`` (train_network.py: ``net_arg.split("=", 1)``)."""
    out: dict[str, str] = {}
    for item in network_args or []:
        key, sep, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{where('network_args') if callable(where) else where}: {item!r} is not key=value: write e.g. "
                              "network_args = [\"algo=loha\", \"conv_dim=4\"]")
        if key in out:
            raise ConfigError(f"{where('network_args') if callable(where) else where}: {key} is given twice ({out[key]!r} and {value!r}): keep one")
        out[key] = value
    return out


def check_network_config(config, where="config"):
    """The network's own checks of the config (its ``network_args``), before any model loads; a
    plug-in may define ``check_config(config, where)`` for them."""
    check = getattr(network_class(config.network_module), "check_config", None)
    return check(config, where) if check is not None else None
