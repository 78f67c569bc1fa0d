"""``nbkit merge loras`` and ``nbkit lora resize``: kohya LoRA files in, a kohya LoRA file out.

The math is in :mod:`nbkit.merge.lora_math`; this module reads the files, checks that the
LoRAs belong to the same base model, writes the result with
:func:`nbkit.formats.kohya_lora.save_kohya_lora` (kohya key rules, ``sshs_*`` hashes) and builds
the metadata kohya's scripts write: ``ss_network_dim``/``ss_network_alpha`` (``"Dynamic"`` when
ranks differ per module), ``ss_network_args`` for conv modules, ``ss_v2``/``ss_base_model_version``
and a ``modelspec.*`` block with ``merged_from``.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.formats.kohya_metadata import IMPL_DIFFUSERS, IMPL_STABILITY_AI
from nbkit.formats.kohya_sdxl import BASE_MODEL_VERSION as SDXL_BASE_VERSION
from nbkit.formats.ldm_checkpoint import ARCHITECTURES as SD_ARCHITECTURES
from nbkit.formats.lycoris import is_lycoris_state_dict
from nbkit.formats.sgm_checkpoint import SDXL_ARCHITECTURE
from nbkit.merge.lora_math import (
    CLAMP_QUANTILE,
    LoraModule,
    ResizeReport,
    concat_merge,
    group_lora,
    lora_state_dict,
    resize_lora,
    svd_merge,
)
from nbkit.merge.sources import check_output

BASE_VERSIONS = {"sd15": "sd_v1", "sd21": "sd_v2", "sd21-v": "sd_v2_v", "sdxl": SDXL_BASE_VERSION}
#: arch -> (modelspec.architecture, ss_v2); SDXL as kohya sai_model_spec.build_metadata(sdxl=True)
ARCHITECTURES = {**SD_ARCHITECTURES, "sdxl": (SDXL_ARCHITECTURE, False)}
_SDXL_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_FROM_BASE_VERSION = {v: k for k, v in BASE_VERSIONS.items()}


def read_lora(path: str | Path) -> tuple[dict[str, LoraModule], dict[str, str]]:
    """A kohya LoRA ``.safetensors``: ``({stem: LoraModule}, metadata)``."""
    from safetensors.torch import load_file

    from nbkit.merge.streaming import read_safetensors_specs

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only kohya .safetensors LoRAs are supported")
    specs, meta = read_safetensors_specs(path)
    if is_lycoris_state_dict(specs):
        raise ValueError(lycoris_refusal(path, meta))
    return group_lora(load_file(str(path)), str(path)), meta


def lycoris_refusal(path: str | Path, metadata: Mapping[str, str]) -> str:
    """Why ``merge loras`` / ``lora resize`` refuse a LyCORIS file, and what to do instead.

    Both work on LoRA factors (``ΔW = up @ down``): a sum of LoHa (Hadamard) or LoKr (Kronecker)
    deltas is no LoHa/LoKr, a DoRA module's effect depends on the base weight it scales, and a
    flattened LoHa/LoKr conv factor does not say its kernel without the model. LyCORIS's author
    gives the same advice (KohakuBlueleaf/LyCORIS#229): merge each file into the base model.
    """
    try:
        algo = json.loads(metadata.get("ss_network_args") or "{}").get("algo")
    except (ValueError, AttributeError):
        algo = None
    what = f"a LyCORIS {algo} file" if algo else "a LyCORIS file (LoHa/LoKr/DoRA)"
    return (f"{path}: {what}: merging or resizing LoRA factors does not apply to it (a sum of LoHa/LoKr deltas "
            "is no LoHa/LoKr, DoRA depends on the base weights); merge it into the checkpoint instead, "
            "together with the other files: nbkit merge lora-into --model MODEL --lora FILE[:RATIO] ... --out OUT")


def lora_arch(modules: Mapping[str, LoraModule], metadata: Mapping[str, str], source: str) -> str:
    """``sd15`` | ``sd21`` | ``sd21-v`` | ``sdxl`` from kohya metadata, else from the names (SDXL:
    ``lora_te1_``/``lora_te2_`` or SGM U-Net stems) and the text encoder width."""
    sdxl_names = any(s.startswith(("lora_te1_", "lora_te2_", *_SDXL_UNET)) for s in modules)
    sd_names = any(s.startswith(("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_"))
                   for s in modules)  # fmt: skip
    sdxl_meta = str(metadata.get("ss_base_model_version", "")).startswith("sdxl")
    if sdxl_names and sd_names:
        raise ValueError(f"{source}: mixes SDXL (lora_te1_/lora_te2_/SGM U-Net) and SD1.x/SD2.x module names")
    if sdxl_names or sdxl_meta:
        if sd_names:
            raise ValueError(f"{source}: SD1.x/SD2.x module names but ss_base_model_version says SDXL")
        return "sdxl"
    version = metadata.get("ss_base_model_version")
    if version in _FROM_BASE_VERSION:
        return _FROM_BASE_VERSION[version]
    if metadata.get("ss_v2") in ("True", "False"):
        return "sd21" if metadata["ss_v2"] == "True" else "sd15"
    widths = {int(m.down.shape[1]) for s, m in modules.items() if s.startswith("lora_te_") and "q_proj" in s}
    return "sd21" if 1024 in widths else "sd15"


def _same_arch(archs: Sequence[str], paths: Sequence[Path]) -> str:
    if len({a.replace("-v", "") for a in archs}) > 1:
        listing = ", ".join(f"{p.name} ({a})" for p, a in zip(paths, archs))
        raise ValueError(f"the LoRAs are for different base models: {listing}; merge LoRAs of one model family")
    return archs[0]


def _rank_text(ranks: set[int]) -> str:
    return str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"


def _alpha_text(ranks: set[int]) -> str:
    """Concat sets alpha = rank per module: ``"8.0"``, or ``"Dynamic"`` when ranks differ."""
    return str(float(next(iter(ranks)))) if len(ranks) == 1 else "Dynamic"


def lora_metadata(
    arch: str, *, dim: str, alpha: str, title: str, network_args: Mapping[str, str] | None = None,
    merged_from: Sequence[str] = (), resolution: str | None = None, extra: Mapping[str, str] | None = None,
) -> dict[str, str]:  # fmt: skip
    """kohya's minimal LoRA metadata plus the modelspec block (``sai_model_spec.build_metadata``)."""
    from nbkit._version import __version__

    architecture, v2 = ARCHITECTURES[arch]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha,
            "ss_v2": str(v2), "ss_base_model_version": BASE_VERSIONS[arch], "ss_output_name": title}  # fmt: skip
    if network_args:
        meta["ss_network_args"] = json.dumps(dict(network_args))
    meta.update(extra or {})
    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPL_STABILITY_AI if arch == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.resolution": resolution or {"sd21-v": "768x768", "sdxl": "1024x1024"}.get(arch, "512x512"),
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat(),
        "modelspec.implementation_version": f"nbkit/{__version__}",
        "modelspec.prediction_type": "v" if arch == "sd21-v" else "epsilon",
    })  # fmt: skip
    if merged_from:
        meta["modelspec.merged_from"] = ", ".join(merged_from)
    return meta


