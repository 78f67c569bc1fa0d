"""Notebook forms generated from the config dataclasses: one generator for every config class.

    from nbkit.ui.forms import ConfigForm
    form = ConfigForm(LoRATrainConfig, path=project.run_toml)   # starts from run.toml if it exists
    form                                                        # last expression of a cell: shows it
    config = form.config()                                      # next cell: ConfigError if a field is wrong

The form has a preset menu (``nbkit.presets``), the basic fields, an "Advanced" accordion, a
message next to each invalid field, and Save/Load buttons for the run TOML (the same file the
CLI reads: ``nbkit train lora --config run.toml``). Only ``nbkit.ui`` imports ipywidgets.
"""

from __future__ import annotations

import html
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ipywidgets as W

from nbkit.config import ConfigError, flatten_run_toml, from_dict, load_toml, save_toml
from nbkit.presets import PRESETS, Preset, presets_for
from nbkit.tag.config import BlipCaptionConfig, WD14Config
from nbkit.train.config import LoRATrainConfig
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, check_options
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig, check_hypernetwork_config
from nbkit.train.textual_inversion_config import TextualInversionTrainConfig
from nbkit.ui.fields import ERROR_STYLE, FieldControl, describe_fields

# Every config class a form supports. The dataset specs (nbkit.data.dataset_config) are not form
# targets: SubsetSpec needs an image_dir, DatasetSpec nests subsets; the dataset notebook writes them.
CONFIG_CLASSES: tuple[type, ...] = (
    LoRATrainConfig, DreamBoothTrainConfig, HypernetworkTrainConfig, TextualInversionTrainConfig, WD14Config,
    BlipCaptionConfig,
)
METHODS: dict[type, str] = {
    LoRATrainConfig: "lora", DreamBoothTrainConfig: "dreambooth", HypernetworkTrainConfig: "hypernetwork",
    TextualInversionTrainConfig: "textual_inversion",
}
# The usual learning rate of each method with Adam-type optimizers (AdamW, AdamW8bit, ...).
ADAM_RATES = {"lora": ("1e-4", "1e-4 (5e-5 for the text encoder)"), "dreambooth": ("2e-6", "1e-6 to 5e-6"),
              "hypernetwork": ("1e-5", "5e-6 to 5e-5 (A1111: 1e-5)"), "textual_inversion": ("5e-3", "5e-3 (A1111)")}
NO_PRESET = "(choose a preset)"


