"""Merging and converting models so the results load in A1111, ComfyUI, kohya and diffusers.

- :func:`merge_checkpoints` — A1111's checkpoint merger (weighted sum, add difference, no
  interpolation; inpainting/pix2pix first conv, save_as_half, discard, baked VAE, merge recipe
  metadata), streamed tensor by tensor (:mod:`nbkit.merge.streaming`);
- :func:`merge_lora_into` — kohya LoRAs baked into a single file or a diffusers folder;
- :func:`merge_lora_files` / :func:`resize_lora_file` — LoRA + LoRA (SVD or exact concat) and
  SVD resize, kohya format and metadata;
- :mod:`nbkit.merge.convert` — diffusers <-> single file, ``.ckpt`` -> ``.safetensors``, prune.

Pure rules live in :mod:`~nbkit.merge.a1111`, :mod:`~nbkit.merge.arch` and
:mod:`~nbkit.merge.lora_math`; the other modules do the file I/O.
"""

from nbkit.merge.checkpoints import MergeResult, merge_checkpoints
from nbkit.merge.lora_into import LoraIntoResult, merge_lora_into
from nbkit.merge.lora_merge import LoraMergeResult, merge_lora_files, resize_lora_file

__all__ = [
    "LoraIntoResult",
    "LoraMergeResult",
    "MergeResult",
    "merge_checkpoints",
    "merge_lora_files",
    "merge_lora_into",
    "resize_lora_file",
]
