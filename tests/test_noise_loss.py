"""Noise, timesteps and loss weighting against kohya's formulas, computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from nbkit.train import noise as N


def closed_form_alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule in float64, from first principles."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def closed_form_snr(t: torch.Tensor) -> torch.Tensor:
    abar = closed_form_alphas_cumprod()[t]
    return abar / (1 - abar)


T = torch.tensor([0, 1, 10, 100, 500, 900, 999])


@pytest.fixture(scope="module")
def eps_sched():
    return N.prepare_noise_scheduler("epsilon")


@pytest.fixture(scope="module")
def v_sched():
    return N.prepare_noise_scheduler("v_prediction")


# ---------------------------------------------------------------- scheduler


def test_scheduler_matches_kohya_ddpm(eps_sched, v_sched):
    cfg = eps_sched.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.num_train_timesteps) == (
        0.00085,
        0.012,
        "scaled_linear",
        1000,
    )
    assert cfg.clip_sample is False and cfg.prediction_type == "epsilon"
    assert v_sched.config.prediction_type == "v_prediction"
    torch.testing.assert_close(eps_sched.alphas_cumprod.double(), closed_form_alphas_cumprod(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(eps_sched.all_snr.double(), closed_form_snr(torch.arange(1000)), rtol=1e-4, atol=0)


def test_zero_terminal_snr():
    with pytest.warns(UserWarning, match="v_parameterization"):
        N.prepare_noise_scheduler("epsilon", zero_terminal_snr=True)
    sched = N.prepare_noise_scheduler("v_prediction", zero_terminal_snr=True)
    abar = closed_form_alphas_cumprod()
    # arXiv 2305.08891: sqrt(abar) shifted so the last is 0, scaled so the first is unchanged
    s = abar.sqrt()
    expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert N.snr_table(sched)[-1].item() == 0.0
    assert sched.alphas_cumprod[0].item() == pytest.approx(abar[0].item(), rel=1e-6)
    torch.testing.assert_close(sched.alphas_cumprod.double(), expected, rtol=1e-4, atol=1e-7)
    assert sched.betas[-1].item() == pytest.approx(1.0)
    # kohya computes all_snr before rescaling the betas: the loss weights keep the original SNR
    torch.testing.assert_close(sched.all_snr.double(), closed_form_snr(torch.arange(1000)), rtol=1e-4, atol=0)
    # ... while the forward process uses the rescaled schedule: pure noise at t=999
    x0, eps = torch.ones(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(N.noisy_latents(sched, x0, eps, torch.tensor([999])), eps)


# ---------------------------------------------------------------- loss weights


def test_min_snr_weights(eps_sched, v_sched):
    snr = closed_form_snr(T)
    got = N.loss_weights(T, eps_sched, min_snr_gamma=5.0)
    torch.testing.assert_close(got.double(), torch.clamp(snr, max=5.0) / snr, rtol=1e-4, atol=0)
    got_v = N.loss_weights(T, v_sched, min_snr_gamma=5.0, v_parameterization=True)
    torch.testing.assert_close(got_v.double(), torch.clamp(snr, max=5.0) / (snr + 1), rtol=1e-4, atol=0)
    assert got[-1].item() == pytest.approx(1.0)  # high noise: snr < gamma -> weight 1 (eps)
    assert got[0].item() < 0.01  # low noise: snr ~ 1175 -> down-weighted
    assert torch.equal(N.loss_weights(T, eps_sched), torch.ones(len(T)))


def test_scale_v_pred_and_v_pred_like(eps_sched, v_sched):
    snr = torch.clamp(closed_form_snr(T), max=1000.0)  # kohya caps snr at 1000 here
    scale = snr / (snr + 1)
    got = N.loss_weights(T, v_sched, v_parameterization=True, scale_v_pred_loss_like_noise_pred=True)
    torch.testing.assert_close(got.double(), scale, rtol=1e-4, atol=0)
    like = N.loss_weights(T, eps_sched, v_pred_like_loss=0.2)
    torch.testing.assert_close(like.double(), 1 + 0.2 / scale, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="v_parameterization"):
        N.loss_weights(T, eps_sched, scale_v_pred_loss_like_noise_pred=True)
    with pytest.raises(ValueError, match="epsilon"):
        N.loss_weights(T, v_sched, v_parameterization=True, v_pred_like_loss=0.2)


def test_debiased_estimation(eps_sched, v_sched):
    raw = closed_form_snr(T)
    snr = torch.clamp(raw, max=1000.0)
    got = N.loss_weights(T, eps_sched, debiased_estimation_loss=True)
    torch.testing.assert_close(got.double(), 1 / snr.sqrt(), rtol=1e-4, atol=0)
    assert raw[0] > 1000 and got[0].item() == pytest.approx(1 / math.sqrt(1000), rel=1e-5)  # the cap matters
    got_v = N.loss_weights(T, v_sched, v_parameterization=True, debiased_estimation_loss=True)
    torch.testing.assert_close(got_v.double(), 1 / (snr + 1), rtol=1e-4, atol=0)


def test_weights_compose_multiplicatively(v_sched):
    kw = dict(v_parameterization=True)
    a = N.loss_weights(T, v_sched, min_snr_gamma=5.0, **kw)
    b = N.loss_weights(T, v_sched, scale_v_pred_loss_like_noise_pred=True, **kw)
    c = N.loss_weights(T, v_sched, debiased_estimation_loss=True, **kw)
    all3 = N.loss_weights(
        T, v_sched, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True, **kw
    )
    torch.testing.assert_close(all3, a * b * c)


# ---------------------------------------------------------------- noise


def channel_mean_var(noise: torch.Tensor) -> torch.Tensor:
    """Variance over samples of each channel's spatial mean, per channel."""
    return noise.mean(dim=(2, 3)).var(dim=0)


