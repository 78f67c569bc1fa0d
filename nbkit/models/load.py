"""Load a Stable Diffusion 1.x/2.x pipeline from wherever the user's model lives.

``load_pipeline(name)`` accepts a local diffusers folder, a Hugging Face repo id, an https URL
to a ``.safetensors``/``.ckpt`` file, or a local original-layout single file. Single files load
offline through ``StableDiffusionPipeline.from_single_file(path, config=<local folder>)``; the
folder is ``config_dir`` if given, else the one embedded in nbkit's own files
(``nbkit.diffusers_config`` metadata), else the shipped SD1.5 / SD2.1-base / SD2.1-v config
picked from the file's keys. Before loading, the file's tensor shapes are checked against that
config, so a model that does not fit (inpainting, SDXL, odd sizes) fails with a clear message
instead of a diffusers traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nbkit.config import ConfigError
from nbkit.formats.ldm_checkpoint import (
    CONFIG_METADATA_KEY,
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    UNET_PREFIX,
    inspect_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from nbkit.models.config_dirs import config_dir_from_payload, shipped_config_dir
from nbkit.models.download import (
    REPO_ID,
    download_url,
    hub_repo_from_url,
    hub_snapshot,
    is_url,
)

logger = logging.getLogger(__name__)

SD2_BASE_GLOBAL_STEP = "875000"  # global_step of Stability's 512-base-ema.ckpt (SD2.0-base, epsilon)


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """The base model named by the user is not there: a message for ``nbkit`` (a ConfigError) that
    callers catching ``FileNotFoundError`` still catch."""


@dataclass
class ModelInfo:
    """What was loaded: architecture, prediction type, and where it came from."""

    arch: str  # "sd15" | "sd21" | "sd21-v"
    v2: bool
    v_parameterization: bool
    source: str  # "diffusers" | "hub" | "url" | "single_file"
    path: str  # local folder or file that was read
    name: str = ""  # what the caller passed
    config_dir: str | None = None  # diffusers config folder used for a single file
    config_source: str | None = None  # "config_dir" | "embedded" | "shipped"
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)
    _sha256: str | None = field(default=None, init=False, repr=False)

    @property
    def is_single_file(self) -> bool:
        return Path(self.path).is_file()

    def sha256(self) -> str | None:
        """sha256 of the single file (reads the whole file once; cached). None for folders."""
        if self._sha256 is None and self.is_single_file:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def shorthash(self) -> str | None:
        """A1111's checkpoint short hash (first 10 hex digits of the file's sha256)."""
        full = self.sha256()
        return None if full is None else full[:10]

    def legacy_hash(self) -> str | None:
        """A1111's old ``model_hash`` (sha256 of 64 KiB at offset 1 MiB, 8 hex digits); cheap."""
        if not self.is_single_file:
            return None
        with open(self.path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def arch_name(v2: bool, v_parameterization: bool) -> str:
    return ("sd21-v" if v_parameterization else "sd21") if v2 else "sd15"


# ----------------------------------------------------------------------------- detection


def detect_v2(shapes: dict[str, tuple[int, ...]], path: str | Path) -> bool:
    """SD2 (OpenCLIP text encoder) vs SD1 (CLIP-L) from an original-layout file's keys."""
    keys = shapes.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ConfigError(f"{path}: SDXL is not supported yet (found conditioner.embedders.* keys); use an SD1.x/SD2.x model")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ConfigError(
            f"{path}: no model.diffusion_model.* keys, so not an SD1/SD2 checkpoint "
            "(a LoRA, VAE, embedding or another architecture?)"
        )
    if any(k.startswith(SD2_TE_PREFIX) for k in keys):
        return True
    if any(k.startswith(SD1_TE_PREFIX + "text_model.") for k in keys):
        return False
    if any(k.startswith(SD1_TE_PREFIX) for k in keys):
        raise ConfigError(
            f"{path}: old text-encoder layout (cond_stage_model.transformer.* without text_model.) that "
            "diffusers cannot read; re-save the checkpoint with A1111 or kohya, or pass a diffusers folder"
        )
    raise ConfigError(f"{path}: no text encoder (cond_stage_model.*) in the file; nbkit needs a full checkpoint")


def _prediction_from_metadata(meta: dict[str, str]) -> bool | None:
    """``modelspec.prediction_type``, else the ``-v`` suffix of an SD2 ``modelspec.architecture``."""
    value = meta.get("modelspec.prediction_type")
    if value:
        return {"v": True, "v_prediction": True, "epsilon": False}.get(value)
    architecture = meta.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2"):
        return architecture.split("/")[0].endswith("-v")
    return None


def _prediction_from_config(folder: Path) -> bool | None:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("prediction_type", "epsilon") == "v_prediction"


def _pipeline_is_v2(pipe: Any) -> bool:
    act = getattr(pipe.text_encoder.config, "hidden_act", None)
    if act in ("gelu", "quick_gelu"):
        return act == "gelu"
    return int(pipe.unet.config.cross_attention_dim) == 1024


# ----------------------------------------------------------------------------- U-Net input check

FIRST_CONV = UNET_PREFIX + "input_blocks.0.0.weight"
_UNET_KINDS = {9: "an inpainting model", 8: "an instruct-pix2pix model"}


def check_text_to_image(in_channels: int | None, path: str | Path) -> None:
    """Refuse a U-Net that does not take the 4 latent channels of a text-to-image model: inpainting
    (9 = latents + masked-image latents + mask) and instruct-pix2pix (8) models cannot be trained or
    sampled as text-to-image models. Read from the header or config, before anything is built."""
    if in_channels is None or in_channels == 4:
        return
    kind = _UNET_KINDS.get(in_channels, "not a text-to-image model")
    raise ConfigError(
        f"{path}: {kind} ({in_channels} input channels in the U-Net's first convolution; a text-to-image model "
        "has 4): inpainting and instruct-pix2pix models aren't supported for training or previews; use the base "
        "model it was made from (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 instead of "
        "stable-diffusion-v1-5/stable-diffusion-inpainting); a LoRA trained on the base model also works with its "
        "inpainting version"
    )


def _folder_in_channels(folder: Path) -> int | None:
    config = folder / "unet" / "config.json"
    try:
        return int(json.loads(config.read_text()).get("in_channels", 4))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # diffusers reports a missing or broken config itself


# ----------------------------------------------------------------------------- shape check


def expected_shapes(config_dir: str | Path, v2: bool) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape predicted from a diffusers config folder (built on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = Path(config_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    out = unet_to_ldm(unet.state_dict(), unet.config)
    out.update(vae_to_ldm(vae.state_dict(), vae.config))
    out.update(text_encoder_to_ldm(te.state_dict(), v2=v2, extras=False))
    return {k: tuple(v.shape) for k, v in out.items()}


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_shapes(path: str | Path, shapes: dict[str, tuple[int, ...]], config_dir: Path, v2: bool, how: str) -> None:
    """Raise a clear error if the file's tensors do not fit the config diffusers will build."""
    expected = expected_shapes(config_dir, v2)
    wrong, missing = [], []
    for key, shape in expected.items():
        found = shapes.get(key)
        if found is None:
            missing.append(key)
        elif found != shape and not (".mid.attn_1." in key and _squeezed(found) == _squeezed(shape)):
            wrong.append(f"{key}: file {found} vs config {shape}")
    if not wrong and not missing:
        return
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} tensor shape(s) differ, e.g. {'; '.join(wrong[:3])}")
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    raise ConfigError(
        f"{path} does not fit the {how} config {config_dir}: {' and '.join(problems)}. "
        "Pass config_dir=<a diffusers model folder with matching unet/vae/text_encoder configs> "
        "(e.g. the diffusers version of the model it was fine-tuned from)"
    )


# ----------------------------------------------------------------------------- loaders


def _set_prediction(pipe: Any, v_parameterization: bool) -> None:
    wanted = "v_prediction" if v_parameterization else "epsilon"
    if pipe.scheduler.config.get("prediction_type", "epsilon") != wanted:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=wanted)


def _check_loaded(pipe: Any, path: str | Path) -> None:
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        bad = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if bad:
            raise ConfigError(f"{path}: {name} weights missing from the file (e.g. {bad[:3]}); is it a full checkpoint?")


def _pipeline_kwargs(torch_dtype: torch.dtype) -> dict:
    return {
        "dtype": torch_dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
        "local_files_only": True,
    }


def _load_folder(folder: Path, v2: bool | None, v_param: bool | None, torch_dtype: torch.dtype, info: dict):
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{folder}: a folder without model_index.json is not a diffusers model; pass a diffusers "
            "model folder or a single .safetensors/.ckpt file"
        )
    check_text_to_image(_folder_in_channels(folder), folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **_pipeline_kwargs(torch_dtype))
    notes = []
    detected_v2 = _pipeline_is_v2(pipe)
    if v2 is not None and v2 != detected_v2:
        notes.append(f"v2={v2} given, but the text encoder looks like {'SD2' if detected_v2 else 'SD1'}")
        logger.warning("%s: %s", folder, notes[-1])
    v2 = detected_v2 if v2 is None else v2
    if v_param is None:
        v_param = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    _set_prediction(pipe, v_param)
    return pipe, ModelInfo(arch_name(v2, v_param), v2, v_param, path=str(folder), notes=notes, **info)


