"""A curated list of base models to train on: the configure notebook's dropdown, as data.

    from nbkit.models.catalog import BASE_MODELS, base_model, base_model_values
    entry = base_model("illustrious-xl-v0.1")
    values = base_model_values(entry, "lora")   # {"pretrained_model_name_or_path": ..., "resolution": 1024, ...}
    local = fetch_base_model(entry, cache_dir)  # download once (resumable) into the project's cache

Each entry names its source (a Hugging Face repo id holding a diffusers folder, or an https URL of one
``.safetensors`` file), its architecture (``sd15``, ``sd21``, ``sdxl``), its prediction type, licence
and a note. ``verified`` says whether the source was checked to exist on its site when the list was
written; choosing an entry sets the architecture's training defaults (resolution, SD2 and v-prediction
flags, SDXL's T4 memory settings), so a beginner does not train an SDXL model at 512 px or a v-prediction
model as a noise-prediction one. Nothing here downloads until :func:`fetch_base_model` is called.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("sd15", "sd21", "sdxl")
PREDICTIONS = ("epsilon", "v_prediction")
OWN_MODEL = "my own file, URL or Drive path"
CACHE_FOLDER = "_cache"  # beside the projects (not a valid project name, so never one)

# What SDXL needs to fit a free T4 (15 GiB): the "T4 SDXL LoRA" preset (nbkit.presets) when it is there,
# else these values: batch 1, checkpointing, cached latents, a U-Net-only LoRA whose frozen text encoders'
# outputs are cached (both encoders never sit in VRAM during the steps).
SDXL_PRESET = "T4 SDXL LoRA"
SDXL_LORA = {"resolution": 1024, "train_batch_size": 1, "gradient_checkpointing": True, "cache_latents": True,
             "cache_latents_to_disk": True, "network_train_unet_only": True, "cache_text_encoder_outputs": True,
             "network_dim": 16, "network_alpha": 8.0}


@dataclass(frozen=True)
class BaseModel:
    key: str
    name: str
    source: str  # a Hugging Face repo id (diffusers folder) or an https URL of one checkpoint file
    arch: str  # sd15 | sd21 | sdxl
    prediction: str  # epsilon | v_prediction
    licence: str
    notes: str
    style: str = "general"  # general | anime | photo
    verified: bool = False
    clip_skip: int | None = None
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS or self.prediction not in PREDICTIONS:
            raise ValueError(f"{self.key}: arch must be one of {ARCHS} and prediction one of {PREDICTIONS}")

    @property
    def v_prediction(self) -> bool:
        return self.prediction == "v_prediction"

    @property
    def resolution(self) -> int:
        """The resolution the model was trained at: 1024 (SDXL), 768 (SD2 v-prediction), else 512."""
        return 1024 if self.arch == "sdxl" else 768 if self.v_prediction else 512

    @property
    def label(self) -> str:
        return self.name + ("" if self.verified else " (source not verified)")


BASE_MODELS: dict[str, BaseModel] = {m.key: m for m in (
    BaseModel("sd15", "Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd15", "epsilon",
              "creativeml-openrail-m", "The base most LoRAs are trained on: the widest compatibility with A1111 and "
              "ComfyUI models. 512 px.", verified=True),
    BaseModel("sd21-base", "Stable Diffusion 2.1 base (512 px)", "stabilityai/stable-diffusion-2-1-base", "sd21",
              "epsilon", "openrail++", "SD2.1 at 512 px, noise prediction. Few community models build on SD2.",
              verified=True),
    BaseModel("sd21", "Stable Diffusion 2.1 (768 px, v-prediction)", "stabilityai/stable-diffusion-2-1", "sd21",
              "v_prediction", "openrail++", "SD2.1 at 768 px with v-prediction (v_parameterization is set for you).",
              verified=True),
    BaseModel("sdxl", "SDXL 1.0 base", "stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "epsilon", "openrail++",
              "SDXL at 1024 px. On a free T4: batch 1, gradient checkpointing, cached latents, a U-Net-only LoRA; "
              "expect hours, not minutes.", verified=True),
    BaseModel("anything-v5", "Anything V5 (SD1 anime)", "stablediffusionapi/anything-v5", "sd15", "epsilon",
              "creativeml-openrail-m", "A long-standing SD1 anime base on danbooru tags; a diffusers copy on the Hub "
              "(the original is Civitai model 9409).", style="anime", verified=True, clip_skip=2),
    BaseModel("counterfeit-v2.5", "Counterfeit V2.5 (SD1 anime)", "gsdf/Counterfeit-V2.5", "sd15", "epsilon",
              "creativeml-openrail-m", "SD1 anime illustration model on danbooru tags (often used with the "
              "EasyNegative embedding).", style="anime", verified=True, clip_skip=2),
    BaseModel("realistic-vision-v5.1", "Realistic Vision V5.1 (SD1 photo)", "SG161222/Realistic_Vision_V5.1_noVAE",
              "sd15", "epsilon", "creativeml-openrail-m", "SD1 photorealistic model for people and photos; 'noVAE': "
              "its author recommends the stabilityai/sd-vae-ft-mse VAE for sampling.", style="photo", verified=True),
    BaseModel("pony-v6-xl", "Pony Diffusion V6 XL (SDXL anime/cartoon)",
              "https://civitai.com/api/download/models/290640", "sdxl", "epsilon",
              "Fair AI Public License 1.0-SD, modified (no commercial use)",
              "Civitai model 257749, version 290640, one .safetensors file. Prompts start with 'score_9, score_8_up, "
              "score_7_up, ...'. Civitai may ask for an API key: add ?token=<your key> to the URL.",
              style="anime", verified=True, clip_skip=2),
    BaseModel("illustrious-xl-v0.1", "Illustrious-XL v0.1 (SDXL anime)", "OnomaAIResearch/Illustrious-xl-early-release-v0",
              "sdxl", "epsilon", "fair-ai-public-license-1.0-sd", "SDXL anime base on danbooru tags; many recent "
              "anime models and LoRAs build on it.", style="anime", verified=True),
    BaseModel("noobai-xl-1.0", "NoobAI-XL 1.0 (SDXL anime, epsilon)", "Laxhar/noobai-XL-1.0", "sdxl", "epsilon",
              "fair-ai-public-license-1.0-sd", "Illustrious-based, on danbooru and e621 tags; the noise-prediction "
              "branch.", style="anime", verified=True),
    BaseModel("noobai-xl-vpred-1.0", "NoobAI-XL V-Pred 1.0 (SDXL anime, v-prediction)", "Laxhar/noobai-XL-Vpred-1.0",
              "sdxl", "v_prediction", "fair-ai-public-license-1.0-sd", "v-prediction with zero terminal SNR "
              "(v_parameterization and zero_terminal_snr are set for you); A1111 needs v-pred support to use what "
              "you train (ComfyUI and reForge have it).", style="anime", verified=True, zero_terminal_snr=True),
    BaseModel("animagine-xl-3.1", "Animagine XL 3.1 (SDXL anime)", "cagliostrolab/animagine-xl-3.1", "sdxl",
              "epsilon", "faipl-1.0-sd", "SDXL anime model with character and quality tags.", style="anime",
              verified=True),
)}


def base_model(key_or_source: str) -> BaseModel | None:
    """The catalog entry with this key, name or source (``None`` for the user's own model)."""
    for entry in BASE_MODELS.values():
        if key_or_source in (entry.key, entry.name, entry.source):
            return entry
    return None


def base_model_values(entry: BaseModel, method: str = "lora") -> dict[str, Any]:
    """The config values choosing ``entry`` sets: the source and the architecture's defaults.

    SD2 and v-prediction are set explicitly (detection from a Hub repo also works, but a form that shows
    them teaches what they are); SDXL adds its T4 LoRA settings. ``method`` other than ``lora`` gets only
    the architecture flags and resolution (DreamBooth and hypernetworks train SD1/SD2 models)."""
    values: dict[str, Any] = {"pretrained_model_name_or_path": entry.source, "v2": entry.arch == "sd21",
                              "v_parameterization": entry.v_prediction, "resolution": entry.resolution,
                              "zero_terminal_snr": entry.zero_terminal_snr, "clip_skip": entry.clip_skip}
    if entry.arch == "sdxl" and method == "lora":
        values.update(sdxl_lora_values())
    return values


def sdxl_lora_values() -> dict[str, Any]:
    """The SDXL LoRA settings for a T4: the ``T4 SDXL LoRA`` preset's values, else :data:`SDXL_LORA`."""
    from nbkit.presets import PRESETS

    return dict(PRESETS[SDXL_PRESET].values) if SDXL_PRESET in PRESETS else dict(SDXL_LORA)


def apply_base_model(config, entry: BaseModel | str, method: str = "lora"):
    """A copy of ``config`` with ``entry``'s values (the fields the config class has)."""
    import dataclasses

    entry = base_model(entry) if isinstance(entry, str) else entry
    if entry is None:
        raise KeyError(f"not in the base-model list; choose one of: {', '.join(BASE_MODELS)}")
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in base_model_values(entry, method).items() if k in names})


def cache_dir_for(projects_root: str | Path) -> Path:
    """Where base models download to: ``<projects root>/_cache`` (on Drive when the projects are), so a
    runtime reset does not download them again."""
    return Path(projects_root) / CACHE_FOLDER


def fetch_base_model(entry: BaseModel | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder or file of a base model, downloading it once into ``cache_dir`` (a Hub snapshot, or
    a resumable URL download with a progress bar). With ``HF_HUB_OFFLINE=1`` only the cache is used."""
    from nbkit.models.load import resolve

    source = entry.source if isinstance(entry, BaseModel) else str(entry)
    return resolve(source, None if cache_dir is None else str(cache_dir))[1]
