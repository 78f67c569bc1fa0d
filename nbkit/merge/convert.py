"""``nbkit convert ...``: diffusers folder <-> single file, ``.ckpt`` -> ``.safetensors``, pruning.

- ``to_single_file``: a diffusers SD1/SD2 folder -> original-layout ``.safetensors`` (through
  :func:`nbkit.formats.ldm_checkpoint.save_pipeline_as_single_file`, configs embedded);
- ``to_diffusers``: a single file -> diffusers folder, offline (``load_pipeline`` + ``save_pretrained``);
- ``ckpt_to_safetensors``: a weights-only ``.ckpt`` -> ``.safetensors``, streamed, keeping
  ``global_step``/``epoch`` as metadata (nbkit uses SD2's global_step to tell 512-base from 768-v);
- ``prune_checkpoint``: drop ``model_ema.*`` (or copy the EMA weights into the UNet first) and
  training-only keys, store fp32 as fp16; streamed.

Every converter refuses to write over one of its inputs, and over an existing file unless
``overwrite`` is given. Outputs go through a temp file/folder and a rename.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.merge.a1111 import compile_regex
from nbkit.merge.sources import check_output, open_source
from nbkit.merge.streaming import TensorSpec, save_ckpt, stream_safetensors

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
#: keys only training needs: optimizer/scheduler state, the VAE's loss (discriminator, logvar).
TRAINING_ONLY = re.compile(r"^(optimizer|optimizer_states|lr_scheduler|lr_schedulers|callbacks|loss)[._]|^loss$")


def to_single_file(
    src: str | Path, out: str | Path, *, half: bool = False, arch: str | None = None, overwrite: bool = False
) -> Path:
    """A diffusers SD1/SD2 folder as one original-layout ``.safetensors`` file (configs embedded)."""
    from nbkit.formats.ldm_checkpoint import save_pipeline_as_single_file
    from nbkit.models.load import load_pipeline

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"{src}: not a diffusers folder; to_single_file converts folders (use prune to re-save files)")
    check_output(out, [src], overwrite)
    pipe, info = load_pipeline(str(src))
    return save_pipeline_as_single_file(pipe, out, arch or info.arch, half=half)


def to_diffusers(
    src: str | Path,
    out: str | Path,
    *,
    config_dir: str | Path | None = None,
    half: bool = False,
    overwrite: bool = False,
) -> Path:
    """A single ``.safetensors``/``.ckpt`` file as a diffusers folder, offline.

    Configs come from ``config_dir``, the file's embedded ``nbkit.diffusers_config``, or nbkit's
    shipped SD1.5/SD2.1 configs (see :func:`nbkit.models.load.load_pipeline`).
    """
    from nbkit.formats.text_encoder_keys import canonicalize_text_encoder_files
    from nbkit.io import atomic_dir
    from nbkit.models.load import load_pipeline
    from nbkit.models.tiny import save_tokenizer_files

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such single-file checkpoint")
    check_output(out, [src], overwrite)
    dtype = torch.float16 if half else torch.float32
    pipe, _ = load_pipeline(str(src), config_dir=None if config_dir is None else str(config_dir), torch_dtype=dtype)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        canonicalize_text_encoder_files(tmp)  # text_model.* names: transformers 4 and 5 both load them
        save_tokenizer_files(pipe.tokenizer, tmp / "tokenizer")
    return out


def ckpt_to_safetensors(
    src: str | Path, out: str | Path | None = None, *, overwrite: bool = False, progress: bool = True
) -> Path:
    """A weights-only ``.ckpt``/``.pt`` as ``.safetensors`` (default: same name), tensors unchanged."""
    src = Path(src)
    if src.suffix.lower() == ".safetensors":
        raise ValueError(f"{src} is already .safetensors")
    out = check_output(src.with_suffix(".safetensors") if out is None else out, [src], overwrite)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the output must end in .safetensors")
    with open_source(src) as source:
        meta = {**source.metadata, "format": "pt"}
        stream_safetensors(out, source.specs, source.get, meta, progress=progress, desc="converting")
    return out


def ema_key(key: str) -> str:
    """LDM ``LitEma`` name of a UNet weight: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


@dataclass
class PrunePlan:
    """Output key -> (source key, output spec), and what was dropped."""

    keys: dict[str, tuple[str, TensorSpec]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    ema_used: int = 0


def plan_prune(
    specs: Mapping[str, TensorSpec], *, ema: str = "drop", half: bool = True, drop: str | None = None
) -> PrunePlan:
    """Which keys to keep and from where (pure).

    ``ema``: ``drop`` the ``model_ema.*`` keys, ``keep`` them, or ``use`` them: every UNet weight
    with an EMA copy of the same shape takes the EMA values, then the EMA keys are dropped.
    """
    if ema not in ("drop", "keep", "use"):
        raise ValueError(f"ema must be 'drop', 'keep' or 'use', got {ema!r}")
    extra = compile_regex(drop, "drop") if drop else None
    plan = PrunePlan()
    for key, spec in specs.items():
        is_ema = key.startswith(EMA_PREFIX)
        if TRAINING_ONLY.search(key) or (is_ema and ema != "keep") or (extra and extra.search(key)):
            plan.dropped.append(key)
            continue
        source = key
        if ema == "use" and key.startswith(UNET_PREFIX):
            candidate = ema_key(key)
            if candidate in specs and specs[candidate].shape == spec.shape:
                source, plan.ema_used = candidate, plan.ema_used + 1
        out_dtype = torch.float16 if half and spec.dtype == torch.float32 else spec.dtype
        plan.keys[key] = (source, TensorSpec(out_dtype, spec.shape))
    if ema == "use" and plan.ema_used == 0:
        raise ValueError("ema='use' but the checkpoint has no model_ema.* copy of the UNet weights")
    return plan


@dataclass
class PruneResult:
    """What ``prune_checkpoint`` wrote."""

    path: Path
    kept: int
    dropped: list[str]
    ema_used: int
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        mib = 1 << 20
        ema = f", UNet from EMA ({self.ema_used} tensors)" if self.ema_used else ""
        return (
            f"{self.path}: kept {self.kept} tensors, dropped {len(self.dropped)}{ema}; "
            f"{self.bytes_before / mib:.1f} MiB of tensors -> {self.bytes_after / mib:.1f} MiB"
        )


def prune_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    ema: str = "drop",
    half: bool = True,
    drop: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PruneResult:
    """Write ``src`` without EMA and training-only keys, fp32 stored as fp16 (``half``), streamed.

    ``out``: ``.safetensors`` (metadata kept, ``format: pt``) or ``.ckpt`` (legacy torch format).
    ``drop`` is an extra regex of keys to remove.
    """
    out = check_output(out, [src], overwrite)
    if out.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ValueError(f"{out}: the output must end in .safetensors or .ckpt")
    with open_source(src) as source:
        plan = plan_prune(source.specs, ema=ema, half=half, drop=drop)
        specs = {k: spec for k, (_, spec) in plan.keys.items()}

        def produce(key: str) -> torch.Tensor:
            return source.get(plan.keys[key][0]).to(specs[key].dtype)

        if out.suffix.lower() == ".ckpt":
            save_ckpt({k: produce(k) for k in specs}, out)
        else:
            meta = {**source.metadata, "format": "pt"}
            stream_safetensors(out, specs, produce, meta, progress=progress, desc="pruning")
        before = sum(s.nbytes for s in source.specs.values())
    return PruneResult(out, len(specs), plan.dropped, plan.ema_used, before, sum(s.nbytes for s in specs.values()))
