"""Load a Stable Diffusion 1.x/2.x or SDXL pipeline from wherever the user's model lives.

``load_pipeline(name)`` accepts a local diffusers folder, a Hugging Face repo id, an https URL
to a ``.safetensors``/``.ckpt`` file, or a local original-layout (LDM / SGM) single file. A single
file loads offline against a diffusers config folder: ``config_dir`` if given, else the one embedded
in nbkit's own files (``nbkit.diffusers_config`` metadata), else the shipped SD1.5 / SD2.1-base /
SD2.1-v / SDXL-base config picked from the file's keys. Before any weight is read, the file's tensor
shapes are checked against that config, so a model that does not fit (inpainting, a refiner, odd
sizes, a damaged file) fails with a clear message naming the file instead of a traceback.

Single files load RAM-bounded: the modules are built on the meta device, and the tensors go one at a
time from the memory-mapped file (``safetensors.safe_open``), renamed (:mod:`nbkit.formats.sgm_checkpoint`)
and converted to their dtype and device. No second copy of the file, and no fp32 copy of an fp16 file
loaded in fp16, is held in RAM; weights already in the wanted dtype stay memory-mapped file pages until
they move to the GPU (``bench/ram_sdxl.py`` measures a full-size SDXL file).
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
from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY, SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX
from nbkit.formats.sgm_checkpoint import (
    TE1_PREFIX,
    V_PRED_KEY,
    ZTSNR_KEY,
)
from nbkit.models.config_dirs import config_dir_from_payload, shipped_config_dir
from nbkit.models.download import (
    HUB_ALLOW_PATTERNS,
    REPO_ID,
    download_url,
    hub_repo_from_url,
    hub_snapshot,
    is_url,
)
from nbkit.models.single_file import (
    FIRST_CONV,
    ModelNotFoundError,
    assemble_pipeline,
    check_shapes,
    check_text_to_image,
    expected_file_shapes,
    file_key_pairs,
    folder_in_channels,
    meta_components,
    read_file,
    stream_from,
)

logger = logging.getLogger(__name__)

SD2_BASE_GLOBAL_STEP = "875000"  # global_step of Stability's 512-base-ema.ckpt (SD2.0-base, epsilon)


@dataclass
class ModelInfo:
    """What was loaded: architecture, prediction type, and where it came from."""

    arch: str  # "sd15" | "sd21" | "sd21-v" | "sdxl"
    v2: bool  # SD2 (OpenCLIP text encoder); False for SD1 and SDXL
    v_parameterization: bool
    source: str  # "diffusers" | "hub" | "url" | "single_file"
    path: str  # local folder or file that was read
    name: str = ""  # what the caller passed
    config_dir: str | None = None  # diffusers config folder used for a single file
    config_source: str | None = None  # "config_dir" | "embedded" | "shipped"
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    notes: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # trained with a zero-terminal-SNR schedule (SDXL ``ztsnr`` marker)
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
        raise ConfigError(f"{path}: an SDXL checkpoint (conditioner.embedders.* keys) where an SD1.x/SD2.x one is "
                          "needed: use an SD1.x/SD2.x model here")
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


def is_sdxl(shapes: dict[str, tuple[int, ...]], path: str | Path) -> bool:
    """An SGM-layout SDXL base file (``conditioner.embedders.*``), from its keys; refiners are refused."""
    keys = shapes.keys()
    if not any(k.startswith("conditioner.embedders.") for k in keys):
        return False
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ConfigError(f"{path}: SDXL text encoders (conditioner.embedders.*) but no U-Net (model.diffusion_model.*); "
                          "nbkit needs a full checkpoint")  # fmt: skip
    if not any(k.startswith(TE1_PREFIX) for k in keys) and any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ConfigError(f"{path}: an SDXL refiner (one OpenCLIP text encoder, no CLIP-L): nbkit trains and samples "
                          "SDXL base models (SDXL 1.0 base, Pony, Illustrious, NoobAI...); use one of those")  # fmt: skip
    return True


def _prediction_from_metadata(meta: dict[str, str]) -> bool | None:
    """``modelspec.prediction_type``, else the ``-v`` suffix of an SD2 ``modelspec.architecture``."""
    value = meta.get("modelspec.prediction_type")
    if value:
        return {"v": True, "v_prediction": True, "epsilon": False}.get(value)
    architecture = meta.get("modelspec.architecture", "")
    if architecture.startswith("stable-diffusion-v2"):
        return architecture.split("/")[0].endswith("-v")
    return None


def _scheduler_config(folder: Path) -> dict | None:
    path = folder / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _prediction_from_config(folder: Path) -> bool | None:
    config = _scheduler_config(folder)
    return None if config is None else config.get("prediction_type", "epsilon") == "v_prediction"


def _pipeline_is_v2(pipe: Any) -> bool:
    act = getattr(pipe.text_encoder.config, "hidden_act", None)
    if act in ("gelu", "quick_gelu"):
        return act == "gelu"
    return int(pipe.unet.config.cross_attention_dim) == 1024


# ----------------------------------------------------------------------------- loaders


def _set_prediction(pipe: Any, v_parameterization: bool, zero_terminal_snr: bool = False) -> None:
    """The scheduler the previews use: prediction type, and a zero-terminal-SNR schedule when the model has one."""
    import inspect

    wanted: dict[str, Any] = {"prediction_type": "v_prediction" if v_parameterization else "epsilon"}
    if "rescale_betas_zero_snr" in inspect.signature(type(pipe.scheduler).__init__).parameters:
        wanted["rescale_betas_zero_snr"] = zero_terminal_snr
        if zero_terminal_snr:  # diffusers: rescaled betas want trailing timesteps (arXiv 2305.08891)
            wanted["timestep_spacing"] = "trailing"
    defaults = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    changes = {k: v for k, v in wanted.items() if pipe.scheduler.config.get(k, defaults.get(k)) != v}
    if changes:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **changes)


def _pipeline_kwargs(torch_dtype: torch.dtype, sdxl: bool) -> dict:
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if sdxl:
        return kwargs | {"add_watermarker": False}
    return kwargs | {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _folder_is_sdxl(folder: Path) -> bool:
    index = json.loads((folder / "model_index.json").read_text())
    if not str(index.get("_class_name", "")).startswith("StableDiffusionXL") and "text_encoder_2" not in index:
        return False
    if not (index.get("text_encoder") or [None, None])[1]:
        raise ConfigError(f"{folder}: an SDXL refiner (no CLIP-L text encoder): nbkit trains and samples SDXL base "
                          "models (SDXL 1.0 base, Pony, Illustrious, NoobAI...); use one of those")  # fmt: skip
    if not (folder / "text_encoder_2" / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: an SDXL model without text_encoder_2/ (an incomplete download?); "
                                 "download the whole repo again or pass its single .safetensors file")  # fmt: skip
    return True


def _load_folder(folder: Path, v2, v_param, ztsnr, torch_dtype, device, info: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{folder}: a folder without model_index.json is not a diffusers model; pass a diffusers "
            "model folder or a single .safetensors/.ckpt file"
        )
    check_text_to_image(folder_in_channels(folder), folder)
    sdxl = _folder_is_sdxl(folder)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder), **_pipeline_kwargs(torch_dtype, sdxl))
    if device is not None:
        pipe.to(device)
    notes = []
    detected_v2 = False if sdxl else _pipeline_is_v2(pipe)
    if v2 is not None and v2 != detected_v2:
        notes.append(f"v2={v2} given, but the text encoder looks like {'SD2' if detected_v2 else 'SD1/SDXL'}")
        logger.warning("%s: %s", folder, notes[-1])
    v2 = detected_v2 if (v2 is None or sdxl) else v2
    if v_param is None:
        v_param = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    if ztsnr is None:
        ztsnr = bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))
    _set_prediction(pipe, v_param, ztsnr)
    arch = "sdxl" if sdxl else arch_name(v2, v_param)
    return pipe, ModelInfo(arch, v2, v_param, path=str(folder), notes=notes, zero_terminal_snr=ztsnr, **info)


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


def _sdxl_prediction(shapes: dict, meta: dict, folder: Path | None, notes: list[str]) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR) of an SDXL file: ComfyUI's ``v_pred``/``ztsnr`` keys (NoobAI-XL
    v-pred carries them), else ``modelspec.prediction_type``, else the config's scheduler, else epsilon."""
    scheduler = (_scheduler_config(folder) if folder is not None else None) or {}
    ztsnr = ZTSNR_KEY in shapes or bool(scheduler.get("rescale_betas_zero_snr", False))
    if V_PRED_KEY in shapes:
        notes.append(f"'{V_PRED_KEY}' key in the file: v-prediction" + (" with zero terminal SNR" if ztsnr else ""))
        return True, ztsnr
    from_meta = _prediction_from_metadata(meta)
    if from_meta is not None:
        return from_meta, ztsnr
    return scheduler.get("prediction_type", "epsilon") == "v_prediction", ztsnr


