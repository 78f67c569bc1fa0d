"""kohya's LoRA dropouts on peft layers, as forward hooks (networks/lora.py ``LoRAModule.forward``).

- ``network_dropout``: dropout on the ``lora_down`` output (peft's ``lora_dropout`` acts on
  the input instead, so it is not the same thing);
- ``rank_dropout``: drops whole rank channels per sample and rescales by ``1/(1-p)``;
- ``module_dropout``: skips a module's LoRA update entirely with probability ``p``.
All three act only while the model is in training mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _down_hook(network_dropout: float | None, rank_dropout: float | None):
    def hook(module, args, output):
        if not module.training:
            return output
        if network_dropout:
            output = F.dropout(output, p=network_dropout)
        if rank_dropout:
            mask = torch.rand((output.size(0), output.size(1) if output.dim() == 4 else output.size(-1)),
                              device=output.device) > rank_dropout  # fmt: skip
            if output.dim() == 3:  # [B, tokens, r]
                mask = mask.unsqueeze(1)
            elif output.dim() == 4:  # conv: [B, r, H, W]
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            output = output * mask * (1.0 / (1.0 - rank_dropout))
        return output

    return hook


def _up_hook(module_dropout: float):
    def hook(module, args, output):
        if module.training and torch.rand(1).item() < module_dropout:
            return output * 0.0
        return output

    return hook


def add_lora_dropouts(
    model: torch.nn.Module,
    *,
    network_dropout: float | None = None,
    rank_dropout: float | None = None,
    module_dropout: float | None = None,
    adapter_name: str = "default",
) -> list:
    """Register the hooks on every LoRA layer of ``model``; returns the handles (``.remove()``)."""
    for name, value in (("network_dropout", network_dropout), ("rank_dropout", rank_dropout),
                        ("module_dropout", module_dropout)):  # fmt: skip
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    handles = []
    if not (network_dropout or rank_dropout or module_dropout):
        return handles
    for module in model.modules():
        if not hasattr(module, "lora_A") or adapter_name not in getattr(module, "lora_A", {}):
            continue
        if network_dropout or rank_dropout:
            handles.append(module.lora_A[adapter_name].register_forward_hook(_down_hook(network_dropout, rank_dropout)))
        if module_dropout:
            handles.append(module.lora_B[adapter_name].register_forward_hook(_up_hook(module_dropout)))
    return handles
