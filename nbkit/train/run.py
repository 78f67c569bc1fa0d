"""The run context: what the training loop and a method share for one run.

``start_run`` sets up what every method needs first (the Accelerator with its devices and
precision, the global seed, the caller's hooks joined by a loss recorder); the loop and the
method then fill in the model, the data and the optimizer. Passing one ``Run`` replaces the
10-15 argument lists the helpers used to take.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nbkit.data.captions import CaptionState
from nbkit.train.common import resolve_mixed_precision, weight_dtype_for
from nbkit.train.hooks import HookList, LossRecorder, TrainHooks
from nbkit.train.state import Progress


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


@dataclass
class Run:
    """One training run. Set by ``start_run``: config to started_at; by the method's ``load``:
    pipeline, info, arch; by the loop: items to progress."""

    config: Any
    datasets: list
    accelerator: Any
    device: torch.device
    main: bool  # the main process: the only one that writes files
    weight_dtype: torch.dtype  # dtype of the frozen weights
    hooks: HookList  # the caller's hooks plus ``recorder``
    recorder: LossRecorder
    started_at: float
    rng: random.Random  # data order, caption options, crops: saved and restored on resume
    pipeline: Any = None
    info: Any = None  # ModelInfo of the base model
    arch: Any = None  # the architecture's conditioning (nbkit.train.architectures)
    items: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    latents: Any = None
    total_steps: int = 0
    steps_in_epoch: int = 0
    caption_state: CaptionState = field(default_factory=CaptionState)
    optimizer: Any = None
    lr_scheduler: Any = None
    noise_scheduler: Any = None
    progress: Progress = field(default_factory=Progress)
    saved: list[Path] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def diffusion_loss(self, unet, x0: torch.Tensor, cond, weights=None, mask=None, **fixed) -> torch.Tensor:
        """The SD objective for this run's options (``nbkit.train.common.diffusion_loss``)."""
        from nbkit.train.common import diffusion_loss

        return diffusion_loss(unet, self.noise_scheduler, x0.to(self.device), cond, self.weight_dtype, self.config,
                              self.info.v_parameterization, weights, mask, **fixed)

    def prior_weights(self, batch) -> list[float]:
        """kohya's prior preservation: regularisation (class) samples weigh ``prior_loss_weight``."""
        return [self.config.prior_loss_weight if self.items[i].subset.is_reg else 1.0 for i, _ in batch]


def make_accelerator(config, device):
    """An Accelerator for the run (CPU when asked or without a GPU), trackers started if asked."""
    from accelerate import Accelerator

    from nbkit.config import to_dict

    device = torch.device(device) if device else None
    cpu = device.type == "cpu" if device else not torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(config.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps, cpu=cpu,
        log_with=config.log_with, project_dir=config.logging_dir or str(Path(config.output_dir) / "logs"),
    )
    if config.log_with:
        values = {k: v for k, v in to_dict(config).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(config.output_name, config=values)
    return accelerator, mixed_precision


def start_run(config, datasets: list, hooks: TrainHooks | None, device) -> Run:
    """The Accelerator (devices, precision, trackers), the global seed, and the caller's hooks joined
    by a loss recorder whose CSV goes to the logging folder (main process only)."""
    from accelerate.utils import set_seed

    accelerator, mixed_precision = make_accelerator(config, device)
    set_seed(config.seed)
    main = accelerator.is_main_process
    logs = Path(config.logging_dir or Path(config.output_dir) / "logs")
    recorder = LossRecorder(logs / f"{config.output_name}_loss.csv" if main else None)
    return Run(config, datasets, accelerator, accelerator.device, main, weight_dtype_for(mixed_precision),
               HookList([recorder, hooks]), recorder, time.time(), random.Random(config.seed))
