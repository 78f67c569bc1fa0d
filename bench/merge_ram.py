"""Peak RAM of a streamed checkpoint merge at real SD1.5 size (fp32, ~4.3 GB per model).

1. Builds SD1.5's original-layout key list (names, shapes) from the shipped config
   ``nbkit/models/configs/sd15`` on the meta device, through nbkit's diffusers -> LDM maps.
2. Writes two checkpoints A and B with random fp32 values using the streaming writer (one
   tensor in memory at a time, so writing them needs little RAM either).
3. Runs ``python -m nbkit merge checkpoints --method weighted_sum`` in a subprocess and samples
   its ``/proc/<pid>/status`` every 20 ms: ``RssAnon`` is the anonymous memory the merge really
   uses (memory-mapped input pages are page cache the kernel can drop), ``VmRSS`` includes them.
4. Spot-checks the output against the formula, prints the numbers, deletes the files
   (``--keep`` keeps them) and exits 1 if peak RssAnon is above ``--limit-gb`` (1.5).

Not part of pytest: ``python bench/merge_ram.py [--workdir DIR] [--keep] [--no-hash]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

GB = 1e9


def sd15_specs() -> dict:
    """Original-layout key -> TensorSpec of SD1.5 (UNet + VAE + CLIP text encoder with position_ids)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nbkit.formats.ldm_checkpoint import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from nbkit.merge.streaming import TensorSpec
    from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    sd = unet_to_ldm(unet.state_dict(), unet.config)
    sd.update(vae_to_ldm(vae.state_dict(), vae.config))
    sd.update(text_encoder_to_ldm(te.state_dict(), v2=False))
    return {k: TensorSpec.of(v) for k, v in sd.items()}


def random_tensor(key: str, spec, seed: int) -> torch.Tensor:
    """Deterministic random values per (key, seed); int64 position_ids as arange."""
    if not spec.dtype.is_floating_point:
        return torch.arange(spec.shape[-1], dtype=spec.dtype).expand(spec.shape).contiguous()
    gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16))
    return torch.randn(spec.shape, generator=gen, dtype=spec.dtype) * 0.05


def write_model(path: Path, specs: dict, seed: int) -> float:
    from nbkit.merge.streaming import stream_safetensors

    start = time.time()
    stream_safetensors(path, specs, lambda k: random_tensor(k, specs[k], seed), {"format": "pt"}, desc=path.name)
    return time.time() - start


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "VmRSS", "RssFile"):
                    out[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_merge(a: Path, b: Path, out: Path, no_hash: bool) -> dict:
    """Run the merge CLI in a subprocess; sample its memory until it exits."""
    cmd = [sys.executable, "-m", "nbkit", "merge", "checkpoints", "--a", str(a), "--b", str(b),
           "--method", "weighted_sum", "--multiplier", "0.3", "--out", str(out), "--quiet"]  # fmt: skip
    if no_hash:
        cmd.append("--no-hash")
    peak = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name, value in _status(proc.pid).items():
                peak[name] = max(peak[name], value)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"merge failed ({proc.returncode}):\n{stdout}\n{stderr}")
    return {**peak, "seconds": time.time() - start, "stdout": stdout.strip()}


def spot_check(a: Path, b: Path, out: Path, specs: dict) -> list[str]:
    """The largest tensors and a few others of the output equal (1 − M)·A + M·B exactly."""
    from safetensors import safe_open

    keys = sorted(specs, key=lambda k: -specs[k].nbytes)[:3] + [k for k in specs if k.endswith("out.2.bias")]
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb, safe_open(str(out), "pt") as fo:
        assert set(fo.keys()) == set(specs), "output keys differ from the inputs'"
        for key in keys:
            want = (0.7 * fa.get_tensor(key)) + (0.3 * fb.get_tensor(key))
            assert torch.equal(fo.get_tensor(key), want), key
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write the ~13 GB of files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--no-hash", action="store_true", help="skip sha256 of the inputs (faster)")
    parser.add_argument("--limit-gb", type=float, default=1.5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbkit-merge-ram-", dir=args.workdir))
    try:
        specs = sd15_specs()
        a, b, out = work / "a.safetensors", work / "b.safetensors", work / "merged.safetensors"
        t_a, t_b = write_model(a, specs, 1), write_model(b, specs, 2)
        writer_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        largest = max(specs.values(), key=lambda s: s.nbytes)
        peak = run_merge(a, b, out, args.no_hash)
        checked = spot_check(a, b, out, specs)
        print(f"SD1.5 layout: {len(specs)} tensors, largest {largest.shape} = {largest.nbytes / GB:.3f} GB")
        print(f"input A: {a.stat().st_size / GB:.2f} GB (written in {t_a:.0f} s), B: {b.stat().st_size / GB:.2f} GB "
              f"({t_b:.0f} s); writer process peak RSS {writer_peak / GB:.2f} GB")  # fmt: skip
        print(f"merged: {out.stat().st_size / GB:.2f} GB in {peak['seconds']:.0f} s ({peak['stdout']})")
        print(f"merge process peak RssAnon {peak['RssAnon'] / GB:.3f} GB, peak VmRSS {peak['VmRSS'] / GB:.3f} GB, "
              f"peak RssFile {peak['RssFile'] / GB:.3f} GB (limit {args.limit_gb} GB on RssAnon)")  # fmt: skip
        print(f"spot-checked against (1 - M)·A + M·B: {', '.join(checked)}")
        ok = peak["RssAnon"] <= args.limit_gb * GB
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
