"""LyCORIS networks (``network_module = "lycoris.kohya"``: LoCon, LoHa, LoKr, DoRA) in the estimator.

What differs from a kohya LoRA, memory-wise (lycoris-lora 4.1.3, ``lycoris/modules/*.py``):

- **parameters** (hence trainable weights, gradients and optimizer states), per adapted layer of
  weight shape ``(out, in, *kernel)`` and rank ``r`` (:func:`parameter_shapes`):
  LoCon ``r x in*k`` down + ``out x r`` up (tucker convs: ``in x r`` down, ``r x r x k`` mid);
  LoHa two LoRA pairs, ``2 r (out + in*k)`` (tucker: two ``r x r x k`` cores more);
  LoKr the Kronecker factors of :func:`factorization` (``out = a*b``, ``in = c*d`` by ``factor``): a full
  ``a x c`` w1 (or ``a x r`` + ``r x c`` with ``decompose_both``) and ``b x d*k`` w2 as a rank-``r`` pair,
  or full when ``r >= max(b, d) / 2`` or ``full_matrix`` (tucker convs: a ``r x r x k`` core);
  DoRA (``dora_wd``) one norm per output row (``wd_on_output``, the default) or per input column;
  ``use_scalar`` one scalar;
- **the step**: outside ``bypass_mode`` every adapted layer rebuilds its whole weight in the forward
  (``W + ΔW``, with DoRA divided by its norms), and the layer's backward keeps that weight-sized
  tensor: activation memory a kohya LoRA (``x -> up(down(x))``) does not have.

The simulation builds the lycoris-lora package's own modules on the meta device in nbkit's module set
(:func:`add_lycoris`), so their forward allocates what LyCORIS's does; only DoRA's norm vector is made
here (LyCORIS computes it from the weight on the CPU, which a meta weight does not have).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import torch
from torch import nn

from nbkit.estimate.setting import Setting

META = torch.device("meta")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``, ``m <= n``, ``m`` the divisor closest to ``factor`` from below
    (``-1``: as balanced as possible): LoKr's split of a dimension (``lycoris/functional/general.py``)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    factor = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def parameter_shapes(weight: tuple[int, ...], algo: str, rank: int, *, factor: int = -1, use_tucker: bool = False,
                     decompose_both: bool = False, full_matrix: bool = False, unbalanced_factorization: bool = False,
                     dora_wd: bool = False, wd_on_output: bool = True, use_scalar: bool = False
                     ) -> list[tuple[int, ...]]:
    """The trainable tensors' shapes of one LyCORIS module on a layer whose weight has shape ``weight``
    (``(out, in)`` Linear, ``(out, in, *kernel)`` conv): see the module doc."""
    out, inp, kernel = weight[0], weight[1], tuple(weight[2:])
    k = math.prod(kernel)
    tucker = use_tucker and any(size != 1 for size in kernel)
    if algo in ("lora", "locon"):
        shapes = ([(rank, inp, 1, 1)[:len(weight)], (rank, rank, *kernel)] if tucker
                  else [(rank, inp, *kernel)]) + [(out, rank, *[1] * len(kernel))]
    elif algo == "loha":
        shapes = ([(rank, rank, *kernel), (rank, out), (rank, inp)] * 2 if tucker
                  else [(out, rank), (rank, inp * k)] * 2)
    elif algo == "lokr":
        (a, b), (c, d) = factorization(out, factor), factorization(inp, factor)
        if unbalanced_factorization:
            a, b = b, a
        shapes = ([(a, rank), (rank, c)] if decompose_both and rank < max(a, c) / 2 and not full_matrix
                  else [(a, c)])
        if rank >= max(b, d) / 2 or full_matrix:
            shapes.append((b, d, *kernel))
        elif tucker:
            shapes += [(rank, rank, *kernel), (rank, b), (rank, d)]
        else:
            shapes += [(b, rank), (rank, d * k)]
    else:
        raise ValueError(f"algo={algo}: the estimator knows lora, locon, loha and lokr")
    if dora_wd:
        shapes.append(dora_shape(weight, wd_on_output))
    if use_scalar:
        shapes.append(())
    return shapes


def dora_shape(weight: tuple[int, ...], wd_on_output: bool = True) -> tuple[int, ...]:
    """DoRA's norm vector: one per output row (``wd_on_output``) or per input column, broadcastable."""
    rest = [1] * (len(weight) - 1)
    return (weight[0], *rest) if wd_on_output else (1, weight[1], *rest[1:])


