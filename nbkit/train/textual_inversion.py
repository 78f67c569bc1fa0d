"""Textual inversion (kohya ``train_textual_inversion.py`` / ``sdxl_train_textual_inversion.py``) as a
method of the one loop: new tokens whose input-embedding rows are the only weights that train.

The method: load and freeze the base (text encoders in fp32, as kohya keeps them), add
``token_string`` (and ``token_string_1``, ... for more vectors) to each tokenizer, start the new rows
from ``init_word`` (kohya's rule) or zeros, or from a ``weights`` file, and train them. SDXL trains
one set of rows in each text encoder (``clip_l`` and ``clip_g``).

Only the new rows can change. kohya trains the whole embedding matrix and copies the other rows back
after every step (``index_no_updates``); here the new rows are a separate fp32 parameter spliced
into the lookup (:class:`TrainedRows`), so the optimizer never sees another row: nothing to restore,
no weight decay on them, and a state folder holds a few KB. The update of the trained rows is the
same elementwise AdamW step. The tokens are named as diffusers' ``load_textual_inversion`` names a
multi-vector embedding (``tok``, ``tok_1``, ...), so the in-memory pipeline expands ``tok`` in a prompt
to all its vectors (``TextualInversionLoaderMixin.maybe_convert_prompt``), in previews too; training
captions get the same expansion (kohya ``add_replacement``).

Files: ``.safetensors`` (``emb_params``; SDXL ``clip_l`` + ``clip_g``) or A1111's ``.pt``
(``nbkit.formats.embeddings``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nbkit.config import ConfigError
from nbkit.data.dataset_config import DatasetSpec
from nbkit.data.train_data import batch_captions
from nbkit.formats.embeddings import (
    EmbeddingFormatError,
    load_embedding_file,
    save_a1111_embedding,
    save_safetensors_embedding,
)
from nbkit.train.architectures import conditioning_for
from nbkit.train.base_model import load_base, place, set_attention
from nbkit.train.common import enable_te_checkpointing, save_dtype_for, validation_loss
from nbkit.train.hooks import TrainHooks
from nbkit.train.hypernetwork_data import TemplateCaptions, load_template
from nbkit.train.loop import train
from nbkit.train.method import Method
from nbkit.train.textual_inversion_config import TextualInversionTrainConfig

# kohya train_textual_inversion.py ``imagenet_templates_small`` / ``imagenet_style_templates_small``
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)  # fmt: skip
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)  # fmt: skip


@dataclass
class TextualInversionResult:
    embedding_path: Path
    steps: int
    losses: list[float]
    tokens: list[str]  # the tokens added to the pipeline's tokenizer(s): token_string, token_string_1, ...
    pipeline: object = field(repr=False)  # the base pipeline holding the trained tokens
    saved: list[Path] = field(default_factory=list)
    main_process: bool = True


def token_names(token: str, vectors: int) -> list[str]:
    """diffusers' names of a multi-vector embedding's tokens (``_extend_tokens_and_embeddings``)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


