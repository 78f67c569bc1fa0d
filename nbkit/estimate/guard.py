"""Refuse, before any model loads, a run the estimator says cannot fit the GPU.

    from nbkit.estimate.guard import refuse_if_unfit
    refuse_if_unfit(config)          # a trainer's check: the CUDA GPU it runs on (none: nothing to check)
    refuse_if_unfit(config, "T4")    # or a named GPU / a size in GiB

Full SDXL fine-tuning (DreamBooth) is the case this is for: its fp32 U-Net alone is 10 GB, and with
gradients and 8-bit Adam states it needs a 40 GB card; on a T4 it would load for minutes and then stop
with CUDA out of memory. The verdict uses no headroom (the estimate itself must exceed the GPU), so a
run that might fit is never refused.
"""

from __future__ import annotations

from nbkit.estimate.estimator import estimate
from nbkit.estimate.fit import EIGHT_BIT, gpu_memory
from nbkit.estimate.setting import GPUS, Estimate, Setting, setting_from_config


def needed_gpu(peak_gib: float, headroom_gib: float = 1.0) -> str:
    """The smallest GPU the estimator knows with room for ``peak_gib`` plus ``headroom_gib``."""
    for gpu in sorted(GPUS.values(), key=lambda g: g.memory_gib):
        if peak_gib + headroom_gib <= gpu.memory_gib:
            return f"{gpu.name} ({gpu.memory_gib:g} GiB)"
    return f"a GPU with more than {max(g.memory_gib for g in GPUS.values()):g} GiB"


def _target(gpu) -> tuple[str, float] | None:
    """(label, GiB) of ``gpu``: None detects the CUDA GPU (None without one), a name or GiB, or a GpuInfo."""
    if gpu is None:
        from nbkit.colab import gpu_info

        gpu = gpu_info()
        if gpu is None:
            return None
    if isinstance(gpu, str):
        return gpu, gpu_memory(gpu)
    if isinstance(gpu, (int, float)):
        return f"a {gpu:g} GiB GPU", float(gpu)
    return str(getattr(gpu, "name", "GPU")), float(gpu.total_gib)


def leanest(setting: Setting) -> Setting:
    """The least memory the run could take without changing what it trains: batch 1, gradient
    checkpointing, AdamW8bit, latents cached, a frozen text encoder's outputs cached."""
    return setting.replace(train_batch_size=1, gradient_checkpointing=True, optimizer_type=EIGHT_BIT,
                           cache_latents=True, sdpa=True,
                           cache_text_encoder_outputs=setting.cache_text_encoder_outputs or not setting.trains_text_encoder)


def refuse_if_unfit(config, gpu=None, *, method: str | None = None, arch: str | None = None) -> Estimate | None:
    """The config's estimate when it fits ``gpu``; a :class:`nbkit.config.ConfigError` with the estimate
    and the GPU it would need when it does not; None when there is no GPU to check against (``gpu``
    None on a machine without CUDA). Reads the config only (the base model's family from its files on
    disk, :func:`nbkit.estimate.arch.config_arch`): call it before loading anything."""
    from nbkit.config import ConfigError

    target = _target(gpu)
    if target is None:
        return None
    label, gib = target
    setting = setting_from_config(config, method, arch)
    found = estimate(setting)
    if found.fits(gib, 0.0):
        return found
    what = f"{setting.method} {setting.arch} at {setting.resolution} px"
    message = (f"{what} does not fit {label} ({gib:.1f} GiB): the estimator puts its peak at "
               f"{found.peak_gib:.1f} GiB; it would need {needed_gpu(found.peak_gib)}")
    lean = leanest(setting)
    if lean != setting:
        lean_found = estimate(lean)
        if lean_found.fits(gib, 1.0):
            message += (f". With batch 1, gradient checkpointing, AdamW8bit and cached latents/text it needs "
                        f"{lean_found.peak_gib:.1f} GiB and fits: set those, or train with --auto_fit")
        else:
            message += (f"; even with batch 1, gradient checkpointing, AdamW8bit and cached latents/text it needs "
                        f"{lean_found.peak_gib:.1f} GiB ({needed_gpu(lean_found.peak_gib)})")
    if setting.method == "dreambooth":
        message += (". Train a LoRA instead" + (" (preset 'T4 SDXL LoRA')" if setting.arch == "sdxl" else
                                                 " (network_module = \"networks.lora\")"))
    raise ConfigError(message)
