"""Tiny taggers built from code (no download): a WD14-style ONNX tagger and a random BLIP.

The tests and the notebooks' demo mode (``NBKIT_DEMO=1``) use them to run the real tagging code
offline in seconds. The WD14 model returns fixed probabilities, except one tag that follows the
image's mean brightness, so its output is predictable; the BLIP is random (its captions are
gibberish made of real files).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

# name, category (0 general, 4 character, 9 rating), probability of the tiny model
TAGS: list[tuple[str, int, float]] = [
    ("general", 9, 0.10), ("sensitive", 9, 0.70), ("questionable", 9, 0.15), ("explicit", 9, 0.05),
    ("1girl", 0, 0.95), ("solo", 0, 0.80), ("long_hair", 0, 0.50), ("^_^", 0, 0.60),
    ("star_(symbol)", 0, 0.45), ("blue_eyes", 0, 0.36), ("red_eyes", 0, 0.34), ("simple_background", 0, 0.20),
    ("white_background", 0, 0.50),
    ("hatsune_miku", 4, 0.90), ("kagamine_rin_(vocaloid)", 4, 0.50), ("megurine_luka", 4, 0.30),
]
WHITE_BG = 12  # index of the tag that follows brightness
SIZE = 16  # the tiny model's input size (real models: 448)

# Tags that suit nbkit's drawn sample dataset (coloured shapes on plain backgrounds).
DEMO_TAGS: list[tuple[str, int, float]] = [
    ("general", 9, 0.90), ("sensitive", 9, 0.05), ("questionable", 9, 0.03), ("explicit", 9, 0.02),
    ("no_humans", 0, 0.95), ("simple_background", 0, 0.85), ("geometric_shape", 0, 0.60),
    ("white_background", 0, 0.50), ("still_life", 0, 0.10),
]
DEMO_BRIGHT_TAG = 7


def tiny_tagger_module(tags: Sequence[tuple[str, int, float]] = TAGS, brightness_tag: int = WHITE_BG):
    """The tiny tagger as a ``torch.nn.Module`` (torch is imported only here)."""
    import torch

    class TinyTagger(torch.nn.Module):
        """Fixed probabilities, except ``brightness_tag``, which follows the mean brightness."""

        def __init__(self):
            super().__init__()
            p = torch.tensor([t[2] for t in tags], dtype=torch.float64)
            self.register_buffer("logits", torch.log(p / (1 - p)).float())
            weight = torch.zeros(len(tags))
            weight[brightness_tag] = 12.0
            self.register_buffer("weight", weight)

        def forward(self, x):  # x: [batch, S, S, 3] BGR float 0-255
            brightness = x.mean(dim=(1, 2, 3)).unsqueeze(1) / 255.0 - 0.5
            return torch.sigmoid(self.logits + self.weight * brightness)

    return TinyTagger()


def write_model(folder: str | Path, input_name: str = "input_1:0", output_name: str = "predictions_sigmoid",
                fixed_batch: int | None = None, tags: Sequence[tuple[str, int, float]] = TAGS,
                brightness_tag: int = WHITE_BG) -> Path:
    """A model folder like a WD14 repo: ``model.onnx`` + ``selected_tags.csv`` (tag_id,name,category,count)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dynamic = None if fixed_batch else {input_name: {0: "batch"}, output_name: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is "legacy" but fine here
        torch.onnx.export(tiny_tagger_module(tags, brightness_tag).eval(), torch.zeros(fixed_batch or 1, SIZE, SIZE, 3),
                          str(folder / "model.onnx"), input_names=[input_name], output_names=[output_name],
                          dynamic_axes=dynamic, dynamo=False)
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, cat, 1000 - i] for i, (name, cat, _) in enumerate(tags))
    return folder


def write_demo_tagger(folder: str | Path) -> Path:
    """The tiny WD14 tagger with tags that fit the drawn shapes (used by ``NBKIT_DEMO=1``)."""
    return write_model(folder, tags=DEMO_TAGS, brightness_tag=DEMO_BRIGHT_TAG)


BLIP_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
BLIP_WORDS = ["a", "picture", "of"] + [f"w{i}" for i in range(60)]  # many plain words: few special tokens drawn


def make_tiny_blip(folder: str | Path, seed: int = 0) -> Path:
    """A random BLIP + processor (BERT WordPiece tokenizer, PIL image processor) saved like a Hub repo."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = {token: i for i, token in enumerate(BLIP_SPECIAL + BLIP_WORDS)}
    tokenizer = BertTokenizerFast(vocab=vocab, bos_token="[DEC]", model_max_length=512)
    ids = {"bos_token_id": vocab["[DEC]"], "sep_token_id": vocab["[SEP]"], "pad_token_id": vocab["[PAD]"],
           "eos_token_id": vocab["[SEP]"]}
    config = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 128, "encoder_hidden_size": 32, **ids},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(folder)
    return folder
