"""What the estimator is asked about (:class:`Setting`, kohya option names) and what it answers
(:class:`Estimate`), plus the GPUs it knows.

Units: every ``*_gib`` number is GiB (2**30 bytes), the unit of ``nvidia-smi``'s MiB / 1024 and of
Colab's "15 GiB" T4. Published "GB" figures are 10**9 bytes (see ``nbkit.estimate.calibration``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GIB = 2**30
GB = 10**9
METHODS = ("lora", "dreambooth", "hypernetwork")
ARCHS = ("sd15", "sd21", "sd21-v", "sdxl")


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what nvidia-smi reports as total (MiB / 1024)
    fp16_tflops: float  # dense fp16 tensor-core peak
    bandwidth_gbs: float  # memory bandwidth, GB/s


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("T4", 15.0, 65.0, 320.0),  # 15360 MiB; Turing sm_75, no bf16
    GPU("L4", 22.0, 121.0, 300.0),  # 22.5 GiB on Colab (23034 MiB); 22 keeps a margin
    GPU("V100", 16.0, 125.0, 900.0),  # 16 GB SXM2
    GPU("A100-40GB", 40.0, 312.0, 1555.0),
    GPU("A100-80GB", 80.0, 312.0, 2039.0),
)}
#: GPU name -> memory the estimator may plan for, GiB
GPU_MEMORY_GIB: dict[str, float] = {name: gpu.memory_gib for name, gpu in GPUS.items()}


# Setting's fields in order. A "Class.option" string mirrors that option of a training config class:
# its name, type, default and help come from the config, so a changed default there is the
# estimator's default too. A tuple is a field the estimator declares for itself.
# A new memory-relevant option is one more "Class.option" line plus what the simulation does with it.
_LAYOUT: tuple = (
    ("method", str),  # lora | dreambooth | hypernetwork
    ("arch", str, field(default="sd15")),  # sd15 | sd21 | sd21-v | sdxl
    "TrainConfig.resolution",
    "TrainConfig.train_batch_size",
    "TrainConfig.gradient_checkpointing",
    "TrainConfig.optimizer_type",
    "TrainConfig.mixed_precision",
    "DreamBoothTrainConfig.train_text_encoder",  # LoRA's: not network_train_unet_only
    "LoRATrainConfig.network_dim",
    "LoRATrainConfig.conv_dim",
    "LoRATrainConfig.network_module",  # networks.lora | lycoris.kohya
    "LoRATrainConfig.network_args",  # ["algo=lokr", "factor=8", "dora_wd=True"] there, a tuple here (hashable)
    "DreamBoothTrainConfig.use_ema",
    "TrainConfig.cache_latents",
    "TrainConfig.cache_text_encoder_outputs",
    "TrainConfig.gradient_accumulation_steps",
    # diffusers/ShivamShrirao DreamBooth: each step's batch is train_batch_size instance images plus as
    # many class images, so the U-Net sees twice the batch. nbkit (like kohya) shuffles class images into
    # the same batches instead: leave it False for nbkit runs.
    ("with_prior_preservation", bool, field(default=False)),
    "DreamBoothTrainConfig.ema_on_cpu",
    "TrainConfig.sdpa",
    # kohya --full_fp16: trainable weights in fp16 too (no fp32 master weights); no nbkit option
    ("full_fp16", bool, field(default=False)),
    "TrainConfig.max_token_length",
    "HypernetworkTrainConfig.layer_structure",  # "1, 2, 1" there, (1.0, 2.0, 1.0) here (hashable)
    # None: torch's default on a GPU (foreach optimizers, torch >= 2.0); False: the one-tensor-at-a-time
    # loop of torch 1.12 (the published T4 table was measured with it).
    ("foreach", "bool | None", field(default=None)),
    # simulate another U-Net (a diffusers config); unet_config_key, its digest (set automatically), is
    # what equality and the estimate cache compare
    ("unet_config", "dict | None", field(default=None, compare=False, hash=False)),
    ("unet_config_key", "str | None", field(default=None)),
)
_MIRRORS = [e if isinstance(e, str) else e[2].metadata.get("mirrors") if len(e) > 2 else None for e in _LAYOUT]
#: option name -> the config class whose field a Setting mirrors
MIRRORED: dict[str, str] = {m.split(".")[1]: m.split(".")[0] for m in _MIRRORS if m}


def parse_layer_structure(structure) -> tuple[float, ...]:
    """A hypernetwork ``layer_structure`` ("1, 2, 1", a list or a tuple) as a tuple of floats."""
    if isinstance(structure, str):
        structure = [x for x in structure.strip("[]() ").split(",") if x.strip()]
    return tuple(float(x) for x in structure)


def _config_classes() -> dict[str, type]:
    from nbkit.train.config import LoRATrainConfig, TrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    return {cls.__name__: cls for cls in (TrainConfig, LoRATrainConfig, DreamBoothTrainConfig, HypernetworkTrainConfig)}


def _mirrored_field(entry: str, classes: dict[str, type]) -> tuple[str, object, dataclasses.Field]:
    """(name, type, field) of a "Class.option" entry of :data:`_LAYOUT`, from the config class."""
    owner, name = entry.split(".")
    spec = {f.name: f for f in dataclasses.fields(classes[owner])}.get(name)
    if spec is None:
        raise TypeError(f"nbkit.estimate.Setting mirrors {entry}, which no longer exists: update "
                        "nbkit.estimate.setting._LAYOUT")
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    kind = spec.type
    if name == "layer_structure":
        default, kind = parse_layer_structure(default), "tuple[float, ...]"
    if name == "network_args":
        kind = "tuple[str, ...] | None"
    return name, kind, field(default=default, metadata={**spec.metadata, "mirrors": entry})


class _SettingMethods:
    """The behaviour of :class:`Setting` (its fields are made below)."""

    def __post_init__(self) -> None:
        if self.network_args is not None and not isinstance(self.network_args, tuple):
            object.__setattr__(self, "network_args", tuple(self.network_args))  # a list from a config
        if self.network_module is None:  # DreamBooth's "no network": a LoRA setting means kohya's LoRA
            object.__setattr__(self, "network_module", "networks.lora")
        if self.unet_config is not None and self.unet_config_key is None:
            object.__setattr__(self, "unet_config_key", _digest(self.unet_config))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.mixed_precision not in ("fp16", "bf16", "no"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose fp16, bf16 or no")
        if self.resolution % 64 or self.resolution < 64:
            raise ValueError(f"resolution={self.resolution}: use a multiple of 64")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("train_batch_size and gradient_accumulation_steps must be at least 1")

    @property
    def lycoris(self) -> bool:
        """A LyCORIS network (``network_module = "lycoris.kohya"``: LoHa, LoKr, LoCon, DoRA)."""
        return self.method == "lora" and self.network_module == "lycoris.kohya"

    @property
    def unet_batch(self) -> int:
        return self.train_batch_size * (2 if self.with_prior_preservation else 1)

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder and self.method != "hypernetwork"

    @property
    def text_encoder_on_gpu(self) -> bool:
        """A frozen text encoder with cached outputs leaves the GPU (nbkit, kohya, A1111)."""
        return self.trains_text_encoder or not self.cache_text_encoder_outputs

    def replace(self, **changes) -> Setting:
        if "unet_config" in changes:
            changes.setdefault("unet_config_key", None)
        return dataclasses.replace(self, **changes)


def _make_setting() -> type:
    classes = _config_classes()
    fields = [_mirrored_field(entry, classes) if isinstance(entry, str) else entry for entry in _LAYOUT]
    doc = ("One training step to simulate. Its training options (:data:`MIRRORED`) are fields of nbkit's "
           "config dataclasses (kohya names) with their types, defaults and help; the others are the "
           "estimator's own.")
    return dataclasses.make_dataclass("Setting", fields, bases=(_SettingMethods,), frozen=True,
                                      namespace={"__doc__": doc, "__module__": __name__})


Setting = _make_setting()


def _digest(config: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Estimate:
    """Simulated peak GPU memory of one training step, with its parts (GiB)."""

    peak_gib: float
    breakdown: dict[str, float]
    setting: Setting
    notes: list[str] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)  # parameter counts ("trainable")

    @property
    def peak_gb(self) -> float:
        return self.peak_gib * GIB / GB

    def fits(self, gpu_gib: float, headroom_gib: float = 1.0) -> bool:
        return self.peak_gib + headroom_gib <= gpu_gib

    def summary(self) -> str:
        s = self.setting
        text = s.trains_text_encoder
        head = (f"{s.method} {s.arch} {s.resolution}px batch {s.train_batch_size}"
                f"{f' x{s.gradient_accumulation_steps} accumulation' if s.gradient_accumulation_steps > 1 else ''}, "
                f"{s.optimizer_type}, mixed_precision={s.mixed_precision}, gradient checkpointing "
                f"{'on' if s.gradient_checkpointing else 'off'}, text encoder "
                f"{'trained' if text else 'cached (off the GPU)' if not s.text_encoder_on_gpu else 'frozen'}")
        if s.method == "lora":
            head += f", network_dim {s.network_dim}" + (f", conv_dim {s.conv_dim}" if s.conv_dim else "")
            if s.lycoris:
                head += ", lycoris.kohya " + " ".join(s.network_args or ("algo=lora",))
        parts = {name: value for name, value in self.breakdown.items() if value >= 0.005}
        width = max(map(len, parts), default=4)
        lines = [head, f"  {'part':<{width}}    GiB"]
        lines += [f"  {name:<{width}} {value:6.2f}" for name, value in parts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  peak {self.peak_gib:.2f} GiB = {self.peak_gb:.2f} GB (10^9 bytes, the unit of published tables)")
        lines.append(f"peak={self.peak_gb:.2f}")  # GB: the last line, easy to parse
        return "\n".join(lines)


def micro_setting(setting: Setting) -> Setting:
    """The part of ``setting`` one forward + backward depends on (optimizer and accumulation do not)."""
    return setting.replace(optimizer_type="AdamW8bit", foreach=None, gradient_accumulation_steps=1, use_ema=False,
                           ema_on_cpu=True, train_batch_size=setting.unet_batch, with_prior_preservation=False)


def setting_from_config(config, method: str | None = None, arch: str | None = None) -> Setting:
    """A :class:`Setting` from any of the three training configs: every :data:`MIRRORED` option the
    config has, read as the trainer reads it.

    ``arch`` defaults to ``"sdxl"`` when the base model is an SDXL model on disk
    (:func:`nbkit.estimate.arch.config_arch`), else ``"sd15"``, or ``"sd21-v"``/``"sd21"`` when the
    config's ``v2`` / ``v_parameterization`` fields say so."""
    from nbkit.estimate.arch import config_arch

    method = method or method_of(config)
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    if arch is None:
        arch = config_arch(config)
    values = {name: get(name) for name in MIRRORED if hasattr(config, name)}
    # what the trainers make of some options
    if method == "lora":  # LoRATrainConfig.train_text_encoder: not network_train_unet_only
        values["train_text_encoder"] = bool(get("train_text_encoder", not get("network_train_unet_only", False)))
    elif method == "dreambooth":  # stop_text_encoder_training may keep it from training at all
        values["train_text_encoder"] = bool(get("trains_text_encoder", get("train_text_encoder", False)))
    else:
        values["train_text_encoder"] = False
    if method == "hypernetwork":  # the trainer moves the text encoder off when every prompt is fixed
        values["cache_text_encoder_outputs"] = not (get("shuffle_tags", False) or get("tag_drop_out", 0.0))
    if method == "dreambooth" and get("network_module"):
        method = "lora"  # "LoRA via DreamBooth" trains a LoRA
    if not values.get("network_dim"):
        values.pop("network_dim", None)
    if values.get("network_args") is not None:
        values["network_args"] = tuple(values["network_args"])
        if values.get("network_module", "networks.lora") == "networks.lora" and not values.get("conv_dim"):
            # kohya's networks.lora reads conv_dim from network_args too (nbkit.networks.lora does)
            given = dict(a.split("=", 1) for a in values["network_args"] if "=" in a)
            if given.get("conv_dim", "").strip().isdigit():
                values["conv_dim"] = int(given["conv_dim"])
    values["sdpa"] = bool(get("sdpa", True) or get("xformers", False))  # xformers: the same kind of kernel
    if hasattr(config, "full_fp16"):  # kohya's option (no nbkit config has it)
        values["full_fp16"] = bool(config.full_fp16)
    if "layer_structure" in values:
        values["layer_structure"] = parse_layer_structure(values["layer_structure"])
    return Setting(method=method, arch=arch, **values)


def method_of(config) -> str:
    """lora / dreambooth / hypernetwork from the config class."""
    name = type(config).__name__.lower()
    for method in ("hypernetwork", "dreambooth", "lora"):
        if method in name:
            return method
    raise ValueError(f"cannot tell the training method of {type(config).__name__}: pass method=")
