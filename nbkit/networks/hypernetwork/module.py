"""A1111 hypernetworks as torch modules, laid out exactly as ``modules/hypernetworks/hypernetwork.py``.

A :class:`HypernetworkModule` is a residual MLP ``x + linear(x) * multiplier`` on one context
size; a :class:`Hypernetwork` holds a ``(k, v)`` pair of them per enabled size. Its layers are
an ``nn.Sequential`` named ``linear`` whose indices depend on activation/LayerNorm/dropout, so
state-dict keys match A1111's and a file loads with A1111's strict ``load_state_dict``.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from nbkit.formats.a1111_hypernetwork import (
    COMFYUI_ACTIVATIONS,
    HypernetworkData,
    load_hypernetwork_file,
    save_hypernetwork_file,
)

# A1111 ``HypernetworkModule.activation_dict``: seven names, then every class of
# torch.nn.modules.activation lower-cased ("swish" stays Hardswish, as in A1111).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}  # fmt: skip
ACTIVATIONS.update({
    name.lower(): cls for name, cls in inspect.getmembers(nn.modules.activation)
    if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"
})  # fmt: skip
# Names in A1111's table that cannot make a working layer (they need arguments or change the width).
UNUSABLE_ACTIVATIONS = {"multiheadattention": "needs embed_dim/num_heads", "threshold": "needs threshold/value",
                        "glu": "halves the width, so the residual sum fails"}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def check_activation(activation_func: str | None, where: str = "activation_func") -> None:
    """Raise for names A1111 does not know or that cannot build a layer; warn when ComfyUI
    will refuse the file."""
    if activation_func in (None, "linear"):
        return
    if activation_func not in ACTIVATIONS:
        raise ValueError(f"{where}={activation_func!r} is unknown: use one of {', '.join(sorted(ACTIVATIONS))}")
    if activation_func in UNUSABLE_ACTIVATIONS:
        raise ValueError(f"{where}={activation_func!r} {UNUSABLE_ACTIVATIONS[activation_func]}: "
                         f"choose another, e.g. {', '.join(COMFYUI_ACTIVATIONS)}")
    if activation_func not in COMFYUI_ACTIVATIONS:
        warnings.warn(f"{where}={activation_func!r} loads in A1111, but ComfyUI refuses it (it knows only "
                      f"{', '.join(COMFYUI_ACTIVATIONS)})", stacklevel=3)


class HypernetworkModule(nn.Module):
    """A1111's ``HypernetworkModule``: for ``i`` in ``range(len(layer_structure) - 1)``: Linear,
    activation (not after the last Linear unless ``activate_output``), LayerNorm (also after the
    last one), Dropout where ``dropout_structure[i + 1] > 0``."""

    def __init__(self, dim: int, layer_structure: list[float], activation_func: str | None = None,
                 weight_init: str = "Normal", add_layer_norm: bool = False, activate_output: bool = False,
                 dropout_structure: list[float] | None = None, normal_std: float = 0.01) -> None:
        super().__init__()
        self.multiplier = 1.0
        if layer_structure[0] != 1 or layer_structure[-1] != 1:
            raise ValueError(f"layer_structure {list(layer_structure)} must start and end with 1, like 1, 2, 1")
        if dropout_structure is not None and len(dropout_structure) != len(layer_structure):
            raise ValueError(f"dropout_structure {list(dropout_structure)} needs one entry per layer_structure entry "
                             f"({len(layer_structure)})")
        layers: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width))
            if not (activation_func in ("linear", None) or (i >= last and not activate_output)):
                if activation_func not in ACTIVATIONS:
                    raise ValueError(f"hypernetwork uses an unsupported activation function: {activation_func}")
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width))
            p = dropout_structure[i + 1] if dropout_structure is not None else 0
            if p > 0:
                if not 0 < p < 1:
                    raise ValueError(f"dropout probability {p} must be 0 or between 0 and 1")
                layers.append(nn.Dropout(p=p))
        self.linear = nn.Sequential(*layers)
        self._init_weights(weight_init, activation_func, normal_std)

    @torch.no_grad()
    def _init_weights(self, weight_init: str, activation_func: str | None, normal_std: float) -> None:
        """A1111's init: LayerNorms and ``Normal`` get N(0, std) weights, every bias 0."""
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            w, b = layer.weight, layer.bias
            if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                nn.init.normal_(w, mean=0.0, std=normal_std)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(w)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(w)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
            elif weight_init == "KaimingNormal":
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
            else:
                raise KeyError(f"weight_init={weight_init!r} is not defined: use one of {', '.join(WEIGHT_INITS)}")
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """``x + linear(x) * multiplier``; the multiplier is 1 while training (A1111)."""
        scale = 1.0 if self.training else (self.multiplier if multiplier is None else multiplier)
        return x + self.linear(x) * scale


