"""From resolved dataset specs to training batches.

An *item* is one image of one subset, with its kohya bucket; an *epoch* lists every item
``num_repeats`` times (regularisation repeats balanced as kohya does), grouped into batches of
one bucket each (per dataset, with that dataset's batch size), shuffled with the run's seed.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nbkit.data.buckets import BucketChoice, BucketManager, crop_box
from nbkit.data.captions import CaptionOptions, CaptionState, process_caption
from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.images import (
    CaptionEncodingError,
    DatasetError,
    ImageReadError,
    image_size,
    list_images,
    open_alpha,
    open_rgb,
    read_caption,
    resize,
    to_tensor,
)


@dataclass
class Item:
    image: Path
    caption: str  # raw caption (every non-empty line)
    subset: SubsetSpec
    dataset: DatasetSpec
    dataset_index: int
    size: tuple[int, int]  # original (width, height) after EXIF rotation
    bucket: BucketChoice
    repeats: int

    @property
    def resolution(self) -> tuple[int, int]:
        return self.bucket.reso


def _manager(ds: DatasetSpec) -> BucketManager:
    return BucketManager(
        ds.resolution, enable_bucket=ds.enable_bucket, no_upscale=ds.bucket_no_upscale,
        min_size=ds.min_bucket_reso, max_size=ds.max_bucket_reso, reso_steps=ds.bucket_reso_steps,
    )


def collect_items(datasets: list[DatasetSpec], seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(training items, validation items). ``validation_split`` holds images out per subset."""
    train: list[Item] = []
    validation: list[Item] = []
    for d_index, ds in enumerate(datasets):
        manager = _manager(ds)
        for sub in ds.subsets:
            images = list_images(sub.image_dir)
            if not images:
                raise DatasetError(f"{sub.image_dir}: no images (.png/.jpg/.jpeg/.webp/.bmp) found: check image_dir")
            items = []
            for path in images:
                try:
                    size = image_size(path)
                    caption = read_caption(path, sub.caption_extension, sub.class_tokens)
                except (CaptionEncodingError, ImageReadError) as err:  # one bad file must not stop a Colab run
                    warnings.warn(f"skipped: {err} (see `nbkit dataset check`)", stacklevel=2)
                    continue
                items.append(Item(path, caption, sub, ds, d_index, size, manager.select_bucket(*size), sub.num_repeats))
            if not items:
                raise DatasetError(f"{sub.image_dir}: none of the images can be read: run `nbkit dataset check`")
            held = _validation_indices(len(items), ds, seed) if not sub.is_reg else set()
            train += [it for i, it in enumerate(items) if i not in held]
            validation += [it for i, it in enumerate(items) if i in held]
    if not train:
        raise DatasetError("every image went to validation: lower validation_split")
    _balance_reg_repeats(train)
    return train, validation


def _validation_indices(n: int, ds: DatasetSpec, seed: int) -> set[int]:
    if ds.validation_split <= 0:
        return set()
    order = list(range(n))
    random.Random(ds.validation_seed if ds.validation_seed is not None else seed).shuffle(order)
    return set(order[: math.floor(n * ds.validation_split)])


def _balance_reg_repeats(items: list[Item]) -> None:
    """kohya (train_util.py, DreamBoothDataset.__init__): reg repeats are re-dealt so reg samples ==
    train samples. With more reg samples than train samples kohya registers reg images in order until
    it has as many as train samples, and the rest are never used (it warns only when reg > train)."""
    train = sum(i.repeats for i in items if not i.subset.is_reg)
    regs = [i for i in items if i.subset.is_reg]
    if not regs:
        return
    if sum(i.repeats for i in regs) > train:
        warnings.warn("more regularisation images than training images: some are never used", stacklevel=3)
    for item in regs:
        item.repeats = 0
    n, first = 0, True
    while n < train:
        for item in regs:
            step = item.subset.num_repeats if first else 1
            item.repeats += step
            n += step
            if n >= train:
                break
        first = False


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per image folder, how often each comma-separated tag occurs."""
    out: dict[str, Counter] = {}
    for item in items:
        key = f"{item.subset.num_repeats}_{item.subset.image_dir.name}"
        counter = out.setdefault(key, Counter())
        counter.update(t.strip() for t in item.caption.split("\n")[0].split(",") if t.strip())
    return {k: dict(v) for k, v in out.items()}


def dataset_dirs(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: image folder -> repeats and image count."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        entry = out.setdefault(item.subset.image_dir.name, {"n_repeats": item.subset.num_repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


# ----------------------------------------------------------------------------- pixels
def color_aug(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya ``AugHelper.color_aug``: with p=0.33, a hue shift of +-8 (of 180) or a gamma in 0.95-1.05."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        h, s, v = image.convert("HSV").split()
        shift = round(rng.uniform(-8, 8) * 256 / 180)
        h = h.point(lambda x: (x + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    array = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(array**gamma, 0, 255).astype(np.uint8))


def load_pixels(
    item: Item, flip: bool = False, rng: random.Random | None = None, with_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CHW pixels in [-1, 1], alpha mask HW in [0, 1] or None) for the item's bucket."""
    sub, bucket = item.subset, item.bucket
    image = resize(open_rgb(item.image), bucket.resized_size, item.dataset.resize_interpolation)
    offset = (rng.random(), rng.random()) if sub.random_crop and rng is not None else None
    box = crop_box(bucket.resized_size, bucket.reso, offset)
    image = image.crop(box)
    if sub.color_aug and rng is not None:
        image = color_aug(image, rng)
    pixels = to_tensor(image)
    mask = None
    if with_mask and sub.alpha_mask:
        alpha = resize(open_alpha(item.image), bucket.resized_size, item.dataset.resize_interpolation).crop(box)
        mask = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)
    if flip:
        pixels = pixels.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    return pixels, mask


# ----------------------------------------------------------------------------- batches
def _groups(items: list[Item], order: list[int]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for idx in order:
        item = items[idx]
        groups.setdefault((item.dataset_index, item.bucket.reso), []).append(idx)
    return groups


def epoch_batches(items: list[Item], rng: random.Random) -> list[list[tuple[int, bool]]]:
    """Shuffle every (item, repeat) of one epoch into batches of one bucket each."""
    order = [idx for idx, item in enumerate(items) for _ in range(item.repeats)]
    rng.shuffle(order)
    batches = []
    for indices in _groups(items, order).values():
        size = items[indices[0]].dataset.batch_size
        for start in range(0, len(indices), size):
            batches.append([(i, items[i].subset.flip_aug and rng.random() < 0.5) for i in indices[start:start + size]])
    rng.shuffle(batches)
    return batches


def steps_per_epoch(
    items: list[Item], batch_size: int | None = None, gradient_accumulation_steps: int = 1, num_processes: int = 1
) -> int:
    """Optimizer steps in one epoch, exactly as :func:`epoch_batches` and the trainer count them.
    ``batch_size`` overrides every dataset's own batch size (for "what if" tables); with several
    processes each runs an equal share of the batches."""
    order = [idx for idx, item in enumerate(items) for _ in range(item.repeats)]
    batches = 0
    for indices in _groups(items, order).values():
        size = batch_size or items[indices[0]].dataset.batch_size
        batches += math.ceil(len(indices) / size)
    return math.ceil(math.ceil(batches / num_processes) / gradient_accumulation_steps)


def caption_options(sub: SubsetSpec) -> CaptionOptions:
    return CaptionOptions(**{f: getattr(sub, f) for f in CaptionOptions.__dataclass_fields__})


def batch_captions(items: list[Item], batch: list[tuple[int, bool]], rng: random.Random, state: CaptionState) -> list[str]:
    return [process_caption(items[idx].caption, caption_options(items[idx].subset), rng, state) for idx, _ in batch]


# ----------------------------------------------------------------------------- SDXL size conditioning
def kohya_crop_ltrb(bucket_reso: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """kohya ``library/train_util.py::BucketManager.get_crop_ltrb`` (bucket and image as (width, height)):
    the crop box SDXL is told about, as Stability AI's preprocessing computes it. kohya uses it for
    centre and random crops alike (``trim_and_resize_if_required`` returns it whatever the crop)."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


def sdxl_time_ids(item: Item, flipped: bool) -> tuple[int, int, int, int, int, int]:
    """SDXL's size/crop conditioning of one sample as kohya computes it (``train_util.py``,
    ``BaseDataset.__getitem__``): (original h, original w, crop top, crop left, target h, target w),
    the original size being the image's before resizing, the target size the bucket; a flipped
    sample's crop left is ``target width - crop right``. Without buckets kohya records the cropped
    image as the original and no crop. The order of diffusers' ``add_time_ids``
    and of kohya ``sdxl_train_util.get_size_embeddings(orig, crop, target)``."""
    target_w, target_h = item.bucket.reso
    if item.dataset.enable_bucket:
        width, height = item.size
        left, top, right, _ = kohya_crop_ltrb(item.bucket.reso, item.size)
    else:  # kohya without buckets: the cropped image is the "original", crop_ltrb = (0, 0, 0, 0)
        (width, height), (left, top, right) = item.bucket.reso, (0, 0, 0)
    if flipped:
        left = target_w - right
    return int(height), int(width), int(top), int(left), int(target_h), int(target_w)