class TrainedRows(torch.nn.Module):
    """A token embedding whose rows ``ids`` come from a trainable fp32 parameter ``rows``; every other
    row is the frozen ``base`` (so it cannot change, whatever the optimizer does)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], rows: torch.Tensor) -> None:
        super().__init__()
        self.base, self.ids = base, list(ids)
        slots = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=base.weight.device)
        slots[torch.tensor(self.ids, device=slots.device)] = torch.arange(len(self.ids), device=slots.device)
        self.register_buffer("slots", slots, persistent=False)
        self.rows = torch.nn.Parameter(rows.detach().to(base.weight.device, torch.float32).clone())

    @property
    def weight(self) -> torch.Tensor:  # what ``get_input_embeddings().weight`` readers expect
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        slot = self.slots[input_ids]
        rows = self.rows.to(out.dtype)[slot.clamp(min=0)]
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    def merged(self) -> torch.nn.Embedding:
        """The plain embedding with the trained rows written in."""
        with torch.no_grad():
            self.base.weight[self.ids] = self.rows.detach().to(self.base.weight.dtype)
        return self.base


def add_tokens(tokenizer, text_encoder, tokens: list[str], init_word: str | None, which: str) -> tuple[list[int], torch.Tensor]:
    """Add ``tokens`` to the tokenizer and the text encoder's embedding; returns their ids and the
    starting rows: kohya's rule (vector i = init token i mod the init word's token count, a warning when
    the counts differ), zeros without ``init_word`` (A1111)."""
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab]
    if taken:
        raise ConfigError(f"token_string: {taken[0]!r} is already in the {which} tokenizer: pick another word (or "
                          "load the base model again if this pipeline already learned it)")
    known = tokenizer.encode(tokens[0], add_special_tokens=False)
    if len(known) == 1:
        warnings.warn(f"token_string {tokens[0]!r} is a word the model knows: after training it means the embedding "
                      "in every prompt; a made-up word (e.g. 'xyzchar') keeps the word's meaning", stacklevel=3)
    weight = text_encoder.get_input_embeddings().weight
    if init_word:
        init_ids = tokenizer.encode(init_word, add_special_tokens=False)
        if len(init_ids) > 1 and len(init_ids) != len(tokens):
            warnings.warn(f"init_word {init_word!r} is {len(init_ids)} tokens for {len(tokens)} vectors: repeated or "
                          f"truncated (kohya's rule; {which})", stacklevel=3)
        rows = torch.stack([weight[init_ids[i % len(init_ids)]].detach().float() for i in range(len(tokens))])
    else:
        rows = torch.zeros(len(tokens), weight.shape[1])
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(max(len(tokenizer), weight.shape[0]), mean_resizing=False)
    return ids, rows


class TrainingPrompts:
    """The training prompts: the captions with ``token_string`` expanded to all its tokens (kohya's
    replacement), kohya's object/style templates (captions ignored), or an A1111 template (``[name]``
    = the tokens, ``[filewords]`` = the caption after kohya's caption options)."""

    def __init__(self, config: TextualInversionTrainConfig, tokens: list[str], items, lines, rng) -> None:
        self.token, self.words = config.token_string, " ".join(tokens)
        fixed = OBJECT_TEMPLATES if config.use_object_template else STYLE_TEMPLATES if config.use_style_template else ()
        self.templates = [t.format(self.words) for t in fixed]
        self.a1111 = TemplateCaptions(items, lines, self.words, False, 0.0, rng) if lines else None
        self.lines = lines

    def expand(self, caption: str) -> str:
        return caption.replace(self.token, self.words) if self.words != self.token else caption

    def batch(self, items, batch, rng, state) -> list[str]:
        if self.templates:
            return [rng.choice(self.templates) for _ in batch]  # kohya: random.choice per sample
        if self.a1111 is not None:
            return self.a1111.batch(batch, rng, state)
        return [self.expand(c) for c in batch_captions(items, batch, rng, state)]

    def validation(self, caption: str) -> str:
        """A fixed prompt for a held-out image: the first template line, or its caption."""
        if self.templates:
            return self.templates[0]
        if self.lines:
            return self.lines[0].replace("[filewords]", caption).replace("[name]", self.words)
        return self.expand(caption)

    def check(self, items) -> None:
        """Refuse (none) or warn about (some) captions without the token: their images teach it nothing."""
        if self.templates or (self.lines and any("[name]" in line for line in self.lines)):
            return
        if self.lines:
            raise ConfigError("template_file: no line has [name], so no prompt holds token_string: use a template "
                              "with [name] (e.g. subject_filewords.txt)")
        lacking = [it for it in items
                   if self.token not in f"{it.subset.caption_prefix or ''} {it.caption} {it.subset.caption_suffix or ''}"]
        if len(lacking) == len(items):
            raise ConfigError(f"token_string = {self.token!r} is in no caption: put it in the captions (or set the "
                              f"subset's caption_prefix = \"{self.token}\"), or use use_object_template / "
                              "use_style_template / template_file")
        if lacking:
            warnings.warn(f"{len(lacking)} of {len(items)} captions lack token_string {self.token!r} (e.g. "
                          f"{lacking[0].image.name}): those images do not train the embedding", stacklevel=3)


