"""``nbkit demo``: the whole LoRA path on an embedded default, offline, on a CPU in minutes.

It builds the tiny seeded model, draws a small captioned dataset of coloured shapes, trains a
LoRA on it and writes the LoRA, a before/after preview grid (same prompts and seeds) and a
loss curve. With ``--model`` (a Hub id or a file) on a GPU the same steps train for real.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nbkit.config import save_toml
from nbkit.train.config import LoRATrainConfig
from nbkit.train.run_file import run_config_dict

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
TRIGGER = "sks"
PREVIEW_PROMPTS = (
    f"{TRIGGER}, a red circle on a white background",
    f"{TRIGGER}, a blue square on a black background",
    f"{TRIGGER}, a yellow triangle on a gray background",
)
PREVIEW_SEEDS = (1, 2, 3)


def draw_shape(shape: str, color: tuple, background: tuple, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    m = size // 5
    box = (m, m, size - m, size - m)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=color)
    return image


def make_sample_dataset(folder: str | Path, size: int = 64) -> Path:
    """12 images (3 shapes x 4 colours) with kohya-style ``.txt`` captions; returns the image folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = list(BACKGROUNDS.items())
    index = 0
    for shape in SHAPES:
        for color_name, color in COLORS.items():
            bg_name, bg = backgrounds[index % len(backgrounds)]
            stem = f"{index:02d}_{color_name}_{shape}"
            draw_shape(shape, color, bg, size).save(folder / f"{stem}.png")
            caption = f"{TRIGGER}, a {color_name} {shape} on a {bg_name} background"
            (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
            index += 1
    return folder


@dataclass
class DemoPlan:
    config: LoRATrainConfig
    preview_steps: int


def demo_plan(out: Path, model: str, on_gpu: bool, steps: int | None) -> DemoPlan:
    """Settings for the tiny CPU run, or real T4-friendly ones when a real model is given."""
    tiny = not model
    config = LoRATrainConfig(
        pretrained_model_name_or_path=model or str(out / "tiny-sd15"),
        output_dir=str(out / "output"),
        output_name="demo_lora",
        resolution=64 if tiny else 512,
        network_dim=4 if tiny else 16,
        network_alpha=4.0 if tiny else 8.0,
        learning_rate=1e-3 if tiny else 1e-4,
        train_batch_size=2,
        max_train_steps=steps or (60 if tiny else 400),
        optimizer_type="AdamW" if not on_gpu else "AdamW8bit",
        mixed_precision="fp16" if on_gpu else "no",
        gradient_checkpointing=on_gpu,
        seed=1234,
    )
    return DemoPlan(config=config, preview_steps=10 if tiny else 25)


@torch.no_grad()
def preview(pipeline, prompts, seeds, steps: int, size: int) -> list[Image.Image]:
    """Same prompts and seeds every time, so before/after differ only by the LoRA."""
    pipeline.unet.eval()
    pipeline.text_encoder.eval()
    pipeline.set_progress_bar_config(disable=True)
    device = pipeline.unet.device
    images = []
    for prompt, seed in zip(prompts, seeds):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            result = pipeline(prompt, num_inference_steps=steps, height=size, width=size, generator=generator)
        images.append(result.images[0])
    return images


def difference(a: Image.Image, b: Image.Image, gain: float = 8.0) -> Image.Image:
    """Amplified per-pixel difference, so small LoRA effects are visible."""
    from PIL import ImageChops

    return ImageChops.difference(a, b).point(lambda v: min(255, int(v * gain)))


def save_grid(rows: dict[str, list[Image.Image]], path: Path, cell: int = 128) -> Path:
    from nbkit.io import atomic_path

    labels, width = 70, cell * max(len(r) for r in rows.values())
    grid = Image.new("RGB", (labels + width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (labels + c * cell, r * cell))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def save_loss_curve(losses: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nbkit.io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1]) for i in range(len(losses))]
    ax.plot(steps, smooth, label=f"mean of last {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def run_demo(out: str | Path = "nbkit-demo", model: str = "", steps: int | None = None, quiet: bool = False,
             threads: int | None = None) -> dict[str, Path]:
    """``threads``: torch's CPU threads; by default $OMP_NUM_THREADS if set, else one per core that
    other processes leave free (:func:`nbkit.runtime.set_torch_threads`)."""
    from nbkit.models.load import load_pipeline
    from nbkit.models.tiny import make_tiny_model
    from nbkit.runtime import set_torch_threads
    from nbkit.train.hooks import ProgressHooks
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    started = time.time()
    out = Path(out).resolve()
    on_gpu = torch.cuda.is_available()
    plan = demo_plan(out, model, on_gpu, steps)
    config = plan.config
    say = (lambda *a: None) if quiet else print
    note = set_torch_threads(threads).note()
    if note:
        say(note)
    if not model:
        say(f"building the tiny seeded model in {out / 'tiny-sd15'}")
        make_tiny_model(out / "tiny-sd15", arch="sd15", seed=0)
    images = make_sample_dataset(out / "dataset" / "10_sks shapes", size=config.resolution)
    datasets_raw = {"datasets": [{"subsets": [{"image_dir": str(images), "num_repeats": 1, "caption_extension": ".txt"}]}]}
    run_file = save_toml(run_config_dict(config, datasets_raw), out / "demo_run.toml")
    say(f"sample dataset: {images} ({len(list(images.glob('*.png')))} images); run file: {run_file}")

    pipeline, info = load_pipeline(config.pretrained_model_name_or_path)
    device = "cuda" if on_gpu else "cpu"
    pipeline.to(device)
    before = preview(pipeline, PREVIEW_PROMPTS, PREVIEW_SEEDS, plan.preview_steps, config.resolution)
    datasets = resolve_datasets(config, datasets_raw, out)
    result = train_lora(config, datasets, hooks=None if quiet else ProgressHooks("LoRA"),
                        pipeline=pipeline, model_info=info, device=device)
    after = preview(result.pipeline, PREVIEW_PROMPTS, PREVIEW_SEEDS, plan.preview_steps, config.resolution)

    rows = {"before": before, "after": after, "|diff| x8": [difference(a, b) for a, b in zip(before, after)]}
    paths = {
        "lora": result.lora_path,
        "preview": save_grid(rows, out / "preview_grid.png"),
        "loss_curve": save_loss_curve(result.losses, out / "loss_curve.png"),
        "run_file": run_file,
    }
    for name, path in paths.items():
        say(f"{name}: {path}")
    if not model:
        say("note: the tiny model is random, so its images are noise; the grid shows what the LoRA changed")
    say(f"demo finished in {time.time() - started:.1f} s ({result.steps} steps, final loss {result.losses[-1]:.4f})")
    return paths
