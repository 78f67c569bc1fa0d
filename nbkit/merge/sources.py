"""Checkpoints as lazily read tensors in the original (LDM) layout: the inputs of every merge.

A :class:`TensorSource` knows every tensor's dtype and shape up front (``specs``) and reads one
tensor when asked (``get``), so a merge holds only the tensors it is combining:

- ``.safetensors``: header parsed once, tensors read through ``safe_open`` (memory-mapped);
- ``.ckpt``/``.pt``: loaded ``weights_only`` (memory-mapped when the file is a zip), nested
  ``state_dict`` unwrapped; a legacy (non-zip) pickle is read whole, there is no other way;
- a diffusers folder: each component's weights are read lazily and converted to LDM names with
  the functions of :mod:`nbkit.formats.ldm_checkpoint`, one small group of tensors at a time
  (the SD2 text encoder's q/k/v together, since they become one ``in_proj_weight``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbkit.formats.checkpoint_io import damaged
from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from nbkit.merge.streaming import TensorSpec, read_safetensors_specs

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
_COMPONENTS = ("unet", "vae", "text_encoder")
_QKV = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)")
_LAYER = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.")


class TensorSource:
    """Tensors of one checkpoint, original layout: ``specs`` up front, ``get(key)`` on demand."""

    kind = "abstract"

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str]) -> None:
        self.path = path
        self.specs = specs
        self.metadata = metadata

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (the source is unusable afterwards)."""

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {len(self.specs)} tensors)"


def open_safetensors(path: Path):
    """``safe_open`` of a file whose header was checked; what safetensors still refuses is named too."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise damaged(path, str(e)) from None


class SafetensorsSource(TensorSource):
    """A ``.safetensors`` file read through ``safe_open``."""

    kind = "safetensors"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        specs, meta = read_safetensors_specs(path)  # DamagedCheckpointError for a cut or lying file
        super().__init__(path, specs, meta)
        self._handle = open_safetensors(path)

    def get(self, key: str) -> torch.Tensor:
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None


class MemorySource(TensorSource):
    """Tensors already loaded (or memory-mapped), e.g. from a weights-only ``.ckpt``."""

    kind = "pickle"

    def __init__(self, path: str | Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
        super().__init__(Path(path), {k: TensorSpec.of(v) for k, v in tensors.items()}, dict(metadata or {}))
        self._tensors = tensors

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


# ----------------------------------------------------------------------------- diffusers folders


class WeightFiles:
    """The weights of one diffusers component folder, read lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.specs: dict[str, TensorSpec] = {}
        self._where: dict[str, Any] = {}
        files = self.weight_files(folder)
        for file in files:
            if file.suffix == ".safetensors":
                specs, _ = read_safetensors_specs(file)
                handle = open_safetensors(file)
                self._where.update(dict.fromkeys(specs, handle))
                self.specs.update(specs)
            else:
                from nbkit.formats.checkpoint_io import read_single_file

                tensors, _ = read_single_file(file)
                self._where.update({k: tensors for k in tensors})
                self.specs.update({k: TensorSpec.of(v) for k, v in tensors.items()})

    @staticmethod
    def weight_files(folder: Path) -> list[Path]:
        for index in sorted(folder.glob("*.safetensors.index.json")):
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        for pattern in ("*.safetensors", "*.bin"):
            found = sorted(p for p in folder.glob(pattern) if p.name.count(".") == 1)  # no .fp16. variants
            found = found or sorted(folder.glob(pattern))
            if found:
                return found[:1]
        raise FileNotFoundError(f"{folder}: no .safetensors or .bin weights; is the diffusers model complete?")

    def get(self, key: str) -> torch.Tensor:
        where = self._where[key]
        return where[key] if isinstance(where, dict) else where.get_tensor(key)


@dataclass(frozen=True)
class _Unit:
    """Source keys of one component that convert together, and the conversion."""

    component: str
    keys: tuple[str, ...]
    convert: Callable[[Tensors], Tensors]


