"""Peak RAM of loading a full-size fp16 SDXL single file with ``load_pipeline`` (CPU, offline).

    python bench/ram_sdxl.py [DIR] [--keep] [--compare-diffusers] [--json out.json]

1. Builds SDXL base's SGM key list (names, shapes) from the shipped config ``nbkit/models/configs/sdxl``
   on the meta device (no download, no memory) through ``nbkit.formats.sgm_checkpoint``, plus the extras
   real files carry (CLIP-L ``position_ids``, bigG ``logit_scale``), and writes it as an fp16
   ``.safetensors`` of zeros (~6.9 GB) under DIR (default /tmp), one tensor in memory at a time, after
   checking that DIR has the space. The file holds no ``nbkit.diffusers_config``, so the loader takes the
   shipped config, as for a file downloaded from Civitai.
2. Runs each job in a subprocess and samples its ``/proc/<pid>/status`` every 10 ms:
   - ``RssAnon`` (anonymous memory: heap, copies, converted tensors) is the number that matters. It is
     what the process cannot give back without swap, which Colab has none of, so it is what gets a
     runtime SIGKILLed. Its peak is the highest sample (a transient shorter than 10 ms can slip between
     samples; the largest single SDXL tensor is 0.13 GB, so the error is bounded by that).
   - ``VmRSS`` adds the memory-mapped file pages: page cache the kernel drops under pressure and reads
     again from the file. ``VmHWM``, printed by the child itself, is the kernel's own high-water mark of
     ``VmRSS`` (exact, but it mixes in those file pages, so it says nothing about the anonymous part).
   Jobs:
   - baseline: the same imports, nothing loaded;
   - load: ``load_pipeline(file, torch_dtype=torch.float16)``;
   - load + read: the same, then every weight read once (as moving it to the GPU does), so all of the
     file's pages are touched;
   - with ``--compare-diffusers``: ``StableDiffusionXLPipeline.from_single_file(file, config=<shipped
     folder>, torch_dtype=torch.float16)``, diffusers' own loader, for reference.
3. Prints the peaks next to the file size and deletes the file (``--keep`` keeps it).

GB = 10^9 bytes. The target is a loading peak well under 1.3 x the file size.
"""

from __future__ import annotations

import argparse
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
SELF_STATUS = "import re; s = open('/proc/self/status').read(); print('VmHWM', int(re.search(r'VmHWM:\\s+(\\d+)', s)[1]) * 1024)"
IMPORTS = "import torch, diffusers, transformers, safetensors; import nbkit.models.load; " + SELF_STATUS
LOAD = ("import sys, torch; from nbkit.models.load import load_pipeline; "
        "pipe, info = load_pipeline(sys.argv[1], torch_dtype=torch.float16); "
        "assert info.arch == 'sdxl' and info.config_source == 'shipped', info; ")  # fmt: skip
# Every weight read once, as moving it to the GPU would, so every mapped page is touched.
TOUCH = ("print(sum(float(p.float().sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) "
         "for p in m.parameters())); ")  # fmt: skip
DIFFUSERS = ("import sys, torch; from diffusers import StableDiffusionXLPipeline; "
             "from nbkit.models.config_dirs import shipped_config_dir; "
             "pipe = StableDiffusionXLPipeline.from_single_file(sys.argv[1], config=str(shipped_config_dir('sdxl')), "
             "torch_dtype=torch.float16, local_files_only=True); ")  # fmt: skip


