"""Aspect-ratio buckets exactly as kohya sd-scripts computes them.

Sources: ``library/model_util.py::make_bucket_resolutions`` and
``library/train_util.py::BucketManager.select_bucket`` / ``round_to_steps``. Each image goes to
the bucket with the nearest aspect ratio, is scaled to *cover* it, then centre- (or randomly)
cropped. With ``bucket_no_upscale`` the bucket is made per image: downscale only when the
image is larger than the training area, floor each side to ``bucket_reso_steps``, crop, never pad.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

Reso = tuple[int, int]  # (width, height)


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Reso]:
    """kohya's bucket list for a training resolution (17 buckets at 512x512 with the defaults)."""
    max_area = max_reso[0] * max_reso[1]
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    reso: Reso  # the bucket (crop size), width x height
    resized_size: Reso  # the size the image is scaled to before cropping
    ar_error: float  # bucket aspect ratio minus image aspect ratio


class BucketManager:
    """Assigns images to buckets. ``enable_bucket=False`` is the single predefined bucket ``max_reso``."""

    def __init__(
        self,
        max_reso: Reso,
        *,
        enable_bucket: bool = True,
        no_upscale: bool = False,
        min_size: int = 256,
        max_size: int = 1024,
        reso_steps: int = 64,
    ):
        if enable_bucket and max_size < max(max_reso):
            raise ValueError(f"max_bucket_reso ({max_size}) must be at least the resolution {max_reso}")
        if enable_bucket and min_size > max_size:
            raise ValueError(f"min_bucket_reso ({min_size}) must not exceed max_bucket_reso ({max_size})")
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.no_upscale = enable_bucket and no_upscale
        self.reso_steps = reso_steps
        if not enable_bucket:
            resos = [max_reso]
        elif not no_upscale:
            resos = make_bucket_resolutions(max_reso, min_size, max_size, reso_steps)
        else:
            resos = []
        self.predefined = resos
        self.predefined_set = set(resos)
        self.aspect_ratios = np.array([w / h for w, h in resos]) if resos else np.zeros(0)

    def round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width: int, image_height: int) -> BucketChoice:
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self.predefined_set:
                reso = self.predefined[int(np.abs(self.aspect_ratios - aspect_ratio).argmin())]
            if aspect_ratio > reso[0] / reso[1]:  # wider than the bucket: match heights
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            resized = self._no_upscale_size(image_width, image_height, aspect_ratio)
            reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
            if min(reso) <= 0:
                raise ValueError(
                    f"an image of {image_width}x{image_height} is smaller than bucket_reso_steps={self.reso_steps}: "
                    "remove it or turn off bucket_no_upscale"
                )
        return BucketChoice(reso, resized, reso[0] / reso[1] - aspect_ratio)

    def _no_upscale_size(self, width: int, height: int, aspect_ratio: float) -> Reso:
        if width * height <= self.max_area:
            return (width, height)
        resized_width = math.sqrt(self.max_area * aspect_ratio)
        resized_height = self.max_area / resized_width
        b_width = self.round_to_steps(resized_width)
        b_height_in_w = self.round_to_steps(b_width / aspect_ratio)
        b_height = self.round_to_steps(resized_height)
        b_width_in_h = self.round_to_steps(b_height * aspect_ratio)
        ar_w = b_width / b_height_in_w if b_height_in_w else math.inf
        ar_h = b_width_in_h / b_height if b_height else math.inf
        if abs(ar_w - aspect_ratio) < abs(ar_h - aspect_ratio):
            return (b_width, int(b_width / aspect_ratio + 0.5))
        return (int(b_height * aspect_ratio + 0.5), b_height)


def crop_box(resized: Reso, reso: Reso, offset: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the bucket inside the resized image. ``offset`` in [0, 1] per
    axis picks a random crop (kohya ``random_crop``); None is kohya's centre crop."""
    trim_w, trim_h = resized[0] - reso[0], resized[1] - reso[1]
    if offset is None:
        left, top = trim_w // 2, trim_h // 2
    else:
        left, top = round(trim_w * offset[0]), round(trim_h * offset[1])
    return (left, top, left + reso[0], top + reso[1])


def bucket_report(assignments: list[Reso], repeats: list[int] | None = None) -> list[tuple[Reso, int, int]]:
    """(bucket, images, images x repeats) rows, sorted by aspect ratio."""
    repeats = repeats or [1] * len(assignments)
    images = Counter(assignments)
    samples: Counter = Counter()
    for reso, r in zip(assignments, repeats):
        samples[reso] += r
    return [(reso, images[reso], samples[reso]) for reso in sorted(images, key=lambda r: r[0] / r[1])]
