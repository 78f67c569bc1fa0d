"""Side-by-side renders of several models (the merge notebook's comparison)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def compare_models(models: dict[str, str | Path], prompts: str | Path, resolution: int = 512, thumb: int = 192):
    """Render the same prompts (a kohya prompt file) with each model, one row per model, as a gallery.

    Models load one at a time (fp16 on a GPU) and are freed before the next, so three SD1.5
    checkpoints fit a free Colab's RAM and VRAM. Missing paths are skipped with a note."""
    import gc

    import torch

    from nbkit.data.gallery import make_grid
    from nbkit.models.load import load_pipeline
    from nbkit.train.sample_prompts import load_sample_prompts
    from nbkit.train.sampling import generate_samples

    items = load_sample_prompts(prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cells = []
    with tempfile.TemporaryDirectory(prefix="nbkit-compare-") as tmp:
        for label, path in models.items():
            if not Path(path).exists():
                print(f"{label}: {path} does not exist: skipped")
                continue
            pipeline, _ = load_pipeline(str(path), torch_dtype=torch.float16 if device == "cuda" else torch.float32)
            pipeline.to(device)
            results = generate_samples(pipeline, items, step=0, epoch=None, output_dir=tmp, output_name=label,
                                       default_size=resolution)
            cells += [(image, f"{label}: {p.prompt}") for p, image, _ in results]
            del pipeline
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return make_grid(cells, columns=len(items), thumb=thumb)
