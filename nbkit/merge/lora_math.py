"""LoRA arithmetic on kohya state dicts: weight deltas, SVD merge, exact concat, SVD resize.

Pure functions (no files). A module's weight delta is ``ΔW = (alpha / r) · up @ down`` with
``r = down.shape[0]`` (interop spec §1.4); a 3×3 conv's is ``(up.flatten(1) @ down.flatten(1))``
reshaped to ``[out, in, k, k]`` — the same numbers as kohya's ``conv2d(down.permute(1, 0, 2, 3),
up).permute(1, 0, 2, 3)`` (ComfyUI computes it this way).

- :func:`svd_merge` follows kohya ``networks/svd_merge_lora.py``: ``ΔW = Σ ratio_i·ΔW_i``, SVD,
  keep ``new_rank`` (``new_conv_rank`` for 3×3 convs), ``up = U·diag(S)``, ``down = Vh``, both
  clamped to ± the 0.99 quantile of their values, ``alpha = rank`` (scale 1). Only the truncation
  and the clamp lose anything; ``clamp_quantile=None`` skips the clamp (exact at full rank).
- :func:`concat_merge` stacks the LoRAs along the rank and folds ``ratio_i·alpha_i/r_i`` into each
  ``lora_up``, with ``alpha = total rank``: the result is exactly ``Σ ratio_i·ΔW_i``. kohya's
  ``merge_lora.py --concat`` instead scales up and down by ``√(alpha_i/base_alpha)·ratio`` and keeps
  the first file's alpha over the summed rank, so its ratios act squared and each LoRA is weakened
  by ``r_i/Σr``.
- :func:`resize_lora` follows kohya ``networks/resize_lora.py``: SVD of ``up @ down``; fixed rank
  gives ``new_alpha = (old_alpha / old_rank) · new_rank``; ``sv_ratio``/``sv_fro``/``sv_cumulative``
  pick a rank per module (capped at ``new_rank``). One difference: 1×1 convs (SD1 ``proj_in``)
  use ``new_rank`` like linear layers (as svd_merge_lora and training do), not ``new_conv_rank``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from nbkit.formats.lycoris import LYCORIS_ONLY

MIN_SV = 1e-6  # resize_lora.py
CLAMP_QUANTILE = 0.99  # svd_merge_lora.py
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class LoraModule:
    """One adapted module: ``down`` [r, in(, k, k)], ``up`` [out, r(, 1, 1)], ``alpha``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv3x3(self) -> bool:
        return self.down.dim() == 4 and tuple(self.down.shape[2:]) != (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted weight: ``[out, in]`` or ``[out, in, k, k]``."""
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(alpha / r) · up @ down`` in the shape of the adapted weight."""
        return product(self.down.to(dtype), self.up.to(dtype)) * self.scale


def product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` for linear, 1×1 and k×k conv LoRAs, shaped like the adapted weight."""
    if down.dim() == 2 and up.dim() == 2:
        return up @ down
    if down.dim() != 4 or up.dim() != 4:
        raise ValueError(f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} are neither linear nor conv")
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def fit_shape(tensor: torch.Tensor, shape: Sequence[int], what: str) -> torch.Tensor:
    """Reshape between ``[o, i]`` and ``[o, i, 1, 1]`` (linear vs 1×1 conv); anything else is an error."""
    shape = tuple(shape)
    if tuple(tensor.shape) == shape:
        return tensor
    squeeze = tuple(tensor.shape[:2]) if tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1) else None
    if tensor.dim() == 2 and len(shape) == 4 and shape[2:] == (1, 1) and tuple(tensor.shape) == shape[:2]:
        return tensor.reshape(shape)
    if squeeze is not None and len(shape) == 2 and squeeze == shape:
        return tensor.reshape(shape)
    raise ValueError(f"{what}: shape {tuple(tensor.shape)} does not fit {shape} (a LoRA for another model?)")


def group_lora(state_dict: Mapping[str, torch.Tensor], source: str = "LoRA") -> dict[str, LoraModule]:
    """kohya state dict -> ``{stem: LoraModule}`` (a missing alpha means alpha = rank, as kohya)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        stem, _, part = key.partition(".")
        if part in _PARTS:
            parts.setdefault(stem, {})[part] = tensor
        else:
            unknown.append(key)
    if unknown:
        lycoris = any(k.partition(".")[2] in LYCORIS_ONLY for k in unknown)
        raise ValueError(
            f"{source}: {len(unknown)} keys are not kohya LoRA keys (<name>.lora_down.weight/.lora_up.weight/.alpha), "
            f"e.g. {unknown[:3]}; "
            + ("a LyCORIS file (LoHa/LoKr/DoRA): merge it into a checkpoint with `nbkit merge lora-into`"
               if lycoris else "diffusers/peft files are not supported here")
        )
    out = {}
    for stem, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise ValueError(f"{source}: module {stem} lacks lora_down or lora_up")
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        if down.dim() != up.dim() or up.shape[1] != down.shape[0]:
            raise ValueError(f"{source}: {stem} down {tuple(down.shape)} / up {tuple(up.shape)} are not a LoRA pair")
        alpha = float(p["alpha"].item()) if "alpha" in p else float(down.shape[0])
        out[stem] = LoraModule(down, up, alpha)
    if not out:
        raise ValueError(f"{source}: no LoRA modules in the file")
    return out


def lora_state_dict(modules: Mapping[str, LoraModule]) -> dict[str, torch.Tensor]:
    """``{stem: LoraModule}`` -> kohya state dict (contiguous tensors, 0-dim float32 alphas)."""
    out = {}
    for stem, m in modules.items():
        out[f"{stem}.lora_down.weight"] = m.down.contiguous()
        out[f"{stem}.lora_up.weight"] = m.up.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


@dataclass
class Stacked:
    """``Σ ratio_i·ΔW_i`` of one module as factors: ``ΔW = up @ down`` (flattened), exact.

    ``up`` [out, R] holds each LoRA's ``lora_up`` times ``ratio_i·alpha_i/r_i``; ``down`` [R, in·k·k]
    the ``lora_down`` rows; ``R = Σ r_i``. ``shape`` is the adapted weight's shape.
    """

    up: torch.Tensor
    down: torch.Tensor
    shape: tuple[int, ...]

    def delta(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape)

    def module(self, up: torch.Tensor, down: torch.Tensor, alpha: float) -> LoraModule:
        """A LoRA module in this weight's form (2-D, or 4-D with a 1×1 ``up``)."""
        if len(self.shape) == 4:
            up, down = up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *self.shape[1:])
        return LoraModule(down.contiguous(), up.contiguous(), alpha)


def stack_loras(
    loras: Sequence[tuple[Mapping[str, LoraModule], float]],
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Stacked]:
    """Per module, the weighted LoRAs stacked along the rank (shape of the first LoRA that has it)."""
    names = names or [f"LoRA {i + 1}" for i in range(len(loras))]
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for (modules, ratio), name in zip(loras, names):
        for stem, m in modules.items():
            shape = shapes.setdefault(stem, m.weight_shape)
            fit_shape(torch.empty(m.weight_shape, device="meta"), shape, f"{name}: {stem}")
            up = m.up.to(dtype).flatten(1) * (ratio * m.scale)
            parts.setdefault(stem, []).append((up, m.down.to(dtype).flatten(1)))
    return {
        stem: Stacked(torch.cat([u for u, _ in p], dim=1), torch.cat([d for _, d in p], dim=0), shapes[stem])
        for stem, p in parts.items()
    }


def summed_deltas(
    loras: Sequence[tuple[Mapping[str, LoraModule], float]],
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """``{stem: Σ ratio_i · ΔW_i}``, shaped like the first LoRA that has the module."""
    return {stem: st.delta() for stem, st in stack_loras(loras, names, dtype).items()}


def lowrank_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, S, Vh)`` of ``up @ down`` without forming it: QR of both factors, SVD of the
    small core. Exact; ``len(S) <= R`` (the inner dimension), descending. Computed in float64."""
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return (q1 @ u).to(up.dtype), s.to(up.dtype), (vh @ q2.T).to(up.dtype)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small LAPACK calls single-threaded: for per-module QR/SVD of [out, R] factors a
    second thread only adds synchronisation (25x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    if values.numel() <= 2**24:  # torch.quantile's size limit
        return torch.quantile(values, q)
    import numpy as np

    return torch.tensor(float(np.quantile(values.numpy(), q)), dtype=values.dtype)


def svd_factor(stacked: Stacked, rank: int, clamp_quantile: float | None = CLAMP_QUANTILE) -> LoraModule:
    """Re-factor a module at most ``rank`` with ``alpha = rank`` (kohya svd_merge_lora).

    ``up = U·diag(S)``, ``down = Vh``, both clamped to ± the ``clamp_quantile`` of their values.
    The rank is capped at the true rank bound of ``ΔW`` (Σ r_i); kohya would pad with zero
    singular values, which changes nothing but the file size (and its clamp statistics).
    """
    u, s, vh = lowrank_svd(stacked.up, stacked.down)
    rank = max(1, min(rank, len(s)))
    up, down = u[:, :rank] * s[:rank], vh[:rank, :]
    if clamp_quantile is not None:
        hi = _quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return stacked.module(up, down, float(rank))


def svd_merge(
    loras: Sequence[tuple[Mapping[str, LoraModule], float]],
    new_rank: int,
    new_conv_rank: int | None = None,
    *,
    clamp_quantile: float | None = CLAMP_QUANTILE,
    names: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, LoraModule]:
    """kohya ``svd_merge_lora``: ``Σ ratio_i·ΔW_i`` re-factored per module at ``new_rank``."""
    from tqdm.auto import tqdm

    if new_rank < 1:
        raise ValueError(f"new_rank must be >= 1, got {new_rank}")
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    out = {}
    stacked = stack_loras(loras, names, dtype)
    with one_thread():
        for stem, st in tqdm(stacked.items(), desc="SVD", unit="module", disable=not progress, leave=False):
            is_conv3x3 = len(st.shape) == 4 and st.shape[2:] != (1, 1)
            out[stem] = svd_factor(st, conv_rank if is_conv3x3 else new_rank, clamp_quantile)
    return out


def concat_merge(
    loras: Sequence[tuple[Mapping[str, LoraModule], float]], names: Sequence[str] | None = None
) -> dict[str, LoraModule]:
    """Exact merge: stack along the rank, ``ratio·alpha/r`` folded into ``up``, ``alpha = Σr``."""
    return {stem: st.module(st.up, st.down, float(st.down.shape[0])) for stem, st in stack_loras(loras, names).items()}


# ----------------------------------------------------------------------------- resize


def _index_sv_cumulative(s: torch.Tensor, target: float) -> int:
    cumulative = torch.cumsum(s, dim=0) / float(torch.sum(s))
    return max(1, min(int(torch.searchsorted(cumulative, target)) + 1, len(s) - 1))


def _index_sv_fro(s: torch.Tensor, target: float) -> int:
    squared = s.pow(2)
    cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
    return max(1, min(int(torch.searchsorted(cumulative, target**2)) + 1, len(s) - 1))


def _index_sv_ratio(s: torch.Tensor, target: float) -> int:
    return max(1, min(int(torch.sum(s > s[0] / target).item()), len(s) - 1))


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """kohya ``rank_resize``: the new rank for singular values ``s`` (descending)."""
    if method is None:
        rank = max_rank
    else:
        if method not in DYNAMIC_METHODS or param is None:
            raise ValueError(f"dynamic_method must be one of {DYNAMIC_METHODS} with a dynamic_param, got {method!r}")
        index = {"sv_ratio": _index_sv_ratio, "sv_fro": _index_sv_fro, "sv_cumulative": _index_sv_cumulative}
        rank = index[method](s, param) + 1
    if float(s[0]) <= MIN_SV:  # a zero matrix
        rank = 1
    return max(1, min(rank, max_rank, len(s)))


@dataclass
class ModuleResize:
    """One module's resize: ranks, alphas and what the kept singular values retain."""

    stem: str
    old_rank: int
    new_rank: int
    new_alpha: float
    fro_retained: float  # ‖ΔW_new‖_F / ‖ΔW_old‖_F (NaN for an all-zero module)
    sum_retained: float  # Σ kept singular values / Σ all
    max_ratio: float  # S[0] / S[new_rank - 1]
    fro_old: float  # ‖ΔW_old‖_F, scale included
    fro_new: float  # ‖ΔW_new‖_F


@dataclass
class ResizeReport:
    """Per-module and overall Frobenius norm retained by a resize."""

    modules: list[ModuleResize] = field(default_factory=list)
    dynamic_method: str | None = None

    @property
    def overall_fro_retained(self) -> float:
        """‖all new deltas‖_F / ‖all old deltas‖_F, over the whole network."""
        old = math.sqrt(sum(m.fro_old**2 for m in self.modules))
        return math.sqrt(sum(m.fro_new**2 for m in self.modules)) / old if old else float("nan")

    @property
    def mean_fro_retained(self) -> float:
        """kohya's "Average Frobenius norm retention" (modules with NaN skipped)."""
        values = [m.fro_retained for m in self.modules if not math.isnan(m.fro_retained)]
        return sum(values) / len(values) if values else float("nan")

    def summary(self, verbose: bool = False) -> str:
        lines = []
        if verbose:
            for m in self.modules:
                lines.append(f"{m.stem:75} | rank {m.old_rank}->{m.new_rank}, alpha {m.new_alpha:g}, "
                             f"sum(S) retained: {m.sum_retained:.1%}, fro retained: {m.fro_retained:.1%}, "
                             f"max(S) ratio: {m.max_ratio:0.1f}")  # fmt: skip
        ranks = sorted({m.new_rank for m in self.modules})
        lines.append(f"{len(self.modules)} modules, new rank {'/'.join(map(str, ranks))}; Frobenius norm retained: "
                     f"overall {self.overall_fro_retained:.2%}, mean per module {self.mean_fro_retained:.2%}")  # fmt: skip
        return "\n".join(lines)


def resize_module(
    stem: str, m: LoraModule, max_rank: int, method: str | None = None, param: float | None = None
) -> tuple[LoraModule, ModuleResize]:
    """kohya ``extract_linear``/``extract_conv`` of ``up @ down`` at the chosen rank.

    The rank is chosen on the singular values padded with zeros to ``min(out, in·k·k)`` (what a
    dense SVD gives, so kohya's dynamic rules pick the same rank) and then capped at the number of
    non-padded values: components with singular value 0 are not written.
    """
    u, s, vh = lowrank_svd(m.up.float().flatten(1), m.down.float().flatten(1))
    full = min(int(m.up.shape[0]), m.down[0].numel())
    rank = min(choose_rank(torch.cat([s, s.new_zeros(max(0, full - len(s)))]), max_rank, method, param), len(s))
    up, down = u[:, :rank] * s[:rank], vh[:rank, :]
    if m.down.dim() == 4:
        up, down = up.reshape(up.shape[0], rank, 1, 1), down.reshape(rank, *m.down.shape[1:])
    new = LoraModule(down.contiguous(), up.contiguous(), m.scale * rank)
    total, kept = float(torch.sqrt(torch.sum(s**2))), float(torch.sqrt(torch.sum(s[:rank] ** 2)))
    info = ModuleResize(
        stem, m.rank, rank, new.alpha, kept / total if total else float("nan"),
        float(torch.sum(s[:rank].abs()) / torch.sum(s.abs())) if total else float("nan"),
        float(s[0] / s[rank - 1]) if float(s[rank - 1]) else float("inf"), abs(m.scale) * total, abs(m.scale) * kept,
    )  # fmt: skip
    return new, info


def resize_lora(
    modules: Mapping[str, LoraModule],
    new_rank: int,
    new_conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, LoraModule], ResizeReport]:
    """Resize every module (3×3 convs to ``new_conv_rank``, default ``new_rank``); return the report."""
    from tqdm.auto import tqdm

    if new_rank < 1:
        raise ValueError(f"new_rank must be >= 1, got {new_rank}")
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    out, report = {}, ResizeReport(dynamic_method=dynamic_method)
    with one_thread():
        for stem, m in tqdm(modules.items(), desc="resize", unit="module", disable=not progress, leave=False):
            rank = conv_rank if m.is_conv3x3 else new_rank
            out[stem], info = resize_module(stem, m, rank, dynamic_method, dynamic_param)
            report.modules.append(info)
    return out, report
