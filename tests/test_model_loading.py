"""load_pipeline from every source, offline: folders, single files, a HF cache, a local http server."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from http_server import serve_files

from nbkit.formats.ldm_checkpoint import CONFIG_METADATA_KEY, read_single_file
from nbkit.models import load_pipeline
from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS, shipped_config_dir
from nbkit.models.download import download_dir_for
from nbkit.models.load import _single_file_prediction

ARCHS = ("sd15", "sd21", "sd21-v")


@pytest.fixture(autouse=True)
def _nbkit_cache(tmp_path, monkeypatch):
    """Keep rebuilt config folders and downloads out of ~/.cache."""
    monkeypatch.setenv("NBKIT_CACHE_DIR", str(tmp_path / "nbkit-cache"))


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE encode/decode and text-encoder outputs on fixed seeded inputs."""
    g = torch.Generator().manual_seed(0)
    hidden = pipe.text_encoder.config.hidden_size
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, hidden, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    ids = pipe.tokenizer("a photo of a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return {
            "unet": pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample,
            "vae_encode": pipe.vae.encode(image).latent_dist.mean,
            "vae_decode": pipe.vae.decode(latents).sample,
            "text_encoder": pipe.text_encoder(ids)[0],
        }


def _assert_same_outputs(a, b) -> None:
    out_a, out_b = _outputs(a), _outputs(b)
    for name in out_a:
        diff = (out_a[name] - out_b[name]).abs().max().item()
        assert diff <= 1e-6, f"{name} differs by {diff}"


# ----------------------------------------------------------------------------- folders and single files


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_and_folder_give_identical_models(tiny_model_dirs, arch):
    folder, single = tiny_model_dirs(arch)
    pipe_a, info_a = load_pipeline(str(folder))
    pipe_b, info_b = load_pipeline(str(single))
    _assert_same_outputs(pipe_a, pipe_b)
    v2, v = arch != "sd15", arch == "sd21-v"
    for info in (info_a, info_b):
        assert (info.arch, info.v2, info.v_parameterization) == (arch, v2, v)
    assert (info_a.source, info_b.source, info_b.config_source) == ("diffusers", "single_file", "embedded")
    assert pipe_b.scheduler.config.prediction_type == ("v_prediction" if v else "epsilon")
    assert pipe_b.unet.config.upcast_attention == v
    assert pipe_b.tokenizer.get_vocab() == pipe_a.tokenizer.get_vocab()
    assert pipe_b.tokenizer.pad_token == pipe_a.tokenizer.pad_token
    assert pipe_a.safety_checker is None and pipe_b.safety_checker is None


def test_weights_only_ckpt_loads(tmp_path, tiny_model_dirs):
    folder, single = tiny_model_dirs("sd21")
    sd, _ = read_single_file(single)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 875000}, ckpt)
    pipe, info = load_pipeline(str(ckpt), config_dir=str(folder))
    assert (info.arch, info.config_source, info.metadata["global_step"]) == ("sd21", "config_dir", "875000")
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])


def test_pickled_callable_is_refused(tmp_path, tiny_model_dirs):
    folder, single = tiny_model_dirs("sd15")
    sd, _ = read_single_file(single)
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "hook": shutil.rmtree}, ckpt)
    with pytest.raises(ValueError, match=r"evil\.ckpt.*weights-only.*\.safetensors"):
        load_pipeline(str(ckpt), config_dir=str(folder))


def test_shipped_config_mismatch_names_file_and_config_dir(tmp_path, tiny_model_dirs):
    from safetensors.torch import save_file

    _, single = tiny_model_dirs("sd15")
    sd, meta = read_single_file(single)
    bare = tmp_path / "no-config.safetensors"
    save_file(sd, str(bare), metadata={k: v for k, v in meta.items() if k != CONFIG_METADATA_KEY})
    with pytest.raises(ValueError, match=r"no-config\.safetensors.*shipped.*config_dir=") as err:
        load_pipeline(str(bare))
    assert "input_blocks.0.0.weight" in str(err.value)


def test_v_parameterization_override(tiny_model_dirs):
    _, single = tiny_model_dirs("sd21")
    pipe, info = load_pipeline(str(single), v_parameterization=True)
    assert (info.arch, info.v_parameterization) == ("sd21-v", True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_partial_sdxl_and_non_sd_files_get_clear_errors(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "xl.safetensors"  # SDXL loads (tests/test_sdxl_models.py); text encoders alone do not
    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, str(sdxl))
    with pytest.raises(ValueError, match=r"xl\.safetensors: SDXL text encoders .* but no U-Net"):
        load_pipeline(str(sdxl))
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(lora))
    with pytest.raises(ValueError, match="not an SD1/SD2 checkpoint"):
        load_pipeline(str(lora))
    with pytest.raises(FileNotFoundError, match="Hugging Face repo id"):
        load_pipeline(str(tmp_path / "nowhere" / "x"))


