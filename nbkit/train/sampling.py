"""Sample images during training, as kohya sd-scripts does (``--sample_prompts``, ``--sample_sampler``,
``--sample_every_n_steps|epochs``, ``--sample_at_first``), with a diffusers pipeline.

The trainer decides *when* with :func:`should_sample` and calls :func:`generate_samples`, which
parses nothing: prompts come from :func:`~nbkit.train.sample_prompts.load_sample_prompts`.

Where nbkit differs from kohya, and why:

- **Seeds.** A prompt without ``--d`` gets ``derive_seed(base_seed, index)`` (a stable 32-bit
  hash of the run seed and the prompt's position in the file) instead of kohya's fresh random
  seed. The same prompt then starts from the same noise at every sampling point, so the images
  show what training changed and nothing else; the seed is in the file name either way.
- **Noise** comes from a CPU ``torch.Generator`` seeded per prompt, so an image does not depend
  on the order of the prompts, on what ran before, or on CPU vs GPU. The global RNG state is
  saved and restored (kohya does this too), so sampling never changes the training run.
- **File names** drop kohya's timestamp by default: ``{output_name}_{step:06d}_{index:02d}_{seed}.png``
  or, at an epoch end, ``{output_name}_e{epoch:06d}_{index:02d}_{seed}.png``. The same
  (step, prompt) always gives the same name, so a resumed run that samples the same step again
  replaces its images instead of adding near-duplicates, and a gallery can find a step's images
  without listing the folder. ``timestamp=True`` gives kohya's exact names
  (``..._{index:02d}_{%Y%m%d%H%M%S}_{seed}.png``).
- **Schedulers** are built from the model's own scheduler config (``from_config``), so
  ``prediction_type`` (v-prediction), ``clip_sample``, ``steps_offset`` and ``timestep_spacing``
  are the model's. kohya instead rebuilds each scheduler from fixed SD constants and forces
  ``clip_sample=True`` for DDIM.
- **Text.** By default the pipeline's own 77-token CLIP encoder is used (``clip_skip`` as kohya
  counts it: ``hidden_states[-clip_skip]`` and the final LayerNorm). kohya samples through its long-prompt-weighting pipeline
  (225 tokens, ``(tag:1.2)`` weights); pass ``encode_prompts`` (e.g. a partial of
  ``nbkit.train.text.encode_text``) to condition samples the way training does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nbkit.train.sample_images import sample_grid, save_png
from nbkit.train.sample_prompts import (
    DEFAULT_SIZE,
    SAMPLER_NAMES,
    SamplePrompt,
    SamplePromptError,
    canonical_sampler,
    load_sample_prompts,
)

__all__ = ["SAMPLER_NAMES", "SamplePrompt", "SamplePromptError", "derive_seed", "generate_samples", "load_sample_prompts",
           "make_sampler", "sample_file_name", "sample_grid", "save_png", "should_sample"]

# canonical kohya name -> (diffusers class, overrides of the model config); kohya get_my_scheduler.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # diffusers refuses final_sigmas_type="zero" (its default) with the first-order "dpmsolver".
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++"}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
# Names A1111 shows for the same samplers (its PNG Info reads the "parameters" text chunk).
_A1111_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                "dpmsolver++": "DPM++ 2M", "heun": "Heun", "dpm_2": "DPM2", "dpm_2_a": "DPM2 a"}


def make_sampler(name: str, scheduler_config: Mapping[str, Any] | Any):
    """A fresh diffusers scheduler for kohya sampler ``name`` (``ddim``, ``euler_a``, ``k_dpm_2_a``, ...)
    built from the model's ``scheduler_config`` (a config mapping or a scheduler), so the model's
    ``prediction_type`` and noise schedule are kept. Unknown names raise ``ValueError`` listing the
    valid ones."""
    import diffusers

    canonical = canonical_sampler(name)
    config = getattr(scheduler_config, "config", scheduler_config)
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler_config must be a mapping or a scheduler, got {type(scheduler_config).__name__}")
    class_name, overrides = _SCHEDULERS[canonical]
    with _quiet_schedulers():
        return getattr(diffusers, class_name).from_config(dict(config), **overrides)


@contextlib.contextmanager
def _quiet_schedulers() -> Iterator[None]:
    """Silence warnings the schedulers raise on every use that say nothing to a user: diffusers
    deprecates algorithm_type="dpmsolver" (kohya still offers it), and numpy 2 warns once per
    *element* (thousands per scheduler) when diffusers converts torch tensors with ``np.array``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dpmsolver.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"__array_wrap__ must accept context", category=DeprecationWarning)
        yield


