"""The base-model list: every entry's architecture and defaults, loaded through the offline-cache path.

For each entry a fake cache is built the way a real download leaves it (a Hugging Face cache snapshot
for a repo id, nbkit's URL download folder for a file URL) holding a tiny model of the entry's
architecture; the entry is then fetched and loaded with ``HF_HUB_OFFLINE=1`` (conftest), so a wrong
architecture, prediction type or cache path fails here without any download.
"""

from __future__ import annotations

import json
import shutil

import pytest

from nbkit.models.catalog import BASE_MODELS, apply_base_model, base_model, fetch_base_model, sdxl_lora_values
from nbkit.models.download import HUB_ALLOW_PATTERNS, download_dir_for, is_url
from nbkit.models.load import load_pipeline
from nbkit.train.config import LoRATrainConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EXPECTED = {  # the catalog's claims, written out: (arch as the loader names it, resolution)
    "sd15": ("sd15", 512), "sd21-base": ("sd21", 512), "sd21": ("sd21-v", 768), "sdxl": ("sdxl", 1024),
    "anything-v5": ("sd15", 512), "counterfeit-v2.5": ("sd15", 512), "realistic-vision-v5.1": ("sd15", 512),
    "pony-v6-xl": ("sdxl", 1024), "illustrious-xl-v0.1": ("sdxl", 1024), "noobai-xl-1.0": ("sdxl", 1024),
    "noobai-xl-vpred-1.0": ("sdxl", 1024), "animagine-xl-3.1": ("sdxl", 1024),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny models by variant ("sd15", "sd21", "sd21-v", "sdxl", "sdxl-v"), built once."""
    from nbkit.models.tiny import make_tiny_model

    root, built = tmp_path_factory.mktemp("catalog-tiny"), {}

    def get(variant: str):
        if variant not in built:
            arch, v_pred = ("sdxl", variant == "sdxl-v") if variant.startswith("sdxl") else (variant, False)
            built[variant] = make_tiny_model(root / variant, arch=arch, seed=0, single_file=True, v_pred=v_pred)
        return built[variant]

    return get


def _variant(entry) -> str:
    if entry.arch == "sdxl":
        return "sdxl-v" if entry.v_prediction else "sdxl"
    return "sd21-v" if entry.arch == "sd21" and entry.v_prediction else entry.arch


def _fake_cache(entry, cache, tiny_paths):
    """What a finished download of ``entry`` leaves in ``cache``."""
    if is_url(entry.source):
        folder = download_dir_for(entry.source, cache)
        folder.mkdir(parents=True)
        shutil.copy(tiny_paths["single_file"], folder / "model.safetensors")
        return folder / "model.safetensors"
    repo = cache / f"models--{entry.source.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_paths["diffusers"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if entry.zero_terminal_snr:  # as the v-pred repo's scheduler says
        path = snapshot / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"rescale_betas_zero_snr": True}))
    return snapshot


def test_the_list_covers_what_users_ask_for():
    assert set(BASE_MODELS) == set(EXPECTED)
    assert {e.arch for e in BASE_MODELS.values()} == {"sd15", "sd21", "sdxl"}
    styles = {(e.arch == "sdxl", e.style) for e in BASE_MODELS.values()}
    assert {(False, "anime"), (False, "photo"), (True, "anime")} <= styles
    assert all(e.licence and e.notes and e.source for e in BASE_MODELS.values())
    assert base_model("Laxhar/noobai-XL-Vpred-1.0").key == base_model("noobai-xl-vpred-1.0").key
    assert base_model("/content/drive/MyDrive/my-model.safetensors") is None


def test_sdxl_repos_download_both_text_encoders():
    for folder in ("text_encoder_2", "tokenizer_2"):
        assert any(p.startswith(f"{folder}/") for p in HUB_ALLOW_PATTERNS), folder
    assert "text_encoder_2/model.safetensors" in HUB_ALLOW_PATTERNS


@pytest.mark.parametrize("key", list(EXPECTED))
def test_entry_loads_from_the_offline_cache_with_its_defaults(key, tmp_path, tiny):
    entry = BASE_MODELS[key]
    arch, resolution = EXPECTED[key]
    cache = tmp_path / "_cache"
    where = _fake_cache(entry, cache, tiny(_variant(entry)))

    assert fetch_base_model(entry, cache) == where  # found in the cache: nothing downloaded
    pipe, info = load_pipeline(entry.source, cache_dir=str(cache))
    assert (info.arch, info.v_parameterization) == (arch, entry.v_prediction)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    assert pipe.scheduler.config.prediction_type == entry.prediction
    assert bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False)) == entry.zero_terminal_snr

    config = apply_base_model(LoRATrainConfig(), key).checked()
    assert config.pretrained_model_name_or_path == entry.source
    assert config.resolution == resolution == entry.resolution
    assert (config.v2, config.v_parameterization) == (info.v2, info.v_parameterization)
    assert config.zero_terminal_snr == info.zero_terminal_snr
    if arch == "sdxl":
        sdxl = sdxl_lora_values()
        assert all(getattr(config, k) == v for k, v in sdxl.items()) and sdxl["resolution"] == 1024
        assert sdxl["network_train_unet_only"] and sdxl["train_batch_size"] == 1
    else:
        assert config.train_batch_size == LoRATrainConfig().train_batch_size and not config.network_train_unet_only


def test_a_missing_cache_entry_says_so_instead_of_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        fetch_base_model(BASE_MODELS["sdxl"], tmp_path / "empty")
