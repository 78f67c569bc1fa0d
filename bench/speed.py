"""CPU training-step time of nbkit's LoRA, DreamBooth and hypernetwork loops against a plain
reference loop written here with the same model, data and settings, plus FLOPs per step.

    python bench/speed.py [--models tiny,mid] [--steps 40] [--rounds 2] [--threads 1] [--json out.json]

Models: the bundled tiny SD1.5-shaped model (64 px) and a mid-size one built here: the SD1.5 U-Net
layout (4 blocks, 2 layers, cross-attention in the first three) at a fifth of the channels
(64-256), a 4-layer 256-wide CLIP text encoder, 256 px images. Both loops start from identical
seeded weights, train on the same 12 captioned images (latents encoded once), fp32 (CPU), AdamW,
batch 2, no gradient checkpointing; LoRA trains U-Net and text-encoder LoRA (dim 8), DreamBooth the
whole U-Net with cached text, the hypernetwork [1, 2, 1] modules with a fixed prompt. Gradient
clipping follows each method's default (1.0 for LoRA and DreamBooth, off for hypernetworks).

Per-step times are the training thread's CPU time (``time.thread_time``: preemption by other
processes does not count). On a shared VM even CPU time drifts by tens of percent from one run to
the next, so the two loops are interleaved step by step: a hook runs one reference step after every
nbkit step (separate models, same thread), ``--rounds`` runs per method in a fresh subprocess, the
first quarter of each run dropped. Printed: the medians, their ratio, and the interquartile range of
the step-by-step ratios. FLOPs per step come
from ``torch.utils.flop_counter`` on one reference step; the implied T4 figure for SD1.5 at 512 px
uses ``nbkit.estimate.estimate_step_seconds`` (constants fitted on published T4 step times by
``bench/fit_estimator.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

METHODS = ("lora", "dreambooth", "hypernetwork")
# CPU time of the training thread: unlike wall time, it does not count the time other processes hold
# the (shared) cores. With one torch thread and no loader workers it is the step's whole compute time.
CLOCK = time.thread_time


@dataclass(frozen=True)
class ModelSpec:
    name: str
    resolution: int
    steps_scale: float  # fraction of --steps (the mid model is slower)


MODELS = {"tiny": ModelSpec("tiny", 64, 1.0), "mid": ModelSpec("mid", 256, 0.5)}


def build_pipeline(name: str, seed: int = 0):
    """A fresh pipeline (same seed, same weights every call) and its ModelInfo."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nbkit.models.load import ModelInfo
    from nbkit.models.tiny import build_tiny_components

    parts = build_tiny_components("sd15", seed)
    if name == "mid":
        tok = parts["tokenizer"]
        torch.manual_seed(seed + 10)
        parts["unet"] = UNet2DConditionModel(
            sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=2, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=256,
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
        torch.manual_seed(seed + 11)
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    info = ModelInfo(arch="sd15", v2=False, v_parameterization=False, source="diffusers", path=f"<{name}>", name=name)
    return pipe, info


def _hooks_base():
    from nbkit.train.hooks import TrainHooks

    return TrainHooks


class Interleaved(_hooks_base()):
    """nbkit hook that runs one reference step after every nbkit step and times both: the two loops
    alternate step by step in one thread, so a drifting machine slows both alike."""

    def __init__(self, reference) -> None:
        self.reference = reference
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self.mark = 0.0

    def on_train_start(self, total_steps, info):
        self.mark = CLOCK()

    def on_step(self, step, loss, lr):
        now = CLOCK()
        self.ours.append(now - self.mark)
        self.reference()
        self.mark = CLOCK()
        self.theirs.append(self.mark - now)


def configs(method: str, model: ModelSpec, root: Path, images: Path, steps: int):
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    common = dict(output_dir=str(root / f"out-{method}"), resolution=model.resolution, train_batch_size=2,
                  max_train_steps=steps, mixed_precision="no", gradient_checkpointing=False, optimizer_type="AdamW",
                  seed=1, cache_latents=True)
    if method == "lora":
        return LoRATrainConfig(**common, network_dim=8, network_alpha=4.0, learning_rate=1e-4, save_state=False)
    if method == "dreambooth":
        return DreamBoothTrainConfig(**common, learning_rate=1e-6, save_state=False, save_precision="fp16")
    return HypernetworkTrainConfig(**common, learning_rate="1e-5", template_file="none.txt",
                                   train_data_dir=str(images), save_optimizer_state=False)


def datasets_for(method: str, config, images: Path):
    from nbkit.networks.hypernetwork.cli import hypernetwork_datasets
    from nbkit.train.run_file import resolve_datasets

    if method == "hypernetwork":
        return hypernetwork_datasets(config, {}, images.parent)
    inline = {"datasets": [{"subsets": [{"image_dir": str(images), "num_repeats": 1, "caption_extension": ".txt",
                                         "class_tokens": "sks shape"}]}]}
    return resolve_datasets(config, inline, images.parent)


def run_nbkit(method: str, model: ModelSpec, root: Path, images: Path, steps: int, hooks) -> None:
    from nbkit.train.dreambooth import train_dreambooth
    from nbkit.train.hypernetwork import train_hypernetwork
    from nbkit.train.lora import train_lora

    pipe, info = build_pipeline(model.name)
    config = configs(method, model, root, images, steps)
    train = {"lora": train_lora, "dreambooth": train_dreambooth, "hypernetwork": train_hypernetwork}[method]
    train(config, datasets_for(method, config, images), hooks=hooks, pipeline=pipe, model_info=info, device="cpu")


def _data(pipe, images: Path, resolution: int):
    """The 12 images as latents (encoded once, fp32) and their captions."""
    import numpy as np
    from PIL import Image

    paths = sorted(images.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution)),
                                                      dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for p in paths])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    return latents, captions


