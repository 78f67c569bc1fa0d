"""Training configs. Field names are kohya sd-scripts option names; defaults suit a free Colab T4.

``TrainConfig`` holds what every method shares; each method adds its own fields
(``LoRATrainConfig`` here; DreamBooth and hypernetwork configs follow the same pattern).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from nbkit.config import ConfigError, help_

#: where a value came from, for messages: a fixed label ("run.toml") or a function of the option name
Where = str | Callable[[str], str]

PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp32", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")  # kohya network_module names nbkit trains (nbkit.networks.base.NETWORKS)


@dataclass
class TrainConfig:
    # --- model
    pretrained_model_name_or_path: str = field(
        default="",
        metadata=help_("Base model: a diffusers folder, a Hugging Face repo id, an https URL to a "
                       ".safetensors/.ckpt, or a local single-file checkpoint."),
    )
    v2: bool | None = field(default=None, metadata=help_("SD2.x model (detected from the weights when unset).", "advanced"))
    v_parameterization: bool | None = field(
        default=None, metadata=help_("v-prediction model such as SD2.1-768 (detected when unset).", "advanced")
    )
    # --- data
    dataset_config: str | None = field(
        default=None, metadata=help_("Path to a kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]).")
    )
    resolution: int = field(default=512, metadata=help_("Training resolution in pixels (square)."))
    cache_latents: bool = field(default=True, metadata=help_("Encode every image once with the VAE, then free the VAE."))
    cache_latents_to_disk: bool = field(
        default=False, metadata=help_("Also keep the encoded latents on disk (reused by the next run, checked against image and VAE).")
    )
    latent_cache_dir: str | None = field(
        default=None, metadata=help_("Folder for the disk latent cache (default: <output_dir>/latent_cache).", "advanced")
    )
    # --- output
    output_dir: str = field(default="output", metadata=help_("Folder for the trained files."))
    output_name: str = field(default="last", metadata=help_("File name (without extension) of the result."))
    save_precision: str | None = field(
        default=None,
        metadata=help_("dtype of the saved file: float/fp32 (default: as trained), fp16 or bf16.", "basic", SAVE_PRECISIONS),
    )
    save_every_n_epochs: int | None = field(
        default=None, metadata=help_("Also save {output_name}-{epoch:06d} every N epochs.", "advanced")
    )
    save_every_n_steps: int | None = field(
        default=None, metadata=help_("Also save {output_name}-step{step:08d} every N steps.", "advanced")
    )
    save_last_n_epochs: int | None = field(default=None, metadata=help_("Keep only the newest N epoch files.", "advanced"))
    save_state: bool = field(
        default=True, metadata=help_("Save optimizer/RNG state with every save, so a dead Colab runtime can resume exactly.")
    )
    save_state_every_n_steps: int | None = field(
        default=None, metadata=help_("Also save the state (not a LoRA file) every N steps: cheap insurance on Colab.")
    )
    save_last_n_steps_state: int | None = field(default=2, metadata=help_("Keep only the newest N states.", "advanced"))
    output_state_dir: str | None = field(
        default=None, metadata=help_("Folder for the *-state folders (default: output_dir); a Drive project's state/ "
                                     "folder survives a runtime reset.", "advanced"),
    )
    resume: str | None = field(
        default=None, metadata=help_("Resume from a *-state folder, or 'latest' (newest state of this output_name).")
    )
    # --- optimisation
    learning_rate: float = field(default=1e-4, metadata=help_("Learning rate (used where unet_lr/text_encoder_lr are unset)."))
    train_batch_size: int = field(default=1, metadata=help_("Images per step (per GPU). 1-2 on a T4 at 512 px."))
    max_train_steps: int = field(default=1600, metadata=help_("Number of optimizer steps (ignored if max_train_epochs is set)."))
    max_train_epochs: int | None = field(default=None, metadata=help_("Train for this many epochs instead of max_train_steps."))
    gradient_accumulation_steps: int = field(default=1, metadata=help_("Micro-batches per optimizer step.", "advanced"))
    optimizer_type: str = field(
        default="AdamW8bit",
        metadata=help_("Optimizer: AdamW8bit (least VRAM), AdamW, Lion, Prodigy, DAdaptAdam, Adafactor, SGDNesterov, "
                       "PagedAdamW8bit, ... or a module.Class path."),
    )
    optimizer_args: list[str] | None = field(
        default=None, metadata=help_("Extra optimizer arguments as key=value, e.g. weight_decay=0.01 betas=(0.9,0.99).", "advanced")
    )
    max_grad_norm: float = field(default=1.0, metadata=help_("Gradient clipping norm (0 = off).", "advanced"))
    lr_scheduler: str = field(
        default="constant",
        metadata=help_("Schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                       "cosine_annealing_warm_restarts, adafactor, ... or an A1111 string like '5e-5:100, 5e-6:1500, 5e-7'."),
    )
    lr_warmup_steps: float = field(default=0, metadata=help_("Warm-up steps, or a fraction of the run if below 1.", "advanced"))
    lr_scheduler_num_cycles: int = field(default=1, metadata=help_("Restarts for cosine_with_restarts.", "advanced"))
    lr_scheduler_power: float = field(default=1.0, metadata=help_("Power of the polynomial schedule.", "advanced"))
    lr_scheduler_min_lr_ratio: float | None = field(
        default=None, metadata=help_("Minimum lr as a fraction of the peak (cosine_with_min_lr, warm restarts).", "advanced")
    )
    lr_scheduler_args: list[str] | None = field(
        default=None, metadata=help_("Extra schedule arguments as key=value (e.g. gamma=0.9 for warm restarts).", "advanced")
    )
    mixed_precision: str = field(
        default="fp16", metadata=help_("Autocast precision: fp16 on a T4 (it has no bf16); 'no' on CPU.", "basic", PRECISIONS)
    )
    gradient_checkpointing: bool = field(default=True, metadata=help_("Recompute activations in backward: much less VRAM, ~20% slower."))
    sdpa: bool = field(default=True, metadata=help_("PyTorch scaled-dot-product attention (memory-efficient kernel on a T4).", "advanced"))
    xformers: bool = field(default=False, metadata=help_("Use xformers attention instead of SDPA (needs nbkit[xformers]).", "advanced"))
    lowram: bool = field(
        default=False, metadata=help_("Load the frozen weights in the training precision straight to the GPU (Colab RAM).", "advanced")
    )
    cache_text_encoder_outputs: bool = field(
        default=False,
        metadata=help_("Encode each caption once and move the text encoder off the GPU (frozen TE, fixed captions).", "advanced"),
    )
    prior_loss_weight: float = field(default=1.0, metadata=help_("Loss weight of regularisation (is_reg) images.", "advanced"))
    clip_skip: int | None = field(default=None, metadata=help_("Use the n-th last text-encoder layer (2 for many anime models).", "advanced"))
    # --- noise and loss (kohya's custom_train_functions.py)
    noise_offset: float | None = field(default=None, metadata=help_("Add offset noise (0.05-0.1): darker darks, brighter brights.", "advanced"))
    noise_offset_random_strength: bool = field(default=False, metadata=help_("Random offset strength in [0, noise_offset].", "advanced"))
    adaptive_noise_scale: float | None = field(
        default=None, metadata=help_("Add |mean latent| x this to noise_offset (needs noise_offset).", "advanced")
    )
    multires_noise_iterations: int | None = field(default=None, metadata=help_("Pyramid noise levels (6-10).", "advanced"))
    multires_noise_discount: float = field(default=0.3, metadata=help_("Pyramid noise discount per level.", "advanced"))
    ip_noise_gamma: float | None = field(default=None, metadata=help_("Input perturbation noise (about 0.1).", "advanced"))
    ip_noise_gamma_random_strength: bool = field(default=False, metadata=help_("Random strength in [0, ip_noise_gamma].", "advanced"))
    min_snr_gamma: float | None = field(default=None, metadata=help_("Min-SNR loss weighting; 5 is recommended.", "advanced"))
    scale_v_pred_loss_like_noise_pred: bool = field(
        default=False, metadata=help_("Scale a v-prediction loss like a noise-prediction one (needs v_parameterization).", "advanced")
    )
    v_pred_like_loss: float | None = field(default=None, metadata=help_("Add a v-prediction-like loss (epsilon models).", "advanced"))
    debiased_estimation_loss: bool = field(default=False, metadata=help_("Debiased estimation loss weighting.", "advanced"))
    zero_terminal_snr: bool = field(default=False, metadata=help_("Rescale the noise schedule to zero terminal SNR (v-prediction).", "advanced"))
    min_timestep: int | None = field(default=None, metadata=help_("Lowest training timestep (0-999).", "advanced"))
    max_timestep: int | None = field(default=None, metadata=help_("Highest training timestep + 1 (1-1000).", "advanced"))
    loss_type: str = field(default="l2", metadata=help_("Loss: l2 (MSE), l1, huber or smooth_l1.", "advanced", LOSS_TYPES))
    huber_schedule: str = field(default="snr", metadata=help_("How huber_c varies with the timestep.", "advanced", HUBER_SCHEDULES))
    huber_c: float = field(default=0.1, metadata=help_("Huber loss parameter.", "advanced"))
    huber_scale: float = field(default=1.0, metadata=help_("Huber schedule scale.", "advanced"))
    # --- text conditioning
    max_token_length: int | None = field(
        default=None, metadata=help_("Caption tokens: 75 (default), 150 or 225 (kohya's 75-token chunks).", "basic", (75, 150, 225))
    )
    weighted_captions: bool = field(default=False, metadata=help_("Read A1111 (tag:1.2) weights in captions.", "advanced"))
    # --- sample previews (kohya's sample_prompts file: txt with --n --w --h --d --l --s --ss, toml or json)
    sample_prompts: str | None = field(default=None, metadata=help_("Prompt file for preview images during training."))
    sample_every_n_steps: int | None = field(default=None, metadata=help_("Preview every N steps."))
    sample_every_n_epochs: int | None = field(default=None, metadata=help_("Preview every N epochs (overrides steps)."))
    sample_at_first: bool = field(default=False, metadata=help_("Preview before the first step too."))
    sample_sampler: str = field(default="ddim", metadata=help_("Sampler: ddim, euler, euler_a, dpmsolver++, pndm, ...", "advanced"))
    # --- logging
    log_with: str | None = field(
        default=None, metadata=help_("Also log to tensorboard, wandb or all (needs the package).", "advanced", ("tensorboard", "wandb", "all"))
    )
    logging_dir: str | None = field(default=None, metadata=help_("Folder for tracker logs (default <output_dir>/logs).", "advanced"))
    seed: int = field(default=42, metadata=help_("Random seed for noise, timesteps and shuffling."))
    max_data_loader_n_workers: int = field(default=0, metadata=help_("Threads decoding images while the VAE encodes (Colab has 2 vCPUs: 0-2).", "advanced"))

    def checked(self, where: Where = "config"):
        """This config, or a :class:`ConfigError` naming the option and the fix, for values no run can
        train with. Run while a config is read and first by the trainers' checks: before any model
        loads. Subclasses add their own options (and may return a copy adjusted as kohya does)."""
        check_at_least(self, where, "train_batch_size", 1, "images per step: set train_batch_size = 1 (or 2 on a T4 "
                                                          "at 512 px)")
        check_at_least(self, where, "gradient_accumulation_steps", 1, "set gradient_accumulation_steps = 1 (no "
                                                                     "accumulation)")
        if self.max_train_epochs is not None:
            check_at_least(self, where, "max_train_epochs", 1, "set max_train_epochs = 10, or remove it to train "
                                                              "max_train_steps steps")
        else:
            check_at_least(self, where, "max_train_steps", 1, "the number of optimizer steps: set max_train_steps = "
                                                             "1600, or set max_train_epochs instead")
        # the size against the bucket grid is checked where the datasets are made (dataset_config.py)
        check_at_least(self, where, "resolution", 1, "set resolution = 512 (SD1.x, SD2.x-base) or 768 (SD2.x-v)")
        return self


def config_error(where: Where, name: str, value, fix: str) -> ConfigError:
    """``<where>: <name> = <value>: <fix>`` (``where`` may depend on the option: file or flag)."""
    return ConfigError(f"{_place(where, name)}: {name} = {value!r}: {fix}")


def same_option(owner: type, name: str, note: str | None = None, group: str | None = None):
    """A field declared as ``owner``'s option ``name`` (default and help, plus ``note``), for a config
    that offers the same option: one declaration, however many methods offer it."""
    from dataclasses import MISSING

    source = owner.__dataclass_fields__[name]
    metadata = dict(source.metadata)
    if note:
        metadata["help"] = f"{metadata['help'].rstrip('.')} ({note})."
    if group:
        metadata["group"] = group
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


def check_at_least(config, where: Where, name: str, minimum: float, fix: str) -> None:
    value = getattr(config, name)
    if value is not None and value < minimum:
        raise config_error(where, name, value, f"must be at least {minimum}; {fix}")


def check_positive_rate(config, where: Where, name: str, fix: str, allow_zero: bool = False) -> None:
    value = getattr(config, name)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise config_error(where, name, value, f"a learning rate must be positive; {fix}")


@dataclass
class LoRATrainConfig(TrainConfig):
    network_module: str = field(default="networks.lora", metadata=help_("Network type (kohya name).", "advanced", NETWORK_MODULES))
    network_args: list[str] | None = field(
        default=None, metadata=help_("Extra network options as kohya writes them, e.g. [\"algo=loha\", \"factor=8\"].", "advanced")
    )
    network_dim: int = field(default=16, metadata=help_("LoRA rank. 8-32 for a character or style."))
    network_alpha: float = field(default=8.0, metadata=help_("LoRA alpha; the update is scaled by alpha/dim."))
    conv_dim: int | None = field(default=None, metadata=help_("LoCon: also train 3x3 ResNet/sampler convs with this rank.", "advanced"))
    conv_alpha: float | None = field(default=None, metadata=help_("LoCon alpha (default 1).", "advanced"))
    network_dropout: float | None = field(default=None, metadata=help_("Dropout on the LoRA down output (kohya).", "advanced"))
    rank_dropout: float | None = field(default=None, metadata=help_("Drop whole LoRA rank channels (kohya network_args).", "advanced"))
    module_dropout: float | None = field(default=None, metadata=help_("Skip a LoRA module per step (kohya network_args).", "advanced"))
    unet_lr: float | None = field(default=None, metadata=help_("U-Net learning rate (default: learning_rate)."))
    text_encoder_lr: float | None = field(default=None, metadata=help_("Text encoder learning rate (default: learning_rate)."))
    no_half_vae: bool = field(
        default=True, metadata=help_("Encode latents with the VAE in fp32 (kohya no_half_vae): SD and SDXL VAEs overflow "
                                     "to NaN in fp16 unless it is an fp16-fix VAE.", "advanced")
    )
    network_train_unet_only: bool = field(default=False, metadata=help_("Train only the U-Net LoRA (saves VRAM)."))
    network_train_text_encoder_only: bool = field(default=False, metadata=help_("Train only the text-encoder LoRA.", "advanced"))
    network_weights: str | None = field(
        default=None, metadata=help_("Start from an existing kohya LoRA file (continue training).", "advanced")
    )
    training_comment: str | None = field(default=None, metadata=help_("Stored as ss_training_comment in the file.", "advanced"))

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    def checked(self, where: Where = "config") -> LoRATrainConfig:
        """Also the rank and the learning rates. A part whose rate is 0 is not trained, as in kohya
        (networks/lora.py ``LoRANetwork.prepare_optimizer_params``: "NO LR skipping!"): a copy with
        network_train_unet_only / network_train_text_encoder_only set is returned, with a note."""
        super().checked(where)
        check_at_least(self, where, "network_dim", 1, "it is the LoRA rank: set network_dim = 16 (8-32 for a "
                                                     "character or style)")
        check_at_least(self, where, "conv_dim", 0, "set conv_dim = 4 for LoCon, or remove it")
        check_positive_rate(self, where, "learning_rate", "set learning_rate = 1e-4 (a typical LoRA rate)", True)
        for part, name in _PART_NAMES.items():
            check_positive_rate(self, where, f"{part}_lr", f"set {part}_lr = 1e-4, or remove it to use "
                                                           f"learning_rate (0 trains no {name} LoRA, as in kohya)", True)
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise ConfigError(f"{_place(where, 'network_train_unet_only')}: network_train_unet_only and "
                              "network_train_text_encoder_only are both true: nothing to train; keep one")
        from nbkit.networks.base import check_network_config

        check_network_config(self, where)  # network_module and network_args, as the network reads them
        return self._without_zero_rate_parts(where)

    def _without_zero_rate_parts(self, where: Where) -> LoRATrainConfig:
        rates = {"unet": self.learning_rate if self.unet_lr is None else self.unet_lr,
                 "text_encoder": self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr}
        trains = {"unet": self.train_unet, "text_encoder": self.train_text_encoder}
        zero = [part for part in rates if trains[part] and rates[part] == 0]
        if not zero:
            return self
        if len(zero) == sum(trains.values()):
            names = [f"{part}_lr" if getattr(self, f"{part}_lr") is not None else "learning_rate" for part in zero]
            shown = " and ".join(f"{n} = 0" for n in dict.fromkeys(names))
            raise ConfigError(f"{_place(where, names[0])}: {shown}: nothing to train; set learning_rate = 1e-4 "
                              "(a typical LoRA rate)")
        part = zero[0]
        name = f"{part}_lr" if getattr(self, f"{part}_lr") is not None else "learning_rate"
        other = {"unet": "text_encoder", "text_encoder": "unet"}[part]
        flag = f"network_train_{other}_only"
        warnings.warn(f"{_place(where, name)}: {name} = 0 leaves the {_PART_NAMES[part]} LoRA untrained, as in "
                      f"kohya: training only the {_PART_NAMES[other]} ({flag} = true); set {flag} = true to say so",
                      stacklevel=2)
        return replace(self, **{flag: True})


_PART_NAMES = {"unet": "U-Net", "text_encoder": "text encoder"}


def _place(where: Where, name: str) -> str:
    return where(name) if callable(where) else where
