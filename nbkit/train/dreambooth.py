"""DreamBooth: full fine-tuning of the U-Net (and optionally the text encoder), one loop top to bottom.

Setup: check the data (a missing instance token is an error before anything loads), load the base,
generate missing class images (prior preservation), make every U-Net weight an fp32 trainable under
fp16 autocast, cache latents (and text when the text encoder is frozen), AdamW8bit. Then per step:
noise, predict, loss, backward, clip, step, EMA, log, sample, save, stop. The result is an
original-layout single file and/or a diffusers folder (``save_model_as``).

Prior preservation follows kohya (``train_db``), not diffusers' ``train_dreambooth``: instance and
class images are shuffled into the same batches and every sample's loss is multiplied by its
weight (1 for an instance image, ``prior_loss_weight`` for a class image) before the batch mean.
For a batch of n instance + n class samples this is ``(sum_inst + w * sum_class) / 2n``, i.e. half of
diffusers' ``mse(instance) + w * mse(class)``; the factor 1/2 is a learning-rate scale.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.data.captions import CaptionState
from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.train_data import Item, batch_captions, collect_items, steps_per_epoch
from nbkit.train.class_images import check_dreambooth_data, prepare_class_images
from nbkit.train.common import diffusion_loss, encode_captions, validation_loss, weight_dtype_for
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, check_options, lora_config
from nbkit.train.dreambooth_save import EMAWeights, output_paths, remove_output, save_dreambooth
from nbkit.train.hooks import TrainHooks
from nbkit.train.lora import TrainingError, epoch_order
from nbkit.train.lora_setup import (
    cache_latents,
    cache_text,
    changing_caption_options,
    load_base,
    load_vae,
    make_accelerator,
    optimizer_and_schedule,
    prepare_full_models,
    start_run,
)
from nbkit.train.noise import prepare_noise_scheduler
from nbkit.train.sampling import load_sample_prompts, preview_for_run, should_sample
from nbkit.train.schedules import schedule_finished
from nbkit.train.state import (
    Progress,
    load_state,
    resolve_resume,
    restore_python_rng,
    save_run_state,
    state_dir,
)


@dataclass
class DreamBoothResult:
    model_paths: list[Path]  # the final outputs (a single file and/or a diffusers folder; a LoRA file)
    steps: int
    losses: list[float]
    pipeline: object = field(repr=False)  # the base pipeline holding the trained weights
    saved: list[Path] = field(default_factory=list)  # every output written, periodic ones included
    main_process: bool = True


def sample_weights(items: list[Item], batch: list[tuple[int, bool]], prior_loss_weight: float) -> list[float]:
    """kohya's prior preservation: class (is_reg) samples weigh ``prior_loss_weight``, instances 1."""
    return [prior_loss_weight if items[i].subset.is_reg else 1.0 for i, _ in batch]


