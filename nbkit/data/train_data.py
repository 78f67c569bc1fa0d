"""From resolved dataset specs to training batches, with VAE latents cached once.

An *item* is one image of one subset; an *epoch* lists every item ``num_repeats`` times
(regularisation repeats balanced as kohya does), shuffled with the run's seed.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.images import (
    CaptionOptions,
    DatasetError,
    list_images,
    open_rgb,
    process_caption,
    read_caption,
    resize_center_crop,
    to_tensor,
)


@dataclass
class Item:
    image: Path
    caption: str
    subset: SubsetSpec
    resolution: tuple[int, int]
    repeats: int


def collect_items(datasets: list[DatasetSpec]) -> list[Item]:
    items: list[Item] = []
    for ds in datasets:
        if ds.enable_bucket:
            warnings.warn(
                "enable_bucket: aspect-ratio bucketing is not implemented in this nbkit version; "
                f"images are scaled and centre-cropped to {ds.resolution}",
                stacklevel=2,
            )
        for sub in ds.subsets:
            images = list_images(sub.image_dir)
            if not images:
                raise DatasetError(f"{sub.image_dir}: no images (.png/.jpg/.jpeg/.webp/.bmp) found: check image_dir")
            for path in images:
                caption = read_caption(path, sub.caption_extension, sub.class_tokens)
                items.append(Item(path, caption, sub, ds.resolution, sub.num_repeats))
    _balance_reg_repeats(items)
    return items


def _balance_reg_repeats(items: list[Item]) -> None:
    """kohya (train_util.py): reg repeats are re-dealt so reg samples == train samples."""
    train = sum(i.repeats for i in items if not i.subset.is_reg)
    regs = [i for i in items if i.subset.is_reg]
    if not regs:
        return
    if sum(i.repeats for i in regs) >= train:
        return  # more reg than train samples: kohya uses them as they are
    for item in regs:
        item.repeats = 0
    n, first = 0, True
    while n < train:
        for item in regs:
            item.repeats += item.subset.num_repeats if first else 1
            n += item.subset.num_repeats if first else 1
            if n >= train:
                break
        first = False


def tag_frequency(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per image folder, how often each comma-separated tag occurs."""
    out: dict[str, Counter] = {}
    for item in items:
        key = f"{item.subset.num_repeats}_{item.subset.image_dir.name}"
        counter = out.setdefault(key, Counter())
        counter.update(t.strip() for t in item.caption.split(",") if t.strip())
    return {k: dict(v) for k, v in out.items()}


def dataset_dirs(items: list[Item]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: image folder -> repeats and image count."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        entry = out.setdefault(item.subset.image_dir.name, {"n_repeats": item.subset.num_repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def load_pixels(item: Item, flip: bool = False) -> torch.Tensor:
    image = resize_center_crop(open_rgb(item.image), item.resolution)
    tensor = to_tensor(image)
    return tensor.flip(-1) if flip else tensor


@torch.no_grad()
def cache_latents(items: list[Item], vae, device, dtype, batch_size: int = 4, progress=None) -> dict[tuple[int, bool], torch.Tensor]:
    """Encode each image (and its mirror when ``flip_aug``) once; latents are kept on CPU."""
    keys = [(i, False) for i in range(len(items))] + [(i, True) for i, it in enumerate(items) if it.subset.flip_aug]
    cache: dict[tuple[int, bool], torch.Tensor] = {}
    for start in range(0, len(keys), batch_size):
        chunk = keys[start:start + batch_size]
        groups: dict[tuple[int, int], list] = {}
        for key in chunk:  # one VAE call per resolution
            groups.setdefault(items[key[0]].resolution, []).append(key)
        for group in groups.values():
            pixels = torch.stack([load_pixels(items[i], flip) for i, flip in group]).to(device, dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            for key, latent in zip(group, latents):
                cache[key] = latent.float().cpu()
        if progress:
            progress(len(chunk))
    return cache


def epoch_batches(items: list[Item], batch_size: int, rng: random.Random) -> list[list[tuple[int, bool]]]:
    """Shuffle every (item, repeat) of one epoch into batches of one resolution each."""
    order = [idx for idx, item in enumerate(items) for _ in range(item.repeats)]
    rng.shuffle(order)
    by_res: dict[tuple[int, int], list[int]] = {}
    for idx in order:
        by_res.setdefault(items[idx].resolution, []).append(idx)
    batches = []
    for indices in by_res.values():
        for start in range(0, len(indices), batch_size):
            batches.append([(i, items[i].subset.flip_aug and rng.random() < 0.5) for i in indices[start:start + batch_size]])
    rng.shuffle(batches)
    return batches


def steps_per_epoch(items: list[Item], batch_size: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps in one epoch, exactly as :func:`epoch_batches` and the trainer count them."""
    per_group: dict[tuple[int, int], int] = {}
    for item in items:
        per_group[item.resolution] = per_group.get(item.resolution, 0) + item.repeats
    batches = sum(math.ceil(n / batch_size) for n in per_group.values())
    return math.ceil(batches / gradient_accumulation_steps)


def batch_captions(items: list[Item], batch: list[tuple[int, bool]], rng: random.Random) -> list[str]:
    out = []
    for idx, _ in batch:
        sub = items[idx].subset
        options = CaptionOptions(sub.shuffle_caption, sub.keep_tokens, sub.caption_prefix, sub.caption_suffix)
        out.append(process_caption(items[idx].caption, options, rng))
    return out
