"""Simulated T4 memory of training steps (nbkit.estimate), on a CPU, without a GPU.

    python bench/vram.py --calibrate          # the published T4 rows: predicted vs published
    python bench/vram.py [--gpu T4] [--json out.json]   # the largest batch that fits, per method

``--calibrate`` prints one line per published row, ``<row> predicted=<GB> published=<GB>
error=<signed pct>%`` (GB = 10**9 bytes, the table's unit), first the three rows the constant is
fitted on, then the other rows of the same table (``check`` rows: not used for fitting), then the
refitted constant (``python bench/fit_estimator.py`` has the whole fit, speed included). The default run finds, for SD1.5 at 512 and 768 px on the chosen GPU with 1 GiB
headroom, the largest batch of LoRA (dim 32; text encoder trained / frozen), DreamBooth (gradient
checkpointing on / off) and hypernetwork, and SDXL LoRA at 1024 px with batch 1. A simulation of
SD1.5 takes a few seconds, SDXL about half a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nbkit.estimate import Setting, estimate, largest_batch
from nbkit.estimate.constants import CONTEXT_BYTES
from nbkit.estimate.fit import gpu_memory
from nbkit.estimate.fit_constants import fit_context, published_rows

GIB = 2**30


def calibrate() -> list[dict]:
    rows = []
    table = published_rows()
    for row in sorted(table, key=lambda r: not r.memory_fit):  # the fitted rows first
        predicted = estimate(row.setting).peak_gb
        error = (predicted / row.published.gb - 1) * 100
        kind = "fit" if row.memory_fit else "check"
        rows.append({"row": row.name, "predicted_gb": predicted, "published_gb": row.published.gb, "error_pct": error,
                     "kind": kind})
        print(f"{row.name} predicted={predicted:.2f} published={row.published.gb:.2f} error={error:+.1f}%"
              + ("" if row.memory_fit else "  (check row, not fitted)"), flush=True)
    refit = fit_context(table)
    print(f"# constant (CUDA context + workspaces): shipped {CONTEXT_BYTES / 1e9:.3f} GB, refitted {refit / 1e9:.3f} GB; "
          "GB = 10**9 bytes", flush=True)
    return rows


def cases() -> list[tuple[str, Setting, int]]:
    """(label, setting, max batch) for the largest-batch table."""
    out = []
    for res in (512, 768):
        lora = Setting("lora", "sd15", res, network_dim=32)
        db = Setting("dreambooth", "sd15", res, cache_text_encoder_outputs=True)
        out += [
            (f"SD1.5 {res} LoRA dim 32, text encoder trained", lora.replace(train_text_encoder=True), 64),
            (f"SD1.5 {res} LoRA dim 32, text encoder frozen", lora, 64),
            (f"SD1.5 {res} DreamBooth, gradient checkpointing on", db, 64),
            (f"SD1.5 {res} DreamBooth, gradient checkpointing off", db.replace(gradient_checkpointing=False), 16),
            (f"SD1.5 {res} hypernetwork (AdamW)", Setting("hypernetwork", "sd15", res, optimizer_type="AdamW",
                                                           cache_text_encoder_outputs=True), 64),
        ]
    return out


def largest_batches(gpu: str, headroom: float) -> list[dict]:
    rows = []
    print(f"largest batch that fits {gpu} ({gpu_memory(gpu):.1f} GiB) with {headroom:.1f} GiB headroom "
          "(fp16 autocast, AdamW8bit unless noted, cached latents, SDPA):", flush=True)
    for label, setting, cap in cases():
        started = time.perf_counter()
        batch, found = largest_batch(setting, gpu, headroom, cap)
        over = estimate(setting.replace(train_batch_size=batch + 1)) if 0 < batch < cap else None
        rows.append({"case": label, "largest_batch": batch, "peak_gib": found.peak_gib, "capped": batch == cap,
                     "next_peak_gib": over.peak_gib if over else None})
        more = f", batch {batch + 1}: {over.peak_gib:.2f} GiB" if over else (" (search cap)" if batch == cap else "")
        print(f"  {label:<52} batch {batch:>2}  peak {found.peak_gib:5.2f} GiB{more}  "
              f"[{time.perf_counter() - started:.0f} s]", flush=True)
    sdxl = Setting("lora", "sdxl", 1024, network_dim=32, cache_text_encoder_outputs=True)
    for label, setting in (("SDXL 1024 LoRA dim 32, batch 1, text encoders cached", sdxl),
                           ("SDXL 1024 LoRA dim 32, batch 1, text encoders frozen on GPU",
                            sdxl.replace(cache_text_encoder_outputs=False))):
        found = estimate(setting)
        fits = found.fits(gpu_memory(gpu), headroom)
        rows.append({"case": label, "largest_batch": 1 if fits else 0, "peak_gib": found.peak_gib, "capped": True,
                     "next_peak_gib": None})
        print(f"  {label:<52} {'fits' if fits else 'does not fit'}: peak {found.peak_gib:5.2f} GiB", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true", help="only the published rows")
    parser.add_argument("--gpu", default="T4")
    parser.add_argument("--headroom", type=float, default=1.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    result = {"calibration": calibrate()}
    if not args.calibrate:
        result["largest_batch"] = largest_batches(args.gpu, args.headroom)
        print(estimate(Setting("dreambooth", "sd15", 512, cache_text_encoder_outputs=True)).summary())
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": args.gpu, "headroom_gib": args.headroom, **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