@dataclass
class LoraMergeResult:
    """What ``merge_lora_files`` wrote."""

    path: Path
    mode: str  # "svd" | "concat"
    modules: int
    dim: str
    alpha: str
    inputs: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        parts = " + ".join(f"{r:g}·{Path(p).name}" for p, r in self.inputs)
        return f"{self.path}: {self.mode} merge of {parts}; {self.modules} modules, dim {self.dim}, alpha {self.alpha}"


def merge_lora_files(
    loras: Sequence[tuple[str | Path, float]],
    out: str | Path,
    *,
    new_rank: int | None = None,
    new_conv_rank: int | None = None,
    concat: bool = False,
    clamp_quantile: float | None = CLAMP_QUANTILE,
    save_precision: str = "fp32",
    overwrite: bool = False,
    progress: bool = True,
) -> LoraMergeResult:
    """Merge kohya LoRAs ``[(file, ratio), ...]`` into one: SVD at ``new_rank`` (kohya
    svd_merge_lora, ``alpha = rank``) or, with ``concat``, exactly by stacking along the rank."""
    from nbkit.formats.kohya_lora import save_kohya_lora

    if not loras:
        raise ValueError("give at least one LoRA")
    if concat == (new_rank is not None):
        raise ValueError("choose one: new_rank=R (SVD merge) or concat=True")
    paths = [Path(p) for p, _ in loras]
    out = check_output(out, list(paths), overwrite)
    read = [read_lora(p) for p in paths]
    arch = _same_arch([lora_arch(m, meta, str(p)) for (m, meta), p in zip(read, paths)], paths)
    weighted = [(modules, float(r)) for (modules, _), (_, r) in zip(read, loras)]
    names = [p.name for p in paths]
    if concat:
        modules = concat_merge(weighted, names)
        dim = _rank_text({m.rank for m in modules.values() if not m.is_conv3x3} or {0})
        conv = {m.rank for m in modules.values() if m.is_conv3x3}
        args = {"conv_dim": _rank_text(conv), "conv_alpha": _alpha_text(conv)} if conv else None
        alpha = _alpha_text({m.rank for m in modules.values() if not m.is_conv3x3} or {0})
    else:
        modules = svd_merge(weighted, new_rank, new_conv_rank, clamp_quantile=clamp_quantile, names=names,
                            progress=progress)  # fmt: skip
        conv_rank = new_rank if new_conv_rank is None else new_conv_rank
        has_conv = any(m.is_conv3x3 for m in modules.values())
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if has_conv else None
        dim, alpha = str(new_rank), str(float(new_rank))
    resolution = read[0][1].get("modelspec.resolution")
    meta = lora_metadata(arch, dim=dim, alpha=alpha, title=out.stem, network_args=args,
                         merged_from=[p.stem for p in paths], resolution=resolution)  # fmt: skip
    save_kohya_lora(lora_state_dict(modules), out, meta, save_precision)
    mode = "concat" if concat else "svd"
    return LoraMergeResult(out, mode, len(modules), dim, alpha, [(str(p), float(r)) for p, r in loras])


