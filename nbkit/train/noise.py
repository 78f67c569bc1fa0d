"""Noise, timesteps and loss weighting for SD1/SD2 training, as kohya sd-scripts does them.

Every function mirrors one kohya function (named in its docstring) from
``library/custom_train_functions.py`` and ``library/train_util.py``, with the same formula
and the same order. Pure functions: the only state is the scheduler passed in.

One training step, in kohya's order (``train_network.py`` ``process_batch`` /
``get_noise_pred_and_target`` / ``post_process_loss``)::

    scheduler = prepare_noise_scheduler("epsilon", zero_terminal_snr=False)   # once
    noise = make_noise(latents, noise_offset=..., multires_noise_iterations=...)
    t = sample_timesteps(B, min_timestep=..., max_timestep=..., device=latents.device)
    noisy = noisy_latents(scheduler, latents, noise, t, ip_noise_gamma=...)  # input only
    pred = unet(noisy, t, cond).sample
    target = loss_target(scheduler, latents, noise, t, v_parameterization)   # the *unperturbed* noise
    loss = conditional_loss(pred.float(), target.float(), loss_type, "none", huber_c_for(t, scheduler, ...))
    loss = apply_masked_loss(loss, mask)            # element-wise, before the mean
    loss = loss.mean([1, 2, 3]) * prior_weights     # per-sample prior_loss_weight
    loss = loss * loss_weights(t, scheduler, ...)   # min-SNR, v-pred scaling, debiased
    loss = loss.mean()

``compute_loss`` runs the lines from ``conditional_loss`` on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0  # kohya: "if timestep is 0, snr_t is inf, so limit it to 1000"


# ---------------------------------------------------------------- scheduler


def prepare_noise_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The training ``DDPMScheduler`` with ``all_snr`` attached, as kohya builds it.

    Mirrors ``train_network.NetworkTrainer.get_noise_scheduler``: DDPM(0.00085, 0.012,
    scaled_linear, 1000, clip_sample=False), then ``prepare_scheduler_for_custom_training``
    (``all_snr = alphas_cumprod / (1 - alphas_cumprod)``), then, with ``zero_terminal_snr``,
    ``fix_noise_scheduler_betas_for_zero_terminal_snr``.

    Note kohya's order: ``all_snr`` is computed *before* the betas are rescaled, so the loss
    weights (min-SNR, debiased, v-pred scaling) keep using the original schedule's SNR while
    ``add_noise``/``get_velocity`` use the zero-terminal one. This also keeps min-SNR finite at
    t=999 (the rescaled SNR there is 0). Use ``snr_table(scheduler)`` for the rescaled SNR.
    """
    from diffusers import DDPMScheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}: use 'epsilon' or 'v_prediction'")
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    scheduler.all_snr = snr_table(scheduler)
    if zero_terminal_snr:
        if prediction_type != "v_prediction":
            # kohya train_util.verify_training_args warns the same way
            warnings.warn("zero_terminal_snr is meant for v_parameterization models", stacklevel=2)
        fix_betas_for_zero_terminal_snr(scheduler)
    return scheduler