def train_dreambooth(
    config: DreamBoothTrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> DreamBoothResult:
    """Fine-tune all U-Net weights on DreamBooth data (or a LoRA with ``network_module``)."""

    # ---- checks that need no model: a missing instance token must not wait for a 4 GB load
    check_options(config)
    datasets = check_dreambooth_data(config, datasets)
    if config.network_module:
        return _train_lora(config, datasets, hooks, pipeline, model_info, device)

    # ---- setup: devices and precision; every trainable weight stays fp32 (master weights)
    run = start_run(config, hooks, device)
    accelerator, device, main, hooks, recorder = run.accelerator, run.device, run.main, run.hooks, run.recorder
    weight_dtype = run.weight_dtype
    rng = random.Random(config.seed)
    resolve_resume(config.resume, state_dir(config), config.output_name)  # a bad resume fails before the model loads
    pipeline, info = _load(config, pipeline, model_info, weight_dtype, device)
    datasets = prepare_class_images(config, datasets, pipeline, device, main, accelerator.wait_for_everyone)
    unet, text_encoder, vae, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer
    unet_params, te_params = prepare_full_models(config, unet, text_encoder, vae, device, weight_dtype,
                                                 config.trains_text_encoder)
    trainable, ema = _trainables(config, unet, text_encoder if te_params else None, device)

    # ---- data: instance + class images in kohya buckets; latents (and frozen-TE text) cached once
    items, validation = collect_items(datasets, config.seed)
    latents = cache_latents(config, items + validation, vae, device)
    world = accelerator.num_processes
    steps_in_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps, world)
    total_steps = config.max_train_epochs * steps_in_epoch if config.max_train_epochs else config.max_train_steps
    caption_state = CaptionState(step=0, epoch=1, max_train_steps=total_steps)
    optimizer, lr_scheduler = optimizer_and_schedule(config, unet_params, te_params, total_steps, world)
    fixed_text = config.cache_text_encoder_outputs and not te_params and not changing_caption_options(items)
    text_cache = cache_text(config, items + validation, tokenizer, text_encoder, info, device, False) if fixed_text else None
    prompts = load_sample_prompts(config.sample_prompts) if config.sample_prompts else []
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    noise_scheduler = prepare_noise_scheduler("v_prediction" if info.v_parameterization else "epsilon",
                                              config.zero_terminal_snr)

    # ---- resume: all trainable weights (+ EMA), optimizer, schedule, RNGs, position in the epoch
    progress = _resume(config, total_steps, trainable, optimizer, lr_scheduler, accelerator, rng)

    def save(name: str | None, step: int, formats: tuple[str, ...]) -> None:
        if name and main:
            for path in save_dreambooth(config, name, pipeline, info, accelerator.unwrap_model(unet),
                                        accelerator.unwrap_model(text_encoder), ema, step, progress.epoch, formats):
                saved.append(path)
                hooks.on_save(path, step)
        if config.save_state and main:  # big for a full fine-tune (weights + optimizer), written atomically
            save_run_state(config, step, rng, trainable, optimizer, lr_scheduler, accelerator.scaler, progress)
        accelerator.wait_for_everyone()

    def sample(step: int, epoch: int | None) -> None:
        if prompts and main:
            preview_for_run(pipeline, prompts, config, step=step, epoch=epoch, device=device,
                            weight_dtype=weight_dtype, default_size=datasets[0].resolution, hooks=hooks)
        accelerator.wait_for_everyone()

    hooks.on_train_start(total_steps, {"images": len(items), "steps_per_epoch": steps_in_epoch})
    if config.sample_at_first and progress.step == 0:
        sample(0, None)
    unet.train()
    text_encoder.train(bool(te_params))
    step, saved, stop = progress.step, [], False
    periodic = (config.save_model_as,)
    while step < total_steps and not stop:
        batches = epoch_order(items, rng, progress, accelerator.process_index, world)
        caption_state.epoch = progress.epoch
        for batch in batches[progress.batch_index:]:
            # kohya stop_text_encoder_training: after N steps the text encoder gets no more gradient.
            te_active = bool(te_params) and config.text_encoder_trains_at(step)
            with accelerator.accumulate(unet, text_encoder):
                x0, mask = latents.batch(batch, rng)
                caption_state.step = step
                if text_cache is not None:
                    cond = torch.stack([text_cache[i] for i, _ in batch]).to(device)
                else:
                    with torch.set_grad_enabled(te_active):
                        captions = batch_captions(items, batch, rng, caption_state)
                        cond = encode_captions(tokenizer, text_encoder, captions, config, info.v2, device)
                weights = sample_weights(items, batch, config.prior_loss_weight)  # prior preservation
                with accelerator.autocast():
                    loss = diffusion_loss(unet, noise_scheduler, x0.to(device), cond, weight_dtype, config,
                                          info.v_parameterization, weights, mask)
                if not torch.isfinite(loss):
                    raise TrainingError(_nan_message(step, saved, config))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(unet_params + te_params, config.max_grad_norm)
                lr = lr_scheduler.get_last_lr()[0]
                optimizer.step()  # params without a gradient (a stopped text encoder) are skipped
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batch_index += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.step = step
            if ema is not None:
                ema.update(dict(accelerator.unwrap_model(unet).named_parameters()), step)
            hooks.on_step(step, loss.item(), lr)
            if config.log_with:
                accelerator.log({"loss": loss.item(), "lr": lr}, step=step)
            stop = hooks.should_stop() or schedule_finished(lr_scheduler)
            if should_sample(step, None, sample_every_n_steps=config.sample_every_n_steps,
                             sample_every_n_epochs=config.sample_every_n_epochs):
                sample(step, None)
            if step >= total_steps or stop:
                break
            every = config.save_every_n_steps and step % config.save_every_n_steps == 0
            if every or (config.save_state_every_n_steps and step % config.save_state_every_n_steps == 0):
                save(f"{config.output_name}-step{step:08d}" if every else None, step, periodic)
        if progress.batch_index < len(batches):
            break  # stopped inside the epoch (last step or a stop request)
        progress.batch_index = 0
        if validation:
            hooks.on_validation(step, validation_loss(unet, text_encoder, tokenizer, noise_scheduler, latents,
                                                      len(items), validation, config, weight_dtype, device,
                                                      info.v_parameterization, info.v2))
        hooks.on_epoch_end(progress.epoch, step)
        if should_sample(step, progress.epoch, sample_every_n_epochs=config.sample_every_n_epochs, is_epoch_end=True):
            sample(step, progress.epoch)
        if config.save_every_n_epochs and progress.epoch % config.save_every_n_epochs == 0 and step < total_steps:
            save(f"{config.output_name}-{progress.epoch:06d}", step, periodic)
            _prune_epochs(config, progress.epoch)

    final = _final_formats(config)  # save_model_as (+ a diffusers folder with save_diffusers), and the state
    save(config.output_name, step, final)
    hooks.on_train_end(step)
    if config.log_with:
        accelerator.end_training()
    pipeline.unet, pipeline.text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    return DreamBoothResult(output_paths(config, config.output_name, final), step, recorder.losses, pipeline, saved,
                            accelerator.is_main_process)