def _load_single_file(path: Path, v2, v_param, ztsnr, config_dir, torch_dtype, device, cache_dir, info: dict):
    shapes, meta, order, state = read_file(path)
    first_conv = shapes.get(FIRST_CONV)
    if first_conv is not None and len(first_conv) == 4:
        check_text_to_image(first_conv[1], path)
    notes: list[str] = []
    sdxl = is_sdxl(shapes, path)
    detected_v2 = False if sdxl else detect_v2(shapes, path)
    if v2 is not None and v2 != detected_v2:
        notes.append(f"v2={v2} given, but the file's text encoder keys are {'SD2' if detected_v2 else 'SD1/SDXL'}")
        logger.warning("%s: %s", path, notes[-1])
    v2 = detected_v2 if (v2 is None or sdxl) else v2
    folder, how = _choose_config(path, meta, config_dir, cache_dir)
    if sdxl:
        found_v, found_ztsnr = _sdxl_prediction(shapes, meta, folder, notes)
        v_param = found_v if v_param is None else v_param
        ztsnr = found_ztsnr if ztsnr is None else ztsnr
    elif v_param is None:
        v_param = _single_file_prediction(v2, meta, folder, notes)
    arch = "sdxl" if sdxl else arch_name(v2, v_param)
    if folder is None:
        folder = shipped_config_dir(arch, cache_dir)
    if sdxl and not (folder / "text_encoder_2" / "config.json").is_file():
        raise ConfigError(f"{path} is an SDXL checkpoint, but the {how} config {folder} has no text_encoder_2/: "
                          "pass config_dir=<an SDXL diffusers model folder>")  # fmt: skip
    components = meta_components(folder, sdxl)
    pairs = file_key_pairs(components, v2, folder)
    check_shapes(path, shapes, expected_file_shapes(pairs, components), folder, how)
    del shapes
    stream_from(path, order, state, pairs, components, torch_dtype, torch.device(device or "cpu"))
    pipe = assemble_pipeline(folder, components)
    _set_prediction(pipe, v_param, bool(ztsnr))
    model_info = ModelInfo(arch, v2, v_param, path=str(path), config_dir=str(folder), config_source=how,
                           zero_terminal_snr=bool(ztsnr), **info)  # fmt: skip
    model_info.metadata, model_info.notes = dict(meta), notes
    return pipe, model_info


