"""The options of ``network_module = "lycoris.kohya"``: ``network_args`` as kohya users write them for
LyCORIS, checked against LyCORIS's own parser rules, and LyCORIS presets."""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.errors import ConfigError
from nbkit.networks.base import split_network_args

#: network_args algo -> LyCORIS module class (``lycoris/wrapper.py::network_module_dict``)
ALGOS = {"lora": "LoConModule", "locon": "LoConModule", "loha": "LohaModule", "lokr": "LokrModule"}
#: algos LyCORIS has that nbkit does not train (yet)
OTHER_ALGOS = ("ia3", "dylora", "glora", "full", "diag-oft", "boft", "tlora")
_BOOLS = {"true": True, "false": False}
#: lycoris.kohya options nbkit does not support, and why
UNSUPPORTED = {
    "train_norm": "norm-layer training is not supported", "block_size": "it is an OFT/BOFT option",
    "constraint": "it is an OFT/BOFT option", "constrain": "it is an OFT/BOFT option",
    "rescaled": "it is an OFT/BOFT option", "train_t5xxl": "it is for Flux/SD3 text encoders",
    "train_llm_adapter": "it is for Anima models", "loraplus_lr_ratio": "LoRA+ learning rates are not supported",
    "loraplus_unet_lr_ratio": "LoRA+ learning rates are not supported",
    "loraplus_text_encoder_lr_ratio": "LoRA+ learning rates are not supported",
    # lycoris/wrapper.py::deprecated_arg_dict copies it to use_tucker as it is, so disable_conv_cp=True turns
    # tucker ON in LyCORIS 4.1.3: too confusing to accept
    "disable_conv_cp": "an old spelling LyCORIS reads as use_tucker with the same value; write use_tucker=True/False",
}  # fmt: skip
#: the use_tucker spellings LyCORIS still reads (``lycoris/wrapper.py::deprecated_arg_dict``)
TUCKER_ALIASES = ("use_cp", "use_conv_cp")
_BOOL_ARGS = ("decompose_both", "full_matrix", "use_tucker", "use_scalar", "dora_wd", "wd_on_output", "rs_lora",
              "unbalanced_factorization", "bypass_mode")  # fmt: skip
_INT_ARGS = ("conv_dim", "factor")
_FLOAT_ARGS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout")
KNOWN_ARGS = tuple(sorted(("algo", "preset", *_BOOL_ARGS, *_INT_ARGS, *_FLOAT_ARGS, *TUCKER_ALIASES)))


@dataclass(frozen=True)
class LycorisArgs:
    """``network_args`` of a ``lycoris.kohya`` network, parsed (``lycoris/kohya.py::create_network``)."""

    algo: str = "lora"
    preset: str = "full"
    conv_dim: int | None = None  # None: network_dim (LyCORIS's default)
    conv_alpha: float | None = None  # None: network_alpha
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    dora_wd: bool = False
    wd_on_output: bool = True
    rs_lora: bool = False
    unbalanced_factorization: bool = False
    bypass_mode: bool = False
    written: dict[str, str] = field(default_factory=dict)  # as kohya writes ss_network_args (strings)


#: LoRATrainConfig fields that are network_args under LyCORIS (kohya: --network_dropout becomes dropout)
_CONFIG_FIELDS = {"conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "network_dropout": "dropout",
                  "rank_dropout": "rank_dropout", "module_dropout": "module_dropout"}  # fmt: skip


def _place(where, name: str) -> str:
    return where(name) if callable(where) else where


def _convert(key: str, value: str, where) -> object:
    """One network_args value as LyCORIS reads it (but a boolean must say True or False: LyCORIS's
    ``str_bool`` takes anything but "false" as True, "0" and "no" too)."""
    place = f"{_place(where, 'network_args')}: {key}={value}"
    if key in _BOOL_ARGS or key in TUCKER_ALIASES:
        if value.lower() not in _BOOLS:
            raise ConfigError(f"{place}: write {key}=True or {key}=False")
        return _BOOLS[value.lower()]
    if key in _INT_ARGS:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{place}: must be a whole number, e.g. {key}=4") from None
    if key in _FLOAT_ARGS:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{place}: must be a number, e.g. {key}=1") from None
        if not math.isfinite(number):
            raise ConfigError(f"{place}: must be a finite number")
        return number
    return value.lower() if key == "algo" else value