def sdxl_specs() -> dict:
    """SGM key -> TensorSpec (fp16; position_ids int64) of SDXL base, from the shipped config on meta."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nbkit.formats.sgm_checkpoint import TE1_PREFIX, TE2_PREFIX, iter_sgm_tensors, key_pairs
    from nbkit.merge.streaming import TensorSpec
    from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS["sdxl"]
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    states = {name: module.state_dict() for name, module in modules.items()}
    pairs = key_pairs({name: list(state) for name, state in states.items()}, modules["unet"].config, modules["vae"].config)
    specs = {key: TensorSpec(torch.float16, tuple(t.shape)) for key, t in iter_sgm_tensors(pairs, states)}
    specs[TE1_PREFIX + "text_model.embeddings.position_ids"] = TensorSpec(torch.int64, (1, 77))
    specs[TE2_PREFIX + "logit_scale"] = TensorSpec(torch.float16, ())
    return specs


def write_zeros(path: Path, specs: dict) -> None:
    from nbkit.merge.streaming import stream_safetensors

    def zeros(key: str) -> torch.Tensor:
        spec = specs[key]
        if spec.dtype == torch.int64:
            return torch.arange(spec.shape[-1], dtype=torch.int64).unsqueeze(0)
        return torch.zeros(spec.shape, dtype=spec.dtype)

    stream_safetensors(path, specs, zeros, {"format": "pt"}, desc=path.name)


def measure(cmd: list[str], cache: Path) -> dict:
    """Run ``cmd``; sample its RssAnon and VmRSS every 10 ms until it exits."""
    peak = {"RssAnon": 0, "VmRSS": 0}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "NBKIT_CACHE_DIR": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}  # fmt: skip
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        name, _, value = line.partition(":")
                        if name in peak:
                            peak[name] = max(peak[name], int(value.split()[0]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    hwm = next((int(line.split()[1]) for line in stdout.splitlines() if line.startswith("VmHWM")), 0)
    return {"rss_anon_gb": peak["RssAnon"] / GB, "vm_rss_gb": peak["VmRSS"] / GB, "vm_hwm_gb": hwm / GB,
            "seconds": time.time() - start}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default="/tmp", help="where to write the ~6.9 GB file (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--compare-diffusers", action="store_true", help="also measure diffusers' from_single_file")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    from nbkit.io import free_space, human_size
    from nbkit.merge.streaming import build_header

    specs = sdxl_specs()
    size = len(build_header(specs, {"format": "pt"})[0]) + sum(s.nbytes for s in specs.values())
    free = free_space(args.dir)
    if free is not None and free < size + 1e9:
        raise SystemExit(f"{args.dir}: {human_size(free)} free, the file needs {human_size(size)} (+1 GB spare); "
                         "pass a folder on a bigger disk")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="nbkit-ram-sdxl-", dir=args.dir))
    path = work / "sdxl-zeros-fp16.safetensors"
    try:
        started = time.time()
        write_zeros(path, specs)
        size = path.stat().st_size
        print(f"SDXL fp16 single file: {len(specs)} tensors, {size / GB:.2f} GB, written in {time.time() - started:.0f} s "
              f"({path})", flush=True)  # fmt: skip
        py, cache = sys.executable, work / "cache"
        jobs = {
            "baseline (imports only)": [py, "-c", IMPORTS],
            "load_pipeline, fp16": [py, "-c", LOAD + SELF_STATUS, str(path)],
            "load_pipeline, fp16, then every weight read": [py, "-c", LOAD + TOUCH + SELF_STATUS, str(path)],
        }
        if args.compare_diffusers:
            jobs["diffusers from_single_file, fp16 (reference)"] = [py, "-c", DIFFUSERS + SELF_STATUS, str(path)]
        rows = []
        for name, cmd in jobs.items():
            result = measure(cmd, cache)
            rows.append({"job": name, **result})
            print(f"  {name:<46} peak RssAnon {result['rss_anon_gb']:5.2f} GB ({result['rss_anon_gb'] * GB / size:4.2f} x "
                  f"file)  peak VmRSS {result['vm_rss_gb']:5.2f} GB  VmHWM {result['vm_hwm_gb']:5.2f} GB  "
                  f"({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        load = rows[1]["rss_anon_gb"] * GB
        print(f"file {size / GB:.2f} GB; loading peak RssAnon {load / GB:.2f} GB = {load / size:.2f} x the file "
              f"(target: well under 1.3 x)")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps({"file_gb": size / GB, "rows": rows}, indent=2))
        return 0
    finally:
        if args.keep:
            print(f"file kept: {path}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
