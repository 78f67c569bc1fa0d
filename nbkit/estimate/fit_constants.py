"""The estimator's constants, fitted to the published T4 rows of :mod:`nbkit.estimate.calibration`.

The shipped values (:mod:`nbkit.estimate.constants`) are what :func:`fit` returns: ``python
bench/fit_estimator.py --write`` writes them, and a test fails when the two differ. The bench script
also prints the error on every row, fitted and held out (docs/estimator.md).

Two fits, on different rows:

- **memory** (:func:`fit_context`): one constant, the CUDA context and library workspaces, added to
  the simulated reserved memory; least squares on the relative errors of the three rows named in
  :data:`MEMORY_FIT` (the three rows issue 11 gave). The six other rows are held out.
- **speed** (:func:`fit_speed`): the share of the fp16 and of the fp32 peak a step reaches, and the
  seconds per micro-batch that do not shrink with the batch. The fp16 rows' step times minus the
  weight-traffic time against FLOPs give a line (slope: fp16 utilisation; intercept: seconds per
  micro-batch); the fp32 rows, less that intercept, give the fp32 slope. Fitted on the six rows
  without accumulation that use 8-bit Adam (:data:`SPEED_FIT`), held out: the fp32-AdamW row and
  the two accumulation rows.

How a published row becomes an estimator :class:`~nbkit.estimate.setting.Setting` is a modelling
choice (:class:`Choices`); each can be switched off to see which rows it matters for
(:func:`ablation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nbkit.estimate.calibration import SETUP, TABLE, PublishedRow
from nbkit.estimate.flops import FP32_TFLOPS, step_seconds
from nbkit.estimate.setting import GB, GPUS, Setting

#: the rows the memory constant is fitted on (issue 11's three published T4 rows)
MEMORY_FIT = ("db-sd15-512-fp16-bs1-gc-adamw8bit", "db-sd15-512-fp16-bs2-nogc-adamw8bit",
              "db-sd15-512-fp16-bs1-gc-adamw")
#: the rows the speed constants are fitted on: no gradient accumulation, 8-bit Adam
SPEED_FIT = tuple(r.name for r in TABLE if r.gradient_accumulation_steps == 1 and r.use_8bit_adam)
GPU = "T4"  # the GPU of the table
#: Held-out rows that informed a modelling choice, so they are no blind test of it (from the
#: estimator's history: the first calibration.py, issue 11's closing note, docs/benchmarks.md).
#: The estimator's author knew every row of the table while modelling; these are the ones a
#: recorded choice rests on.
MEMORY_INFORMED = {
    "db-sd15-512-fp16-bs1-nogc-adamw8bit": "prior preservation: its 2.5 GB gap to the batch-2 row was the argument",
    "db-sd15-512-fp16-bs1-ga2-gc-adamw8bit": "gradients kept through accumulation (the only rows with accumulation)",
    "db-sd15-512-fp16-bs1-ga2-nogc-adamw8bit": "gradients kept through accumulation (the only rows with accumulation)",
}
SPEED_INFORMED = {
    "db-sd15-512-fp16-bs1-ga2-gc-adamw8bit": "left out of the speed fit as inconsistent; it/s then read per micro-batch",
    "db-sd15-512-fp16-bs1-ga2-nogc-adamw8bit": "left out of the speed fit as inconsistent; it/s then read per micro-batch",
}


@dataclass(frozen=True)
class Constants:
    context_bytes: float  # CUDA context + workspaces, bytes
    utilisation_fp16: float  # share of the fp16 tensor-core peak
    utilisation_fp32: float  # share of the fp32 peak
    micro_batch_seconds: float  # per micro-batch, whatever its size

    @property
    def speed(self) -> tuple[float, float, float]:
        return self.utilisation_fp16, self.utilisation_fp32, self.micro_batch_seconds


@dataclass(frozen=True)
class Choices:
    """How the published rows are read. Each is on in the shipped estimator; :func:`ablation` turns
    them off one at a time."""

    prior_preservation: bool = True  # the U-Net runs on the instance images plus as many class images
    per_tensor_adamw: bool = True  # torch 1.12's AdamW: one tensor at a time, no foreach temporaries
    caching_allocator: bool = True  # peak reserved by the caching allocator, not peak of live tensors
    its_per_micro_batch: bool = True  # "it/s" counts micro-batches (tqdm updated every micro-batch)


@dataclass(frozen=True)
class Row:
    published: PublishedRow
    setting: Setting
    memory_fit: bool  # the memory constant is fitted on it
    speed_fit: bool  # the speed constants are fitted on it
    memory_informed: str = ""  # held out, but a recorded memory-modelling choice rests on it: which
    speed_informed: str = ""

    @property
    def name(self) -> str:
        return self.published.name


def setting_of(row: PublishedRow, choices: Choices = Choices()) -> Setting:
    """The estimator setting a published row stands for (see ``calibration``'s facts)."""
    return Setting(method="dreambooth", arch="sd15", resolution=SETUP.resolution,
                   train_batch_size=row.train_batch_size,
                   gradient_accumulation_steps=row.gradient_accumulation_steps,
                   gradient_checkpointing=row.gradient_checkpointing,
                   optimizer_type="AdamW8bit" if row.use_8bit_adam else "AdamW",
                   mixed_precision="fp16" if row.fp16 else "no", train_text_encoder=False,
                   cache_latents=SETUP.cached_latents_and_text,
                   cache_text_encoder_outputs=SETUP.cached_latents_and_text, sdpa=SETUP.attention == "xformers",
                   with_prior_preservation=SETUP.with_prior_preservation and choices.prior_preservation,
                   foreach=False if choices.per_tensor_adamw else None)


def published_rows(choices: Choices = Choices()) -> tuple[Row, ...]:
    """Every published row with its setting and whether each fit uses it, in the table's order."""
    return tuple(Row(r, setting_of(r, choices), r.name in MEMORY_FIT, r.name in SPEED_FIT,
                     MEMORY_INFORMED.get(r.name, ""), SPEED_INFORMED.get(r.name, "")) for r in TABLE)


# ---------------------------------------------------------------------------------------------- memory
def simulated_bytes(setting: Setting, choices: Choices = Choices()) -> int:
    """Peak bytes of the simulated step without the constant: reserved by the caching allocator (or,
    with ``caching_allocator`` off, the peak of live tensors)."""
    from nbkit.estimate.simulate import record_step, replay

    alloc = replay(record_step(setting), setting)
    return alloc.peak_reserved if choices.caching_allocator else alloc.peak_allocated


def fit_context(rows: tuple[Row, ...], choices: Choices = Choices()) -> float:
    """The constant c (bytes) minimising sum(((simulated + c) / published - 1)**2) over the memory-fit rows."""
    fitted = [r for r in rows if r.memory_fit]
    weights = [1 / (r.published.gb * GB) ** 2 for r in fitted]
    gaps = [r.published.gb * GB - simulated_bytes(r.setting, choices) for r in fitted]
    return sum(w * g for w, g in zip(weights, gaps)) / sum(weights)


def predicted_gb(row: Row, context_bytes: float, choices: Choices = Choices()) -> float:
    return (simulated_bytes(row.setting, choices) + context_bytes) / GB


# ----------------------------------------------------------------------------------------------- speed
def _step_terms(setting: Setting) -> tuple[float, float]:
    """(FLOPs, bytes of weight-sized memory traffic) of one optimizer step."""
    from nbkit.estimate.flops import count_flops, traffic_bytes
    from nbkit.estimate.simulate import record_step

    return count_flops(setting), traffic_bytes(setting, record_step(setting).trainable_params)


def fit_speed(rows: tuple[Row, ...]) -> tuple[float, float, float]:
    """(fp16 utilisation, fp32 utilisation, seconds per micro-batch) from the speed-fit rows (all
    without accumulation: one micro-batch per optimizer step, whatever "it/s" counts)."""
    fp16, fp32 = [], []
    for r in (r for r in rows if r.speed_fit):
        flops, traffic = _step_terms(r.setting)
        seconds = 1 / r.published.its - traffic / (GPUS[GPU].bandwidth_gbs * 1e9)
        (fp16 if r.published.fp16 else fp32).append((flops, seconds))
    slope, fixed = _line(fp16)
    slope32 = sum(f * (t - fixed) for f, t in fp32) / sum(f * f for f, _ in fp32)
    return 1 / (slope * GPUS[GPU].fp16_tflops * 1e12), 1 / (slope32 * FP32_TFLOPS[GPU] * 1e12), fixed


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return slope, my - slope * mx


def predicted_its(row: Row, speed: tuple[float, float, float], choices: Choices = Choices()) -> float:
    """The table's "it/s" for ``row``: micro-batches per second (optimizer steps per second with
    ``its_per_micro_batch`` off)."""
    seconds = step_seconds(*_step_terms(row.setting), row.setting, GPU, speed)
    per_step = row.setting.gradient_accumulation_steps if choices.its_per_micro_batch else 1
    return per_step / seconds


# ------------------------------------------------------------------------------------------------- fit
def fit(choices: Choices = Choices()) -> Constants:
    """The constants, rounded as shipped: the context to 0.01 GB (10**7 bytes), the speed constants
    to two decimals (the table gives two or three significant digits)."""
    rows = published_rows(choices)
    fp16, fp32, micro = fit_speed(rows)
    return Constants(context_bytes=round(fit_context(rows, choices) / 1e7) * 1e7, utilisation_fp16=round(fp16, 2),
                     utilisation_fp32=round(fp32, 2), micro_batch_seconds=round(micro, 2))


def shipped() -> Constants:
    from nbkit.estimate import constants

    return Constants(constants.CONTEXT_BYTES, constants.UTILISATION_FP16, constants.UTILISATION_FP32,
                     constants.MICRO_BATCH_SECONDS)


@dataclass(frozen=True)
class RowError:
    row: Row
    predicted_gb: float
    memory_error: float  # predicted / published - 1
    predicted_its: float
    speed_error: float


def row_errors(constants: Constants, choices: Choices = Choices()) -> list[RowError]:
    """Predicted against published, every row, with ``constants``."""
    out = []
    for row in published_rows(choices):
        gb = predicted_gb(row, constants.context_bytes, choices)
        its = predicted_its(row, constants.speed, choices)
        out.append(RowError(row, gb, gb / row.published.gb - 1, its, its / row.published.its - 1))
    return out


def worst(errors: list[float]) -> float:
    """The largest absolute relative error, rounded *up* to 0.1%: the bound a claim can state."""
    return math.ceil(max(abs(e) for e in errors) * 1000 - 1e-9) / 1000


ABLATIONS: dict[str, Choices] = {
    "as shipped": Choices(),
    "no prior preservation": Choices(prior_preservation=False),
    "foreach AdamW (torch 2)": Choices(per_tensor_adamw=False),
    "live tensors (no allocator model)": Choices(caching_allocator=False),
    "it/s = optimizer steps": Choices(its_per_micro_batch=False),
}


def ablation() -> dict[str, tuple[Constants, list[RowError]]]:
    """Each modelling choice switched off alone, every constant refitted (and rounded) on the same rows:
    {label: (refitted constants, row errors)}."""
    out = {}
    for label, choices in ABLATIONS.items():
        refit = fit(choices)
        out[label] = (refit, row_errors(refit, choices))
    return out


def groups(rows: tuple[Row, ...], kind: str) -> dict[str, list[Row]]:
    """The rows of ``kind`` ("memory" or "speed") in the three groups the docs state an error for:
    fitted, held out, and held out with no recorded modelling choice resting on them."""
    fitted = [r for r in rows if getattr(r, f"{kind}_fit")]
    held = [r for r in rows if not getattr(r, f"{kind}_fit")]
    return {"fitted": fitted, "held-out": held,
            "blind": [r for r in held if not getattr(r, f"{kind}_informed")]}