def lycoris_args(setting: Setting):
    """``network_args`` as nbkit's trainer reads them (:func:`nbkit.networks.lycoris.check_network_args`)."""
    from nbkit.networks.lycoris import check_network_args

    config = SimpleNamespace(network_args=list(setting.network_args or ()), network_dim=setting.network_dim,
                             network_alpha=setting.network_dim / 2, conv_dim=setting.conv_dim, conv_alpha=None,
                             network_dropout=None, rank_dropout=None, module_dropout=None)
    return check_network_args(config, "network_args")


def add_lycoris(setting: Setting, unet: nn.Module, encoders: list[nn.Module], master: torch.dtype,
                notes: list[str]) -> list[nn.Parameter]:
    """LyCORIS's modules on the layers nbkit's plug-in adapts (U-Net, and the text encoders when they
    train), made on the meta device; returns their parameters in ``master`` dtype."""
    from nbkit.formats.lycoris import lycoris_stem
    from nbkit.networks import lycoris as plugin
    from nbkit.networks.lycoris import LycorisNetwork, lycoris_targets, preset_targets

    args = lycoris_args(setting)
    # dropouts change no allocation worth counting (and LoKr's rank dropout draws on the CPU); DoRA's
    # norms are made below: LyCORIS reads them off the weight on the CPU, which a meta weight is not
    network = LycorisNetwork.__new__(LycorisNetwork)
    network.config = SimpleNamespace(network_dim=setting.network_dim, network_alpha=setting.network_dim / 2)
    network.args = dataclasses.replace(args, dropout=0.0, rank_dropout=0.0, module_dropout=0.0, dora_wd=False)
    preset = preset_targets(args.preset, "network_args")
    sdxl = len(encoders) > 1
    models = {"unet": unet} | ({"text_encoder": encoders[0]} | ({"text_encoder_2": encoders[1]} if sdxl else {})
                               if setting.trains_text_encoder else {})
    # SDXL: kohya's LyCORIS picks U-Net modules by their SGM names (the plug-in's renamer, where it has one)
    renamer = getattr(plugin, "_sgm_renamer", None)
    if sdxl and renamer is None:
        notes.append("LyCORIS on the SDXL U-Net: estimated on diffusers' module set")
    params: list[nn.Parameter] = []
    # parameters straight onto the meta device (LyCORIS's constructors also compute with small CPU tensors)
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        for part in ("text_encoder", "text_encoder_2", "unet"):  # LyCORIS's order
            if part not in models:
                continue
            rename = renamer(dict(unet.config)) if renamer is not None and sdxl and part == "unet" else None
            targets = (lycoris_targets(models[part], part, preset, rename) if rename is not None
                       else lycoris_targets(models[part], part, preset))
            for path, layer in targets:
                module = network._make(lycoris_stem(part, path, sdxl=sdxl), layer, bool(preset.get("enable_conv", True)))
                if module is None:
                    continue
                if args.dora_wd:
                    module.wd, module.wd_on_out = True, args.wd_on_output
                    module.dora_norm_dims = layer.weight.dim() - 1
                    module.dora_scale = nn.Parameter(torch.empty(dora_shape(tuple(layer.weight.shape),
                                                                            args.wd_on_output), device=META))
                module.to(device=META, dtype=master)
                module.apply_to()
                layer.add_module("lycoris", module)
                params += list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    if not args.bypass_mode:
        notes.append(f"LyCORIS {args.algo}{' with DoRA' if args.dora_wd else ''}: every adapted layer rebuilds its "
                     "whole weight each forward (kept for the backward)")
    return params
