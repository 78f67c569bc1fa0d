"""SDXL models: the tiny builder, the SGM single-file layout, and load_pipeline from every source (CPU, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nbkit.config import ConfigError
from nbkit.formats.sgm_checkpoint import (
    TE1_PREFIX,
    TE2_PREFIX,
    V_PRED_KEY,
    ZTSNR_KEY,
    diffusers_to_sgm,
    iter_sgm_tensors,
    key_pairs,
    sdxl_pipeline_pairs,
    sdxl_pipeline_to_sgm,
    sgm_to_diffusers,
)
from nbkit.models import load_pipeline
from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS, shipped_config_dir

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", TE1_PREFIX + "text_model.", TE2_PREFIX)


@pytest.fixture(autouse=True)
def _nbkit_cache(tmp_path, monkeypatch):
    """Keep rebuilt config folders and downloads out of ~/.cache."""
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "nbkit-cache"))


@pytest.fixture(scope="module")
def sdxl_dirs(tmp_path_factory):
    """``{"eps" | "v": (diffusers folder, single file)}`` of the tiny SDXL, written once for this module."""
    from nbkit.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-sdxl")
    out = {}
    for name, v_pred in (("eps", False), ("v", True)):
        paths = make_tiny_model(root / f"tiny-sdxl-{name}", arch="sdxl", seed=0, single_file=True, v_pred=v_pred)
        out[name] = (paths["diffusers"], paths["single_file"])
    return out


def _file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        return {k: f.get_tensor(k) for k in keys}, f.metadata() or {}


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """Both text encoders, the U-Net with SDXL's added conditioning, and the VAE on seeded inputs."""
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])  # original size, crop top-left, target size
    latents = torch.randn(1, 4, 8, 8, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = pipe.tokenizer("a photo of a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids_2 = pipe.tokenizer_2("a photo of a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te1 = pipe.text_encoder(ids, output_hidden_states=True)
        te2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return {
            "text_encoder penultimate": te1.hidden_states[-2],
            "text_encoder_2 penultimate": te2.hidden_states[-2],
            "text_encoder_2 pooled projection": te2.text_embeds,
            "unet": unet(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample,
            "vae_encode": pipe.vae.encode(image).latent_dist.mean,
            "vae_decode": pipe.vae.decode(latents).sample,
        }


def _assert_same_outputs(a, b) -> None:
    out_a, out_b = _outputs(a), _outputs(b)
    for name in out_a:
        diff = (out_a[name] - out_b[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"


# ----------------------------------------------------------------------------- tiny model and single file


def test_tiny_sdxl_single_file_and_folder_load_to_identical_models(sdxl_dirs):
    from diffusers import StableDiffusionXLPipeline

    folder, single = sdxl_dirs["eps"]
    pipe_a, info_a = load_pipeline(str(folder))
    pipe_b, info_b = load_pipeline(str(single))
    assert isinstance(pipe_a, StableDiffusionXLPipeline) and isinstance(pipe_b, StableDiffusionXLPipeline)
    _assert_same_outputs(pipe_a, pipe_b)
    for info in (info_a, info_b):
        assert (info.arch, info.v2, info.v_parameterization, info.zero_terminal_snr) == ("sdxl", False, False, False)
    assert (info_a.source, info_b.source, info_b.config_source) == ("diffusers", "single_file", "embedded")
    for name in ("tokenizer", "tokenizer_2"):
        tok_a, tok_b = getattr(pipe_a, name), getattr(pipe_b, name)
        assert tok_b.get_vocab() == tok_a.get_vocab() and tok_b.pad_token == tok_a.pad_token
    assert (pipe_b.tokenizer.pad_token, pipe_b.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert type(pipe_b.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe_b.scheduler.config.prediction_type == "epsilon"
    for name in COMPONENTS:  # as from_pretrained returns them
        assert not getattr(pipe_b, name).training


def test_nbkit_reads_the_file_as_diffusers_does(sdxl_dirs):
    """diffusers' own SGM reader (from_single_file) gets the same weights: the file is standard SGM layout."""
    from diffusers import StableDiffusionXLPipeline

    folder, single = sdxl_dirs["eps"]
    ours, _ = load_pipeline(str(single))
    theirs = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in COMPONENTS:
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_fp16_load_of_an_fp32_file(sdxl_dirs):
    from diffusers import StableDiffusionXLPipeline

    folder, single = sdxl_dirs["eps"]
    pipe, _ = load_pipeline(str(single), torch_dtype=torch.float16)
    ref = StableDiffusionXLPipeline.from_pretrained(str(folder), dtype=torch.float16, local_files_only=True)
    for name in COMPONENTS:
        ours, theirs = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert {t.dtype for t in ours.values() if t.is_floating_point()} == {torch.float16}, name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_weights_only_ckpt_and_wrong_config_dir(sdxl_dirs, tmp_path, tiny_model_dirs):
    folder, single = sdxl_dirs["v"]
    tensors, _ = _file(single)
    ckpt = tmp_path / "noob.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1000}, ckpt)
    pipe, info = load_pipeline(str(ckpt), config_dir=str(folder))
    assert (info.arch, info.v_parameterization, info.metadata["global_step"]) == ("sdxl", True, "1000")
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])
    sd15_folder, _ = tiny_model_dirs("sd15")
    with pytest.raises(ConfigError, match=r"noob\.ckpt is an SDXL checkpoint, but the config_dir config .* no text_encoder_2"):
        load_pipeline(str(ckpt), config_dir=str(sd15_folder))


def test_tiny_sdxl_file_layout(sdxl_dirs):
    tensors, meta = _file(sdxl_dirs["eps"][1])
    assert all(k.startswith(PREFIXES) for k in tensors), [k for k in tensors if not k.startswith(PREFIXES)][:5]
    # OpenCLIP names for the bigG encoder (interop-formats.md §3.1), the keys diffusers detects SDXL by
    for key in ("transformer.resblocks.9.mlp.c_proj.bias", "transformer.resblocks.0.attn.in_proj_weight",
                "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.ln_1.weight",
                "positional_embedding", "token_embedding.weight", "ln_final.weight", "text_projection", "logit_scale"):
        assert TE2_PREFIX + key in tensors, key
    assert TE1_PREFIX + "text_model.embeddings.position_embedding.weight" in tensors
    assert "model.diffusion_model.label_emb.0.0.weight" in tensors  # add_embedding (time ids + pooled text)
    assert V_PRED_KEY not in tensors and ZTSNR_KEY not in tensors
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["modelspec.prediction_type"] == "epsilon"
    v_tensors, v_meta = _file(sdxl_dirs["v"][1])
    assert v_tensors[V_PRED_KEY].numel() == 0 and v_meta["modelspec.prediction_type"] == "v"


def test_make_tiny_model_cli(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from nbkit.cli import main

    assert main(["make-tiny-model", str(tmp_path / "xl"), "--arch", "sdxl", "--single-file", "--v-pred"]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "xl"), local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.addition_embed_type == "text_time"
    te2 = pipe.text_encoder_2.config
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + te2.hidden_size
    assert pipe.unet.config.projection_class_embeddings_input_dim == 6 * pipe.unet.config.addition_time_embed_dim + te2.projection_dim
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert V_PRED_KEY in keys


# ----------------------------------------------------------------------------- v-prediction


def _without_metadata(src: Path, dst: Path, *, drop=(), add=None) -> Path:
    tensors, _ = _file(src)
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
    save_file(tensors, str(dst))  # no modelspec, no embedded config: the keys alone tell
    return dst


def test_v_pred_key_means_v_prediction(sdxl_dirs, tmp_path):
    eps_folder = sdxl_dirs["eps"][0]  # its scheduler says epsilon: the file's key must win
    bare = _without_metadata(sdxl_dirs["v"][1], tmp_path / "noob-vpred.safetensors")
    pipe, info = load_pipeline(str(bare), config_dir=str(eps_folder))
    assert (info.arch, info.v_parameterization, info.zero_terminal_snr) == ("sdxl", True, False)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert any(V_PRED_KEY in note for note in info.notes)

    no_key = _without_metadata(sdxl_dirs["v"][1], tmp_path / "eps.safetensors", drop=(V_PRED_KEY,))
    pipe, info = load_pipeline(str(no_key), config_dir=str(eps_folder))
    assert info.v_parameterization is False and pipe.scheduler.config.prediction_type == "epsilon"

    ztsnr = _without_metadata(sdxl_dirs["v"][1], tmp_path / "ztsnr.safetensors", add={ZTSNR_KEY: torch.tensor([])})
    pipe, info = load_pipeline(str(ztsnr), config_dir=str(eps_folder))
    assert (info.v_parameterization, info.zero_terminal_snr) == (True, True)
    assert pipe.scheduler.config.rescale_betas_zero_snr is True
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.alphas_cumprod[-1].item() < 1e-6  # zero terminal SNR: the last step is pure noise


def test_prediction_overrides(sdxl_dirs):
    folder, single = sdxl_dirs["v"]
    for source in (folder, single):
        pipe, info = load_pipeline(str(source))
        assert info.v_parameterization is True and pipe.scheduler.config.prediction_type == "v_prediction"
        pipe, info = load_pipeline(str(source), v_parameterization=False, zero_terminal_snr=True)
        assert (info.v_parameterization, info.zero_terminal_snr) == (False, True)
        assert pipe.scheduler.config.prediction_type == "epsilon"
        assert pipe.scheduler.config.rescale_betas_zero_snr is True


# ----------------------------------------------------------------------------- SGM key conversion


def test_sgm_conversion_round_trips(sdxl_dirs):
    from nbkit.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl", seed=3)
    states = {name: getattr(pipe, name).state_dict() for name in COMPONENTS}
    pairs = sdxl_pipeline_pairs(pipe)
    sgm = dict(iter_sgm_tensors(pairs, states))
    assert len(sgm) == len(pairs)
    back: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    for pair in pairs:
        for key, value in zip(pair.keys, sgm_to_diffusers(pair, sgm[pair.file_key]), strict=True):
            assert key not in back[pair.component], key
            back[pair.component][key] = value
    for name in COMPONENTS:
        assert back[name].keys() == states[name].keys(), name
        assert all(torch.equal(back[name][k], states[name][k]) for k in states[name]), name
    # and the other way: each file tensor survives diffusers and back
    for pair in pairs:
        assert torch.equal(diffusers_to_sgm(pair, sgm_to_diffusers(pair, sgm[pair.file_key])), sgm[pair.file_key])
    assert sdxl_pipeline_to_sgm(pipe, extras=False).keys() == sgm.keys()


def test_openclip_tensors_follow_kohya_and_diffusers():
    """in_proj = cat(q, k, v) along dim 0 and text_projection transposed (kohya sdxl_model_util.py,
    diffusers convert_open_clip_checkpoint); VAE attention as 1x1 convs; add_embedding as label_emb.0."""
    from nbkit.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    sgm = sdxl_pipeline_to_sgm(pipe)
    te2 = pipe.text_encoder_2.state_dict()
    layer = "text_model.encoder.layers.3.self_attn."
    want = torch.cat([te2[layer + f"{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(sgm[TE2_PREFIX + "transformer.resblocks.3.attn.in_proj_weight"], want)
    assert torch.equal(sgm[TE2_PREFIX + "text_projection"], te2["text_projection.weight"].T)
    assert sgm[TE2_PREFIX + "text_projection"].shape == (64, 48)  # [width, projection], as OpenCLIP stores it
    vae = pipe.vae.state_dict()
    assert torch.equal(sgm["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0], vae["decoder.mid_block.attentions.0.to_q.weight"])
    unet = pipe.unet.state_dict()
    assert torch.equal(sgm["model.diffusion_model.label_emb.0.2.weight"], unet["add_embedding.linear_2.weight"])
    assert torch.equal(sgm["model.diffusion_model.output_blocks.2.2.conv.weight"], unet["up_blocks.0.upsamplers.0.conv.weight"])


def test_full_size_sdxl_key_map_matches_diffusers_reader():
    """Real SDXL base configs on the meta device: nbkit's file names and shapes, read back by diffusers'
    own converters, give exactly the modules' keys and shapes (2,515 tensors, as sd_xl_base_1.0 has)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nbkit.formats.sgm_checkpoint import sgm_extras
    from nbkit.formats.text_encoder_keys import canonical_text_encoder_keys

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS["sdxl"]
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    states = {name: m.state_dict() for name, m in modules.items()}
    pairs = key_pairs({n: list(s) for n, s in states.items()}, modules["unet"].config, modules["vae"].config)
    with torch.device("meta"):
        sgm = dict(iter_sgm_tensors(pairs, states))
        sgm.update({k: v.to("meta") for k, v in sgm_extras(sgm).items()})
    assert len(sgm) == 2515
    assert sgm[TE2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)

    def same(ours: dict, theirs: dict, what: str) -> None:
        assert ours.keys() == theirs.keys(), f"{what}: {sorted(set(ours) ^ set(theirs))[:5]}"
        assert all(ours[k].shape == theirs[k].shape for k in ours), what

    same(states["unet"], convert_ldm_unet_checkpoint(sgm, modules["unet"].config), "unet")
    same(states["vae"], {k: v.reshape(states["vae"][k].shape) for k, v in convert_ldm_vae_checkpoint(sgm, modules["vae"].config).items()}, "vae")
    te1 = convert_ldm_clip_checkpoint(sgm)  # strips conditioner.embedders.0.transformer.
    same(canonical_text_encoder_keys(states["text_encoder"]), {k: v for k, v in te1.items() if not k.endswith("position_ids")}, "te1")
    same(states["text_encoder_2"], convert_open_clip_checkpoint(modules["text_encoder_2"], sgm, prefix=TE2_PREFIX), "te2")


# ----------------------------------------------------------------------------- shipped config, other sources


def test_shipped_sdxl_config_is_the_real_model(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = shipped_config_dir("sdxl", tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert (count(unet), count(vae), count(te1), count(te2)) == (2_567_463_684, 83_653_863, 123_060_480, 694_659_840)
    for name, pad in (("tokenizer", ("<|endoftext|>", 49407)), ("tokenizer_2", ("!", 0))):
        tok = CLIPTokenizer.from_pretrained(folder / name)
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert (tok.pad_token, tok.pad_token_id) == pad


def test_shipped_config_mismatch_names_the_file(sdxl_dirs, tmp_path):
    bare = _without_metadata(sdxl_dirs["eps"][1], tmp_path / "my-sdxl.safetensors")
    with pytest.raises(ConfigError, match=r"my-sdxl\.safetensors does not fit the shipped config .*sdxl.*config_dir="):
        load_pipeline(str(bare))


def test_repo_id_from_offline_hf_cache(sdxl_dirs, tmp_path):
    folder, _ = sdxl_dirs["eps"]
    cache = tmp_path / "hf"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--nbkit-test--tiny-sdxl"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    pipe, info = load_pipeline("nbkit-test/tiny-sdxl", cache_dir=str(cache))
    assert (info.source, info.arch) == ("hub", "sdxl")
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])
    shutil.rmtree(repo / "snapshots" / sha / "text_encoder_2")  # an SD1/2-only download of an SDXL repo
    with pytest.raises(FileNotFoundError, match="SDXL model without text_encoder_2"):
        load_pipeline("nbkit-test/tiny-sdxl", cache_dir=str(cache))


def test_url_download(sdxl_dirs, tmp_path):
    from http_server import serve_files

    folder, single = sdxl_dirs["v"]
    with serve_files() as (server, base):
        server.files["/models/noob.safetensors"] = Path(single).read_bytes()
        pipe, info = load_pipeline(f"{base}/models/noob.safetensors", cache_dir=str(tmp_path / "c"))
    assert (info.source, info.arch, info.v_parameterization) == ("url", "sdxl", True)
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])


# ----------------------------------------------------------------------------- broken files


def test_broken_sdxl_files_are_refused_naming_the_file(sdxl_dirs, tmp_path):
    tensors, meta = _file(sdxl_dirs["eps"][1])
    data = Path(sdxl_dirs["eps"][1]).read_bytes()

    cut = tmp_path / "cut-short.safetensors"  # an interrupted download
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConfigError, match=r"cut-short\.safetensors: this file is damaged or incomplete"):
        load_pipeline(str(cut))

    no_te2 = tmp_path / "no-bigG.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith(TE2_PREFIX + "transformer.resblocks.9.")}, str(no_te2), meta)
    with pytest.raises(ConfigError, match=r"no-bigG\.safetensors does not fit .* missing, e\.g\. .*resblocks\.9\."):
        load_pipeline(str(no_te2))

    wrong = tmp_path / "wrong-shape.safetensors"
    key = "model.diffusion_model.label_emb.0.0.weight"
    save_file({**tensors, key: torch.zeros(tensors[key].shape[0], 7)}, str(wrong), meta)
    with pytest.raises(ConfigError, match=r"wrong-shape\.safetensors does not fit .*label_emb\.0\.0\.weight: file \(\d+, 7\)"):
        load_pipeline(str(wrong))

    refiner = tmp_path / "refiner.safetensors"
    renamed = {k.replace(TE2_PREFIX, "conditioner.embedders.0.model."): v for k, v in tensors.items() if not k.startswith(TE1_PREFIX)}
    save_file(renamed, str(refiner), meta)
    with pytest.raises(ConfigError, match=r"refiner\.safetensors: an SDXL refiner"):
        load_pipeline(str(refiner))

    inpaint = tmp_path / "inpaint.safetensors"
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    save_file({**tensors, conv: torch.zeros(tensors[conv].shape[0], 9, 3, 3)}, str(inpaint), meta)
    with pytest.raises(ConfigError, match=r"inpaint\.safetensors: an inpainting model"):
        load_pipeline(str(inpaint))


def test_embedded_config_is_used_over_the_shipped_one(sdxl_dirs):
    _, single = sdxl_dirs["eps"]
    _, meta = _file(single)
    payload = json.loads(meta["nbkit.diffusers_config"])
    assert {"text_encoder_2", "tokenizer_2"} <= payload.keys()
    assert payload["text_encoder_2"]["projection_dim"] == 48
