"""The text encoder of a diffusers folder, stored under the key names every reader knows.

transformers >= 5.6 flattened ``CLIPTextModel``: ``save_pretrained`` writes ``embeddings.*``,
``encoder.*`` and ``final_layer_norm.*``, with no ``text_model.`` segment. The published SD
repositories (and transformers 4.x, still in kohya's stack and many Colab images) use
``text_model.embeddings.*`` etc.; transformers 4 loads a flattened file with every weight missing and
only a warning. transformers 5 reads the ``text_model.`` names as well (``conversion_mapping.py``:
``"CLIPTextModel": [PrefixChange(prefix_to_remove="text_model")]``), so the canonical names load
strictly in both generations. ``CLIPTextModelWithProjection`` still wraps a ``text_model`` and is
left as it is (never ``text_model.text_model.``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

PREFIX = "text_model."
#: top-level children of transformers 5's flattened CLIPTextModel (all under ``text_model.`` in 4.x)
FLAT_ROOTS = ("embeddings", "encoder", "final_layer_norm")
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")


def canonical_text_encoder_key(key: str) -> str:
    """``encoder.layers.0...`` -> ``text_model.encoder.layers.0...``; other keys unchanged."""
    return PREFIX + key if key.split(".", 1)[0] in FLAT_ROOTS else key


def canonical_text_encoder_keys(state: Mapping[str, T]) -> dict[str, T]:
    """A CLIP text-encoder state dict with the published ``text_model.``-prefixed names (pure)."""
    return {canonical_text_encoder_key(k): v for k, v in state.items()}


def _rekey_safetensors(path: Path) -> None:
    from safetensors import safe_open

    from nbkit.io import save_safetensors_atomic

    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata() or {}
        if all(canonical_text_encoder_key(k) == k for k in keys):
            return
        tensors = canonical_text_encoder_keys({k: f.get_tensor(k) for k in keys})
    save_safetensors_atomic(tensors, path, metadata={"format": "pt", **metadata})


def _rekey_bin(path: Path) -> None:
    import torch

    from nbkit.io import atomic_path

    state = torch.load(path, map_location="cpu", weights_only=True)
    if all(canonical_text_encoder_key(k) == k for k in state):
        return
    with atomic_path(path) as tmp:
        torch.save(canonical_text_encoder_keys(state), tmp)


def canonicalize_text_encoder_files(model_dir: str | Path) -> list[Path]:
    """Rewrite the text encoder weights of a saved diffusers folder (``text_encoder/``, and
    ``text_encoder_2/`` if present) with canonical key names; return the files rewritten."""
    from nbkit.io import atomic_write_text

    done: list[Path] = []
    for name in TEXT_ENCODER_FOLDERS:
        folder = Path(model_dir) / name
        index = folder / "model.safetensors.index.json"
        if index.is_file():  # a sharded save: every shard and the index's weight map
            data = json.loads(index.read_text(encoding="utf-8"))
            shards = sorted(set(data.get("weight_map", {}).values()))
            data["weight_map"] = canonical_text_encoder_keys(data.get("weight_map", {}))
            for shard in shards:
                _rekey_safetensors(folder / shard)
            atomic_write_text(index, json.dumps(data, indent=2, sort_keys=True) + "\n")
            done += [folder / s for s in shards] + [index]
        elif (folder / "model.safetensors").is_file():
            _rekey_safetensors(folder / "model.safetensors")
            done.append(folder / "model.safetensors")
        elif (folder / "pytorch_model.bin").is_file():
            _rekey_bin(folder / "pytorch_model.bin")
            done.append(folder / "pytorch_model.bin")
    return done
