"""Reading training images and their captions. User files are only ever read, never changed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(ValueError):
    """Bad training data; the message names the file and the fix."""


class CaptionEncodingError(DatasetError):
    """A caption file that is not UTF-8."""


class ImageReadError(DatasetError):
    """An image file that cannot be decoded."""


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def flatten_to_rgb(im: Image.Image) -> Image.Image:
    """RGB with EXIF rotation applied: alpha onto white, CMYK/palette converted, 16-bit scaled to 8 bits."""
    im = ImageOps.exif_transpose(im)
    if im.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(im).astype(np.int64)
        shift = 8 if array.max(initial=0) > 255 else 0
        im = Image.fromarray(np.clip(array >> shift, 0, 255).astype(np.uint8), "L")
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB (see :func:`flatten_to_rgb`); unreadable files raise DatasetError."""
    try:
        with Image.open(path) as im:
            return flatten_to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot read this image ({err}): re-save it as PNG/JPEG or remove it") from None


FILTERS = {
    "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX, "box": Image.Resampling.BOX,
}  # fmt: skip


def resize(image: Image.Image, size: tuple[int, int], interpolation: str | None = None) -> Image.Image:
    """kohya's default: area (PIL BOX) when shrinking, Lanczos when enlarging."""
    if image.size == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if size[0] * size[1] < image.width * image.height else "lanczos"
    return image.resize(size, FILTERS[interpolation])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF rotation. The pixels are decoded once too, so a truncated file
    is found here, before training starts, and not in the middle of a run."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{path}: cannot read this image ({err}): re-save it as PNG/JPEG or remove it") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def open_alpha(path: Path) -> Image.Image:
    """The alpha channel (L mode; fully opaque when the image has none), EXIF-rotated."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            return im.convert("RGBA").getchannel("A")
        return Image.new("L", im.size, 255)


def read_caption(image: Path, extension: str, class_tokens: str | None) -> str:
    """kohya's rule: the same-stem caption file, else the subset's class tokens, else an error.
    Every non-empty line is kept (``enable_wildcard`` picks one; otherwise the first is used)."""
    caption_file = image.with_suffix(extension)
    if caption_file.is_file():
        try:
            text = caption_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CaptionEncodingError(
                f"{caption_file}: not UTF-8 text: re-save it as UTF-8 (`nbkit dataset check --fix_to DIR` does it)"
            ) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            return "\n".join(lines)
    if class_tokens:
        return class_tokens
    raise DatasetError(
        f"{image}: no caption file '{caption_file.name}' and the subset has no class_tokens: "
        f"write a caption file, set caption_extension to the one you use, or set class_tokens"
    )