class TextualInversionMethod(Method):
    fingerprint_keys = Method.fingerprint_keys + ("token_string", "num_vectors_per_token", "init_word",
                                                  "use_object_template", "use_style_template", "template_file",
                                                  "weights")
    nan_advice = "lower learning_rate or set max_grad_norm, or check the dataset"

    def __init__(self, config: TextualInversionTrainConfig) -> None:
        super().__init__(config.checked())  # output_name = token_string when unset; bad options: ConfigError now
        self.tokens = token_names(self.config.token_string, self.config.num_vectors_per_token)
        self.embeddings: dict[str, TrainedRows] = {}
        self.text_encoders: dict[str, torch.nn.Module] = {}
        self._checkpoint = None

    # ---- before the model loads: the template and the continued file are read (and refused) now
    def check(self, datasets: list) -> list:
        config = self.config
        self.template_lines = load_template(config.template_file) if config.template_file else []
        self.start_rows = None
        if config.weights:
            try:
                self.start_rows, _ = load_embedding_file(Path(config.weights).expanduser())
            except EmbeddingFormatError as err:
                raise ConfigError(f"weights: {err}") from None
            vectors = {len(rows) for rows in self.start_rows.values()}
            if vectors != {config.num_vectors_per_token}:
                raise ConfigError(f"weights = {config.weights}: {vectors.pop()} vectors, num_vectors_per_token = "
                                  f"{config.num_vectors_per_token}: set num_vectors_per_token to the file's count")
        return datasets

    def load(self, run, pipeline, model_info) -> None:
        """Freeze the base (the VAE in fp32: fp16 SD VAEs overflow; the text encoders in fp32, as kohya
        keeps them), add the tokens, and splice the trainable rows into each text encoder."""
        config = self.config
        run.pipeline, run.info = load_base(config, pipeline, model_info, run.weight_dtype, run.device)
        run.arch = conditioning_for(run.pipeline, run.info, config, run.device, sdxl=True)
        self.unet, vae = run.pipeline.unet, run.pipeline.vae
        self.text_encoders = dict(run.arch.text_encoders())
        self.text_encoder = self.text_encoders["text_encoder"]
        tokenizers = {"text_encoder": run.pipeline.tokenizer, "text_encoder_2": getattr(run.pipeline, "tokenizer_2", None)}
        if self.start_rows is not None and set(self.start_rows) != set(self.text_encoders):
            kind = "an SDXL" if "text_encoder_2" in self.start_rows else "an SD1/SD2"
            raise ConfigError(f"weights = {config.weights}: {kind} embedding, the base model is {run.info.arch}: "
                              "continue an embedding trained for this kind of model")
        for model in (vae, self.unet, *self.text_encoders.values()):
            model.requires_grad_(False)
        place(((vae, torch.float32), (self.unet, run.weight_dtype),
               *((te, torch.float32) for te in self.text_encoders.values())), run.device)
        for key, text_encoder in self.text_encoders.items():
            ids, rows = add_tokens(tokenizers[key], text_encoder, self.tokens, config.init_word, key)
            if self.start_rows is not None:
                rows = self.start_rows[key]
                if rows.shape[1] != text_encoder.get_input_embeddings().weight.shape[1]:
                    raise ConfigError(f"weights = {config.weights}: vectors of width {rows.shape[1]} for {key}, "
                                      f"the model's is {text_encoder.get_input_embeddings().weight.shape[1]}: "
                                      "continue an embedding trained for this model family")
            base = text_encoder.get_input_embeddings().requires_grad_(False)
            with torch.no_grad():
                base.weight[ids] = rows.to(base.weight)  # so the plain weight holds them too
            self.embeddings[key] = TrainedRows(base, ids, rows)
            text_encoder.set_input_embeddings(self.embeddings[key])
            if config.gradient_checkpointing:
                enable_te_checkpointing(text_encoder)
        self.params = [e.rows for e in self.embeddings.values()]
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # non-reentrant: the text conditioning still gets gradients
        set_attention(config, self.unet)

    def prepare_data(self, run) -> None:
        self.prompts = TrainingPrompts(self.config, self.tokens, run.items, self.template_lines, run.rng)
        self.prompts.check(run.items)  # before the VAE encodes anything
        super().prepare_data(run)  # latents (the text encoders stay: every step encodes through them)

    # ---- optimizer: one group of the new rows (kohya: the embeddings at learning_rate)
    def parameter_groups(self) -> list[dict]:
        return [{"params": self.params, "lr": self.config.learning_rate}]

    def prepare(self, run) -> None:
        # nothing is wrapped for DDP (the frozen models would refuse it): gradients are averaged in ``clip``
        run.optimizer, run.lr_scheduler = run.accelerator.prepare(run.optimizer, run.lr_scheduler)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {f"{key}.token_rows": e.rows for key, e in self.embeddings.items()}

    # ---- per step
    def train_mode(self, run) -> None:
        self.unet.train()
        for text_encoder in self.text_encoders.values():
            text_encoder.train()

    def accumulated_models(self) -> tuple:
        return ()

    def loss(self, run, batch, step: int) -> torch.Tensor:
        """kohya's step: the prompts through the text encoders (fp32, with gradients to the new rows),
        cached latents, noise, prediction under autocast."""
        x0, mask = run.latents.batch(batch, run.rng)
        cond = run.arch.encode(self.prompts.batch(run.items, batch, run.rng, run.caption_state))
        cond = run.arch.for_batch(cond, run.items, batch)  # SDXL: each image's size/crop time ids
        with run.accelerator.autocast():
            return run.diffusion_loss(self.unet, x0, cond, run.prior_weights(batch), mask)

    def clip(self, run) -> None:
        """Average the rows' gradients across processes, then kohya's max_grad_norm over the trained rows
        (kohya clips the whole embedding matrix's gradient, including rows it then restores)."""
        accelerator = run.accelerator
        if accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
        if self.config.max_grad_norm:
            accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)

    # ---- outputs
    def start_info(self, run) -> dict:
        return {**super().start_info(run), "tokens": self.tokens}

    def embedding(self) -> dict[str, torch.Tensor]:
        """``{"text_encoder": [n, dim]}`` (SDXL: and ``text_encoder_2``), fp32 on the CPU."""
        return {key: e.rows.detach().float().cpu() for key, e in self.embeddings.items()}

    def output_path(self, name: str) -> Path:
        return Path(self.config.output_dir) / f"{name}.{self.config.save_as}"

    def save(self, run, name: str, step: int, final: bool) -> list[Path]:
        config, path = self.config, self.output_path(name)
        dtype = save_dtype_for(config.save_precision)
        checkpoint, checkpoint_name = self._checkpoint_identity()
        if config.save_as == "pt":
            return [save_a1111_embedding(self.embedding(), path, config.token_string, step, checkpoint,
                                         checkpoint_name, dtype)]
        metadata = {"name": config.token_string, "step": str(step), "num_vectors_per_token": str(len(self.tokens))}
        if checkpoint_name:
            metadata["sd_checkpoint_name"] = checkpoint_name
        return [save_safetensors_embedding(self.embedding(), path, dtype, metadata)]

    def _checkpoint_identity(self) -> tuple[str | None, str | None]:
        """A1111's ``sd_checkpoint`` (sha256[:10] of a single-file base; only for a .pt: hashing a 2-7 GB
        file takes a while) and ``sd_checkpoint_name``, worked out once per run."""
        if self._checkpoint is None:
            from nbkit.formats.a1111_hypernetwork import file_shorthash

            model = Path(str(self.config.pretrained_model_name_or_path)).expanduser()
            if model.is_file():
                digest = file_shorthash(model) if self.config.save_as == "pt" else None
                self._checkpoint = (digest, model.stem)
            else:
                self._checkpoint = (None, model.name or None)
        return self._checkpoint

    def remove_output(self, name: str) -> None:
        self.output_path(name).unlink(missing_ok=True)

    def validation_loss(self, run) -> float:
        return validation_loss(run, self.unet, lambda captions: run.arch.encode(
            [self.prompts.validation(c) for c in captions]))

    def result(self, run, step: int) -> TextualInversionResult:
        """The pipeline's text encoders get plain embeddings with the trained rows written in."""
        for key, text_encoder in self.text_encoders.items():
            text_encoder.set_input_embeddings(self.embeddings[key].merged())
            text_encoder.eval()
        return TextualInversionResult(self.output_path(self.config.output_name), step, run.recorder.losses,
                                      self.tokens, run.pipeline, run.saved, run.main)


def train_textual_inversion(
    config: TextualInversionTrainConfig,
    datasets: list[DatasetSpec],
    hooks: TrainHooks | None = None,
    pipeline=None,
    model_info=None,
    device: str | torch.device | None = None,
) -> TextualInversionResult:
    """Train an embedding. ``pipeline`` + ``model_info`` (from ``load_pipeline``) reuse a loaded base
    model; its tokenizer(s) and text encoder(s) keep the trained tokens afterwards."""
    return train(TextualInversionMethod(config), datasets, hooks, pipeline, model_info, device)
