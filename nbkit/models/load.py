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
from nbkit.formats.checkpoint_io import read_checked_header, read_single_file
from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY, SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX
from nbkit.formats.sgm_checkpoint import (
    TE1_PREFIX,
    V_PRED_KEY,
    ZTSNR_KEY,
    KeyPair,
    diffusers_to_sgm,
    key_pairs,
    sd_key_pairs,
    sgm_to_diffusers,
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

logger = logging.getLogger(__name__)

SD2_BASE_GLOBAL_STEP = "875000"  # global_step of Stability's 512-base-ema.ckpt (SD2.0-base, epsilon)


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """The base model named by the user is not there: a message for ``nbkit`` (a ConfigError) that
    callers catching ``FileNotFoundError`` still catch."""


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
    """Original-layout key -> shape predicted from an SD1/SD2 diffusers config folder (built on meta)."""
    folder = Path(config_dir)
    components = _meta_components(folder, sdxl=False)
    return _expected_file_shapes(_key_pairs(components, v2, folder), components)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_shapes(
    path: str | Path, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], config_dir: Path, how: str
) -> None:
    """Raise a clear error if the file's tensors do not fit the config the modules are built from."""
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


# ----------------------------------------------------------------------------- single files, streamed


def _meta_components(folder: Path, sdxl: bool) -> dict[str, torch.nn.Module]:
    """The U-Net, VAE and text encoder(s) of a config folder, parameters on the meta device (no memory);
    buffers (CLIP's non-persistent ``position_ids``) are real, as ``from_pretrained`` makes them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        out = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if sdxl:
            te2_config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            out["text_encoder_2"] = CLIPTextModelWithProjection(te2_config)
    return out


def _key_pairs(components: dict, v2: bool, folder: Path) -> list[KeyPair]:
    keys = {name: list(module.state_dict()) for name, module in components.items()}
    unet, vae = components["unet"].config, components["vae"].config
    try:
        if "text_encoder_2" in components:
            return key_pairs(keys, unet, vae)
        return sd_key_pairs(keys, unet, vae, v2=v2)
    except KeyError as e:
        raise ConfigError(f"config {folder}: its modules have no single-file layout: {e.args[0]}") from None


def _expected_file_shapes(pairs: list[KeyPair], components: dict) -> dict[str, tuple[int, ...]]:
    states = {name: module.state_dict() for name, module in components.items()}
    return {p.file_key: tuple(diffusers_to_sgm(p, [states[p.component][k] for k in p.keys]).shape) for p in pairs}


def _assign(module: torch.nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype, device) -> None:
    """Put one tensor into ``module`` in ``dtype`` on ``device``, replacing its meta placeholder. A CPU tensor
    that already has the dtype is not copied: it stays memory-mapped file pages (as diffusers' loader leaves
    them), which the kernel can drop and read again, until it moves to the GPU."""
    owner_name, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    new = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if not new.is_contiguous():
        new = new.contiguous()
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = new


def _stream_weights(path: Path, pairs: list[KeyPair], components: dict, order, get_tensor, dtype, device) -> None:
    """Fill the meta modules with the file's tensors, read one at a time in ``order`` with ``get_tensor``."""
    by_key = {p.file_key: p for p in pairs}
    for file_key in order:
        pair = by_key.get(file_key)
        if pair is None:  # position_ids, logit_scale, markers, EMA copies, SD2's 24th layer...
            continue
        module = components[pair.component]
        for key, value in zip(pair.keys, sgm_to_diffusers(pair, get_tensor(file_key)), strict=True):
            _assign(module, key, value, dtype, device)
    for name, module in components.items():
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise ConfigError(f"{path}: {name} weights missing from the file (e.g. {left[:3]}); is it a full checkpoint?")
        module.to(device).eval()  # buffers built on the CPU follow; eval() as from_pretrained returns them


def _assemble(folder: Path, components: dict):
    """A pipeline around the loaded modules, with the folder's scheduler and tokenizer(s)."""
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTokenizer

    index = json.loads((folder / "model_index.json").read_text())
    scheduler_cls = getattr(diffusers, str((index.get("scheduler") or [None, ""])[1]), None)
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
        raise ConfigError(f"{folder}/model_index.json: {index.get('scheduler')!r} is not a diffusers scheduler")
    scheduler = scheduler_cls.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    if "text_encoder_2" in components:
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return StableDiffusionXLPipeline(**components, tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=zeros, add_watermarker=False)  # fmt: skip
    return StableDiffusionPipeline(**components, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def _read_file(path: Path) -> tuple[dict, dict, list[str], dict | None]:
    """``(key -> shape, metadata, keys in file order, state)``. A ``.safetensors`` header is checked against the
    file (no tensor read; ``state`` is None); a ``.ckpt`` is unpickled once, weights only, into ``state``."""
    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such checkpoint file")
        header, meta = read_checked_header(path)
        order = sorted(header, key=lambda k: header[k]["data_offsets"][0])  # sequential reads
        return {k: tuple(v["shape"]) for k, v in header.items()}, meta, order, None
    state, meta = read_single_file(path)
    return {k: tuple(v.shape) for k, v in state.items()}, meta, list(state), state


def _stream_from(path: Path, order: list[str], state: dict | None, pairs, components, dtype, device) -> None:
    if state is not None:  # an unpickled .ckpt, already in memory (memory-mapped when a zip)
        _stream_weights(path, pairs, components, order, state.__getitem__, dtype, device)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:  # the memory map; nothing read yet
        _stream_weights(path, pairs, components, order, f.get_tensor, dtype, device)


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
    check_text_to_image(_folder_in_channels(folder), folder)
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
    shapes, meta, order, state = _read_file(path)
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
    components = _meta_components(folder, sdxl)
    pairs = _key_pairs(components, v2, folder)
    check_shapes(path, shapes, _expected_file_shapes(pairs, components), folder, how)
    del shapes
    _stream_from(path, order, state, pairs, components, torch_dtype, torch.device(device or "cpu"))
    pipe = _assemble(folder, components)
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
