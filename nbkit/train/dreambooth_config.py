"""DreamBooth options: kohya ``train_db`` names where kohya has one, diffusers ``train_dreambooth`` names
for prior preservation (``class_prompt``, ``num_class_images``, ``class_data_dir``).

Defaults are the T4 preset that fits 15 GiB (training-reference.md §3): fp32 master weights under fp16
autocast, AdamW8bit, gradient checkpointing, SDPA, cached latents, a frozen text encoder whose
outputs are cached, batch 1, and an fp16 ``.safetensors`` in the original layout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.config import ConfigError, help_
from nbkit.train.config import (
    NETWORK_MODULES,
    SAVE_PRECISIONS,
    LoRATrainConfig,
    TrainConfig,
    Where,
    check_at_least,
    check_positive_rate,
    config_error,
    same_option,
)

SAVE_MODEL_AS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")
SAVE_EMA = ("ema", "both", "prune")


@dataclass
class DreamBoothTrainConfig(TrainConfig):
    # --- overridden defaults: full fine-tuning wants a far lower rate than a LoRA (kohya's example: 1e-6)
    learning_rate: float = field(default=1e-6, metadata=help_("U-Net learning rate (1e-6 to 5e-6 for full fine-tuning; "
                                                              "1e-4 with network_module)."))
    save_precision: str | None = field(
        default="fp16",
        metadata=help_("dtype of the saved model: fp16 (default, half the size), float/fp32 or bf16.", "basic", SAVE_PRECISIONS),
    )
    cache_text_encoder_outputs: bool = field(
        default=True, metadata=help_("Encode each caption once and move the frozen text encoder off the GPU "
                                     "(skipped while the text encoder trains).", "advanced"),
    )
    # --- kohya folder datasets (instead of dataset_config): subfolders "N_identifier class" / "N_class"
    train_data_dir: str | None = field(
        default=None, metadata=help_("kohya DreamBooth folder: one subfolder per concept named 'N_identifier class' "
                                     "(e.g. '10_sks dog': 10 repeats, caption 'sks dog' where no caption file exists).")
    )
    reg_data_dir: str | None = field(
        default=None, metadata=help_("kohya regularisation folder: subfolders named 'N_class' (e.g. '1_dog').")
    )
    caption_extension: str | None = field(
        default=None, metadata=help_("Caption extension for train_data_dir/reg_data_dir (default: detected per folder).", "advanced")
    )
    instance_prompt: str | None = field(
        default=None, metadata=help_("Caption for instance images that have no caption file and no class tokens "
                                     "(diffusers' --instance_prompt, e.g. 'photo of sks dog').")
    )
    # --- prior preservation (class images)
    class_prompt: str | None = field(
        default=None, metadata=help_("Prompt for generated class images, e.g. 'photo of a dog' (default: the class "
                                     "word of folders named 'N_identifier class').")
    )
    class_negative_prompt: str | None = field(default=None, metadata=help_("Negative prompt for class images.", "advanced"))
    num_class_images: int = field(
        default=0, metadata=help_("Prior preservation: generate class images until class_data_dir holds this many "
                                  "(100-200 typical; 0 = none). They are kept and reused by later runs.")
    )
    class_data_dir: str | None = field(
        default=None, metadata=help_("Folder of class images (default: reg/1_<class> next to the first instance folder).")
    )
    class_image_steps: int = field(default=30, metadata=help_("Sampling steps per class image.", "advanced"))
    class_image_guidance: float = field(default=7.5, metadata=help_("CFG scale of class images.", "advanced"))
    class_image_batch_size: int = field(default=4, metadata=help_("Class images generated at once (4 fits a T4 at 512).", "advanced"))
    class_image_sampler: str = field(default="ddim", metadata=help_("Sampler for class images (kohya names).", "advanced"))
    # --- text encoder (kohya train_db)
    train_text_encoder: bool = field(
        default=False, metadata=help_("Also train the text encoder (+~1.5 GB VRAM; kohya trains it by default).")
    )
    learning_rate_te: float | None = field(default=None, metadata=help_("Text encoder learning rate (default: learning_rate)."))
    stop_text_encoder_training: int | None = field(
        default=None, metadata=help_("Freeze the text encoder after this many steps (kohya; -1 = never train it).")
    )
    # --- EMA
    use_ema: bool = field(default=False, metadata=help_("Keep an exponential moving average of the U-Net weights.", "advanced"))
    ema_decay: float = field(default=0.9999, metadata=help_("EMA decay (diffusers' warm-up: min(decay, (1+t)/(10+t))).", "advanced"))
    ema_on_cpu: bool = field(
        default=True, metadata=help_("Keep the EMA copy in system RAM (3.4 GB for SD1.5) instead of VRAM; slower.", "advanced")
    )
    save_ema: str = field(
        default="ema", metadata=help_("With use_ema: save the EMA as the model ('ema'), the raw weights plus model_ema.* "
                                      "('both'), or drop the EMA ('prune').", "advanced", SAVE_EMA),
    )
    # --- output
    save_model_as: str = field(
        default="safetensors", metadata=help_("Output: one original-layout file (safetensors, ckpt) or a diffusers "
                                              "folder (diffusers, diffusers_safetensors).", "basic", SAVE_MODEL_AS),
    )
    save_diffusers: bool = field(
        default=False, metadata=help_("Also write the final model as a diffusers folder <output_dir>/<output_name>.")
    )
    vae: str | None = field(
        default=None, metadata=help_("Replace the base VAE (kohya --vae): a VAE .safetensors/.pt or diffusers folder; "
                                     "used for the latents and baked into the saved model.")
    )
    # --- LoRA via DreamBooth (kohya train_network on a DreamBooth dataset)
    network_module: str | None = field(
        default=None, metadata=help_("'networks.lora' trains a LoRA on this DreamBooth data instead of all weights.",
                                     "basic", NETWORK_MODULES),
    )
    network_dim: int = same_option(LoRATrainConfig, "network_dim", "with network_module", "advanced")
    network_alpha: float = same_option(LoRATrainConfig, "network_alpha", "with network_module", "advanced")

    @property
    def unet_lr(self) -> float:
        return self.learning_rate

    @property
    def text_encoder_lr(self) -> float:
        return self.learning_rate if self.learning_rate_te is None else self.learning_rate_te

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder and (self.stop_text_encoder_training is None or self.stop_text_encoder_training > 0)

    def text_encoder_trains_at(self, step: int) -> bool:
        """kohya: the text encoder trains for steps 0 .. stop_text_encoder_training - 1 (all with None)."""
        stop = self.stop_text_encoder_training
        return self.trains_text_encoder and (stop is None or step < stop)

    def checked(self, where: Where = "config") -> DreamBoothTrainConfig:
        """Also the learning rates, the LoRA rank and the folder size (refused before any model loads)."""
        super().checked(where)
        check_positive_rate(self, where, "learning_rate", "set learning_rate = 1e-6 (full fine-tuning) or 1e-4 "
                                                          "(with network_module)")
        check_positive_rate(self, where, "learning_rate_te", "set learning_rate_te = 1e-6, or remove it to use "
                                                             "learning_rate", allow_zero=True)
        if self.learning_rate_te == 0 and self.trains_text_encoder:
            raise config_error(where, "learning_rate_te", 0.0, "the text encoder would not change: set "
                               "train_text_encoder = false (it also saves VRAM), or a positive learning_rate_te")
        if self.network_module:
            check_at_least(self, where, "network_dim", 1, "it is the LoRA rank: set network_dim = 16")
        if self.train_data_dir and self.resolution % 64:
            # kohya trains train_data_dir folders at one fixed size; SD's latent grid is 64 px
            raise config_error(where, "resolution", self.resolution, f"train_data_dir folders train at this one "
                               f"size, which must be a multiple of 64: set resolution = {self.resolution // 64 * 64} "
                               f"or {self.resolution // 64 * 64 + 64}")
        return self


def check_options(config: DreamBoothTrainConfig) -> None:
    """Contradictions that would silently train something else than asked."""
    config.checked()
    stop = config.stop_text_encoder_training
    if stop is not None and stop > 0 and not config.train_text_encoder:
        raise ConfigError(f"stop_text_encoder_training={stop} but train_text_encoder=false: set train_text_encoder=true "
                          "to train the text encoder for those steps, or remove stop_text_encoder_training")
    if config.num_class_images < 0 or config.class_image_batch_size < 1 or config.class_image_steps < 1:
        raise ConfigError("num_class_images must be >= 0, class_image_batch_size and class_image_steps >= 1")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay={config.ema_decay}: use a value in [0, 1), e.g. 0.9999")
    if config.network_module:
        bad = [n for n, ok in (("use_ema", not config.use_ema), ("stop_text_encoder_training", stop is None or stop < 0),
                               ("save_model_as", config.save_model_as == "safetensors"),
                               ("save_diffusers", not config.save_diffusers)) if not ok]
        if bad:
            raise ConfigError(f"network_module={config.network_module} writes a kohya LoRA .safetensors: "
                              f"remove {', '.join(bad)} (full fine-tuning options)")
        if config.learning_rate < 1e-5:
            warnings.warn(f"network_module: learning_rate={config.learning_rate} is a full fine-tuning rate; "
                          "a LoRA usually trains at 1e-4", stacklevel=2)


def lora_config(config: DreamBoothTrainConfig):
    """The LoRATrainConfig for "LoRA via DreamBooth": shared options copied, learning rates mapped."""
    from dataclasses import fields

    lora_options = {f.name for f in fields(LoRATrainConfig)}
    shared = {f.name: getattr(config, f.name) for f in fields(config) if f.name in lora_options}
    return LoRATrainConfig(**shared, unet_lr=config.learning_rate, text_encoder_lr=config.learning_rate_te,
                           network_train_unet_only=not config.trains_text_encoder)


def folder_datasets(config: DreamBoothTrainConfig, base_dir: Path | None = None) -> list:
    """kohya's folder datasets: every ``N_...`` subfolder of train_data_dir (instances) and
    reg_data_dir (regularisation) is a subset with ``num_repeats=N`` and the folder's class tokens."""
    from nbkit.data.dataset_config import DatasetSpec, kohya_subdir_subsets

    subsets = []
    for option, is_reg in (("train_data_dir", False), ("reg_data_dir", True)):
        value = getattr(config, option)
        if not value:
            continue
        root = Path(value).expanduser()
        root = root if root.is_absolute() or base_dir is None else base_dir / root
        if not root.is_dir():
            raise ConfigError(f"{option}: {root} is not a folder: fix the path")
        found = kohya_subdir_subsets(root, is_reg, config.caption_extension)  # 0_x and abc_x: warned, skipped
        if not found:
            raise ConfigError(f"{option}: {root} has no subfolder named 'N_identifier class' (e.g. '10_sks dog'): "
                              "put the images in such a subfolder")
        subsets.extend(found)
    res = (config.resolution, config.resolution)
    return [DatasetSpec(resolution=res, batch_size=config.train_batch_size, subsets=subsets)]
