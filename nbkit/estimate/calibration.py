"""Published Tesla T4 measurements and the two constants fitted to them.

Source: the DreamBooth table of ShivamShrirao/diffusers ``examples/dreambooth/README.md`` ("Tested
on Tesla T4 GPU"; training-reference.md §3): SD1.x at 512 px, fp16 autocast over fp32 weights,
8-bit Adam unless noted, xformers attention, latents cached, the text encoder not trained, VAE and
text encoder off the GPU. Two facts of that setup matter for memory:

- **prior preservation**: the script's recipe trains with ``--with_prior_preservation``, which
  concatenates the class images to the instance batch, so the U-Net runs on twice
  ``train_batch_size``. Without it the table's batch-2 rows cannot be explained: they cost 2.5 GB more
  than batch 1, twice what one more 512-px sample needs (the simulation gives 1.2 GB);
- **torch 1.12**: its AdamW updated one tensor at a time (``foreach`` became the GPU default in 2.0),
  so fp32 AdamW had no parameter-sized ``_foreach_sqrt`` copy.

Units: the table's "GB" are 10**9 bytes, not GiB. The fp32-AdamW row (15.79) ran on a T4, whose
memory is 15360 MiB = 15.0 GiB = 16.1 GB; 15.79 GiB would be more than the card has.

Only the three rows given in the issue (``FIT``) set the constants; the other rows of the same table
(recalled from the README, not in training-reference.md) are printed as a check on settings the
constants were not fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbkit.estimate.setting import Setting

#: CUDA context, cuBLAS/cuDNN workspaces and everything else outside the tensors and the allocator's
#: cache, in bytes: the constant that makes the FIT rows' relative errors smallest (see
#: ``nbkit.estimate.estimator.fit_context``).
CONTEXT_BYTES = 0.60e9
#: Step-time constants (see ``flops.py``), fitted on the fp16 rows without accumulation.
UTILISATION_FP16 = 0.22
UTILISATION_FP32 = 0.41
MICRO_BATCH_SECONDS = 0.47

REFERENCE = Setting(method="dreambooth", arch="sd15", resolution=512, train_batch_size=1, gradient_checkpointing=True,
                    optimizer_type="AdamW8bit", mixed_precision="fp16", cache_latents=True,
                    cache_text_encoder_outputs=True, with_prior_preservation=True, foreach=False)


@dataclass(frozen=True)
class PublishedRow:
    name: str
    setting: Setting
    gb: float  # published VRAM, 10**9 bytes
    its: float  # published it/s
    fit: bool  # one of the rows the constants are fitted on


def _row(name: str, gb: float, its: float, fit: bool = False, **changes) -> PublishedRow:
    return PublishedRow(name, REFERENCE.replace(**changes), gb, its, fit)


ROWS: tuple[PublishedRow, ...] = (
    _row("db-sd15-512-fp16-bs1-gc-adamw8bit", 9.92, 0.93, True),
    _row("db-sd15-512-fp16-bs2-nogc-adamw8bit", 13.67, 0.82, True, train_batch_size=2, gradient_checkpointing=False),
    _row("db-sd15-512-fp16-bs1-gc-adamw", 15.79, 0.77, True, optimizer_type="AdamW"),
    _row("db-sd15-512-fp32-bs1-gc-adamw8bit", 10.08, 0.42, mixed_precision="no"),
    _row("db-sd15-512-fp16-bs2-gc-adamw8bit", 10.40, 0.66, train_batch_size=2),
    _row("db-sd15-512-fp16-bs1-nogc-adamw8bit", 11.17, 1.14, gradient_checkpointing=False),
    _row("db-sd15-512-fp32-bs1-nogc-adamw8bit", 11.17, 0.49, mixed_precision="no", gradient_checkpointing=False),
    _row("db-sd15-512-fp16-bs1-ga2-gc-adamw8bit", 11.56, 1.00, gradient_accumulation_steps=2),
    _row("db-sd15-512-fp16-bs1-ga2-nogc-adamw8bit", 13.70, 0.83, gradient_accumulation_steps=2,
         gradient_checkpointing=False),
)
FIT_ROWS = tuple(r for r in ROWS if r.fit)


def speed_constants() -> tuple[float, float, float]:
    return UTILISATION_FP16, UTILISATION_FP32, MICRO_BATCH_SECONDS
