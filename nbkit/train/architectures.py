"""Architectures' conditioning behind one interface, so a method never branches on SD1/SD2/SDXL.

An architecture turns captions into what the U-Net is conditioned on (``encode``), stacks cached
conditioning (``stack``) and names its text encoders (``text_encoders``: the parts a network may
adapt). SD1 and SD2 share one: a CLIP text encoder whose (clip-skipped) hidden states are the
cross-attention context, as kohya's ``train_util.get_hidden_states`` computes them.
"""

from __future__ import annotations

import torch

from nbkit.errors import ConfigError


class CLIPConditioning:
    """SD1/SD2: one CLIP text encoder; kohya's clip_skip, max_token_length and weighted captions."""

    def __init__(self, pipeline, info, config, device) -> None:
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder
        self.config, self.v2, self.device = config, info.v2, device

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def encode(self, captions: list[str]) -> torch.Tensor:
        from nbkit.train.common import encode_captions

        return encode_captions(self.tokenizer, self.text_encoder, captions, self.config, self.v2, self.device)

    def stack(self, cached: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(cached).to(self.device)


def conditioning_for(pipeline, info, config, device) -> CLIPConditioning:
    """The conditioning of the loaded base model's architecture."""
    if info.arch == "sdxl":
        raise ConfigError(f"pretrained_model_name_or_path = {config.pretrained_model_name_or_path}: an SDXL model; "
                          "this nbkit trains SD1.x/SD2.x bases (SDXL training is in progress): pick an SD1.5 or "
                          "SD2.x model")
    return CLIPConditioning(pipeline, info, config, device)
