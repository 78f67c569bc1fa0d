"""``nbkit merge lora-into``: bake kohya LoRAs into a checkpoint, as kohya ``merge_lora.py`` does.

``W += ratio · (alpha / dim) · up @ down`` for every LoRA module (3×3 convs as in
:mod:`nbkit.merge.lora_math`), computed in ``precision`` and stored in the tensor's own dtype
(or ``save_precision``). Every other key of the model is kept.

LyCORIS files (``lycoris.kohya``: LoHa, LoKr, tucker LoCon, DoRA) merge with the weight LyCORIS's
forward pass builds (:meth:`nbkit.formats.lycoris.LycorisModule.apply`): ``W + ratio·ΔW``, or with
``dora_scale`` the decomposed ``(W + ΔW)·(ratio·(m/‖W + ΔW‖ − 1) + 1)``. Several files apply one
after the other, in the order given (which matters only for DoRA: its norm is the current weight's).

kohya stems are diffusers-style (``lora_unet_down_blocks_0_attentions_0_…``,
``lora_te_text_model_encoder_layers_0_…``). They are resolved against the module names of a
UNet/CLIP built on the meta device from the model's config, then mapped to checkpoint keys:

- single file: through the diffusers -> LDM maps of :mod:`nbkit.formats.ldm_checkpoint`; the SD2
  text encoder's q/k/v LoRAs land in thirds of OpenCLIP's ``attn.in_proj_weight``;
- diffusers folder: the component's own keys; the result is a diffusers folder again (or a
  single file when ``out`` ends in ``.safetensors``/``.ckpt``).

SDXL (a model with ``conditioner.embedders.*`` keys, or a diffusers folder with ``text_encoder_2``):
kohya's SDXL stems (``lora_unet_<SGM path>``, ``lora_te1_``, ``lora_te2_``; LoRA, LoCon and LyCORIS)
are resolved against meta SDXL models and land on the SGM file's keys (bigG's q/k/v in thirds of
``in_proj_weight``) or the folder's components (:mod:`nbkit.merge.sdxl`), as kohya
``networks/sdxl_merge_lora.py`` merges them.

Everything (names, shapes, which LoRA fits which key) is checked before writing.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.formats.lycoris import LycorisModule, group_lycoris, is_lycoris_state_dict, resolve_stems
from nbkit.merge.arch import model_family
from nbkit.merge.lora_math import LoraModule, fit_shape
from nbkit.merge.sources import DiffusersSource, TensorSource, WeightFiles, check_output, open_source
from nbkit.merge.streaming import TensorSpec, read_safetensors_specs, save_ckpt, stream_safetensors

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_QKV = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj")


@dataclass(frozen=True)
class Target:
    """Where a LoRA module's delta goes: a tensor key (per component for folders) and a row range."""

    key: str
    component: str | None = None  # diffusers component, None for a single file
    rows: tuple[int, int] | None = None  # SD2 in_proj third


@dataclass
class Patch:
    """One LoRA (or LyCORIS) module applied to one target with a ratio."""

    module: LoraModule | LycorisModule
    ratio: float
    rows: tuple[int, int] | None
    source: str


def apply_patches(weight: torch.Tensor, patches: Sequence[Patch], precision: torch.dtype) -> torch.Tensor:
    """``W + Σ ratio·(alpha/r)·up@down`` in ``precision`` (pure; ``weight`` is not modified).

    A LyCORIS module replaces the weight (or its rows) with the adapted one, since DoRA's result
    depends on the weight it is applied to; patches apply in order."""
    out = weight.to(precision, copy=True)
    for p in patches:
        region = out if p.rows is None else out[p.rows[0] : p.rows[1]]
        if isinstance(p.module, LycorisModule):
            region.copy_(p.module.apply(region, p.ratio, precision))
            continue
        delta = fit_shape(p.module.delta(precision), region.shape, p.source)
        region += p.ratio * delta
    return out