def test_noise_offset_adds_per_channel_constant():
    g = torch.Generator().manual_seed(0)
    latents = torch.zeros(4096, 4, 8, 8)
    plain = channel_mean_var(N.make_noise(latents, generator=g))
    offset = channel_mean_var(N.make_noise(latents, noise_offset=0.5, generator=g))
    white = 1 / 64  # variance of the mean of 64 unit normals
    torch.testing.assert_close(plain, torch.full((4,), white), rtol=0.15, atol=0)
    torch.testing.assert_close(offset, torch.full((4,), 0.25 + white), rtol=0.1, atol=0)


def test_adaptive_noise_scale():
    g = torch.Generator().manual_seed(1)
    latents = torch.zeros(4096, 4, 8, 8)
    latents[:, 0] = -2.0  # |mean| = 2 in channel 0, 0 elsewhere
    var = channel_mean_var(N.make_noise(latents, noise_offset=0.1, adaptive_noise_scale=0.5, generator=g))
    white = 1 / 64
    assert var[0].item() == pytest.approx((0.1 + 0.5 * 2) ** 2 + white, rel=0.1)
    assert var[1].item() == pytest.approx(0.1**2 + white, rel=0.15)
    clamped = channel_mean_var(N.make_noise(latents, noise_offset=0.1, adaptive_noise_scale=-1.0, generator=g))
    assert clamped[0].item() == pytest.approx(white, rel=0.15)  # 0.1 - 2 clamped to 0
    with pytest.raises(ValueError, match="noise_offset"):
        N.make_noise(latents, adaptive_noise_scale=0.5)


def test_noise_offset_random_strength_is_at_most_the_offset():
    g = torch.Generator().manual_seed(2)
    latents = torch.zeros(1024, 4, 8, 8)
    vars_ = [
        channel_mean_var(N.make_noise(latents, noise_offset=0.5, noise_offset_random_strength=True, generator=g))
        .mean()
        .item()
        for _ in range(12)
    ]
    assert max(vars_) < (0.25 + 1 / 64) * 1.15
    assert max(vars_) - min(vars_) > 0.05  # the strength really varies from batch to batch


