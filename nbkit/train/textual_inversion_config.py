"""The textual-inversion training config: kohya ``train_textual_inversion.py`` names (``token_string``,
``init_word``, ``num_vectors_per_token``, ``use_object_template``, ``use_style_template``, ``weights``)
plus A1111's prompt templates (``template_file`` with ``[name]``/``[filewords]``) and the file layout
(``save_as``); everything else is kohya's shared options (``TrainConfig``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from nbkit.config import ConfigError, help_
from nbkit.train.config import TrainConfig, Where, check_at_least, check_positive_rate, config_error

SAVE_AS = ("safetensors", "pt")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_VECTORS = 75  # one CLIP window holds 75 tokens between BOS and EOS


@dataclass
class TextualInversionTrainConfig(TrainConfig):
    """Train a textual-inversion embedding: new token(s) whose input-embedding rows are the only
    weights that train. SD1/SD2 files hold ``emb_params``, SDXL files ``clip_l`` and ``clip_g``."""

    token_string: str | None = field(
        default=None,
        metadata=help_("The word your prompts and captions use for the embedding, e.g. 'mychar' (required; it must "
                       "not be in the tokenizer's vocabulary). With several vectors it stands for all of them."),
    )
    init_word: str | None = field(
        default=None,
        metadata=help_("Word(s) whose token embeddings start the new vectors, e.g. 'girl' (kohya: vector i starts "
                       "from token i mod the word's token count). Unset: the vectors start at zero (A1111)."),
    )
    num_vectors_per_token: int = field(
        default=1, metadata=help_("Vectors (tokens) the embedding uses: more is more expressive, but each one takes "
                                  "a place of the 75 in a prompt.")
    )
    use_object_template: bool = field(
        default=False,
        metadata=help_("Ignore the captions; train on kohya's object prompts ('a photo of a <token>', ...).", "advanced"),
    )
    use_style_template: bool = field(
        default=False,
        metadata=help_("Ignore the captions; train on kohya's style prompts ('a painting in the style of <token>', ...).",
                       "advanced"),
    )
    template_file: str | None = field(
        default=None,
        metadata=help_("A1111 prompt template instead of the captions: a shipped one (subject.txt, "
                       "subject_filewords.txt, style.txt, style_filewords.txt, none.txt) or a path; [name] = the "
                       "token, [filewords] = the image's caption.", "advanced"),
    )
    weights: str | None = field(
        default=None,
        metadata=help_("Continue from an embedding file (.safetensors from kohya/nbkit, A1111 .pt, or a diffusers "
                       "learned_embeds) with num_vectors_per_token vectors.", "advanced"),
    )
    save_as: str = field(
        default="safetensors",
        metadata=help_("File type: safetensors (kohya emb_params, or clip_l/clip_g for SDXL; read by A1111, ComfyUI "
                       "and diffusers) or pt (A1111's embedding .pt).", "basic", SAVE_AS),
    )
    output_name: str | None = field(  # type: ignore[assignment]
        default=None,
        metadata=help_("File name without extension (default: token_string). A1111 and ComfyUI use the file name as "
                       "the prompt word, so keep it equal to the token."),
    )
    learning_rate: float = field(
        default=5e-3, metadata=help_("Learning rate of the embedding vectors (A1111's default 0.005; kohya's docs "
                                     "use lower rates with more steps).")
    )
    optimizer_type: str = field(
        default="AdamW",
        metadata=help_("Optimizer (kohya names). AdamW: the embedding's optimizer state is a few KB, so 8-bit saves "
                       "nothing here."),
    )

    def checked(self, where: Where = "config") -> TextualInversionTrainConfig:
        """Also the token, the vector count, the caption source and the continued file (refused before
        any model loads); a copy with ``output_name`` = ``token_string`` when it is unset."""
        super().checked(where)
        token = self.token_string
        if token is None or not str(token).strip():
            raise config_error(where, "token_string", token, "set the word your captions use for the embedding, "
                                                             "e.g. token_string = \"mychar\" (not a word the model "
                                                             "already knows)")
        if re.search(r"\s", token):
            raise config_error(where, "token_string", token, "use one word without spaces, e.g. \"mychar\"")
        check_at_least(self, where, "num_vectors_per_token", 1, "set num_vectors_per_token = 1 (or 2-8 for a "
                                                                 "complex subject)")
        if self.num_vectors_per_token > MAX_VECTORS:
            raise config_error(where, "num_vectors_per_token", self.num_vectors_per_token,
                               f"a prompt holds {MAX_VECTORS} tokens: use at most {MAX_VECTORS} (usually 1-8)")
        check_positive_rate(self, where, "learning_rate", "set learning_rate = 0.005")
        sources = [name for name in ("use_object_template", "use_style_template", "template_file")
                   if getattr(self, name)]
        if len(sources) > 1:
            raise ConfigError(f"{_place(where, sources[1])}: {' and '.join(sources)} are both set: they pick the "
                              "training prompts, keep one (or none to train on the captions)")
        if self.cache_text_encoder_outputs:
            raise config_error(where, "cache_text_encoder_outputs", True, "the embedding trains through the text "
                                                                          "encoder, so its outputs change every step: "
                                                                          "set cache_text_encoder_outputs = false")
        if self.weights:
            path = Path(self.weights).expanduser()
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or not path.is_file():
                what = "no such file" if not path.is_file() else "not an embedding file"
                raise config_error(where, "weights", self.weights, f"{what}: pass a .safetensors or .pt embedding "
                                                                   "to continue, or remove weights")
        changes = {}
        if not self.output_name:
            changes["output_name"] = token  # kohya: output_name defaults to token_string
        if self.init_word is not None and not self.init_word.strip():
            changes["init_word"] = None  # an empty init text: zero vectors, as A1111 does
        return replace(self, **changes) if changes else self


def _place(where: Where, name: str) -> str:
    return where(name) if callable(where) else where
