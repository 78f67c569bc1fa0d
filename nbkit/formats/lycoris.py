"""LyCORIS files (kohya ``network_module = "lycoris.kohya"``): LoHa, LoKr, LoCon, DoRA — pure tensor-dict functions.

Reference: KohakuBlueleaf's ``lycoris-lora`` 4.1.3 (the code A1111's built-in Lora extension, ComfyUI
and kohya users rely on). Per adapted module ``<stem>`` a file holds (``lycoris/modules/*.py``,
``weight_list`` and ``custom_state_dict``):

=========  =======================================================================================
LoHa       ``hada_w1_a`` ``hada_w1_b`` ``hada_w2_a`` ``hada_w2_b`` (+ ``hada_t1`` ``hada_t2``: conv tucker)
LoKr       ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b`` (+ ``lokr_t2``)
LoCon      ``lora_down.weight`` ``lora_up.weight`` (+ ``lora_mid.weight``: conv tucker)
all        ``alpha`` (0-dim), optional ``dora_scale`` (``dora_wd=True``: DoRA-style weight decomposition)
=========  =======================================================================================

Stems are kohya's: ``lora_unet_<module path with _>``, ``lora_te_…`` (SD1/SD2), ``lora_te1_…``/``lora_te2_…``
(SDXL); text-encoder stems carry the ``text_model_`` segment A1111 and ComfyUI map (transformers >= 5.6
dropped it from ``CLIPTextModel`` module paths; see :mod:`nbkit.formats.text_encoder_keys`).

The weight delta of one module (:meth:`LycorisModule.delta`) is the one LyCORIS trains with
(``forward`` of ``LohaModule``/``LokrModule``/``LoConModule``: ``get_weight``/``make_weight`` times
``scalar``, which a saved file has folded in):

- LoHa (``lycoris/functional/loha.py::_diff_weight``): ``ΔW = scale·(w1a@w1b ⊙ w2a@w2b)``; tucker:
  each half is ``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)``;
- LoKr (``lycoris/functional/lokr.py::_kron_weight``/``make_kron``): ``ΔW = scale·kron(w1, w2)`` with
  ``w1 = w1a@w1b`` and ``w2 = w2a@w2b`` (tucker: ``rebuild_tucker(t2, w2a, w2b)``) when factored;
- LoCon (``lycoris/functional/locon.py::_diff_weight``): ``ΔW = scale·up@down`` (tucker through ``mid``);
- ``scale = alpha / rank`` (``rank``: LoHa ``hada_w1_b.shape[0]``, LoCon ``lora_down.shape[0]``, LoKr the
  inner dimension of its factored half); a LoKr with both halves full has scale 1 whatever its alpha
  (``LokrModule.__init__``: ``if self.use_w2 and self.use_w1: alpha = lora_dim``); no alpha: scale 1;
- the adapted weight is ``W + multiplier·ΔW``; with ``dora_scale`` it is
  ``lycoris/functional/general.py::_weight_decompose(W + ΔW, dora_scale, multiplier, wd_on_out)``:
  ``(W + ΔW)·(m·(dora_scale/‖W + ΔW‖ − 1) + 1)``, the norm per output row (per input column when
  ``dora_scale`` has shape ``[1, in, …]``) plus ``finfo.eps``. At multiplier 1 this is what every reader
  computes; ComfyUI and A1111 scale other strengths as ``W + m·(W_dora − W)`` instead.

Note: LyCORIS 4.1.3's ``LohaModule``/``LokrModule.get_diff_weight`` (used by its own ``merge_to``)
multiply by ``scale`` a second time; the forward pass, ComfyUI (``comfy/weight_adapter/loha.py``,
``lokr.py``) and A1111 (``network_hada.py``, ``network_lokr.py``) apply it once, as here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nbkit.formats import kohya_sdxl
from nbkit.formats.text_encoder_keys import canonical_text_encoder_key

#: kohya stem prefix -> the model part (``lycoris/kohya.py``: LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER[1|2])
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}  # fmt: skip
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOCON_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
COMMON_PARTS = ("alpha", "dora_scale")
ALGO_PARTS = {"loha": LOHA_PARTS, "lokr": LOKR_PARTS, "locon": LOCON_PARTS}
#: parts only LyCORIS writes (a file with none of them is a plain kohya LoRA)
LYCORIS_ONLY = frozenset(LOHA_PARTS + LOKR_PARTS + ("lora_mid.weight", "dora_scale"))
Tensors = dict[str, torch.Tensor]


def is_lycoris_state_dict(keys: Iterable[str]) -> bool:
    """Whether a file's keys are LyCORIS-only (LoHa, LoKr, tucker LoCon or DoRA), not a plain kohya LoRA."""
    return any(key.partition(".")[2] in LYCORIS_ONLY for key in keys)