def meta_models(unet_config: dict, te_config: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A UNet and a CLIP text encoder built from configs on the meta device (names and shapes only)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_config.items() if not k.startswith("_")}))
    return unet, te


def ldm_target(kind: str, path: str, unet_config: dict, te_hidden: int, v2: bool, weight: torch.Tensor) -> Target:
    """Checkpoint key (and rows) of module ``path``'s weight in the original layout."""
    from nbkit.formats.ldm_checkpoint import SD2_TE_PREFIX, text_encoder_to_ldm, unet_to_ldm

    key = f"{path}.weight"
    if kind == "unet":
        return Target(next(iter(unet_to_ldm({key: weight}, unet_config))))
    m = _QKV.fullmatch(path)
    if v2 and m:
        i = "qkv".index(m[2])
        return Target(f"{SD2_TE_PREFIX}transformer.resblocks.{m[1]}.attn.in_proj_weight", None,
                      (i * te_hidden, (i + 1) * te_hidden))  # fmt: skip
    return Target(next(iter(text_encoder_to_ldm({key: weight}, v2=v2, extras=False))))


def model_configs(source: TensorSource, config_dir: str | Path | None = None) -> tuple[dict, dict, bool]:
    """``(unet config, text encoder config, v2)`` for a model: its folder, ``config_dir``, the
    embedded ``nbkit.diffusers_config``, or nbkit's shipped SD1.5/SD2.1 configs."""
    from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY
    from nbkit.merge.sources import read_config
    from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS
    from nbkit.models.load import detect_v2

    if isinstance(source, DiffusersSource):
        return source.configs["unet"], source.configs["text_encoder"], source.v2
    v2 = detect_v2({k: s.shape for k, s in source.specs.items()}, source.path)
    if config_dir is not None:
        folder = Path(config_dir)
    elif CONFIG_METADATA_KEY in source.metadata:
        payload = json.loads(source.metadata[CONFIG_METADATA_KEY])
        return payload["unet"], payload["text_encoder"], v2
    else:
        folder = CONFIGS_ROOT / SHIPPED_CONFIGS["sd21" if v2 else "sd15"]
    return read_config(folder / "unet"), read_config(folder / "text_encoder"), v2


def plan_patches(
    loras: Sequence[tuple[str, dict[str, torch.Tensor], float]],
    unet_config: dict,
    te_config: dict,
    resolve: Callable[[str, str, torch.Tensor], Target],
    specs: Callable[[Target], TensorSpec | None],
) -> dict[tuple[str | None, str], list[Patch]]:
    """``{(component, key): [Patch, ...]}`` for every LoRA module; every shape checked."""
    from nbkit.formats.kohya_lora import kohya_to_peft

    unet, te = meta_models(unet_config, te_config)
    names = {"unet": [n for n, _ in unet.named_modules()], "text_encoder": [n for n, _ in te.named_modules()]}
    weights = {"unet": unet, "text_encoder": te}
    plan: dict[tuple[str | None, str], list[Patch]] = {}
    for name, sd, ratio in loras:
        if is_lycoris_state_dict(sd):
            _plan_lycoris(plan, name, sd, ratio, weights, resolve, specs)
            continue
        unet_sd, te_sd, alphas, _ = kohya_to_peft(
            sd, unet_module_names=names["unet"], te_module_names=names["text_encoder"], source=name
        )
        for kind, peft_sd in (("unet", unet_sd), ("text_encoder", te_sd)):
            for path in sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd}):
                lora = LoraModule(peft_sd[f"{path}.lora_A.weight"], peft_sd[f"{path}.lora_B.weight"],
                                  alphas[f"{kind}.{path}"])  # fmt: skip
                _add_lora(plan, name, kind, path, lora, ratio, weights, resolve, specs)
    return plan


