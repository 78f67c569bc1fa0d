"""The README.md of a Hub repo: YAML metadata the Hub reads, and a body people read.

Built with huggingface_hub's ``ModelCard``/``ModelCardData``: ``base_model``, ``license``, ``tags``,
``instance_prompt`` (trigger words), ``widget`` (sample images with their prompts, shown as the
model page's gallery). The body says how to use the file in diffusers, A1111 and ComfyUI, the
training settings that matter and the dataset size. Facts come from the trained file's own metadata
(kohya ``ss_*`` keys, the hypernetwork's fields) and the run TOML (kohya option names); local
absolute paths never reach the card.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from nbkit.export.card_facts import CardFacts
from nbkit.export.card_text import card_body
from nbkit.models.download import REPO_ID, hub_repo_from_url

# ss_base_model_version / modelspec architecture -> (Hub base model, licence)
BASE_MODELS = {
    "sd_v1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
    "sd_v2": ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
    "sd_v2_v": ("stabilityai/stable-diffusion-2-1", "openrail++"),
}
ARCH_NAMES = {"sd_v1": "SD 1.x", "sd_v2": "SD 2.x 512", "sd_v2_v": "SD 2.x 768 v-prediction"}
_ARCH_KEYS = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-v2-512": "sd_v2", "stable-diffusion-v2-768-v": "sd_v2_v"}
# kohya option name -> ss_* metadata key (the file's metadata is what really happened)
SETTINGS = {
    "lora": {
        "network_dim": "ss_network_dim", "network_alpha": "ss_network_alpha", "learning_rate": "ss_learning_rate",
        "unet_lr": "ss_unet_lr", "text_encoder_lr": "ss_text_encoder_lr", "max_train_steps": "ss_max_train_steps",
        "train_batch_size": "ss_batch_size_per_device", "resolution": "ss_resolution",
        "optimizer_type": "ss_optimizer", "lr_scheduler": "ss_lr_scheduler", "mixed_precision": "ss_mixed_precision",
        "clip_skip": "ss_clip_skip", "noise_offset": "ss_noise_offset", "min_snr_gamma": "ss_min_snr_gamma",
        "seed": "ss_seed",
    },
    "dreambooth": dict.fromkeys((
        "learning_rate", "learning_rate_te", "train_text_encoder", "max_train_steps", "train_batch_size",
        "resolution", "optimizer_type", "lr_scheduler", "mixed_precision", "num_class_images", "prior_loss_weight",
        "use_ema", "clip_skip", "seed")),
    "hypernetwork": dict.fromkeys((
        "layer_structure", "activation_func", "learning_rate", "max_train_steps", "train_batch_size",
        "resolution", "optimizer_type", "template_file", "seed")),
}  # fmt: skip
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def public_value(value: Any) -> Any:
    """A value fit for a public page: an absolute local path becomes its last component."""
    if isinstance(value, str) and _ABSOLUTE.match(value):
        return Path(value.replace("\\", "/")).name
    return value


def _arch_key(meta: dict[str, str]) -> str | None:
    if meta.get("ss_base_model_version") in BASE_MODELS:
        return meta["ss_base_model_version"]
    return _ARCH_KEYS.get(meta.get("modelspec.architecture", "").split("/")[0])


def hub_base_model(name: str | None) -> str | None:
    """A Hub repo id from a base model name (repo id or huggingface.co URL), else None."""
    if not name:
        return None
    if name.startswith(("https://", "http://")):
        parsed = hub_repo_from_url(name) or hub_repo_from_url(name.split("/resolve/")[0].split("/blob/")[0])
        return parsed
    return name if REPO_ID.match(name) and not os.path.exists(name) else None


def read_model_facts(path: Path, kind: str) -> dict[str, Any]:
    """Metadata of a trained file: the ``ss_*``/``modelspec.*`` keys, or a hypernetwork's fields."""
    if kind == "hypernetwork":
        from nbkit.formats.a1111_hypernetwork import load_hypernetwork_file

        data = load_hypernetwork_file(path)
        return {"hn_step": data.step, "hn_base": data.sd_checkpoint_name, "layer_structure": data.layer_structure,
                "activation_func": data.activation_func}
    if path.is_file() and path.suffix == ".safetensors":
        from nbkit.formats.checkpoint_io import read_safetensors_header

        return read_safetensors_header(path)[1]
    return {}


def _base_model(options: dict[str, Any], meta: dict[str, Any], explicit: str | None) -> tuple[str | None, str, str]:
    """(base model repo id, a note on where it came from, licence)."""
    arch = _arch_key(meta) or "sd_v1"
    fallback, licence = BASE_MODELS[arch]
    if explicit:
        return explicit, "", licence
    named = meta.get("ss_sd_model_name") or meta.get("hn_base") or options.get("pretrained_model_name_or_path")
    repo = hub_base_model(named)
    if repo:
        return repo, "", licence
    note = (f"Trained on `{public_value(named)}` (a local model, {ARCH_NAMES[arch]}); {fallback} is the closest "
            "Hub base model.") if named else ""
    return fallback, note, licence