# ----------------------------------------------------------------------------- names


def _with_sdxl_parts(repo: str, folder: Path, cache_dir: str | None) -> Path:
    """``hub_snapshot`` fetches what an SD1/2 pipeline needs; an SDXL repo also needs its second text
    encoder and tokenizer (same file patterns, ``_2`` folders)."""
    index = folder / "model_index.json"
    if (folder / "text_encoder_2" / "config.json").is_file() or "text_encoder_2" not in json.loads(index.read_text()):
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    extra = [p.replace("text_encoder/", "text_encoder_2/").replace("tokenizer/", "tokenizer_2/")
             for p in HUB_ALLOW_PATTERNS if p.startswith(("text_encoder/", "tokenizer/"))]  # fmt: skip
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_ALLOW_PATTERNS + extra, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        return folder  # offline: _folder_is_sdxl names what is missing


def resolve(name: str, cache_dir: str | None = None) -> tuple[str, Path]:
    """``(source kind, local path)`` for a folder, file, repo id or URL (downloading if needed)."""
    if os.path.exists(name):
        path = Path(name)
        return ("diffusers" if path.is_dir() else "single_file"), path
    if is_url(name):
        repo = hub_repo_from_url(name)
        if repo is not None:
            return "hub", _with_sdxl_parts(repo, hub_snapshot(repo, cache_dir), cache_dir)
        return "url", download_url(name, cache_dir)
    if REPO_ID.match(name) and not name.lower().endswith((".safetensors", ".ckpt")):
        return "hub", _with_sdxl_parts(name, hub_snapshot(name, cache_dir), cache_dir)
    raise ModelNotFoundError(
        f"{name}: not a local file or folder, an https:// URL, or a Hugging Face repo id like "
        "'stabilityai/stable-diffusion-2-1-base'"
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    *,
    v2: bool | None = None,
    v_parameterization: bool | None = None,
    zero_terminal_snr: bool | None = None,
    config_dir: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
):
    """Load a ``StableDiffusionPipeline`` (SD1.x/SD2.x, no safety checker) or a ``StableDiffusionXLPipeline``
    (SDXL base and its fine-tunes); return ``(pipe, ModelInfo)``.

    ``v2``/``v_parameterization``/``zero_terminal_snr`` override detection (an SDXL file's ``v_pred`` and
    ``ztsnr`` keys, metadata, the config's scheduler). ``config_dir`` is the diffusers folder used for a
    single file's configs and tokenizer(s). ``device``: where the weights go (default the CPU); a single
    file's tensors go there one at a time, so an fp16 SDXL file reaches the GPU without passing through RAM
    as a whole. ``cache_dir`` is the Hugging Face cache for repo ids and the root for URL downloads and
    rebuilt config folders (default ``~/.cache/nbkit``). Inpainting / instruct-pix2pix U-Nets and SDXL
    refiners are refused with a :class:`ConfigError` before anything is built.
    """
    name = os.fspath(pretrained_model_name_or_path)
    kind, path = resolve(name, cache_dir)
    info = {"source": kind, "name": name}
    if path.is_dir():
        return _load_folder(path, v2, v_parameterization, zero_terminal_snr, torch_dtype, device, info)
    return _load_single_file(
        path, v2, v_parameterization, zero_terminal_snr, config_dir, torch_dtype, device, cache_dir, info
    )
