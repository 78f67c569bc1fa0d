"""What a model card says (:class:`CardFacts`): filled by :mod:`nbkit.export.model_card`, written out by
:mod:`nbkit.export.card_text`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CardFacts:
    """Everything the card says; :func:`nbkit.export.model_card.gather_facts` fills it from files."""

    repo_id: str
    kind: str  # lora | hypernetwork | dreambooth
    weight_files: list[str]  # repo paths of the model files
    diffusers_folder: bool = False  # a diffusers model at the repo root
    base_model: str | None = None
    base_model_note: str = ""
    license: str = "creativeml-openrail-m"
    trigger_words: list[str] = field(default_factory=list)
    instance_prompt: str | None = None
    widgets: list[tuple[str, str]] = field(default_factory=list)  # (prompt, repo path of the image)
    gallery: list[str] = field(default_factory=list)  # sample images without a known prompt
    settings: dict[str, str] = field(default_factory=dict)
    dataset_images: int | None = None
    dataset_repeats: int | None = None  # images x repeats per epoch
    steps: int | None = None
    title: str = ""
