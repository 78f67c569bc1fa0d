"""Reading training images and their captions. User files are only ever read, never changed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """Bad training data; the message names the file and the fix."""


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB: EXIF rotation applied, transparency composited onto white."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            return im.convert("RGB")
    except (OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: cannot read this image ({err}): re-save it as PNG/JPEG or remove it") from None


def resize_center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``size`` (w, h), then crop the centre."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_caption(image: Path, extension: str, class_tokens: str | None) -> str:
    """kohya's rule: the same-stem caption file, else the subset's class tokens, else an error."""
    caption_file = image.with_suffix(extension)
    if caption_file.is_file():
        try:
            text = caption_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DatasetError(f"{caption_file}: not UTF-8 text: re-save it as UTF-8") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return lines[0]
    if class_tokens:
        return class_tokens
    raise DatasetError(
        f"{image}: no caption file '{caption_file.name}' and the subset has no class_tokens: "
        f"write a caption file, set caption_extension to the one you use, or set class_tokens"
    )


@dataclass
class CaptionOptions:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_prefix: str | None = None
    caption_suffix: str | None = None


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """Prefix/suffix, then shuffle the comma-separated tags after the first ``keep_tokens``."""
    if options.caption_prefix:
        caption = options.caption_prefix + caption
    if options.caption_suffix:
        caption = caption + options.caption_suffix
    if options.shuffle_caption:
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[: options.keep_tokens], tags[options.keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption
