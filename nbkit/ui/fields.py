"""One widget per config field, chosen from the field's type and metadata (never written per field).

A :class:`FieldControl` turns a dataclass field into an input widget with its help text and a
message line for validation errors, and converts between the widget and the field's value:

- ``bool`` -> Checkbox; ``bool | None`` -> Dropdown (unset / true / false)
- a field with ``choices`` -> Dropdown (plus "(unset)" when optional)
- ``int`` / ``float`` / ``str`` -> Text; numbers accept ``1e-4``; floats are shown with ``repr``,
  the shortest text that reads back as the same float, so config -> form -> config is exact
- ``list[...]`` -> Text: strings space-separated with shell quoting (``"a b" c=1,2``),
  numbers separated by commas or spaces

An optional field shows "(unset)" when it is ``None``; an empty text box means ``None``
(so an optional string cannot hold ``""``: empty is unset, as in the TOML file).

Each field is shown with a plain label (:data:`LABELS`) and its kohya option name beside it in small
text (the name the TOML file and the CLI use), with the help text on hover. Every basic field of every
training method has a label (a test checks it, so a new basic option needs one here).
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
import shlex
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ipywidgets as W

from nbkit.config import _base_type, field_types

UNSET = "(unset)"
# Plain words for the options a beginner sees; the kohya name stays beside them (and in every file).
LABELS: dict[str, str] = {
    # base model and files
    "pretrained_model_name_or_path": "Base model", "v2": "SD 2.x model", "v_parameterization": "v-prediction model",
    "vae": "Separate VAE", "output_dir": "Output folder", "output_name": "File name", "save_model_as": "File format",
    "save_as": "File format", "save_precision": "Saved precision", "save_diffusers": "Also save as diffusers folder",
    "resume": "Continue from state", "save_state": "Save resumable state",
    "save_state_every_n_steps": "Resumable state every N steps", "save_optimizer_state": "Save optimizer state",
    "save_every_n_steps": "Save a file every N steps", "save_every_n_epochs": "Save a file every N epochs",
    # dataset
    "dataset_config": "Dataset settings file", "train_data_dir": "Training images folder",
    "reg_data_dir": "Regularization images folder", "class_data_dir": "Class images folder",
    "caption_extension": "Caption file extension", "num_repeats": "Repeats per image", "resolution": "Resolution (px)",
    "enable_sizes": "Train at several sizes", "shuffle_tags": "Shuffle tags", "tag_drop_out": "Tag drop-out",
    "max_token_length": "Caption length (tokens)", "instance_prompt": "Instance prompt (your subject)",
    "class_prompt": "Class prompt", "num_class_images": "Number of class images",
    # training length
    "train_batch_size": "Batch size", "max_train_steps": "Training steps", "max_train_epochs": "Training epochs",
    "seed": "Random seed",
    # optimizer
    "learning_rate": "Learning rate", "unet_lr": "U-Net learning rate", "text_encoder_lr": "Text encoder learning rate",
    "learning_rate_te": "Text encoder learning rate", "optimizer_type": "Optimizer", "lr_scheduler": "Learning-rate schedule",
    "train_text_encoder": "Train the text encoder", "stop_text_encoder_training": "Stop text encoder training at step",
    # memory and speed
    "mixed_precision": "Mixed precision", "gradient_checkpointing": "Gradient checkpointing (saves VRAM)",
    "cache_latents": "Cache latents (faster)", "cache_latents_to_disk": "Cache latents on disk",
    # networks
    "network_module": "Network type", "network_dim": "Network rank (dim)", "network_alpha": "Network alpha",
    "network_train_unet_only": "Train the U-Net only", "layer_structure": "Layer structure",
    "activation_func": "Activation function",
    # textual inversion
    "token_string": "Token (your new word)", "init_word": "Start from word", "num_vectors_per_token": "Vectors per token",
    "template_file": "Prompt template",
    # previews
    "sample_prompts": "Preview prompts file", "sample_every_n_steps": "Preview every N steps",
    "sample_every_n_epochs": "Preview every N epochs", "sample_at_first": "Preview before training",
}
NAME_WIDTH = "230px"
ERROR_STYLE = "color:#c62828"


@dataclass(frozen=True)
class FieldInfo:
    """What a form needs to know about one dataclass field."""

    name: str
    kind: str  # bool, optbool, choice, list, int, float, str
    optional: bool
    item: type | None  # list item type
    help: str
    group: str  # basic / advanced
    choices: tuple | None
    default: Any
    label: str = ""  # plain words (LABELS); empty: the option name alone


def _kind(base, choices) -> tuple[str, type | None]:
    if typing.get_origin(base) is list:
        return "list", (typing.get_args(base) or (str,))[0]
    if choices:
        return "choice", None
    if base is bool:
        return "bool", None
    if base in (int, float):
        return base.__name__, None
    return "str", None


def describe_fields(cls) -> list[FieldInfo]:
    """:class:`FieldInfo` for every field of a config dataclass, in declaration order."""
    types_ = field_types(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional = _base_type(types_[f.name])
        choices = f.metadata.get("choices")
        kind, item = _kind(base, choices)
        if kind == "bool" and optional:
            kind = "optbool"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(FieldInfo(f.name, kind, optional, item, f.metadata.get("help", ""),
                             f.metadata.get("group", "basic"), tuple(choices) if choices else None, default,
                             LABELS.get(f.name, "")))
    return out


# ----------------------------------------------------------------------------- text <-> value
def format_number(value: Any) -> str:
    """``repr`` of a float is the shortest text that parses back to the same float (3e-07, 0.0001)."""
    return repr(value) if isinstance(value, float) else str(value)


def parse_number(text: str, tp: type) -> int | float:
    """Parse an int or float field's text; ``1e-4`` and ``1e3`` (for an int) are accepted."""
    try:
        if tp is int:
            try:
                return int(text)
            except ValueError:
                number = float(text)
                if not number.is_integer():
                    raise ValueError("must be a whole number") from None
                return int(number)
        number = float(text)
    except (ValueError, OverflowError) as err:
        reason = str(err) if "whole" in str(err) else f"must be a {'whole ' if tp is int else ''}number"
        raise ValueError(f"{reason} (got {text!r})") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number (got {text!r})")
    return number


def format_text(info: FieldInfo, value: Any) -> str:
    if value is None:
        return ""
    if info.kind == "list":
        if info.item is str:
            return shlex.join(str(v) for v in value)
        return ", ".join(format_number(v) for v in value)
    if info.kind in ("int", "float"):
        return format_number(value)
    return str(value)


def parse_text(info: FieldInfo, text: str) -> Any:
    """The field value of a text box; raises ``ValueError`` with a message for the user."""
    stripped = text.strip()
    if info.kind == "str":
        return None if info.optional and not text else text  # spaces may matter (prefix, separators)
    if not stripped:
        if info.optional:
            return None
        if info.kind == "list":
            return []
        raise ValueError("required: enter a number")
    if info.kind == "list":
        if info.item is str:
            try:
                return shlex.split(stripped)
            except ValueError as err:
                raise ValueError(f"{err}: close the quote") from None
        return [parse_number(part, info.item) for part in re.split(r"[,\s]+", stripped) if part]
    return parse_number(stripped, int if info.kind == "int" else float)


# ----------------------------------------------------------------------------- controls
class FieldControl:
    """The input widget, help line and message line of one field; ``.box`` holds all three."""

    def __init__(self, info: FieldInfo, check: Callable[[Any], None] | None = None) -> None:
        self.info = info
        self.check = check  # extra validation of the parsed value (raises ValueError)
        self._options: list[Any] = []
        tip = f"{info.name}: {info.help}" if info.help else info.name
        style = {"description_width": NAME_WIDTH}
        label = field_label(info)
        layout = W.Layout(width="560px", flex="0 0 auto")
        if info.kind == "bool":
            self.input = W.Checkbox(value=bool(info.default), description=label, tooltip=tip, indent=True,
                                    description_allow_html=True, style=style, layout=layout)
        elif info.kind in ("optbool", "choice"):
            self._options = [None] if info.optional else []
            self._options += [True, False] if info.kind == "optbool" else list(info.choices or ())
            self.input = W.Dropdown(options=self._labels(), description=label, tooltip=tip, style=style,
                                    description_allow_html=True, layout=layout)
        else:
            self.input = W.Text(description=label, tooltip=tip, placeholder=UNSET if info.optional else "",
                                description_allow_html=True, continuous_update=False, style=style, layout=layout)
        self.help = W.HTML(f"<small style='color:#666'>{html.escape(info.help)}</small>",
                           layout=W.Layout(flex="1 1 auto", margin="0 0 0 8px"))
        self.message = W.HTML(layout=W.Layout(display="none", margin="0 0 4px 238px"))
        self.hint = W.HTML(layout=W.Layout(display="none", margin="0 0 4px 238px"))  # numbers for this run
        self.box = W.VBox([W.HBox([self.input, self.help]), self.hint, self.message])
        self.set(info.default)

    def _labels(self) -> list[str]:
        labels = []
        for value in self._options:
            label = UNSET if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            if self.info.choices and value is not None and value not in self.info.choices:
                label = f"{value!r} (not allowed)"
            labels.append(label)
        return labels

    def set(self, value: Any) -> None:
        """Show ``value``; a value a dropdown does not offer is added, marked, and fails validation."""
        if self.info.kind == "bool" and isinstance(value, bool):
            self.input.value = value
        elif self.info.kind == "bool":  # not a bool: keep it visible as an error
            self.input.value = bool(value)
            self.show_error(f"must be true or false, got {value!r}")
            return
        elif self._is_dropdown:
            if not any(type(v) is type(value) and v == value for v in self._options):
                self._options.append(value)
                self.input.options = self._labels()
            self.input.index = next(i for i, v in enumerate(self._options) if type(v) is type(value) and v == value)
        else:
            self.input.value = format_text(self.info, value)
        self.clear()

    @property
    def _is_dropdown(self) -> bool:
        return self.info.kind in ("optbool", "choice")

    def get(self) -> Any:
        """The field's value; raises ``ValueError`` (message for the user) when it is not valid."""
        if self.info.kind == "bool":
            value = bool(self.input.value)
        elif self._is_dropdown:
            value = self._options[self.input.index]
            if self.info.choices and value is not None and value not in self.info.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(map(str, self.info.choices))}")
        else:
            value = parse_text(self.info, self.input.value)
        if self.check is not None and value is not None:
            self.check(value)
        return value

    def show_hint(self, text: str, warn: bool = False) -> None:
        """A line under the field with what its value means for this run ('' hides it)."""
        style = "color:#8a6d00" if warn else "color:#1b5e20"
        self.hint.value = f"<small style='{style}'>{html.escape(text)}</small>" if text else ""
        self.hint.layout.display = None if text else "none"

    @property
    def hint_text(self) -> str:
        return html.unescape(re.sub(r"<[^>]+>", "", self.hint.value)).strip()

    def show_error(self, text: str) -> None:
        self.message.value = f"<span style='{ERROR_STYLE}'>&#9888; {html.escape(text)}</span>"
        self.message.layout.display = None

    def clear(self) -> None:
        self.message.value = ""
        self.message.layout.display = "none"

    @property
    def error(self) -> str:
        """The message shown next to the field ('' when none), as plain text."""
        return html.unescape(re.sub(r"<[^>]+>", "", self.message.value)).replace("\u26a0", "").strip()


def field_label(info: FieldInfo) -> str:
    """The widget's description: the plain label with the option name beside it in small grey text
    (HTML; the option name alone when the field has no label)."""
    name = f"<small style='color:#888'>{html.escape(info.name)}</small>"
    return f"{html.escape(info.label)} {name}" if info.label else html.escape(info.name)
