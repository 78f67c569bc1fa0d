"""Step time from FLOPs: ``torch.utils.flop_counter`` on the same meta-device step the memory
simulation runs (checkpointed blocks are counted twice, as the GPU computes them twice).

One optimizer step on a GPU is modelled as

    t = accumulation x (FLOPs per micro-batch / (utilisation x peak) + seconds per micro-batch)
        + weight-sized traffic / memory bandwidth

- *utilisation*: the share of the tensor-core peak (T4: 65 TFLOPS fp16, 8.1 fp32) that training
  reaches, fitted on the published T4 DreamBooth step times (:mod:`nbkit.estimate.fit_constants`;
  training-reference.md §3 has inference at about 16% of the fp16 peak). It is applied to other GPUs
  as the same share of their peak, which is optimistic for the faster ones.
- *seconds per micro-batch*: what does not shrink with the batch: kernel launches, Python, the
  per-tensor optimizer and clipping loops (fitted too; a T4 is launch-bound at batch 1-2).
- *weight-sized traffic*: a full fine-tune casts its fp32 weights to fp16 each forward (and again
  for recomputed blocks), casts the weight gradients to fp32, unscales and clips them, and the
  optimizer reads and writes weights, gradients and states: bytes per trainable parameter.

The shipped constants are in :mod:`nbkit.estimate.constants`; docs/estimator.md has the fit and its
error on the published rows.
"""

from __future__ import annotations

from functools import lru_cache

from nbkit.estimate.setting import GPUS, Setting, micro_setting

FP32_TFLOPS = {"T4": 8.1, "L4": 30.3, "V100": 15.7, "A100-40GB": 19.5, "A100-80GB": 19.5}
_CAST, _GRAD, _UNSCALE_CLIP = 6, 6, 12  # bytes read + written per trainable parameter


@lru_cache(maxsize=64)
def _micro_flops(setting: Setting) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from nbkit.estimate.models import build_models, weight_dtype
    from nbkit.estimate.modes import AutocastSim, Trace
    from nbkit.estimate.simulate import forward_backward

    models = build_models(setting)
    autocast = AutocastSim(weight_dtype(setting) if setting.mixed_precision != "no" else None, setting.sdpa)
    counter = FlopCounterMode(display=False)
    with counter, autocast:
        forward_backward(models, setting, autocast, Trace())
    return int(counter.get_total_flops())


def count_flops(setting: Setting) -> int:
    """FLOPs of one optimizer step (forward, backward and recomputation of every micro-batch)."""
    return _micro_flops(micro_setting(setting)) * setting.gradient_accumulation_steps


def traffic_bytes(setting: Setting, trainable_params: int) -> float:
    """Weight-sized memory traffic of one optimizer step (casts, gradient handling, update)."""
    from nbkit.estimate.optimizer_memory import state_bytes

    state = state_bytes(setting.optimizer_type, (1 << 20,), 4) / (1 << 20)
    optimizer = 12 + 2 * state  # read weights, gradients, states; write weights, states
    casts = _CAST * (2 if setting.gradient_checkpointing else 1) if setting.mixed_precision != "no" else 0
    per_micro = casts + _GRAD
    return trainable_params * (per_micro * setting.gradient_accumulation_steps + _UNSCALE_CLIP + optimizer)


def step_seconds(flops: float, traffic: float, setting: Setting, gpu: str = "T4",
                 speed: tuple[float, float, float] | None = None) -> float:
    """Seconds per optimizer step; ``speed`` is (fp16 utilisation, fp32 utilisation, seconds per
    micro-batch), the shipped constants when None."""
    if speed is None:
        from nbkit.estimate.constants import MICRO_BATCH_SECONDS, UTILISATION_FP16, UTILISATION_FP32

        speed = (UTILISATION_FP16, UTILISATION_FP32, MICRO_BATCH_SECONDS)
    fp16, fp32, micro = speed
    spec = GPUS[gpu]
    half = setting.mixed_precision != "no"
    rate = (fp16 * spec.fp16_tflops if half else fp32 * FP32_TFLOPS[gpu]) * 1e12
    return flops / rate + micro * setting.gradient_accumulation_steps + traffic / (spec.bandwidth_gbs * 1e9)


def estimate_step_seconds(setting: Setting, gpu: str = "T4") -> float:
    """Seconds per optimizer step on ``gpu`` (T4, L4, V100, A100-40GB, A100-80GB); see the module doc."""
    from nbkit.estimate.estimator import estimate

    if gpu not in GPUS:
        raise ValueError(f"gpu={gpu!r}: choose one of {', '.join(GPUS)}")
    params = estimate(setting).params.get("trainable", 0)
    return step_seconds(count_flops(setting), traffic_bytes(setting, params), setting, gpu)
