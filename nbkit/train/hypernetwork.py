"""Hypernetwork training: one loop that reads top to bottom, A1111's ``train_hypernetwork``
on nbkit's shared core (accelerate, kohya noise/loss options, buckets, latent cache, previews).

Setup: load and freeze the base model, create the hypernetwork (or load a ``.pt`` to continue
it), apply it to every ``attn1``/``attn2``, cache latents and fixed prompts, build the optimizer,
the lr schedule (a number or an A1111 string) and the clip schedule. Then per step: prompt from
the template, noise, predict, loss, backward, clip, step, log, preview, save, stop. The result
is an A1111 ``.pt`` (plus ``.optim``) that A1111 and ComfyUI load as it is.
"""

from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.data.captions import CaptionState
from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.train_data import collect_items, epoch_batches, steps_per_epoch
from nbkit.formats.a1111_hypernetwork import file_shorthash, load_optimizer_sidecar, save_optimizer_sidecar
from nbkit.networks.hypernetwork.apply import apply_hypernetwork, attention_modules
from nbkit.networks.hypernetwork.create import create_hypernetwork
from nbkit.networks.hypernetwork.module import Hypernetwork
from nbkit.train.common import (
    diffusion_loss,
    encode_captions,
    make_lr_scheduler,
    make_optimizer,
    validation_loss,
)
from nbkit.train.hooks import TrainHooks
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig, check_hypernetwork_config
from nbkit.train.hypernetwork_data import (
    CaptionEncoder,
    TemplateCaptions,
    cache_hypernetwork_latents,
    fill_filename_captions,
    load_template,
)
from nbkit.train.lora import TrainingError, shard
from nbkit.train.lora_setup import load_base, start_run
from nbkit.train.noise import prepare_noise_scheduler
from nbkit.train.sampling import load_sample_prompts, preview_for_run, should_sample
from nbkit.train.schedules import A1111Schedule, a1111_schedule, is_a1111_schedule, schedule_finished


@dataclass
class HypernetworkTrainResult:
    hypernetwork_path: Path
    steps: int  # the hypernetwork's step count (continues a resumed file's count)
    losses: list[float]  # per optimizer step of this run
    lrs: list[float]
    hypernetwork: Hypernetwork = field(repr=False)
    pipeline: object = field(repr=False)  # the base pipeline with the trained hypernetwork applied (strength 1)
    saved: list[Path] = field(default_factory=list)
    main_process: bool = True


