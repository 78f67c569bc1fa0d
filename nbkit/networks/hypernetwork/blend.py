"""Blend hypernetworks: the weighted sum of the weights of hypernetworks with one structure.

This is a merge into one new ``.pt`` (each tensor ``sum(w_i * t_i)``). To use several
hypernetworks side by side instead, each with its own strength, apply them together with
:func:`nbkit.networks.hypernetwork.apply.apply_hypernetwork` (they chain, as in A1111).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.networks.hypernetwork.module import Hypernetwork

Source = Hypernetwork | str | Path


def _load(source: Source) -> tuple[Hypernetwork, str]:
    if isinstance(source, Hypernetwork):
        return source, str(source.filename or source.name)
    return Hypernetwork.load(source), str(source)


def check_same_structure(first: Hypernetwork, other: Hypernetwork, first_label: str, other_label: str) -> None:
    """Raise :class:`ConfigError` naming both files and the first field that differs."""
    a, b = first.structure(), other.structure()
    for key in a:
        if a[key] != b[key]:
            raise ConfigError(f"cannot blend {other_label} with {first_label}: {key} differs ({b[key]} vs {a[key]}); "
                              "only hypernetworks created with the same sizes and structure can be blended (apply "
                              "them together with separate strengths instead)")


def blend_hypernetworks(sources: list[tuple[Source, float]], name: str, normalize: bool = False) -> Hypernetwork:
    """A new hypernetwork whose every tensor is ``sum(weight_i * tensor_i)`` (``normalize`` divides
    the weights by their sum first). Sources are :class:`Hypernetwork` objects or ``.pt`` paths."""
    if not sources:
        raise ConfigError("blend: give at least one hypernetwork with a weight")
    loaded = [(*_load(source), float(weight)) for source, weight in sources]
    first, first_label, _ = loaded[0]
    for hn, label, _ in loaded[1:]:
        check_same_structure(first, hn, first_label, label)
    total = sum(weight for _, _, weight in loaded)
    if normalize and total == 0:
        raise ConfigError("blend: the weights sum to 0, so they cannot be normalized")
    weights = [weight / total if normalize else weight for _, _, weight in loaded]
    data = first.to_data()
    data.name, data.step = name, 0
    states = [hn.to_data().layers for hn, _, _ in loaded]
    for size, pair in data.layers.items():
        for index, state in enumerate(pair):
            for key in state:
                state[key] = sum(w * s[size][index][key].float() for w, s in zip(weights, states, strict=True))
    blended = Hypernetwork.from_data(data, f"blend {name}")
    checkpoints = {hn.sd_checkpoint for hn, _, _ in loaded}
    if len(checkpoints) != 1:
        blended.sd_checkpoint = blended.sd_checkpoint_name = None
    blended.optional_info = "blend: " + " + ".join(f"{w:g} x {Path(label).stem}" for (_, label, _), w
                                                    in zip(loaded, weights, strict=True))
    return blended


def blend_hypernetwork_files(sources: list[tuple[Source, float]], output: str | Path, name: str | None = None,
                             normalize: bool = False, overwrite: bool = False) -> Path:
    """:func:`blend_hypernetworks` written to ``output`` (a ``.pt`` path)."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists: choose another output, or pass overwrite (--overwrite)")
    with torch.no_grad():
        blended = blend_hypernetworks(sources, name or output.stem, normalize)
    return blended.save(output)