def test_make_noise_order_offset_then_multires():
    latents = torch.randn(2, 4, 16, 16)
    got = N.make_noise(
        latents,
        noise_offset=0.1,
        multires_noise_iterations=4,
        multires_noise_discount=0.3,
        generator=torch.Generator().manual_seed(3),
    )
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(latents.shape, generator=g)
    ref = N.apply_noise_offset(latents, ref, 0.1, None, g)
    ref = N.pyramid_noise_like(ref, 4, 0.3, g)
    torch.testing.assert_close(got, ref)


def test_multires_noise_is_normalised_and_low_frequency():
    g = torch.Generator().manual_seed(4)
    latents = torch.zeros(512, 4, 32, 32)
    white = N.make_noise(latents, generator=g)
    coarse = torch.nn.functional.avg_pool2d  # energy left after averaging 8x8 blocks = low frequencies
    for discount, ratio in [(0.3, 1.1), (0.8, 4.0)]:  # kohya's default discount is 0.3: a mild effect
        pyramid = N.make_noise(latents, multires_noise_iterations=6, multires_noise_discount=discount, generator=g)
        assert pyramid.std().item() == pytest.approx(1.0, abs=1e-5)  # kohya divides by the batch std
        assert coarse(pyramid, 8).var().item() > ratio * coarse(white, 8).var().item()
    source = torch.randn(1, 4, 8, 8)
    before = source.clone()
    N.pyramid_noise_like(source, 3, 0.3)
    assert torch.equal(source, before)  # the caller's tensor is not modified


def test_ip_noise_gamma_perturbs_only_the_input(eps_sched):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(256, 4, 8, 8, generator=g)
    noise = torch.randn(256, 4, 8, 8, generator=g)
    t = torch.full((256,), 500)
    kept = noise.clone()
    plain = N.noisy_latents(eps_sched, latents, noise, t)
    perturbed = N.noisy_latents(eps_sched, latents, noise, t, ip_noise_gamma=0.1, generator=g)
    assert torch.equal(noise, kept)  # the caller's noise (the target) is untouched
    assert torch.equal(N.loss_target(eps_sched, latents, noise, t, False), noise)
    sigma = (1 - eps_sched.alphas_cumprod[500]).sqrt()
    extra = (perturbed - plain) / sigma
    assert extra.std().item() == pytest.approx(0.1, rel=0.05)
    rand = N.noisy_latents(
        eps_sched, latents, noise, t, ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, generator=g
    )
    assert ((rand - plain) / sigma).std().item() < 0.1 * 1.05


