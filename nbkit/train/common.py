"""Helpers every training method shares: devices, precision, optimizers, text conditioning."""

from __future__ import annotations

import warnings

import torch

from nbkit.config import ConfigError


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


def make_optimizer(name: str, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr)
    if name == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - bitsandbytes is a dependency
            raise ConfigError(f"optimizer_type=AdamW8bit needs bitsandbytes>=0.50 ({err}): pip install 'bitsandbytes>=0.50'") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr)
    raise ConfigError(f"optimizer_type={name!r} is not supported yet: use AdamW or AdamW8bit")


def make_lr_scheduler(name: str, optimizer, warmup_steps: int, total_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


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


def training_noise_scheduler(prediction_type: str):
    """The DDPM schedule SD was trained with (kohya builds the same one)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def diffusion_loss(unet, noise_scheduler, x0, cond, weight_dtype, weights=None, mask=None, timesteps=None, noise=None):
    """The SD objective: MSE between the UNet's prediction and the noise (or v), per sample
    weighted (prior_loss_weight) and masked (alpha_mask) as kohya does."""
    noise = torch.randn_like(x0) if noise is None else noise
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    pred = unet(noisy.to(weight_dtype), timesteps, cond.to(weight_dtype)).sample
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(x0, noise, timesteps) if v_prediction else noise
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        loss = loss * mask.to(loss.device)
    loss = loss.mean(dim=(1, 2, 3))
    if weights is not None:
        loss = loss * torch.tensor(weights, device=loss.device, dtype=loss.dtype)
    return loss.mean()


@torch.no_grad()
def validation_loss(unet, text_encoder, tokenizer, noise_scheduler, latents, offset, items, config, weight_dtype, device):
    """Mean loss of held-out images at fixed timesteps and fixed noise: comparable across epochs."""
    from nbkit.data.captions import CaptionOptions, process_caption

    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for index, item in enumerate(items):
        x0, mask = latents.batch([(offset + index, False)], None)
        caption = process_caption(item.caption, CaptionOptions(), None)  # raw caption, first line
        cond = encode_prompts(tokenizer, text_encoder, [caption], config.clip_skip, device)
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(x0.shape, generator=generator).to(device)
            timesteps = torch.tensor([t], device=device)
            losses.append(diffusion_loss(unet, noise_scheduler, x0.to(device), cond, weight_dtype, None, mask,
                                         timesteps, noise).item())
    unet.train(was_training)
    return sum(losses) / len(losses)
