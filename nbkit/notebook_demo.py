"""What the notebooks' demo mode needs, built once: the tiny base model, a drawn sample dataset with
one near-duplicate, and the tiny WD14/BLIP taggers (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_FOLDER = "_nbkit_demo"  # next to the demo projects; not a valid project name, so never one


def draw_demo_dataset(folder: Path, size: int = 64) -> Path:
    """12 captioned shapes (3 shapes x 4 colours) of varied size and place, so no two look alike to
    the duplicate finder, plus one re-saved JPEG copy that it should find."""
    from PIL import Image, ImageDraw

    from nbkit.demo import BACKGROUNDS, COLORS, SHAPES, TRIGGER

    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = list(BACKGROUNDS.items())
    combos = [(shape, color) for shape in SHAPES for color in COLORS]
    for index, (shape, color) in enumerate(combos):
        bg_name, bg = backgrounds[index % len(backgrounds)]
        side = size * (22 + (index * 7) % 24) // 64
        x, y = (index * 13) % (size - side), (index * 29) % (size - side)
        image = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(image)
        if shape == "circle":
            draw.ellipse((x, y, x + side, y + side), fill=COLORS[color])
        elif shape == "square":
            draw.rectangle((x, y, x + side, y + side), fill=COLORS[color])
        else:
            draw.polygon([(x + side // 2, y), (x + side, y + side), (x, y + side)], fill=COLORS[color])
        stem = f"{index:02d}_{color}_{shape}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"{TRIGGER}, a {color} {shape} on a {bg_name} background\n", encoding="utf-8")
        if index == 0:  # a re-saved copy, for the duplicate finder to find
            image.save(folder / "12_red_circle_copy.jpg", quality=90)
            (folder / "12_red_circle_copy.txt").write_text((folder / f"{stem}.txt").read_text(), encoding="utf-8")
    return folder


def ensure_demo_material(root: Path) -> dict[str, Path]:
    """The tiny base model (a diffusers folder), a drawn sample dataset with one
    near-duplicate, and the tiny WD14/BLIP taggers, under ``root/_nbkit_demo``; built once."""
    base = root / DEMO_FOLDER
    paths = {"model": base / "tiny-sd15", "samples": base / "samples" / "10_sks shapes", "wd14": base / "wd14-tiny", "blip": base / "blip-tiny"}
    if not (paths["model"] / "model_index.json").is_file():
        from nbkit.models.tiny import make_tiny_model

        make_tiny_model(paths["model"], arch="sd15", seed=0)
    if not (paths["samples"] / "11_yellow_triangle.txt").is_file():  # the last file written
        draw_demo_dataset(paths["samples"])
    if not (paths["wd14"] / "selected_tags.csv").is_file() and importlib.util.find_spec("onnx") is not None:
        from nbkit.io import atomic_dir
        from nbkit.tag.tiny import write_demo_tagger

        with atomic_dir(paths["wd14"]) as tmp:
            write_demo_tagger(tmp)
    if not (paths["blip"] / "config.json").is_file():
        from nbkit.io import atomic_dir
        from nbkit.tag.tiny import make_tiny_blip

        with atomic_dir(paths["blip"]) as tmp:
            make_tiny_blip(tmp)
    return paths
