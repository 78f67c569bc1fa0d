"""The base model of a run: load it (or reuse a loaded one), place it, pick the attention kernel,
swap in another VAE."""

from __future__ import annotations

from pathlib import Path

import torch

from nbkit.errors import ConfigError


def load_base(config, pipeline, model_info, weight_dtype, device):
    from nbkit.models.load import load_pipeline

    if pipeline is None:
        # lowram (kohya): the frozen weights never exist in fp32 in system RAM, and go to the GPU at once.
        dtype = weight_dtype if config.lowram else torch.float32
        pipeline, info = load_pipeline(config.pretrained_model_name_or_path, v2=config.v2,
                                       v_parameterization=config.v_parameterization, torch_dtype=dtype)
        if config.lowram:
            pipeline.unet.to(device)
            pipeline.text_encoder.to(device)
        return pipeline, info
    if model_info is None:
        raise ValueError("train_lora: pass model_info together with pipeline (both come from load_pipeline)")
    return pipeline, model_info


def place(models_and_dtypes, device) -> None:
    """Move each model to ``device`` in its dtype (a dtype in ``.to()`` makes diffusers warn even when
    nothing changes, so it is passed only when it does)."""
    for model, dtype in models_and_dtypes:
        if model.dtype == dtype:
            model.to(device)
        else:
            model.to(device, dtype=dtype)


def set_attention(config, unet) -> None:
    """kohya's xformers / sdpa switches (SDPA runs the memory-efficient kernel on a T4)."""
    if config.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # diffusers raises ModuleNotFoundError/ValueError without a working xformers
            raise ConfigError(f"xformers=true: {err}: pip install 'nbkit[xformers]', or use sdpa (as fast on a T4)") from None
    elif config.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def load_vae(path: str | Path, like):
    """kohya ``--vae``: a VAE from a single file (``.safetensors``/``.ckpt``/``.pt``, with or without
    the ``first_stage_model.`` prefix, e.g. vae-ft-mse-840000) or a diffusers folder (``vae/`` inside a
    model folder is found). ``like`` is the base model's VAE: the new one must have its shapes."""
    import tempfile

    from diffusers import AutoencoderKL

    from nbkit.formats.checkpoint_io import read_single_file

    path = Path(path).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() else None
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=sub, local_files_only=True)
    elif path.is_file():
        state, _ = read_single_file(path)
        with tempfile.TemporaryDirectory() as config_dir:
            like.save_config(config_dir)
            try:
                vae = AutoencoderKL.from_single_file(state, config=config_dir, local_files_only=True)
            except Exception as err:  # diffusers raises on missing keys / wrong shapes
                raise ConfigError(f"vae: {path} is not a VAE for this model ({err}): pass the model's VAE file") from None
    else:
        raise ConfigError(f"vae: {path} is not a file or folder: pass a VAE .safetensors/.pt file or a diffusers VAE folder")
    theirs, ours = vae.state_dict(), like.state_dict()
    bad = [k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(f"vae: {path} does not fit this model (e.g. {bad[0]}): pass a VAE of the same architecture")
    return vae.to(torch.float32)
