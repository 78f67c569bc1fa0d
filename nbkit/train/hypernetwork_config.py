"""The hypernetwork training config: A1111 names for creation and A1111-only options, kohya names
for everything the trainers share (``learning_rate``, ``max_train_steps``, ``output_dir``, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from nbkit.config import ConfigError, help_
from nbkit.networks.hypernetwork.create import HypernetworkStructure
from nbkit.train.config import TrainConfig, Where, check_at_least, config_error

LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
CLIP_GRAD_MODES = ("value", "norm")
# TrainConfig options the hypernetwork trainer does not implement, and what to use instead.
_UNSUPPORTED = {
    "save_every_n_epochs": "hypernetworks are saved by steps, as in A1111: use save_every_n_steps",
    "save_last_n_epochs": "hypernetworks are saved by steps, as in A1111: use save_every_n_steps",
    "xformers": "hypernetworks use their own attention processor (SDPA, as fast on a T4): set xformers = false",
}


@dataclass
class HypernetworkTrainConfig(TrainConfig, HypernetworkStructure):
    """Train an A1111 hypernetwork. The creation fields (``enable_sizes``, ``layer_structure``,
    ``activation_func``, ...) are used when no ``resume`` file is given; a resumed ``.pt`` keeps
    its own structure, step count and (with its ``.optim``) optimizer state."""

    learning_rate: str = field(  # type: ignore[assignment]  # a number or an A1111 schedule string
        default="0.00001",
        metadata=help_("A number, or an A1111 schedule like '5e-5:100, 5e-6:1500, 5e-7' (5e-5 until step 100, "
                       "5e-6 until 1500, then 5e-7; training stops when the schedule ends)."),
    )
    optimizer_type: str = field(default="AdamW", metadata=help_("Optimizer (A1111 uses AdamW); see the LoRA trainer for the list."))
    max_grad_norm: float = field(
        default=0.0, metadata=help_("kohya-style constant gradient-norm clipping (0 = off); see clip_grad_mode.", "advanced")
    )
    save_state: bool = field(
        default=False,
        metadata=help_("Also write <output_name>-stepNNNNNNNN-state folders at each save: resume = latest then continues "
                       "exactly (data order, RNGs, optimizer), which a .pt with its .optim does not.", "advanced"),
    )
    resume: str | None = field(
        default=None,
        metadata=help_("Continue training a hypernetwork .pt (its step count, lr schedule and, from <file>.optim, "
                       "its optimizer), a -state folder (exact resume), or 'latest': the newest state folder of this "
                       "run if save_state wrote one, else the newest <output_name>*.pt in output_dir."),
    )
    train_data_dir: str | None = field(
        default=None,
        metadata=help_("A folder of images with same-stem .txt captions (A1111's dataset directory; an image without "
                       "one is captioned by its file name). Instead of dataset_config."),
    )
    template_file: str = field(
        default="hypernetwork.txt",
        metadata=help_("Prompt template: a shipped A1111 one (hypernetwork.txt, none.txt, style.txt, style_filewords.txt, "
                       "subject.txt, subject_filewords.txt) or a path; [name] = output_name, [filewords] = the caption."),
    )
    shuffle_tags: bool = field(default=False, metadata=help_("Shuffle the caption's comma-separated tags every step (A1111)."))
    tag_drop_out: float = field(default=0.0, metadata=help_("Drop each caption tag with this probability every step (A1111)."))
    latent_sampling_method: str = field(
        default="once",
        metadata=help_("once: sample the VAE latent once; deterministic: its mean; random: a new sample every step (A1111).",
                       "advanced", LATENT_SAMPLING_METHODS),
    )
    clip_grad_mode: str | None = field(
        default=None, metadata=help_("A1111 gradient clipping: value or norm (off when unset).", "advanced", CLIP_GRAD_MODES)
    )
    clip_grad_value: str = field(
        default="0.1", metadata=help_("Clipping limit: a number or a schedule string like learning_rate.", "advanced")
    )
    save_optimizer_state: bool = field(
        default=True, metadata=help_("Write <file>.pt.optim next to every saved .pt, so training can resume from it (A1111).")
    )

    def structure(self) -> HypernetworkStructure:
        """The creation options as a :class:`HypernetworkStructure`."""
        return HypernetworkStructure(**{f.name: getattr(self, f.name) for f in fields(HypernetworkStructure)})

    def checked(self, where: Where = "config") -> HypernetworkTrainConfig:
        """Also every rate of the learning_rate (and clip_grad_value) schedule: a number or an A1111
        schedule whose rates are all positive (refused before any model loads)."""
        super().checked(where)
        if self.train_data_dir:
            check_at_least(self, where, "resolution", 64, "kohya buckets are multiples of 64 px: set resolution = 512")
        _check_schedule(self, where, "learning_rate", "set learning_rate = '0.00001' (A1111's default) or a "
                                                      "schedule like '5e-5:100, 5e-6:1500, 5e-7'")
        if self.clip_grad_mode:
            _check_schedule(self, where, "clip_grad_value", "set clip_grad_value = '0.1', or remove clip_grad_mode",
                            allow_zero=True)  # a limit of 0 holds the weights still (A1111)
        return self


def _check_schedule(config, where: Where, name: str, fix: str, allow_zero: bool = False) -> None:
    from nbkit.train.schedules import a1111_schedule, is_a1111_schedule

    text = str(getattr(config, name)).strip()
    if not is_a1111_schedule(text):
        raise config_error(where, name, text, f"write a number or a schedule; {fix}")
    try:
        rates = [rate for rate, _ in a1111_schedule(text, max_steps=2**62)]
    except ConfigError:
        raise config_error(where, name, text, f"write a number or a schedule; {fix}") from None
    bad = next((rate for rate in rates if rate < 0 or (rate == 0 and not allow_zero)), None)
    if bad is not None:
        raise config_error(where, name, text, f"the value {bad:g} is not positive; {fix}")


def check_hypernetwork_config(config: HypernetworkTrainConfig) -> None:
    """Refuse options this trainer would otherwise ignore, and values no run can train with, naming the fix."""
    config.checked()
    defaults = HypernetworkTrainConfig()
    for name, fix in _UNSUPPORTED.items():
        if getattr(config, name) != getattr(defaults, name):
            raise ConfigError(f"{name} = {getattr(config, name)!r}: {fix}")
    if not 0 <= config.tag_drop_out < 1:
        raise ConfigError(f"tag_drop_out = {config.tag_drop_out}: use a probability in [0, 1)")
    if config.clip_grad_mode and config.max_grad_norm:
        raise ConfigError("both clip_grad_mode and max_grad_norm are set: keep one (clip_grad_mode can be scheduled)")
