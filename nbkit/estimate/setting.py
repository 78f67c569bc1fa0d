"""What the estimator is asked about (:class:`Setting`, kohya option names) and what it answers
(:class:`Estimate`), plus the GPUs it knows.

Units: every ``*_gib`` number is GiB (2**30 bytes), the unit of ``nvidia-smi``'s MiB / 1024 and of
Colab's "15 GiB" T4. Published "GB" figures are 10**9 bytes (see ``nbkit.estimate.calibration``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GIB = 2**30
GB = 10**9
METHODS = ("lora", "dreambooth", "hypernetwork")
ARCHS = ("sd15", "sd21", "sd21-v", "sdxl")


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what nvidia-smi reports as total (MiB / 1024)
    fp16_tflops: float  # dense fp16 tensor-core peak
    bandwidth_gbs: float  # memory bandwidth, GB/s


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("T4", 15.0, 65.0, 320.0),  # 15360 MiB; Turing sm_75, no bf16
    GPU("L4", 22.0, 121.0, 300.0),  # 22.5 GiB on Colab (23034 MiB); 22 keeps a margin
    GPU("V100", 16.0, 125.0, 900.0),  # 16 GB SXM2
    GPU("A100-40GB", 40.0, 312.0, 1555.0),
    GPU("A100-80GB", 80.0, 312.0, 2039.0),
)}
#: GPU name -> memory the estimator may plan for, GiB
GPU_MEMORY_GIB: dict[str, float] = {name: gpu.memory_gib for name, gpu in GPUS.items()}


@dataclass(frozen=True)
class Setting:
    """One training step to simulate. Field names are the kohya options of nbkit's configs."""

    method: str  # lora | dreambooth | hypernetwork
    arch: str = "sd15"  # sd15 | sd21 | sd21-v | sdxl
    resolution: int = 512
    train_batch_size: int = 1
    gradient_checkpointing: bool = True
    optimizer_type: str = "AdamW8bit"
    mixed_precision: str = "fp16"  # fp16 | bf16 | no
    train_text_encoder: bool = False
    network_dim: int = 16
    conv_dim: int | None = None
    use_ema: bool = False
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = False
    gradient_accumulation_steps: int = 1
    # diffusers/ShivamShrirao DreamBooth: each step's batch is train_batch_size instance images plus as
    # many class images, so the U-Net sees twice the batch. nbkit (like kohya) shuffles class images into
    # the same batches instead: leave it False for nbkit runs.
    with_prior_preservation: bool = False
    ema_on_cpu: bool = True  # nbkit's DreamBooth default: the EMA copy lives in system RAM
    sdpa: bool = True  # memory-efficient attention (SDPA or xformers); False: kohya's naive N x N attention
    full_fp16: bool = False  # kohya --full_fp16: trainable weights in fp16 too (no fp32 master weights)
    max_token_length: int | None = None  # 75 (None), 150 or 225: the caption is 1, 2 or 3 CLIP chunks
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)  # hypernetwork
    # None: torch's default on a GPU (foreach optimizers, torch >= 2.0); False: the one-tensor-at-a-time
    # loop of torch 1.12 (the published T4 table was measured with it).
    foreach: bool | None = None
    unet_config: dict | None = field(default=None, compare=False, hash=False)  # simulate another UNet
    unet_config_key: str | None = None  # a digest of unet_config (set automatically): part of the cache key

    def __post_init__(self) -> None:
        if self.unet_config is not None and self.unet_config_key is None:
            object.__setattr__(self, "unet_config_key", _digest(self.unet_config))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.mixed_precision not in ("fp16", "bf16", "no"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose fp16, bf16 or no")
        if self.resolution % 64 or self.resolution < 64:
            raise ValueError(f"resolution={self.resolution}: use a multiple of 64")
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("train_batch_size and gradient_accumulation_steps must be at least 1")

    @property
    def unet_batch(self) -> int:
        return self.train_batch_size * (2 if self.with_prior_preservation else 1)

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder and self.method != "hypernetwork"

    @property
    def text_encoder_on_gpu(self) -> bool:
        """A frozen text encoder with cached outputs leaves the GPU (nbkit, kohya, A1111)."""
        return self.trains_text_encoder or not self.cache_text_encoder_outputs

    def replace(self, **changes) -> Setting:
        if "unet_config" in changes:
            changes.setdefault("unet_config_key", None)
        return dataclasses.replace(self, **changes)


def _digest(config: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Estimate:
    """Simulated peak GPU memory of one training step, with its parts (GiB)."""

    peak_gib: float
    breakdown: dict[str, float]
    setting: Setting
    notes: list[str] = field(default_factory=list)
    params: dict[str, int] = field(default_factory=dict)  # parameter counts ("trainable")

    @property
    def peak_gb(self) -> float:
        return self.peak_gib * GIB / GB

    def fits(self, gpu_gib: float, headroom_gib: float = 1.0) -> bool:
        return self.peak_gib + headroom_gib <= gpu_gib

    def summary(self) -> str:
        s = self.setting
        text = s.trains_text_encoder
        head = (f"{s.method} {s.arch} {s.resolution}px batch {s.train_batch_size}"
                f"{f' x{s.gradient_accumulation_steps} accumulation' if s.gradient_accumulation_steps > 1 else ''}, "
                f"{s.optimizer_type}, mixed_precision={s.mixed_precision}, gradient checkpointing "
                f"{'on' if s.gradient_checkpointing else 'off'}, text encoder "
                f"{'trained' if text else 'cached (off the GPU)' if not s.text_encoder_on_gpu else 'frozen'}")
        if s.method == "lora":
            head += f", network_dim {s.network_dim}" + (f", conv_dim {s.conv_dim}" if s.conv_dim else "")
        parts = {name: value for name, value in self.breakdown.items() if value >= 0.005}
        width = max(map(len, parts), default=4)
        lines = [head, f"  {'part':<{width}}    GiB"]
        lines += [f"  {name:<{width}} {value:6.2f}" for name, value in parts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  peak {self.peak_gib:.2f} GiB = {self.peak_gb:.2f} GB (10^9 bytes, the unit of published tables)")
        lines.append(f"peak={self.peak_gb:.2f}")  # GB: the last line, easy to parse
        return "\n".join(lines)


def micro_setting(setting: Setting) -> Setting:
    """The part of ``setting`` one forward + backward depends on (optimizer and accumulation do not)."""
    return setting.replace(optimizer_type="AdamW8bit", foreach=None, gradient_accumulation_steps=1, use_ema=False,
                           ema_on_cpu=True, train_batch_size=setting.unet_batch, with_prior_preservation=False)


def setting_from_config(config, method: str | None = None, arch: str | None = None) -> Setting:
    """A :class:`Setting` from any of the three training configs (kohya field names).

    ``arch`` defaults to ``"sd15"``, or ``"sd21-v"``/``"sd21"`` when the config's ``v2`` /
    ``v_parameterization`` fields say so."""
    method = method or method_of(config)
    if arch is None:
        arch = ("sd21-v" if getattr(config, "v_parameterization", None) else "sd21") if getattr(config, "v2", None) else "sd15"
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    if method == "lora":
        train_te = bool(get("train_text_encoder", not get("network_train_unet_only", False)))
    elif method == "dreambooth":
        train_te = bool(get("trains_text_encoder", get("train_text_encoder", False)))
    else:
        train_te = False
    cache_te = bool(get("cache_text_encoder_outputs", False))
    if method == "hypernetwork":  # the trainer moves the text encoder off when every prompt is fixed
        cache_te = not (get("shuffle_tags", False) or get("tag_drop_out", 0.0))
    if method == "dreambooth" and get("network_module"):
        method = "lora"  # "LoRA via DreamBooth" trains a LoRA
    structure = get("layer_structure", "1, 2, 1")
    if isinstance(structure, str):
        structure = [x for x in structure.strip("[]() ").split(",") if x.strip()]
    return Setting(
        method=method, arch=arch, resolution=int(get("resolution", 512)),
        train_batch_size=int(get("train_batch_size", 1)),
        gradient_checkpointing=bool(get("gradient_checkpointing", True)),
        optimizer_type=str(get("optimizer_type", "AdamW8bit")), mixed_precision=str(get("mixed_precision", "fp16")),
        train_text_encoder=train_te, network_dim=int(get("network_dim", 16) or 16), conv_dim=get("conv_dim"),
        use_ema=bool(get("use_ema", False)), ema_on_cpu=bool(get("ema_on_cpu", True)),
        cache_latents=bool(get("cache_latents", True)), cache_text_encoder_outputs=cache_te,
        gradient_accumulation_steps=int(get("gradient_accumulation_steps", 1)),
        full_fp16=bool(get("full_fp16", False)), max_token_length=get("max_token_length"),
        sdpa=bool(get("sdpa", True) or get("xformers", False)),
        layer_structure=tuple(float(x) for x in structure),
    )


def method_of(config) -> str:
    """lora / dreambooth / hypernetwork from the config class."""
    name = type(config).__name__.lower()
    for method in ("hypernetwork", "dreambooth", "lora"):
        if method in name:
            return method
    raise ValueError(f"cannot tell the training method of {type(config).__name__}: pass method=")
