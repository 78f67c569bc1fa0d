"""Settings chosen to fit a GPU: the largest batch that fits, and ``auto_fit`` for a training config.

``auto_fit`` chooses, among the settings that fit with the headroom, the one with the most images per
second by the time model (:func:`nbkit.estimate.flops.estimate_step_seconds`), over these levers:

- the micro-batch (``train_batch_size``), keeping the effective batch the config asks for
  (``train_batch_size x gradient_accumulation_steps``) through ``gradient_accumulation_steps``;
- ``gradient_checkpointing`` (checkpointed blocks run their forward twice: slower, far less memory);
- ``cache_text_encoder_outputs`` for a frozen text encoder, when the captions never change
  (``fixed_captions``: the trainer refuses the cache otherwise);
- ``sdpa`` (the memory-efficient attention kernel), switched on when off;
- ``optimizer_type``: the config's, else AdamW8bit when nothing fits with it (a memory lever only:
  it changes the training, so it is never chosen for speed).

Options named in ``fixed`` (what the user set explicitly) are never changed. Each change comes back as
a sentence saying what and why, the last one comparing the chosen speed with the runner-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from nbkit.estimate.estimator import estimate
from nbkit.estimate.flops import estimate_step_seconds
from nbkit.estimate.setting import GPU_MEMORY_GIB, GPUS, Estimate, Setting, setting_from_config

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


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A setting that fits, its estimate and (with ``prefer_speed``) its estimated images per second."""

    setting: Setting
    estimate: Estimate
    images_per_second: float = 0.0


def auto_fit(config, method: str | None = None, gpu_gib: float | str = 15.0, headroom_gib: float = 1.0,
             arch: str | None = None, max_batch: int | None = None, prefer_speed: bool = True,
             fixed: Iterable[str] = (), fixed_captions: bool = False):
    """A copy of ``config`` that fits ``gpu_gib`` with ``headroom_gib`` to spare, its estimate, and the
    changes made, as sentences. Raises :class:`FitError` when nothing fits.

    ``prefer_speed``: the fastest fitting setting (module doc); otherwise the config's own
    ``gradient_checkpointing`` and text caching where they fit, with the largest micro-batch.
    ``max_batch`` caps the micro-batch; ``fixed``: option names never to change; ``fixed_captions``:
    the dataset's captions never change (no shuffle_caption, caption dropout, wildcards), so text
    caching is a lever."""
    setting = setting_from_config(config, method, arch)
    fixed = frozenset(fixed)
    gpu = gpu_memory(gpu_gib)
    speed_gpu = gpu_gib if isinstance(gpu_gib, str) and gpu_gib in GPUS else "T4"
    effective = setting.train_batch_size * setting.gradient_accumulation_steps
    micro = _micro_batches(setting, effective, max_batch, fixed)
    # the hypernetwork trainer decides its text caching itself (from shuffle_tags / tag_drop_out)
    can_cache = (fixed_captions and hasattr(config, "cache_text_encoder_outputs") and setting.method != "hypernetwork"
                 and not setting.trains_text_encoder)
    optimizers = [setting.optimizer_type]
    if "optimizer_type" not in fixed and "8bit" not in setting.optimizer_type.lower():
        optimizers.append(EIGHT_BIT)
    candidates: list[Candidate] = []
    for optimizer in optimizers:  # the config's optimizer whenever anything fits with it
        for levers in _levers(setting, fixed, can_cache, prefer_speed):
            found = _largest_micro_batch(setting.replace(optimizer_type=optimizer, **levers), micro, effective,
                                         gpu, headroom_gib)
            if found is not None:
                candidates.append(found)
                if not prefer_speed:
                    break
        if candidates:
            break
    if not candidates:
        raise FitError(_nothing_fits(setting, gpu, headroom_gib, fixed))
    if prefer_speed:
        candidates = [dataclasses.replace(c, images_per_second=effective / estimate_step_seconds(c.setting, speed_gpu))
                      for c in candidates]
        candidates.sort(key=lambda c: (-round(c.images_per_second, 4), c.estimate.peak_gib))
    best = candidates[0]
    changes = _changes(setting, best.setting)
    if prefer_speed:
        changes.append(_why(best, candidates[1:], speed_gpu))
    names = {f.name for f in dataclasses.fields(config)}
    values = {name: getattr(best.setting, name) for name in _CHOSEN if name in names}
    if hasattr(config, "xformers") and not best.setting.sdpa:
        values.pop("sdpa", None)  # xformers stands for the same kernel
    return dataclasses.replace(config, **values), best.estimate, changes


#: the options auto_fit chooses (Setting fields of the same names as the configs')
_CHOSEN = ("train_batch_size", "gradient_accumulation_steps", "optimizer_type", "gradient_checkpointing",
           "cache_text_encoder_outputs", "sdpa")


