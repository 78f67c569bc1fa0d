"""One training step on the meta device, recorded as allocations, then replayed through the
caching-allocator model for the steady state of training.

:func:`record_step` runs the real forward and backward (autocast and attention as on a T4, see
:mod:`nbkit.estimate.modes`) and returns the order and size of every tensor allocation, which of
them become gradients, and the FLOPs. :func:`replay` lays out what a run holds on the GPU (weights,
EMA), then two optimizer steps of ``gradient_accumulation_steps`` micro-batches each, the
optimizer states being created at the first step, as every optimizer here creates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from nbkit.estimate.allocator import CachingAllocator
from nbkit.estimate.models import MetaModels, build_models, weight_dtype
from nbkit.estimate.modes import AllocationTrace, AutocastSim, Trace, run_backward
from nbkit.estimate.optimizer_memory import state_bytes, step_temporaries
from nbkit.estimate.setting import Setting, micro_setting

WEIGHTS, TRAINABLE, EMA = "frozen weights", "trainable weights", "EMA weights"
GRADS, STATES, STEP = "gradients", "optimizer states", "optimizer step temporaries"
ACTIVATIONS, CASTS = "activations and temporaries", "autocast weight copies"


@dataclass
class StepRecord:
    trace: Trace
    grad_ids: set[int]
    cast_ids: set[int]
    frozen: list[int]  # bytes of each frozen weight on the GPU
    trainable: list[tuple[tuple[int, ...], int]]  # (shape, element size) of each trainable tensor
    unet_trainable: int  # how many of ``trainable`` are U-Net weights (an EMA copies those)
    attention_calls: int
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return sum(math.prod(shape) for shape, _ in self.trainable)


def _text_length(setting: Setting) -> tuple[int, int]:
    """(CLIP chunks per caption, conditioning length): kohya joins 75-token chunks between one BOS/EOS."""
    chunks = max(1, (setting.max_token_length or 75) // 75)
    return chunks, 75 * chunks + 2


def _conditioning(models: MetaModels, setting: Setting, autocast: AutocastSim):
    """Text conditioning for the batch: the text encoders' forward, or cached outputs moved in."""
    batch, low = setting.unet_batch, weight_dtype(setting)
    chunks, length = _text_length(setting)
    if not models.text_encoders:
        cond = torch.randn(batch, length, models.context_dim, dtype=low, device=models.device)
        pooled = torch.randn(batch, 1280, dtype=low, device=models.device) if models.sdxl else None
        return cond, pooled
    ids = torch.zeros(batch * chunks, 77, dtype=torch.long, device=models.device)
    with torch.set_grad_enabled(setting.trains_text_encoder):
        if not models.sdxl:
            hidden = models.text_encoders[0](ids)[0]
            autocast.end_region()
            return hidden.reshape(batch, chunks * 77, -1)[:, :length], None
        first = models.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2]
        autocast.end_region()
        out = models.text_encoders[1](ids, output_hidden_states=True)
        autocast.end_region()
        cond = torch.cat([first, out.hidden_states[-2]], dim=-1).reshape(batch, chunks * 77, -1)[:, :length]
        return cond, out.text_embeds[:batch]


def _latents(models: MetaModels, setting: Setting, autocast: AutocastSim) -> torch.Tensor:
    batch, side = setting.unet_batch, setting.resolution // 8
    if models.vae is None:
        return torch.randn(batch, 4, side, side, device=models.device)
    pixels = torch.randn(batch, 3, setting.resolution, setting.resolution, device=models.device)
    dtype, autocast.dtype = autocast.dtype, None  # the VAE encodes in fp32, outside autocast
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample()
    autocast.dtype = dtype
    return latents


def forward_backward(models: MetaModels, setting: Setting, autocast: AutocastSim, trace: Trace) -> None:
    """nbkit's step: conditioning, noise, U-Net forward under autocast, fp32 loss, backward."""
    low = weight_dtype(setting)
    cond, pooled = _conditioning(models, setting, autocast)
    x0 = _latents(models, setting, autocast)
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, 1000, (x0.shape[0],), device=models.device)
    noisy = x0 * 0.5 + noise * 0.5
    extra = {}
    if models.sdxl:
        extra["added_cond_kwargs"] = {"text_embeds": pooled.to(low),
                                      "time_ids": torch.zeros(x0.shape[0], 6, dtype=low, device=models.device)}
    pred = models.unet(noisy.to(low), timesteps, cond.to(low), **extra).sample.float()  # accelerate: fp32 outputs
    loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mean()
    autocast.end_region()
    trace.mark("forward_end")
    del pred, cond, pooled, x0, noisy, extra
    autocast.stop_caching()
    run_backward(loss)
    trace.mark("backward_end")


