"""The two modes that turn a meta-device training step into a GPU memory trace.

- :class:`AllocationTrace` (a ``TorchDispatchMode``, below autograd): every new output storage is
  an allocation, freed when the storage dies (``weakref.finalize``), so the backward's tensors, the
  recomputed checkpoint blocks and the gradients are all seen, in the order a GPU would see them.
- :class:`AutocastSim` (a ``TorchFunctionMode``, above autograd): autocast does not reach meta
  tensors, so its CUDA policy is applied here, and attention goes through the memory-efficient
  SDPA kernel a T4 runs (training-reference.md §4, §6).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten

# torch.autocast's CUDA policy for the functions a SD U-Net and CLIP call (by torch-function name).
LOW_PRECISION_FUNCS = frozenset({"conv2d", "linear", "matmul", "__matmul__", "bmm", "baddbmm", "mm", "addmm",
                                 "scaled_dot_product_attention", "einsum"})
FP32_FUNCS = frozenset({"group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "cumsum", "exp", "pow"})


@dataclass
class Trace:
    """Allocations and frees of one simulated step, in order.

    ``events`` holds ``+k`` for "allocation k made" and ``-k`` for "allocation k freed"; ``sizes[k]`` is
    its byte count. ``marks`` names event positions (e.g. ``"forward_end"``)."""

    events: list[int] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    live: int = 0
    peak: int = 0

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.events)


class AllocationTrace(TorchDispatchMode):
    """Records each storage created inside the mode (weights made before it are not counted)."""

    def __init__(self, trace: Trace, known_tensors: list[torch.Tensor] = ()):
        super().__init__()
        self.trace = trace
        self.ids: dict[int, int] = {}  # id(storage) -> allocation number
        self.preexisting = {id(t.untyped_storage()) for t in known_tensors}

    def allocation_of(self, tensor: torch.Tensor) -> int | None:
        return self.ids.get(id(tensor.untyped_storage()))

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.ids or key in self.preexisting:
            return  # a view, an in-place result, an input passed through, or a weight
        number = len(self.trace.sizes) + 1
        nbytes = storage.nbytes()
        self.ids[key] = number
        self.trace.sizes[number] = nbytes
        self.trace.events.append(number)
        self.trace.live += nbytes
        self.trace.peak = max(self.trace.peak, self.trace.live)
        weakref.finalize(storage, self._free, key, number, nbytes)

    def _free(self, key: int, number: int, nbytes: int) -> None:
        self.ids.pop(key, None)
        self.trace.events.append(-number)
        self.trace.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                self._track(value)
        return out


class AutocastSim(TorchFunctionMode):
    """fp16/bf16 autocast for meta tensors, applied where autocast applies it.

    Low-precision functions cast their floating inputs (trainable fp32 weights through a cast cache
    that lives until the autocast region ends, as autocast's does); fp32 functions upcast. With
    ``dtype=None`` (mixed_precision "no") nothing is cast. Attention always runs the
    memory-efficient kernel; ``attention_calls`` counts how often, so tests can check the route."""

    def __init__(self, dtype: torch.dtype | None, efficient_attention: bool = True):
        super().__init__()
        self.dtype = dtype
        self.efficient_attention = efficient_attention
        self.cache: dict[int, torch.Tensor] = {}
        self.caching = True
        self.attention_calls = 0
        self.on_cached = lambda tensor: None  # told about each weight copy the cache keeps

    def _cast(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        cacheable = value.is_leaf and value.requires_grad  # autocast caches casts of trainable weights only
        if cacheable and id(value) in self.cache:
            return self.cache[id(value)]
        out = value.to(dtype)
        if cacheable and self.caching:
            self.cache[id(value)] = out
            self.on_cached(out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None and (name in LOW_PRECISION_FUNCS or name in FP32_FUNCS):
            dtype = self.dtype if name in LOW_PRECISION_FUNCS else torch.float32
            args, kwargs = tree_map(lambda v: self._cast(v, dtype), (args, kwargs))
        if name == "scaled_dot_product_attention":
            self.attention_calls += 1
            if self.efficient_attention:
                return efficient_sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def end_region(self) -> None:
        """Autocast empties its cast cache when the outermost region ends (accelerate wraps each
        model's forward in one); the backward's recomputed blocks cast again without caching."""
        self.cache.clear()

    def stop_caching(self) -> None:
        self.cache.clear()
        self.caching = False


def efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """``F.scaled_dot_product_attention`` as a T4 runs it: the memory-efficient kernel, which keeps
    the output and a log-sum-exp row per query for the backward, never an N x N score matrix."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf"))
    if attn_mask is not None:
        attn_mask = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, grad, dropout_p, is_causal,
                                                       scale=scale)
    return out[0]


def run_backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` without torch-function dispatch: a mode is paused while it handles a call,
    and the checkpointed blocks must recompute under the modes, inside the backward."""
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)
