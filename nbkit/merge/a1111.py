"""A1111's checkpoint merger rules (``modules/extras.py::run_modelmerger``) as pure functions.

Everything here works on specs (dtype + shape) or on single tensors, so the plan of a merge is
known (and checked) before any data is read, and the streaming writer can emit the header first.

Rules (interop spec §3.2), in A1111's order:

1. only keys of A that contain ``'model'``, are present in B and are not in
   ``checkpoint_dict_skip_on_merge`` are merged; A's other keys pass through unchanged;
2. add difference: ``A + M·(B − C)``; for a B key missing from C, A1111 sets ``B − C`` itself to
   zeros (``theta_1[key] = torch.zeros_like(theta_1[key])``), so the result is A for that key;
3. A with 9 (inpainting) or 8 (instruct-pix2pix) input channels and a 4-channel B: only
   ``[:, 0:4]`` is merged, in A's dtype; the reverse order is an error;
4. ``save_as_half`` turns fp32 tensors into fp16: with interpolation only the merged (and baked
   VAE) keys, with "No interpolation" every key;
5. ``bake_in_vae`` writes each VAE key ``k`` to ``first_stage_model.<k>`` if A has that key;
6. ``discard_weights``: keys matching the regex (``re.search``) are dropped.

The merged dtype is what torch's type promotion gives for A1111's own expressions (an fp16 A
and an fp32 B give fp32, as in A1111); it is computed by running those expressions on empty tensors.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from nbkit.merge.arch import ArchitectureMismatchError, channel_merge_kind
from nbkit.merge.streaming import TensorSpec

Specs = Mapping[str, TensorSpec]
#: nbkit method name -> the name A1111 shows and stores in ``sd_merge_recipe.interp_method``.
METHODS = {"weighted_sum": "Weighted sum", "add_difference": "Add difference", "no_interpolation": "No interpolation"}
CHECKPOINT_DICT_SKIP_ON_MERGE = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)
VAE_IGNORE_KEYS = ("model_ema.decay", "model_ema.num_updates")  # modules/sd_vae.py::vae_ignore_keys
VAE_PREFIX = "first_stage_model."


def weighted_sum(theta0: torch.Tensor, theta1: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 − M)·A + M·B``, written as A1111 writes it (same rounding)."""
    return ((1 - alpha) * theta0) + (alpha * theta1)


def get_difference(theta1: torch.Tensor, theta2: torch.Tensor) -> torch.Tensor:
    """``B − C``."""
    return theta1 - theta2


def add_difference(theta0: torch.Tensor, theta1_2_diff: torch.Tensor, alpha: float) -> torch.Tensor:
    """``A + M·(B − C)``."""
    return theta0 + (alpha * theta1_2_diff)


def to_half(tensor: torch.Tensor, enable: bool) -> torch.Tensor:
    """fp32 -> fp16 when enabled; every other dtype unchanged (A1111 ``to_half``)."""
    return tensor.half() if enable and tensor.dtype == torch.float32 else tensor


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    return method


def is_merged_key(key: str, b: Specs | None) -> bool:
    """A1111: merge only keys containing 'model', present in B, not in the skip list."""
    return b is not None and "model" in key and key in b and key not in CHECKPOINT_DICT_SKIP_ON_MERGE


def merge_tensor(
    method: str,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None,
    multiplier: float,
    channels: str | None = None,
) -> torch.Tensor:
    """One merged key, exactly as A1111 computes it.

    ``c`` None means the key is missing from C. A1111 (``modules/extras.py::run_modelmerger``, the
    "Merging B and C" loop) then replaces the *difference* with zeros, not C:
    ``theta_1[key] = torch.zeros_like(theta_1[key])``, so A + M·0 = A (B's dtype still takes part
    in type promotion, as in A1111).
    """
    if method == "add_difference":
        b = torch.zeros_like(b) if c is None else get_difference(b, c)
        combine = add_difference
    elif method == "weighted_sum":
        combine = weighted_sum
    else:
        raise ValueError(f"method {method!r} merges nothing")
    if channels is None:
        return combine(a, b, multiplier)
    out = a.clone()
    out[:, 0:4] = combine(a[:, 0:4], b, multiplier)
    return out