@lru_cache(maxsize=32)
def _record(setting: Setting) -> StepRecord:
    """Build the meta models and record one micro-batch's forward and backward."""
    models = build_models(setting)
    trace = Trace()
    known = list(models.frozen) + list(models.trainable)
    tracer = AllocationTrace(trace, known)
    autocast = AutocastSim(weight_dtype(setting) if setting.mixed_precision != "no" else None, setting.sdpa)
    casts: set[int] = set()
    autocast.on_cached = lambda tensor: casts.add(tracer.allocation_of(tensor))
    with tracer, autocast:
        forward_backward(models, setting, autocast, trace)
        grad_ids = {tracer.allocation_of(p.grad) for p in models.trainable if p.grad is not None}
    tracer.trace = Trace()  # later frees (the gradients': the optimizer's business) are not recorded
    for p in models.trainable:
        p.grad = None
    trainable = [(tuple(p.shape), p.element_size()) for p in models.trainable]
    unet_ids = {id(p) for p in models.unet.parameters()}
    return StepRecord(trace=trace, grad_ids=grad_ids - {None}, cast_ids=casts - {None},
                      frozen=[p.numel() * p.element_size() for p in models.frozen], trainable=trainable,
                      unet_trainable=sum(id(p) in unet_ids for p in models.trainable),
                      attention_calls=autocast.attention_calls,
                      notes=list(models.notes))


def record_step(setting: Setting) -> StepRecord:
    """The recorded micro-batch of ``setting`` (cached: optimizer and accumulation do not change it)."""
    return _record(micro_setting(setting))


def _replay_micro(alloc: CachingAllocator, record: StepRecord, keep_grads: bool) -> list[int | None]:
    """One forward + backward; returns the gradient blocks it leaves allocated."""
    sizes, live, grads = record.trace.sizes, {}, []
    for event in record.trace.events:
        if event < 0:
            alloc.free(live.pop(-event, None))
            continue
        if event in record.grad_ids:
            addr = alloc.malloc(sizes[event], GRADS)
            if keep_grads:
                grads.append(addr)
            else:  # accumulation: the new gradient is added into .grad, then freed
                alloc.free(addr)
            continue
        live[event] = alloc.malloc(sizes[event], CASTS if event in record.cast_ids else ACTIVATIONS)
    for addr in live.values():
        alloc.free(addr)
    return grads


def replay(record: StepRecord, setting: Setting, steps: int = 2) -> CachingAllocator:
    """Weights, then ``steps`` optimizer steps of ``gradient_accumulation_steps`` micro-batches."""
    alloc = CachingAllocator()
    for nbytes in record.frozen:
        alloc.malloc(nbytes, WEIGHTS)
    for shape, element in record.trainable:
        alloc.malloc(math.prod(shape) * element, TRAINABLE)
    if setting.method == "dreambooth" and setting.use_ema and not setting.ema_on_cpu:
        for shape, _ in record.trainable[:record.unet_trainable]:
            alloc.malloc(4 * math.prod(shape), EMA)
    name = setting.optimizer_type
    for step in range(steps):
        grads: list[int | None] = []
        for micro in range(setting.gradient_accumulation_steps):
            grads += _replay_micro(alloc, record, keep_grads=micro == 0)
        if step == 0:
            for shape, element in record.trainable:
                alloc.malloc(state_bytes(name, shape, element), STATES)
        temporaries = step_temporaries(name, [s for s, _ in record.trainable],
                                                        record.trainable[0][1] if record.trainable else 4,
                                                        setting.foreach)
        blocks = [alloc.malloc(n, STEP) for n in temporaries]
        for addr in blocks + grads:
            alloc.free(addr)
    return alloc