def _plan_lycoris(plan: dict, name: str, sd: dict[str, torch.Tensor], ratio: float, models: dict, resolve, specs,
                  where=None) -> None:
    """Add a LyCORIS file's patches to ``plan``: stems resolved against the (meta) models (``where``:
    ``{stem: (part, path)}`` already resolved, as for SDXL's SGM names), every module's delta checked
    against its target's shape."""
    modules = group_lycoris(sd, name)
    if where is None:
        sdxl = [s for s in modules if s.startswith(("lora_te1_", "lora_te2_"))]
        if sdxl:
            raise ValueError(f"{name}: an SDXL LyCORIS file (e.g. {sdxl[0]}) but an SD1.x/SD2.x model")
        names = {kind: [n for n, _ in m.named_modules()] for kind, m in models.items()}
        where = resolve_stems(modules, {**names, "text_encoder_2": None}, name)
    for stem, (kind, path) in sorted(where.items()):
        module = modules[stem]
        target = resolve(kind, path, models[kind].get_submodule(path).weight)
        spec = specs(target)
        if spec is None:
            raise ValueError(f"{name}: {kind} module {path} -> {target.key}, which the model does not have")
        shape = spec.shape if target.rows is None else (target.rows[1] - target.rows[0], *spec.shape[1:])
        what = f"{name}: {kind} {path} ({module.algo}) into {target.key} {spec.shape}"
        if not module.fits(shape):
            raise ValueError(f"{what}: the {module.algo} delta {module.flat_shape()} does not fit (a LyCORIS file "
                             "for another model?)")
        plan.setdefault((target.component, target.key), []).append(Patch(module, ratio, target.rows, what))


def _add_lora(plan: dict, name: str, kind: str, path: str, lora: LoraModule, ratio: float, models, resolve, specs):
    target = resolve(kind, path, models[kind].get_submodule(path).weight)
    spec = specs(target)
    if spec is None:
        raise ValueError(f"{name}: {kind} module {path} -> {target.key}, which the model does not have")
    shape = spec.shape if target.rows is None else (target.rows[1] - target.rows[0], *spec.shape[1:])
    what = f"{name}: {kind} {path} (weight {lora.weight_shape}) into {target.key} {spec.shape}"
    fit_shape(torch.empty(lora.weight_shape, device="meta"), shape, what)
    plan.setdefault((target.component, target.key), []).append(Patch(lora, ratio, target.rows, what))


def plan_sdxl_patches(
    loras: Sequence[tuple[str, dict[str, torch.Tensor], float]],
    configs: dict[str, dict],
    resolve: Callable[[str, str, torch.Tensor], Target],
    specs: Callable[[Target], TensorSpec | None],
) -> dict[tuple[str | None, str], list[Patch]]:
    """:func:`plan_patches` for SDXL: kohya SDXL stems (``lora_unet_<SGM path>``, ``lora_te1_``,
    ``lora_te2_``) of LoRA/LoCon and LyCORIS files resolved against meta SDXL models
    (:func:`nbkit.formats.kohya_sdxl.stem_index`), as kohya ``networks/sdxl_merge_lora.py`` finds them
    by name on its SAI-layout U-Net and two text encoders."""
    from nbkit.formats.kohya_sdxl import kohya_sdxl_to_peft, stem_index
    from nbkit.merge.sdxl import meta_sdxl_models

    models = meta_sdxl_models(configs)
    names = {part: [n for n, _ in m.named_modules()] for part, m in models.items()}
    plan: dict[tuple[str | None, str], list[Patch]] = {}
    for name, sd, ratio in loras:
        if is_lycoris_state_dict(sd):
            index = stem_index(names, configs["unet"])
            stems = {k.partition(".")[0] for k in sd}
            unknown = sorted(s for s in stems if index.get(s) is None)
            if unknown:
                raise ValueError(f"{name}: {len(unknown)} LyCORIS modules match no module of the SDXL model, e.g. "
                                 f"{unknown[:5]} (a file for SD1.x/SD2.x?)")
            _plan_lycoris(plan, name, sd, ratio, models, resolve, specs, where={s: index[s] for s in stems})
            continue
        sds, alphas, _ = kohya_sdxl_to_peft(sd, names, configs["unet"], source=name)
        for kind, peft_sd in sds.items():
            for path in sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd}):
                lora = LoraModule(peft_sd[f"{path}.lora_A.weight"], peft_sd[f"{path}.lora_B.weight"],
                                  alphas[f"{kind}.{path}"])  # fmt: skip
                _add_lora(plan, name, kind, path, lora, ratio, models, resolve, specs)
    return plan


