"""Preview images on disk and side by side: PNGs with A1111's parameters text, and labelled grids."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: str | Path, *, parameters: str | None = None) -> Path:
    """Write ``image`` as PNG atomically (temp file + rename); ``parameters`` goes into the text chunk
    A1111's PNG Info tab reads."""
    from nbkit.io import atomic_path

    info = None
    if parameters:
        info = PngInfo()
        info.add_text("parameters", parameters)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def sample_grid(images: Sequence[Image.Image | None], cols: int, *, cell: int | None = None,
                row_labels: Sequence[str] | None = None, label_width: int = 70,
                background: str = "white") -> Image.Image:
    """Images in a grid, ``cols`` per row, left to right then top to bottom. ``None`` leaves a cell
    empty. Cells are ``cell`` pixels square (images resized, nearest neighbour, so tiny samples stay
    crisp) or, without ``cell``, as large as the largest image (images centred, not resized).
    ``row_labels`` (one per row) are written in a left margin ``label_width`` wide."""
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    present = [im for im in images if im is not None]
    if not present:
        raise ValueError("sample_grid needs at least one image")
    rows = math.ceil(len(images) / cols)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    cw, ch = (cell, cell) if cell else (max(im.width for im in present), max(im.height for im in present))
    margin = label_width if row_labels is not None else 0
    grid = Image.new("RGB", (margin + cols * cw, rows * ch), background)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        if image is None:
            continue
        image = image.convert("RGB")
        if cell:
            image = image.resize((cell, cell), Image.Resampling.NEAREST)
        grid.paste(image, (margin + c * cw + (cw - image.width) // 2, r * ch + (ch - image.height) // 2))
    for r, label in enumerate(row_labels or ()):
        draw.text((4, r * ch + ch // 2 - 6), label, fill="black")
    return grid
