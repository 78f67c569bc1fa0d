"""Option dataclasses of the taggers (kohya flag names), light to import: the CLI builds its flags from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from nbkit.config import help_
from nbkit.tag.tags import EXISTING_MODES
from nbkit.tag.wd14_labels import TAG_ORDERS, TagRules

DEFAULT_WD14_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
WD14_REPOS = (
    "SmilingWolf/wd-v1-4-convnext-tagger-v2",
    "SmilingWolf/wd-v1-4-convnextv2-tagger-v2",
    "SmilingWolf/wd-v1-4-swinv2-tagger-v2",
    "SmilingWolf/wd-v1-4-vit-tagger-v2",
    "SmilingWolf/wd-v1-4-moat-tagger-v2",
    "SmilingWolf/wd-swinv2-tagger-v3",
    "SmilingWolf/wd-vit-tagger-v3",
    "SmilingWolf/wd-convnext-tagger-v3",
    "SmilingWolf/wd-vit-large-tagger-v3",
    "SmilingWolf/wd-eva02-large-tagger-v3",
)
DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-large"
KOHYA_BLIP_PROMPT = "a picture of "


@dataclass
class WD14Config:
    """WD14 tagging options; names are kohya's tag_images_by_wd14_tagger.py flags."""

    repo_id: str = field(default=DEFAULT_WD14_REPO, metadata=help_(
        "Hugging Face repo with model.onnx + selected_tags.csv, e.g. SmilingWolf/wd-swinv2-tagger-v3 "
        "or SmilingWolf/wd-eva02-large-tagger-v3 (v3 models are recommended by kohya's docs)."))
    model_dir: str | None = field(default=None, metadata=help_(
        "Local folder with model.onnx and selected_tags.csv (or kohya's wd14_tagger_model folder); "
        "overrides repo_id."))
    cache_dir: str | None = field(default=None, metadata=help_("Hugging Face cache folder (default: HF_HOME).", "advanced"))
    force_download: bool = field(default=False, metadata=help_("Download the model again.", "advanced"))
    batch_size: int = field(default=8, metadata=help_(
        "Images per model call (kohya's default is 1; 8 keeps a T4 busy). A fixed batch in the model wins."))
    caption_extension: str = field(default=".txt", metadata=help_("Extension of the caption files written."))
    thresh: float = field(default=0.35, metadata=help_("Confidence needed to write a tag."))
    general_threshold: float | None = field(default=None, metadata=help_("Threshold for general tags (default: thresh)."))
    character_threshold: float | None = field(default=None, metadata=help_("Threshold for character tags (default: thresh)."))
    recursive: bool = field(default=False, metadata=help_("Also tag images in subfolders."))
    remove_underscore: bool = field(default=False, metadata=help_(
        "long_hair -> long hair (tags of 3 characters or fewer, like ^_^, are kept)."))
    escape_brackets: bool = field(default=False, metadata=help_(
        "Write ( ) as \\( \\), as A1111 needs for tags like smile_(expression).", "advanced"))
    undesired_tags: str = field(default="", metadata=help_("Comma-separated tags never to write."))
    use_rating_tags: bool = field(default=False, metadata=help_("Write the rating tag (general/sensitive/...) first."))
    use_rating_tags_as_last_tag: bool = field(default=False, metadata=help_("Write the rating tag last."))
    character_tags_first: bool = field(default=False, metadata=help_("Character tags before general tags."))
    always_first_tags: str | None = field(default=None, metadata=help_(
        "Comma-separated tags put first when present, in this order, e.g. '1girl,1boy'."))
    tag_order: str = field(default="confidence", metadata=help_(
        "Tag order: by confidence, alphabetical, or model (kohya's csv order).", "advanced", TAG_ORDERS))
    caption_separator: str = field(default=", ", metadata=help_("Separator between tags.", "advanced"))
    tag_replacement: str | None = field(default=None, metadata=help_(
        "Rename tags: 'old,new;old2,new2' (escape , and ; inside tags as \\, \\;).", "advanced"))
    character_tag_expand: bool = field(default=False, metadata=help_(
        "name_(series) -> name, series for character tags.", "advanced"))
    existing_captions: str = field(default="overwrite", metadata=help_(
        "When a caption exists: skip the image, overwrite it, append new tags, or prepend them.", "basic",
        EXISTING_MODES))
    append_tags: bool = field(default=False, metadata=help_("kohya's flag: same as existing_captions=append.", "advanced"))
    frequency_tags: bool = field(default=False, metadata=help_("Print how often each tag was written.", "advanced"))

    def rules(self) -> TagRules:
        """The selection rules; thresholds fall back to ``thresh`` as in kohya."""
        rating = "first" if self.use_rating_tags else "last" if self.use_rating_tags_as_last_tag else "off"
        return TagRules(
            general_threshold=self.thresh if self.general_threshold is None else self.general_threshold,
            character_threshold=self.thresh if self.character_threshold is None else self.character_threshold,
            rating=rating,
            character_tags_first=self.character_tags_first,
            always_first=TagRules.user_tags(self.always_first_tags),
            undesired=frozenset(TagRules.user_tags(self.undesired_tags)),
            order=self.tag_order,
            escape_brackets=self.escape_brackets,
        )

    def existing_mode(self) -> str:
        return "append" if self.append_tags else self.existing_captions


@dataclass
class BlipCaptionConfig:
    """BLIP captioning options; names follow kohya's finetune/make_captions.py where it has one."""

    model_id: str = field(default=DEFAULT_BLIP_MODEL, metadata=help_(
        "BLIP captioning model: a Hugging Face id (e.g. Salesforce/blip-image-captioning-base) or a local folder."))
    cache_dir: str | None = field(default=None, metadata=help_("Hugging Face cache folder (default: HF_HOME).", "advanced"))
    caption_extension: str = field(default=".caption", metadata=help_(
        "Extension of the caption files (kohya's BLIP default is .caption; the WD14 tagger writes .txt)."))
    beam_search: bool = field(default=False, metadata=help_("Beam search instead of nucleus sampling."))
    num_beams: int = field(default=1, metadata=help_("Beams for beam search (kohya's default 1; 3-5 is steadier)."))
    top_p: float = field(default=0.9, metadata=help_("top_p of nucleus sampling."))
    max_length: int = field(default=75, metadata=help_("Longest caption in tokens (prompt included)."))
    min_length: int = field(default=5, metadata=help_("Shortest caption in tokens (prompt included)."))
    batch_size: int = field(default=8, metadata=help_("Images per generate call (kohya's default is 1)."))
    seed: int = field(default=42, metadata=help_("Random seed for sampling."))
    recursive: bool = field(default=False, metadata=help_("Also caption images in subfolders."))
    prefix: str = field(default="", metadata=help_(
        "Text put before every caption, e.g. a trigger word: 'sks' gives 'sks, a dog on a bed'; end it with a "
        "space to join without a comma ('a photo of sks ' gives 'a photo of sks a dog on a bed')."))
    text_prompt: str = field(default=KOHYA_BLIP_PROMPT, metadata=help_(
        "Decoder prompt, removed from the caption (kohya's BLIP uses 'a picture of '; empty = unconditional).",
        "advanced"))
    existing_captions: str = field(default="overwrite", metadata=help_(
        "When a caption exists: skip the image, overwrite it, append or prepend the new caption.", "basic",
        EXISTING_MODES))
    device: str | None = field(default=None, metadata=help_("cuda or cpu (default: cuda when available).", "advanced"))