def train_hypernetwork(
    config: HypernetworkTrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> HypernetworkTrainResult:
    """Train (or continue) an A1111 hypernetwork. ``pipeline`` and its ``model_info`` (both from
    ``load_pipeline``) may be given to reuse a loaded base model; the hypernetwork stays applied."""
    from accelerate.utils import set_seed

    # ---- setup: devices and precision. The base may be fp16; the hypernetwork stays fp32.
    check_hypernetwork_config(config)
    run = start_run(config, hooks, device)
    accelerator, device, main, hooks, recorder = run.accelerator, run.device, run.main, run.hooks, run.recorder
    weight_dtype = run.weight_dtype
    out_dir = Path(config.output_dir)

    # ---- model: the base is frozen; the hypernetwork is created (or loaded) and applied
    pipeline, info = load_base(config, pipeline, model_info, weight_dtype, device)
    unet, text_encoder, vae, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.vae, pipeline.tokenizer
    _freeze(config, unet, text_encoder, vae, device, weight_dtype)
    hypernetwork, resumed_optimizer = _start_hypernetwork(config, unet)
    hypernetwork.to(device).train()
    apply_hypernetwork(unet, hypernetwork, 1.0)  # the strength is 1 while training anyway (A1111)
    params = list(hypernetwork.parameters())
    start_step = hypernetwork.step

    # ---- data: kohya buckets and latents (A1111's sampling method), prompts from the template
    items, validation = collect_items(datasets, config.seed)
    fill_filename_captions(items + validation)
    latents = cache_hypernetwork_latents(config, items + validation, vae, device)
    world = accelerator.num_processes
    steps_in_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps, world)
    total_steps = config.max_train_epochs * steps_in_epoch if config.max_train_epochs else config.max_train_steps
    if start_step >= total_steps:
        raise ConfigError(f"{hypernetwork.filename}: already trained for {start_step} steps, max_train_steps is "
                          f"{total_steps}: raise max_train_steps to continue it")
    rng = random.Random(config.seed + start_step)  # a resumed run does not replay the first batches
    set_seed(config.seed + start_step)  # ... nor the first noise
    captions, encoder = _prompts(config, items, bool(validation), tokenizer, text_encoder, info.v2, device, rng)
    caption_state = CaptionState(step=start_step, epoch=1, max_train_steps=total_steps)

    # ---- optimizer and schedules (lr and clip value: a number or an A1111 string)
    optimizer, lr_scheduler, clip_schedule = _optimizer_and_schedules(config, params, start_step, total_steps,
                                                                      resumed_optimizer)
    optimizer = accelerator.prepare(optimizer)  # schedules are stepped here, once per optimizer step
    noise_scheduler = prepare_noise_scheduler("v_prediction" if info.v_parameterization else "epsilon",
                                              config.zero_terminal_snr)
    prompts = load_sample_prompts(config.sample_prompts) if config.sample_prompts else []
    checkpoint = _checkpoint_identity(config.pretrained_model_name_or_path)

    def save(name: str, step: int) -> None:
        if main:
            hypernetwork.step, hypernetwork.name = step, config.output_name
            hypernetwork.sd_checkpoint, hypernetwork.sd_checkpoint_name = checkpoint
            path = hypernetwork.save(out_dir / f"{name}.pt")
            if config.save_optimizer_state:
                save_optimizer_sidecar(path, config.optimizer_type, optimizer.state_dict())
            saved.append(path)
            hooks.on_save(path, step)
        accelerator.wait_for_everyone()

    def sample(step: int, epoch: int | None) -> None:
        if prompts and main:
            hypernetwork.eval()  # dropout off, the strength is used: what A1111 shows
            try:
                preview_for_run(pipeline, prompts, config, step=step, epoch=epoch, device=device,
                                weight_dtype=weight_dtype, default_size=datasets[0].resolution, hooks=hooks)
            finally:
                hypernetwork.train()
        accelerator.wait_for_everyone()

    hooks.on_train_start(total_steps - start_step, {"images": len(items), "steps_per_epoch": steps_in_epoch,
                                                    "start_step": start_step})
    if config.sample_at_first and start_step == 0:
        sample(0, None)
    unet.train()
    step, saved, epoch, micro_loss = start_step, [], 0, 0.0
    stop = schedule_finished(lr_scheduler)
    while step < total_steps and not stop:
        epoch += 1
        caption_state.epoch = epoch
        for batch in shard(epoch_batches(items, rng), accelerator.process_index, world):
            with accelerator.accumulate():
                # Forward: the template prompt, latents by A1111's method, noise, predict.
                caption_state.step = step
                if clip_schedule is not None:
                    clip_schedule.step(step)  # A1111 advances the clip limit before every micro-batch
                cond = encoder(captions.batch(batch, rng, caption_state), device)
                x0, mask = latents.batch(batch, rng)
                weights = [config.prior_loss_weight if items[i].subset.is_reg else 1.0 for i, _ in batch]
                with accelerator.autocast():
                    loss = diffusion_loss(unet, noise_scheduler, x0.to(device), cond, weight_dtype, config,
                                          info.v_parameterization, weights, mask)
                if not torch.isfinite(loss):
                    raise TrainingError(_nan_message(step, saved, config))
                # Backward (accelerate divides by gradient_accumulation_steps, as A1111 does), clip, step.
                accelerator.backward(loss)
                micro_loss += loss.item() / config.gradient_accumulation_steps
                if accelerator.sync_gradients:
                    _sync_and_clip(accelerator, config, params, clip_schedule)
                lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (logged below)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            hypernetwork.step = step
            lr_scheduler.step()  # A1111: the lr for the next step, by step number
            hooks.on_step(step, micro_loss, lr)
            if config.log_with:
                accelerator.log({"loss": micro_loss, "lr": lr}, step=step)
            micro_loss = 0.0
            stop = hooks.should_stop() or schedule_finished(lr_scheduler)  # an A1111 string can end the run
            if should_sample(step, None, sample_every_n_steps=config.sample_every_n_steps,
                             sample_every_n_epochs=config.sample_every_n_epochs):
                sample(step, None)
            if step >= total_steps or stop:
                break
            if config.save_every_n_steps and step % config.save_every_n_steps == 0:
                save(f"{config.output_name}-{step}", step)  # A1111's name: <name>-<step>.pt
        else:  # the epoch ran to its end
            if validation:
                hypernetwork.eval()
                hooks.on_validation(step, validation_loss(unet, text_encoder, tokenizer, noise_scheduler,
                                                          latents.for_validation(), len(items), validation, config, weight_dtype, device,
                                                          info.v_parameterization, info.v2))
                hypernetwork.train()
            hooks.on_epoch_end(epoch, step)
            if should_sample(step, epoch, sample_every_n_epochs=config.sample_every_n_epochs, is_epoch_end=True):
                sample(step, epoch)

    # ---- save the final file (a stop request saves too, so training can continue from it)
    save(config.output_name, step)
    hooks.on_train_end(step)
    if config.log_with:
        accelerator.end_training()
    hypernetwork.eval()
    return HypernetworkTrainResult(out_dir / f"{config.output_name}.pt", step, recorder.losses, recorder.lrs,
                                   hypernetwork, pipeline, saved, main)


