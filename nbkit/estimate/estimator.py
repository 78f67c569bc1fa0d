"""``estimate(setting)``: simulated peak GPU memory of one training step, with its parts.

peak = what the caching allocator reserves over two steady-state optimizer steps (simulated
tensors replayed through the allocator model) + a calibrated constant for the CUDA context and the
library workspaces (:mod:`nbkit.estimate.constants`, fitted by :mod:`nbkit.estimate.fit_constants`).
The parts are the live tensors at the moment of the most allocated bytes, the allocator's cache on
top of them, and that constant.
"""

from __future__ import annotations

from functools import lru_cache

from nbkit.estimate.constants import CONTEXT_BYTES
from nbkit.estimate.optimizer_memory import describe as describe_optimizer
from nbkit.estimate.optimizer_memory import known as known_optimizer
from nbkit.estimate.setting import GIB, Estimate, Setting
from nbkit.estimate.simulate import (
    ACTIVATIONS,
    CASTS,
    EMA,
    GRADS,
    STATES,
    STEP,
    TRAINABLE,
    WEIGHTS,
    record_step,
    replay,
)

ORDER = (WEIGHTS, TRAINABLE, EMA, GRADS, STATES, CASTS, ACTIVATIONS, STEP)
CACHE = "allocator cache (freed blocks kept)"
CONTEXT = "CUDA context + workspaces (calibrated)"


@lru_cache(maxsize=256)
def estimate(setting: Setting) -> Estimate:
    """Simulated peak GPU memory of one training step of ``setting`` (cached)."""
    record = record_step(setting)
    alloc = replay(record, setting)
    breakdown = {name: alloc.at_peak.get(name, 0) / GIB for name in ORDER if alloc.at_peak.get(name, 0)}
    breakdown[CACHE] = (alloc.peak_reserved - alloc.peak_allocated) / GIB
    breakdown[CONTEXT] = CONTEXT_BYTES / GIB
    notes = list(record.notes)
    if not known_optimizer(setting.optimizer_type):
        notes.append(describe_optimizer(setting.optimizer_type))
    if setting.method == "dreambooth" and setting.use_ema and setting.ema_on_cpu:
        notes.append("use_ema with ema_on_cpu: the EMA copy is in system RAM, not counted here")
    if setting.unet_batch != setting.train_batch_size:
        notes.append(f"prior preservation (diffusers style): the U-Net runs on batch {setting.unet_batch}")
    params = {"trainable": record.trainable_params}
    return Estimate(peak_gib=(alloc.peak_reserved + CONTEXT_BYTES) / GIB, breakdown=breakdown, setting=setting,
                    notes=notes, params=params)