def _te_units(keys: list[str], v2: bool) -> list[_Unit]:
    def convert(extras: bool) -> Callable[[Tensors], Tensors]:
        return lambda sd: text_encoder_to_ldm(sd, v2=v2, extras=extras)

    keys = [k for k in keys if not k.endswith("position_ids")]
    groups: dict[Any, list[str]] = {}
    for key in keys:
        m = _QKV.fullmatch(key) if v2 else None
        groups.setdefault((int(m[1]), m[2]) if m else key, []).append(key)
    units = [_Unit("text_encoder", tuple(g), convert(False)) for g in groups.values()]
    pos = [k for k in keys if k.endswith("embeddings.position_embedding.weight")]
    layers = [int(m[1]) for k in keys if (m := _LAYER.match(k))]
    if not pos or not layers:  # not a CLIP text encoder; the per-key conversion has said so already
        return units
    if not v2:  # position_ids come from the position embedding
        return units + [_Unit("text_encoder", tuple(pos), convert(True))]
    last = [k for k in keys if (m := _LAYER.match(k)) and int(m[1]) == max(layers)]
    token = [k for k in keys if k.endswith("embeddings.token_embedding.weight")]
    return units + [_Unit("text_encoder", tuple(last + token), convert(True))]  # extra resblock, projection


def read_config(folder: Path, name: str = "config.json") -> dict:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {folder.parent} a complete diffusers model folder?")
    return json.loads(path.read_text())


def folder_config_payload(folder: str | Path) -> dict | None:
    """The ``nbkit.diffusers_config`` payload of a diffusers folder (None if it has no tokenizer)."""
    from nbkit.models.config_dirs import PAYLOAD_FORMAT, tokenizer_payload

    folder = Path(folder)
    try:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    except (OSError, ValueError) as e:
        logger.warning("%s: no usable tokenizer (%s); the output will not embed its config", folder, e)
        return None

    def clean(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "_name_or_path"}

    payload = {"format": PAYLOAD_FORMAT, "model_index": clean(read_config(folder, "model_index.json"))}
    for name in _COMPONENTS:
        payload[name] = clean(read_config(folder / name))
    payload["scheduler"] = clean(read_config(folder / "scheduler", "scheduler_config.json"))
    payload["tokenizer"] = tokenizer_payload(tokenizer)
    return payload


class DiffusersSource(TensorSource):
    """A diffusers ``StableDiffusionPipeline`` folder seen as an original-layout checkpoint."""

    kind = "diffusers"

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder}: no model_index.json, so not a diffusers model folder")
        self.configs = {name: read_config(folder / name) for name in _COMPONENTS}
        te = self.configs["text_encoder"]
        act = te.get("hidden_act")
        self.v2 = act == "gelu" if act in ("gelu", "quick_gelu") else int(te.get("hidden_size", 768)) == 1024
        self._files = {name: WeightFiles(folder / name) for name in _COMPONENTS}
        self._units = self._make_units()
        self._owner: dict[str, int] = {}
        specs: dict[str, TensorSpec] = {}
        for i, unit in enumerate(self._units):
            meta = {k: self._files[unit.component].specs[k].meta() for k in unit.keys}
            try:
                converted = unit.convert(meta)
            except KeyError as e:
                raise ValueError(f"{folder}/{unit.component}: {e.args[0]}") from None
            for key, value in converted.items():
                if key not in self._owner:
                    self._owner[key] = i
                    specs[key] = TensorSpec.of(value)
        payload = folder_config_payload(folder)
        meta = {} if payload is None else {CONFIG_METADATA_KEY: json.dumps(payload, sort_keys=True)}
        super().__init__(folder, specs, meta)
        self._cache: tuple[int, Tensors] | None = None

    def _make_units(self) -> list[_Unit]:
        unet_cfg, vae_cfg = self.configs["unet"], self.configs["vae"]
        units = [_Unit("unet", (k,), lambda sd: unet_to_ldm(sd, unet_cfg)) for k in self._files["unet"].specs]
        units += [_Unit("vae", (k,), lambda sd: vae_to_ldm(sd, vae_cfg)) for k in self._files["vae"].specs]
        return units + _te_units(list(self._files["text_encoder"].specs), self.v2)

    def get(self, key: str) -> torch.Tensor:
        index = self._owner[key]
        if self._cache is None or self._cache[0] != index:
            unit = self._units[index]
            files = self._files[unit.component]
            self._cache = (index, unit.convert({k: files.get(k) for k in unit.keys}))
        return self._cache[1][key]

    def close(self) -> None:
        self._cache = None