def _resize_metadata(
    meta: Mapping[str, str], arch: str, title: str, old: Mapping[str, LoraModule], new: Mapping[str, LoraModule],
    new_rank: int, conv_rank: int, dynamic: str | None, param: float | None,
) -> dict[str, str]:  # fmt: skip
    """Input metadata updated the way kohya resize_lora.py does."""
    out = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    if "ss_network_module" not in out:
        out = {**lora_metadata(arch, dim="", alpha="", title=title), **out}
    linear = [m for m in old.values() if not m.is_conv3x3] or list(old.values())
    old_dim = out.get("ss_network_dim") or str(linear[0].rank)
    comment = out.get("ss_training_comment", "")
    if dynamic:
        out["ss_training_comment"] = f"Dynamic resize with {dynamic}: {param} from {old_dim}; {comment}"
        out["ss_network_dim"] = out["ss_network_alpha"] = "Dynamic"
        return out
    conv_desc = "" if new_rank == conv_rank else f" (conv: {conv_rank})"
    out["ss_training_comment"] = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}; {comment}"
    out["ss_network_dim"] = str(new_rank)
    out["ss_network_alpha"] = str(float(linear[0].scale * new_rank))
    convs = [m for m in old.values() if m.is_conv3x3]
    if convs and out.get("ss_network_args", "").startswith("{"):
        args = json.loads(out["ss_network_args"])
        args.update(conv_dim=str(conv_rank), conv_alpha=str(float(convs[0].scale * conv_rank)))
        out["ss_network_args"] = json.dumps(args)
    return out


def resize_lora_file(
    path: str | Path,
    out: str | Path,
    *,
    new_rank: int = 4,
    new_conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    save_precision: str = "fp32",
    overwrite: bool = False,
    progress: bool = True,
) -> ResizeReport:
    """kohya resize_lora.py: SVD each module to ``new_rank`` (or a dynamic rank capped at it).

    Returns the report (Frobenius norm retained per module and overall).
    """
    from nbkit.formats.kohya_lora import save_kohya_lora

    path = Path(path)
    out = check_output(out, [path], overwrite)
    modules, meta = read_lora(path)
    arch = lora_arch(modules, meta, str(path))
    new, report = resize_lora(modules, new_rank, new_conv_rank, dynamic_method, dynamic_param, progress=progress)
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    metadata = _resize_metadata(meta, arch, out.stem, modules, new, new_rank, conv_rank, dynamic_method, dynamic_param)
    save_kohya_lora(lora_state_dict(new), out, metadata, save_precision)
    return report