def merged_dtype(method: str, a: torch.dtype, b: torch.dtype, c: torch.dtype | None) -> torch.dtype:
    """The dtype A1111's expression produces for these input dtypes (type promotion)."""
    empty = {name: torch.empty(0, dtype=d) for name, d in (("a", a), ("b", b), ("c", c)) if d is not None}
    return merge_tensor(method, empty["a"], empty["b"], empty.get("c"), 0.5).dtype


@dataclass(frozen=True)
class KeyAction:
    """Where one output tensor comes from: A as is, a merge, or the baked-in VAE."""

    source: str  # "a" | "merge" | "vae"
    spec: TensorSpec  # the output dtype and shape
    channels: str | None = None  # "inpainting" / "instruct-pix2pix": merge [:, 0:4] only
    vae_key: str | None = None  # key in the VAE file
    half: bool = False  # apply to_half after computing


@dataclass
class MergePlan:
    """Every output key with its action; flags for A1111's recipe."""

    method: str
    actions: dict[str, KeyAction] = field(default_factory=dict)
    is_inpainting: bool = False
    is_instruct_pix2pix: bool = False

    def specs(self) -> dict[str, TensorSpec]:
        return {k: a.spec for k, a in self.actions.items()}

    def count(self, source: str) -> int:
        return sum(1 for a in self.actions.values() if a.source == source)


def _half_spec(spec: TensorSpec, enable: bool) -> TensorSpec:
    return TensorSpec(torch.float16, spec.shape) if enable and spec.dtype == torch.float32 else spec


def _merge_action(key: str, method: str, a: Specs, b: Specs, c: Specs | None, half: bool) -> KeyAction:
    channels = channel_merge_kind(a[key].shape, b[key].shape)
    if channels is None and a[key].shape != b[key].shape:
        raise ArchitectureMismatchError(f"{key}: A has shape {a[key].shape}, B {b[key].shape}; cannot merge")
    c_dtype = None
    if method == "add_difference" and c is not None and key in c:
        if c[key].shape != b[key].shape:
            raise ArchitectureMismatchError(f"{key}: B has shape {b[key].shape}, C {c[key].shape}; cannot subtract")
        c_dtype = c[key].dtype
    dtype = a[key].dtype if channels else merged_dtype(method, a[key].dtype, b[key].dtype, c_dtype)
    spec = _half_spec(TensorSpec(dtype, a[key].shape), half)
    return KeyAction("merge", spec, channels=channels, half=half)