def _hypernetwork_field_checks() -> dict[str, Callable[[Any], None]]:
    """Per-field checks the trainer would otherwise only make when it starts."""
    from nbkit.networks.hypernetwork.create import parse_layer_structure
    from nbkit.networks.hypernetwork.module import check_activation
    from nbkit.train.schedules import is_a1111_schedule

    def schedule(text: str) -> None:
        if not is_a1111_schedule(str(text).strip()):
            raise ValueError("write a number or a schedule like '5e-5:100, 5e-6:1500, 5e-7'")

    def layers(text: str) -> None:
        try:
            parse_layer_structure(text)
        except ConfigError as err:
            raise ValueError(str(err)) from None

    def activation(name: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the ComfyUI note is a warning, not an error
            check_activation(name)

    return {"learning_rate": schedule, "clip_grad_value": schedule, "layer_structure": layers,
            "activation_func": activation}


def field_checks(cls: type) -> dict[str, Callable[[Any], None]]:
    return _hypernetwork_field_checks() if issubclass(cls, HypernetworkTrainConfig) else {}


def config_checks(cls: type) -> list[Callable[[Any], None]]:
    """Whole-config checks the trainer runs first (contradictions between fields)."""
    if issubclass(cls, DreamBoothTrainConfig):
        return [check_options]
    if issubclass(cls, HypernetworkTrainConfig):
        return [check_hypernetwork_config]
    return []


class ConfigForm:
    """A form for one config dataclass; ``.widget`` is the ipywidgets box, ``.config()`` the result.

    ``config_or_class``: a config object (shown as it is) or a class (its defaults, or ``path``
    when that file exists). ``presets``: preset names for the menu (default: those of the
    class's method; ``[]`` hides the menu). ``path``: the TOML file Save and Load use.
    """

    def __init__(self, config_or_class: Any, *, presets: list[str] | None = None, title: str | None = None,
                 path: str | Path | None = None) -> None:
        self.cls = config_or_class if isinstance(config_or_class, type) else type(config_or_class)
        self.controls: dict[str, FieldControl] = {}
        checks = field_checks(self.cls)
        for info in describe_fields(self.cls):
            self.controls[info.name] = FieldControl(info, checks.get(info.name))
        self.presets = self._presets(presets)
        self.message = W.HTML()
        self.path_text = W.Text(value=str(path) if path else "", description="file", placeholder="run.toml",
                                layout=W.Layout(width="520px"))
        self.status = W.HTML()
        self.preset_menu = W.Dropdown(options=[NO_PRESET, *[p.name for p in self.presets]], description="preset")
        self.preset_help = W.HTML()
        self.preset_menu.observe(self._on_preset, names="value")
        self.base_menu = self._base_model_menu() if "pretrained_model_name_or_path" in self.controls else None
        self.base_help = W.HTML()
        self.save_button = W.Button(description="Save", icon="save", tooltip="Write the settings to the file")
        self.load_button = W.Button(description="Load", icon="folder-open", tooltip="Read the settings from the file")
        self.save_button.on_click(lambda _b: self._button(self.save))
        self.load_button.on_click(lambda _b: self._button(self.load))
        self.widget = self._layout(title or f"{self.cls.__name__} settings")
        self.method = next((m for c, m in METHODS.items() if issubclass(self.cls, c)), None)
        self._counts: dict[tuple, DatasetCounts | str] = {}
        self._holding = False  # set_config changes many fields: the hints follow once, at the end
        if not isinstance(config_or_class, type):
            self.set_config(config_or_class)
        elif path and Path(path).is_file():
            self._button(self.load)
        for name in HINT_INPUTS:
            if name in self.controls:
                self.controls[name].input.observe(lambda _c: self._holding or self.update_hints(), names="value")
        self.update_hints()

    # ------------------------------------------------------------------ hints
    def _value(self, name: str) -> Any:
        try:
            return self.controls[name].get() if name in self.controls else None
        except ValueError:
            return None

    def dataset_counts(self) -> DatasetCounts | None:
        """Images, repeats and steps per epoch of the form's dataset (its ``dataset_config`` or
        ``train_data_dir``), or None when it is not known yet; cached per file, resolution and batch."""
        source = self._value("dataset_config") or self._value("train_data_dir")
        self.count_error = ""
        if not source or not Path(str(source)).expanduser().exists():
            return None
        key = (str(source), self._value("resolution"), self._value("train_batch_size"),
               self._value("gradient_accumulation_steps") or 1, Path(str(source)).expanduser().stat().st_mtime)
        if key not in self._counts:
            try:
                self._counts[key] = count_dataset(*key[:4])
            except (ValueError, OSError) as err:
                self._counts[key] = str(err)
        found = self._counts[key]
        self.count_error = found if isinstance(found, str) else ""
        return found if isinstance(found, DatasetCounts) else None

    def update_hints(self) -> None:
        """The lines under learning_rate and max_train_steps / max_train_epochs, from the current values."""
        if "learning_rate" in self.controls:
            text, warn = learning_rate_hint(self._value("optimizer_type"), self._value("learning_rate"), self.method)
            self.controls["learning_rate"].show_hint(text, warn)
        if "max_train_steps" in self.controls:
            counts = self.dataset_counts()
            steps, epochs = self._value("max_train_steps"), self._value("max_train_epochs")
            text = f"cannot count the dataset: {self.count_error}" if self.count_error else steps_hint(counts, steps, epochs)
            self.controls["max_train_steps"].show_hint(text, warn=bool(self.count_error))
            if "max_train_epochs" in self.controls:
                self.controls["max_train_epochs"].show_hint(epochs_hint(counts, epochs))

    # ------------------------------------------------------------------ layout
    def _presets(self, names: list[str] | None) -> list[Preset]:
        if names is None:
            method = next((m for c, m in METHODS.items() if issubclass(self.cls, c)), None)
            return presets_for(method) if method else []
        unknown = [n for n in names if n not in PRESETS]
        if unknown:
            raise KeyError(f"unknown preset {unknown[0]!r}; choose from: {', '.join(PRESETS)}")
        return [PRESETS[n] for n in names]

    def _layout(self, title: str) -> W.VBox:
        basic = [c.box for c in self.controls.values() if c.info.group != "advanced"]
        advanced = [c.box for c in self.controls.values() if c.info.group == "advanced"]
        parts: list[W.Widget] = [W.HTML(f"<h3 style='margin:4px 0'>{html.escape(title)}</h3>")]
        if self.presets:
            parts.append(W.VBox([self.preset_menu, self.preset_help]))
        if self.base_menu is not None:
            parts.append(W.VBox([self.base_menu, self.base_help]))
        parts.append(W.VBox(basic))
        if advanced:
            self.advanced = W.Accordion(children=[W.VBox(advanced)], titles=(f"Advanced ({len(advanced)} options)",))
            parts.append(self.advanced)
        parts += [self.message, W.HBox([self.path_text, self.save_button, self.load_button]), self.status]
        return W.VBox(parts)

    def _base_model_menu(self) -> W.Dropdown:
        from nbkit.models.catalog import BASE_MODELS, OWN_MODEL

        options = [(OWN_MODEL, "")] + [(m.label, m.key) for m in BASE_MODELS.values()]
        menu = W.Dropdown(options=options, value="", description="base model", style={"description_width": "90px"},
                          layout=W.Layout(width="560px"))
        menu.observe(lambda change: self.use_base_model(change["new"]) if change["new"] else None, names="value")
        return menu

    def use_base_model(self, key: str) -> None:
        """Choose a model from :data:`nbkit.models.catalog.BASE_MODELS`: its source and its architecture's
        defaults (resolution, SD2 / v-prediction flags, SDXL's T4 settings) go into the form."""
        from nbkit.models.catalog import BASE_MODELS, base_model_values

        entry = BASE_MODELS[key]
        method = next((m for c, m in METHODS.items() if issubclass(self.cls, c)), "lora")
        for name, value in base_model_values(entry, method).items():
            if name in self.controls:
                self.controls[name].set(value)
        if self.base_menu is not None and self.base_menu.value != key:
            self.base_menu.value = key
        extra = "" if entry.verified else " The source was not verified when the list was written."
        self.base_help.value = (f"<small>{html.escape(entry.arch.upper())}, {html.escape(entry.prediction)}, "
                                f"{entry.resolution} px; licence {html.escape(entry.licence)}. "
                                f"{html.escape(entry.notes + extra)}</small>")

    def _show_base_model(self) -> None:
        from nbkit.models.catalog import base_model

        if self.base_menu is None:
            return
        entry = base_model(self.controls["pretrained_model_name_or_path"].input.value.strip())
        with self.base_menu.hold_trait_notifications():
            self.base_menu.unobserve_all("value")
            self.base_menu.value = entry.key if entry else ""
            self.base_menu.observe(lambda c: self.use_base_model(c["new"]) if c["new"] else None, names="value")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ values
    def set_config(self, config: Any) -> None:
        """Show ``config``'s values (an object of the form's class)."""
        if not isinstance(config, self.cls):
            raise TypeError(f"this form edits {self.cls.__name__}, got {type(config).__name__}")
        self._holding = True
        try:
            for name, control in self.controls.items():
                control.set(getattr(config, name))
        finally:
            self._holding = False
        self.message.value = ""
        self._show_base_model()
        if hasattr(self, "method"):  # not while __init__ builds the form
            self.update_hints()

    def apply_preset(self, name: str) -> None:
        """Set the preset's values in the form (the other fields keep theirs), as ``apply_preset``."""
        preset = PRESETS[name] if name in PRESETS else self._presets([name])[0]
        for key, value in preset.values.items():
            if key in self.controls:
                self.controls[key].set(value)
        self.preset_help.value = f"<small>{html.escape(preset.description)}</small>"

    def _on_preset(self, change) -> None:
        if change["new"] != NO_PRESET:
            self.apply_preset(change["new"])

    def config(self, check: bool = True) -> Any:
        """The config the form shows. Invalid fields get a message next to them and raise
        :class:`ConfigError`; ``check`` also runs the trainer's whole-config checks."""
        values, errors = {}, {}
        for name, control in self.controls.items():
            control.clear()
            try:
                values[name] = control.get()
            except ValueError as err:
                errors[name] = str(err)
        if not errors:
            try:
                return self._build(values, check)
            except ConfigError as err:
                errors[self._field_named_in(str(err))] = str(err)
        for name, text in errors.items():
            if name in self.controls:
                self.controls[name].show_error(text)
        lines = [f"{name}: {text}" if name in self.controls else text for name, text in errors.items()]
        self._show_message(lines, error=True)
        raise ConfigError("the form has invalid settings:\n" + "\n".join(lines))

    def _build(self, values: dict[str, Any], check: bool) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = from_dict(self.cls, values, where="form")
            for run_check in config_checks(self.cls) if check else []:
                run_check(config)
        self._show_message([str(w.message) for w in caught], error=False)
        return config

    def _field_named_in(self, text: str) -> str:
        """The field a whole-config error names first ('' when none)."""
        found = [(m.start(), name) for name in self.controls for m in [re.search(rf"\b{name}\b", text)] if m]
        return min(found)[1] if found else ""

    def _show_message(self, lines: list[str], error: bool) -> None:
        if not lines:
            self.message.value = ""
            return
        style = ERROR_STYLE if error else "color:#8a6d00"
        head = "Fix the marked settings:" if error else "Note:"
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        self.message.value = f"<div style='{style}'><b>{head}</b><ul style='margin:2px 0'>{items}</ul></div>"

    @property
    def errors(self) -> dict[str, str]:
        """Messages shown next to fields, by field name."""
        return {name: c.error for name, c in self.controls.items() if c.error}

    # ------------------------------------------------------------------ files
    def _path(self, path: str | Path | None) -> Path:
        if path is not None:
            self.path_text.value = str(path)
        if not self.path_text.value.strip():
            raise ConfigError("no file: enter a path such as run.toml next to Save/Load")
        return Path(self.path_text.value.strip()).expanduser()

    def save(self, path: str | Path | None = None) -> Path:
        """Write the config as TOML (kohya option names). Dataset tables already in the file are kept."""
        from nbkit.train.run_file import run_config_dict

        target = self._path(path)
        config = self.config()
        datasets = flatten_run_toml(load_toml(target))[1] if target.is_file() else {}
        save_toml(run_config_dict(config, datasets), target)
        self.status.value = f"saved {html.escape(str(target))}"
        # TOML has no null: an unset field is left out, so reading the file gives its default.
        lost = [n for n, c in self.controls.items() if getattr(config, n) is None and c.info.default is not None]
        if lost:
            self.status.value += (f"<br><small>note: {html.escape(', '.join(lost))} unset: the file leaves "
                                  f"{'it' if len(lost) == 1 else 'them'} out, so loading gives the default</small>")
        return target

    def load(self, path: str | Path | None = None) -> Any:
        """Read a TOML file (flat, or kohya's sectioned --config_file) into the form; returns the config."""
        from nbkit.train.run_file import load_run_config

        source = self._path(path)
        config = load_run_config(source, self.cls)[0]
        self.set_config(config)
        self.status.value = f"loaded {html.escape(str(source))}"
        return config

    def _button(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except ConfigError as err:
            self.status.value = f"<span style='{ERROR_STYLE}'>{html.escape(str(err))}</span>"


# ----------------------------------------------------------------------------- hint arithmetic
HINT_INPUTS = ("learning_rate", "optimizer_type", "max_train_steps", "max_train_epochs", "train_batch_size",
               "dataset_config", "train_data_dir", "resolution", "gradient_accumulation_steps")
ADAPTIVE = ("prodigy", "dadapt")  # optimizers that find their own step size: learning_rate is a multiplier


@dataclass(frozen=True)
class DatasetCounts:
    """What one epoch of a dataset is: images, images × repeats, the batch size(s), optimizer steps."""

    images: int
    samples: int  # images x repeats
    batch: str  # "2", or "1/2" when the datasets differ
    steps_per_epoch: int

    def line(self) -> str:
        simple = math.ceil(self.samples / int(self.batch)) if self.batch.isdigit() else None
        rounding = "" if simple in (None, self.steps_per_epoch) else " (aspect-ratio buckets round up each bucket)"
        return (f"{self.images} images × repeats = {self.samples} images per epoch / batch {self.batch} = "
                f"{self.steps_per_epoch} steps per epoch{rounding}")


def count_dataset(source: str | Path, resolution: int | None, batch_size: int | None,
                  gradient_accumulation_steps: int = 1) -> DatasetCounts:
    """Count a dataset TOML or image folder as the trainer does (kohya's images × repeats / batch)."""
    from nbkit.data.check import load_datasets
    from nbkit.data.train_data import collect_items, steps_per_epoch

    specs = load_datasets(Path(source).expanduser(), resolution, batch_size)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pre-flight check and the trainer report these
        items = collect_items(specs, 0)[0]
    items = [it for it in items if not it.subset.is_reg]
    batches = sorted({ds.batch_size for ds in specs})
    return DatasetCounts(len(items), sum(it.repeats for it in items), "/".join(map(str, batches)),
                         steps_per_epoch(items, None, gradient_accumulation_steps))


def steps_hint(counts: DatasetCounts | None, max_train_steps: int | None, max_train_epochs: int | None) -> str:
    """Next to max_train_steps: what the steps are in epochs of this dataset."""
    if counts is None:
        return "steps per epoch = images × repeats / batch size (the dataset is not known yet)"
    if max_train_epochs:
        return f"{counts.line()}; max_train_epochs is set, so it decides (not this field)"
    if not max_train_steps:
        return counts.line()
    epochs = max_train_steps / max(1, counts.steps_per_epoch)
    return f"{counts.line()}: {max_train_steps} steps = {epochs:.3g} epochs"


def epochs_hint(counts: DatasetCounts | None, max_train_epochs: int | None) -> str:
    """Next to max_train_epochs: the steps the epochs make (when set)."""
    if not max_train_epochs:
        return "unset: max_train_steps decides the length" if counts is not None else ""
    if counts is None:
        return f"{max_train_epochs} epochs × steps per epoch (the dataset is not known yet)"
    total = max_train_epochs * counts.steps_per_epoch
    return f"{max_train_epochs} epochs × {counts.steps_per_epoch} steps = {total} steps (replaces max_train_steps)"


def learning_rate_hint(optimizer: str | None, learning_rate: Any, method: str | None) -> tuple[str, bool]:
    """(the line next to learning_rate, whether it is a warning): what the optimizer expects."""
    name = str(optimizer or "AdamW")
    try:
        rate = float(str(learning_rate).strip()) if learning_rate is not None else None
    except ValueError:
        rate = None  # an A1111 schedule string (hypernetworks)
    if any(name.lower().startswith(a) for a in ADAPTIVE):
        advice = f"{name} finds its own step size: learning_rate (and unet_lr/text_encoder_lr) = 1.0"
        return (advice + f", not {learning_rate}", True) if rate is not None and not 0.1 <= rate <= 10 else (advice, False)
    if name.lower().startswith("adafactor"):
        return ("Adafactor: with relative_step (the default) it sets its own rate; with relative_step=False use "
                "about 1e-4 for a LoRA and a constant schedule", False)
    typical, text = ADAM_RATES.get(method or "lora", ADAM_RATES["lora"])
    lion = name.lower().startswith(("lion", "pagedlion"))
    if lion:
        typical, text = f"{float(typical) / 5:.0e}", f"3-10 times lower than AdamW's {text}"
    advice = f"{name}: usually {text}"
    if rate is not None and rate >= 0.1 and method != "textual_inversion":
        return f"{advice}; {learning_rate} is a Prodigy/DAdapt value: with {name} it diverges (NaN)", True
    if rate is not None and rate > 0 and not 0.05 <= rate / float(typical) <= 20:
        return f"{advice}; {learning_rate} is far from that", True
    return advice, False
