"""``nbkit merge checkpoints``: A1111's checkpoint merger, streamed tensor by tensor.

The rules are A1111's (:mod:`nbkit.merge.a1111`); the output is a file A1111, ComfyUI, kohya
and diffusers load. Inputs are ``.safetensors``/``.ckpt`` files or diffusers folders (seen in the
original layout). The whole plan (every output key, dtype and shape) is made from the inputs'
headers first, so an architecture mismatch is reported before anything is written; then the
output header is written and each tensor is read, combined and appended in turn, so peak RAM
stays near a few of the largest tensors instead of the sum of the models (``.safetensors``
output; a ``.ckpt`` is a pickle and is built in memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY
from nbkit.merge.a1111 import (
    METHODS,
    MergePlan,
    ModelRecord,
    check_method,
    is_merged_key,
    merge_metadata,
    merge_recipe,
    merge_tensor,
    plan_merge,
    to_half,
    vae_key_map,
)
from nbkit.merge.arch import check_same_architecture
from nbkit.merge.sources import (
    MemorySource,
    TensorSource,
    WeightFiles,
    check_output,
    identify,
    open_source,
    read_config,
)
from nbkit.merge.streaming import save_ckpt, stream_safetensors

CONFIG_SOURCES = {"A, B or C": 0, "B": 1, "C": 2, "Don't": 3}


@dataclass
class MergeResult:
    """What a merge wrote."""

    path: Path
    method: str
    merged: int
    passed_through: int
    vae_keys: int
    is_inpainting: bool
    is_instruct_pix2pix: bool
    metadata: dict[str, str] = field(default_factory=dict)
    config_copied_from: Path | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kind = " (inpainting)" if self.is_inpainting else " (instruct-pix2pix)" if self.is_instruct_pix2pix else ""
        lines = [f"{self.path}: {METHODS[self.method]}{kind}, {self.merged} keys merged, "
                 f"{self.passed_through} from A, {self.vae_keys} from the VAE"]  # fmt: skip
        if self.config_copied_from:
            lines.append(f"config copied from {self.config_copied_from}")
        return "\n".join(lines + self.notes)


def open_vae(path: str | Path) -> TensorSource:
    """A VAE to bake in: an LDM-layout VAE file (bare or ``first_stage_model.`` keys), a full
    checkpoint, or a diffusers VAE folder (``config.json`` + weights, converted to LDM names)."""
    from nbkit.formats.ldm_checkpoint import vae_to_ldm

    path = Path(path)
    if path.is_dir() and (path / "model_index.json").is_file():
        path = path / "vae"
    if path.is_dir():
        files = WeightFiles(path)
        tensors = vae_to_ldm({k: files.get(k) for k in files.specs}, read_config(path))
        return MemorySource(path, tensors)
    return open_source(path)


def _config_near(path: Path | None) -> Path | None:
    """A1111 ``find_checkpoint_config_near_filename``: ``<stem>.yaml`` beside the checkpoint."""
    if path is None or path.is_dir():
        return None
    yaml = path.with_suffix(".yaml")
    return yaml if yaml.is_file() else None


def copy_config(out: Path, config_source: int, a: Path, b: Path | None, c: Path | None) -> Path | None:
    """A1111 ``create_config``: copy a sibling ``.yaml`` of A/B/C next to the output."""
    from nbkit.io import atomic_write_bytes

    if config_source == 0:
        cfg = _config_near(a) or _config_near(b) or _config_near(c)
    else:
        cfg = {1: _config_near(b), 2: _config_near(c)}.get(config_source)
    if cfg is not None:
        atomic_write_bytes(out.with_suffix(".yaml"), cfg.read_bytes())
    return cfg


def _record(source: TensorSource | None, hash_files: bool) -> ModelRecord | None:
    if source is None:
        return None
    ident = identify(source, hash_files)
    return ModelRecord(ident.name, ident.sha256, ident.legacy_hash, dict(source.metadata))


def _producer(plan: MergePlan, multiplier: float, a: TensorSource, b, c, vae):
    def produce(key: str) -> torch.Tensor:
        action = plan.actions[key]
        if action.source == "a":
            tensor = a.get(key)
        elif action.source == "vae":
            tensor = vae.get(action.vae_key).reshape(action.spec.shape)
        else:
            c_tensor = c.get(key) if c is not None and key in c else None
            tensor = merge_tensor(plan.method, a.get(key), b.get(key), c_tensor, multiplier, action.channels)
        return to_half(tensor, action.half)

    return produce


def merge_checkpoints(
    a: str | Path,
    b: str | Path | None = None,
    c: str | Path | None = None,
    *,
    out: str | Path,
    method: str = "weighted_sum",
    multiplier: float = 0.3,
    save_as_half: bool = False,
    discard: str | None = None,
    bake_in_vae: str | Path | None = None,
    copy_metadata_fields: bool = True,
    metadata: Mapping[str, str] | None = None,
    config_source: int = 0,
    hash_inputs: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge checkpoints as A1111's Checkpoint Merger does and write ``out`` (.safetensors or
    .ckpt; any other name gets ``.safetensors`` appended, as A1111 appends the format).

    ``method``: ``weighted_sum`` ((1−M)·A + M·B), ``add_difference`` (A + M·(B − C)) or
    ``no_interpolation`` (A only: with ``save_as_half``/``discard``/``bake_in_vae`` a cleanup).
    ``discard`` is a regex of keys to drop (e.g. ``model_ema``). ``metadata`` adds user entries;
    ``copy_metadata_fields`` copies the inputs' own metadata first (A1111's default).
    ``config_source``: 0 = copy A's, B's or C's sibling ``.yaml``; 1 = B's; 2 = C's; 3 = none.
    ``hash_inputs`` computes each input's sha256 for the recipe (reads every file once).
    """
    used, notes = _inputs_used(method, a, b, c)
    out = Path(out)
    if out.suffix.lower() not in (".safetensors", ".ckpt"):  # A1111 appends the format to the name
        out = out.with_name(out.name + ".safetensors")
    out = check_output(out, [*used, bake_in_vae], overwrite)
    with contextlib.ExitStack() as stack:
        src = [stack.enter_context(open_source(p)) if p is not None else None for p in used]
        vae = stack.enter_context(open_vae(bake_in_vae)) if bake_in_vae is not None else None
        plan = _plan(src, method, save_as_half, discard, vae)
        records = tuple(_record(s, hash_inputs) for s in src)
        result = MergeResult(out, method, plan.count("merge"), plan.count("a"), plan.count("vae"),
                             plan.is_inpainting, plan.is_instruct_pix2pix, notes=notes)  # fmt: skip
        recipe = merge_recipe(
            method, records, multiplier=multiplier, save_as_half=save_as_half, custom_name=out.stem,
            config_source=config_source, bake_in_vae=Path(bake_in_vae).name if bake_in_vae else "None",
            discard_weights=discard or "", is_inpainting=plan.is_inpainting,
            is_instruct_pix2pix=plan.is_instruct_pix2pix,
        )  # fmt: skip
        produce = _producer(plan, multiplier, src[0], src[1], src[2], vae)
        if out.suffix.lower() == ".safetensors":
            result.metadata = merge_metadata(recipe, records, copy_metadata_fields=copy_metadata_fields,
                                             user_metadata=metadata)  # fmt: skip
            _keep_a_config(result.metadata, src[0].metadata, plan)
            stream_safetensors(out, plan.specs(), produce, result.metadata, progress=progress, desc="merging")
        else:
            save_ckpt({k: produce(k) for k in plan.actions}, out)
    paths = [Path(p) if p is not None else None for p in used]
    result.config_copied_from = copy_config(out, config_source, *paths)
    return result


