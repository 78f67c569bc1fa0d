"""Create a new hypernetwork, as A1111's "Create hypernetwork" tab does (plus the extension's
``generation_seed`` and ``normal_std``). :class:`HypernetworkStructure` holds the creation
options under A1111's names; the training config inherits it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.config import ConfigError, help_
from nbkit.formats.a1111_hypernetwork import parse_dropout_structure
from nbkit.networks.hypernetwork.module import WEIGHT_INITS, Hypernetwork, check_activation

A1111_SIZES = [768, 320, 640, 1280]  # A1111's default sizes (SD1); SD2 uses 1024 instead of 768
ACTIVATION_HELP = "linear, relu, leakyrelu, elu, swish (= Hardswish, as A1111), tanh, sigmoid, mish, softsign, ..."


@dataclass
class HypernetworkStructure:
    """The creation options of a hypernetwork (A1111 names)."""

    enable_sizes: list[int] | None = field(
        default=None,
        metadata=help_("Context sizes that get a hypernetwork: 768 (SD1 text) or 1024 (SD2 text), 320, 640, 1280 "
                       "(self-attention). Default: A1111's 768 320 640 1280 when creating; when training, taken "
                       "from the base model."),
    )
    layer_structure: str = field(
        default="1, 2, 1", metadata=help_("Layer widths as multiples of the size, first and last 1: '1, 2, 1' or '1, 1.5, 1.5, 1'.")
    )
    activation_func: str = field(default="linear", metadata=help_(f"Activation: {ACTIVATION_HELP}."))
    weight_init: str = field(
        default="Normal", metadata=help_("Weight initialisation.", "advanced", WEIGHT_INITS)
    )
    add_layer_norm: bool = field(default=False, metadata=help_("LayerNorm after every Linear layer.", "advanced"))
    use_dropout: bool = field(default=False, metadata=help_("Dropout between layers while training.", "advanced"))
    dropout_structure: str | None = field(
        default=None,
        metadata=help_("Dropout per layer_structure entry, first and last 0, e.g. '0, 0.3, 0' (needs use_dropout; "
                       "default: A1111's 0.3 on hidden layers).", "advanced"),
    )
    last_layer_dropout: bool = field(
        default=False, metadata=help_("With use_dropout and no dropout_structure: also drop after the last hidden layer.", "advanced")
    )
    activate_output: bool = field(default=False, metadata=help_("Also apply the activation after the last layer.", "advanced"))
    generation_seed: int | None = field(default=None, metadata=help_("Seed for the initial weights (default: the run's seed).", "advanced"))
    normal_std: float = field(default=0.01, metadata=help_("Standard deviation of the Normal initialisation.", "advanced"))


def parse_float_list(text: str | list | tuple, what: str) -> list[float]:
    """``"1, 2, 1"`` (or ``[1, 2, 1]``, or the text of a TOML array) as floats, A1111's parsing."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [x for x in str(text).strip().strip("[]()").split(",") if x.strip()]
    try:
        return [float(str(x).strip()) for x in items]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: write comma-separated numbers like '1, 2, 1'") from None


def parse_layer_structure(text: str | list | tuple) -> list[float]:
    """A1111's layer structure text; the first and last entries must be 1."""
    values = parse_float_list(text, "layer_structure")
    if len(values) < 2 or values[0] != 1 or values[-1] != 1:
        raise ConfigError(f"layer_structure {text!r}: it must start and end with 1 and have at least two entries, "
                          "e.g. '1, 2, 1'")
    if any(v <= 0 for v in values):
        raise ConfigError(f"layer_structure {text!r}: every width must be positive")
    return values


def resolve_dropout_structure(structure: HypernetworkStructure, layer_structure: list[float]) -> list[float]:
    """The user's ``dropout_structure`` (with ``use_dropout``), else A1111's ``parse_dropout_structure``."""
    if not structure.use_dropout:
        if structure.dropout_structure and any(parse_float_list(structure.dropout_structure, "dropout_structure")):
            raise ConfigError("dropout_structure is set but use_dropout is false: set use_dropout = true, or remove it")
        return [0.0] * len(layer_structure)
    if not structure.dropout_structure:
        return parse_dropout_structure(layer_structure, True, structure.last_layer_dropout)
    values = parse_float_list(structure.dropout_structure, "dropout_structure")
    if len(values) != len(layer_structure) or values[0] != 0 or values[-1] != 0:
        raise ConfigError(f"dropout_structure {structure.dropout_structure!r}: give {len(layer_structure)} values "
                          "(one per layer_structure entry), the first and last 0, e.g. '0, 0.3, 0'")
    if any(not 0 <= v < 1 for v in values):
        raise ConfigError(f"dropout_structure {structure.dropout_structure!r}: every value must be in [0, 1)")
    return values


def sanitize_name(name: str) -> str:
    """A1111 keeps letters, digits and ``._- `` of a new hypernetwork's name."""
    clean = "".join(c for c in name if c.isalnum() or c in "._- ")
    if not clean:
        raise ConfigError(f"hypernetwork name {name!r} is empty after removing unsafe characters: use letters/digits")
    return clean


def create_hypernetwork(name: str, structure: HypernetworkStructure | None = None, seed: int | None = None) -> Hypernetwork:
    """A freshly initialised :class:`Hypernetwork` (``seed`` or ``structure.generation_seed`` makes
    the initial weights reproducible; the global RNG is left as it was)."""
    structure = structure or HypernetworkStructure()
    layer_structure = parse_layer_structure(structure.layer_structure)
    dropout = resolve_dropout_structure(structure, layer_structure)
    try:
        check_activation(structure.activation_func)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if structure.weight_init not in WEIGHT_INITS:
        raise ConfigError(f"weight_init={structure.weight_init!r}: use one of {', '.join(WEIGHT_INITS)}")
    if structure.add_layer_norm and structure.activation_func != "linear" and not structure.activate_output:
        warnings.warn("add_layer_norm with a non-linear activation and activate_output=false: ComfyUI's loader counts "
                      "LayerNorm weights as layers and applies the activation after the last layer too, so the file "
                      "behaves differently there; set activate_output=true for identical results in A1111 and ComfyUI",
                      stacklevel=2)
    sizes = [int(s) for s in (structure.enable_sizes or A1111_SIZES)]
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"enable_sizes {structure.enable_sizes}: give positive sizes such as 768 320 640 1280")
    seed = structure.generation_seed if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return Hypernetwork(sanitize_name(name), sizes, layer_structure, structure.activation_func,
                            structure.weight_init, structure.add_layer_norm, structure.use_dropout,
                            structure.activate_output, dropout, structure.normal_std)


def create_hypernetwork_file(name: str, output_dir: str | Path, structure: HypernetworkStructure | None = None,
                             overwrite: bool = False) -> Path:
    """Create a hypernetwork and write ``<output_dir>/<name>.pt`` (refuses to overwrite unless asked)."""
    hn = create_hypernetwork(name, structure)
    path = Path(output_dir) / f"{hn.name}.pt"
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: choose another name, or pass overwrite (--overwrite)")
    return hn.save(path)
