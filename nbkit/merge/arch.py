"""Which model family a checkpoint is, from its keys and shapes only (no tensor data read).

Merging an SD1 model with an SD2 one, or a LoRA given where a checkpoint belongs, must fail
*before* anything is written, with a message that names the first keys that do not line up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nbkit.merge.streaming import TensorSpec

UNET = "model.diffusion_model."
FAMILY_NAMES = {
    "sd1": "SD1.x (CLIP ViT-L text encoder)",
    "sd2": "SD2.x (OpenCLIP ViT-H text encoder)",
    "sdxl": "SDXL",
    "lora": "a LoRA / LyCORIS network, not a checkpoint",
    "vae": "a VAE only",
    "unet": "a UNet without text encoder",
    "unknown": "not a Stable Diffusion checkpoint",
}


class ArchitectureMismatchError(ValueError):
    """Two models that cannot be merged key by key (different families or layer shapes)."""


def model_family(specs: Mapping[str, TensorSpec]) -> str:
    """``sd1`` | ``sd2`` | ``sdxl`` | ``lora`` | ``vae`` | ``unet`` | ``unknown`` from key names."""
    keys = list(specs)
    if any(k.startswith("lora_") or ".lora_down." in k or ".hada_w1" in k or ".lokr_w" in k for k in keys):
        return "lora"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    if any(k.startswith(UNET) for k in keys):
        return "unet"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return "vae"
    return "unknown"


def channel_merge_kind(a: tuple[int, ...], b: tuple[int, ...]) -> str | None:
    """A1111's input-channel exception: ``inpainting``/``instruct-pix2pix`` when only dim 1 differs.

    Raises :class:`ArchitectureMismatchError` for the reverse order (a 4-channel A with a 9- or
    8-channel B), as A1111 does. Returns None when the shapes are equal or differ otherwise.
    """
    if a == b or len(a) < 2 or len(a) != len(b) or a[0:1] + a[2:] != b[0:1] + b[2:]:
        return None
    if a[1] == 4 and b[1] == 9:
        raise ArchitectureMismatchError(
            "When merging inpainting model with a normal one, A must be the inpainting model: swap A and B"
        )
    if a[1] == 4 and b[1] == 8:
        raise ArchitectureMismatchError(
            "When merging instruct-pix2pix model with a normal one, A must be the instruct-pix2pix model: swap A and B"
        )
    if a[1] == 8 and b[1] == 4:
        return "instruct-pix2pix"
    if a[1] == 9 and b[1] == 4:
        return "inpainting"
    return None


def _describe(name: str, family: str) -> str:
    return f"{name} is {FAMILY_NAMES[family]}"


def check_same_architecture(
    named: Sequence[tuple[str, Mapping[str, TensorSpec]]], merge_keys: Sequence[str] | None = None
) -> None:
    """Raise :class:`ArchitectureMismatchError` unless every model is an SD checkpoint of A's family
    and every key in ``merge_keys`` has the same shape in all models that hold it (apart from
    A1111's inpainting/instruct-pix2pix first-conv exception for A).

    ``named`` is ``[(name, specs), ...]`` with A first.
    """
    (a_name, a_specs), others = named[0], named[1:]
    a_family = model_family(a_specs)
    for name, specs in named:
        family = model_family(specs)
        if family in ("lora", "vae", "unknown"):
            fix = " (merge it with `nbkit merge lora-into`)" if family == "lora" else ""
            raise ArchitectureMismatchError(f"{_describe(name, family)}{fix}; the merger needs full checkpoints")
    for name, specs in others:
        family = model_family(specs)
        mismatched = _mismatched_shapes(a_specs, specs, merge_keys)
        if family != a_family or mismatched:
            detail = "; ".join(f"{k}: {a_name} {a} vs {name} {b}" for k, a, b in mismatched[:4])
            shared = sum(1 for k in a_specs if k in specs)
            raise ArchitectureMismatchError(
                f"cannot merge {a_name} with {name}: {_describe(a_name, a_family)}, {_describe(name, family)}"
                f" ({shared} keys in common). First mismatching keys: {detail or 'none with different shapes'}. "
                "Merge checkpoints of the same architecture."
            )


def _mismatched_shapes(
    a: Mapping[str, TensorSpec], b: Mapping[str, TensorSpec], keys: Sequence[str] | None
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = []
    for key in a if keys is None else keys:
        if key not in a or key not in b or a[key].shape == b[key].shape:
            continue
        if channel_merge_kind(a[key].shape, b[key].shape):  # raises for a 4-channel A with a 9/8-channel B
            continue
        out.append((key, a[key].shape, b[key].shape))
    return out