def test_prediction_type_detection():
    notes: list[str] = []
    assert _single_file_prediction(True, {"global_step": "875000"}, None, notes) is False
    assert _single_file_prediction(True, {}, None, notes) is True and "v-prediction" in notes[-1]
    assert _single_file_prediction(True, {"modelspec.prediction_type": "epsilon"}, None, []) is False
    assert _single_file_prediction(True, {"modelspec.architecture": "stable-diffusion-v2-512"}, None, []) is False
    assert _single_file_prediction(True, {"modelspec.architecture": "stable-diffusion-v2-768-v"}, None, []) is True
    assert _single_file_prediction(False, {}, None, []) is False


def test_model_hashes(tiny_model_dirs):
    _, single = tiny_model_dirs("sd15")
    _, info = load_pipeline(str(single))
    data = Path(single).read_bytes()
    assert info.shorthash() == hashlib.sha256(data).hexdigest()[:10]
    assert info.legacy_hash() == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


# ----------------------------------------------------------------------------- Hugging Face cache, offline


def test_repo_id_from_offline_hf_cache(tmp_path, tiny_model_dirs):
    folder, _ = tiny_model_dirs("sd21-v")
    cache = tmp_path / "hf"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--nbkit-test--tiny-sd21-v"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    pipe, info = load_pipeline("nbkit-test/tiny-sd21-v", cache_dir=str(cache))
    assert (info.source, info.arch) == ("hub", "sd21-v")
    assert Path(info.path) == repo / "snapshots" / sha
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])
    with pytest.raises(FileNotFoundError, match="nbkit-test/not-cached"):
        load_pipeline("nbkit-test/not-cached", cache_dir=str(cache))


# ----------------------------------------------------------------------------- URL, local http server


@pytest.fixture()
def http_files():
    with serve_files() as served:
        yield served


def test_url_download_resume_and_cache(tmp_path, tiny_model_dirs, http_files):
    server, base = http_files
    folder, single = tiny_model_dirs("sd15")
    data = Path(single).read_bytes()
    server.files["/models/tiny.safetensors"] = data
    url = f"{base}/models/tiny.safetensors"
    part = download_dir_for(url, tmp_path / "c") / ".download.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])  # an interrupted earlier download

    pipe, info = load_pipeline(url, cache_dir=str(tmp_path / "c"))
    assert info.source == "url" and Path(info.path).name == "tiny.safetensors"
    assert Path(info.path).read_bytes() == data and not part.exists()
    assert server.requests == [("/models/tiny.safetensors", f"bytes={len(data) // 2}-")]
    _assert_same_outputs(pipe, load_pipeline(str(folder))[0])

    load_pipeline(url, cache_dir=str(tmp_path / "c"))  # second time: from the download cache
    assert len(server.requests) == 1

    server.files["/page.html"] = b"<html></html>"
    with pytest.raises(ValueError, match="not a .safetensors/.ckpt file"):
        load_pipeline(f"{base}/page.html", cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize(
    ("arch", "unet_params", "te_params"),
    [("sd15", 859_520_964, 123_060_480), ("sd21", 865_910_724, 340_387_840), ("sd21-v", 865_910_724, 340_387_840)],
)
def test_shipped_configs_are_the_real_models(arch, unet_params, te_params):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS[arch]

    def load(sub, name="config.json"):
        return json.loads((folder / sub / name).read_text())

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        fields = inspect.signature(cls.__init__).parameters
        assert [k for k in load(sub) if not k.startswith("_") and k not in fields] == []
    # The real scheduler configs carry fields for the DDPM/DDIM/PNDM family (clip_sample, skip_prk_steps).
    scheduler_fields = set()
    for name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"):
        scheduler_fields |= set(inspect.signature(getattr(diffusers, name).__init__).parameters)
    assert set(load("scheduler", "scheduler_config.json")) - scheduler_fields <= {"_class_name", "_diffusers_version"}
    te_config = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    assert all(hasattr(te_config, k) for k in load("text_encoder") if not k.startswith("_") and k != "architectures")

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load("unet"))
        vae = AutoencoderKL.from_config(load("vae"))
        te = CLIPTextModel(te_config)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert (count(unet), count(vae), count(te)) == (unet_params, 83_653_863, te_params)
    sched = load("scheduler", "scheduler_config.json")
    assert sched.get("prediction_type", "epsilon") == ("v_prediction" if arch == "sd21-v" else "epsilon")
    assert (unet.config.sample_size, unet.config.upcast_attention) == ((96, True) if arch == "sd21-v" else (64, False))
    if arch != "sd15":
        assert (te_config.num_hidden_layers, te_config.hidden_size, te_config.hidden_act) == (23, 1024, "gelu")
        assert (te_config.num_attention_heads, te_config.intermediate_size, te_config.projection_dim) == (16, 4096, 512)


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuilt_tokenizer_matches_clip(tmp_path, arch):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(shipped_config_dir(arch, tmp_path) / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("an astronaut riding a horse").input_ids == [49406, 550, 18376, 6765, 320, 4558, 49407]
    assert tok.convert_ids_to_tokens([0, 256, 49406, 49407]) == ["!", "!</w>", "<|startoftext|>", "<|endoftext|>"]
    assert (tok.pad_token, tok.pad_token_id) == (("<|endoftext|>", 49407) if arch == "sd15" else ("!", 0))
    assert shipped_config_dir(arch, tmp_path) == shipped_config_dir(arch, tmp_path)  # cached, built once
