"""Settings chosen to fit a GPU: the largest batch that fits, and ``auto_fit`` for a training config.

``auto_fit`` keeps what it can of the config and changes, in this order of preference, only
``train_batch_size`` (never above the config's, unless ``max_batch`` says so), ``optimizer_type``
(the config's, else AdamW8bit) and ``gradient_checkpointing`` (off when the run fits without it: a
step is about 20-30% faster, since checkpointed blocks run their forward twice).
"""

from __future__ import annotations

import dataclasses

from nbkit.estimate.estimator import estimate
from nbkit.estimate.setting import GPU_MEMORY_GIB, Estimate, Setting, setting_from_config

EIGHT_BIT = "AdamW8bit"


class FitError(ValueError):
    """No setting fits the GPU; the message says what was tried and what else could help."""


def gpu_memory(gpu: float | str) -> float:
    """GiB for a GPU name (``"T4"``) or a number."""
    if isinstance(gpu, str):
        if gpu in GPU_MEMORY_GIB:
            return GPU_MEMORY_GIB[gpu]
        try:
            return float(gpu)
        except ValueError:
            raise ValueError(f"unknown GPU {gpu!r}: use one of {', '.join(GPU_MEMORY_GIB)} or a number of GiB") from None
    return float(gpu)


def largest_batch(setting: Setting, gpu_gib: float | str = 15.0, headroom_gib: float = 1.0,
                  max_batch: int = 16) -> tuple[int, Estimate]:
    """The largest ``train_batch_size`` up to ``max_batch`` that fits ``gpu_gib`` with ``headroom_gib``
    to spare, and its estimate (0 and the batch-1 estimate when even batch 1 does not fit).

    Memory grows about linearly with the batch: batches 1 and 2 are simulated, the line through them
    gives a first guess, and simulations around it settle the answer."""
    budget = gpu_memory(gpu_gib) - headroom_gib
    at = lambda b: estimate(setting.replace(train_batch_size=b))  # noqa: E731
    first = at(1)
    if first.peak_gib > budget or max_batch == 1:
        return (0 if first.peak_gib > budget else 1), first
    second = at(2)
    if second.peak_gib > budget:
        return 1, first
    slope = max(second.peak_gib - first.peak_gib, 1e-3)
    batch = min(max_batch, 2 + int((budget - second.peak_gib) / slope))
    best = (2, second)
    while batch > 2:
        guess = at(batch)
        if guess.peak_gib <= budget:
            best = (batch, guess)
            break
        batch -= 1
    while best[0] < max_batch:
        bigger = at(best[0] + 1)
        if bigger.peak_gib > budget:
            break
        best = (best[0] + 1, bigger)
    return best


def auto_fit(config, method: str | None = None, gpu_gib: float | str = 15.0, headroom_gib: float = 1.0,
             arch: str | None = None, max_batch: int | None = None, prefer_speed: bool = True):
    """A copy of ``config`` that fits ``gpu_gib`` with ``headroom_gib`` to spare, its estimate, and the
    changes made, as sentences. Raises :class:`FitError` when nothing fits."""
    setting = setting_from_config(config, method, arch)
    want = max_batch or setting.train_batch_size
    optimizers = [setting.optimizer_type]
    if setting.optimizer_type.strip().lower() != EIGHT_BIT.lower() and "8bit" not in setting.optimizer_type.lower():
        optimizers.append(EIGHT_BIT)
    checkpointing = [False, True] if prefer_speed else list(dict.fromkeys([setting.gradient_checkpointing, True]))
    best: tuple[int, str, bool, Estimate] | None = None
    for optimizer in optimizers:
        for gc in checkpointing:
            batch, found = largest_batch(setting.replace(optimizer_type=optimizer, gradient_checkpointing=gc),
                                         gpu_gib, headroom_gib, want)
            if batch and (best is None or batch > best[0]):
                best = (batch, optimizer, gc, found)
            if batch == want:
                break
        if best and best[0] == want:
            break
    if best is None:
        raise FitError(_nothing_fits(setting, gpu_memory(gpu_gib), headroom_gib))
    batch, optimizer, gc, found = best
    changes = _changes(setting, batch, optimizer, gc)
    fitted = dataclasses.replace(config, train_batch_size=batch, optimizer_type=optimizer, gradient_checkpointing=gc)
    return fitted, found, changes


def _changes(setting: Setting, batch: int, optimizer: str, gc: bool) -> list[str]:
    changes = []
    if batch != setting.train_batch_size:
        changes.append(f"train_batch_size {setting.train_batch_size} -> {batch}")
    if optimizer != setting.optimizer_type:
        changes.append(f"optimizer_type {setting.optimizer_type} -> {optimizer} (2 bytes of state per weight "
                       "instead of 8)")
    if gc != setting.gradient_checkpointing:
        changes.append("gradient_checkpointing on (recomputes activations in the backward: less memory, "
                       "~20-30% slower)" if gc else
                       "gradient_checkpointing off (fits without it; steps ~20-30% faster)")
    return changes


def _nothing_fits(setting: Setting, gpu: float, headroom: float) -> str:
    smallest = estimate(setting.replace(train_batch_size=1, gradient_checkpointing=True, optimizer_type=EIGHT_BIT))
    ideas = []
    if setting.method == "dreambooth":
        ideas.append("train a LoRA instead (method lora, or network_module=networks.lora)")
    if setting.trains_text_encoder:
        ideas.append("stop training the text encoder (network_train_unet_only / train_text_encoder=false)")
    if setting.text_encoder_on_gpu and not setting.trains_text_encoder:
        ideas.append("cache_text_encoder_outputs=true")
    if not setting.cache_latents:
        ideas.append("cache_latents=true")
    if setting.resolution > 512:
        ideas.append("a lower resolution")
    return (f"nothing fits {gpu:.1f} GiB with {headroom:.1f} GiB headroom: even batch 1 with gradient "
            f"checkpointing and AdamW8bit needs {smallest.peak_gib:.2f} GiB. Try "
            + ("; ".join(ideas) if ideas else "a GPU with more memory"))
