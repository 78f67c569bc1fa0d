"""Helpers every training method shares: devices, precision, optimizers, text conditioning."""

from __future__ import annotations

import warnings

import torch

from nbkit.config import ConfigError
from nbkit.train import optimizers, schedules


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """fp16 autocast needs a GPU; on a CPU run in fp32 and say so."""
    if device.type == "cpu" and requested != "no":
        warnings.warn(f"mixed_precision={requested} needs a GPU; training in fp32 on the CPU", stacklevel=2)
        return "no"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision=bf16: this GPU has no bf16 (a T4 does not): use fp16")
    return requested


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """dtype of the *frozen* weights; trainable weights always stay fp32 (master weights)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def save_dtype_for(save_precision: str | None) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(save_precision or "float", torch.float32)


def make_optimizer(name: str, param_groups: list[dict], lr: float, optimizer_args=None) -> torch.optim.Optimizer:
    """Thin wrapper of :func:`nbkit.train.optimizers.make_optimizer` (kohya's optimizer_type table)."""
    return optimizers.make_optimizer(name, param_groups, lr, optimizer_args)


def make_lr_scheduler(name: str, optimizer, warmup_steps: int | float, total_steps: int, **options):
    """Thin wrapper of :func:`nbkit.train.schedules.make_lr_scheduler`; ``options`` are its keyword
    arguments (lr_scheduler_num_cycles, lr_scheduler_power, lr_scheduler_min_lr_ratio, lr_scheduler_args)."""
    return schedules.make_lr_scheduler(name, optimizer, num_training_steps=total_steps, lr_warmup_steps=warmup_steps, **options)


def encode_prompts(tokenizer, text_encoder, captions: list[str], clip_skip: int | None, device) -> torch.Tensor:
    """CLIP hidden states for captions (75 tokens). ``clip_skip=n`` takes ``hidden_states[-n]``
    followed by the final LayerNorm, as kohya and A1111 do."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(hidden)


def enable_te_checkpointing(text_encoder) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing; accept both."""
    enable = getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable
    enable()


def noise_options(config) -> dict:
    return {
        "noise_offset": config.noise_offset, "adaptive_noise_scale": config.adaptive_noise_scale,
        "noise_offset_random_strength": config.noise_offset_random_strength,
        "multires_noise_iterations": config.multires_noise_iterations,
        "multires_noise_discount": config.multires_noise_discount,
    }  # fmt: skip


def weighting_options(config, v_parameterization: bool) -> dict:
    return {
        "min_snr_gamma": config.min_snr_gamma, "v_parameterization": v_parameterization,
        "scale_v_pred_loss_like_noise_pred": config.scale_v_pred_loss_like_noise_pred,
        "v_pred_like_loss": config.v_pred_like_loss, "debiased_estimation_loss": config.debiased_estimation_loss,
    }  # fmt: skip


def diffusion_loss(unet, noise_scheduler, x0, cond, weight_dtype, config, v_parameterization: bool,
                   prior_weights=None, mask=None, timesteps=None, noise=None, generator=None):
    """The SD objective in kohya's order: noise (offset, pyramid), timesteps, input perturbation,
    prediction (``cond``: a context tensor, or an object with ``unet_kwargs(dtype)``), target (noise or v), element loss (l2/l1/huber), alpha mask, per-sample mean,
    prior weights, SNR-based weights, batch mean."""
    from nbkit.train.noise import compute_loss, huber_c_for, loss_target, make_noise, noisy_latents, sample_timesteps

    if noise is None:
        noise = make_noise(x0, generator=generator, **noise_options(config))
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], min_timestep=config.min_timestep or 0,
                                     max_timestep=1000 if config.max_timestep is None else config.max_timestep,
                                     device=x0.device, generator=generator)  # fmt: skip
    noisy = noisy_latents(noise_scheduler, x0, noise, timesteps, config.ip_noise_gamma,
                          config.ip_noise_gamma_random_strength, generator=generator)  # fmt: skip
    if isinstance(cond, torch.Tensor):  # SD1/SD2: the cross-attention context
        pred = unet(noisy.to(weight_dtype), timesteps, cond.to(weight_dtype)).sample
    else:  # a conditioning object (SDXL: context plus added_cond_kwargs, nbkit.train.architectures.SDXLCond)
        pred = unet(noisy.to(weight_dtype), timesteps, **cond.unet_kwargs(weight_dtype)).sample
    target = loss_target(noise_scheduler, x0, noise, timesteps, v_parameterization)
    huber_c = huber_c_for(timesteps, noise_scheduler, config.huber_schedule, config.huber_c, config.huber_scale)
    return compute_loss(pred, target, timesteps, noise_scheduler, loss_type=config.loss_type, huber_c=huber_c,
                        mask=mask, prior_weights=prior_weights, **weighting_options(config, v_parameterization))


def encode_captions(tokenizer, text_encoder, captions: list[str], config, v2: bool, device) -> torch.Tensor:
    """UNet conditioning with kohya's clip_skip, max_token_length chunks and weighted captions."""
    from nbkit.train.text import encode_text

    return encode_text(tokenizer, text_encoder, captions, max_token_length=config.max_token_length,
                       clip_skip=config.clip_skip, weighted_captions=config.weighted_captions, v2=v2, device=device)


@torch.no_grad()
def validation_loss(run, unet, encode, latents=None) -> float:
    """Mean loss of the run's held-out images at fixed timesteps and fixed noise: comparable across
    epochs. ``encode`` turns captions into the U-Net's conditioning (the run's architecture)."""
    from nbkit.data.captions import CaptionOptions, process_caption

    latents = run.latents if latents is None else latents
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(run.config.seed)
    losses = []
    for index, item in enumerate(run.validation):
        x0, mask = latents.batch([(len(run.items) + index, False)], None)
        cond = encode([process_caption(item.caption, CaptionOptions(), None)])  # raw caption, first line
        cond = run.arch.for_batch(cond, run.items + run.validation, [(len(run.items) + index, False)])
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(x0.shape, generator=generator).to(run.device)
            timesteps = torch.tensor([t], device=run.device)
            losses.append(run.diffusion_loss(unet, x0, cond, None, mask, timesteps=timesteps, noise=noise,
                                             generator=generator).item())
    unet.train(was_training)
    return sum(losses) / len(losses)
