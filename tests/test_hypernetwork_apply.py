"""Hypernetworks in a diffusers pipeline: where they act (attn1 hidden states, attn2 text), strength
0 is the base bit for bit, removing restores it, several chain with separate strengths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nbkit.networks.hypernetwork.apply import (
    HypernetworkAttnProcessor,
    applied_hypernetworks,
    apply_hypernetwork,
    apply_prompt_hypernetworks,
    attention_modules,
    hypernetworks_applied,
    parse_hypernet_prompt,
    remove_hypernetwork,
)
from nbkit.networks.hypernetwork.create import HypernetworkStructure, create_hypernetwork
from nbkit.train.hypernetwork import model_sizes


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster on the shared 2-core machine (no OpenMP waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hypernetwork(sizes, seed=0, activation="relu", **options):
    hn = create_hypernetwork(f"hn{seed}", HypernetworkStructure(enable_sizes=sizes, activation_func=activation,
                                                                 **options), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # far from the near-identity init, so the effect is visible
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return hn


def _images(pipe, prompt="sks, a red circle"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_strength_zero_is_exact_strength_one_differs_remove_restores(arch, tiny_pipe):
    pipe = tiny_pipe(arch)
    pipe.set_progress_bar_config(disable=True)
    sizes = model_sizes(pipe.unet)  # the tiny UNets' attention widths (sd15: text 32, blocks 32/64)
    assert sizes == [32, 64]
    before = dict(pipe.unet.attn_processors)
    base = _images(pipe)
    hn = _hypernetwork(sizes)
    apply_hypernetwork(pipe, hn, 0.0)
    assert np.array_equal(_images(pipe), base)
    apply_hypernetwork(pipe, hn, 1.0)  # the same hypernetwork again: only its strength changes
    assert applied_hypernetworks(pipe) == [(hn, 1.0)]
    one = _images(pipe)
    assert np.abs(one - base).max() > 1e-3
    remove_hypernetwork(pipe, hn)
    assert np.array_equal(_images(pipe), base)
    after = pipe.unet.attn_processors
    assert all(after[name] is processor for name, processor in before.items())  # the same objects are back


def test_where_hypernetworks_act_and_how_they_chain(tiny_pipe):
    pipe = tiny_pipe("sd15")
    unet = pipe.unet
    first, second = _hypernetwork([32, 64], seed=1), _hypernetwork([64], seed=2, activation="tanh")
    seen = []
    for size in (32, 64):
        first.pair(size)[0].register_forward_hook(lambda m, args, out, s=size: seen.append((s, tuple(args[0].shape))))
    apply_hypernetwork(unet, first, 0.7)
    apply_hypernetwork(unet, second, 0.4)
    assert applied_hypernetworks(unet) == [(first, 0.7), (second, 0.4)]
    names = [name for name, _ in attention_modules(unet)]
    assert len(names) == 32 and all(n.endswith(("attn1", "attn2")) for n in names)  # every transformer block
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unet(sample, torch.tensor([500]), text)
    # attn2 gets the text (77 tokens of width 32); attn1 the hidden states (8x8 latents: 64 tokens
    # in the first 32-channel blocks, 2x2 = 4 tokens in the 64-channel ones).
    assert (32, (1, 77, 32)) in seen and (32, (1, 64, 32)) in seen and (64, (1, 4, 64)) in seen
    assert all(shape[-1] == size for size, shape in seen)
    processor = unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    assert isinstance(processor, HypernetworkAttnProcessor)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        k, v = processor.transform(x)
        hk1, hv1 = first.pair(64)
        hk2, hv2 = second.pair(64)
        assert torch.allclose(k, hk2(hk1(x, 0.7), 0.4), atol=1e-6)  # A1111 order: first applied, then the next
        assert torch.allclose(v, hv2(hv1(x, 0.7), 0.4), atol=1e-6)
        only_second_k, _ = HypernetworkAttnProcessor(None).transform(x)
        text_k, _ = processor.transform(text)
        assert torch.allclose(text_k, first.pair(32)[0](text, 0.7), atol=1e-6)  # size 32 is not in `second`
    assert only_second_k is x  # no hypernetwork: the context is untouched
    remove_hypernetwork(unet)
    assert applied_hypernetworks(unet) == []
    assert not any(isinstance(p, HypernetworkAttnProcessor) for p in unet.attn_processors.values())


def test_two_hypernetworks_with_separate_strengths_in_a_pipeline(tiny_pipe):
    pipe = tiny_pipe("sd15")
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    a, b = _hypernetwork([32, 64], seed=3), _hypernetwork([32, 64], seed=4)
    with hypernetworks_applied(pipe, [(a, 1.0), (b, 0.0)]):
        only_a = _images(pipe)
    with hypernetworks_applied(pipe, [(a, 1.0)]):
        assert np.array_equal(_images(pipe), only_a)  # b at strength 0 changed nothing
    with hypernetworks_applied(pipe, [(a, 1.0), (b, 0.5)]):
        both = _images(pipe)
    assert np.abs(both - only_a).max() > 1e-4
    assert np.array_equal(_images(pipe), base)


def test_prompt_syntax(tiny_pipe, tmp_path):
    assert parse_hypernet_prompt("a cat <hypernet:anime:0.7>, best <hypernet:sub/x>") == (
        "a cat , best", [("anime", 0.7), ("sub/x", 1.0)])
    assert parse_hypernet_prompt("<lora:a:1> plain") == ("<lora:a:1> plain", [])
    with pytest.raises(ValueError, match="not a number"):
        parse_hypernet_prompt("<hypernet:a:strong>")
    pipe = tiny_pipe("sd15")
    (tmp_path / "nested").mkdir()
    _hypernetwork([32, 64], seed=5).save(tmp_path / "nested" / "style.pt")
    clean, applied = apply_prompt_hypernetworks(pipe, "a red circle <hypernet:style:0.5>", tmp_path)
    assert clean == "a red circle" and applied_hypernetworks(pipe) == [(applied[0], 0.5)]
    remove_hypernetwork(pipe)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        apply_prompt_hypernetworks(pipe, "<hypernet:missing>", tmp_path)
