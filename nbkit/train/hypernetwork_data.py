"""Data for hypernetwork training, as A1111's ``textual_inversion/dataset.py`` prepares it:
prompt templates with ``[name]``/``[filewords]``, tag shuffling and dropout, captions from file
names, and the three latent sampling methods (once / deterministic / random).

Images, buckets and the latent cache are nbkit's (``nbkit.data``); only what A1111 does
differently lives here.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.data.captions import CaptionState, process_caption
from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.latents import LatentCache, cacheable
from nbkit.data.train_data import Item, caption_options

TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "assets" / "templates"
_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")  # A1111 re_numbers_at_start
_FILENAME_CAPTION = "\x00nbkit:caption-from-file-name"  # class_tokens marker for A1111's file-name captions
# kohya subset options that change a caption from step to step.
_CHANGING = ("shuffle_caption", "enable_wildcard", "caption_dropout_rate", "caption_tag_dropout_rate",
             "caption_dropout_every_n_epochs", "token_warmup_step")


# ---------------------------------------------------------------- templates and captions


def template_names() -> list[str]:
    """The shipped A1111 templates (``hypernetwork.txt``, ``none.txt``, ``style.txt``, ...)."""
    return sorted(p.name for p in TEMPLATE_DIR.glob("*.txt"))


def load_template(name_or_path: str | Path) -> list[str]:
    """The prompt lines of a shipped template (by name, ``.txt`` optional) or of a file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        shipped = TEMPLATE_DIR / (path.name if path.suffix == ".txt" else f"{path.name}.txt")
        if path.parent != Path(".") or not shipped.is_file():
            raise ConfigError(f"template_file {str(name_or_path)!r}: no such file, and not one of the shipped "
                              f"templates ({', '.join(template_names())})")
        path = shipped
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ConfigError(f"{path}: the template has no prompt lines: write one prompt per line, e.g. "
                          "'a photo of a [filewords]'")
    return lines


def create_text(lines: list[str], filewords: str, name: str, rng: random.Random, shuffle_tags: bool = False,
                tag_drop_out: float = 0.0) -> str:
    """A1111 ``PersonalizedBase.create_text``: a random template line; the caption split on ``,``
    (tags kept as written), tags dropped with ``tag_drop_out`` and shuffled if asked, joined with
    ``,`` into ``[filewords]``; ``[name]`` becomes the hypernetwork's name."""
    text = rng.choice(lines)
    tags = filewords.split(",")
    if tag_drop_out != 0:
        tags = [t for t in tags if rng.random() > tag_drop_out]
    if shuffle_tags:
        rng.shuffle(tags)
    return text.replace("[filewords]", ",".join(tags)).replace("[name]", name)


def filename_caption(path: Path) -> str:
    """A1111's caption for an image without a ``.txt``: the file stem minus leading numbers/dashes."""
    return _NUMBERS_AT_START.sub("", path.stem)


def folder_dataset(folder: str | Path, resolution: int, batch_size: int) -> list[DatasetSpec]:
    """A1111's dataset directory (images + same-stem ``.txt``) as one nbkit dataset. A1111 squashes
    every image to the training size; nbkit puts it in a kohya aspect-ratio bucket instead."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"train_data_dir '{folder}' is not a folder: fix the path")
    subset = SubsetSpec(image_dir=folder, caption_extension=".txt", class_tokens=_FILENAME_CAPTION)
    # kohya's 256..1024 buckets at 512 px; scaled down for small test resolutions (at least 64).
    low, high = max(64, min(256, resolution // 128 * 64)), max(1024, 2 * resolution)
    return [DatasetSpec(resolution=(resolution, resolution), batch_size=batch_size, enable_bucket=True,
                        min_bucket_reso=low, max_bucket_reso=high, subsets=[subset])]


def fill_filename_captions(items: list[Item]) -> None:
    """Give images of a ``train_data_dir`` without a caption file A1111's file-name caption."""
    for item in items:
        if item.caption == _FILENAME_CAPTION:
            item.caption = filename_caption(item.image)


