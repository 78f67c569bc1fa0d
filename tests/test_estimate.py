"""The memory estimator on the real architectures (meta device): attention route, monotonicity,
presets, auto-fit, CLI, and a tiny U-Net against a real CPU step. Its accuracy on the published rows,
as docs/estimator.md states it: tests/test_estimator_claims.py.

Each simulation of an SD1.5 step takes a few seconds; results are cached per setting for the whole
session, so the tests share them (the settings below are chosen to overlap)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nbkit.estimate import Setting, auto_fit, estimate, setting_from_config
from nbkit.estimate.constants import CONTEXT_BYTES
from nbkit.estimate.fit import FitError
from nbkit.estimate.fit_constants import published_rows
from nbkit.estimate.setting import GB
from nbkit.presets import PRESETS, apply_preset


def _preset_config(name: str):
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    cls = {"lora": LoRATrainConfig, "dreambooth": DreamBoothTrainConfig, "hypernetwork": HypernetworkTrainConfig}
    return apply_preset(cls[PRESETS[name].method](), name)


def _preset_setting(name: str) -> Setting:
    return setting_from_config(_preset_config(name), PRESETS[name].method, arch=PRESETS[name].arch)


FIT_ROWS = [row for row in published_rows() if row.memory_fit]


def test_breakdown_adds_up_and_summary_ends_with_peak():
    result = estimate(FIT_ROWS[0].setting)
    assert sum(result.breakdown.values()) == pytest.approx(result.peak_gib, abs=1e-6)
    assert result.breakdown["CUDA context + workspaces (calibrated)"] * 2**30 == pytest.approx(CONTEXT_BYTES)
    last = result.summary().splitlines()[-1]
    assert last.startswith("peak=") and float(last[5:]) == pytest.approx(result.peak_gb, abs=0.01)
    assert result.params["trainable"] == 859_520_964  # the real SD1.5 U-Net


def test_attention_runs_the_memory_efficient_kernel():
    """A T4 never materialises the N x N score matrix: neither may the simulation."""
    from nbkit.estimate.modes import AllocationTrace, AutocastSim, Trace
    from nbkit.estimate.simulate import record_step

    q = torch.empty(1, 8, 4096, 40, device="meta", dtype=torch.float16, requires_grad=True)
    scores = 8 * 4096 * 4096 * 2
    for routed in (False, True):
        trace = Trace()
        with AllocationTrace(trace), AutocastSim(torch.float16, efficient_attention=routed):
            torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        assert (max(trace.sizes.values()) >= scores) is not routed
    record = record_step(FIT_ROWS[0].setting)  # SD1.5 at 512: 4096 tokens in the first blocks
    assert record.attention_calls >= 32  # 16 attention layers, run again by the checkpointed blocks
    assert max(record.trace.sizes.values()) < 2 * 8 * 4096 * 4096 * 2


def test_memory_grows_with_batch_and_resolution_and_shrinks_with_checkpointing():
    base = _preset_setting("T4 DreamBooth")
    one, two = estimate(base), estimate(base.replace(train_batch_size=2))
    assert two.peak_gib > one.peak_gib
    no_gc = estimate(base.replace(gradient_checkpointing=False))
    activations = "activations and temporaries"
    assert no_gc.breakdown[activations] > one.breakdown.get(activations, 0) and no_gc.peak_gib > one.peak_gib
    adamw = estimate(base.replace(optimizer_type="AdamW"))
    assert adamw.breakdown["optimizer states"] == pytest.approx(4 * one.breakdown["optimizer states"], rel=0.05)
    assert adamw.peak_gib > one.peak_gib + 4  # 6 more bytes per weight, plus the foreach sqrt copy
    hyper = _preset_setting("T4 hypernetwork")
    assert estimate(hyper.replace(resolution=640)).peak_gib > estimate(hyper).peak_gib


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.gpu_gib])
def test_each_gpu_preset_fits_with_one_gib_headroom(name):
    result = estimate(_preset_setting(name))
    assert result.fits(PRESETS[name].gpu_gib, 1.0), result.summary()


def test_auto_fit_chooses_a_setting_that_fits():
    config = dataclasses.replace(_preset_config("T4 hypernetwork"), train_batch_size=2)
    fitted, found, changes = auto_fit(config, "hypernetwork", gpu_gib=15.0, prefer_speed=False)
    assert fitted.train_batch_size == 2 and changes == [] and found.fits(15.0, 1.0)
    assert config.train_batch_size == 2 and fitted is not config  # a modified copy
    adamw = dataclasses.replace(_preset_config("T4 DreamBooth"), optimizer_type="AdamW")
    fitted, found, changes = auto_fit(adamw, "dreambooth", gpu_gib="T4")  # fp32 AdamW states do not fit a T4
    assert fitted.optimizer_type == "AdamW8bit" and found.fits(15.0, 1.0)
    assert any(c.startswith("optimizer_type AdamW -> AdamW8bit") for c in changes)
    with pytest.raises(FitError, match="LoRA"):
        auto_fit(_preset_config("T4 DreamBooth"), "dreambooth", gpu_gib=6.0)


def test_cli_estimate_and_train_auto_fit(capsys):
    from nbkit.cli import build_parser, main
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig
    from nbkit.train.run_file import config_from_args

    assert main(["estimate", "--method", "hypernetwork", "--arch", "sd15", "--resolution", "512",
                 "--train-batch-size", "1", "--gradient-checkpointing", "--optimizer-type", "AdamW",
                 "--mixed-precision", "fp16", "--cache-text-encoder-outputs"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("peak=") and any("fits T4" in line for line in out)
    args = build_parser().parse_args(["train", "hypernetwork", "--auto-fit", "T4", "--train_batch_size", "1",
                                      "--optimizer_type", "AdamW", "--gradient_checkpointing"])
    config, _, _ = config_from_args(args, HypernetworkTrainConfig)
    assert "auto-fit (sd15, T4)" in capsys.readouterr().out and config.train_batch_size == 1


def test_tiny_unet_simulation_matches_a_real_cpu_step():
    """The meta-device trace of the tiny U-Net against the CPU allocator's own bookkeeping
    (torch.profiler's memory events) for the same step run for real."""
    from torch.profiler import ProfilerActivity, profile

    from nbkit.estimate.models import MetaModels
    from nbkit.estimate.modes import AutocastSim, Trace
    from nbkit.estimate.simulate import forward_backward, record_step
    from nbkit.models.tiny import build_tiny_components

    unet = build_tiny_components("sd15")["unet"]
    setting = Setting("dreambooth", unet_config=dict(unet.config), resolution=128, train_batch_size=2,
                      mixed_precision="no", gradient_checkpointing=False, cache_text_encoder_outputs=True)
    simulated = record_step(setting).trace.peak
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    real = MetaModels(unet=unet, text_encoders=[], vae=None, trainable=list(unet.parameters()), frozen=[],
                      context_dim=unet.config.cross_attention_dim, sdxl=False, device=torch.device("cpu"))
    torch.manual_seed(0)
    # oneDNN would spend seconds compiling kernels for this one step; the native kernels are quick here
    with torch.backends.mkldnn.flags(enabled=False), profile(activities=[ProfilerActivity.CPU],
                                                              profile_memory=True) as prof:
        forward_backward(real, setting, AutocastSim(None, efficient_attention=False), Trace())
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    assert abs(simulated / peak - 1) < 0.10, (simulated, peak)
    assert simulated > 10e6  # a real workload, not a few tensors


def test_step_time_from_flops():
    from nbkit.estimate import count_flops, estimate_step_seconds

    hyper = _preset_setting("T4 hypernetwork")
    flops = count_flops(hyper)  # frozen U-Net forward + backward + one recomputed forward at 512 px
    assert 2.0e12 < flops < 3.2e12
    t4, a100 = estimate_step_seconds(hyper, "T4"), estimate_step_seconds(hyper, "A100-40GB")
    assert 0.3 < t4 < 1.5 and a100 < t4
    assert estimate(FIT_ROWS[0].setting).peak_gb * GB > 0
