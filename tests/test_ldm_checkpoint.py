"""diffusers -> original (LDM) single-file conversion, and reading checkpoints back safely."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nbkit.formats.ldm_checkpoint import (
    CONFIG_METADATA_KEY,
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    UnsafeCheckpointError,
    read_safetensors_header,
    read_single_file,
    save_pipeline_as_single_file,
    text_encoder_to_ldm,
    unet_prefix_map,
    unet_to_ldm,
    vae_to_ldm,
)
from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS


def _meta_models(arch: str):
    """Real-size UNet / VAE / text encoder from a shipped config, on the meta device (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet, vae, te


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


# ----------------------------------------------------------------------------- key maps


def test_unet_map_matches_the_a1111_index_formulas():
    """SD1.5 (4 blocks x 2 layers): the table of interop-formats.md §1.3."""
    unet, _, _ = _meta_models("sd15")
    prefixes = unet_prefix_map(unet.config)
    for i in range(4):
        for j in range(2):
            assert prefixes[f"down_blocks.{i}.resnets.{j}."][0] == f"input_blocks.{1 + 3 * i + j}.0."
            assert prefixes[f"down_blocks.{i}.attentions.{j}."][0] == f"input_blocks.{1 + 3 * i + j}.1."
        for j in range(3):
            assert prefixes[f"up_blocks.{i}.resnets.{j}."][0] == f"output_blocks.{3 * i + j}.0."
        if i < 3:
            assert prefixes[f"down_blocks.{i}.downsamplers.0.conv."][0] == f"input_blocks.{3 + 3 * i}.0.op."
            assert prefixes[f"up_blocks.{i}.upsamplers.0."][0] == f"output_blocks.{2 + 3 * i}.{2 if i else 1}."
    assert prefixes["mid_block.attentions.0."][0] == "middle_block.1."
    assert prefixes["mid_block.resnets.1."][0] == "middle_block.2."
    assert "down_blocks.3.downsamplers.0.conv." not in prefixes


def test_unet_map_derives_indices_from_the_config():
    """3 blocks x 1 layer: indices follow the config, not SD1.5's 4x2."""
    config = {
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
    }
    prefixes = {k: v[0] for k, v in unet_prefix_map(config).items()}
    assert prefixes["down_blocks.0.resnets.0."] == "input_blocks.1.0."
    assert prefixes["down_blocks.0.downsamplers.0.conv."] == "input_blocks.2.0.op."
    assert prefixes["down_blocks.1.attentions.0."] == "input_blocks.3.1."
    assert prefixes["down_blocks.2.resnets.0."] == "input_blocks.5.0."
    assert prefixes["up_blocks.0.resnets.1."] == "output_blocks.1.0."
    assert prefixes["up_blocks.0.upsamplers.0."] == "output_blocks.1.1."
    assert prefixes["up_blocks.1.upsamplers.0."] == "output_blocks.3.2."
    assert prefixes["up_blocks.2.attentions.1."] == "output_blocks.5.1."


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sd21-v"])
def test_real_size_layout_is_what_diffusers_reads(arch):
    """Convert real-size (meta) models, then run diffusers' own LDM readers: every key and shape returns."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
        is_clip_model,
        is_open_clip_model,
    )

    unet, vae, te = _meta_models(arch)
    v2 = arch != "sd15"
    ckpt = unet_to_ldm(unet.state_dict(), unet.config)
    ckpt.update(vae_to_ldm(vae.state_dict(), vae.config))
    ckpt.update(text_encoder_to_ldm(te.state_dict(), v2=v2))

    assert infer_diffusers_model_type(ckpt) == ("v2" if v2 else "v1")
    assert is_open_clip_model(ckpt) == v2 and is_clip_model(ckpt) == (not v2)
    assert _shapes(convert_ldm_unet_checkpoint(ckpt, dict(unet.config))) == _shapes(unet.state_dict())
    assert _shapes(convert_ldm_vae_checkpoint(ckpt, dict(vae.config))) == _shapes(vae.state_dict())
    if v2:
        te_sd = convert_open_clip_checkpoint(te, ckpt)
        assert f"{SD2_TE_PREFIX}transformer.resblocks.23.attn.in_proj_weight" in ckpt  # 24 resblocks, like SD2
    else:
        te_sd = convert_ldm_clip_checkpoint(ckpt)
        te_sd.pop("text_model.embeddings.position_ids")
    assert _shapes({k.removeprefix("text_model."): v for k, v in te_sd.items()}) == _shapes(te.state_dict())


def test_unmappable_keys_are_refused():
    unet, _vae, _ = _meta_models("sd15")
    sd = dict(unet.state_dict())
    sd["class_embedding.linear_1.weight"] = torch.zeros(2, 2)
    with pytest.raises(KeyError, match="class_embedding"):
        unet_to_ldm(sd, unet.config)
    with pytest.raises(KeyError, match="OpenCLIP"):
        text_encoder_to_ldm({"encoder.layers.0.weird.weight": torch.zeros(1)}, v2=True)


# ----------------------------------------------------------------------------- tiny files


def test_sd1_file_layout(tiny_model_dirs):
    from diffusers.loaders.single_file_utils import (
        infer_diffusers_model_type,
        is_clip_model,
    )

    _folder, single = tiny_model_dirs("sd15")
    sd, meta = read_single_file(single)
    te_keys = [k for k in sd if k.startswith("cond_stage_model.")]
    assert te_keys and all(k.startswith(SD1_TE_PREFIX + "text_model.") for k in te_keys)
    ids = sd[SD1_TE_PREFIX + "text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(77)[None])
    assert is_clip_model(sd) and infer_diffusers_model_type(sd) == "v1"
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 4  # SD1: conv 1x1
    for part in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert sd[f"first_stage_model.{part}.mid.attn_1.{name}.weight"].dim() == 4
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in sd)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "epsilon"


@pytest.mark.parametrize("arch", ["sd21", "sd21-v"])
def test_sd2_file_layout(tiny_model_dirs, arch):
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import is_open_clip_model

    folder, single = tiny_model_dirs(arch)
    sd, meta = read_single_file(single)
    te = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).text_encoder.state_dict()
    hidden, layers = te["embeddings.token_embedding.weight"].shape[1], 4
    te_keys = [k for k in sd if k.startswith("cond_stage_model.")]
    assert te_keys and all(k.startswith(SD2_TE_PREFIX) for k in te_keys)
    assert is_open_clip_model(sd) and sd[SD2_TE_PREFIX + "token_embedding.weight"].shape[1] == hidden
    block = f"{SD2_TE_PREFIX}transformer.resblocks."
    assert sd[f"{block}0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    qkv = [te[f"encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"]
    assert torch.equal(sd[f"{block}1.attn.in_proj_weight"], torch.cat(qkv))
    assert torch.equal(sd[f"{block}1.mlp.c_fc.weight"], te["encoder.layers.1.mlp.fc1.weight"])
    blocks = {int(k[len(block) :].split(".")[0]) for k in te_keys if k.startswith(block)}
    assert blocks == set(range(layers + 1))  # the extra last resblock, copied from the last layer
    assert torch.equal(sd[f"{block}{layers}.ln_1.weight"], sd[f"{block}{layers - 1}.ln_1.weight"])
    assert sd[SD2_TE_PREFIX + "text_projection"].shape == (hidden, hidden)
    assert sd[SD2_TE_PREFIX + "positional_embedding"].shape == (77, hidden)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].dim() == 2  # use_linear_projection
    v = arch == "sd21-v"
    assert meta["modelspec.architecture"] == ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")
    assert meta["modelspec.prediction_type"] == ("v" if v else "epsilon")


def test_metadata_and_half(tmp_path, tiny_pipe):
    pipe = tiny_pipe("sd15")
    target = save_pipeline_as_single_file(pipe, tmp_path / "m.safetensors", "sd15", half=True, metadata={"x": "y"})
    shapes, meta = read_safetensors_header(target)
    assert shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] == (1, 77)
    assert meta["format"] == "pt" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "m" and meta["modelspec.resolution"] == "64x64" and meta["x"] == "y"
    payload = json.loads(meta[CONFIG_METADATA_KEY])
    assert {"model_index", "unet", "vae", "text_encoder", "scheduler", "tokenizer"} <= set(payload)
    assert payload["unet"]["block_out_channels"] == [32, 32, 64, 64]
    sd, _ = read_single_file(target)
    assert {t.dtype for k, t in sd.items() if not k.endswith("position_ids")} == {torch.float16}
    assert sd[SD1_TE_PREFIX + "text_model.embeddings.position_ids"].dtype == torch.int64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_resaving_a_loaded_pipeline_leaks_no_local_path(tmp_path, tiny_model_dirs):
    from diffusers import StableDiffusionPipeline

    folder, _ = tiny_model_dirs("sd21")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    target = save_pipeline_as_single_file(pipe, tmp_path / "again.safetensors", "sd21")
    _, meta = read_safetensors_header(target)
    assert str(folder) not in json.dumps(meta) and "_name_or_path" not in meta[CONFIG_METADATA_KEY]


def test_save_refuses_wrong_arch_and_suffix(tmp_path, tiny_pipe):
    with pytest.raises(ValueError, match="OpenAI CLIP"):
        save_pipeline_as_single_file(tiny_pipe("sd15"), tmp_path / "a.safetensors", "sd21")
    with pytest.raises(ValueError, match="prediction_type"):
        save_pipeline_as_single_file(tiny_pipe("sd21-v"), tmp_path / "a.safetensors", "sd21")
    with pytest.raises(ValueError, match="unknown arch"):
        save_pipeline_as_single_file(tiny_pipe("sd15"), tmp_path / "a.safetensors", "sdxl")
    with pytest.raises(ValueError, match=r"\.safetensors only"):
        save_pipeline_as_single_file(tiny_pipe("sd15"), tmp_path / "a.ckpt", "sd15")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("zip_format", [True, False])
def test_weights_only_ckpt_is_read_and_unwrapped(tmp_path, tiny_model_dirs, zip_format):
    _, single = tiny_model_dirs("sd15")
    sd, _ = read_single_file(single)
    path = tmp_path / "model.ckpt"
    obj = {"state_dict": {"state_dict": sd}, "global_step": 875000, "epoch": 3}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    loaded, meta = read_single_file(path)
    assert meta == {"global_step": "875000", "epoch": "3"}
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


class NotAWeight:
    """A custom class pickled into a checkpoint: must be refused."""


@pytest.mark.parametrize("payload", [os.system, NotAWeight()], ids=["os.system", "custom-class"])
def test_pickle_with_code_is_refused(tmp_path, payload):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": payload}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_single_file(path)
    message = str(err.value)
    assert str(path) in message and "weights-only" in message and ".safetensors" in message
    assert isinstance(err.value, ValueError)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_single_file(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="broken.ckpt"):
        read_single_file(broken)