def check_network_args(config, where="config") -> LycorisArgs:
    """The config's LyCORIS options, or a :class:`ConfigError` naming the option and the fix.

    Reads ``network_args`` as kohya users write them for ``lycoris.kohya`` (``algo``, ``preset``,
    ``conv_dim``, ``conv_alpha``, ``factor``, ``dora_wd``, ``dropout``, ``rank_dropout``, ``module_dropout``,
    ``use_tucker``, ...), plus nbkit's own fields of the same meaning (``conv_dim``, ``conv_alpha``,
    ``network_dropout`` -> ``dropout``, ``rank_dropout``, ``module_dropout``), which must not contradict
    them. Needs the ``lycoris-lora`` package (``pip install 'nbkit[lycoris]'``).
    """
    given = split_network_args(getattr(config, "network_args", None), where)
    for key in given:
        if key in UNSUPPORTED:
            raise ConfigError(f"{_place(where, 'network_args')}: {key}: {UNSUPPORTED[key]} in nbkit's lycoris.kohya; "
                              "remove it")
        if key not in KNOWN_ARGS:
            close = difflib.get_close_matches(key, KNOWN_ARGS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{_place(where, 'network_args')}: unknown LyCORIS option {key!r}{hint}; lycoris.kohya "
                              f"options nbkit trains with: {', '.join(KNOWN_ARGS)}")
    written = dict(given)
    for name, key in _CONFIG_FIELDS.items():  # nbkit's fields: the same option under another spelling
        value = getattr(config, name, None)
        if value is None:
            continue
        if key in given and float(_convert(key, given[key], where)) != float(value):
            raise ConfigError(f"{_place(where, name)}: {name} = {value} but network_args has {key}={given[key]}: "
                              "give it once")
        given.setdefault(key, str(value))
        written.setdefault(key, str(value))
    values = {k: _convert(k, v, where) for k, v in given.items()}
    # create_network: use_tucker = use_conv_cp or use_cp or use_tucker
    values["use_tucker"] = any(values.pop(k, False) for k in (*TUCKER_ALIASES, "use_tucker"))
    args = LycorisArgs(**values, written=written)
    _check_values(args, config, where)
    return args


def _check_values(args: LycorisArgs, config, where) -> None:
    place = _place(where, "network_args")
    if args.algo in OTHER_ALGOS:
        raise ConfigError(f"{place}: algo={args.algo} is a LyCORIS algorithm nbkit does not train; use one of "
                          f"{', '.join(ALGOS)}")
    if args.algo not in ALGOS:
        raise ConfigError(f"{place}: algo={args.algo} is not a LyCORIS algorithm: use one of {', '.join(ALGOS)}")
    for name in ("dropout", "rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ConfigError(f"{place}: {name}={getattr(args, name)}: a dropout is in [0, 1), e.g. {name}=0.1")
    if args.conv_dim is not None and args.conv_dim < 0:
        raise ConfigError(f"{place}: conv_dim={args.conv_dim}: the 3x3 conv rank is >= 0 (0 trains no 3x3 convs)")
    if args.factor == 0 or args.factor < -1:
        raise ConfigError(f"{place}: factor={args.factor}: LoKr's factor is -1 (as balanced as possible) or >= 1, "
                          "e.g. factor=8")
    if args.dora_wd and args.bypass_mode:
        raise ConfigError(f"{place}: dora_wd=True with bypass_mode=True: LyCORIS's bypass forward ignores the weight "
                          "decomposition (the file's dora_scale would act only at inference); drop one")
    preset_targets(args.preset, where)  # raises for an unknown preset
    if getattr(config, "network_dim", 1) < 1:
        raise ConfigError(f"{_place(where, 'network_dim')}: network_dim = {config.network_dim}: the LyCORIS rank is "
                          ">= 1, e.g. 8")


def preset_targets(preset: str, where="config") -> dict:
    """A LyCORIS preset (a built-in name of ``lycoris/config.py::PRESET`` or a ``.toml`` file) as a dict."""
    try:
        from lycoris.config import PRESET
        from lycoris.config_sdk import PresetConfig, PresetValidationError
    except ImportError:
        raise ConfigError(f"{_place(where, 'network_module')}: lycoris.kohya needs the lycoris-lora package: "
                          "pip install 'nbkit[lycoris]'") from None
    place = f"{_place(where, 'network_args')}: preset={preset}"
    if preset in PRESET:
        data = PRESET[preset]
    elif preset.endswith(".toml") and Path(preset).expanduser().is_file():
        try:
            raw = tomllib.loads(Path(preset).expanduser().read_text(encoding="utf-8"))
            data = PresetConfig.from_dict(raw).to_dict()
        except (tomllib.TOMLDecodeError, PresetValidationError) as err:
            raise ConfigError(f"{place}: not a LyCORIS preset file ({err})") from None
    else:
        raise ConfigError(f"{place}: not a built-in LyCORIS preset ({', '.join(PRESET)}) nor a .toml preset file")
    if data.get("module_algo_map") or data.get("name_algo_map"):
        raise ConfigError(f"{place}: per-module algorithms (module_algo_map/name_algo_map) are not supported; use a "
                          "preset without them (e.g. full or attn-mlp)")
    if data.get("target_module") or data.get("target_name"):
        raise ConfigError(f"{place}: target_module/target_name are for non-kohya models; use "
                          "unet_target_module/text_encoder_target_module")
    return data
