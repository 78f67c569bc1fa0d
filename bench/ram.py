"""Peak RAM of loading a model and of merging two checkpoints: nbkit's way against the naive one.

    python bench/ram.py [--fp32] [--workdir DIR] [--keep] [--json out.json]

1. Builds SD1.5's original-layout key list (names, shapes) from the shipped config on the meta
   device and writes two full checkpoints A and B (UNet + VAE + text encoder) with random values,
   fp16 by default (2.1 GB each, the usual download; ``--fp32``: 4.3 GB each), one tensor in memory
   at a time.
2. Runs each job in a subprocess and samples ``/proc/<pid>/status`` every 20 ms. ``RssAnon`` is the
   memory the job really needs (memory-mapped file pages are page cache the kernel can drop);
   ``VmRSS`` includes those pages. A subprocess that only imports the same libraries gives the
   baseline.
   - merge, nbkit: ``nbkit merge checkpoints --method weighted_sum`` (streamed tensor by tensor);
   - merge, naive: ``safetensors.torch.load_file`` both models, combine every tensor, ``save_file``;
   - load, nbkit: ``nbkit.models.load.load_pipeline(A)`` (diffusers single-file loading: the
     model is built on the meta device and filled from the file), in fp32 (the trainers' default)
     and fp16 (``lowram``: fp16 weights from an fp16 file stay memory-mapped file pages);
   - load, naive: build the pipeline with random fp32 weights, read the whole file with
     ``load_file``, copy every tensor in (A1111's and early scripts' way); every loaded weight is
     then read once, as moving it to the GPU would.
3. Spot-checks the streamed merge against the formula and deletes the files (``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

GB = 1e9
IMPORTS = "import torch, diffusers, transformers, safetensors.torch; import nbkit.models.load"
NAIVE_MERGE = """
import sys, torch
from safetensors.torch import load_file, save_file
a, b, out = load_file(sys.argv[1]), load_file(sys.argv[2]), {}
for key, value in a.items():
    out[key] = (0.7 * value + 0.3 * b[key]).to(value.dtype) if value.is_floating_point() else value
save_file(out, sys.argv[3])
"""
NAIVE_LOAD = """
import sys, torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel
from nbkit.formats.ldm_checkpoint import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from nbkit.models.config_dirs import CONFIGS_ROOT
folder = CONFIGS_ROOT / "sd15"
unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
targets = {**unet_to_ldm(unet.state_dict(keep_vars=True), unet.config),
           **vae_to_ldm(vae.state_dict(keep_vars=True), vae.config), **text_encoder_to_ldm(te.state_dict(keep_vars=True), v2=False)}
state = load_file(sys.argv[1])
with torch.no_grad():
    for key, value in state.items():
        targets[key].copy_(value.reshape(targets[key].shape))
print(len(state))
"""
# After loading, every weight is read once (as moving it to the GPU would), so lazily mapped pages count.
TOUCH = "; print(sum(float(p.float().sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()))"
NBKIT_LOAD = "import sys; from nbkit.models.load import load_pipeline; pipe, _ = load_pipeline(sys.argv[1])" + TOUCH
NBKIT_LOAD_FP16 = ("import sys, torch; from nbkit.models.load import load_pipeline; "
                   "pipe, _ = load_pipeline(sys.argv[1], torch_dtype=torch.float16)" + TOUCH)


def sd15_specs(dtype: torch.dtype) -> dict:
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
    return {k: TensorSpec.of(v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


def random_tensor(key: str, spec, seed: int) -> torch.Tensor:
    """Deterministic random values per (key, seed); int64 position_ids as arange."""
    if not spec.dtype.is_floating_point:
        return torch.arange(spec.shape[-1], dtype=spec.dtype).expand(spec.shape).contiguous()
    gen = torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16))
    return (torch.randn(spec.shape, generator=gen) * 0.05).to(spec.dtype)


def write_model(path: Path, specs: dict, seed: int) -> None:
    from nbkit.merge.streaming import stream_safetensors

    stream_safetensors(path, specs, lambda k: random_tensor(k, specs[k], seed), {"format": "pt"}, desc=path.name)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "VmRSS"):
                    out[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``; sample its memory every 20 ms until it exits."""
    peak = {"RssAnon": 0, "VmRSS": 0}
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    return {"rss_anon_gb": peak["RssAnon"] / GB, "vm_rss_gb": peak["VmRSS"] / GB, "seconds": time.time() - start}


def spot_check(a: Path, b: Path, out: Path, specs: dict) -> None:
    """The largest tensors of the streamed output equal (1 - M)·A + M·B, computed as the merger does."""
    from safetensors import safe_open

    keys = sorted(specs, key=lambda k: -specs[k].nbytes)[:3]
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb, safe_open(str(out), "pt") as fo:
        assert set(fo.keys()) == set(specs), "output keys differ from the inputs'"
        for key in keys:
            want = (0.7 * fa.get_tensor(key).float() + 0.3 * fb.get_tensor(key).float()).to(specs[key].dtype)
            assert torch.allclose(fo.get_tensor(key).float(), want.float(), atol=1e-3), key


def jobs(a: Path, b: Path, work: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "baseline (imports only)": [py, "-c", IMPORTS],
        "merge, nbkit (streamed)": [py, "-m", "nbkit", "merge", "checkpoints", "--a", str(a), "--b", str(b),
                                    "--method", "weighted_sum", "--multiplier", "0.3", "--out",
                                    str(work / "merged.safetensors"), "--quiet", "--no-hash"],
        "merge, naive (whole models)": [py, "-c", NAIVE_MERGE, str(a), str(b), str(work / "naive.safetensors")],
        "load, nbkit (load_pipeline, fp32 weights)": [py, "-c", NBKIT_LOAD, str(a)],
        "load, nbkit (fp16 weights, as lowram)": [py, "-c", NBKIT_LOAD_FP16, str(a)],
        "load, naive (random init + whole file)": [py, "-c", NAIVE_LOAD, str(a)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", action="store_true", help="fp32 checkpoints (4.3 GB each) instead of fp16")
    parser.add_argument("--workdir", help="where to write the files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    dtype = torch.float32 if args.fp32 else torch.float16
    work = Path(tempfile.mkdtemp(prefix="nbkit-ram-", dir=args.workdir))
    try:
        specs = sd15_specs(dtype)
        a, b = work / "a.safetensors", work / "b.safetensors"
        write_model(a, specs, 1)
        write_model(b, specs, 2)
        size = a.stat().st_size / GB
        print(f"SD1.5 single files ({'fp32' if args.fp32 else 'fp16'}): {len(specs)} tensors, {size:.2f} GB each",
              flush=True)
        rows = []
        for name, cmd in jobs(a, b, work).items():
            result = measure(cmd)
            rows.append({"job": name, **result})
            print(f"  {name:<42} peak RssAnon {result['rss_anon_gb']:5.2f} GB  peak VmRSS {result['vm_rss_gb']:5.2f} GB"
                  f"  ({result['seconds']:.0f} s)", flush=True)
        spot_check(a, b, work / "merged.safetensors", specs)
        print("streamed merge spot-checked against (1 - M)·A + M·B")
        if args.json:
            Path(args.json).write_text(json.dumps({"file_gb": size, "dtype": str(dtype), "rows": rows}, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
