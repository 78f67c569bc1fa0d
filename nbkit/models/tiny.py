"""Tiny, seeded Stable Diffusion models built from code (no download).

They have the *shape* of the real architectures (same block types, same module names,
SD1 Conv2d ``proj_in``/``proj_out`` vs SD2 ``use_linear_projection``, quick_gelu CLIP vs
gelu OpenCLIP, epsilon vs v-prediction) at a few thousand parameters per block, so the real
training, export and loading code runs on a CPU in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.models.tokenizer import EOS, build_tiny_tokenizer

ARCHS = ("sd15", "sd21", "sd21-v")
TINY_RESOLUTION = 64  # pixels; latents are 8x8


@dataclass(frozen=True)
class TinySpec:
    arch: str
    te_hidden: int
    te_layers: int
    te_heads: int
    te_act: str
    pad_token: str
    linear_projection: bool
    head_dims: tuple[int, ...] | int
    prediction_type: str
    upcast_attention: bool


SPECS = {
    "sd15": TinySpec("sd15", 32, 4, 4, "quick_gelu", EOS, False, 4, "epsilon", False),
    # SD2: OpenCLIP-H style text encoder scaled down (gelu, "!" padding), linear projections.
    "sd21": TinySpec("sd21", 64, 4, 4, "gelu", "!", True, (2, 2, 4, 4), "epsilon", False),
    "sd21-v": TinySpec("sd21-v", 64, 4, 4, "gelu", "!", True, (2, 2, 4, 4), "v_prediction", True),
}


def _spec(arch: str) -> TinySpec:
    if arch not in SPECS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return SPECS[arch]


def build_tiny_components(arch: str = "sd15", seed: int = 0) -> dict:
    """Return ``unet, vae, text_encoder, tokenizer, scheduler`` for a tiny model of ``arch``."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = _spec(arch)
    tokenizer = build_tiny_tokenizer(pad_token=spec.pad_token)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=spec.te_hidden,
        attention_head_dim=spec.head_dims,
        norm_num_groups=8,
        use_linear_projection=spec.linear_projection,
        upcast_attention=spec.upcast_attention,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    torch.manual_seed(seed + 2)
    te_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.te_hidden,
        intermediate_size=spec.te_hidden * 4,
        num_hidden_layers=spec.te_layers,
        num_attention_heads=spec.te_heads,
        max_position_embeddings=77,
        hidden_act=spec.te_act,
        projection_dim=spec.te_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(te_config)
    text_encoder.eval()
    sched_kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type=spec.prediction_type,
    )
    # The same scheduler classes the real SD1.5 / SD2.1 repos ship.
    if arch == "sd15":
        scheduler = PNDMScheduler(skip_prk_steps=True, **sched_kwargs)
    else:
        scheduler = DDIMScheduler(clip_sample=False, **sched_kwargs)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0):
    from diffusers import StableDiffusionPipeline

    parts = build_tiny_components(arch, seed)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def save_tokenizer_files(tokenizer, out_dir: Path) -> None:
    """Save a tokenizer folder that old (vocab.json/merges.txt) and new readers both load."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    model = json.loads((out_dir / "tokenizer.json").read_text())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")


def make_tiny_model(out: str | Path, arch: str = "sd15", seed: int = 0, single_file: bool = False) -> dict[str, Path]:
    """Write a complete diffusers folder (and optionally an original-layout single file).

    Returns the written paths: ``{"diffusers": folder, "single_file": file?}``.
    """
    from nbkit.formats.text_encoder_keys import canonicalize_text_encoder_files
    from nbkit.io import atomic_dir

    out = Path(out)
    pipe = build_tiny_pipeline(arch, seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        canonicalize_text_encoder_files(tmp)  # text_model.* names: transformers 4 and 5 both load them
        save_tokenizer_files(pipe.tokenizer, tmp / "tokenizer")
        (tmp / "nbkit_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    paths: dict[str, Path] = {"diffusers": out}
    if single_file:
        from nbkit.formats.ldm_checkpoint import save_pipeline_as_single_file

        target = out.with_suffix(".safetensors") if out.suffix == "" else out.parent / (out.name + ".safetensors")
        save_pipeline_as_single_file(pipe, target, arch=arch)
        paths["single_file"] = target
    return paths
