"""Tiny, seeded Stable Diffusion models built from code (no download).

They have the *shape* of the real architectures (same block types, same module names,
SD1 Conv2d ``proj_in``/``proj_out`` vs SD2 ``use_linear_projection``, quick_gelu CLIP vs
gelu OpenCLIP, epsilon vs v-prediction) at a few thousand parameters per block, so the real
training, export and loading code runs on a CPU in seconds.

The tiny SDXL has SDXL's parts: a CLIP-L-shaped ``CLIPTextModel`` and an OpenCLIP-bigG-shaped
``CLIPTextModelWithProjection`` (gelu, "!" padding, 10 layers so the ``resblocks.9`` key diffusers
detects SDXL by exists, a projection narrower than its width so a transposed ``text_projection``
cannot pass unnoticed), a U-Net with SDXL's block layout (no attention in the first level, more
transformer layers deeper down, linear projections) and ``text_time`` addition embeddings, the SDXL
VAE scaling factor and an Euler scheduler as the SDXL base repo ships.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nbkit.models.tokenizer import EOS, build_tiny_tokenizer

ARCHS = ("sd15", "sd21", "sd21-v", "sdxl")
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


# Tiny SDXL: (hidden, layers, heads) of the two text encoders, the bigG projection width and the
# size of one time-id embedding (SDXL: 768/12/12, 1280/32/20, 1280 and 256).
XL_TE1 = (32, 4, 4)
XL_TE2 = (64, 10, 4)
XL_PROJECTION = 48
XL_TIME_EMBED = 8


def _spec(arch: str) -> TinySpec:
    if arch == "sdxl":
        raise ValueError("sdxl has its own builder: build_tiny_sdxl_components")
    if arch not in SPECS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    return SPECS[arch]


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _clip_config(tokenizer, hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_components(arch: str = "sd15", seed: int = 0) -> dict:
    """Return ``unet, vae, text_encoder, tokenizer, scheduler`` for a tiny model of ``arch``
    (for ``sdxl`` also ``text_encoder_2`` and ``tokenizer_2``, see :func:`build_tiny_sdxl_components`)."""
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if arch == "sdxl":
        return build_tiny_sdxl_components(seed)
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
    vae = _tiny_vae(0.18215)
    torch.manual_seed(seed + 2)
    te_config = _clip_config(tokenizer, spec.te_hidden, spec.te_layers, spec.te_heads, spec.te_act)
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


def build_tiny_sdxl_components(seed: int = 0, v_pred: bool = False) -> dict:
    """``unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler`` of a tiny SDXL."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer(pad_token=EOS)
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")  # OpenCLIP pads with "!" (SDXL's tokenizer_2)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=XL_TE1[0] + XL_TE2[0],  # penultimate hidden states of both encoders, concatenated
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED,
        # 6 time ids (original size, crop top-left, target size) + the pooled, projected text embedding
        projection_class_embeddings_input_dim=6 * XL_TIME_EMBED + XL_PROJECTION,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(0.13025)
    vae.register_to_config(force_upcast=True)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, *XL_TE1, "quick_gelu")).eval()
    torch.manual_seed(seed + 3)
    te2_config = _clip_config(tokenizer_2, *XL_TE2, "gelu", projection=XL_PROJECTION)
    text_encoder_2 = CLIPTextModelWithProjection(te2_config).eval()
    scheduler = EulerDiscreteScheduler(  # the SDXL base repo's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="v_prediction" if v_pred else "epsilon",
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)  # fmt: skip


def build_tiny_pipeline(arch: str = "sd15", seed: int = 0, v_pred: bool = False):
    """A tiny ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for ``sdxl``; ``v_pred`` only there)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        parts = build_tiny_sdxl_components(seed, v_pred=v_pred)
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    if v_pred:
        raise ValueError(f"v_pred is for --arch sdxl; for a v-prediction SD2 model use arch 'sd21-v', not {arch!r}")
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


def make_tiny_model(
    out: str | Path, arch: str = "sd15", seed: int = 0, single_file: bool = False, v_pred: bool = False
) -> dict[str, Path]:
    """Write a complete diffusers folder (and optionally an original-layout single file: SGM layout for
    ``sdxl``, with the ``v_pred`` marker when ``v_pred``).

    Returns the written paths: ``{"diffusers": folder, "single_file": file?}``.
    """
    from nbkit.formats.text_encoder_keys import canonicalize_text_encoder_files
    from nbkit.io import atomic_dir

    out = Path(out)
    pipe = build_tiny_pipeline(arch, seed, v_pred=v_pred)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        canonicalize_text_encoder_files(tmp)  # text_model.* names: transformers 4 and 5 both load them
        save_tokenizer_files(pipe.tokenizer, tmp / "tokenizer")
        if arch == "sdxl":
            save_tokenizer_files(pipe.tokenizer_2, tmp / "tokenizer_2")
        about = {"arch": arch, "seed": seed} | ({"v_pred": v_pred} if arch == "sdxl" else {})
        (tmp / "nbkit_tiny.json").write_text(json.dumps(about))
    paths: dict[str, Path] = {"diffusers": out}
    if single_file:
        target = out.with_suffix(".safetensors") if out.suffix == "" else out.parent / (out.name + ".safetensors")
        if arch == "sdxl":
            from nbkit.formats.sgm_checkpoint import save_sdxl_pipeline_as_single_file

            save_sdxl_pipeline_as_single_file(pipe, target)
        else:
            from nbkit.formats.ldm_checkpoint import save_pipeline_as_single_file

            save_pipeline_as_single_file(pipe, target, arch=arch)
        paths["single_file"] = target
    return paths
