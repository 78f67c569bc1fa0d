"""Hypernetworks in a diffusers UNet, applied where A1111 applies them.

A1111 (``hypernetwork.py::apply_hypernetworks``) runs inside every CrossAttention: the context
(the text embeddings in ``attn2``, the normed hidden states in ``attn1``) is copied into
``context_k`` and ``context_v``; each loaded hypernetwork picks its module pair by the
context's width (``context.shape[2]``) and sets ``context_k = hk(context_k)``,
``context_v = hv(context_v)``; several hypernetworks chain. Then ``k = to_k(context_k)`` and
``v = to_v(context_v)``; ``q`` is untouched. A width the file has no modules for is skipped.

:class:`HypernetworkAttnProcessor` does exactly that in diffusers' ``attn1``/``attn2``, with the
math of ``AttnProcessor2_0`` (SDPA) otherwise, so at strength 0 the output is the base output bit
for bit. Removing the last hypernetwork puts the module's previous processor object back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from nbkit.networks.hypernetwork.module import Hypernetwork

# Processors with the same math as AttnProcessor2_0 that may be replaced.
_REPLACEABLE = ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor")
# A1111's extra-network syntax (``extra_networks.py::re_extra_net``), restricted to hypernets.
_HYPERNET_TAG = re.compile(r"<hypernet:([^>]+)>")


class HypernetworkAttnProcessor:
    """Attention with A1111's hypernetwork context transform; ``entries`` are applied in order."""

    def __init__(self, original: object) -> None:
        self.original = original
        self.entries: list[tuple[Hypernetwork, float]] = []

    def transform(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(context_k, context_v)`` after every hypernetwork with a pair for this width."""
        context_k = context_v = context
        for hypernetwork, strength in self.entries:
            pair = hypernetwork.pair(context.shape[-1])
            if pair is None:
                continue
            hk, hv = pair
            dtype = hk.linear[0].weight.dtype  # A1111 runs the modules in fp32 (cond_cast_float)
            context_k = hk(context_k.to(dtype), strength).to(context.dtype)
            context_v = hv(context_v.to(dtype), strength).to(context.dtype)
        return context_k, context_v

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self.transform(encoder_hidden_states)  # the only change from AttnProcessor2_0
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _unet(model):
    return getattr(model, "unet", model)


def attention_modules(model) -> list[tuple[str, object]]:
    """``(name, Attention)`` for every ``attn1``/``attn2`` of the UNet's transformer blocks
    (the CrossAttention layers A1111 patches; the VAE's attention is not one of them)."""
    from diffusers.models.attention_processor import Attention

    unet = _unet(model)
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, Attention) and name.rsplit(".", 1)[-1] in ("attn1", "attn2")]


def apply_hypernetwork(model, hypernetwork: Hypernetwork, strength: float = 1.0) -> None:
    """Apply ``hypernetwork`` to a UNet (or a pipeline's UNet) at ``strength``, after any already
    applied (they chain, each with its own strength). Applying the same one again sets its strength.
    The modules move to the UNet's device (they stay fp32)."""
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(_unet(model)).__name__} has no attn1/attn2 attention layers: pass an SD UNet or pipeline")
    hypernetwork.to(next(_unet(model).parameters()).device)
    for name, attn in modules:
        processor = attn.processor
        if not isinstance(processor, HypernetworkAttnProcessor):
            if type(processor).__name__ not in _REPLACEABLE:
                raise ValueError(f"{name} uses {type(processor).__name__}; hypernetworks need the default attention: "
                                 "call unet.set_attn_processor(AttnProcessor2_0()) first")
            processor = HypernetworkAttnProcessor(processor)
            attn.set_processor(processor)
        for index, (applied, _) in enumerate(processor.entries):
            if applied is hypernetwork:
                processor.entries[index] = (hypernetwork, float(strength))
                break
        else:
            processor.entries.append((hypernetwork, float(strength)))


def remove_hypernetwork(model, hypernetwork: Hypernetwork | None = None) -> None:
    """Remove one hypernetwork (or all with None); a layer with none left gets its original processor back."""
    for _, attn in attention_modules(model):
        processor = attn.processor
        if not isinstance(processor, HypernetworkAttnProcessor):
            continue
        processor.entries[:] = [(hn, s) for hn, s in processor.entries
                                if hypernetwork is not None and hn is not hypernetwork]
        if not processor.entries:
            attn.set_processor(processor.original)


def applied_hypernetworks(model) -> list[tuple[Hypernetwork, float]]:
    """The hypernetworks applied to the UNet, in application order, with their strengths."""
    for _, attn in attention_modules(model):
        if isinstance(attn.processor, HypernetworkAttnProcessor):
            return list(attn.processor.entries)
    return []


@contextmanager
def hypernetworks_applied(model, hypernetworks: list[tuple[Hypernetwork, float]]) -> Iterator[None]:
    """Apply several ``(hypernetwork, strength)`` for a block; removed again afterwards."""
    try:
        for hypernetwork, strength in hypernetworks:
            apply_hypernetwork(model, hypernetwork, strength)
        yield
    finally:
        for hypernetwork, _ in hypernetworks:
            remove_hypernetwork(model, hypernetwork)


def parse_hypernet_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Strip A1111 ``<hypernet:name:strength>`` tags (strength defaults to 1.0) from a prompt.

    Returns ``(clean_prompt, [(name, strength), ...])`` in prompt order. Like A1111, a tag is
    replaced by nothing (surrounding text is kept as it is, the ends are stripped); other extra
    networks such as ``<lora:...>`` stay in the prompt.
    """
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        parts = match[1].split(":")
        try:
            strength = float(parts[1]) if len(parts) > 1 and parts[1].strip() else 1.0
        except ValueError:
            raise ValueError(f"{match[0]}: the strength {parts[1]!r} is not a number, write e.g. "
                             f"<hypernet:{parts[0]}:0.7>") from None
        found.append((parts[0].strip(), strength))
        return ""

    return _HYPERNET_TAG.sub(take, prompt).strip(), found


def find_hypernetwork_file(name: str, folder: str | Path) -> Path:
    """``<folder>/**/<name>.pt`` (A1111's ``list_hypernetworks`` globs ``**/*.pt`` by stem)."""
    matches = sorted(p for p in Path(folder).glob("**/*.pt") if p.stem == name)
    if not matches:
        raise FileNotFoundError(f"no hypernetwork '{name}.pt' under {folder}: check the name in <hypernet:{name}:...>")
    return matches[0]


def apply_prompt_hypernetworks(model, prompt: str, folder: str | Path,
                               cache: dict[str, Hypernetwork] | None = None) -> tuple[str, list[Hypernetwork]]:
    """Parse ``<hypernet:...>`` tags, load each named file from ``folder`` (``cache`` keeps loaded
    ones by name), apply them with their strengths and return ``(clean_prompt, applied)``;
    call :func:`remove_hypernetwork` on each (or with None) when done."""
    clean, tags = parse_hypernet_prompt(prompt)
    cache = {} if cache is None else cache
    applied = []
    for name, strength in tags:
        if name not in cache:
            cache[name] = Hypernetwork.load(find_hypernetwork_file(name, folder))
        apply_hypernetwork(model, cache[name], strength)
        applied.append(cache[name])
    return clean, applied
