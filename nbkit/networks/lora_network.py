"""kohya ``networks.lora`` as a network plug-in (:mod:`nbkit.networks.base`): LoRA and LoCon on peft in
kohya's module set (:mod:`nbkit.networks.lora`), kohya's dropouts and ``network_args``, kohya files."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nbkit.errors import ConfigError
from nbkit.networks.lora import (
    export_kohya_sdxl_state_dict,
    export_kohya_state_dict,
    inject_lora,
    inject_lora_modules,
    kohya_alpha,
    kohya_lora_targets,
    load_kohya_lora,
)

#: the ``network_args`` of kohya ``networks/lora.py::create_network`` that nbkit implements, with their
#: nbkit option of the same meaning
LORA_NETWORK_ARGS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}


def lora_options(config, where="config") -> dict[str, object]:
    """conv_dim, conv_alpha, rank_dropout, module_dropout: the config's fields, or the same options
    written kohya's way in ``network_args`` (``["conv_dim=4", "conv_alpha=1"]``); both must agree."""
    from nbkit.networks.base import split_network_args

    place = where("network_args") if callable(where) else where
    options = {name: getattr(config, name) for name in LORA_NETWORK_ARGS}
    for key, text in split_network_args(getattr(config, "network_args", None), where).items():
        if key not in LORA_NETWORK_ARGS:
            known = ", ".join(LORA_NETWORK_ARGS)
            raise ConfigError(f"{place}: {key} is not an option of networks.lora that nbkit implements ({known}): "
                              "remove it, or use network_module = \"lycoris.kohya\" for LyCORIS options")
        try:
            value = LORA_NETWORK_ARGS[key](text)
        except ValueError:
            raise ConfigError(f"{place}: {key}={text} is not a number: write e.g. {key}=4") from None
        if options[key] is not None and options[key] != value:
            raise ConfigError(f"{place}: {key}={text} but {key} = {options[key]}: keep one of them")
        options[key] = value
    return options


class LoRANetwork:
    """kohya ``networks.lora`` (LoRA, and LoCon with ``conv_dim``) as a network plug-in
    (:mod:`nbkit.networks.base`): peft adapters in kohya's module set, kohya's dropouts, kohya files."""

    module = "networks.lora"
    check_config = staticmethod(lora_options)

    def __init__(self, config) -> None:
        self.config = config
        self.options = lora_options(config)
        self.models: dict[str, nn.Module] = {}

    def inject(self, models: Mapping[str, nn.Module]) -> None:
        """kohya's module set with the config's ranks, or a kohya file's ranks and weights
        (``network_weights``: training continues from it)."""
        from nbkit.networks.dropout import add_lora_dropouts

        config = self.config
        self.models = dict(models)
        unet, text_encoder = models.get("unet"), models.get("text_encoder")
        text_encoder_2 = models.get("text_encoder_2")  # SDXL's OpenCLIP bigG
        if config.network_weights:  # continue from a kohya file (SDXL names too): its ranks and alphas win
            load_kohya_lora(config.network_weights, unet, text_encoder, text_encoder_2=text_encoder_2)
            note = network_weights_note(config)
            if note:
                print(note)
        else:
            inject_lora(unet, text_encoder, network_dim=config.network_dim, network_alpha=config.network_alpha,
                        train_unet=config.train_unet, train_text_encoder=config.train_text_encoder,
                        conv_dim=self.options["conv_dim"], conv_alpha=self.options["conv_alpha"])
        if text_encoder_2 is not None and config.train_text_encoder and not config.network_weights:
            # kohya networks/lora.py (is_sdxl): both text encoders get TEXT_ENCODER_TARGET_REPLACE_MODULE
            # with network_dim/network_alpha (prefixes lora_te1_/lora_te2_)
            alpha = kohya_alpha(config.network_alpha, config.network_dim)
            targets = kohya_lora_targets(text_encoder_2, "text_encoder")
            inject_lora_modules(text_encoder_2, {p: (config.network_dim, alpha) for p in targets})
        elif text_encoder_2 is not None:
            text_encoder_2.requires_grad_(False)
        for model in (unet, text_encoder, text_encoder_2):
            if model is None:
                continue
            add_lora_dropouts(model, network_dropout=config.network_dropout, rank_dropout=self.options["rank_dropout"],
                              module_dropout=self.options["module_dropout"])

    def parameters(self, part: str) -> list[nn.Parameter]:
        trains = {"unet": self.config.train_unet, "text_encoder": self.config.train_text_encoder,
                  "text_encoder_2": self.config.train_text_encoder}
        model = self.models.get(part)
        if not trains.get(part) or model is None:
            return []
        return [p for n, p in model.named_parameters() if {"lora_A", "lora_B"} & set(n.split("."))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        if "text_encoder_2" in self.models:
            return export_kohya_sdxl_state_dict(self.models)
        return export_kohya_state_dict(self.models.get("unet"), self.models.get("text_encoder"))

    def metadata(self, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, object]:
        """The config's ranks; continued from a file, the ranks of the weights trained (kohya
        ``networks/lora.py::create_network_from_weights`` reads them from the tensors the same way)."""
        from nbkit.formats.kohya_metadata import network_shape

        config = self.config
        args = {k: v for k, v in self.options.items() if k.endswith("dropout") and v is not None}
        if not config.network_weights:
            return {"network_module": self.module, "network_dim": config.network_dim, "network_args": args,
                    "network_alpha": config.network_alpha, "conv_dim": self.options["conv_dim"],
                    "conv_alpha": self.options["conv_alpha"]}
        state = self.state_dict() if state is None else state
        shape = network_shape({k: tuple(v.shape) for k, v in state.items() if k.endswith(".lora_down.weight")},
                              {k: v.float().item() for k, v in state.items() if k.endswith(".alpha")})
        return {"network_module": self.module, "network_dim": shape.network_dim, "network_alpha": shape.network_alpha,
                "conv_dim": shape.conv_dim, "conv_alpha": shape.conv_alpha, "network_args": args}


def network_weights_note(config) -> str | None:
    """A note when ``network_weights`` holds other ranks/alphas than the config asks for: training goes
    on at the file's (as kohya ``train_network.py --dim_from_weights``, which builds the network with
    ``networks/lora.py::create_network_from_weights``: dim = ``lora_down.shape[0]``, alpha = ``.alpha``)."""
    from nbkit.formats.kohya_metadata import file_network_shape

    shape = file_network_shape(config.network_weights)
    alpha = config.network_alpha or config.network_dim  # kohya: alpha 0/None means alpha = dim
    conv_alpha = (1.0 if config.conv_alpha is None else config.conv_alpha) if config.conv_dim else None
    wanted = (config.network_dim, float(alpha), config.conv_dim or None, conv_alpha)
    if (shape.network_dim, shape.network_alpha, shape.conv_dim, shape.conv_alpha) == wanted:
        return None
    asked = f"network_dim={config.network_dim}, network_alpha={config.network_alpha}"
    asked += f", conv_dim={config.conv_dim}, conv_alpha={config.conv_alpha}" if config.conv_dim else ""
    return (f"note: network_weights {config.network_weights} holds {shape.describe()}; training continues at the "
            f"file's ranks and alphas and the saved metadata says so ({asked} from the config are not used): "
            "set them to the file's values to silence this note")
