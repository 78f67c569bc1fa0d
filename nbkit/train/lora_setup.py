"""Setup steps of the LoRA trainer: load the base, prepare models, cache text conditioning."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbkit.config import ConfigError
from nbkit.data.captions import process_caption
from nbkit.data.train_data import caption_options
from nbkit.train.common import (
    enable_te_checkpointing,
    encode_captions,
    make_lr_scheduler,
    make_optimizer,
    resolve_mixed_precision,
    weight_dtype_for,
)
from nbkit.train.hooks import HookList, LossRecorder, TrainHooks



def load_base(config, pipeline, model_info, weight_dtype, device):
    from nbkit.models.load import load_pipeline

    if pipeline is None:
        # lowram (kohya): the frozen weights never exist in fp32 in system RAM, and go to the GPU at once.
        dtype = weight_dtype if config.lowram else torch.float32
        pipeline, info = load_pipeline(config.pretrained_model_name_or_path, v2=config.v2,
                                       v_parameterization=config.v_parameterization, torch_dtype=dtype)
        if config.lowram:
            pipeline.unet.to(device)
            pipeline.text_encoder.to(device)
        return pipeline, info
    if model_info is None:
        raise ValueError("train_lora: pass model_info together with pipeline (both come from load_pipeline)")
    return pipeline, model_info


def prepare_models(config, unet, text_encoder, vae, device, weight_dtype):
    """Freeze the base, move it, inject (or load) the LoRA; return the trainable parameters."""
    from nbkit.networks.base import make_network

    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    # The VAE encodes in fp32 (fp16 SD VAEs overflow to NaN); frozen UNet/TE weights in weight_dtype.
    for model, dtype in ((vae, torch.float32), (unet, weight_dtype), (text_encoder, weight_dtype)):
        if model.dtype == dtype:
            model.to(device)
        else:
            model.to(device, dtype=dtype)
    network = make_network(config)
    network.inject({"unet": unet, "text_encoder": text_encoder})
    unet_params, te_params = network.parameters("unet"), network.parameters("text_encoder")
    for model in (unet, text_encoder):
        model.requires_grad_(False)
    for p in unet_params + te_params:
        p.data = p.data.float()  # fp32 master weights: GradScaler refuses fp16 trainables
        p.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_params:
            enable_te_checkpointing(text_encoder)
    set_attention(config, unet)
    return unet_params, te_params


def cache_text(config, items, tokenizer, text_encoder, info, device, te_trained: bool):
    """Encode every caption once when the text encoder is frozen and captions never change;
    the text encoder then leaves the GPU (A1111's "unload VAE and CLIP while training")."""
    if not config.cache_text_encoder_outputs:
        return None
    changing = changing_caption_options(items)
    if te_trained or changing:
        why = "the text encoder is trained" if te_trained else f"captions change every step ({', '.join(changing)})"
        raise ConfigError(f"cache_text_encoder_outputs: {why}: turn caching off or set network_train_unet_only")
    captions = [process_caption(it.caption, caption_options(it.subset), random.Random(0)) for it in items]
    cache = {}
    with torch.no_grad():
        for caption in dict.fromkeys(captions):
            cache[caption] = encode_captions(tokenizer, text_encoder, [caption], config, info.v2, device)[0].cpu()
    text_encoder.to("cpu")
    return [cache[c] for c in captions]


def make_accelerator(config, device):
    """An Accelerator for the run (CPU when asked or without a GPU), trackers started if asked."""
    from accelerate import Accelerator

    from nbkit.config import to_dict

    device = torch.device(device) if device else None
    cpu = device.type == "cpu" if device else not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=cpu,
        log_with=config.log_with, project_dir=config.logging_dir or str(Path(config.output_dir) / "logs"),
    )
    if config.log_with:
        values = {k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(config.output_name, config=values)
    return accelerator, mixed_precision


@dataclass
class RunStart:
    """What every trainer sets up first (see ``start_run``)."""

    accelerator: Any
    device: torch.device
    main: bool  # the main process: the only one that writes files
    weight_dtype: torch.dtype  # dtype of the frozen weights
    hooks: HookList  # the caller's hooks plus ``recorder``
    recorder: LossRecorder
    started_at: float


def start_run(config, hooks: TrainHooks | None, device) -> RunStart:
    """The Accelerator (devices, precision, trackers), the global seed, and the caller's hooks joined
    by a loss recorder whose CSV goes to the logging folder (main process only)."""
    from accelerate.utils import set_seed

    accelerator, mixed_precision = make_accelerator(config, device)
    set_seed(config.seed)
    main = accelerator.is_main_process
    logs = Path(config.logging_dir or Path(config.output_dir) / "logs")
    recorder = LossRecorder(logs / f"{config.output_name}_loss.csv" if main else None)
    return RunStart(accelerator, accelerator.device, main, weight_dtype_for(mixed_precision),
                    HookList([recorder, hooks]), recorder, time.time())


def optimizer_and_schedule(config, unet_params, te_params, total_steps: int, world: int):
    """kohya's optimizer_type/optimizer_args with unet_lr/text_encoder_lr groups, and the lr schedule."""
    groups = []
    if unet_params:
        groups.append({"params": unet_params, "lr": config.unet_lr or config.learning_rate})
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr or config.learning_rate})
    optimizer = make_optimizer(config.optimizer_type, groups, config.learning_rate, config.optimizer_args)
    lr_scheduler = make_lr_scheduler(  # accelerate steps the schedule once per process (kohya does the same)
        config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps * world,
        lr_scheduler_num_cycles=config.lr_scheduler_num_cycles, lr_scheduler_power=config.lr_scheduler_power,
        lr_scheduler_min_lr_ratio=config.lr_scheduler_min_lr_ratio, lr_scheduler_args=config.lr_scheduler_args,
    )
    return optimizer, lr_scheduler


def cache_latents(config, items, vae, device):
    """Encode every cacheable image once (memory, and disk with cache_latents_to_disk); the VAE
    leaves the GPU when nothing needs it any more (no color_aug/random_crop subsets)."""
    from tqdm.auto import tqdm

    from nbkit.data.latents import LatentCache, cacheable

    disk = config.latent_cache_dir or str(Path(config.output_dir) / "latent_cache")
    latents = LatentCache(items, vae, device, disk if config.cache_latents_to_disk else None,
                          workers=config.max_data_loader_n_workers)
    if config.cache_latents:
        with tqdm(total=len(latents.keys_to_cache()), desc="VAE encode", unit="img") as bar:
            latents.fill(bar.update)
        if all(cacheable(it) for it in items):
            vae.to("cpu")
    return latents


def prepare_full_models(config, unet, text_encoder, vae, device, weight_dtype, train_text_encoder: bool):
    """Full fine-tuning (DreamBooth): every U-Net weight trains in fp32 (master weights: autocast
    computes in fp16, GradScaler refuses fp16 trainables); the text encoder trains in fp32 too or
    stays frozen in ``weight_dtype``; the VAE is frozen in fp32. Returns (unet_params, te_params)."""
    te_dtype = torch.float32 if train_text_encoder else weight_dtype
    for model, dtype in ((vae, torch.float32), (unet, torch.float32), (text_encoder, te_dtype)):
        if model.dtype == dtype:  # a dtype in .to() makes diffusers warn even when nothing changes
            model.to(device)
        else:
            model.to(device, dtype=dtype)
    vae.requires_grad_(False)
    unet.requires_grad_(True)
    text_encoder.requires_grad_(train_text_encoder)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            enable_te_checkpointing(text_encoder)
    set_attention(config, unet)
    return list(unet.parameters()), list(text_encoder.parameters()) if train_text_encoder else []


def set_attention(config, unet) -> None:
    """kohya's xformers / sdpa switches (SDPA runs the memory-efficient kernel on a T4)."""
    if config.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # diffusers raises ModuleNotFoundError/ValueError without a working xformers
            raise ConfigError(f"xformers=true: {err}: pip install 'nbkit[xformers]', or use sdpa (as fast on a T4)") from None
    elif config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def load_vae(path: str | Path, like):
    """kohya ``--vae``: a VAE from a single file (``.safetensors``/``.ckpt``/``.pt``, with or without
    the ``first_stage_model.`` prefix, e.g. vae-ft-mse-840000) or a diffusers folder (``vae/`` inside a
    model folder is found). ``like`` is the base model's VAE: the new one must have its shapes."""
    import tempfile

    from diffusers import AutoencoderKL

    from nbkit.formats.checkpoint_io import read_single_file

    path = Path(path).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    elif path.is_file():
        state, _ = read_single_file(path)
        with tempfile.TemporaryDirectory() as config_dir:
            like.save_config(config_dir)
            try:
                vae = AutoencoderKL.from_single_file(state, config=config_dir, local_files_only=True)
            except Exception as err:  # diffusers raises on missing keys / wrong shapes
                raise ConfigError(f"vae: {path} is not a VAE for this model ({err}): pass the model's VAE file") from None
    else:
        raise ConfigError(f"vae: {path} is not a file or folder: pass a VAE .safetensors/.pt file or a diffusers VAE folder")
    theirs, ours = vae.state_dict(), like.state_dict()
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(f"vae: {path} does not fit this model (e.g. {bad[0]}): pass a VAE of the same architecture")
    return vae.to(torch.float32)


def changing_caption_options(items) -> list[str]:
    """Subset options that make a caption differ from step to step (then text cannot be cached)."""
    return [o for o in ("shuffle_caption", "enable_wildcard", "caption_dropout_rate", "caption_tag_dropout_rate",
                        "caption_dropout_every_n_epochs", "token_warmup_step")
            if any(getattr(it.subset, o) for it in items)]  # fmt: skip
