"""Architectures' conditioning behind one interface, so a method never branches on SD1/SD2/SDXL.

An architecture turns captions into what the U-Net is conditioned on (``encode``), stacks cached
conditioning (``stack``) and names its text encoders (``text_encoders``: the parts a network may
adapt). SD1 and SD2 share one: a CLIP text encoder whose (clip-skipped) hidden states are the
cross-attention context, as kohya's ``train_util.get_hidden_states`` computes them. SDXL has two text
encoders and extra U-Net inputs (pooled text, size/crop time ids): its conditioning is an
:class:`SDXLCond` the U-Net call unpacks (``nbkit.train.common.diffusion_loss``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from nbkit.errors import ConfigError


class CLIPConditioning:
    """SD1/SD2: one CLIP text encoder; kohya's clip_skip, max_token_length and weighted captions."""

    def __init__(self, pipeline, info, config, device) -> None:
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder
        self.config, self.v2, self.device = config, info.v2, device

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def use(self, text_encoders: dict[str, torch.nn.Module]) -> None:
        """Encode with these models from now on (accelerate's prepared ones)."""
        self.text_encoder = text_encoders["text_encoder"]

    def encode(self, captions: list[str]) -> torch.Tensor:
        from nbkit.train.common import encode_captions

        return encode_captions(self.tokenizer, self.text_encoder, captions, self.config, self.v2, self.device)

    def stack(self, cached: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(cached).to(self.device)

    def for_batch(self, cond: torch.Tensor, items: list, batch: list[tuple[int, bool]]) -> torch.Tensor:
        """The conditioning of these samples (SD1/SD2: the text alone)."""
        return cond


@dataclass
class SDXLCond:
    """SDXL's U-Net conditioning of a batch (or, indexed, of one sample): the cross-attention context
    (penultimate hidden states of CLIP-L and bigG concatenated), the pooled bigG output
    (``text_embeds``) and the size/crop time ids (``(b, 6)``: original h, w, crop top, left, target
    h, w). ``time_ids`` is None until the batch's sizes are known (``SDXLConditioning.for_batch`` adds them)."""

    context: torch.Tensor
    text_embeds: torch.Tensor
    time_ids: torch.Tensor | None = None

    def __getitem__(self, index) -> SDXLCond:
        return SDXLCond(self.context[index], self.text_embeds[index],
                        None if self.time_ids is None else self.time_ids[index])

    def cpu(self) -> SDXLCond:
        return SDXLCond(self.context.cpu(), self.text_embeds.cpu(), None if self.time_ids is None else self.time_ids.cpu())

    def with_time_ids(self, time_ids: torch.Tensor) -> SDXLCond:
        return SDXLCond(self.context, self.text_embeds, time_ids)

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """The diffusers ``UNet2DConditionModel`` arguments besides sample and timestep (kohya
        ``sdxl_train_network.py::SdxlNetworkTrainer.call_unet``: context and vector in weight_dtype;
        the time ids' sinusoids are computed in fp32 inside the U-Net, as kohya computes them)."""
        if self.time_ids is None:
            raise ValueError("SDXL conditioning without time ids: the batch's original sizes and crops are unknown")
        return {"encoder_hidden_states": self.context.to(dtype),
                "added_cond_kwargs": {"text_embeds": self.text_embeds.to(dtype),
                                      "time_ids": self.time_ids.to(self.context.device, torch.float32)}}


class SDXLConditioning:
    """SDXL: CLIP-L (``text_encoder``) and OpenCLIP bigG (``text_encoder_2``, with projection), as kohya
    ``sdxl_train_network.py::SdxlNetworkTrainer.get_text_cond`` and ``train_util.get_hidden_states_sdxl``:
    ``hidden_states[-2]`` of both (encoder 1's ``[11]`` of 12 layers) concatenated, no final LayerNorm;
    pooled output = encoder 2's last hidden state at the first EOS token through its projection
    (``train_util.pool_workaround``). 75 tokens; kohya ignores clip_skip on SDXL and has no weighted
    captions there."""

    def __init__(self, pipeline, info, config, device) -> None:
        self.tokenizer, self.text_encoder = pipeline.tokenizer, pipeline.text_encoder
        self.tokenizer_2, self.text_encoder_2 = pipeline.tokenizer_2, pipeline.text_encoder_2
        self.config, self.device = config, device
        if config.max_token_length:
            raise ConfigError(f"max_token_length = {config.max_token_length}: SDXL training in nbkit uses 75 tokens "
                              "for now: leave max_token_length unset")
        if config.weighted_captions:
            raise ConfigError("weighted_captions: kohya's SDXL training has no weighted captions: turn it off")
        if config.clip_skip and config.clip_skip > 1:
            warnings.warn(f"clip_skip = {config.clip_skip} has no effect on SDXL (kohya: 'clip_skip will be "
                          "unexpected'): SDXL always uses the penultimate layers", stacklevel=2)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def use(self, text_encoders: dict[str, torch.nn.Module]) -> None:
        """Encode with these models from now on (accelerate's prepared ones)."""
        self.text_encoder, self.text_encoder_2 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]

    def _ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def encode(self, captions: list[str]) -> SDXLCond:
        ids1, ids2 = self._ids(self.tokenizer, captions), self._ids(self.tokenizer_2, captions)
        hidden1 = self.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = self.text_encoder_2(ids2, output_hidden_states=True)
        hidden2 = out2.hidden_states[-2]
        # kohya train_util.pool_workaround: the first EOS token's final state, projected
        eos = torch.argmax((ids2 == self.tokenizer_2.eos_token_id).int(), dim=1)
        last = out2.last_hidden_state
        te2 = getattr(self.text_encoder_2, "module", self.text_encoder_2)  # DDP-wrapped
        pooled = te2.text_projection(last[torch.arange(last.shape[0], device=last.device), eos.to(last.device)]
                                     .to(te2.text_projection.weight.dtype)).to(last.dtype)
        return SDXLCond(torch.cat([hidden1, hidden2], dim=2), pooled)

    def stack(self, cached: list[SDXLCond]) -> SDXLCond:
        return SDXLCond(torch.stack([c.context for c in cached]).to(self.device),
                        torch.stack([c.text_embeds for c in cached]).to(self.device))

    def for_batch(self, cond: SDXLCond, items: list, batch: list[tuple[int, bool]]) -> SDXLCond:
        """The text plus each sample's size/crop time ids, as kohya computes them (``sdxl_time_ids``)."""
        from nbkit.data.train_data import sdxl_time_ids

        ids = torch.tensor([sdxl_time_ids(items[i], flip) for i, flip in batch], dtype=torch.long, device=self.device)
        return cond.with_time_ids(ids)


def conditioning_for(pipeline, info, config, device, *, sdxl: bool = False) -> CLIPConditioning | SDXLConditioning:
    """The conditioning of the loaded base model's architecture. A method that trains SDXL passes
    ``sdxl=True``; the others (DreamBooth, hypernetwork) get a clear refusal for an SDXL base."""
    if info.arch == "sdxl":
        if not sdxl:
            raise ConfigError(f"pretrained_model_name_or_path = {config.pretrained_model_name_or_path}: an SDXL "
                              "model; this method trains SD1.x/SD2.x bases only (SDXL trains as a LoRA: `nbkit "
                              "train lora`): pick an SD1.5 or SD2.x model")
        return SDXLConditioning(pipeline, info, config, device)
    return CLIPConditioning(pipeline, info, config, device)
