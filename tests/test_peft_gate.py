"""LoRA injection must not go through transformers' or diffusers' peft version gates.

transformers 5.25 made ``PreTrainedModel.add_adapter`` demand a peft release that did not exist
yet, and every text-encoder LoRA broke on a fresh install. nbkit injects with peft's own
``inject_adapter_in_model``; these tests make both libraries' gates fail the way 5.25's did and
check that training setup and export still work and give the same adapter.
"""

from __future__ import annotations

import pytest
import torch

from nbkit.networks.lora import export_kohya_state_dict, inject_lora, lora_parameters


def _gate(*_args, **_kwargs):
    raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")


@pytest.fixture()
def closed_gates(monkeypatch):
    """Both libraries' ``add_adapter`` (and their version checks) fail like transformers 5.25's."""
    import diffusers.loaders.peft as diffusers_peft
    import transformers.integrations.peft as transformers_peft
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "add_adapter", _gate)
    monkeypatch.setattr(diffusers_peft.PeftAdapterMixin, "add_adapter", _gate)
    monkeypatch.setattr(transformers_peft, "check_peft_version", _gate)
    monkeypatch.setattr(diffusers_peft, "check_peft_version", _gate)


def _injected(tiny_pipe, conv_dim=None):
    pipe = tiny_pipe("sd15")
    torch.manual_seed(3)
    targets = inject_lora(pipe.unet, pipe.text_encoder, network_dim=4, network_alpha=2, conv_dim=conv_dim, conv_alpha=1)
    return pipe, targets


def test_text_encoder_and_unet_lora_inject_with_gates_closed(closed_gates, tiny_pipe):
    pipe, targets = _injected(tiny_pipe, conv_dim=2)
    # kohya's module set: 6 per CLIP layer, every UNet target adapted
    layers = pipe.text_encoder.config.num_hidden_layers
    assert len(targets["text_encoder"]) == 6 * layers
    assert targets["unet"], "no UNet modules adapted"
    trainable = list(lora_parameters(pipe.text_encoder)) + list(lora_parameters(pipe.unet))
    assert trainable and all(p.requires_grad and p.dtype == torch.float32 for p in trainable)
    frozen = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == []
    sd = export_kohya_state_dict(pipe.unet, pipe.text_encoder)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any(k.startswith("lora_unet_") for k in sd)


def test_gates_change_nothing_in_the_adapter(monkeypatch, tiny_pipe):
    """Same seed, gates open or closed: the same exported tensors (the path is the same peft call)."""
    open_sd = export_kohya_state_dict(*_unet_te(_injected(tiny_pipe)[0]))
    with monkeypatch.context() as m:
        import diffusers.loaders.peft as diffusers_peft
        from transformers import PreTrainedModel

        m.setattr(PreTrainedModel, "add_adapter", _gate)
        m.setattr(diffusers_peft.PeftAdapterMixin, "add_adapter", _gate)
        closed_sd = export_kohya_state_dict(*_unet_te(_injected(tiny_pipe)[0]))
    assert open_sd.keys() == closed_sd.keys()
    for key in open_sd:
        assert torch.equal(open_sd[key], closed_sd[key]), key


def _unet_te(pipe):
    return pipe.unet, pipe.text_encoder
