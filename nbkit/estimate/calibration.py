"""The published Tesla T4 measurements the estimator's constants are fitted to: data only.

What nbkit makes of these rows (the estimator settings they stand for, which rows are fitted, the
fit itself) is in :mod:`nbkit.estimate.fit_constants`; the shipped result is
:mod:`nbkit.estimate.constants`; ``python bench/fit_estimator.py`` shows both and the error on every
row (docs/estimator.md).

Source: the table "Use the table below to choose the best flags based on your memory and speed
requirements. Tested on Tesla T4 GPU." in ShivamShrirao/diffusers ``examples/dreambooth/README.md``,
added in commit f5d8aec835cc9fb5375f3c9ad480e915132d0f89 (2022-10-02, "latents cache enable and
performance table added"). Six minutes later commit 89f76bc4 ("typo fix") changed one cell: the
speed of the fp16 / batch 1 / accumulation 2 / no checkpointing row, from 1.2 to 0.83 it/s. The rows
below are the table as it stands after that fix (unchanged since, to the repository's last commit
2c298300, 2023-06-08). Its columns: ``fp16``, ``train_batch_size``, ``gradient_accumulation_steps``,
``gradient_checkpointing``, ``use_8bit_adam``, ``GB VRAM usage``, ``Speed (it/s)``.

Facts about those runs from the same commit (not from the table):

- ``examples/dreambooth/launch.sh``: SD1.4 (``CompVis/stable-diffusion-v1-4``) at ``--resolution=512``,
  ``--with_prior_preservation``, ``--mixed_precision="fp16"``, ``--use_8bit_adam``, ``--cache_latents``;
- ``train_dreambooth.py``: with ``--with_prior_preservation`` the collate function appends the class
  images to the instance images of each batch ("We do this to avoid doing two forward passes");
  ``--cache_latents`` caches the VAE latents *and* the text encoder's outputs, then deletes the VAE and
  the text encoder; only the U-Net trains; ``progress_bar.update(1)`` runs once per micro-batch (also
  while accumulating), so "it/s" counts micro-batches, and accelerate's wrapped optimizer steps only
  when the gradients sync;
- the notebook installs an xformers wheel built for CPython 3.7 (Colab then: Python 3.7, torch 1.12).

Units: the table's "GB" are 10**9 bytes. Its fp32-AdamW row (15.79) ran on a T4, whose memory is
15360 MiB = 15.0 GiB = 16.1 GB: 15.79 GiB would be more than the card has.

Not used: the README's sentence "uses 15.79 GB VRAM with ``--gradient_checkpointing`` else 17.7 GB"
(17.7 GB does not fit a T4, and the number predates the table and its latent caching: the commit
that added the table only added "15.79 GB with gradient checkpointing else" in front of it).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = ("https://github.com/ShivamShrirao/diffusers/blob/f5d8aec835cc9fb5375f3c9ad480e915132d0f89/"
          "examples/dreambooth/README.md")
FIXED_IN = "89f76bc4ea70f61ce27783623e7522d42c23c75e"  # "typo fix": the ga2 / no-checkpointing row's speed
#: it/s of a row before that fix, as the table was first published
BEFORE_FIX_ITS = {"db-sd15-512-fp16-bs1-ga2-nogc-adamw8bit": 1.2}


@dataclass(frozen=True)
class PublishedRow:
    """One row of the table, in its own columns."""

    name: str  # nbkit's label for the row
    fp16: bool  # the ``fp16`` column: "fp16" or "no"
    train_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    use_8bit_adam: bool  # bitsandbytes AdamW8bit; torch AdamW otherwise
    gb: float  # "GB VRAM usage", 10**9 bytes
    its: float  # "Speed (it/s)": micro-batches per second (see the module doc)


@dataclass(frozen=True)
class Setup:
    """What every row of the table shares, from the source's launch.sh, script and notebook."""

    model: str = "CompVis/stable-diffusion-v1-4"  # an SD1.x U-Net: the same shapes as SD1.5
    resolution: int = 512
    with_prior_preservation: bool = True  # class images appended to every batch
    cached_latents_and_text: bool = True  # VAE and text encoder deleted after caching
    attention: str = "xformers"  # memory-efficient attention
    torch: str = "1.12"  # Colab's torch in October 2022 (Python 3.7 xformers wheel)


SETUP = Setup()

#: The table, in the README's order.
TABLE: tuple[PublishedRow, ...] = (
    PublishedRow("db-sd15-512-fp16-bs1-gc-adamw8bit", True, 1, 1, True, True, 9.92, 0.93),
    PublishedRow("db-sd15-512-fp32-bs1-gc-adamw8bit", False, 1, 1, True, True, 10.08, 0.42),
    PublishedRow("db-sd15-512-fp16-bs2-gc-adamw8bit", True, 2, 1, True, True, 10.40, 0.66),
    PublishedRow("db-sd15-512-fp16-bs1-nogc-adamw8bit", True, 1, 1, False, True, 11.17, 1.14),
    PublishedRow("db-sd15-512-fp32-bs1-nogc-adamw8bit", False, 1, 1, False, True, 11.17, 0.49),
    PublishedRow("db-sd15-512-fp16-bs1-ga2-gc-adamw8bit", True, 1, 2, True, True, 11.56, 1.00),
    PublishedRow("db-sd15-512-fp16-bs2-nogc-adamw8bit", True, 2, 1, False, True, 13.67, 0.82),
    PublishedRow("db-sd15-512-fp16-bs1-ga2-nogc-adamw8bit", True, 1, 2, False, True, 13.70, 0.83),
    PublishedRow("db-sd15-512-fp16-bs1-gc-adamw", True, 1, 1, True, False, 15.79, 0.77),
)