def _keep_a_config(metadata: dict[str, str], a_metadata: Mapping[str, str], plan: MergePlan) -> None:
    """The embedded diffusers config must describe the output's shapes, which are A's: copied
    fields would otherwise let B's or C's config win (A1111 copies A, then B, then C)."""
    if CONFIG_METADATA_KEY in a_metadata:
        metadata[CONFIG_METADATA_KEY] = a_metadata[CONFIG_METADATA_KEY]
    elif plan.is_inpainting or plan.is_instruct_pix2pix:
        metadata.pop(CONFIG_METADATA_KEY, None)


def _inputs_used(method: str, a, b, c) -> tuple[tuple, list[str]]:
    """The inputs the method reads (A1111 ignores B without interpolation, C without add
    difference), and notes about ignored ones."""
    check_method(method)
    interpolate = method != "no_interpolation"
    if interpolate and b is None:
        raise ValueError(f"{METHODS[method]} needs a model B")
    if method == "add_difference" and c is None:
        raise ValueError("Add difference needs a model C (the model B was fine-tuned from)")
    used = (a, b if interpolate else None, c if method == "add_difference" else None)
    given = (("B", b, used[1]), ("C", c, used[2]))
    return used, [f"note: {name} ignored by {METHODS[method]}" for name, path, use in given if path and not use]


def _plan(sources: list, method: str, save_as_half: bool, discard: str | None, vae) -> MergePlan:
    """Check architectures from headers only, then plan every output key."""
    a, b, c = sources
    named = [(f"{n} ({s.path.name})", s.specs) for n, s in zip("ABC", sources) if s is not None]
    merge_keys = [k for k in a.specs if is_merged_key(k, b.specs if b else None)]
    check_same_architecture(named, merge_keys)
    if b is not None and not merge_keys:
        raise ValueError(f"{b.path}: shares no mergeable ('model') keys with {a.path}; nothing would be merged")
    vae_map = vae_key_map(vae.specs, a.specs, str(vae.path)) if vae is not None else None
    return plan_merge(a.specs, b.specs if b else None, c.specs if c else None, method=method,
                      save_as_half=save_as_half, discard=discard, vae=vae_map)  # fmt: skip
