"""Simulate the VRAM peak of one DreamBooth step with nbkit's T4 preset (SD1.5, 512 px), on a CPU.

    python bench/dreambooth_vram.py [--resolution 512] [--batch 1] [--no-checkpointing]

The real SD1.5 U-Net is built from nbkit/models/configs/sd15/unet/config.json on the meta device
(no memory, no GPU) with fp32 weights, as the run keeps its trainable master weights; the inputs
are fp16, as ``diffusion_loss`` passes them. One forward + backward runs under a TorchDispatchMode
that adds ``untyped_storage().nbytes()`` of every new output storage and subtracts it when the
storage dies (``weakref.finalize``), giving the live-bytes curve of the step (training-reference.md §6).

What the GPU does that the meta device does not, and how it is modelled here:

- fp16 autocast: autocast does not reach meta tensors, so the mode applies its policy itself:
  convolutions, matmuls and attention cast their inputs to fp16 (fp32 weights through a cast cache
  that lives until the forward ends, like autocast's), group/layer norm to fp32; gradients reach the
  fp32 weights as fp32 (autograd casts them back, as autocast's ``_to_copy`` backward does);
- SDPA: on a T4 it runs the memory-efficient kernel; ``F.scaled_dot_product_attention`` on meta would
  materialise every N x N score matrix, so attention is routed through
  ``aten._scaled_dot_product_efficient_attention`` (meta kernels for forward and backward);
- AdamW8bit: its two uint8 states (2 bytes/param, allocated at the first step) are counted as live
  before the step; the fp32 weights (4 bytes/param) too; the VAE and text encoder are off the GPU
  (latents and text embeddings cached), so they count 0.

Not modelled: the CUDA context, cuDNN/cuBLAS workspaces and the caching allocator's rounding and
fragmentation (a few hundred MB to ~1 GB); compare with the published figure with that in mind.
"""

from __future__ import annotations

import argparse
import time
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
CONFIG = Path(__file__).resolve().parents[1] / "nbkit" / "models" / "configs" / "sd15" / "unet"
PUBLISHED_GB = 9.92  # ShivamShrirao diffusers examples/dreambooth README, "Tested on Tesla T4" (fp16, bs1, GC, 8-bit Adam)
# torch.autocast's CUDA policy for the ops a SD U-Net calls (by torch-function name).
FP16_FUNCS = {"conv2d", "linear", "matmul", "__matmul__", "bmm", "baddbmm", "mm", "addmm", "scaled_dot_product_attention"}
FP32_FUNCS = {"group_norm", "layer_norm"}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created inside the mode (below autograd, so the
    backward's tensors and the gradients count too); the peak is the step's VRAM above the baseline."""

    def __init__(self, baseline_tensors: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self.known = {id(t.untyped_storage()) for t in baseline_tensors}  # counted outside the mode

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) in self.known:
            return  # a view, an in-place result, or a weight
        self.known.add(id(storage))
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, id(storage), nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self.known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


class AutocastSim(TorchFunctionMode):
    """fp16 autocast for meta tensors, applied where autocast applies it (above autograd): fp16 ops
    cast their inputs (fp32 weights through a cache that lives until the forward ends), fp32 ops
    upcast; SDPA runs the memory-efficient kernel a T4 uses (no N x N score matrix)."""

    def __init__(self):
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}
        self.caching = True

    def _cast(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        leaf = value.is_leaf and value.requires_grad  # autocast caches casts of trainable weights only
        if leaf and id(value) in self.cache:
            return self.cache[id(value)]
        out = value.to(dtype)
        if leaf and self.caching:
            self.cache[id(value)] = out
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FP16_FUNCS or name in FP32_FUNCS:
            dtype = torch.float16 if name in FP16_FUNCS else torch.float32
            args, kwargs = tree_map(lambda v: self._cast(v, dtype), (args, kwargs))
        if name == "scaled_dot_product_attention":
            return _efficient_sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def end_forward(self) -> None:
        """autocast empties its cast cache when the autocast region (the forward) ends; the backward's
        recomputed blocks cast again (each recompute's cache ends with it)."""
        self.cache.clear()
        self.caching = False


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without torch-function dispatch: a mode pauses while it handles a call, and the
    checkpointed blocks recompute (under the mode) inside backward."""
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p, is_causal,
                                                        scale=scale)[0]


def simulate(resolution: int, batch: int, checkpointing: bool, optimizer_bytes: float) -> dict[str, float]:
    """Bytes of one training step: weights, optimizer state, and the forward/backward peak."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG))  # fp32 master weights
    unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = list(unet.parameters())
    n = sum(p.numel() for p in params)
    weights, states = 4 * n, optimizer_bytes * n
    side = resolution // 8
    live, autocast = LiveBytes(params), AutocastSim()
    with live, autocast:
        noisy = torch.randn(batch, 4, side, side, dtype=torch.float16, device="meta")  # noisy.to(weight_dtype)
        cond = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=torch.float16, device="meta")
        timesteps = torch.randint(0, 1000, (batch,), device="meta")
        pred = unet(noisy, timesteps, cond).sample
        autocast.end_forward()
        forward_peak = live.peak
        target = torch.randn(batch, 4, side, side, device="meta")
        loss = ((pred.float() - target) ** 2).mean()
        del pred
        _backward(loss)
        grads = live.live
    return {"params": n, "weights": weights, "optimizer": states, "forward_peak": forward_peak,
            "step_peak": live.peak, "grads_after_backward": grads, "total_peak": weights + states + live.peak}


def main() -> None:
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig

    preset = DreamBoothTrainConfig()  # the T4 preset: the defaults
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=preset.resolution)
    parser.add_argument("--batch", type=int, default=preset.train_batch_size)
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    checkpointing = preset.gradient_checkpointing and not args.no_checkpointing
    state_bytes = {"AdamW8bit": 2.0, "AdamW": 8.0}.get(preset.optimizer_type, 8.0)
    started = time.perf_counter()
    r = simulate(args.resolution, args.batch, checkpointing, state_bytes)
    gb = 1e9
    print(f"SD1.5 U-Net full fine-tune, {args.resolution} px, batch {args.batch}, gradient checkpointing "
          f"{'on' if checkpointing else 'off'}, {preset.optimizer_type}, fp16 autocast over fp32 weights, SDPA "
          f"(mem-efficient), TE/VAE off the GPU  [simulated in {time.perf_counter() - started:.1f} s]")
    print(f"  parameters            {r['params'] / 1e6:8.1f} M")
    print(f"  fp32 weights          {r['weights'] / gb:8.2f} GB")
    print(f"  optimizer states      {r['optimizer'] / gb:8.2f} GB")
    print(f"  forward peak (+cast cache, activations) {r['forward_peak'] / gb:6.2f} GB")
    print(f"  grads after backward  {r['grads_after_backward'] / gb:8.2f} GB")
    print(f"  step peak over weights+states {r['step_peak'] / gb:6.2f} GB")
    print(f"  simulated peak        {r['total_peak'] / gb:8.2f} GB  ({r['total_peak'] / 2**30:.2f} GiB)")
    print(f"  published (T4)        {PUBLISHED_GB:8.2f} GB  -> difference {PUBLISHED_GB - r['total_peak'] / gb:+.2f} GB "
          "(CUDA context, workspaces, allocator)")


if __name__ == "__main__":
    main()