@dataclass
class LoraIntoResult:
    """What ``merge_lora_into`` wrote."""

    path: Path
    patched_keys: int
    modules: int
    loras: list[tuple[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        names = ", ".join(f"{Path(p).name}:{r:g}" for p, r in self.loras)
        return f"{self.path}: merged {names} ({self.modules} LoRA modules into {self.patched_keys} tensors)"


def _out_dtype(spec: TensorSpec, save_dtype: torch.dtype | None) -> torch.dtype:
    return save_dtype if save_dtype is not None and spec.dtype.is_floating_point else spec.dtype


def _write_single_file(source: TensorSource, plan: dict, out: Path, precision, save_dtype, meta, progress) -> None:
    specs = {k: TensorSpec(_out_dtype(s, save_dtype), s.shape) for k, s in source.specs.items()}

    def produce(key: str) -> torch.Tensor:
        tensor = source.get(key)
        patches = plan.get((None, key))
        if patches:
            tensor = apply_patches(tensor, patches, precision)
        return tensor.to(specs[key].dtype)

    if out.suffix.lower() == ".ckpt":
        save_ckpt({k: produce(k) for k in specs}, out)
    else:
        stream_safetensors(out, specs, produce, meta, progress=progress, desc="merging LoRA")


def _write_folder(source: DiffusersSource, plan: dict, out: Path, precision, save_dtype, progress) -> None:
    from safetensors import safe_open

    from nbkit.io import atomic_dir

    components = {c for c, _ in plan}
    with atomic_dir(out) as tmp:
        shutil.copytree(source.path, tmp, dirs_exist_ok=True)
        for component in components:
            for file in WeightFiles.weight_files(source.path / component):
                if file.suffix != ".safetensors":
                    raise ValueError(f"{file}: .bin weights; convert the model to safetensors first")
                specs, meta = read_safetensors_specs(file)
                specs = {k: TensorSpec(_out_dtype(s, save_dtype), s.shape) for k, s in specs.items()}
                with safe_open(str(file), framework="pt") as handle:

                    def produce(key: str, handle=handle, specs=specs, component=component) -> torch.Tensor:
                        tensor, patches = handle.get_tensor(key), plan.get((component, key))
                        return (apply_patches(tensor, patches, precision) if patches else tensor).to(specs[key].dtype)

                    target = tmp / component / file.name
                    target.unlink()
                    stream_safetensors(target, specs, produce, meta, progress=progress, desc=component)


def merge_lora_into(
    model: str | Path,
    loras: Sequence[tuple[str | Path, float]],
    out: str | Path,
    *,
    precision: str = "fp32",
    save_precision: str | None = None,
    config_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LoraIntoResult:
    """Merge kohya LoRAs and LyCORIS files ``[(file, ratio), ...]`` into ``model`` and write ``out``.

    ``model``: an original-layout ``.safetensors``/``.ckpt`` or a diffusers folder. ``out``:
    ``.safetensors``/``.ckpt`` (original layout), or a folder name for a diffusers model.
    ``precision`` is the arithmetic dtype; ``save_precision`` casts every float tensor (default:
    each keeps its dtype). ``config_dir`` gives the diffusers configs of a single file that has
    none embedded and is not a standard SD1.5/SD2.1 layout.
    """
    from safetensors.torch import load_file

    if precision not in _DTYPES or (save_precision is not None and save_precision not in _DTYPES):
        raise ValueError(f"precision and save_precision must be one of {', '.join(_DTYPES)}")
    out = Path(out)
    single = out.suffix.lower() in (".safetensors", ".ckpt")
    paths = [Path(p) for p, _ in loras]
    check_output(out, [model, *paths], overwrite)
    for p in paths:
        if p.suffix.lower() != ".safetensors" or not p.is_file():
            raise FileNotFoundError(f"{p}: not a kohya LoRA / LyCORIS .safetensors file")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_source(model))
        if not single and not isinstance(source, DiffusersSource):
            raise ValueError(f"{out}: a single-file model gives a single file; end the output in .safetensors")
        lora_sds = [(str(p), load_file(str(p)), float(r)) for p, (_, r) in zip(paths, loras)]
        if model_family(source.specs) == "sdxl":
            plan = _sdxl_plan(source, lora_sds, single, config_dir)
        else:
            _refuse_sdxl_loras(lora_sds, model)
            unet_config, te_config, v2 = model_configs(source, config_dir)
            hidden = int(te_config["hidden_size"])
            if single:
                resolve = lambda kind, path, w: ldm_target(kind, path, unet_config, hidden, v2, w)  # noqa: E731
                specs = lambda t: source.specs.get(t.key)  # noqa: E731
            else:
                resolve, specs = _folder_resolver(source)
            plan = plan_patches(lora_sds, unet_config, te_config, resolve, specs)
        dtype, save_dtype = _DTYPES[precision], _DTYPES.get(save_precision or "")
        if single:
            meta = dict(source.metadata, format="pt")
            meta["modelspec.title"] = out.stem
            meta["modelspec.merged_from"] = ", ".join(Path(p).stem for p in [model, *paths])
            _write_single_file(source, plan, out, dtype, save_dtype, meta, progress)
        else:
            _write_folder(source, plan, out, dtype, save_dtype, progress)
    modules = sum(len(v) for v in plan.values())
    return LoraIntoResult(out, len(plan), modules, [(str(p), float(r)) for p, r in loras])


def _sdxl_plan(source: TensorSource, lora_sds, single: bool, config_dir) -> dict:
    """The patches of SDXL LoRA/LyCORIS files on an SDXL model: SGM file keys (single file) or the
    diffusers components' own keys (folder)."""
    from nbkit.merge.sdxl import meta_sdxl_models, sdxl_configs, sgm_weight_keys

    configs = sdxl_configs(source, config_dir)
    if single:
        keys = sgm_weight_keys(meta_sdxl_models(configs), configs)

        def resolve(kind: str, path: str, weight: torch.Tensor) -> Target:
            key, rows = keys[(kind, f"{path}.weight")]
            return Target(key, None, rows)

        specs = lambda t: source.specs.get(t.key)  # noqa: E731
    else:
        resolve, specs = _folder_resolver(source, ("unet", "text_encoder", "text_encoder_2"))
    return plan_sdxl_patches(lora_sds, configs, resolve, specs)


def _refuse_sdxl_loras(lora_sds, model) -> None:
    for name, sd, _ in lora_sds:
        sdxl = next((k for k in sd if k.startswith(("lora_te1_", "lora_te2_"))), None)
        if sdxl:
            raise ValueError(f"{name}: an SDXL LoRA ({sdxl}), but {model} is an SD1.x/SD2.x model: merge it into "
                             "an SDXL checkpoint")


def _folder_resolver(source: DiffusersSource, components: Sequence[str] = ("unet", "text_encoder")):
    """Target resolution and specs in a diffusers folder's own key names."""
    files = {c: WeightFiles(source.path / c) for c in components}

    def resolve(kind: str, path: str, weight: torch.Tensor) -> Target:
        key = f"{path}.weight"
        if kind != "unet" and key not in files[kind].specs:
            key = f"text_model.{key}"
        return Target(key, kind)

    return resolve, lambda t: files[t.component].specs.get(t.key)
