"""LoRA training: one loop that reads top to bottom.

Setup: load the base model, freeze it, inject LoRA (kohya's target set) with fp32 weights,
cache latents, build optimizer and schedule. Then per step: noise, predict, loss, backward,
clip, step, log, save, stop. The result is a kohya-format ``.safetensors`` that A1111,
ComfyUI, kohya and diffusers load as it is.
"""

from __future__ import annotations

import json
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
    encode_captions,
    make_lr_scheduler,
    make_optimizer,
    resolve_mixed_precision,
    save_dtype_for,
    validation_loss,
    weight_dtype_for,
)
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import HookList, LossRecorder, TrainHooks
from nbkit.train.noise import prepare_noise_scheduler
from nbkit.train.state import (
    Progress,
    load_state,
    prune_states,
    resolve_resume,
    restore_python_rng,
    rng_to_json,
    save_state,
    state_dir_name,
)


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

    # ---- setup: devices and precision. Frozen weights may be fp16; trainable ones stay fp32.
    device = torch.device(device) if device else None
    cpu = device.type == "cpu" if device else not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=cpu
    )
    device = accelerator.device
    set_seed(config.seed)
    rng = random.Random(config.seed)
    recorder = LossRecorder(Path(config.output_dir) / "logs" / f"{config.output_name}_loss.csv"
                            if accelerator.is_main_process else None)
    hooks = HookList([recorder, hooks])
    started_at = time.time()
    weight_dtype = weight_dtype_for(mixed_precision)

    # ---- model: load, freeze, inject LoRA with fp32 weights
    pipeline, info = _load_base(config, pipeline, model_info)
    unet, text_encoder, vae, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer
    unet_params, te_params = _prepare_models(config, unet, text_encoder, vae, device, weight_dtype)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})

    # ---- data: items in kohya buckets, latents cached once (the VAE then leaves the GPU)
    items, validation = collect_items(datasets, config.seed)
    cache_dir = config.latent_cache_dir or str(Path(config.output_dir) / "latent_cache")
    latents = LatentCache(items + validation, vae, device, cache_dir if config.cache_latents_to_disk else None)
    if config.cache_latents:
        latents.fill()
        if all(cacheable(it) for it in items):
            vae.to("cpu")
    world = accelerator.num_processes
    steps_in_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps, world)
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
    noise_scheduler = prepare_noise_scheduler(
        "v_prediction" if info.v_parameterization else "epsilon", config.zero_terminal_snr
    )

    # ---- resume: weights, optimizer, schedule, RNGs and the position in the epoch
    progress = Progress(run_fingerprint=_fingerprint(config, total_steps))
    state_path = resolve_resume(config.resume, config.output_dir, config.output_name)
    if state_path:
        progress = _resume(state_path, progress.run_fingerprint, trainable, optimizer, lr_scheduler, accelerator, rng)

    def save(name: str | None, step: int) -> None:
        if name and accelerator.is_main_process:
            saved.append(_save(config, name, unet, text_encoder, info, items, datasets, step, progress.epoch,
                               started_at, accelerator, hooks))
        if config.save_state and accelerator.is_main_process:
            progress.rng_state = rng_to_json(rng.getstate())
            save_state(Path(config.output_dir) / state_dir_name(config.output_name, step), trainable, optimizer,
                       lr_scheduler, accelerator.scaler, progress)
            prune_states(config.output_dir, config.output_name, config.save_last_n_steps_state)
        accelerator.wait_for_everyone()

    hooks.on_train_start(total_steps, {"images": len(items), "steps_per_epoch": steps_in_epoch})
    unet.train()
    text_encoder.train(bool(te_params))
    step, saved, stop = progress.step, [], False
    while step < total_steps and not stop:
        # An epoch's batch order comes from the Python RNG; a resumed epoch rebuilds the same order.
        if progress.batch_index == 0:
            progress.epoch += 1
            progress.epoch_rng_state = rng_to_json(rng.getstate())
        else:
            current = rng.getstate()
            restore_python_rng(rng, progress.epoch_rng_state)
        batches = shard(epoch_batches(items, rng), accelerator.process_index, world)
        if progress.batch_index:
            rng.setstate(current)
        caption_state.epoch = progress.epoch
        for batch in batches[progress.batch_index:]:
            with accelerator.accumulate(unet, text_encoder):
                # Forward: noise the latents at random timesteps, predict noise (or v).
                x0, mask = latents.batch(batch, rng)
                caption_state.step = step
                with torch.set_grad_enabled(bool(te_params)):
                    captions = batch_captions(items, batch, rng, caption_state)
                    cond = encode_captions(tokenizer, text_encoder, captions, config, info.v2, device)
                # Regularisation images are weighted by prior_loss_weight (kohya).
                weights = [config.prior_loss_weight if items[i].subset.is_reg else 1.0 for i, _ in batch]
                with accelerator.autocast():
                    loss = diffusion_loss(unet, noise_scheduler, x0.to(device), cond, weight_dtype, config,
                                          info.v_parameterization, weights, mask)
                if not torch.isfinite(loss):
                    raise TrainingError(_nan_message(step, saved, config))
                # Backward, clip, step.
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(unet_params + te_params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch_index += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.step = step
            hooks.on_step(step, loss.item(), lr_scheduler.get_last_lr()[0])
            stop = hooks.should_stop()
            if step >= total_steps or stop:
                break
            every = config.save_every_n_steps and step % config.save_every_n_steps == 0
            state_due = config.save_state_every_n_steps and step % config.save_state_every_n_steps == 0
            if every or state_due:
                save(f"{config.output_name}-step{step:08d}" if every else None, step)
        if progress.batch_index < len(batches):
            break  # stopped inside the epoch (last step or a stop request)
        progress.batch_index = 0  # the epoch ran to its end
        if validation:
            hooks.on_validation(step, validation_loss(unet, text_encoder, tokenizer, noise_scheduler, latents,
                                                      len(items), validation, config, weight_dtype, device,
                                                      info.v_parameterization, info.v2))
        hooks.on_epoch_end(progress.epoch, step)
        if config.save_every_n_epochs and progress.epoch % config.save_every_n_epochs == 0 and step < total_steps:
            save(f"{config.output_name}-{progress.epoch:06d}", step)
            _prune_epochs(config, progress.epoch)

    # ---- save the final file (a stop request saves too, so the LoRA and state are loadable)
    save(config.output_name, step)
    hooks.on_train_end(step)
    pipeline.unet, pipeline.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    final = Path(config.output_dir) / f"{config.output_name}.safetensors"
    return TrainResult(lora_path=final, steps=step, losses=recorder.losses, pipeline=pipeline, saved=saved)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def _nan_message(step: int, saved: list[Path], config) -> str:
    last = f"the last good save is {saved[-1]}" if saved else "nothing was saved yet"
    return (f"the loss became NaN/inf at step {step + 1}: lower learning_rate (now {config.learning_rate}), "
            f"keep mixed_precision=fp16 with fp32 LoRA weights, or check the dataset; {last}")


def shard(batches: list, rank: int, world: int) -> list:
    """This process's share of an epoch; padded by wrapping so every process runs as many steps."""
    if world == 1:
        return batches
    per_rank = -(-len(batches) // world)
    padded = (batches * (1 + (per_rank * world) // max(1, len(batches))))[: per_rank * world]
    return padded[rank::world]


def _load_base(config, pipeline, model_info):
    from nbkit.models.load import load_pipeline

    if pipeline is None:
        return load_pipeline(config.pretrained_model_name_or_path, v2=config.v2, v_parameterization=config.v_parameterization)
    if model_info is None:
        raise ValueError("train_lora: pass model_info together with pipeline (both come from load_pipeline)")
    return pipeline, model_info


def _prepare_models(config, unet, text_encoder, vae, device, weight_dtype):
    """Freeze the base, move it, inject (or load) the LoRA; return the trainable parameters."""
    from nbkit.networks.lora import inject_lora, lora_parameters

    for model in (unet, text_encoder, vae):
        model.requires_grad_(False)
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
    return unet_params, te_params


def _fingerprint(config, total_steps: int) -> str:
    """Settings a resume must keep (a changed dataset order or schedule would not be a resume)."""
    keys = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "network_dim")
    return json.dumps({**{k: getattr(config, k) for k in keys}, "total_steps": total_steps}, sort_keys=True)


def _resume(path, fingerprint, trainable, optimizer, lr_scheduler, accelerator, rng) -> Progress:
    progress = load_state(path, trainable, optimizer, lr_scheduler, accelerator.scaler)
    if progress.run_fingerprint != fingerprint:
        raise TrainingError(
            f"{path}: saved with other settings ({progress.run_fingerprint}) than this run ({fingerprint}): "
            "resume with the same settings, or start a new run without resume"
        )
    restore_python_rng(rng, progress.rng_state)
    return progress


def _prune_epochs(config, epoch: int) -> None:
    """kohya save_last_n_epochs: keep only the newest N epoch files."""
    n = config.save_last_n_epochs
    if not n or not config.save_every_n_epochs:
        return
    old = epoch - n * config.save_every_n_epochs
    if old > 0:
        (Path(config.output_dir) / f"{config.output_name}-{old:06d}.safetensors").unlink(missing_ok=True)


def _save(config, name, unet, text_encoder, info, items, datasets, step, epoch, started_at, accelerator, hooks) -> Path:
    """Write the kohya LoRA file with full metadata (main process only)."""
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
