"""Hypernetwork training: A1111's ``train_hypernetwork`` as a method of the one loop (accelerate,
kohya noise/loss options, buckets, latent cache, previews, exact resume from state folders).

The method: load and freeze the base model, create the hypernetwork (or load a ``.pt`` to continue
it), apply it to every ``attn1``/``attn2``, cache latents (A1111's sampling method) and fixed
prompts, build the optimizer, the lr schedule (a number or an A1111 string) and the clip schedule.
A batch's prompts come from the template. The result is an A1111 ``.pt`` (plus ``.optim``) that
A1111 and ComfyUI load as it is.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.data.dataset_config import DatasetSpec
from nbkit.formats.a1111_hypernetwork import file_shorthash, load_optimizer_sidecar, save_optimizer_sidecar
from nbkit.networks.hypernetwork.apply import apply_hypernetwork, attention_modules
from nbkit.networks.hypernetwork.create import create_hypernetwork
from nbkit.networks.hypernetwork.module import Hypernetwork
from nbkit.train.architectures import conditioning_for
from nbkit.train.base_model import load_base, place
from nbkit.train.common import make_lr_scheduler, make_optimizer, validation_loss
from nbkit.train.hooks import TrainHooks
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig, check_hypernetwork_config
from nbkit.train.hypernetwork_data import (
    CaptionEncoder,
    TemplateCaptions,
    cache_hypernetwork_latents,
    fill_filename_captions,
    load_template,
)
from nbkit.train.loop import train
from nbkit.train.method import Method
from nbkit.train.schedules import A1111Schedule, a1111_schedule, is_a1111_schedule
from nbkit.train.state import list_states, resolve_resume, state_dir


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


class HypernetworkMethod(Method):
    fingerprint_keys = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                        "clip_grad_mode", "clip_grad_value", "template_file")
    nan_advice = "set clip_grad_mode, or check the dataset"

    def check(self, datasets: list) -> list:
        check_hypernetwork_config(self.config)
        return datasets

    def resume_path(self, run) -> Path | None:
        """A state folder (exact resume): named by ``resume``, or the newest of this run for ``latest``.
        A ``.pt`` (A1111's continue: its step count, lr schedule and ``.optim``) is found in ``load``."""
        resume, config = self.config.resume, self.config
        exact = (resume == "latest" and list_states(state_dir(config), config.output_name)) or (
            resume and resume != "latest" and Path(resume).expanduser().is_dir())
        self.continue_from = None if exact else resume
        return resolve_resume(resume, state_dir(config), config.output_name) if exact else None

    def load(self, run, pipeline, model_info) -> None:
        """The base is frozen (the VAE in fp32: fp16 SD VAEs overflow); the hypernetwork is created
        (or loaded from a .pt) and applied, in fp32."""
        config = self.config
        run.pipeline, run.info = load_base(config, pipeline, model_info, run.weight_dtype, run.device)
        run.arch = conditioning_for(run.pipeline, run.info, config, run.device)
        self.unet, self.text_encoder, vae = run.pipeline.unet, run.pipeline.text_encoder, run.pipeline.vae
        for model in (vae, self.unet, self.text_encoder):
            model.requires_grad_(False)
        place(((vae, torch.float32), (self.unet, run.weight_dtype), (self.text_encoder, run.weight_dtype)), run.device)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # non-reentrant: the hypernetwork still gets its gradients
        self.hypernetwork, self.resumed_optimizer = _start_hypernetwork(replace(config, resume=self.continue_from),
                                                                        self.unet)
        self.hypernetwork.to(run.device).train()
        apply_hypernetwork(self.unet, self.hypernetwork, 1.0)  # the strength is 1 while training anyway (A1111)
        self.params = list(self.hypernetwork.parameters())
        self.start_step = self.hypernetwork.step

    def prepare_data(self, run) -> None:
        """Latents by A1111's method; prompts from the template. A continued .pt does not replay the
        first batches nor the first noise: the RNGs start at seed + its step."""
        from accelerate.utils import set_seed

        config = self.config
        fill_filename_captions(run.items + run.validation)
        run.latents = cache_hypernetwork_latents(config, run.items + run.validation, run.pipeline.vae, run.device)
        if self.start_step >= run.total_steps:
            raise ConfigError(f"{self.hypernetwork.filename}: already trained for {self.start_step} steps, "
                              f"max_train_steps is {run.total_steps}: raise max_train_steps to continue it")
        run.rng.seed(config.seed + self.start_step)
        set_seed(config.seed + self.start_step)
        self.captions = TemplateCaptions(run.items, load_template(config.template_file), config.output_name,
                                         config.shuffle_tags, config.tag_drop_out, run.rng)
        self.encoder = CaptionEncoder(run.arch.encode, self.captions)
        if self.captions.fixed is not None and not run.validation:
            self.text_encoder.to("cpu")  # every prompt is encoded: the text encoder leaves the GPU until previews

    def optimizer(self, run):
        """The optimizer (its resumed state when the ``.optim`` matches), the lr schedule at the
        start step and, with ``clip_grad_mode``, the clip-value schedule (same string parser)."""
        optimizer, lr_scheduler, self.clip_schedule = _optimizer_and_schedules(
            self.config, self.params, self.start_step, run.total_steps, self.resumed_optimizer)
        return optimizer, StepOnSync(lr_scheduler, run.accelerator)

    def prepare(self, run) -> None:
        run.optimizer = run.accelerator.prepare(run.optimizer)  # the base is frozen: nothing else to wrap

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"hypernetwork.{n}": p for n, p in self.hypernetwork.named_parameters()}

    def resumed(self, run, progress) -> None:
        """After a state folder: the file's step count, and the clip schedule where it stood."""
        self.hypernetwork.step = progress.step
        if self.clip_schedule is not None:
            self.clip_schedule = RateSchedule(str(self.config.clip_grad_value).strip(), run.total_steps, 0)
            for step in range(progress.step):  # one call per micro-batch, as the run made them
                for _ in range(self.config.gradient_accumulation_steps):
                    self.clip_schedule.step(step)

    def train_mode(self, run) -> None:
        self.unet.train()

    def accumulated_models(self) -> tuple:
        return ()

    def loss(self, run, batch, step: int) -> torch.Tensor:
        """The template prompt, latents by A1111's method, noise, prediction."""
        if self.clip_schedule is not None:
            self.clip_schedule.step(step)  # A1111 advances the clip limit before every micro-batch
        cond = self.encoder(self.captions.batch(batch, run.rng, run.caption_state), run.device)
        x0, mask = run.latents.batch(batch, run.rng)
        with run.accelerator.autocast():
            return run.diffusion_loss(self.unet, x0, cond, run.prior_weights(batch), mask)

    def clip(self, run) -> None:
        _sync_and_clip(run.accelerator, self.config, self.params, self.clip_schedule)

    def after_step(self, run, step: int) -> None:
        self.hypernetwork.step = step

    def start_info(self, run) -> dict:
        return {**super().start_info(run), "start_step": self.start_step}

    def step_file_name(self, step: int) -> str:
        return f"{self.config.output_name}-{step}"  # A1111's name: <name>-<step>.pt

    def save(self, run, name: str, step: int, final: bool) -> list[Path]:
        config, hypernetwork = self.config, self.hypernetwork
        hypernetwork.step, hypernetwork.name = step, config.output_name
        hypernetwork.sd_checkpoint, hypernetwork.sd_checkpoint_name = _checkpoint_identity(
            config.pretrained_model_name_or_path)
        path = hypernetwork.save(Path(config.output_dir) / f"{name}.pt")
        if config.save_optimizer_state:
            save_optimizer_sidecar(path, config.optimizer_type, run.optimizer.state_dict())
        return [path]

    def validation_loss(self, run) -> float:
        with self.previewing():
            return validation_loss(run, self.unet, run.arch.encode, run.latents.for_validation())

    @contextlib.contextmanager
    def previewing(self):
        self.hypernetwork.eval()  # dropout off, the strength is used: what A1111 shows
        try:
            yield
        finally:
            self.hypernetwork.train()

    def result(self, run, step: int) -> HypernetworkTrainResult:
        self.hypernetwork.eval()
        path = Path(self.config.output_dir) / f"{self.config.output_name}.pt"
        return HypernetworkTrainResult(path, step, run.recorder.losses, run.recorder.lrs, self.hypernetwork,
                                       run.pipeline, run.saved, run.main)


class StepOnSync:
    """A1111 steps its schedules once per optimizer step, in every process: a schedule the loop may
    call after every micro-batch, stepping only when the gradients were applied."""

    def __init__(self, scheduler, accelerator) -> None:
        self.scheduler, self.accelerator = scheduler, accelerator

    def step(self) -> None:
        if self.accelerator.sync_gradients:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()


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
    return train(HypernetworkMethod(config), datasets, hooks, pipeline, model_info, device)


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