def _load(config, pipeline, model_info, weight_dtype, device):
    """The base model (unless given), with kohya's ``vae`` swapped in: it then makes the latents and
    previews, and is saved with the model."""
    pipeline, info = load_base(config, pipeline, model_info, weight_dtype, device)
    if config.vae:
        pipeline.vae = load_vae(config.vae, pipeline.vae)
    return pipeline, info


def _trainables(config, unet, text_encoder, device) -> tuple[dict[str, torch.Tensor], EMAWeights | None]:
    """What a state folder holds: every trained weight, and the EMA copy (so a resume continues it)."""
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters()}
    if text_encoder is not None:
        trainable.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters()})
    if not config.use_ema:
        return trainable, None
    ema = EMAWeights(dict(unet.named_parameters()), config.ema_decay, "cpu" if config.ema_on_cpu else device)
    trainable.update({f"ema.{n}": t for n, t in ema.shadow.items()})
    return trainable, ema


def _final_formats(config: DreamBoothTrainConfig) -> tuple[str, ...]:
    formats = [config.save_model_as]
    if config.save_diffusers and not config.save_model_as.startswith("diffusers"):
        formats.append("diffusers_safetensors")
    return tuple(formats)


def _train_lora(config, datasets, hooks, pipeline, model_info, device) -> DreamBoothResult:
    """"LoRA via DreamBooth": the same instance/class data, trained by the LoRA loop (kohya LoRA file)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from nbkit.train.lora import train_lora

    subsets = [SimpleNamespace(subset=s) for d in datasets for s in d.subsets]
    lora = replace(lora_config(config), cache_text_encoder_outputs=config.cache_text_encoder_outputs
                   and not config.trains_text_encoder and not changing_caption_options(subsets))
    if config.num_class_images or config.vae:
        accelerator, mixed_precision = make_accelerator(replace(lora, log_with=None), device)
        pipeline, model_info = _load(config, pipeline, model_info, weight_dtype_for(mixed_precision),
                                     accelerator.device)
        datasets = prepare_class_images(config, datasets, pipeline, accelerator.device,
                                        accelerator.is_main_process, accelerator.wait_for_everyone)
    result = train_lora(lora, datasets, hooks, pipeline, model_info, device)
    return DreamBoothResult([result.lora_path], result.steps, result.losses, result.pipeline, result.saved,
                            result.main_process)


def _nan_message(step: int, saved: list[Path], config) -> str:
    last = f"the last good save is {saved[-1]}" if saved else "nothing was saved yet"
    return (f"the loss became NaN/inf at step {step + 1}: lower learning_rate (now {config.learning_rate}), keep "
            f"mixed_precision=fp16 (fp32 master weights), or check the dataset; {last}")


def _fingerprint(config: DreamBoothTrainConfig, total_steps: int) -> str:
    """Settings a resume must keep (another order, schedule or set of trained weights is not a resume)."""
    keys = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "learning_rate_te",
            "lr_scheduler", "train_text_encoder", "stop_text_encoder_training", "use_ema", "ema_decay")
    return json.dumps({**{k: getattr(config, k) for k in keys}, "total_steps": total_steps}, sort_keys=True)


def _resume(config, total_steps: int, trainable, optimizer, lr_scheduler, accelerator, rng) -> Progress:
    """A fresh start, or the state named by ``resume`` restored into the live objects."""
    fingerprint = _fingerprint(config, total_steps)
    path = resolve_resume(config.resume, state_dir(config), config.output_name)
    if path is None:
        return Progress(run_fingerprint=fingerprint)
    progress = load_state(path, trainable, optimizer, lr_scheduler, accelerator.scaler)
    if progress.run_fingerprint != fingerprint:
        raise TrainingError(f"{path}: saved with other settings ({progress.run_fingerprint}) than this run "
                            f"({fingerprint}): resume with the same settings, or start a new run without resume")
    restore_python_rng(rng, progress.rng_state)
    return progress


def _prune_epochs(config: DreamBoothTrainConfig, epoch: int) -> None:
    """kohya save_last_n_epochs: keep only the newest N epoch saves (files or diffusers folders)."""
    n = config.save_last_n_epochs
    old = epoch - n * config.save_every_n_epochs if n else 0
    if old > 0:
        for path in output_paths(config, f"{config.output_name}-{old:06d}", (config.save_model_as,)):
            remove_output(path)
