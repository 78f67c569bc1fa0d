"""A contact sheet of a dataset for the notebooks: thumbnails with their captions (and buckets).

:func:`dataset_gallery` returns a PIL image and, inside Jupyter/Colab, displays it. The items
come from the trainer's own :func:`~nbkit.data.train_data.collect_items` when the data allows, so
the caption and the bucket shown are the ones training uses; otherwise (bad files) the folders
are listed directly. :func:`make_grid` is the drawing helper, also used for duplicate groups.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.images import DatasetError, list_images
from nbkit.project import Project

BACKGROUND = (245, 245, 245)
TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans from matplotlib (accents, CJK-free captions), else Pillow's built-in font."""
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line ends with '...' when text is cut."""
    lines, line = [], ""
    for word in text.replace("\n", " ").split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 3)] + "..."
    return lines


def thumbnail(path: Path, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB tile of ``path`` (letterboxed); a grey tile saying why if unreadable."""
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.draft(im.mode, (size, size))  # JPEG: decode at reduced size
                from nbkit.data.image_checks import flatten_to_rgb

                image = ImageOps.contain(flatten_to_rgb(im), (size, size))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        ImageDraw.Draw(tile).text((6, size // 2 - 6), "unreadable", fill=(150, 0, 0), font=_font(12))
        return tile
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def make_grid(cells: Sequence[tuple[Path | Image.Image, str]], columns: int = 4, thumb: int = 192,
              label_lines: int = 4, font_size: int = 12) -> Image.Image:
    """Tiles in rows of ``columns``, each with up to ``label_lines`` lines of text under it."""
    font = _font(font_size)
    line_h = font_size + 3
    cell_w, cell_h = thumb + 8, thumb + 8 + label_lines * line_h + 4
    rows = max(1, -(-len(cells) // columns))
    sheet = Image.new("RGB", (cell_w * min(columns, max(1, len(cells))), cell_h * rows), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(cells):
        x, y = (index % columns) * cell_w + 4, (index // columns) * cell_h + 4
        tile = thumbnail(image, thumb) if isinstance(image, Path) else ImageOps.pad(image.convert("RGB"),
                                                                                   (thumb, thumb), color=BACKGROUND)
        sheet.paste(tile, (x, y))
        for n, line in enumerate(_wrap(label, font, thumb, label_lines)):
            draw.text((x, y + thumb + 3 + n * line_h), line, fill=TEXT, font=font)
    return sheet


def display_image(image: Image.Image) -> bool:
    """Show ``image`` in a Jupyter/Colab output cell; False outside a notebook kernel."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    display(image)
    return True


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return (0, 0)


def _label(path: Path, caption: str, bucket: tuple[int, int] | None) -> str:
    tag = f"[{bucket[0]}x{bucket[1]}] " if bucket else ""
    return f"{path.name} {tag}{caption}"


def _gallery_entries(datasets: list[DatasetSpec], bucket_fn) -> list[tuple[Path, str]]:
    """(image, label) pairs: from the trainer's items when possible, else straight from the folders."""
    from nbkit.data.check import trainer_items
    from nbkit.data.image_checks import read_text_tolerant

    try:
        items = trainer_items(datasets)
    except (DatasetError, OSError):
        items = None
    if items is not None:
        out = []
        for item in items:
            bucket = getattr(getattr(item, "bucket", None), "reso", None)
            if bucket is None and bucket_fn is not None:
                bucket = bucket_fn(*(getattr(item, "size", None) or _size(item.image)))
            out.append((item.image, _label(item.image, item.caption.splitlines()[0], bucket)))
        return out
    out = []  # the trainer would stop on some file: show the folders as they are
    for ds in datasets:
        for sub in ds.subsets:
            for image in list_images(sub.image_dir) if sub.image_dir.is_dir() else []:
                caption_file = image.with_suffix(sub.caption_extension)
                text = read_text_tolerant(caption_file)[0].strip() if caption_file.is_file() else ""
                bucket = bucket_fn(*_size(image)) if bucket_fn is not None else None
                out.append((image, _label(image, text or sub.class_tokens or "(no caption)", bucket)))
    return out


def dataset_gallery(
    source: Project | str | Path | list[DatasetSpec],
    *,
    limit: int = 48,
    columns: int = 4,
    thumb: int = 192,
    resolution: int | None = None,
    bucket_fn: Callable[[int, int], tuple[int, int]] | None = None,
    show: bool = True,
) -> Image.Image:
    """A grid of the first ``limit`` images with their captions, shown in the notebook when ``show``.

    ``source``: a project, a dataset TOML, a folder of images or resolved specs. Each label is the
    file name, the bucket ``[WxH]`` when bucketing is known (the trainer's items carry it; or pass
    ``bucket_fn(width, height) -> (w, h)``) and the caption as training reads it.
    """
    from nbkit.data.check import load_datasets

    datasets, _, _ = load_datasets(source, resolution)
    entries = _gallery_entries(datasets, bucket_fn)[:limit]
    if not entries:
        raise DatasetError(f"{source}: no images to show: import or add images first")
    sheet = make_grid(entries, columns=columns, thumb=thumb)
    if show:
        display_image(sheet)
    return sheet


def save_gallery(sheet: Image.Image, path: str | Path) -> Path:
    """Write a gallery sheet as PNG (atomically)."""
    from nbkit.io import atomic_path

    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