class TemplateCaptions:
    """Training prompts per item. kohya's subset caption options run first (prefix, keep_tokens,
    ...), then A1111's template. As in A1111, without tag shuffling/dropout each image gets one
    template line, chosen once; with them, a new prompt every step."""

    def __init__(self, items: list[Item], lines: list[str], name: str, shuffle_tags: bool, tag_drop_out: float,
                 rng: random.Random) -> None:
        self.items, self.lines, self.name = items, lines, name
        self.shuffle_tags, self.tag_drop_out = shuffle_tags, tag_drop_out
        kohya_changing = any(getattr(it.subset, option) for it in items for option in _CHANGING)
        self.per_step = shuffle_tags or tag_drop_out > 0 or kohya_changing
        self.fixed = None if self.per_step else [self._make(i, rng, CaptionState()) for i in range(len(items))]

    def _make(self, index: int, rng: random.Random, state: CaptionState) -> str:
        item = self.items[index]
        filewords = process_caption(item.caption, caption_options(item.subset), rng, state)
        return create_text(self.lines, filewords, self.name, rng, self.shuffle_tags, self.tag_drop_out)

    def batch(self, batch: list[tuple[int, bool]], rng: random.Random, state: CaptionState) -> list[str]:
        if self.fixed is not None:
            return [self.fixed[index] for index, _ in batch]
        return [self._make(index, rng, state) for index, _ in batch]


# ---------------------------------------------------------------- latents


class DistributionCache(LatentCache):
    """Caches the VAE posterior (mean and std, scaled) instead of one sample, for A1111's
    ``deterministic`` (the mean) and ``random`` (a new sample every step) methods."""

    def encode(self, pixels: torch.Tensor, keys) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1) * self.vae.config.scaling_factor

    def disk_key(self, key) -> str:
        return super().disk_key(key) + "-dist"  # never confused with a cached sample


def make_latent_cache(method: str, items: list[Item], vae, device, disk_dir: str | Path | None,
                      workers: int = 0) -> LatentCache:
    """``once``: nbkit's cache (one seeded posterior sample per image); otherwise a :class:`DistributionCache`."""
    if method == "once":
        return LatentCache(items, vae, device, disk_dir, workers=workers)
    if method in ("deterministic", "random"):
        return DistributionCache(items, vae, device, disk_dir, workers=workers)
    raise ConfigError(f"latent_sampling_method={method!r}: use once, deterministic or random")


def cache_hypernetwork_latents(config, items: list[Item], vae, device) -> SampledLatents:
    """Encode every cacheable image once (``cache_latents``; on disk too with ``cache_latents_to_disk``)
    and serve latents by ``latent_sampling_method``; the VAE leaves the GPU when nothing needs it."""
    disk_dir = config.latent_cache_dir or str(Path(config.output_dir) / "latent_cache")
    cache = make_latent_cache(config.latent_sampling_method, items, vae, device,
                              disk_dir if config.cache_latents_to_disk else None, config.max_data_loader_n_workers)
    if config.cache_latents:
        cache.fill()
        if all(cacheable(it) for it in items):
            vae.to("cpu")
    return SampledLatents(cache, config.latent_sampling_method)


class SampledLatents:
    """A latent cache whose ``batch`` gives training latents by A1111's sampling method."""

    def __init__(self, cache: LatentCache, method: str) -> None:
        self.cache, self.method = cache, method

    def batch(self, batch: list[tuple[int, bool]], rng) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents, mask = self.cache.batch(batch, rng)
        return sample_latents(latents, self.method), mask

    def for_validation(self) -> SampledLatents:
        """The same cache without random draws (``random`` validates on the posterior mean)."""
        return SampledLatents(self.cache, "deterministic" if self.method == "random" else self.method)


def sample_latents(latents: torch.Tensor, method: str) -> torch.Tensor:
    """The training latents of a batch from :func:`make_latent_cache`'s output."""
    if method == "once":
        return latents
    mean, std = latents.chunk(2, dim=1)
    if method == "deterministic":
        return mean
    return mean + std * torch.randn(mean.shape, dtype=mean.dtype).to(mean.device)


class CaptionEncoder:
    """Text conditioning for the prompts; fixed prompts are encoded once and kept on the CPU,
    so the text encoder can leave the GPU (A1111's "unload VAE and CLIP while training")."""

    def __init__(self, encode, captions: TemplateCaptions) -> None:
        self.encode = encode  # list[str] -> [batch, tokens, dim]
        self.cache: dict[str, torch.Tensor] = {}
        if captions.fixed is not None:
            with torch.no_grad():
                for text in dict.fromkeys(captions.fixed):
                    self.cache[text] = encode([text])[0].cpu()

    def __call__(self, texts: list[str], device) -> torch.Tensor:
        if all(t in self.cache for t in texts):
            return torch.stack([self.cache[t] for t in texts]).to(device)
        with torch.no_grad():
            return self.encode(texts)