def _dataset_size(meta: dict[str, Any], dataset: Path | None) -> tuple[int | None, int | None]:
    dirs = meta.get("ss_dataset_dirs")
    if dirs:
        try:
            parsed = json.loads(dirs)
            images = sum(int(d.get("img_count", 0)) for d in parsed.values())
            return images, sum(int(d.get("img_count", 0)) * int(d.get("n_repeats", 1)) for d in parsed.values())
        except (ValueError, AttributeError, TypeError):
            pass
    if dataset and dataset.is_dir():
        return sum(1 for p in dataset.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), None
    return None, None


def _trigger(options: dict[str, Any], meta: dict[str, Any], explicit: str | None,
             folders: list[str]) -> tuple[list[str], str | None]:
    """Trigger words and the instance prompt: given, the DreamBooth ``instance_prompt``, or the kohya
    folder names ``N_identifier class`` of the dataset."""
    from nbkit.data.importer import parse_kohya_folder_name

    if explicit:
        return [w.strip() for w in explicit.split(",") if w.strip()], explicit
    if options.get("instance_prompt"):
        return [], str(options["instance_prompt"])
    if meta.get("ss_dataset_dirs"):
        folders = [*json.loads(meta["ss_dataset_dirs"]), *folders]
    words, prompts = [], []
    for name in folders:
        parsed = parse_kohya_folder_name(name)
        if parsed.identifier and parsed.identifier not in words:
            words.append(parsed.identifier)
            prompts.append(f"{parsed.identifier} {parsed.class_name}".strip())
    return words, (prompts[0] if prompts else None)


def _settings(kind: str, options: dict[str, Any], meta: dict[str, Any]) -> dict[str, str]:
    out = {}
    for name, meta_key in SETTINGS[kind].items():
        value = meta.get(meta_key) if meta_key else None
        if value in (None, "None", ""):
            value = meta.get(name) if kind == "hypernetwork" else None
        if value in (None, "None", ""):
            value = options.get(name)
        if value not in (None, "None", "", []):
            out[name] = optimizer_name(str(value)) if name == "optimizer_type" else str(public_value(value))
    return out


def optimizer_name(value: str) -> str:
    """kohya's ``ss_optimizer`` is the class path (``torch.optim.adamw.AdamW``, with its arguments in
    brackets); the card shows the name users choose (``AdamW``, ``AdamW8bit(weight_decay=0.01)``)."""
    head, bracket, args = value.partition("(")
    return head.strip().rsplit(".", 1)[-1] + bracket + args


def gather_facts(repo_id: str, kind: str, model: Path, weight_files: list[str], *, options: dict[str, Any],
                 samples: list[tuple[str, str | None]], dataset: Path | None = None, base_model: str | None = None,
                 license: str | None = None, trigger: str | None = None, title: str | None = None,
                 dataset_folders: list[str] | None = None) -> CardFacts:
    """Facts for the card. ``samples``: ``(repo path, prompt or None)``; ``options``: run TOML options;
    ``dataset_folders``: image folder names (kohya ``N_identifier class`` names give the trigger words)."""
    meta = read_model_facts(model, kind)
    base, note, default_licence = _base_model(options, meta, base_model)
    words, instance = _trigger(options, meta, trigger, list(dataset_folders or []))
    images, repeats = _dataset_size(meta, dataset)
    steps = meta.get("ss_steps") or meta.get("hn_step")
    return CardFacts(
        repo_id=repo_id, kind=kind, weight_files=weight_files, diffusers_folder=(model / "model_index.json").is_file(),
        base_model=base, base_model_note=note, license=license or default_licence, trigger_words=words,
        instance_prompt=instance, widgets=[(p, s) for s, p in samples if p], gallery=[s for s, p in samples if not p],
        settings=_settings(kind, options, meta), dataset_images=images, dataset_repeats=repeats,
        steps=int(steps) if steps not in (None, "None") else None, title=title or repo_id.split("/")[-1],
    )


def card_data(facts: CardFacts):
    from huggingface_hub import ModelCardData

    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", facts.kind, "nbkit"]
    if facts.kind == "lora":
        tags.append("template:sd-lora")  # the Hub's LoRA page layout (gallery from the widget)
    extra: dict[str, Any] = {}
    if facts.instance_prompt:
        extra["instance_prompt"] = facts.instance_prompt
    if facts.widgets:
        extra["widget"] = [{"text": prompt, "output": {"url": path}} for prompt, path in facts.widgets]
    return ModelCardData(base_model=facts.base_model, license=facts.license, tags=tags, library_name="diffusers",
                         pipeline_tag="text-to-image", **extra)


def build_model_card(facts: CardFacts):
    """A ``huggingface_hub.ModelCard`` (``.content`` is the README.md text)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{card_body(facts)}")
