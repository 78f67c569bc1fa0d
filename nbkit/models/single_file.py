"""Single files (original LDM / SGM layout) into diffusers modules, RAM-bounded.

The modules are built on the meta device, the file's shapes are checked against them before any
weight is read, and the tensors go one at a time from the memory-mapped file
(``safetensors.safe_open``), renamed (:mod:`nbkit.formats.sgm_checkpoint`) and converted to their
dtype and device: no second copy of the file, and no fp32 copy of an fp16 file loaded in fp16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.formats.checkpoint_io import read_checked_header, read_single_file
from nbkit.formats.ldm_checkpoint import UNET_PREFIX
from nbkit.formats.sgm_checkpoint import KeyPair, diffusers_to_sgm, key_pairs, sd_key_pairs, sgm_to_diffusers


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """The base model named by the user is not there: a message for ``nbkit`` (a ConfigError) that
    callers catching ``FileNotFoundError`` still catch."""


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


def folder_in_channels(folder: Path) -> int | None:
    config = folder / "unet" / "config.json"
    try:
        return int(json.loads(config.read_text()).get("in_channels", 4))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # diffusers reports a missing or broken config itself


# ----------------------------------------------------------------------------- shape check


def expected_shapes(config_dir: str | Path, v2: bool) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape predicted from an SD1/SD2 diffusers config folder (built on meta)."""
    folder = Path(config_dir)
    components = meta_components(folder, sdxl=False)
    return expected_file_shapes(file_key_pairs(components, v2, folder), components)


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


def meta_components(folder: Path, sdxl: bool) -> dict[str, torch.nn.Module]:
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


def file_key_pairs(components: dict, v2: bool, folder: Path) -> list[KeyPair]:
    keys = {name: list(module.state_dict()) for name, module in components.items()}
    unet, vae = components["unet"].config, components["vae"].config
    try:
        if "text_encoder_2" in components:
            return key_pairs(keys, unet, vae)
        return sd_key_pairs(keys, unet, vae, v2=v2)
    except KeyError as e:
        raise ConfigError(f"config {folder}: its modules have no single-file layout: {e.args[0]}") from None


def expected_file_shapes(pairs: list[KeyPair], components: dict) -> dict[str, tuple[int, ...]]:
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


def assemble_pipeline(folder: Path, components: dict):
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


def read_file(path: Path) -> tuple[dict, dict, list[str], dict | None]:
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


def stream_from(path: Path, order: list[str], state: dict | None, pairs, components, dtype, device) -> None:
    if state is not None:  # an unpickled .ckpt, already in memory (memory-mapped when a zip)
        _stream_weights(path, pairs, components, order, state.__getitem__, dtype, device)
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:  # the memory map; nothing read yet
        _stream_weights(path, pairs, components, order, f.get_tensor, dtype, device)
