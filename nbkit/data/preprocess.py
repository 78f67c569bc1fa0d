"""Preprocessing as AUTOMATIC1111's "Preprocess images" tab did it (``modules/textual_inversion/preprocess.py``,
webui <= 1.6), written to a new folder; the source folder is only read.

- every image is scaled to cover ``width`` x ``height`` and centre-cropped (A1111 ``resize_image``
  mode 1, "crop and resize"), unless it is split or kept at its original size;
- *split oversized*: when the short/long side ratio (relative to the target's) is at most
  ``split_threshold`` (0.5), the short side is scaled to the target and :func:`split_pic` cuts
  ``ceil((h - to_h*overlap) / (to_h*(1-overlap)))`` overlapping crops (``overlap_ratio`` 0.2);
- *flip*: every output is also saved mirrored (``ImageOps.mirror``);
- outputs are named ``{index:05}-{subindex}-{stem}.png``, each with a copy of the image's caption
  (``{index:05}-{subindex}-{stem}.txt``), re-encoded as UTF-8.

Differences from A1111, on purpose: ``index`` counts images only (A1111 also counted the caption
files it skipped), transparency is flattened onto white (A1111's RGB conversion dropped it), and
unreadable files are listed rather than skipped silently.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from nbkit.config import help_
from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError
from nbkit.io import atomic_dir


@dataclass
class PreprocessOptions:
    """A1111's preprocessing settings (same names and defaults where A1111 has them)."""

    width: int = field(default=512, metadata=help_("Output width in pixels."))
    height: int = field(default=512, metadata=help_("Output height in pixels."))
    flip: bool = field(default=False, metadata=help_("Also save a mirrored copy of every output (A1111 'Create "
                                                     "flipped copies')."))
    split: bool = field(default=False, metadata=help_("Cut long images into overlapping crops instead of one centre "
                                                      "crop (A1111 'Split oversized images')."))
    split_threshold: float = field(default=0.5, metadata=help_("Split when the image's short/long ratio (relative "
                                                               "to the output's) is at most this (0-1).", "advanced"))
    overlap_ratio: float = field(default=0.2, metadata=help_("How much neighbouring split crops overlap (0-0.9).",
                                                             "advanced"))
    keep_original_size: bool = field(default=False, metadata=help_("Save images at their own size instead of "
                                                                   "cropping them (A1111 'Keep original size').",
                                                                   "advanced"))
    caption_action: str = field(default="copy", metadata=help_("Existing captions: copy them next to every output, "
                                                               "or ignore them.", "basic", ("copy", "ignore")))
    caption_extension: str = field(default=".txt", metadata=help_("Caption file extension to read and write.",
                                                                  "advanced"))


@dataclass
class PreprocessResult:
    out_dir: Path
    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.written)} images written to {self.out_dir}"]
        return "\n".join(lines + [f"skipped {p}: {why}" for p, why in self.skipped])


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111 ``images.resize_image(1, ...)``: scale to cover ``width`` x ``height``, paste centred."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def split_count(h: int, to_h: int, overlap_ratio: float) -> int:
    """A1111's number of crops along a side of length ``h`` (after scaling) for crops of ``to_h``."""
    return math.ceil((h - to_h * overlap_ratio) / (to_h * (1.0 - overlap_ratio)))


def split_pic(image: Image.Image, inverse_xy: bool, width: int, height: int,
              overlap_ratio: float) -> Iterator[Image.Image]:
    """A1111 ``split_pic``: scale the short side to the target, then overlapping crops along the long side."""
    if inverse_xy:
        from_w, from_h, to_w, to_h = image.height, image.width, height, width
    else:
        from_w, from_h, to_w, to_h = image.width, image.height, width, height
    h = from_h * to_w // from_w
    image = image.resize((h, to_w) if inverse_xy else (to_w, h), Image.Resampling.LANCZOS)
    count = split_count(h, to_h, overlap_ratio)
    y_step = (h - to_h) / (count - 1) if count > 1 else 0.0  # A1111 divides by zero when count == 1
    for i in range(count):
        y = int(y_step * i)
        yield image.crop((y, 0, y + to_h, to_w) if inverse_xy else (0, y, to_w, y + to_h))


def preprocess_image(image: Image.Image, options: PreprocessOptions) -> list[Image.Image]:
    """The outputs for one RGB image, in A1111's order (each output followed by its mirror)."""
    width, height = options.width, options.height
    threshold = max(0.0, min(1.0, options.split_threshold))
    overlap = max(0.0, min(0.9, options.overlap_ratio))
    if image.height > image.width:
        ratio, inverse_xy = (image.width * height) / (image.height * width), False
    else:
        ratio, inverse_xy = (image.height * width) / (image.width * height), True
    outputs: list[Image.Image] = []
    resize_default = True
    if options.split and ratio < 1.0 and ratio <= threshold:
        outputs += split_pic(image, inverse_xy, width, height, overlap)
        resize_default = False
    if options.keep_original_size:
        outputs.append(image)
        resize_default = False
    if resize_default:
        outputs.append(crop_and_resize(image, width, height))
    if options.flip:
        outputs = [im for out in outputs for im in (out, ImageOps.mirror(out))]
    return outputs


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _load(path: Path) -> Image.Image:
    from nbkit.data.image_checks import flatten_to_rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return flatten_to_rgb(im)


def preprocess_folder(src: str | Path, dst: str | Path, options: PreprocessOptions | None = None, *,
                      overwrite: bool = False, progress: bool = True) -> PreprocessResult:
    """Preprocess every image of ``src`` (not its subfolders) into the new folder ``dst``.

    ``dst`` appears only when complete; an existing non-empty ``dst`` is refused unless ``overwrite``.
    """
    from tqdm.auto import tqdm

    from nbkit.data.image_checks import read_text_tolerant

    options = options or PreprocessOptions()
    src, dst = Path(src).expanduser(), Path(dst).expanduser().absolute()
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder: pass the folder of images to preprocess")
    if dst.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(dst.resolve()):
        raise DatasetError(f"{dst}: overlaps the source folder {src}: write to a new, separate folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DatasetError(f"{dst}: not empty: choose a new folder, or pass overwrite=True (--overwrite) to replace it")
    images = sorted((p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                    key=_natural_key)
    result = PreprocessResult(dst)
    with atomic_dir(dst) as tmp:
        for index, path in enumerate(tqdm(images, desc="preprocess", unit="img", disable=not progress)):
            try:
                image = _load(path)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                result.skipped.append((path, f"cannot be read ({err}); run `nbkit dataset check` on the folder"))
                continue
            caption = ""
            caption_file = path.with_suffix(options.caption_extension)
            if options.caption_action == "copy" and caption_file.is_file():
                caption = read_text_tolerant(caption_file)[0].strip()
            for subindex, out in enumerate(preprocess_image(image, options)):
                base = f"{index:05}-{subindex}-{path.stem}"
                out.save(tmp / f"{base}.png", format="PNG")
                if caption:
                    (tmp / f"{base}{options.caption_extension}").write_text(caption, encoding="utf-8")
                result.written.append(dst / f"{base}.png")
    return result