def derive_seed(base_seed: int, index: int) -> int:
    """The seed of prompt ``index`` when it has no ``--d``: a stable 32-bit hash of the run seed and
    the index (the same at every step, on every machine and Python version)."""
    digest = hashlib.sha256(f"nbkit-sample:{int(base_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sample_file_name(output_name: str | None, index: int, seed: int, *, step: int, epoch: int | None = None,
                     timestamp: str | None = None) -> str:
    """kohya's sample name without (or, given ``timestamp``, with) its time stamp:
    ``{output_name}_{step:06d}_{index:02d}[_{timestamp}]_{seed}.png``, ``e{epoch:06d}`` instead of the
    step when ``epoch`` is given; no prefix when ``output_name`` is empty (kohya's ``None``)."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    stamp = f"_{timestamp}" if timestamp else ""
    return f"{prefix}{number}_{index:02d}{stamp}_{seed}.png"


def should_sample(step: int, epoch: int | None, *, sample_every_n_steps: int | None = None,
                  sample_every_n_epochs: int | None = None, sample_at_first: bool = False,
                  is_epoch_end: bool = False) -> bool:
    """kohya ``sample_images_common``'s rules. Call it with the global ``step`` after every optimizer
    step (``is_epoch_end=False``), at every epoch end with the 1-based number of the epoch just
    finished (``is_epoch_end=True``), and once before training with ``step=0``.

    - step 0: only ``sample_at_first``;
    - ``sample_every_n_epochs`` set: only at epoch ends whose number it divides, and
      ``sample_every_n_steps`` is then ignored (kohya);
    - otherwise ``sample_every_n_steps``: steps it divides, never at an epoch end;
    - neither set (``None`` or 0): never.
    """
    for label, value in (("sample_every_n_steps", sample_every_n_steps), ("sample_every_n_epochs", sample_every_n_epochs)):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 1 (or None/0 for off), got {value}")
    if step == 0:
        return bool(sample_at_first)
    if sample_every_n_epochs:
        return is_epoch_end and epoch is not None and epoch % sample_every_n_epochs == 0
    if sample_every_n_steps:
        return not is_epoch_end and step % sample_every_n_steps == 0
    return False


def _resolve_size(prompt: SamplePrompt, default_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(width, height): the prompt's, else ``default_size``, else 512; then kohya's rounding down to
    a multiple of 8, at least 64."""
    if default_size is None:
        dw = dh = DEFAULT_SIZE
    elif isinstance(default_size, int):
        dw = dh = default_size
    else:
        dw, dh = default_size
    width = prompt.width if prompt.width is not None else dw
    height = prompt.height if prompt.height is not None else dh
    return max(64, width - width % 8), max(64, height - height % 8)


def _a1111_parameters(prompt: SamplePrompt, sampler: str, seed: int, size: tuple[int, int], step: int) -> str:
    lines = [prompt.prompt]
    if prompt.negative_prompt:
        lines.append(f"Negative prompt: {prompt.negative_prompt}")
    lines.append(
        f"Steps: {prompt.sample_steps}, Sampler: {_A1111_NAMES.get(sampler, sampler)}, CFG scale: {prompt.scale:g}, "
        f"Seed: {seed}, Size: {size[0]}x{size[1]}, Training step: {step}"
    )
    return "\n".join(lines)


