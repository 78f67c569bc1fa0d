"""Metadata of kohya LoRA files: the ``ss_*`` training keys and the ``modelspec.*`` keys (spec §1.5).

Every value is a ``str``, as kohya writes them: ``str(v)`` of the raw value (so an unset value
is ``"None"``), JSON for ``ss_tag_frequency``/``ss_dataset_dirs``/``ss_network_args``, and the
modelspec block of ``sai_model_spec.build_metadata`` for an SD1/SD2 LoRA.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# arch -> (ss_base_model_version, v2, v_parameterization, modelspec architecture, default resolution)
_ARCHS: dict[str, tuple[str, bool, bool, str, int]] = {
    "sd15": ("sd_v1", False, False, "stable-diffusion-v1", 512),
    "sd21": ("sd_v2", True, False, "stable-diffusion-v2-512", 512),
    "sd21-v": ("sd_v2_v", True, True, "stable-diffusion-v2-768-v", 768),
    "sdxl": ("sdxl_base_v1-0", False, False, "stable-diffusion-xl-v1-base", 1024),
}
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
REQUIRED_KEYS = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_v2",
    "ss_output_name", "ss_steps", "ss_epoch", "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr",
    "ss_resolution", "ss_num_train_images", "ss_tag_frequency", "ss_dataset_dirs", "ss_clip_skip",
    "ss_mixed_precision", "ss_seed", "ss_optimizer", "ss_training_started_at", "ss_training_finished_at",
    "ss_sd_model_name", "ss_noise_offset", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.title", "modelspec.resolution", "modelspec.date",
    "modelspec.prediction_type",
)  # fmt: skip


@dataclass
class LoraTrainingInfo:
    """What a trainer knows about a LoRA run; :func:`build_metadata` turns it into file metadata.

    ``arch``: ``sd15`` | ``sd21`` | ``sd21-v`` | ``sdxl``. ``resolution``: an int or ``(width, height)``.
    ``tag_frequency``: ``{dataset_dir_name: {tag: count}}``; ``dataset_dirs``:
    ``{dataset_dir_name: {"n_repeats": r, "img_count": n}}``. ``extra``: further ``ss_*`` keys.
    """

    arch: str = "sd15"
    network_module: str = "networks.lora"  # kohya network_module (ss_network_module)
    network_dim: int | str = 4  # "Dynamic" when the modules' ranks differ (kohya resize_lora)
    network_alpha: float | str = 1.0
    conv_dim: int | str | None = None
    conv_alpha: float | str | None = None
    network_args: Mapping[str, Any] | None = None
    output_name: str = "lora"
    steps: int = 0
    epoch: int = 0
    max_train_steps: int | None = None
    num_epochs: int | None = None
    learning_rate: float | None = None
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "torch.optim.AdamW"
    resolution: int | tuple[int, int] | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_train_images: int = 0
    num_reg_images: int = 0
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    dataset_dirs: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    clip_skip: int | None = None
    mixed_precision: str = "no"
    seed: int | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    sd_model_name: str = ""
    sd_model_hash: str | None = None
    new_sd_model_hash: str | None = None
    vae_name: str | None = None
    training_comment: str | None = None
    training_started_at: float | None = None
    training_finished_at: float | None = None
    session_id: int | None = None
    min_timestep: int | None = None
    max_timestep: int | None = None
    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    trigger_phrase: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def _resolution(info: LoraTrainingInfo, default: int) -> tuple[int, int]:
    reso = default if info.resolution is None else info.resolution
    if isinstance(reso, int):
        return (reso, reso)
    width, height = (int(x) for x in reso)
    return (width, height)


def _network_args(info: LoraTrainingInfo) -> dict[str, str]:
    """kohya stores ``--network_args k=v`` strings as a JSON object of strings."""
    args = {k: str(v) for k, v in (info.network_args or {}).items()}
    if info.conv_dim:
        args.setdefault("conv_dim", str(info.conv_dim))
        args.setdefault("conv_alpha", str(1.0 if info.conv_alpha is None else _alpha_value(info.conv_alpha)))
    return args


def _alpha_value(alpha: float | str) -> float | str:
    """kohya writes ``str(float(alpha))`` ("8.0"); "Dynamic" stays as it is."""
    return alpha if isinstance(alpha, str) else float(alpha)


@dataclass(frozen=True)
class NetworkShape:
    """Ranks and alphas a kohya LoRA file really holds (each ``"Dynamic"`` when the modules differ)."""

    network_dim: int | str
    network_alpha: float | str
    conv_dim: int | str | None = None  # 3x3 convs (LoCon); None without any
    conv_alpha: float | str | None = None

    def describe(self) -> str:
        text = f"rank {self.network_dim} / alpha {self.network_alpha}"
        return text + (f", conv rank {self.conv_dim} / alpha {self.conv_alpha}" if self.conv_dim is not None else "")


def _one_or_dynamic(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else "Dynamic"


def network_shape(shapes: Mapping[str, Sequence[int]], alphas: Mapping[str, float]) -> NetworkShape:
    """The ``ss_network_dim``/``ss_network_alpha`` and conv args of a kohya LoRA from its tensors.

    ``shapes``: key -> shape of every ``*.lora_down.weight``; ``alphas``: key -> value of every
    ``*.alpha``. As kohya ``networks/lora.py::create_network_from_weights``: the rank of a module is
    ``lora_down.shape[0]``, a missing alpha means alpha = rank; 3x3 conv modules (LoCon, kohya's
    ``conv_dim``/``conv_alpha``) are counted apart from Linear and 1x1 conv modules.
    """
    linear: dict[str, set] = {"dim": set(), "alpha": set()}
    conv: dict[str, set] = {"dim": set(), "alpha": set()}
    for key, shape in shapes.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem, rank = key.removesuffix(".lora_down.weight"), int(shape[0])
        group = conv if len(shape) == 4 and tuple(shape[2:]) != (1, 1) else linear
        group["dim"].add(rank)
        group["alpha"].add(float(alphas.get(f"{stem}.alpha", rank)))
    if not linear["dim"] and not conv["dim"]:
        raise ValueError("no lora_down weights: not a kohya LoRA")
    has_conv = bool(conv["dim"])
    return NetworkShape(
        _one_or_dynamic(linear["dim"]) if linear["dim"] else 0,
        _one_or_dynamic(linear["alpha"]) if linear["alpha"] else 0.0,
        _one_or_dynamic(conv["dim"]) if has_conv else None,
        _one_or_dynamic(conv["alpha"]) if has_conv else None,
    )


def _ss_metadata(info: LoraTrainingInfo, base_version: str, v2: bool, reso: tuple[int, int]) -> dict[str, Any]:
    started = info.training_started_at if info.training_started_at is not None else time.time()
    finished = info.training_finished_at if info.training_finished_at is not None else time.time()
    meta: dict[str, Any] = {
        "ss_session_id": info.session_id if info.session_id is not None else random.randint(0, 2**32),
        "ss_training_started_at": started,
        "ss_output_name": info.output_name,
        "ss_learning_rate": info.learning_rate,
        "ss_text_encoder_lr": info.text_encoder_lr,
        "ss_unet_lr": info.unet_lr,
        "ss_num_train_images": info.num_train_images,
        "ss_num_reg_images": info.num_reg_images,
        "ss_num_epochs": info.num_epochs,
        "ss_batch_size_per_device": info.batch_size,
        "ss_total_batch_size": info.batch_size * info.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": info.gradient_accumulation_steps,
        "ss_max_train_steps": info.max_train_steps,
        "ss_lr_warmup_steps": info.lr_warmup_steps,
        "ss_lr_scheduler": info.lr_scheduler,
        "ss_network_module": info.network_module,
        "ss_network_dim": info.network_dim,
        "ss_network_alpha": _alpha_value(info.network_alpha),
        "ss_mixed_precision": info.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": v2,
        "ss_base_model_version": base_version,
        "ss_resolution": reso,
        "ss_clip_skip": info.clip_skip,
        "ss_seed": info.seed,
        "ss_noise_offset": info.noise_offset,
        "ss_min_snr_gamma": info.min_snr_gamma,
        "ss_training_comment": info.training_comment,
        "ss_optimizer": info.optimizer,
        "ss_sd_model_name": info.sd_model_name,
        "ss_tag_frequency": json.dumps({k: dict(v) for k, v in info.tag_frequency.items()}),
        "ss_dataset_dirs": json.dumps({k: dict(v) for k, v in info.dataset_dirs.items()}),
    }
    optional = {"ss_sd_model_hash": info.sd_model_hash, "ss_new_sd_model_hash": info.new_sd_model_hash,
                "ss_vae_name": info.vae_name}  # fmt: skip
    meta.update({k: v for k, v in optional.items() if v is not None})
    network_args = _network_args(info)
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    meta.update({k if k.startswith("ss_") else f"ss_{k}": v for k, v in info.extra.items()})
    meta["ss_training_finished_at"] = finished
    meta["ss_steps"] = info.steps
    meta["ss_epoch"] = info.epoch
    return meta


def _modelspec(info: LoraTrainingInfo, arch_id: str, v_param: bool, reso: tuple[int, int], when: float) -> dict:
    """The modelspec block kohya ``sai_model_spec.build_metadata`` writes for a LoRA."""
    from nbkit._version import __version__

    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch_id}/lora",
        "modelspec.implementation": IMPL_STABILITY_AI if info.arch == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": info.title if info.title is not None else info.output_name,
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.description": info.description,
        "modelspec.author": info.author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(when)).isoformat(),
        "modelspec.implementation_version": f"nbkit/{__version__}",
        "modelspec.license": info.license,
        "modelspec.tags": info.tags,
        "modelspec.trigger_phrase": info.trigger_phrase,
        "modelspec.prediction_type": "v" if v_param else "epsilon",
        "modelspec.timestep_range": None,
        "modelspec.encoder_layer": None if info.clip_skip is None else str(info.clip_skip),
    }
    if info.min_timestep is not None or info.max_timestep is not None:
        low = info.min_timestep or 0
        high = info.max_timestep if info.max_timestep is not None else 1000
        spec["modelspec.timestep_range"] = f"{low},{high}"
    return {k: v for k, v in spec.items() if v is not None}


def build_metadata(info: LoraTrainingInfo | None = None, /, **fields: Any) -> dict[str, str]:
    """kohya-style LoRA metadata, every value a ``str``.

    Pass a :class:`LoraTrainingInfo`, keyword fields of it, or both (fields override ``info``).
    The ``sshs_*`` hashes are added by :func:`nbkit.formats.kohya_lora.save_kohya_lora`.
    """
    info = LoraTrainingInfo(**fields) if info is None else replace(info, **fields)
    if info.arch not in _ARCHS:
        raise ValueError(f"unknown arch {info.arch!r}: choose one of {', '.join(_ARCHS)}")
    base_version, v2, v_param, arch_id, default_reso = _ARCHS[info.arch]
    reso = _resolution(info, default_reso)
    meta = _ss_metadata(info, base_version, v2, reso)
    metadata = {k: str(v) for k, v in meta.items()}
    metadata.update(_modelspec(info, arch_id, v_param, reso, float(meta["ss_training_finished_at"])))
    return metadata


def file_network_shape(path) -> NetworkShape:
    """The :class:`NetworkShape` of a kohya LoRA file (header and alphas only)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys if k.endswith(".lora_down.weight")}
        alphas = {k: f.get_tensor(k).float().item() for k in keys if k.endswith(".alpha")}
    return network_shape(shapes, alphas)