def plan_merge(
    a: Specs,
    b: Specs | None,
    c: Specs | None = None,
    *,
    method: str = "weighted_sum",
    save_as_half: bool = False,
    discard: str | None = None,
    vae: Mapping[str, tuple[str, TensorSpec]] | None = None,
) -> MergePlan:
    """The output of an A1111 merge, key by key, from the inputs' specs.

    ``vae`` maps checkpoint keys (``first_stage_model.*``) to ``(VAE file key, spec)``, see
    :func:`vae_key_map`. Raises :class:`ArchitectureMismatchError` for shapes that cannot merge.
    """
    check_method(method)
    interpolate = method != "no_interpolation"
    if interpolate and b is None:
        raise ValueError(f"{METHODS[method]} needs model B")
    if method == "add_difference" and c is None:
        raise ValueError("Add difference needs model C")
    plan = MergePlan(method)
    for key, spec in a.items():
        if interpolate and is_merged_key(key, b):
            action = _merge_action(key, method, a, b, c, save_as_half)
            plan.is_inpainting |= action.channels == "inpainting"
            plan.is_instruct_pix2pix |= action.channels == "instruct-pix2pix"
        else:
            action = KeyAction("a", spec)
        if vae is not None and key in vae:
            vae_key, vae_spec = vae[key]
            action = KeyAction("vae", TensorSpec(_half_spec(vae_spec, save_as_half).dtype, spec.shape),
                               vae_key=vae_key, half=save_as_half)  # fmt: skip
        if save_as_half and not interpolate:
            action = KeyAction(action.source, _half_spec(action.spec, True), action.channels, action.vae_key, True)
        plan.actions[key] = action
    if discard:
        regex = compile_regex(discard, "discard")
        plan.actions = {k: v for k, v in plan.actions.items() if not regex.search(k)}
    return plan


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """``re.compile`` with an error that says which option is wrong."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what} regex {pattern!r} is invalid: {e}") from None


def vae_key_map(vae: Specs, a: Specs, vae_name: str = "VAE") -> dict[str, tuple[str, TensorSpec]]:
    """Checkpoint key -> (VAE key, spec) for the VAE keys A has (``sd_vae.load_vae_dict`` rules).

    Accepts a VAE state dict with ``encoder.``/``decoder.`` keys (A1111's format) and one whose keys
    already start with ``first_stage_model.``. Shapes must match A's, up to 1x1 dims (older VAE
    files store the mid-block attention as Linear weights; they are reshaped).
    """
    out: dict[str, tuple[str, TensorSpec]] = {}
    for key, spec in vae.items():
        if key.startswith("loss") or key in VAE_IGNORE_KEYS:
            continue
        target = key if key.startswith(VAE_PREFIX) else VAE_PREFIX + key
        if target in a:
            if _squeeze(a[target].shape) != _squeeze(spec.shape):
                raise ArchitectureMismatchError(
                    f"{vae_name}: {key} has shape {spec.shape} but the checkpoint's {target} is {a[target].shape}; "
                    "the VAE does not belong to this model family"
                )
            out[target] = (key, spec)
    if not out:
        diffusers = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in vae)
        hint = (
            " It has diffusers key names: pass the diffusers vae folder (with config.json) instead."
            if diffusers
            else ""
        )
        raise ValueError(f"{vae_name}: none of its keys match the checkpoint's first_stage_model.* keys.{hint}")
    return out


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# ----------------------------------------------------------------------------- metadata


def parse_a1111_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """``read_metadata_from_safetensors``: values that start with ``{`` are JSON-decoded when valid."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        out[key] = value
        if isinstance(value, str) and value[0:1] == "{":
            with contextlib.suppress(ValueError):
                out[key] = json.loads(value)
    return out


@dataclass(frozen=True)
class ModelRecord:
    """What A1111 records about one input: ``CheckpointInfo`` name, sha256, legacy hash, metadata."""

    name: str
    sha256: str | None
    legacy_hash: str | None
    metadata: Mapping[str, str]


def merge_recipe(
    method: str, records: tuple[ModelRecord | None, ModelRecord | None, ModelRecord | None], *,
    multiplier: float, save_as_half: bool, custom_name: str, config_source: int, bake_in_vae: str,
    discard_weights: str, is_inpainting: bool, is_instruct_pix2pix: bool,
) -> dict[str, Any]:  # fmt: skip
    """The ``sd_merge_recipe`` dict, keys in A1111's order."""
    a, b, c = records
    return {
        "type": "webui",
        "primary_model_hash": a.sha256 if a else None,
        "secondary_model_hash": b.sha256 if b else None,
        "tertiary_model_hash": c.sha256 if c else None,
        "interp_method": METHODS[method],
        "multiplier": multiplier,
        "save_as_half": save_as_half,
        "custom_name": custom_name,
        "config_source": config_source,
        "bake_in_vae": bake_in_vae,
        "discard_weights": discard_weights,
        "is_inpainting": is_inpainting,
        "is_instruct_pix2pix": is_instruct_pix2pix,
    }


def merge_models_entry(records: tuple[ModelRecord | None, ...]) -> dict[str, Any]:
    """The ``sd_merge_models`` dict: each input, then the inputs' own ``sd_merge_models``."""
    out: dict[str, Any] = {}
    for record in records:
        if record is None:
            continue
        parsed = parse_a1111_metadata(record.metadata)
        if record.sha256 is not None:  # a diffusers folder has no file hash to key it by
            out[record.sha256] = {"name": record.name, "legacy_hash": record.legacy_hash,
                                  "sd_merge_recipe": parsed.get("sd_merge_recipe", None)}  # fmt: skip
        models = parsed.get("sd_merge_models", {})
        if isinstance(models, dict):
            out.update(models)
    return out


def merge_metadata(
    recipe: Mapping[str, Any],
    records: tuple[ModelRecord | None, ModelRecord | None, ModelRecord | None],
    *,
    copy_metadata_fields: bool = True,
    user_metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The safetensors metadata A1111 writes with save_metadata and add_merge_recipe on."""
    metadata: dict[str, str] = {}
    if copy_metadata_fields:
        for record in records:
            if record is not None:
                metadata.update(record.metadata)
    metadata.update(user_metadata or {})
    metadata["format"] = "pt"
    metadata["sd_merge_recipe"] = json.dumps(dict(recipe))
    metadata["sd_merge_models"] = json.dumps(merge_models_entry(records))
    return metadata
