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

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.train_data import Item
from nbkit.train.architectures import conditioning_for
from nbkit.train.base_model import load_base, load_vae, place, set_attention
from nbkit.train.caching import cache_text, changing_caption_options
from nbkit.train.class_images import check_dreambooth_data, prepare_class_images
from nbkit.train.common import enable_te_checkpointing, weight_dtype_for
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, check_options, lora_config
from nbkit.train.dreambooth_save import EMAWeights, output_paths, remove_output, save_dreambooth
from nbkit.train.hooks import TrainHooks
from nbkit.train.loop import train
from nbkit.train.method import Method
from nbkit.train.run import make_accelerator


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


class DreamBoothMethod(Method):
    """Every U-Net weight (and optionally the text encoder) trains in fp32 master weights under fp16
    autocast; an EMA copy may follow them; the outputs are whole models."""

    fingerprint_keys = ("seed", "train_batch_size", "gradient_accumulation_steps", "learning_rate",
                        "learning_rate_te", "lr_scheduler", "train_text_encoder", "stop_text_encoder_training",
                        "use_ema", "ema_decay")
    nan_advice = "keep mixed_precision=fp16 (fp32 master weights), or check the dataset"

    def check(self, datasets: list) -> list:
        # a missing instance token must not wait for a 4 GB load
        from nbkit.estimate.guard import refuse_if_unfit

        check_options(self.config)
        refuse_if_unfit(self.config)  # on a GPU: a full fine-tune that cannot fit (SDXL on a T4) is refused here
        return check_dreambooth_data(self.config, datasets)

    def load(self, run, pipeline, model_info) -> None:
        config = self.config
        run.pipeline, run.info = load_with_vae(config, pipeline, model_info, run.weight_dtype, run.device)
        run.arch = conditioning_for(run.pipeline, run.info, config, run.device)  # before class images are drawn
        run.datasets = prepare_class_images(config, run.datasets, run.pipeline, run.device, run.main,
                                            run.accelerator.wait_for_everyone)
        self.unet, self.text_encoder, vae = run.pipeline.unet, run.pipeline.text_encoder, run.pipeline.vae
        te_trains = config.trains_text_encoder
        place(((vae, torch.float32), (self.unet, torch.float32),
               (self.text_encoder, torch.float32 if te_trains else run.weight_dtype)), run.device)
        vae.requires_grad_(False)
        self.unet.requires_grad_(True)
        self.text_encoder.requires_grad_(te_trains)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if te_trains:
                enable_te_checkpointing(self.text_encoder)
        set_attention(config, self.unet)
        self.unet_params = list(self.unet.parameters())
        self.te_params = list(self.text_encoder.parameters()) if te_trains else []
        self.ema = None
        if config.use_ema:
            self.ema = EMAWeights(dict(self.unet.named_parameters()), config.ema_decay,
                                  "cpu" if config.ema_on_cpu else run.device)

    def prepare_data(self, run) -> None:
        super().prepare_data(run)
        fixed = (self.config.cache_text_encoder_outputs and not self.te_params
                 and not changing_caption_options(run.items))
        self.text_cache = cache_text(self.config, run.items + run.validation, run.arch, False) if fixed else None

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained weight, and the EMA copy (so a resume continues it)."""
        unwrap = lambda model: getattr(model, "module", model)  # noqa: E731
        state = {f"unet.{n}": p for n, p in unwrap(self.unet).named_parameters()}
        if self.te_params:
            state.update({f"text_encoder.{n}": p for n, p in unwrap(self.text_encoder).named_parameters()})
        if self.ema is not None:
            state.update({f"ema.{n}": t for n, t in self.ema.shadow.items()})
        return state

    def text_trains(self, step: int) -> bool:
        # kohya stop_text_encoder_training: after N steps the text encoder gets no more gradient.
        return bool(self.te_params) and self.config.text_encoder_trains_at(step)

    def after_step(self, run, step: int) -> None:
        if self.ema is not None:
            self.ema.update(dict(run.accelerator.unwrap_model(self.unet).named_parameters()), step)

    def save(self, run, name: str, step: int, final: bool) -> list[Path]:
        unwrap = run.accelerator.unwrap_model
        return save_dreambooth(self.config, name, run.pipeline, run.info, unwrap(self.unet), unwrap(self.text_encoder),
                               self.ema, step, run.progress.epoch, self.formats(final))

    def formats(self, final: bool) -> tuple[str, ...]:
        """save_model_as; the final save adds a diffusers folder with save_diffusers."""
        config = self.config
        if final and config.save_diffusers and not config.save_model_as.startswith("diffusers"):
            return (config.save_model_as, "diffusers_safetensors")
        return (config.save_model_as,)

    def remove_output(self, name: str) -> None:
        for path in output_paths(self.config, name, self.formats(False)):
            remove_output(path)

    def result(self, run, step: int) -> DreamBoothResult:
        unwrap = run.accelerator.unwrap_model
        run.pipeline.unet, run.pipeline.text_encoder = unwrap(self.unet), unwrap(self.text_encoder)
        paths = output_paths(self.config, self.config.output_name, self.formats(True))
        return DreamBoothResult(paths, step, run.recorder.losses, run.pipeline, run.saved, run.main)


def train_dreambooth(
    config: DreamBoothTrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> DreamBoothResult:
    """Fine-tune all U-Net weights on DreamBooth data (or a LoRA with ``network_module``)."""
    if config.network_module:
        check_options(config)
        return _train_lora(config, check_dreambooth_data(config, datasets), hooks, pipeline, model_info, device)
    return train(DreamBoothMethod(config), datasets, hooks, pipeline, model_info, device)


def load_with_vae(config, pipeline, model_info, weight_dtype, device):
    """The base model (unless given), with kohya's ``vae`` swapped in: it then makes the latents and
    previews, and is saved with the model."""
    pipeline, info = load_base(config, pipeline, model_info, weight_dtype, device)
    if config.vae:
        pipeline.vae = load_vae(config.vae, pipeline.vae)
    return pipeline, info


def _train_lora(config, datasets, hooks, pipeline, model_info, device) -> DreamBoothResult:
    """"LoRA via DreamBooth": the same instance/class data, trained by the LoRA method (kohya LoRA file)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from nbkit.train.lora import train_lora

    subsets = [SimpleNamespace(subset=s) for d in datasets for s in d.subsets]
    lora = replace(lora_config(config), cache_text_encoder_outputs=config.cache_text_encoder_outputs
                   and not config.trains_text_encoder and not changing_caption_options(subsets))
    if config.num_class_images or config.vae:
        accelerator, mixed_precision = make_accelerator(replace(lora, log_with=None), device)
        pipeline, model_info = load_with_vae(config, pipeline, model_info, weight_dtype_for(mixed_precision),
                                             accelerator.device)
        datasets = prepare_class_images(config, datasets, pipeline, accelerator.device,
                                        accelerator.is_main_process, accelerator.wait_for_everyone)
    result = train_lora(lora, datasets, hooks, pipeline, model_info, device)
    return DreamBoothResult([result.lora_path], result.steps, result.losses, result.pipeline, result.saved,
                            result.main_process)