def _models(pipeline) -> list[torch.nn.Module]:
    names = ("unet", "text_encoder", "text_encoder_2", "vae")  # text_encoder_2: SDXL
    return [m for m in (getattr(pipeline, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _disabled_adapter_layers(model: torch.nn.Module) -> list[Any]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, so no peft adapters
        return []
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer) and m.disable_adapters]


@contextlib.contextmanager
def _model_state(models: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """eval mode, every peft adapter enabled, all models on ``device``; afterwards each module's
    train/eval flag, each parameter's ``requires_grad``, each adapter's on/off and each model's
    device are put back exactly (peft's ``enable_adapters`` also changes ``requires_grad``)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    grads = [(p, p.requires_grad) for model in models for p in model.parameters()]
    devices = [(model, _device_of(model)) for model in models]
    disabled = [layer for model in models for layer in _disabled_adapter_layers(model)]
    try:
        for model, where in devices:
            model.eval()
            if where != device:
                model.to(device)
        for layer in disabled:
            layer.enable_adapters(True)
        yield
    finally:
        for layer in disabled:
            layer.enable_adapters(False)
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        for model, where in devices:
            if _device_of(model) != where:
                model.to(where)


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _pipeline_state(pipeline) -> Iterator[None]:
    """Progress bar off; the scheduler and the progress-bar settings restored afterwards."""
    scheduler = pipeline.scheduler
    had_bar = hasattr(pipeline, "_progress_bar_config")
    bar = dict(pipeline._progress_bar_config) if had_bar else None
    pipeline.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipeline.scheduler = scheduler
        if had_bar:
            pipeline._progress_bar_config = bar
        else:
            del pipeline._progress_bar_config


def _autocast(device: torch.device, models: list[torch.nn.Module], dtype: torch.dtype | None):
    """``torch.autocast`` with ``dtype``; without one, with the lowest-precision model dtype when the
    models disagree (fp16 UNet + fp32 VAE during mixed-precision training), else no autocast."""
    if dtype is None:
        dtypes = {next(m.parameters()).dtype for m in models}
        low = [d for d in (torch.float16, torch.bfloat16) if d in dtypes]
        dtype = low[0] if len(dtypes) > 1 and low else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _generate_one(pipeline, prompt: SamplePrompt, *, seed: int, size: tuple[int, int], clip_skip: int | None,
                  encode_prompts: Callable[[list[str]], torch.Tensor] | None) -> Image.Image:
    kwargs: dict[str, Any] = dict(
        num_inference_steps=prompt.sample_steps,
        guidance_scale=prompt.scale,
        width=size[0],
        height=size[1],
        generator=torch.Generator(device="cpu").manual_seed(seed),
        output_type="pil",
    )
    if encode_prompts is None and clip_skip is not None and clip_skip > 1:
        encode_prompts = functools.partial(_encode_clip_skip, pipeline, clip_skip)
    if encode_prompts is not None:
        embeds = encode_prompts([prompt.prompt, prompt.negative_prompt or ""])
        kwargs.update(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:])
    else:
        kwargs.update(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt)
    return pipeline(**kwargs).images[0]


def _encode_clip_skip(pipeline, clip_skip: int, texts: list[str]) -> torch.Tensor:
    """kohya/A1111 clip skip: ``hidden_states[-clip_skip]`` then the final LayerNorm, 77 tokens.
    (diffusers' own ``clip_skip`` reaches for ``text_encoder.text_model``, which transformers 5
    removed, and counts from 0 where kohya counts from 1.)"""
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    if hasattr(pipeline, "maybe_convert_prompt"):  # a multi-vector embedding's token -> all its tokens (diffusers)
        texts = [pipeline.maybe_convert_prompt(text, tokenizer) for text in texts]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(_device_of(text_encoder))
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def generate_samples(
    pipeline,
    prompts: Sequence[SamplePrompt],
    *,
    default_sampler: str = "ddim",
    step: int,
    epoch: int | None,
    output_dir: str | Path,
    output_name: str | None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    default_size: int | tuple[int, int] | None = None,
    base_seed: int = 0,
    clip_skip: int | None = None,
    encode_prompts: Callable[[list[str]], torch.Tensor] | None = None,
    timestamp: bool = False,
) -> list[tuple[SamplePrompt, Image.Image, Path]]:
    """Generate one image per prompt with a diffusers SD pipeline and write it to
    ``<output_dir>/sample/`` (atomically, named by :func:`sample_file_name`).

    Each prompt uses its own size (else ``default_size``, an int or ``(width, height)``, else 512;
    rounded down to a multiple of 8, at least 64, as kohya does), steps, CFG scale, negative prompt,
    sampler (else ``default_sampler``) and seed (else :func:`derive_seed` of ``base_seed`` and its index). ``epoch`` is ``None`` for step-wise samples
    and the 1-based epoch number at an epoch end (it changes the file name, as in kohya).

    The models are put in eval mode on ``device`` (default: the UNet's) with any peft LoRA adapters
    enabled, under ``torch.no_grad`` and ``autocast_dtype``; afterwards the pipeline's scheduler and
    progress bar, each module's train/eval mode, ``requires_grad``, adapter state and device, and the
    global RNG are restored. ``clip_skip`` is kohya's (2 = penultimate layer). ``encode_prompts``,
    if given, maps ``[prompt, negative]`` to ``[2, tokens, dim]`` text embeddings used instead of the
    pipeline's encoder (``clip_skip`` is then not applied: apply it there). With mixed model dtypes
    and no ``autocast_dtype``, autocast uses the lowest precision among them.
    Returns ``(prompt, image, path)`` per prompt, for ``hooks.on_sample``.
    """
    default_sampler = canonical_sampler(default_sampler)
    models = _models(pipeline)
    target = torch.device(device) if device is not None else _device_of(pipeline.unet)
    model_config = pipeline.scheduler.config
    sample_dir = Path(output_dir) / "sample"
    results: list[tuple[SamplePrompt, Image.Image, Path]] = []
    with _rng_preserved(), _pipeline_state(pipeline), _model_state(models, target), torch.no_grad(), _quiet_schedulers():
        for position, prompt in enumerate(prompts):
            index = prompt.index if prompt.index is not None else position
            seed = prompt.seed if prompt.seed is not None else derive_seed(base_seed, index)
            size = _resolve_size(prompt, default_size)
            sampler = canonical_sampler(prompt.sample_sampler or default_sampler)
            pipeline.scheduler = make_sampler(sampler, model_config)
            with _autocast(target, models, autocast_dtype):
                image = _generate_one(pipeline, prompt, seed=seed, size=size, clip_skip=clip_skip,
                                      encode_prompts=encode_prompts)
            stamp = time.strftime("%Y%m%d%H%M%S", time.localtime()) if timestamp else None
            name = sample_file_name(output_name, index, seed, step=step, epoch=epoch, timestamp=stamp)
            path = save_png(image, sample_dir / name, parameters=_a1111_parameters(prompt, sampler, seed, size, step))
            results.append((prompt, image, path))
    return results


def preview_for_run(pipeline, prompts, config, *, step: int, epoch: int | None, device, weight_dtype,
                    default_size, hooks) -> None:
    """A trainer's preview: ``generate_samples`` with the run's settings, then ``hooks.on_sample``."""
    results = generate_samples(
        pipeline, prompts, default_sampler=config.sample_sampler, step=step, epoch=epoch,
        output_dir=config.output_dir, output_name=config.output_name, device=device,
        autocast_dtype=weight_dtype if weight_dtype != torch.float32 else None,
        default_size=default_size, base_seed=config.seed, clip_skip=config.clip_skip,
    )
    hooks.on_sample(step, [im for _, im, _ in results], [p.prompt for p, _, _ in results])