def test_velocity_target(v_sched):
    x0, eps, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([5, 500, 995])
    abar = closed_form_alphas_cumprod()[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(N.loss_target(v_sched, x0, eps, t, True), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- timesteps


def test_timestep_bounds():
    g = torch.Generator().manual_seed(6)
    t = N.sample_timesteps(20000, min_timestep=200, max_timestep=300, generator=g)
    assert t.dtype == torch.long and t.min().item() == 200 and t.max().item() == 299
    full = N.sample_timesteps(20000, generator=g)
    assert full.min().item() == 0 and full.max().item() == 999
    assert torch.equal(N.sample_timesteps(4, min_timestep=700, max_timestep=700), torch.full((4,), 700))
    assert N.sample_timesteps(5, min_timestep=None, max_timestep=None).max().item() < 1000
    for lo, hi in [(500, 400), (-1, 10), (0, 1001), (1000, 1000)]:
        with pytest.raises(ValueError):
            N.sample_timesteps(2, min_timestep=lo, max_timestep=hi)


# ---------------------------------------------------------------- loss types


PRED = torch.tensor([0.0, 0.1, 1.0, -3.0]).view(1, 1, 2, 2)
TARGET = torch.zeros(1, 1, 2, 2)


def test_loss_types_closed_form():
    d = [0.0, 0.1, 1.0, -3.0]
    c = 0.5
    cases = {
        "l2": [x * x for x in d],
        "l1": [abs(x) for x in d],
        "huber": [2 * c * (math.sqrt(x * x + c * c) - c) for x in d],
        "smooth_l1": [2 * (math.sqrt(x * x + c * c) - c) for x in d],
    }
    for loss_type, expected in cases.items():
        got = N.conditional_loss(PRED, TARGET, loss_type, "none", c).flatten()
        torch.testing.assert_close(got, torch.tensor(expected), msg=loss_type)
        assert N.conditional_loss(PRED, TARGET, loss_type, "mean", c).item() == pytest.approx(sum(expected) / 4)
        assert N.conditional_loss(PRED, TARGET, loss_type, "sum", c).item() == pytest.approx(sum(expected))
    zero = torch.tensor([0.0], dtype=torch.float64)  # float64: no cancellation in sqrt(d^2 + c^2) - c
    small = N.conditional_loss(torch.tensor([1e-3], dtype=torch.float64), zero, "huber", "none", 0.5)
    assert small.item() == pytest.approx(1e-6, rel=1e-3)  # pseudo-Huber ~ d^2 near 0 ...
    big = N.conditional_loss(torch.tensor([1e3]), torch.tensor([0.0]), "huber", "none", 0.5)
    assert big.item() == pytest.approx(2 * 0.5 * 1e3, rel=1e-3)  # ... and ~ 2c|d| far away
    with pytest.raises(ValueError):
        N.conditional_loss(PRED, TARGET, "l3")


def test_per_sample_huber_c_broadcasts():
    pred = torch.ones(2, 4, 3, 3)
    target = torch.zeros(2, 4, 3, 3)
    got = N.conditional_loss(pred, target, "huber", "none", torch.tensor([0.1, 1.0]))
    assert got[0, 0, 0, 0].item() == pytest.approx(2 * 0.1 * (math.sqrt(1 + 0.01) - 0.1))
    assert got[1, 0, 0, 0].item() == pytest.approx(2 * 1.0 * (math.sqrt(2) - 1.0))


def test_huber_schedules(eps_sched):
    t = torch.tensor([0, 250, 999])
    torch.testing.assert_close(N.huber_c_for(t, eps_sched, "constant", 0.1, 2.0), torch.full((3,), 0.2))
    expo = N.huber_c_for(t, eps_sched, "exponential", 0.1, 2.0)
    torch.testing.assert_close(expo, 2.0 * 0.1 ** (t.float() / 1000))  # scale at t=0, c*scale at t=T
    abar = closed_form_alphas_cumprod()[t]
    sigma = ((1 - abar) / abar).sqrt()
    expected = (1 - 0.1) / (1 + sigma) ** 2 + 0.1  # kohya ignores huber_scale for "snr"
    torch.testing.assert_close(N.huber_c_for(t, eps_sched, "snr", 0.1, 2.0).double(), expected, rtol=1e-5, atol=0)
    assert N.huber_c_for(t, eps_sched)[0] > 0.9 and N.huber_c_for(t, eps_sched)[-1] < 0.11
    with pytest.raises(ValueError):
        N.huber_c_for(t, eps_sched, "linear")


def test_compute_loss_order(eps_sched):
    """Mask element-wise before the per-sample mean, then prior weights, then SNR weights."""
    pred = torch.zeros(2, 4, 4, 4)
    pred[:, :, :, :2] = 2.0  # error 2 on the left half, 0 on the right
    target = torch.zeros_like(pred)
    t = torch.tensor([100, 800])
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :, :2] = 1.0  # keeps exactly the erroneous half
    snr_w = N.loss_weights(t, eps_sched, min_snr_gamma=5.0)
    got = N.compute_loss(pred, target, t, eps_sched, mask=mask, prior_weights=[1.0, 0.5], min_snr_gamma=5.0)
    per_sample = torch.tensor([2.0, 2.0 * 0.5])  # mean of 4 over half the pixels, times the prior weight
    torch.testing.assert_close(got, (per_sample * snr_w).mean())
    half = torch.zeros(2, 1, 4, 4)
    half[:, :, :, 2:] = 1.0  # keeps the error-free half only
    assert N.compute_loss(pred, target, t, eps_sched, mask=half).item() == 0.0
    big_mask = torch.nn.functional.interpolate(mask, size=(32, 32))  # pixel-size masks are area-resized
    torch.testing.assert_close(N.apply_masked_loss(torch.ones(2, 4, 4, 4), big_mask), mask.expand(2, 4, 4, 4))
