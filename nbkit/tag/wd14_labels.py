"""WD14 labels and tag selection: pure functions from model probabilities to a tag list.

``selected_tags.csv`` (columns ``tag_id,name,category,count``) has one row per model output:
category 9 = rating (the first 4 outputs), 0 = general, 4 = character. Label renaming follows
kohya (finetune/tag_images_by_wd14_tagger.py): character tags ``name_(series)`` may expand to
``name, series``; ``remove_underscore`` only touches tags longer than 3 characters (so ``^_^``
survives); ``tag_replacement`` is ``old,new;old2,new2`` with ``\\,`` and ``\\;`` escapes.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from nbkit.tag.tags import escape_brackets, split_tags, unescape_brackets

RATING, GENERAL, CHARACTER = 9, 0, 4
TAG_ORDERS = ("confidence", "alphabetical", "model")
RATING_PLACES = ("off", "first", "last")


@dataclass(frozen=True)
class TagLabels:
    """One entry per model output: the name written to captions, the csv name and the category."""

    names: tuple[str, ...]
    raw_names: tuple[str, ...]
    categories: tuple[int, ...]

    def indices(self, category: int) -> list[int]:
        return [i for i, c in enumerate(self.categories) if c == category]


def read_selected_tags(path: str | Path) -> TagLabels:
    """Read ``selected_tags.csv``; a clear error when the header is not kohya's expected one."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise ValueError(f"{path}: expected a WD14 selected_tags.csv with header tag_id,name,category,count")
    names = tuple(row[1] for row in rows[1:])
    return TagLabels(names, names, tuple(int(row[2]) for row in rows[1:]))


def parse_tag_replacement(text: str | None) -> list[tuple[str, str]]:
    """``"old,new;a\\,b,c"`` -> ``[("old", "new"), ("a,b", "c")]`` (kohya's syntax and escapes)."""
    if not text:
        return []
    pairs = []
    for item in text.replace("\\,", "\x00").replace("\\;", "\x01").split(";"):
        if not item.strip():
            continue
        parts = item.split(",")
        if len(parts) != 2:
            raise ValueError(f"tag_replacement: {item!r} is not 'old,new' (escape commas in tags as \\,)")
        old, new = (p.replace("\x00", ",").replace("\x01", ";").strip() for p in parts)
        pairs.append((old, new))
    return pairs


def expand_character_tag(tag: str, separator: str = ", ") -> str:
    """kohya's ``--character_tag_expand``: ``name_(series)`` -> ``name, series``."""
    if not tag.endswith(")"):
        return tag
    parts = tag.split("(")
    name = "(".join(parts[:-1]).removesuffix("_")
    return name + separator + parts[-1].replace(")", "")


def rename_labels(
    labels: TagLabels,
    *,
    remove_underscore: bool = False,
    tag_replacement: str | None = None,
    character_tag_expand: bool = False,
    separator: str = ", ",
) -> TagLabels:
    """The caption names, in kohya's order: expand characters, underscores, then replacements."""
    names = list(labels.names)
    for i, cat in enumerate(labels.categories):
        if character_tag_expand and cat == CHARACTER:
            names[i] = expand_character_tag(names[i], separator)
        if remove_underscore and len(names[i]) > 3:
            names[i] = names[i].replace("_", " ")
    for old, new in parse_tag_replacement(tag_replacement):
        names = [new if n == old else n for n in names]
    return replace(labels, names=tuple(names))


@dataclass(frozen=True)
class TagRules:
    """How probabilities become a caption (see WD14Config for the user-facing options)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    rating: str = "off"  # off / first / last
    character_tags_first: bool = False
    always_first: tuple[str, ...] = ()
    undesired: frozenset[str] = frozenset()
    order: str = "confidence"  # confidence / alphabetical / model (kohya's csv order)
    escape_brackets: bool = False

    @staticmethod
    def user_tags(text: str | Sequence[str] | None) -> tuple[str, ...]:
        """Tags typed by a user (comma-separated), escaped brackets accepted."""
        items = split_tags(text) if isinstance(text, str) else list(text or ())
        return tuple(unescape_brackets(t.strip()) for t in items if t.strip())


def _ordered(chosen: list[int], probs: np.ndarray, labels: TagLabels, order: str) -> list[int]:
    if order == "confidence":
        return sorted(chosen, key=lambda i: (-float(probs[i]), i))
    if order == "alphabetical":
        return sorted(chosen, key=lambda i: (labels.names[i], i))
    if order == "model":
        return sorted(chosen)
    raise ValueError(f"tag order must be one of {', '.join(TAG_ORDERS)}, not {order!r}")


def select_tags(probs: np.ndarray, labels: TagLabels, rules: TagRules) -> list[str]:
    """One image's probabilities -> its tags.

    General and character tags at or above their thresholds (undesired ones dropped), ordered by
    ``rules.order``, characters first if asked; the rating (argmax over the rating outputs)
    first or last; then ``always_first`` tags that are present move to the front, in the given
    order; brackets escaped last.
    """
    if len(probs) != len(labels.names):
        raise ValueError(f"the model has {len(probs)} outputs but selected_tags.csv has {len(labels.names)} rows")

    def wanted(i: int) -> bool:
        return labels.names[i] not in rules.undesired and labels.raw_names[i] not in rules.undesired

    general = [i for i in labels.indices(GENERAL) if probs[i] >= rules.general_threshold and wanted(i)]
    character = [i for i in labels.indices(CHARACTER) if probs[i] >= rules.character_threshold and wanted(i)]
    if rules.character_tags_first:
        chosen = _ordered(character, probs, labels, rules.order) + _ordered(general, probs, labels, rules.order)
    else:
        chosen = _ordered(general + character, probs, labels, rules.order)
    tags = [labels.names[i] for i in chosen]
    ratings = labels.indices(RATING)
    if rules.rating != "off" and ratings:
        best = ratings[int(np.argmax(probs[ratings]))]
        if wanted(best):
            tags = [labels.names[best], *tags] if rules.rating == "first" else [*tags, labels.names[best]]
    first = [t for t in rules.always_first if t in tags]
    tags = first + [t for t in tags if t not in first]
    return [escape_brackets(t) for t in tags] if rules.escape_brackets else tags
