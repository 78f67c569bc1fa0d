"""Performance evidence without a GPU: simulated T4 memory of a training step, step time from
FLOPs, and settings chosen to fit a GPU.

The real SD1.5 / SD2.1 / SDXL models run one training step on PyTorch's meta device (no weights,
no download) while a dispatch mode records every tensor allocation; the allocations are replayed
through a model of PyTorch's CUDA caching allocator, and a constant calibrated on published T4
measurements adds the CUDA context. All ``*_gib`` numbers are GiB (2**30 bytes).

    >>> from nbkit.estimate import Setting, estimate
    >>> print(estimate(Setting("lora", "sd15", train_batch_size=2, network_dim=32)).summary())
"""

from nbkit.estimate.estimator import estimate
from nbkit.estimate.fit import FitError, auto_fit, largest_batch
from nbkit.estimate.flops import count_flops, estimate_step_seconds
from nbkit.estimate.setting import GPU_MEMORY_GIB, GPUS, Estimate, Setting, setting_from_config

__all__ = ["GPUS", "GPU_MEMORY_GIB", "Estimate", "FitError", "Setting", "auto_fit", "count_flops", "estimate",
           "estimate_step_seconds", "largest_batch", "setting_from_config"]