def reference_step(method: str, model: ModelSpec, images: Path):
    """The same training written plainly (encode, noise, predict, MSE, backward, clip, step), as a
    function running one step."""
    from diffusers import DDPMScheduler

    from nbkit.networks.hypernetwork.apply import apply_hypernetwork, attention_modules
    from nbkit.networks.hypernetwork.module import Hypernetwork
    from nbkit.networks.lora import inject_lora, lora_parameters

    torch.manual_seed(1)
    pipe, _ = build_pipeline(model.name)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    latents, captions = _data(pipe, images, model.resolution)
    for m in (unet, te, pipe.vae):
        m.requires_grad_(False)
    if method == "lora":
        inject_lora(unet, te, network_dim=8, network_alpha=4.0)
        params, lr, clip = list(lora_parameters(unet)) + list(lora_parameters(te)), 1e-4, 1.0
    elif method == "dreambooth":
        unet.requires_grad_(True)
        params, lr, clip = list(unet.parameters()), 1e-6, 1.0
    else:
        sizes = sorted({a.to_k.in_features for _, a in attention_modules(unet)})
        hypernetwork = Hypernetwork("ref", sizes, [1, 2, 1])
        apply_hypernetwork(unet, hypernetwork, 1.0)
        params, lr, clip = list(hypernetwork.parameters()), 1e-5, 0.0

    def encode(texts):
        ids = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    cached = None
    if method != "lora":  # frozen text encoder and fixed captions: encoded once
        with torch.no_grad():
            cached = encode(["picture"] * 2 if method == "hypernetwork" else captions)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(params, lr=lr)
    unet.train()
    state = {"step": 0}

    def step() -> float:
        index = [(2 * state["step"]) % len(captions), (2 * state["step"] + 1) % len(captions)]
        state["step"] += 1
        x0 = latents[index]
        if cached is None:
            cond = encode([captions[i] for i in index])
        else:
            cond = cached if method == "hypernetwork" else cached[index]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def reference_flops(method: str, model: ModelSpec, images: Path) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    step = reference_step(method, model, images)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def paired_runs(method: str, model_name: str, steps: int, rounds: int, work: str) -> dict:
    """``rounds`` nbkit runs of ``steps`` steps, each nbkit step followed by a reference step (see
    :class:`Interleaved`); the first quarter of every run is warm-up."""
    model = MODELS[model_name]
    root = Path(work)
    images = root / model_name / "10_sks shape"
    ours, ref = [], []
    for i in range(rounds):
        hooks = Interleaved(reference_step(method, model, images))
        run_nbkit(method, model, root / model_name / f"run-{i}", images, steps, hooks)
        ours += hooks.ours[steps // 4:]
        ref += hooks.theirs[steps // 4:]
    ratios = [a / b for a, b in zip(ours, ref)]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"nbkit_s": statistics.median(ours), "reference_s": statistics.median(ref),
            "ratio": statistics.median(ours) / statistics.median(ref), "ratio_q1": q1, "ratio_q3": q3,
            "noise": (max(ref) - min(ref)) / statistics.median(ref), "pairs": len(ratios)}


def _subprocess_run(method: str, model: str, steps: int, rounds: int, work: Path, threads: int) -> dict:
    import subprocess

    cmd = [sys.executable, __file__, "--one", method, model, str(steps), str(rounds), str(work),
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(models: list[str], steps: int, rounds: int, threads: int) -> list[dict]:
    from nbkit.demo import make_sample_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="nbkit-speed-") as tmp:
        work = Path(tmp)
        for name in models:
            model = MODELS[name]
            n = max(8, int(steps * model.steps_scale))
            make_sample_dataset(work / name / "10_sks shape", size=model.resolution)  # shared by every run
            for method in METHODS:
                row = {"model": name, "method": method, "steps": n,
                       **_subprocess_run(method, name, n, rounds, work, threads),
                       "flops": reference_flops(method, model, work / name / "10_sks shape")}
                rows.append(row)
                print(f"{name:5} {method:12} nbkit {row['nbkit_s'] * 1e3:8.1f} ms  reference {row['reference_s'] * 1e3:8.1f} ms"
                      f"  ratio {row['ratio']:.3f} (pairs: {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f}, "
                      f"reference spread {row['noise']:.0%})  {row['flops'] / 1e9:8.2f} GFLOP/step", flush=True)
    return rows


def t4_rows() -> list[dict]:
    """SD1.5 at 512 px on a T4 (the estimator's FLOP count and step-time model)."""
    from nbkit.estimate import Setting, count_flops, estimate_step_seconds
    from nbkit.estimate.constants import UTILISATION_FP16

    settings = {"lora": Setting("lora", network_dim=32, train_text_encoder=True),
                "dreambooth": Setting("dreambooth", cache_text_encoder_outputs=True),
                "hypernetwork": Setting("hypernetwork", optimizer_type="AdamW", cache_text_encoder_outputs=True)}
    rows = []
    for method, setting in settings.items():
        seconds = estimate_step_seconds(setting, "T4")
        rows.append({"method": method, "flops": count_flops(setting), "t4_s": seconds,
                     "t4_its": 1 / seconds, "utilisation": UTILISATION_FP16})
        print(f"SD1.5 512 {method:12} batch 1, gradient checkpointing, fp16: {rows[-1]['flops'] / 1e12:.2f} TFLOP/step"
              f" -> T4 about {1 / seconds:.2f} it/s at {UTILISATION_FP16:.0%} of the fp16 peak", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (the mid model runs half)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", nargs=5, metavar=("METHOD", "MODEL", "STEPS", "ROUNDS", "WORKDIR"),
                        help=argparse.SUPPRESS)  # internal: the paired runs of one method, printed as JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        method, model, steps, rounds, work = args.one
        print(json.dumps(paired_runs(method, model, int(steps), int(rounds), work)))
        return 0
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32 on the CPU", flush=True)
    result = {"cpu": bench(args.models.split(","), args.steps, args.rounds, args.threads), "t4": t4_rows(),
              "threads": args.threads}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
