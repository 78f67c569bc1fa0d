"""LoRA training: one loop that reads top to bottom.

Setup: load the base model, freeze it, inject LoRA (kohya's target set) with fp32 weights,
cache latents, build optimizer and schedule. Then per step: noise, predict, loss, backward,
clip, step, log, save, stop. The result is a kohya-format ``.safetensors`` that A1111,
ComfyUI, kohya and diffusers load as it is.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.data.captions import CaptionState
from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.train_data import (
    batch_captions,
    collect_items,
    epoch_batches,
    steps_per_epoch,
)
from nbkit.train.common import (
    diffusion_loss,
    encode_captions,
    validation_loss,
)
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import TrainHooks
from nbkit.train.lora_files import save_lora_file
from nbkit.train.lora_setup import (
    cache_latents,
    cache_text,
    load_base,
    optimizer_and_schedule,
    prepare_models,
    start_run,
)
from nbkit.train.noise import prepare_noise_scheduler
from nbkit.train.optimizers import describe_optimizer
from nbkit.train.sampling import load_sample_prompts, preview_for_run, should_sample
from nbkit.train.schedules import schedule_finished
from nbkit.train.state import (
    Progress,
    load_state,
    resolve_resume,
    restore_python_rng,
    rng_to_json,
    save_run_state,
    state_dir,
)


@dataclass
class TrainResult:
    lora_path: Path
    steps: int
    losses: list[float]
    pipeline: object = field(repr=False)  # the base pipeline with the trained LoRA injected
    saved: list[Path] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a multi-GPU run (they save nothing)


def train_lora(
    config: LoRATrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a LoRA; ``pipeline`` + ``model_info`` (from ``load_pipeline``) reuse a loaded base model."""
    # ---- setup: devices and precision. Frozen weights may be fp16; trainable ones stay fp32.
    run = start_run(config, hooks, device)
    accelerator, device, hooks, recorder, weight_dtype = run.accelerator, run.device, run.hooks, run.recorder, run.weight_dtype
    rng = random.Random(config.seed)
    state_path = resolve_resume(config.resume, state_dir(config), config.output_name)  # before the model loads

    # ---- model: load, freeze, inject LoRA with fp32 weights
    pipeline, info = load_base(config, pipeline, model_info, weight_dtype, device)
    unet, text_encoder, vae, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer
    unet_params, te_params = prepare_models(config, unet, text_encoder, vae, device, weight_dtype)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})

    # ---- data: items in kohya buckets, latents cached once (the VAE then leaves the GPU)
    items, validation = collect_items(datasets, config.seed)
    latents = cache_latents(config, items + validation, vae, device)
    world = accelerator.num_processes
    steps_in_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps, world)
    total_steps = config.max_train_epochs * steps_in_epoch if config.max_train_epochs else config.max_train_steps
    caption_state = CaptionState(step=0, epoch=1, max_train_steps=total_steps)

    # ---- optimizer and schedule (separate learning rates, kohya's unet_lr / text_encoder_lr)
    optimizer, lr_scheduler = optimizer_and_schedule(config, unet_params, te_params, total_steps, world)
    text_cache = cache_text(config, items + validation, tokenizer, text_encoder, info, device, bool(te_params))
    prompts = load_sample_prompts(config.sample_prompts) if config.sample_prompts else []
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    noise_scheduler = prepare_noise_scheduler(
        "v_prediction" if info.v_parameterization else "epsilon", config.zero_terminal_snr
    )

    # ---- resume: weights, optimizer, schedule, RNGs and the position in the epoch
    progress = Progress(run_fingerprint=_fingerprint(config, total_steps))
    if state_path:
        progress = _resume(state_path, progress.run_fingerprint, trainable, optimizer, lr_scheduler, accelerator, rng)

    def save(name: str | None, step: int) -> None:
        if name and accelerator.is_main_process:
            saved.append(save_lora_file(config, name, unet, text_encoder, info, items, datasets, step, progress.epoch,
                               run.started_at, accelerator, hooks, describe_optimizer(optimizer)))
        if config.save_state and accelerator.is_main_process:
            save_run_state(config, step, rng, trainable, optimizer, lr_scheduler, accelerator.scaler, progress)
        accelerator.wait_for_everyone()

    def sample(step: int, epoch: int | None) -> None:
        if prompts and accelerator.is_main_process:
            preview_for_run(pipeline, prompts, config, step=step, epoch=epoch, device=device,
                            weight_dtype=weight_dtype, default_size=datasets[0].resolution, hooks=hooks)
        accelerator.wait_for_everyone()

    hooks.on_train_start(total_steps, {"images": len(items), "steps_per_epoch": steps_in_epoch})
    if config.sample_at_first and progress.step == 0:
        sample(0, None)
    unet.train()
    text_encoder.train(bool(te_params))
    step, saved, stop = progress.step, [], False
    while step < total_steps and not stop:
        batches = epoch_order(items, rng, progress, accelerator.process_index, world)
        caption_state.epoch = progress.epoch
        for batch in batches[progress.batch_index:]:
            with accelerator.accumulate(unet, text_encoder):
                # Forward: noise the latents at random timesteps, predict noise (or v).
                x0, mask = latents.batch(batch, rng)
                caption_state.step = step
                if text_cache is not None:  # frozen text encoder, fixed captions: encoded once
                    cond = torch.stack([text_cache[i] for i, _ in batch]).to(device)
                else:
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
                lr = lr_scheduler.get_last_lr()[0]  # the lr this step uses (logged below)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch_index += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.step = step
            hooks.on_step(step, loss.item(), lr)
            if config.log_with:
                accelerator.log({"loss": loss.item(), "lr": lr}, step=step)
            stop = hooks.should_stop() or schedule_finished(lr_scheduler)  # an A1111 string can end the run
            if should_sample(step, None, sample_every_n_steps=config.sample_every_n_steps,
                             sample_every_n_epochs=config.sample_every_n_epochs):
                sample(step, None)
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
        if should_sample(step, progress.epoch, sample_every_n_epochs=config.sample_every_n_epochs, is_epoch_end=True):
            sample(step, progress.epoch)
        if config.save_every_n_epochs and progress.epoch % config.save_every_n_epochs == 0 and step < total_steps:
            save(f"{config.output_name}-{progress.epoch:06d}", step)
            _prune_epochs(config, progress.epoch)

    # ---- save the final file (a stop request saves too, so the LoRA and state are loadable)
    save(config.output_name, step)
    hooks.on_train_end(step)
    if config.log_with:
        accelerator.end_training()
    pipeline.unet, pipeline.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    final = Path(config.output_dir) / f"{config.output_name}.safetensors"
    return TrainResult(lora_path=final, steps=step, losses=recorder.losses, pipeline=pipeline, saved=saved,
                       main_process=accelerator.is_main_process)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