def lycoris_stem(part: str, path: str, *, sdxl: bool = False, unet_config: Mapping[str, Any] | None = None) -> str:
    """kohya/LyCORIS stem of module ``path`` of a model part (``unet``, ``text_encoder``, ``text_encoder_2``).

    As ``lycoris/kohya.py::create_modules``: ``prefix + "_" + path`` with ``.`` -> ``_``; text-encoder
    paths get the ``text_model.`` segment back (``canonical_text_encoder_key``). ``sdxl``: two text
    encoders, ``lora_te1_``/``lora_te2_``. The U-Net path is used as given (diffusers names, which is
    what kohya writes for SD1/SD2); for SDXL (``unet_config`` given) it becomes the SGM path of kohya's
    ``sdxl_original_unet.py`` (:func:`nbkit.formats.kohya_sdxl.unet_stem`), the module names LyCORIS's
    kohya network sees there.
    """
    if part == "unet" and unet_config is not None:
        return kohya_sdxl.unet_stem(path, unet_config)
    if part == "unet":
        return "lora_unet_" + path.replace(".", "_")
    if part not in ("text_encoder", "text_encoder_2"):
        raise ValueError(f"unknown model part {part!r}: unet, text_encoder or text_encoder_2")
    prefix = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[part]
    return prefix + canonical_text_encoder_key(path).replace(".", "_")


def stem_part(stem: str) -> str | None:
    """The model part a stem belongs to (``None`` for an unknown prefix)."""
    return next((part for prefix, part in PREFIXES.items() if stem.startswith(prefix)), None)


