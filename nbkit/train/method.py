"""A training method: what the loop (``nbkit.train.loop.train``) asks of LoRA, DreamBooth, hypernetwork.

A method is built from its config and answers, in the order the loop asks:

- before the model loads: ``check`` (datasets), ``resume_path``;
- model and data: ``load`` (base, freeze, add what trains; sets ``run.pipeline``, ``run.info``,
  ``run.arch``), ``prepare_data`` (latents, fixed text);
- optimizer: ``optimizer`` (parameter groups with their learning rates, and the schedule),
  ``prepare`` (accelerate), ``trainable_state`` (what a state folder holds), ``resumed``;
- per step: ``train_mode``, ``accumulated_models``, ``loss``, ``clip``, ``after_step``;
- outputs: ``start_info``, ``step_file_name``/``epoch_file_name``, ``save``, ``remove_output``,
  ``validation_loss``, ``previewing``, ``result``.

The defaults here are kohya's for a U-Net plus CLIP text encoder (LoRA and DreamBooth share them):
a batch's latents and captions, conditioning from the run's architecture, prior-loss weights,
separate U-Net / text-encoder learning rates, clipping by ``max_grad_norm``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from nbkit.data.train_data import batch_captions
from nbkit.train.caching import cache_latents
from nbkit.train.common import make_lr_scheduler, make_optimizer, validation_loss
from nbkit.train.state import resolve_resume, state_dir


class Method:
    #: options a resume must keep (see ``loop.fingerprint``)
    fingerprint_keys: tuple[str, ...] = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
                                         "lr_scheduler")
    nan_advice = "keep mixed_precision=fp16 with fp32 trainable weights, or check the dataset"
    start_step = 0  # the step count the trained file already has (a continued hypernetwork)

    def __init__(self, config) -> None:
        self.config = config
        self.unet = None
        self.text_encoders: dict[str, torch.nn.Module] = {}  # part -> model: the architecture's text encoders
        self.unet_params: list[torch.nn.Parameter] = []
        self.te_params: list[torch.nn.Parameter] = []
        self.text_cache: list[torch.Tensor] | None = None

    @property
    def text_encoder(self):
        """The first (SD1/SD2: the only) text encoder."""
        return self.text_encoders.get("text_encoder")

    @text_encoder.setter
    def text_encoder(self, model) -> None:
        self.text_encoders["text_encoder"] = model

    # ---- before the model loads
    def check(self, datasets: list) -> list:
        return datasets

    def resume_path(self, run) -> Path | None:
        return resolve_resume(self.config.resume, state_dir(self.config), self.config.output_name)

    # ---- model and data
    def load(self, run, pipeline, model_info) -> None:
        raise NotImplementedError

    def prepare_data(self, run) -> None:
        run.latents = cache_latents(self.config, run.items + run.validation, run.pipeline.vae, run.device)

    # ---- optimizer and resume
    def parameter_groups(self) -> list[dict]:
        """kohya's unet_lr / text_encoder_lr groups (each falls back to learning_rate)."""
        config, groups = self.config, []
        if self.unet_params:
            groups.append({"params": self.unet_params, "lr": config.unet_lr or config.learning_rate})
        if self.te_params:
            groups.append({"params": self.te_params, "lr": config.text_encoder_lr or config.learning_rate})
        return groups

    def optimizer(self, run):
        """kohya's optimizer_type/optimizer_args over ``parameter_groups``, and the lr schedule."""
        config = self.config
        optimizer = make_optimizer(config.optimizer_type, self.parameter_groups(), config.learning_rate,
                                   config.optimizer_args)
        lr_scheduler = make_lr_scheduler(  # accelerate steps the schedule once per process (kohya does the same)
            config.lr_scheduler, optimizer, config.lr_warmup_steps, run.total_steps * run.world,
            lr_scheduler_num_cycles=config.lr_scheduler_num_cycles, lr_scheduler_power=config.lr_scheduler_power,
            lr_scheduler_min_lr_ratio=config.lr_scheduler_min_lr_ratio, lr_scheduler_args=config.lr_scheduler_args,
        )
        return optimizer, lr_scheduler

    def prepare(self, run) -> None:
        """accelerate wraps the U-Net and the text encoders that train (DDP, precision). A frozen text
        encoder is left as it is: prepare() would move one that cached its outputs and left the GPU
        back onto it (SDXL's two encoders are ~1.6 GB in fp16 on a 15 GiB T4)."""
        trained = [part for part, model in self.text_encoders.items()
                   if any(p.requires_grad for p in model.parameters())]
        self.unet, *encoders, run.optimizer, run.lr_scheduler = run.accelerator.prepare(
            self.unet, *(self.text_encoders[part] for part in trained), run.optimizer, run.lr_scheduler)
        self.text_encoders.update(zip(trained, encoders, strict=True))
        run.arch.use(self.text_encoders)  # conditioning runs through the prepared models

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a state folder holds: the trained weights (LoRA: megabytes, not the base's gigabytes)."""
        models = {"unet": self.unet, **self.text_encoders}
        return {f"{part}.{n}": p for part, model in models.items() for n, p in _unwrap(model).named_parameters()
                if p.requires_grad}

    def resumed(self, run, progress) -> None:
        """Called after a state folder was restored (the method may restore more)."""

    # ---- per step
    def train_mode(self, run) -> None:
        self.unet.train()
        for model in self.text_encoders.values():
            model.train(bool(self.te_params))

    def accumulated_models(self) -> tuple:
        return (self.unet, *self.text_encoders.values())

    def text_trains(self, step: int) -> bool:
        return bool(self.te_params)

    def loss(self, run, batch, step: int) -> torch.Tensor:
        """kohya's batch: cached latents, captions (or cached text) through the architecture's
        conditioning, regularisation images weighted by prior_loss_weight, noise and prediction."""
        x0, mask = run.latents.batch(batch, run.rng)
        if self.text_cache is not None:  # frozen text encoder, fixed captions: encoded once
            cond = run.arch.stack([self.text_cache[i] for i, _ in batch])
        else:
            with torch.set_grad_enabled(self.text_trains(step)):
                cond = run.arch.encode(batch_captions(run.items, batch, run.rng, run.caption_state))
        cond = run.arch.for_batch(cond, run.items, batch)  # SDXL: each image's size/crop time ids
        with run.accelerator.autocast():
            return run.diffusion_loss(self.unet, x0, cond, run.prior_weights(batch), mask)

    def clip(self, run) -> None:
        if self.config.max_grad_norm:
            run.accelerator.clip_grad_norm_(self.unet_params + self.te_params, self.config.max_grad_norm)

    def after_step(self, run, step: int) -> None:
        """After each optimizer step (e.g. an EMA update)."""

    # ---- outputs
    def start_info(self, run) -> dict:
        return {"images": len(run.items), "steps_per_epoch": run.steps_in_epoch}

    def step_file_name(self, step: int) -> str:
        return f"{self.config.output_name}-step{step:08d}"

    def epoch_file_name(self, epoch: int) -> str:
        return f"{self.config.output_name}-{epoch:06d}"

    def save(self, run, name: str, step: int, final: bool) -> list[Path]:
        raise NotImplementedError

    def remove_output(self, name: str) -> None:
        (Path(self.config.output_dir) / f"{name}.safetensors").unlink(missing_ok=True)

    def validation_loss(self, run) -> float:
        return validation_loss(run, self.unet, run.arch.encode)

    def previewing(self):
        """A context for previews (e.g. a network's eval mode)."""
        return contextlib.nullcontext()

    def result(self, run, step: int):
        raise NotImplementedError


def _unwrap(model):
    return getattr(model, "module", model)  # DDP wraps a model as .module
