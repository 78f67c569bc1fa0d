"""LoRA training (kohya ``train_network.py``): a network plug-in on a frozen base, run by the one loop.

The method: load the base and freeze it (frozen weights may be fp16), inject the network of
``network_module`` (LoRA/LoCon: ``nbkit.networks.lora``) with fp32 trainable weights, cache latents
(and text, when the text encoder is frozen and captions are fixed), separate U-Net / text-encoder
learning rates. The result is a kohya-format ``.safetensors`` that A1111, ComfyUI, kohya and
diffusers load as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.data.dataset_config import DatasetSpec
from nbkit.train.architectures import conditioning_for
from nbkit.train.base_model import load_base, place, set_attention
from nbkit.train.caching import cache_text
from nbkit.train.common import enable_te_checkpointing
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import TrainHooks
from nbkit.train.loop import train
from nbkit.train.method import Method
from nbkit.train.run import TrainingError

__all__ = ["LoRAMethod", "TrainResult", "TrainingError", "train_lora"]


@dataclass
class TrainResult:
    lora_path: Path
    steps: int
    losses: list[float]
    pipeline: object = field(repr=False)  # the base pipeline with the trained LoRA injected
    saved: list[Path] = field(default_factory=list)
    main_process: bool = True  # False in the other processes of a multi-GPU run (they save nothing)


class LoRAMethod(Method):
    fingerprint_keys = Method.fingerprint_keys + ("network_module", "network_args", "network_dim")

    nan_advice = "keep mixed_precision=fp16 with fp32 LoRA weights, or check the dataset"

    def check(self, datasets: list) -> list:
        from nbkit.networks.base import check_network_config

        check_network_config(self.config)  # network_args: a mistake is a message before the model loads
        return datasets

    def load(self, run, pipeline, model_info) -> None:
        """Freeze the base, move it, inject (or load) the network; its weights train in fp32."""
        from nbkit.networks.base import make_network

        config = self.config
        run.pipeline, run.info = load_base(config, pipeline, model_info, run.weight_dtype, run.device)
        run.arch = conditioning_for(run.pipeline, run.info, config, run.device, sdxl=True)
        self.unet, vae = run.pipeline.unet, run.pipeline.vae
        self.text_encoders = run.arch.text_encoders()  # SD1/SD2: one; SDXL: two
        frozen = [self.unet, *self.text_encoders.values()]
        for model in (*frozen, vae):
            model.requires_grad_(False)
        # The VAE encodes in fp32 (fp16 SD and SDXL VAEs overflow to NaN; kohya no_half_vae) unless
        # no_half_vae is off; frozen U-Net/TE weights in weight_dtype.
        place(((vae, torch.float32 if config.no_half_vae else run.weight_dtype),
               *((m, run.weight_dtype) for m in frozen)), run.device)
        self.network = make_network(config)
        self.network.inject({"unet": self.unet, **self.text_encoders})
        # kohya networks/lora.py: one text-encoder group (text_encoder_lr) for te1 and te2 alike
        # (its SDXL LoRANetwork has no prepare_optimizer_params_with_multiple_te_lrs)
        self.unet_params = self.network.parameters("unet")
        self.te_params = [p for part in self.text_encoders for p in self.network.parameters(part)]
        for model in frozen:
            model.requires_grad_(False)
        for p in self.unet_params + self.te_params:
            p.data = p.data.float()  # fp32 master weights: GradScaler refuses fp16 trainables
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.te_params:
                for model in frozen[1:]:
                    enable_te_checkpointing(model)
        set_attention(config, self.unet)

    def prepare_data(self, run) -> None:
        super().prepare_data(run)
        self.text_cache = cache_text(self.config, run.items + run.validation, run.arch, bool(self.te_params))

    def save(self, run, name: str, step: int, final: bool) -> list[Path]:
        from nbkit.train.lora_files import save_lora_file

        return [save_lora_file(run, self.network, name, step)]

    def result(self, run, step: int) -> TrainResult:
        unwrap = run.accelerator.unwrap_model
        for part, model in {"unet": self.unet, **self.text_encoders}.items():
            setattr(run.pipeline, part, unwrap(model))
        final = Path(self.config.output_dir) / f"{self.config.output_name}.safetensors"
        return TrainResult(final, step, run.recorder.losses, run.pipeline, run.saved, run.accelerator.is_main_process)


def train_lora(
    config: LoRATrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a LoRA; ``pipeline`` + ``model_info`` (from ``load_pipeline``) reuse a loaded base model."""
    return train(LoRAMethod(config), datasets, hooks, pipeline, model_info, device)