def _micro_batches(setting: Setting, effective: int, max_batch: int | None, fixed: frozenset) -> list[int]:
    """Micro-batches that keep the effective batch (divisors of it), largest first."""
    if "train_batch_size" in fixed or "gradient_accumulation_steps" in fixed:
        return [setting.train_batch_size]
    cap = max_batch or effective
    return [b for b in range(min(cap, effective), 0, -1) if effective % b == 0]


def _levers(setting: Setting, fixed: frozenset, can_cache: bool, prefer_speed: bool) -> list[dict]:
    """The speed/memory lever settings to try, the config's own values first."""
    def values(name: str, options: list) -> list:
        own = getattr(setting, name)
        return [own] if name in fixed else list(dict.fromkeys([own, *options]))

    checkpointing = values("gradient_checkpointing", [False, True] if prefer_speed else [True])
    caching = values("cache_text_encoder_outputs", [True] if can_cache else [])
    sdpa = [setting.sdpa] if "sdpa" in fixed else [True]
    return [{"gradient_checkpointing": gc, "cache_text_encoder_outputs": cache, "sdpa": attention}
            for cache in caching for gc in checkpointing for attention in sdpa]


def _largest_micro_batch(setting: Setting, micro: list[int], effective: int, gpu: float,
                         headroom: float) -> Candidate | None:
    for batch in micro:
        trial = setting.replace(train_batch_size=batch, gradient_accumulation_steps=max(1, effective // batch))
        found = estimate(trial)
        if found.fits(gpu, headroom):
            return Candidate(trial, found)
    return None


def _describe(setting: Setting) -> str:
    accumulation = (f" x{setting.gradient_accumulation_steps} accumulation"
                    if setting.gradient_accumulation_steps > 1 else "")
    return (f"batch {setting.train_batch_size}{accumulation}, gradient checkpointing "
            f"{'on' if setting.gradient_checkpointing else 'off'}"
            + (", text encoder outputs cached" if setting.cache_text_encoder_outputs else ""))


def _why(best: Candidate, others: list[Candidate], gpu: str) -> str:
    line = (f"chose the fastest setting that fits: {_describe(best.setting)}, ~{best.images_per_second:.2f} "
            f"images/s on a {gpu} (time model), peak {best.estimate.peak_gib:.1f} GiB")
    if others:
        runner = others[0]
        line += (f"; next best {_describe(runner.setting)}: ~{runner.images_per_second:.2f} images/s, "
                 f"{runner.estimate.peak_gib:.1f} GiB")
    return line


def _changes(setting: Setting, chosen: Setting) -> list[str]:
    changes = []
    if chosen.train_batch_size != setting.train_batch_size:
        changes.append(f"train_batch_size {setting.train_batch_size} -> {chosen.train_batch_size}")
    if chosen.gradient_accumulation_steps != setting.gradient_accumulation_steps:
        changes.append(f"gradient_accumulation_steps {setting.gradient_accumulation_steps} -> "
                       f"{chosen.gradient_accumulation_steps} (keeps the effective batch of "
                       f"{chosen.train_batch_size * chosen.gradient_accumulation_steps})")
    if chosen.optimizer_type != setting.optimizer_type:
        changes.append(f"optimizer_type {setting.optimizer_type} -> {chosen.optimizer_type} (2 bytes of state per "
                       "weight instead of 8)")
    if chosen.gradient_checkpointing != setting.gradient_checkpointing:
        changes.append("gradient_checkpointing on (recomputes activations in the backward: less memory, "
                       "~20-30% slower)" if chosen.gradient_checkpointing else
                       "gradient_checkpointing off (fits without it; steps ~20-30% faster)")
    if chosen.cache_text_encoder_outputs != setting.cache_text_encoder_outputs:
        changes.append("cache_text_encoder_outputs on (captions never change: the text encoder leaves the GPU)"
                       if chosen.cache_text_encoder_outputs else "cache_text_encoder_outputs off")
    if chosen.sdpa != setting.sdpa:
        changes.append("sdpa on (the memory-efficient attention kernel: less memory, no slower)")
    return changes


def _nothing_fits(setting: Setting, gpu: float, headroom: float, fixed: frozenset = frozenset()) -> str:
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
    kept = f" (kept as set: {', '.join(sorted(fixed))})" if fixed else ""
    return (f"nothing fits {gpu:.1f} GiB with {headroom:.1f} GiB headroom{kept}: even batch 1 with gradient "
            f"checkpointing and AdamW8bit needs {smallest.peak_gib:.2f} GiB. Try "
            + ("; ".join(ideas) if ideas else "a GPU with more memory"))