def _choose_config(path: Path, meta: dict, config_dir: str | None, cache_dir: str | None) -> tuple[Path | None, str]:
    if config_dir is not None:
        folder = Path(config_dir)
        if not (folder / "model_index.json").is_file():
            raise ModelNotFoundError(f"config_dir {folder}: no model_index.json there; pass a diffusers model folder")
        return folder, "config_dir"
    if CONFIG_METADATA_KEY in meta:
        return config_dir_from_payload(meta[CONFIG_METADATA_KEY], cache_dir), "embedded"
    return None, "shipped"


def _single_file_prediction(v2: bool, meta: dict, folder: Path | None, notes: list[str]) -> bool:
    from_meta = _prediction_from_metadata(meta)
    if from_meta is not None:
        return from_meta
    from_config = _prediction_from_config(folder) if folder is not None else None
    if from_config is not None:
        return from_config
    if not v2:
        return False
    if meta.get("global_step") == SD2_BASE_GLOBAL_STEP:
        notes.append("SD2 checkpoint with global_step 875000 (the 512-base release): epsilon prediction")
        return False
    notes.append(
        "SD2 checkpoint without prediction metadata: assuming v-prediction (768-v); "
        "pass v_parameterization=False for 512-base models"
    )
    logger.warning("%s", notes[-1])
    return True


def _load_single_file(
    path: Path, v2: bool | None, v_param: bool | None, config_dir: str | None, torch_dtype, cache_dir, info: dict,
):
    from diffusers import StableDiffusionPipeline

    shapes, meta = inspect_single_file(path)
    first_conv = shapes.get(FIRST_CONV)
    if first_conv is not None and len(first_conv) == 4:
        check_text_to_image(first_conv[1], path)
    notes: list[str] = []
    detected_v2 = detect_v2(shapes, path)
    if v2 is not None and v2 != detected_v2:
        notes.append(f"v2={v2} given, but the file's text encoder keys are {'SD2' if detected_v2 else 'SD1'}")
        logger.warning("%s: %s", path, notes[-1])
    v2 = detected_v2 if v2 is None else v2
    folder, how = _choose_config(path, meta, config_dir, cache_dir)
    if v_param is None:
        v_param = _single_file_prediction(v2, meta, folder, notes)
    arch = arch_name(v2, v_param)
    if folder is None:
        folder = shipped_config_dir(arch, cache_dir)
    check_shapes(path, shapes, folder, v2, how)
    del shapes
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), **_pipeline_kwargs(torch_dtype))
    _check_loaded(pipe, path)
    _set_prediction(pipe, v_param)
    model_info = ModelInfo(arch, v2, v_param, path=str(path), config_dir=str(folder), config_source=how, **info)
    model_info.metadata, model_info.notes = dict(meta), notes
    return pipe, model_info


def resolve(name: str, cache_dir: str | None = None) -> tuple[str, Path]:
    """``(source kind, local path)`` for a folder, file, repo id or URL (downloading if needed)."""
    if os.path.exists(name):
        path = Path(name)
        return ("diffusers" if path.is_dir() else "single_file"), path
    if is_url(name):
        repo = hub_repo_from_url(name)
        if repo is not None:
            return "hub", hub_snapshot(repo, cache_dir)
        return "url", download_url(name, cache_dir)
    if REPO_ID.match(name) and not name.lower().endswith((".safetensors", ".ckpt")):
        return "hub", hub_snapshot(name, cache_dir)
    raise ModelNotFoundError(
        f"{name}: not a local file or folder, an https:// URL, or a Hugging Face repo id like "
        "'stabilityai/stable-diffusion-2-1-base'"
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
):
    """Load an SD1.x/SD2.x ``StableDiffusionPipeline`` (no safety checker); return ``(pipe, ModelInfo)``.

    ``v2``/``v_parameterization`` override detection. ``config_dir`` is the diffusers folder used for
    a single file's configs and tokenizer. ``cache_dir`` is the Hugging Face cache for repo ids and
    the root for URL downloads and rebuilt config folders (default ``~/.cache/nbkit``).
    Inpainting / instruct-pix2pix U-Nets are refused with a :class:`ConfigError` before anything is built.
    """
    name = os.fspath(pretrained_model_name_or_path)
    kind, path = resolve(name, cache_dir)
    info = {"source": kind, "name": name}
    if path.is_dir():
        return _load_folder(path, v2, v_parameterization, torch_dtype, info)
    return _load_single_file(path, v2, v_parameterization, config_dir, torch_dtype, cache_dir, info)