def _prompts(config, items, keep_text_encoder: bool, tokenizer, text_encoder, v2: bool, device, rng):
    """Template prompts per item and their text conditioning. When every prompt is fixed, all are
    encoded now and the text encoder leaves the GPU until previews (A1111's "unload" option)."""
    captions = TemplateCaptions(items, load_template(config.template_file), config.output_name,
                                config.shuffle_tags, config.tag_drop_out, rng)
    encoder = CaptionEncoder(lambda texts: encode_captions(tokenizer, text_encoder, texts, config, v2, device),
                             captions)
    if captions.fixed is not None and not keep_text_encoder:
        text_encoder.to("cpu")
    return captions, encoder


def _nan_message(step: int, saved: list[Path], config: HypernetworkTrainConfig) -> str:
    last = f"the last good save is {saved[-1]}" if saved else "nothing was saved yet"
    return (f"the loss became NaN/inf at step {step + 1}: lower learning_rate (now {config.learning_rate}), "
            f"set clip_grad_mode, or check the dataset; {last}")


def _freeze(config, unet, text_encoder, vae, device, weight_dtype) -> None:
    """The whole base is frozen; the VAE encodes in fp32 (fp16 SD VAEs overflow to NaN)."""
    for model, dtype in ((vae, torch.float32), (unet, weight_dtype), (text_encoder, weight_dtype)):
        model.requires_grad_(False)
        if model.dtype == dtype:
            model.to(device)
        else:
            model.to(device, dtype=dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # non-reentrant: the hypernetwork still gets its gradients


def model_sizes(unet) -> list[int]:
    """The context widths of the UNet's attn1/attn2 layers (SD1: 320, 640, 768, 1280)."""
    return sorted({attn.to_k.in_features for _, attn in attention_modules(unet)})


def _start_hypernetwork(config: HypernetworkTrainConfig, unet) -> tuple[Hypernetwork, tuple[str, dict] | None]:
    """A new hypernetwork from the config's creation fields, or the ``resume`` file (its structure
    and step count) with the optimizer state of its ``.optim`` sidecar."""
    path = resolve_hypernetwork_resume(config.resume, config.output_dir, config.output_name)
    used = model_sizes(unet)
    if path is not None:
        hypernetwork = Hypernetwork.load(path)
        resumed = load_optimizer_sidecar(path)
    else:
        structure = replace(config.structure(), enable_sizes=config.enable_sizes or used)
        seed = config.seed if config.generation_seed is None else config.generation_seed
        hypernetwork, resumed = create_hypernetwork(config.output_name, structure, seed=seed), None
    unused = [s for s in hypernetwork.sizes if s not in used]
    if unused:
        warnings.warn(f"hypernetwork sizes {unused} do not occur in this model (its attention widths are {used}): "
                      "those modules will not train", stacklevel=3)
    return hypernetwork, resumed


def resolve_hypernetwork_resume(resume: str | None, output_dir: str | Path, output_name: str) -> Path | None:
    """``resume`` as a ``.pt`` path; ``latest`` is the ``<output_name>[-<step>].pt`` in ``output_dir``
    with the highest step, or None when there is none yet (a notebook cell works on its first run too)."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume).expanduser()
        if path.suffix != ".pt" or not path.is_file():
            raise ConfigError(f"resume: {path} is not a hypernetwork .pt file: pass the .pt to continue, or 'latest'")
        return path
    pattern = re.compile(rf"^{re.escape(output_name)}(?:-(\d+))?\.pt$")
    found = []
    for path in Path(output_dir).glob("*.pt"):
        match = pattern.match(path.name)
        if match:
            step = int(match[1]) if match[1] else Hypernetwork.load(path).step
            found.append((step, path.stat().st_mtime, path))
    return max(found)[2] if found else None


def _optimizer_and_schedules(config, params, start_step: int, total_steps: int, resumed):
    """The optimizer (its resumed state when the ``.optim`` matches), the lr schedule at
    ``start_step`` and, with ``clip_grad_mode``, the clip-value schedule (same string parser)."""
    text = str(config.learning_rate).strip()
    if not is_a1111_schedule(text):
        raise ConfigError(f"learning_rate={text!r}: write a number or a schedule like '5e-5:100, 5e-6:1500, 5e-7'")
    optimizer = make_optimizer(config.optimizer_type, [{"params": params}], 1e-3, config.optimizer_args)
    if config.lr_scheduler == "constant":  # A1111: the rate string is the whole schedule
        lr_scheduler = A1111Schedule(optimizer, text, total_steps, start_step)
    else:  # a kohya schedule (e.g. cosine_annealing_warm_restarts) peaking at the string's first rate
        peak = a1111_schedule(text, total_steps, start_step)[0][0]
        for group in optimizer.param_groups:
            group["lr"] = peak
        lr_scheduler = make_lr_scheduler(
            config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps,
            lr_scheduler_num_cycles=config.lr_scheduler_num_cycles, lr_scheduler_power=config.lr_scheduler_power,
            lr_scheduler_min_lr_ratio=config.lr_scheduler_min_lr_ratio, lr_scheduler_args=config.lr_scheduler_args)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_step):  # every schedule here is a function of the step count
                lr_scheduler.step()
    if resumed is not None:
        name, state = resumed
        if name != config.optimizer_type:
            warnings.warn(f"the .optim sidecar holds a {name} state, this run uses {config.optimizer_type}: the "
                          "optimizer starts fresh", stacklevel=3)
        else:
            lrs = [group["lr"] for group in optimizer.param_groups]
            optimizer.load_state_dict(state)
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr  # the schedule decides the lr, not the saved state
    clip_schedule = None
    if config.clip_grad_mode:
        clip_schedule = RateSchedule(str(config.clip_grad_value).strip(), total_steps, start_step)
    return optimizer, lr_scheduler, clip_schedule


class RateSchedule:
    """A1111's ``LearnRateScheduler`` for a plain value (the clip limit): ``step(n)`` moves to the
    next ``(rate, end_step)`` pair once ``n`` reaches the current end (one pair per call)."""

    def __init__(self, text: str, max_steps: int, cur_step: int = 0) -> None:
        self._pairs = iter(a1111_schedule(text, max_steps, cur_step))
        self.rate, self.end_step = next(self._pairs)

    def step(self, step_number: int) -> float:
        if step_number >= self.end_step:
            self.rate, self.end_step = next(self._pairs, (self.rate, self.end_step))
        return self.rate


def _sync_and_clip(accelerator, config, params, clip_schedule) -> None:
    """Average gradients across processes (the hypernetwork is not wrapped in DDP), then clip:
    A1111's value/norm mode with the scheduled limit, or kohya's constant max_grad_norm."""
    if accelerator.num_processes > 1:
        for p in params:
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")
    if clip_schedule is not None:
        limit = clip_schedule.rate
        if config.clip_grad_mode == "value":
            accelerator.clip_grad_value_(params, limit)
        else:
            accelerator.clip_grad_norm_(params, limit)
    elif config.max_grad_norm:
        accelerator.clip_grad_norm_(params, config.max_grad_norm)


def _checkpoint_identity(model: str) -> tuple[str | None, str | None]:
    """A1111's ``sd_checkpoint`` (sha256[:10] of a single-file base) and ``sd_checkpoint_name``."""
    path = Path(str(model)).expanduser()
    if path.is_file():
        return file_shorthash(path), path.stem
    return None, (path.name or str(model) or None)