def snr_table(scheduler) -> torch.Tensor:
    """SNR(t) = alpha_t^2 / sigma_t^2 for every train timestep (kohya
    ``prepare_scheduler_for_custom_training``)."""
    alphas_cumprod = scheduler.alphas_cumprod.float().cpu()
    alpha = torch.sqrt(alphas_cumprod)
    sigma = torch.sqrt(1.0 - alphas_cumprod)
    return (alpha / sigma) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has SNR 0 and the first keeps its value
    (arXiv 2305.08891, kohya ``enforce_zero_terminal_snr``)."""
    alphas_bar_sqrt = (1 - betas).cumprod(0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def fix_betas_for_zero_terminal_snr(scheduler) -> None:
    """Replace ``betas``, ``alphas`` and ``alphas_cumprod`` in place (kohya
    ``fix_noise_scheduler_betas_for_zero_terminal_snr``)."""
    betas = zero_terminal_snr_betas(scheduler.betas)
    alphas = 1.0 - betas
    scheduler.betas = betas
    scheduler.alphas = alphas
    scheduler.alphas_cumprod = torch.cumprod(alphas, dim=0)


def _all_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    table = getattr(scheduler, "all_snr", None)
    if table is None:  # a scheduler not built by prepare_noise_scheduler
        table = snr_table(scheduler)
        scheduler.all_snr = table
    return table.to(timesteps.device)[timesteps.long()].float()


# ---------------------------------------------------------------- noise


def _randn(shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=like.dtype).to(like.device)


def _rand1(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(1, generator=generator, device=device).to(like.device)


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: float | torch.Tensor,
    adaptive_noise_scale: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``noise + offset * randn(B, C, 1, 1)``: a random constant per sample and channel
    (kohya ``apply_noise_offset``). With ``adaptive_noise_scale`` the offset becomes
    ``offset + adaptive_noise_scale * |mean latent per channel|``, clamped at 0."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + noise_offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)


def pyramid_noise_like(
    noise: torch.Tensor,
    iterations: int = 6,
    discount: float = 0.4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-resolution noise (kohya ``pyramid_noise_like``): add bilinearly upsampled noise
    drawn at sizes shrinking by a random factor r in [2, 4) per level, weighted
    ``discount**i``, stop at 1 pixel, then divide by the std of the whole batch tensor.

    kohya draws r with Python's ``random``; here it comes from ``generator`` (same law)."""
    b, c, h, w = noise.shape
    noise = noise.clone()  # kohya adds in place; do not change the caller's tensor
    for i in range(iterations):
        r = _rand1(noise, generator).item() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _randn((b, c, hn, wn), noise, generator)
        noise += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def make_noise(
    latents: torch.Tensor,
    *,
    noise_offset: float | None = None,
    adaptive_noise_scale: float | None = None,
    noise_offset_random_strength: bool = False,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The noise for a batch, in kohya's order (``train_util.get_noise_noisy_latents_and_timesteps``):
    ``randn_like``, then the noise offset (one ``rand(1) * noise_offset`` strength for the
    whole batch with ``noise_offset_random_strength``), then multires pyramid noise."""
    if adaptive_noise_scale is not None and not noise_offset:
        raise ValueError("adaptive_noise_scale needs noise_offset (kohya: it is added to the offset)")
    noise = _randn(latents.shape, latents, generator)
    if noise_offset:
        offset: float | torch.Tensor = noise_offset
        if noise_offset_random_strength:
            offset = _rand1(latents, generator) * noise_offset
        noise = apply_noise_offset(latents, noise, offset, adaptive_noise_scale, generator)
    if multires_noise_iterations:
        noise = pyramid_noise_like(noise, multires_noise_iterations, multires_noise_discount, generator)
    return noise


def sample_timesteps(
    batch: int,
    *,
    min_timestep: int | None = 0,
    max_timestep: int | None = 1000,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)``; all equal to
    ``max_timestep`` when the two are equal (kohya ``train_util.get_timesteps``).
    ``None`` means kohya's defaults 0 and ``num_train_timesteps``."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 <= lo <= hi <= num_train_timesteps or lo == num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep ({lo}) <= max_timestep ({hi}) <= {num_train_timesteps}")
    if lo < hi:
        gen_device = generator.device if generator is not None else "cpu"
        timesteps = torch.randint(lo, hi, (batch,), generator=generator, device=gen_device)
    else:
        timesteps = torch.full((batch,), hi, device="cpu")
    return timesteps.long().to(device or "cpu")


def noisy_latents(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The forward diffusion ``add_noise(latents, noise, t)``. With ``ip_noise_gamma`` the UNet
    input gets ``noise + gamma * randn`` (input perturbation, arXiv 2301.11706) while the loss
    target keeps ``noise``; ``ip_noise_gamma_random_strength`` draws one ``rand(1) * gamma`` per
    batch (kohya ``train_util.get_noise_noisy_latents_and_timesteps``)."""
    if ip_noise_gamma:
        strength: float | torch.Tensor = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = _rand1(latents, generator) * ip_noise_gamma
        noise = noise + strength * _randn(latents.shape, latents, generator)
    out = scheduler.add_noise(latents, noise, timesteps)
    # kohya moves alphas_cumprod back to the CPU after add_noise moved it to the device
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.cpu()
    return out


def loss_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, v_parameterization: bool
) -> torch.Tensor:
    """What the UNet should predict: the noise, or ``get_velocity`` for v-parameterization
    (kohya ``get_noise_pred_and_target``). Pass the noise *before* input perturbation."""
    if v_parameterization:
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


# ---------------------------------------------------------------- loss


def loss_weights(
    timesteps: torch.Tensor,
    scheduler,
    *,
    min_snr_gamma: float | None = None,
    v_parameterization: bool = False,
    scale_v_pred_loss_like_noise_pred: bool = False,
    v_pred_like_loss: float | None = None,
    debiased_estimation_loss: bool = False,
) -> torch.Tensor:
    """Per-sample multipliers for the per-sample loss, float32 ``[B]`` (kohya
    ``NetworkTrainer.post_process_loss``, applied in its order; every step multiplies):

    - ``apply_snr_weight``: ``min(snr, gamma) / snr``, or ``/ (snr + 1)`` for v-prediction
      (snr not capped);
    - ``scale_v_prediction_loss_like_noise_prediction``: ``snr / (snr + 1)``, snr capped at 1000;
    - ``add_v_prediction_like_loss``: ``loss + loss / scale * v`` = ``1 + v / scale``;
    - ``apply_debiased_estimation``: ``1 / sqrt(snr)``, or ``1 / (snr + 1)`` for v-prediction,
      snr capped at 1000.

    Uses ``scheduler.all_snr`` (see ``prepare_noise_scheduler`` for zero terminal SNR).
    """
    if scale_v_pred_loss_like_noise_pred and not v_parameterization:
        raise ValueError("scale_v_pred_loss_like_noise_pred needs v_parameterization (kohya rejects it too)")
    if v_pred_like_loss and v_parameterization:
        raise ValueError("v_pred_like_loss is for epsilon models only (kohya rejects it with v_parameterization)")
    snr = _all_snr(scheduler, timesteps)
    capped = torch.minimum(snr, torch.full_like(snr, SNR_CAP))
    weight = torch.ones_like(snr)
    if min_snr_gamma:
        min_snr = torch.minimum(snr, torch.full_like(snr, min_snr_gamma))
        weight = weight * (min_snr / (snr + 1) if v_parameterization else min_snr / snr)
    if scale_v_pred_loss_like_noise_pred:
        weight = weight * (capped / (capped + 1))
    if v_pred_like_loss:
        weight = weight * (1 + v_pred_like_loss / (capped / (capped + 1)))
    if debiased_estimation_loss:
        weight = weight * (1 / (capped + 1) if v_parameterization else 1 / torch.sqrt(capped))
    return weight


def huber_c_for(
    timesteps: torch.Tensor,
    scheduler,
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample Huber threshold ``[B]`` (kohya ``train_util.get_huber_threshold_if_needed``):

    - ``constant``: ``huber_c * huber_scale``;
    - ``exponential``: ``exp(-alpha t) * huber_scale`` with ``alpha = -ln(huber_c) / T``,
      i.e. ``huber_scale`` at t=0 down to ``huber_c * huber_scale`` at t=T;
    - ``snr``: ``(1 - huber_c) / (1 + sigma_t)^2 + huber_c`` with
      ``sigma_t = sqrt((1 - abar_t) / abar_t)``; kohya does not apply ``huber_scale`` here.

    kohya returns ``None`` for l2/l1; ``conditional_loss`` ignores the value for those.
    """
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps.float()) * huber_scale
    if huber_schedule == "snr":
        alphas_cumprod = torch.index_select(scheduler.alphas_cumprod.cpu(), 0, timesteps.long().cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return ((1 - huber_c) / (1 + sigmas) ** 2 + huber_c).float().to(timesteps.device)
    if huber_schedule == "constant":
        return torch.full((timesteps.shape[0],), huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"huber_schedule={huber_schedule!r}: choose one of {', '.join(HUBER_SCHEDULES)}")


def conditional_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    reduction: str = "none",
    huber_c: float | torch.Tensor = 0.1,
) -> torch.Tensor:
    """Element-wise loss (kohya ``train_util.conditional_loss``):

    - ``l2``: ``(pred - target)^2``; ``l1``: ``|pred - target|``;
    - ``huber`` (pseudo-Huber): ``2 c (sqrt((pred - target)^2 + c^2) - c)``;
    - ``smooth_l1``: ``2 (sqrt((pred - target)^2 + c^2) - c)``.

    ``huber_c`` is a float or a per-sample ``[B]`` tensor (from ``huber_c_for``).
    ``reduction`` is ``none``, ``mean`` or ``sum``.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use none, mean or sum")
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    c = huber_c
    if isinstance(c, torch.Tensor):
        c = c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.dim() - 1)))
    root = torch.sqrt((pred - target) ** 2 + c**2) - c
    loss = 2 * c * root if loss_type == "huber" else 2 * root
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def apply_masked_loss(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Multiply the element-wise loss ``[B, C, h, w]`` by an alpha mask in [0, 1] (``[B, H, W]``
    or ``[B, 1, H, W]``, any resolution: area-resized to ``h, w``), no renormalisation
    (kohya ``custom_train_functions.apply_masked_loss``). ``None`` returns ``loss``."""
    if mask is None:
        return loss
    mask = mask.to(loss.device, loss.dtype)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[-2:] != loss.shape[-2:]:
        mask = F.interpolate(mask, size=loss.shape[-2:], mode="area")
    return loss * mask


def compute_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    *,
    loss_type: str = "l2",
    huber_c: float | torch.Tensor = 0.1,
    mask: torch.Tensor | None = None,
    prior_weights: torch.Tensor | Sequence[float] | None = None,
    **weighting,
) -> torch.Tensor:
    """The scalar batch loss from the UNet output, in kohya's order (``process_batch``):
    element-wise loss (fp32) -> alpha mask -> per-sample mean -> prior weights ->
    ``loss_weights(**weighting)`` -> batch mean."""
    loss = conditional_loss(pred.float(), target.float(), loss_type, "none", huber_c)
    loss = apply_masked_loss(loss, mask).mean(dim=list(range(1, loss.dim())))
    if prior_weights is not None:
        loss = loss * torch.as_tensor(prior_weights, device=loss.device, dtype=loss.dtype)
    loss = loss * loss_weights(timesteps, scheduler, **weighting).to(loss.device)
    return loss.mean()
