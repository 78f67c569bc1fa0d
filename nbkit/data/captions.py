"""Caption processing exactly as kohya's ``BaseDataset.process_caption`` (train_util.py).

Order: prefix/suffix (joined with a space), whole-caption dropout (rate, or every N epochs),
``{a|b}`` wildcards (or first line only), then — when shuffling, tag dropout or token warm-up
is on — a fixed head (``keep_tokens`` or the part before ``keep_tokens_separator``, with an
optional fixed tail after a second separator), shuffled/dropped flexible tags, joined with
``", "``; finally ``secondary_separator`` becomes ``caption_separator``.
All randomness comes from the ``rng`` passed in, so a seed reproduces every caption.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass


@dataclass
class CaptionOptions:
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_separator: str = ","
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0


@dataclass
class CaptionState:
    """Where training is: kohya reads these from the dataset while processing a caption."""

    step: int = 0
    epoch: int = 1
    max_train_steps: int = 0


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_, close = "⦅", "⦆"
    while open_ in caption or close in caption:
        open_, close = open_ + "⦅", close + "⦆"
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _fixed_and_flexible(caption: str, o: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    if o.keep_tokens_separator and o.keep_tokens_separator in caption:
        fixed, flex = caption.split(o.keep_tokens_separator, 1)
        tail: list[str] = []
        if o.keep_tokens_separator in flex:
            flex, tail_part = flex.split(o.keep_tokens_separator, 1)
            tail = _split(tail_part, o.caption_separator)
        return _split(fixed, o.caption_separator), _split(flex, o.caption_separator), tail
    tokens = [t.strip() for t in caption.strip().split(o.caption_separator)]
    if o.keep_tokens > 0:
        return tokens[: o.keep_tokens], tokens[o.keep_tokens:], []
    return [], tokens, []


def warmup_steps(o: CaptionOptions, max_train_steps: int) -> int:
    """``token_warmup_step`` below 1 is a fraction of the run (kohya)."""
    if o.token_warmup_step and o.token_warmup_step < 1:
        return math.floor(o.token_warmup_step * max_train_steps)
    return int(o.token_warmup_step)


def process_caption(caption: str, o: CaptionOptions, rng: random.Random, state: CaptionState | None = None) -> str:
    """One training caption from a raw caption (which may hold several lines with wildcards)."""
    state = state or CaptionState()
    if o.caption_prefix:
        caption = o.caption_prefix + " " + caption
    if o.caption_suffix:
        caption = caption + " " + o.caption_suffix
    drop = o.caption_dropout_rate > 0 and rng.random() < o.caption_dropout_rate
    drop = drop or (o.caption_dropout_every_n_epochs > 0 and state.epoch % o.caption_dropout_every_n_epochs == 0)
    if drop:
        return ""
    caption = _expand_wildcards(caption, rng) if o.enable_wildcard else caption.split("\n")[0]
    warmup = warmup_steps(o, state.max_train_steps)
    if o.shuffle_caption or warmup > 0 or o.caption_tag_dropout_rate > 0:
        fixed, flex, tail = _fixed_and_flexible(caption, o)
        if warmup and state.step < warmup:
            keep = math.floor(state.step * ((len(flex) - o.token_warmup_min) / warmup)) + o.token_warmup_min
            flex = flex[:keep]
        if o.shuffle_caption:
            rng.shuffle(flex)
        if o.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + tail)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption
