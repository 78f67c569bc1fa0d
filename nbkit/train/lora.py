"""LoRA training: one loop that reads top to bottom.

Setup: load the base model, freeze it, inject LoRA (kohya's target set) with fp32 weights,
cache latents, build optimizer and schedule. Then per step: noise, predict, loss, backward,
clip, step, log, save, stop. The result is a kohya-format ``.safetensors`` that A1111,
ComfyUI, kohya and diffusers load as it is.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.data.captions import CaptionState
from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.latents import LatentCache, cacheable
from nbkit.data.train_data import (
    batch_captions,
    collect_items,
    dataset_dirs,
    epoch_batches,
    steps_per_epoch,
    tag_frequency,
)
from nbkit.train.common import (
    diffusion_loss,
    enable_te_checkpointing,
    encode_prompts,
    make_lr_scheduler,
    make_optimizer,
    resolve_mixed_precision,
    save_dtype_for,
    training_noise_scheduler,
    validation_loss,
    weight_dtype_for,
)
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import HookList, LossRecorder, TrainHooks


@dataclass
class TrainResult:
    lora_path: Path
    steps: int
    losses: list[float]
    pipeline: object = field(repr=False)  # the base pipeline with the trained LoRA injected
    saved: list[Path] = field(default_factory=list)


def train_lora(
    config: LoRATrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a LoRA. ``pipeline`` and its ``model_info`` (both from ``load_pipeline``) may be
    given to reuse an already loaded base model."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from nbkit.models.load import load_pipeline
    from nbkit.networks.lora import inject_lora, lora_parameters

    # ---- setup: devices and precision. Frozen weights may be fp16; trainable ones stay fp32.
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mixed_precision = resolve_mixed_precision(config.mixed_precision, device)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=device.type == "cpu",
    )
    set_seed(config.seed)
    rng = random.Random(config.seed)
    recorder = LossRecorder(Path(config.output_dir) / "logs" / f"{config.output_name}_loss.csv")
    hooks = HookList([recorder, hooks])
    started_at = time.time()

    # ---- model: load, freeze, inject LoRA
    if pipeline is None:
        pipeline, info = load_pipeline(
            config.pretrained_model_name_or_path, v2=config.v2, v_parameterization=config.v_parameterization
        )
    elif model_info is None:
        raise ValueError("train_lora: pass model_info together with pipeline (both come from load_pipeline)")
    else:
        info = model_info
    unet, text_encoder, vae, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
    weight_dtype = weight_dtype_for(mixed_precision)
    # The VAE encodes in fp32 (fp16 SD VAEs overflow to NaN); frozen UNet/TE weights in weight_dtype.
    for model, dtype in ((vae, torch.float32), (unet, weight_dtype), (text_encoder, weight_dtype)):
        if model.dtype == dtype:
            model.to(device)
        else:
            model.to(device, dtype=dtype)
    if config.network_weights:  # continue from a kohya file: its ranks and alphas win
        from nbkit.formats.kohya_lora import load_kohya_lora

        load_kohya_lora(config.network_weights, unet, text_encoder)
    else:
        inject_lora(
            unet, text_encoder, network_dim=config.network_dim, network_alpha=config.network_alpha,
            train_unet=config.train_unet, train_text_encoder=config.train_text_encoder,
        )
    unet_params = list(lora_parameters(unet)) if config.train_unet else []
    te_params = list(lora_parameters(text_encoder)) if config.train_text_encoder else []
    for model in (unet, text_encoder):
        model.requires_grad_(False)
    for p in unet_params + te_params:
        p.data = p.data.float()  # fp32 master weights: GradScaler refuses fp16 trainables
        p.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if te_params:
            enable_te_checkpointing(text_encoder)
    if config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())

    # ---- data: items in kohya buckets, latents cached once (the VAE then leaves the GPU)
    items, validation = collect_items(datasets, config.seed)
    cache_dir = config.latent_cache_dir or str(Path(config.output_dir) / "latent_cache")
    latents = LatentCache(items + validation, vae, device, cache_dir if config.cache_latents_to_disk else None)
    if config.cache_latents:
        latents.fill()
        if all(cacheable(it) for it in items):
            vae.to("cpu")
    steps_in_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps)
    total_steps = config.max_train_epochs * steps_in_epoch if config.max_train_epochs else config.max_train_steps
    caption_state = CaptionState(step=0, epoch=1, max_train_steps=total_steps)

    # ---- optimizer and schedule (separate learning rates, kohya's unet_lr / text_encoder_lr)
    groups = []
    if unet_params:
        groups.append({"params": unet_params, "lr": config.unet_lr or config.learning_rate})
    if te_params:
        groups.append({"params": te_params, "lr": config.text_encoder_lr or config.learning_rate})
    optimizer = make_optimizer(config.optimizer_type, groups, config.learning_rate)
    lr_scheduler = make_lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps)
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    noise_scheduler = training_noise_scheduler("v_prediction" if info.v_parameterization else "epsilon")

    hooks.on_train_start(total_steps, {"images": len(items), "steps_per_epoch": steps_in_epoch})
    unet.train()
    text_encoder.train(bool(te_params))
    step, epoch, saved = 0, 0, []
    while step < total_steps and not hooks.should_stop():
        epoch += 1
        caption_state.epoch = epoch
        for batch in epoch_batches(items, rng):
            with accelerator.accumulate(unet, text_encoder):
                # Forward: noise the latents at random timesteps, predict noise (or v).
                x0, mask = latents.batch(batch, rng)
                x0 = x0.to(device)
                caption_state.step = step
                with torch.set_grad_enabled(bool(te_params)):
                    captions = batch_captions(items, batch, rng, caption_state)
                    cond = encode_prompts(tokenizer, text_encoder, captions, config.clip_skip, device)
                # Regularisation images are weighted by prior_loss_weight (kohya).
                weights = [config.prior_loss_weight if items[i].subset.is_reg else 1.0 for i, _ in batch]
                with accelerator.autocast():
                    loss = diffusion_loss(unet, noise_scheduler, x0, cond, weight_dtype, weights, mask)
                # Backward, clip, step.
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(unet_params + te_params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            hooks.on_step(step, loss.item(), lr_scheduler.get_last_lr()[0])
            if step >= total_steps or hooks.should_stop():
                break
        if validation:
            hooks.on_validation(step, validation_loss(unet, text_encoder, tokenizer, noise_scheduler, latents,
                                                      len(items), validation, config, weight_dtype, device))
        hooks.on_epoch_end(epoch, step)
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and step < total_steps:
            saved.append(_save(config, f"{config.output_name}-{epoch:06d}", unet, text_encoder, info, items,
                               datasets, step, epoch, started_at, accelerator, hooks))

    # ---- save the final file
    final = _save(config, config.output_name, unet, text_encoder, info, items, datasets, step, epoch,
                  started_at, accelerator, hooks)
    saved.append(final)
    hooks.on_train_end(step)
    pipeline.unet, pipeline.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    return TrainResult(lora_path=final, steps=step, losses=recorder.losses, pipeline=pipeline, saved=saved)


def _save(config, name, unet, text_encoder, info, items, datasets, step, epoch, started_at, accelerator, hooks) -> Path:
    from nbkit.formats.kohya_lora import LoraTrainingInfo, build_metadata, save_kohya_lora
    from nbkit.networks.lora import export_kohya_state_dict

    unet = accelerator.unwrap_model(unet)
    text_encoder = accelerator.unwrap_model(text_encoder)
    state = export_kohya_state_dict(unet, text_encoder)  # every adapted model, trained or loaded
    metadata = build_metadata(LoraTrainingInfo(
        arch=info.arch,
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        output_name=name,
        steps=step,
        epoch=epoch,
        max_train_steps=config.max_train_steps,
        num_epochs=config.max_train_epochs,
        learning_rate=config.learning_rate,
        unet_lr=config.unet_lr,
        text_encoder_lr=config.text_encoder_lr,
        lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps,
        optimizer=config.optimizer_type,
        resolution=datasets[0].resolution,
        batch_size=datasets[0].batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_images=sum(i.repeats for i in items if not i.subset.is_reg),
        num_reg_images=sum(i.repeats for i in items if i.subset.is_reg),
        tag_frequency=tag_frequency(items),
        dataset_dirs=dataset_dirs(items),
        clip_skip=config.clip_skip,
        mixed_precision=config.mixed_precision,
        seed=config.seed,
        sd_model_name=str(config.pretrained_model_name_or_path),
        training_comment=config.training_comment,
        training_started_at=started_at,
        training_finished_at=time.time(),
    ))
    path = Path(config.output_dir) / f"{name}.safetensors"
    save_kohya_lora(state, path, metadata, save_dtype_for(config.save_precision))
    hooks.on_save(path, step)
    return path