def _nan_message(step: int, saved: list[Path], config) -> str:
    last = f"the last good save is {saved[-1]}" if saved else "nothing was saved yet"
    return (f"the loss became NaN/inf at step {step + 1}: lower learning_rate (now {config.learning_rate}), "
            f"keep mixed_precision=fp16 with fp32 LoRA weights, or check the dataset; {last}")


def epoch_order(items, rng: random.Random, progress: Progress, rank: int, world: int) -> list:
    """This process's batches of the current epoch. The order comes from the Python RNG; a
    resumed epoch rebuilds the same order from the RNG state saved at the epoch's start."""
    if progress.batch_index == 0:
        progress.epoch += 1
        progress.epoch_rng_state = rng_to_json(rng.getstate())
        return shard(epoch_batches(items, rng), rank, world)
    current = rng.getstate()
    restore_python_rng(rng, progress.epoch_rng_state)
    batches = shard(epoch_batches(items, rng), rank, world)
    rng.setstate(current)
    return batches


def shard(batches: list, rank: int, world: int) -> list:
    """This process's share of an epoch; padded by wrapping so every process runs as many steps."""
    if world == 1:
        return batches
    per_rank = -(-len(batches) // world)
    padded = (batches * (1 + (per_rank * world) // max(1, len(batches))))[: per_rank * world]
    return padded[rank::world]





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