@dataclass
class LycorisModule:
    """One adapted module of a LyCORIS file: its algorithm, tensors (file names), alpha and DoRA scale."""

    algo: str  # "loha" | "lokr" | "locon"
    tensors: Tensors  # part name (as in the file, e.g. "hada_w1_a") -> tensor, alpha/dora_scale excluded
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """``lora_dim`` as LyCORIS rebuilds the module from a file (``make_module_from_state_dict``)."""
        t = self.tensors
        if self.algo == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algo == "locon":
            return int(t["lora_down.weight"].shape[0])
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
        return 1  # both halves full: no rank

    @property
    def scale(self) -> float:
        if self.algo == "lokr" and "lokr_w1" in self.tensors and "lokr_w2" in self.tensors:
            return 1.0  # LokrModule: full w1 and w2 -> alpha = lora_dim
        if self.alpha is None or self.alpha == 0:
            return 1.0  # LyCORIS: alpha 0/None means alpha = rank
        return self.alpha / self.rank

    @property
    def tucker(self) -> bool:
        return any(k in self.tensors for k in ("hada_t1", "lokr_t2", "lora_mid.weight"))

    def flat_shape(self) -> tuple[int, int]:
        """``(out, in·k·k)`` of the adapted weight, from the tensor shapes."""
        t = self.tensors
        if self.algo == "loha":
            if self.tucker:  # w_a [R, out], w_b [R, in], t [R, R, *k]
                k = math.prod(t["hada_t1"].shape[2:])
                return int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]) * k
            return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1])
        if self.algo == "locon":
            down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
            k = math.prod(mid.shape[2:]) if mid is not None else math.prod(down.shape[2:])
            return int(up.shape[0]), int(down.shape[1]) * k
        a, c = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
            b, d = int(w2.shape[0]), math.prod(w2.shape[1:])
        elif "lokr_t2" in t:  # w2a [R, b], w2b [R, d], t2 [R, R, *k]
            b, d = int(t["lokr_w2_a"].shape[1]), int(t["lokr_w2_b"].shape[1]) * math.prod(t["lokr_t2"].shape[2:])
        else:  # w2a [b, R], w2b [R, d·k·k]
            b, d = int(t["lokr_w2_a"].shape[0]), math.prod(t["lokr_w2_b"].shape[1:])
        return int(a) * b, int(c) * d

    def kernel(self) -> tuple[int, ...] | None:
        """The conv kernel when the tensors show it (tucker, 4-D factors); ``None`` when flattened away."""
        t = self.tensors
        for name in ("hada_t1", "lokr_t2", "lora_mid.weight", "lora_down.weight", "lokr_w2"):
            if name in t and t[name].dim() > 2:
                return tuple(int(s) for s in t[name].shape[2:])
        if self.algo == "locon" or (self.algo == "lokr" and "lokr_w2" in t):
            return ()  # a 2-D LoRA / full w2: a linear layer
        return None

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether the delta can take the shape of a weight (``[out, in]``, ``[out, in, *k]``; 1x1 conv ~ linear)."""
        shape = tuple(int(s) for s in shape)
        out, flat = self.flat_shape()
        if len(shape) < 2 or shape[0] != out or math.prod(shape[1:]) != flat:
            return False
        kernel = self.kernel()
        return kernel is None or math.prod(kernel) == math.prod(shape[2:])

    def delta(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW`` (scale included, multiplier not) in ``shape``, the adapted weight's shape, computed in ``dtype``."""
        shape = tuple(int(s) for s in shape)
        if not self.fits(shape):
            raise ValueError(f"LyCORIS {self.algo} delta {self.flat_shape()} does not fit a weight of shape {shape}")
        t = {k: v.to(dtype) for k, v in self.tensors.items()}
        w = {"loha": _loha, "lokr": _lokr, "locon": _locon}[self.algo](t)
        return w.reshape(shape) * self.scale

    def apply(self, weight: torch.Tensor, multiplier: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The adapted weight, as LyCORIS's forward builds it (pure; ``weight`` is not modified)."""
        dtype = dtype or weight.dtype
        base = weight.to(dtype)
        diff = self.delta(base.shape, dtype)
        if self.dora_scale is None:
            return base + diff * multiplier
        return weight_decompose(base + diff, self.dora_scale.to(dtype), multiplier)


def _loha(t: Tensors) -> torch.Tensor:
    """``lycoris/functional/loha.py::_diff_weight`` at gamma 1: ``[out, in·k·k]`` or ``[out, in, *k]`` (tucker)."""
    if "hada_t1" in t:
        one = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        two = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return one * two
    w1b, w2b = t["hada_w1_b"].flatten(1), t["hada_w2_b"].flatten(1)
    return (t["hada_w1_a"].flatten(1) @ w1b) * (t["hada_w2_a"].flatten(1) @ w2b)


def _rebuild_tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``lycoris/functional/general.py::rebuild_tucker``."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, wa, wb)


def _lokr(t: Tensors) -> torch.Tensor:
    """``lycoris/functional/lokr.py::_kron_weight`` + ``make_kron`` at scale 1."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _rebuild_tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2b = t["lokr_w2_b"]
        r, o, *k = w2b.shape
        w2 = (t["lokr_w2_a"] @ w2b.reshape(r, -1)).reshape(-1, o, *k)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def _locon(t: Tensors) -> torch.Tensor:
    """``lycoris/functional/locon.py::_diff_weight`` at gamma 1."""
    down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
    if mid is None:
        return up.reshape(-1, up.shape[1]) @ down.reshape(down.shape[0], -1)
    return _rebuild_tucker(mid, up.reshape(up.shape[0], -1).transpose(0, 1), down.reshape(down.shape[0], -1))


def weight_decompose(weight: torch.Tensor, dora_scale: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """``lycoris/functional/general.py::_weight_decompose``: ``W·(m·(dora_scale/‖W‖ − 1) + 1)``.

    ``weight`` is the already adapted ``W + ΔW``. The norm is per output row when ``dora_scale`` is
    ``[out, 1, …]`` (``wd_on_output=True``, LyCORIS's default), per input column when ``[1, in, …]``.
    """
    dims = weight.dim() - 1
    if dora_scale.shape[0] == weight.shape[0] and math.prod(dora_scale.shape[1:]) == 1:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * dims)
        scale = dora_scale.reshape(weight.shape[0], *[1] * dims)
    elif dora_scale.dim() >= 2 and dora_scale.shape[1] == weight.shape[1] and math.prod(dora_scale.shape) == weight.shape[1]:
        norm = (weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight.shape[1], *[1] * dims).transpose(0, 1))  # fmt: skip
        scale = dora_scale.reshape(1, weight.shape[1], *[1] * (dims - 1))
    else:
        raise ValueError(f"dora_scale {tuple(dora_scale.shape)} fits neither the rows nor the columns of {tuple(weight.shape)}")
    factor = scale / (norm + torch.finfo(weight.dtype).eps)
    if multiplier != 1:
        factor = multiplier * (factor - 1) + 1
    return weight * factor


def _algo(stem: str, parts: Mapping[str, torch.Tensor]) -> tuple[str | None, list[str]]:
    """The algorithm of one stem's parts and the problems found."""
    names = set(parts) - set(COMMON_PARTS)
    algos = [a for a, allowed in ALGO_PARTS.items() if names & set(allowed)]
    if len(algos) != 1:
        found = ", ".join(sorted(names)) or "only alpha/dora_scale"
        return None, [f"{stem}: {'mixes the tensors of ' + ' and '.join(algos) if algos else 'no weights'} ({found})"]
    algo = algos[0]
    problems = [f"{stem}.{n}: not a {algo} tensor" for n in sorted(names - set(ALGO_PARTS[algo]))]
    has = names.__contains__
    if algo == "loha":
        need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if has("hada_t1") != has("hada_t2"):
            problems.append(f"{stem}: hada_t1 and hada_t2 come together (conv tucker)")
    elif algo == "locon":
        need = ["lora_down.weight", "lora_up.weight"]
    else:
        need = []
        for half in ("w1", "w2"):
            full, pair = has(f"lokr_{half}"), has(f"lokr_{half}_a") and has(f"lokr_{half}_b")
            if full == pair:
                problems.append(f"{stem}: needs lokr_{half} or both lokr_{half}_a and lokr_{half}_b (one form)")
        if has("lokr_t2") and not has("lokr_w2_a"):
            problems.append(f"{stem}: lokr_t2 needs lokr_w2_a/lokr_w2_b")
    problems += [f"{stem}: missing {n}" for n in need if not has(n)]
    return algo, problems


def _pairs(m: LycorisModule) -> list[tuple[str, int, str, int]]:
    """``(tensor, dim, tensor, dim)`` sizes that must agree for the module's tensors to fit together."""
    t = m.tensors
    if m.algo == "loha" and "hada_t1" in t:  # t [R, R, *k], w_a [R, out], w_b [R, in]
        return [("hada_t1", 0, "hada_w1_a", 0), ("hada_t1", 1, "hada_w1_b", 0), ("hada_t2", 0, "hada_w2_a", 0),
                ("hada_t2", 1, "hada_w2_b", 0), ("hada_w1_a", 1, "hada_w2_a", 1), ("hada_w1_b", 1, "hada_w2_b", 1)]
    if m.algo == "loha":  # w_a [out, R], w_b [R, in·k·k]
        return [("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0), ("hada_w1_a", 0, "hada_w2_a", 0),
                ("hada_w1_b", 1, "hada_w2_b", 1)]
    if m.algo == "locon":
        if "lora_mid.weight" in t:
            return [("lora_up.weight", 1, "lora_mid.weight", 0), ("lora_mid.weight", 1, "lora_down.weight", 0)]
        return [("lora_up.weight", 1, "lora_down.weight", 0)]
    pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)] if "lokr_w1_a" in t else []
    if "lokr_t2" in t:  # t2 [R, R, *k], w2a [R, b], w2b [R, d]
        pairs += [("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)]
    elif "lokr_w2_a" in t:  # w2a [b, R], w2b [R, d·k·k]
        pairs.append(("lokr_w2_a", 1, "lokr_w2_b", 0))
    return pairs


def _shape_problems(stem: str, m: LycorisModule) -> list[str]:
    t = m.tensors
    low = [n for n, v in t.items() if v.dim() < 2]
    if low:
        return [f"{stem}: {', '.join(low)} must have at least 2 dimensions"]

    def size(name: str, dim: int) -> int:
        if dim == 1 and not name.startswith(("hada_t", "lokr_t", "lora_mid")):
            return int(t[name].flatten(1).shape[1])  # a factor's dim 1 counts its kernel too
        return int(t[name].shape[dim])

    bad = [f"{a} {tuple(t[a].shape)} vs {b} {tuple(t[b].shape)}" for a, i, b, j in _pairs(m) if size(a, i) != size(b, j)]
    return [f"{stem}: {m.algo} tensors do not fit together: {'; '.join(bad)}"] if bad else []


def group_lycoris(state_dict: Mapping[str, torch.Tensor], source: str = "LyCORIS file") -> dict[str, LycorisModule]:
    """A LyCORIS state dict -> ``{stem: LycorisModule}``; ``ValueError`` listing every problem.

    Plain kohya LoRA modules (``lora_down``/``lora_up``/``alpha``) are LoCon modules here.
    """
    problems: list[str] = []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        stem, _, part = key.partition(".")
        if stem_part(stem) is None:
            problems.append(f"{key}: the name must start with {', '.join(PREFIXES)}")
        elif part not in COMMON_PARTS and not any(part in p for p in ALGO_PARTS.values()):
            problems.append(f"{key}: {part!r} is not a LyCORIS tensor (LoHa hada_*, LoKr lokr_*, LoCon lora_*, alpha, "
                            "dora_scale)")
        else:
            groups.setdefault(stem, {})[part] = tensor
    modules: dict[str, LycorisModule] = {}
    for stem, parts in groups.items():
        algo, found = _algo(stem, parts)
        problems += found
        if algo is None or found:
            continue
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            problems.append(f"{stem}.alpha: must be one number, has shape {tuple(alpha.shape)}")
            continue
        tensors = {k: v for k, v in parts.items() if k not in COMMON_PARTS}
        module = LycorisModule(algo, tensors, None if alpha is None else float(alpha.float().item()), parts.get("dora_scale"))
        shape_problems = _shape_problems(stem, module)
        if module.dora_scale is not None and not shape_problems:
            out = module.flat_shape()[0]
            if module.dora_scale.shape[0] != out and (module.dora_scale.dim() < 2 or module.dora_scale.shape[0] != 1):
                shape_problems.append(f"{stem}.dora_scale: shape {tuple(module.dora_scale.shape)} fits no weight "
                                      f"with {out} outputs")
        problems += shape_problems
        modules[stem] = module
    if not groups and not problems:
        problems.append("no LyCORIS modules at all")
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{source}: not a valid LyCORIS state dict: " + "; ".join(problems[:8]) + more)
    return modules


def check_lycoris_state_dict(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` listing every way ``state_dict`` breaks the LyCORIS file rules (names, parts,
    one algorithm per module, shapes that fit together, 0-dim alpha)."""
    group_lycoris(state_dict, "LyCORIS state dict")
    bad = [k for k, v in state_dict.items() if k.endswith(".alpha") and v.dim() != 0]
    if bad:
        raise ValueError(f"LyCORIS state dict: alpha must be 0-dim (as LyCORIS writes it): {bad[:5]}")


def module_index(part: str, names: Iterable[str], unet_config: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """``{stem rest: module path}`` for resolving stems; ``None`` where two paths share an underscore form.

    Text-encoder names and stems are compared without the ``text_model`` segment (files have it,
    transformers >= 5.6 module paths do not). With ``unet_config`` (SDXL) U-Net paths are compared in
    their SGM form (kohya's SDXL names); paths without one are left out.
    """
    index: dict[str, str | None] = {}
    for name in names:
        if not name:
            continue
        if part == "unet" and unet_config is not None:
            try:
                key = kohya_sdxl.sgm_unet_path(name, unet_config).replace(".", "_")
            except ValueError:
                continue
            index[key] = name if index.get(key, name) == name else None
            continue
        key = (name if part == "unet" else name.removeprefix("text_model.")).replace(".", "_")
        index[key] = name if index.get(key, name) == name else None
    return index


def resolve_stems(
    stems: Iterable[str], names: Mapping[str, Iterable[str] | None], source: str = "LyCORIS file",
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, tuple[str, str]]:
    """``{stem: (part, module path)}`` against each part's module names; ``ValueError`` for stems that
    match no module (a file for another base model) or a part that was not given. ``unet_config``:
    an SDXL U-Net, whose stems are SGM names (kohya's)."""
    indexes = {part: None if ns is None else module_index(part, ns, unet_config) for part, ns in names.items()}
    out: dict[str, tuple[str, str]] = {}
    missing_part: dict[str, list[str]] = {}
    unresolved: list[str] = []
    for stem in stems:
        part = stem_part(stem)
        index = indexes.get(part) if part else None
        if index is None:
            missing_part.setdefault(part or "?", []).append(stem)
            continue
        prefix = next(p for p in PREFIXES if stem.startswith(p))
        rest = stem.removeprefix(prefix)
        if part != "unet":
            rest = rest.removeprefix("text_model_")
        path = index.get(rest)
        if path is None:
            unresolved.append(stem)
        else:
            out[stem] = (part, path)
    for part, listed in missing_part.items():
        raise ValueError(f"{source}: {len(listed)} modules are for the {part}, which was not given, e.g. {listed[:3]}")
    if unresolved:
        raise ValueError(f"{source}: {len(unresolved)} LyCORIS modules match no module of the model, e.g. "
                         f"{unresolved[:5]}. Is the file made for another base model (SD1 vs SD2 vs SDXL)?")
    return out
