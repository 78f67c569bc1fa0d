"""What a DreamBooth run writes, and the EMA copy it may write instead of the raw weights.

Outputs (kohya ``save_model_as``):

- ``safetensors`` / ``ckpt``: one original-layout file (interop-formats.md §3.1) that A1111, ComfyUI,
  kohya and diffusers' ``from_single_file`` read; ``.ckpt`` is kohya's ``{"state_dict", "epoch",
  "global_step"}`` pickle of plain tensors;
- ``diffusers`` / ``diffusers_safetensors``: a diffusers folder (``.bin`` or ``.safetensors`` weights).

Every output is cast to ``save_precision`` on a CPU copy (the fp32 master weights are never touched)
and written atomically. With an EMA, ``save_ema`` picks the EMA as the model (``ema``), the raw
weights plus the EMA (``both``: LDM ``model_ema.*`` keys in a single file, ``unet_ema/`` in a
diffusers folder), or the raw weights alone (``prune``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from nbkit.train.common import save_dtype_for


class EMAWeights:
    """An exponential moving average of named weights, with diffusers ``EMAModel``'s warm-up:
    update k (1-based) uses ``decay = 0 if k == 1 else min(ema_decay, (k) / (k + 9))``, i.e.
    ``(1 + s) / (10 + s)`` with ``s = k - 1``; ``shadow = decay * shadow + (1 - decay) * weight``."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float, device: str | torch.device):
        self.decay = decay
        self.shadow = {n: p.detach().to(device, torch.float32, copy=True) for n, p in params.items()}

    def decay_at(self, update: int) -> float:
        s = update - 1
        return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], update: int) -> None:
        """Fold in the weights after optimizer step ``update`` (1-based, i.e. the step counter)."""
        weight = 1.0 - self.decay_at(update)
        for name, shadow in self.shadow.items():  # one tensor at a time: no second full copy in RAM
            shadow.lerp_(params[name].detach().to(shadow.device, shadow.dtype), weight)


def _cpu_copy(module, dtype: torch.dtype, state: dict[str, torch.Tensor] | None = None):
    """A CPU copy of a diffusers/transformers model in ``dtype``, built on the meta device first so
    only one copy of each weight ever exists in RAM; ``state`` replaces the model's weights."""
    from diffusers import ModelMixin

    state = module.state_dict() if state is None else {**module.state_dict(), **state}
    config = copy.deepcopy(module.config)
    with torch.device("meta"):
        clone = type(module).from_config(config) if isinstance(module, ModelMixin) else type(module)(config)
    clone.load_state_dict({k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                           for k, v in state.items()}, assign=True)  # fmt: skip
    return clone.eval()


def export_pipeline(pipeline, unet, text_encoder, dtype: torch.dtype, unet_state: dict | None = None):
    """A CPU ``StableDiffusionPipeline`` in ``dtype`` holding the trained weights (for writing only)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=_cpu_copy(unet, dtype, unet_state), vae=_cpu_copy(pipeline.vae, dtype),
        text_encoder=_cpu_copy(text_encoder, dtype), tokenizer=pipeline.tokenizer, scheduler=pipeline.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def ema_ldm_keys(ema_unet_state: dict[str, torch.Tensor], unet_config, decay: float, updates: int) -> dict:
    """LDM ``LitEma`` keys: ``model_ema.`` + the UNet key after ``model.`` with the dots removed."""
    from nbkit.formats.ldm_checkpoint import unet_to_ldm

    out = {"model_ema." + "".join(k.split(".")[1:]): v for k, v in unet_to_ldm(ema_unet_state, unet_config).items()}
    out["model_ema.decay"] = torch.tensor(decay, dtype=torch.float32)
    out["model_ema.num_updates"] = torch.tensor(updates, dtype=torch.int32)
    return out


def write_single_file(export, path: Path, arch: str, *, metadata: dict[str, str], extra: dict | None = None,
                      step: int = 0, epoch: int = 0) -> Path:
    """One original-layout file (``.safetensors`` with modelspec metadata, or kohya's ``.ckpt``)."""
    from nbkit.formats.ldm_checkpoint import ARCHITECTURES, pipeline_to_ldm, single_file_metadata
    from nbkit.io import atomic_path, save_safetensors_atomic

    tensors = {k: v.contiguous() for k, v in pipeline_to_ldm(export, v2=ARCHITECTURES[arch][1]).items()}
    tensors.update(extra or {})
    if path.suffix == ".ckpt":
        with atomic_path(path) as tmp:
            torch.save({"state_dict": tensors, "epoch": epoch, "global_step": step}, tmp)
        return path
    return save_safetensors_atomic(tensors, path, metadata=single_file_metadata(export, arch, path.stem, metadata))


def write_diffusers(export, folder: Path, safe: bool, ema_unet=None) -> Path:
    """A diffusers folder (text encoder with canonical ``text_model.`` keys and a tokenizer that old and
    new readers load; ``unet_ema/`` if given)."""
    from nbkit.formats.text_encoder_keys import canonicalize_text_encoder_files
    from nbkit.io import atomic_dir
    from nbkit.models.tiny import save_tokenizer_files

    with atomic_dir(folder) as tmp:
        export.save_pretrained(str(tmp), safe_serialization=safe)
        canonicalize_text_encoder_files(tmp)  # text_model.* names: transformers 4 and 5 both load them
        save_tokenizer_files(export.tokenizer, tmp / "tokenizer")
        if ema_unet is not None:
            ema_unet.save_pretrained(str(tmp / "unet_ema"), safe_serialization=safe)
    return folder


def output_paths(config, name: str, formats: tuple[str, ...]) -> list[Path]:
    """Where ``name`` is written in each format (a file, or a folder for diffusers formats)."""
    out = Path(config.output_dir)
    return [out / name if fmt.startswith("diffusers") else out / f"{name}.{fmt}" for fmt in formats]


def save_dreambooth(config, name: str, pipeline, info, unet, text_encoder, ema: EMAWeights | None, step: int,
                    epoch: int, formats: tuple[str, ...]) -> list[Path]:
    """Write the trained model as ``name`` in each of ``formats``; return the written paths."""
    dtype = save_dtype_for(config.save_precision)
    use_ema = ema is not None and config.save_ema == "ema"
    export = export_pipeline(pipeline, unet, text_encoder, dtype, ema.shadow if use_ema else None)
    keep_both = ema is not None and config.save_ema == "both"
    meta = {"nbkit.training": json.dumps({
        "method": "dreambooth", "steps": step, "epoch": epoch, "base_model": str(config.pretrained_model_name_or_path),
        "learning_rate": config.learning_rate, "prior_loss_weight": config.prior_loss_weight,
        "text_encoder_trained": config.trains_text_encoder, "ema": config.save_ema if ema is not None else "none",
    })}
    written = []
    for fmt, path in zip(formats, output_paths(config, name, formats)):
        if fmt.startswith("diffusers"):
            ema_unet = _cpu_copy(unet, dtype, ema.shadow) if keep_both else None
            written.append(write_diffusers(export, path, fmt == "diffusers_safetensors", ema_unet))
        else:
            extra = None
            if keep_both:
                shadow = {k: v.to("cpu", dtype) for k, v in ema.shadow.items()}
                extra = ema_ldm_keys(shadow, unet.config, ema.decay, step)
            written.append(write_single_file(export, path, info.arch, metadata=meta, extra=extra, step=step,
                                             epoch=epoch))
    return written


def remove_output(path: Path) -> None:
    """Delete an older periodic save (a file or a diffusers folder)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