class Hypernetwork(nn.Module):
    """A1111's ``Hypernetwork``: a ``(k, v)`` :class:`HypernetworkModule` pair per context size,
    plus the fields its ``.pt`` stores. Build one with
    :func:`nbkit.networks.hypernetwork.create.create_hypernetwork` or :meth:`load`."""

    def __init__(self, name: str | None, enable_sizes: list[int], layer_structure: list[float],
                 activation_func: str | None = "linear", weight_init: str = "Normal", add_layer_norm: bool = False,
                 use_dropout: bool = False, activate_output: bool = False,
                 dropout_structure: list[float] | None = None, normal_std: float = 0.01) -> None:
        super().__init__()
        from nbkit.formats.a1111_hypernetwork import parse_dropout_structure

        self.name = name
        self.layer_structure = [float(x) for x in layer_structure]
        self.activation_func = activation_func
        self.weight_init = weight_init
        self.add_layer_norm = add_layer_norm
        self.use_dropout = use_dropout
        self.activate_output = activate_output
        if dropout_structure is None:
            dropout_structure = parse_dropout_structure(self.layer_structure, use_dropout, True)
        self.dropout_structure = [float(x) for x in dropout_structure]
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        self.filename: Path | None = None
        options = dict(layer_structure=self.layer_structure, activation_func=activation_func, weight_init=weight_init,
                       add_layer_norm=add_layer_norm, activate_output=activate_output,
                       dropout_structure=self.dropout_structure, normal_std=normal_std)
        self.layers = nn.ModuleDict({
            str(int(size)): nn.ModuleList([HypernetworkModule(int(size), **options), HypernetworkModule(int(size), **options)])
            for size in enable_sizes
        })  # fmt: skip
        self.eval()

    @property
    def sizes(self) -> list[int]:
        """The enabled context sizes, e.g. ``[320, 640, 768, 1280]``."""
        return sorted(int(size) for size in self.layers)

    def pair(self, size: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The ``(k, v)`` modules for a context of width ``size``, or None (that size is skipped)."""
        if str(size) not in self.layers:
            return None
        modules = self.layers[str(size)]
        return modules[0], modules[1]

    def structure(self) -> dict:
        """The fields two hypernetworks must share to have the same layout (blending, resume)."""
        return {"enable_sizes": self.sizes, "layer_structure": self.layer_structure,
                "activation_func": self.activation_func or "linear", "is_layer_norm": self.add_layer_norm,
                "activate_output": self.activate_output, "dropout_structure": self.dropout_structure}

    def to_data(self) -> HypernetworkData:
        """Plain data for :mod:`nbkit.formats.a1111_hypernetwork` (fp32 tensors on the CPU)."""
        layers = {
            size: tuple({k: v.detach().float().cpu() for k, v in m.state_dict().items()} for m in self.pair(size))
            for size in self.sizes
        }
        return HypernetworkData(
            layers=layers, name=self.name, layer_structure=self.layer_structure,
            activation_func=self.activation_func or "linear", weight_initialization=self.weight_init,
            is_layer_norm=self.add_layer_norm, activate_output=self.activate_output, use_dropout=self.use_dropout,
            dropout_structure=self.dropout_structure, last_layer_dropout=self.dropout_structure[-2] != 0,
            step=self.step, sd_checkpoint=self.sd_checkpoint, sd_checkpoint_name=self.sd_checkpoint_name,
            optional_info=self.optional_info,
        )  # fmt: skip

    @classmethod
    def from_data(cls, data: HypernetworkData, source: str = "hypernetwork") -> Hypernetwork:
        """Rebuild the modules and load their weights strictly, as A1111's ``load`` does."""
        hn = cls(data.name, sorted(data.layers), data.layer_structure, data.activation_func, data.weight_initialization,
                 data.is_layer_norm, data.use_dropout, data.activate_output, data.dropout_structure)
        for size, states in data.layers.items():
            for module, state in zip(hn.pair(size), states, strict=True):
                try:
                    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
                except RuntimeError as err:
                    raise ValueError(f"{source}: size {size} does not match its own structure fields "
                                     f"(layer_structure/activation/layer norm/dropout): {err}") from None
        hn.step = data.step
        hn.sd_checkpoint, hn.sd_checkpoint_name = data.sd_checkpoint, data.sd_checkpoint_name
        hn.optional_info = data.optional_info
        return hn

    @classmethod
    def load(cls, path: str | Path) -> Hypernetwork:
        """Load an A1111/ComfyUI ``.pt``; a file without a name is named after its stem (A1111)."""
        data = load_hypernetwork_file(path)
        hn = cls.from_data(data, str(path))
        hn.name = data.name or Path(path).stem
        hn.filename = Path(path)
        return hn

    def save(self, path: str | Path) -> Path:
        """Write the A1111 ``.pt`` (legacy torch format, atomically)."""
        out = save_hypernetwork_file(self.to_data(), path)
        self.filename = Path(path)
        return out