def is_sdxl_folder(folder: str | Path) -> bool:
    """A diffusers folder with a second text encoder (``StableDiffusionXLPipeline``)."""
    index = Path(folder) / "model_index.json"
    return index.is_file() and "text_encoder_2" in json.loads(index.read_text())


class SDXLDiffusersSource(DiffusersSource):
    """A diffusers ``StableDiffusionXLPipeline`` folder seen as an SGM single file: the key pairs of
    :func:`nbkit.formats.sgm_checkpoint.key_pairs` (U-Net/VAE as SD, CLIP-L under
    ``conditioner.embedders.0.transformer.``, bigG's q/k/v as one ``in_proj_*``), one file tensor at a
    time. The file-only extras (CLIP-L ``position_ids``, bigG ``logit_scale``) are not invented."""

    def __init__(self, folder: str | Path) -> None:
        from nbkit.formats.sgm_checkpoint import COMPONENTS, diffusers_to_sgm, key_pairs

        folder = Path(folder)
        self.configs = {name: read_config(folder / name) for name in COMPONENTS}
        self.v2 = False
        self._files = {name: WeightFiles(folder / name) for name in COMPONENTS}
        try:
            pairs = key_pairs({n: list(f.specs) for n, f in self._files.items()}, self.configs["unet"],
                              self.configs["vae"])  # fmt: skip
        except KeyError as e:
            raise ValueError(f"{folder}: {e.args[0]}") from None
        self._pairs = {pair.file_key: pair for pair in pairs}
        specs = {}
        for pair in pairs:
            metas = [self._files[pair.component].specs[k].meta() for k in pair.keys]
            specs[pair.file_key] = TensorSpec.of(diffusers_to_sgm(pair, metas))
        TensorSource.__init__(self, folder, specs, {})
        self._cache = None

    def get(self, key: str) -> torch.Tensor:
        from nbkit.formats.sgm_checkpoint import diffusers_to_sgm

        pair = self._pairs[key]
        files = self._files[pair.component]
        return diffusers_to_sgm(pair, [files.get(k) for k in pair.keys])


def open_source(path: str | Path) -> TensorSource:
    """A :class:`TensorSource` for a ``.safetensors``/``.ckpt`` file or a diffusers folder (an SDXL
    folder in the SGM layout)."""
    from nbkit.formats.checkpoint_io import read_single_file

    path = Path(path)
    if path.is_dir():
        return SDXLDiffusersSource(path) if is_sdxl_folder(path) else DiffusersSource(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file or diffusers folder")
    if path.suffix.lower() == ".safetensors":
        return SafetensorsSource(path)
    tensors, meta = read_single_file(path)
    return MemorySource(path, tensors, meta)


@dataclass(frozen=True)
class InputIdentity:
    """How A1111 names an input in merge metadata: file name, full sha256, legacy 8-digit hash."""

    name: str
    sha256: str | None
    legacy_hash: str | None


def identify(source: TensorSource, hash_files: bool = True) -> InputIdentity:
    """A1111's ``CheckpointInfo`` name/sha256/legacy hash (a folder has no hash: None)."""
    from nbkit.models.load import ModelInfo

    info = ModelInfo(arch="", v2=False, v_parameterization=False, source=source.kind, path=str(source.path))
    if not info.is_single_file or not hash_files:
        return InputIdentity(source.path.name, None, None)
    return InputIdentity(source.path.name, info.sha256(), info.legacy_hash())


def check_output(out: str | Path, inputs: list[str | Path | None], overwrite: bool = False) -> Path:
    """Refuse to write over an input (always) or over an existing file (unless ``overwrite``)."""
    out = Path(out)
    for given in inputs:
        if given is None:
            continue
        src = Path(given)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
            raise ValueError(f"{out}: this is an input of the operation; choose another output path")
        if src.is_dir() and src.resolve() in out.resolve().parents and out.suffix == "":
            raise ValueError(f"{out}: inside the input folder {src}; choose an output outside it")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) or choose another path")
    return out
