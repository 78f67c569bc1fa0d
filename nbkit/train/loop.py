"""The training loop every method runs, top to bottom.

Setup: checks that need no model, the run (devices, precision, seed, hooks), the method's model
(load, freeze, add what trains), the data (kohya buckets, cached latents), the optimizer and
schedule, and resume. Then per micro-batch: the method's loss, backward, clip, optimizer step,
schedule step; per optimizer step: log, preview, save, stop; per epoch: validation, previews,
epoch saves. A method (``nbkit.train.method.Method``) supplies what differs: what trains, how a
batch becomes a loss, and how its file is written. Exact resume: a state folder holds the trained
weights, optimizer, schedule, every RNG and the position in the epoch's order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from nbkit.data.captions import CaptionState
from nbkit.data.train_data import collect_items, epoch_batches, steps_per_epoch
from nbkit.train.noise import prepare_noise_scheduler
from nbkit.train.run import Run, TrainingError, start_run
from nbkit.train.sampling import load_sample_prompts, preview_for_run, should_sample
from nbkit.train.schedules import schedule_finished
from nbkit.train.state import Progress, load_state, restore_python_rng, rng_to_json, save_run_state


def train(method, datasets: list, hooks=None, pipeline=None, model_info=None, device=None):
    """Run ``method`` (its ``config`` holds the options) on ``datasets``; returns ``method.result``."""
    # ---- checks that need no model: a bad dataset or resume must not wait for a 4 GB load
    datasets = method.check(datasets)
    config = method.config  # as checked (a method may complete its config there)
    run = start_run(config, datasets, hooks, device)
    state_path = method.resume_path(run)
    accelerator, hooks = run.accelerator, run.hooks

    # ---- model: load the base, freeze it, add (or load) what trains
    method.load(run, pipeline, model_info)

    # ---- data: items in kohya buckets; the method caches latents (and fixed text)
    run.items, run.validation = collect_items(run.datasets, config.seed)
    run.steps_in_epoch = steps_per_epoch(run.items, None, config.gradient_accumulation_steps, run.world)
    run.total_steps = (config.max_train_epochs * run.steps_in_epoch if config.max_train_epochs
                       else config.max_train_steps)
    run.caption_state = CaptionState(step=0, epoch=1, max_train_steps=run.total_steps)
    method.prepare_data(run)

    # ---- optimizer, schedule, noise schedule; then resume the exact position
    run.optimizer, run.lr_scheduler = method.optimizer(run)
    method.prepare(run)  # accelerate wraps the models, optimizer and schedule
    # zero terminal SNR when asked, or when the model was trained so (NoobAI-XL v-pred's ztsnr marker)
    run.noise_scheduler = prepare_noise_scheduler("v_prediction" if run.info.v_parameterization else "epsilon",
                                                  config.zero_terminal_snr or run.info.zero_terminal_snr)
    prompts = load_sample_prompts(config.sample_prompts) if config.sample_prompts else []
    run.progress = resume(run, method, state_path)

    def save(name: str | None, step: int, final: bool = False) -> None:
        if name and run.main:
            for path in method.save(run, name, step, final):
                run.saved.append(path)
                hooks.on_save(path, step)
        if config.save_state and run.main:
            save_run_state(config, step, run.rng, method.trainable_state(), run.optimizer, run.lr_scheduler,
                           accelerator.scaler, run.progress)
        accelerator.wait_for_everyone()

    def sample(step: int, epoch: int | None) -> None:
        if prompts and run.main:
            with method.previewing():
                preview_for_run(run.pipeline, prompts, config, step=step, epoch=epoch, device=run.device,
                                weight_dtype=run.weight_dtype, default_size=run.datasets[0].resolution, hooks=hooks)
        accelerator.wait_for_everyone()

    hooks.on_train_start(run.total_steps - method.start_step, method.start_info(run))
    if config.sample_at_first and run.progress.step == 0:
        sample(0, None)
    method.train_mode(run)
    step, stop, step_loss = run.progress.step, schedule_finished(run.lr_scheduler), 0.0
    while step < run.total_steps and not stop:
        batches = epoch_order(run.items, run.rng, run.progress, accelerator.process_index, run.world)
        run.caption_state.epoch = run.progress.epoch
        for batch in batches[run.progress.batch_index:]:
            with accelerator.accumulate(*method.accumulated_models()):
                # Forward: the method turns the batch into a loss (conditioning, noise, prediction).
                run.caption_state.step = step
                loss = method.loss(run, batch, step)
                if not torch.isfinite(loss):
                    raise TrainingError(nan_message(run, method, step))
                # Backward, clip, step (accelerate skips the step between accumulation micro-batches).
                accelerator.backward(loss)
                step_loss += loss.item() / config.gradient_accumulation_steps
                if accelerator.sync_gradients:
                    method.clip(run)
                lr = run.optimizer.param_groups[0]["lr"]  # the lr this step uses (logged below)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
            run.progress.batch_index += 1
            if not accelerator.sync_gradients:
                continue
            step = run.progress.step = step + 1
            method.after_step(run, step)
            hooks.on_step(step, step_loss, lr)
            if config.log_with:
                accelerator.log({"loss": step_loss, "lr": lr}, step=step)
            step_loss = 0.0
            stop = hooks.should_stop() or schedule_finished(run.lr_scheduler)  # an A1111 string can end the run
            if should_sample(step, None, sample_every_n_steps=config.sample_every_n_steps,
                             sample_every_n_epochs=config.sample_every_n_epochs):
                sample(step, None)
            if step >= run.total_steps or stop:
                break
            every = config.save_every_n_steps and step % config.save_every_n_steps == 0
            state_due = config.save_state_every_n_steps and step % config.save_state_every_n_steps == 0
            if every or state_due:
                save(method.step_file_name(step) if every else None, step)
        if run.progress.batch_index < len(batches):
            break  # stopped inside the epoch (last step or a stop request)
        run.progress.batch_index = 0  # the epoch ran to its end
        if run.validation:
            hooks.on_validation(step, method.validation_loss(run))
        hooks.on_epoch_end(run.progress.epoch, step)
        if should_sample(step, run.progress.epoch, sample_every_n_epochs=config.sample_every_n_epochs,
                         is_epoch_end=True):
            sample(step, run.progress.epoch)
        epoch = run.progress.epoch
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and step < run.total_steps:
            save(method.epoch_file_name(epoch), step)
            prune_epochs(method, epoch)

    # ---- the final file (a stop request saves too, so the file and the state are loadable)
    save(config.output_name, step, final=True)
    hooks.on_train_end(step)
    if config.log_with:
        accelerator.end_training()
    return method.result(run, step)


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


def fingerprint(run: Run, method) -> str:
    """Settings a resume must keep (another data order, schedule or set of trained weights is not a resume)."""
    values = {key: getattr(run.config, key) for key in method.fingerprint_keys}
    if method.start_step:  # a continued file: the RNGs were seeded from its step
        values["start_step"] = method.start_step
    return json.dumps({**values, "total_steps": run.total_steps}, sort_keys=True)


def resume(run: Run, method, path: Path | None) -> Progress:
    """A fresh start, or the state folder ``path`` restored into the live objects."""
    expected = fingerprint(run, method)
    if path is None:
        return Progress(step=method.start_step, run_fingerprint=expected)
    progress = load_state(path, method.trainable_state(), run.optimizer, run.lr_scheduler, run.accelerator.scaler)
    if progress.run_fingerprint != expected:
        raise TrainingError(f"{path}: saved with other settings ({progress.run_fingerprint}) than this run "
                            f"({expected}): resume with the same settings, or start a new run without resume")
    restore_python_rng(run.rng, progress.rng_state)
    method.resumed(run, progress)
    return progress


def nan_message(run: Run, method, step: int) -> str:
    last = f"the last good save is {run.saved[-1]}" if run.saved else "nothing was saved yet"
    return (f"the loss became NaN/inf at step {step + 1}: lower learning_rate (now {run.config.learning_rate}), "
            f"{method.nan_advice}; {last}")


def prune_epochs(method, epoch: int) -> None:
    """kohya save_last_n_epochs: keep only the newest N epoch saves."""
    config = method.config
    n = config.save_last_n_epochs
    old = epoch - n * config.save_every_n_epochs if n else 0
    if old > 0:
        method.remove_output(method.epoch_file_name(old))
