"""Pure functions over tag lists: a caption line is a list of tags in, a list of tags out.

A caption is a comma-separated tag list (kohya's format). Nothing here touches files: the
caption editor, the taggers and the widgets all build on these functions.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Sequence

SEPARATOR = ", "
EXISTING_MODES = ("skip", "overwrite", "append", "prepend")
SORT_KEYS = ("alphabetical", "frequency")
REPLACE_MODES = ("any", "all")


def split_tags(text: str, separator: str = ",") -> list[str]:
    """``"a, b ,,c"`` -> ``["a", "b", "c"]``: split on the separator, strip, drop empty tags."""
    sep = separator.strip() or separator
    return [t.strip() for t in text.split(sep) if t.strip()]


def as_tags(tags: str | Iterable[str]) -> list[str]:
    """Accept ``"a, b"`` or ``["a", "b"]``; always return a clean tag list."""
    if isinstance(tags, str):
        return split_tags(tags)
    return [t.strip() for t in tags if t and t.strip()]


def join_tags(tags: Iterable[str], separator: str = SEPARATOR) -> str:
    return separator.join(tags)


def dedupe(tags: Sequence[str]) -> list[str]:
    """Drop repeated tags, keeping the first occurrence and the order."""
    return list(dict.fromkeys(tags))


def add_tags(tags: Sequence[str], new: Sequence[str], position: str = "front") -> list[str]:
    """Put ``new`` at the front (prefix, activation tags) or the back (suffix).

    A tag that is already in the caption moves to that place rather than appearing twice.
    """
    if position not in ("front", "back"):
        raise ValueError(f"position must be 'front' or 'back', not {position!r}")
    new = dedupe(new)
    rest = [t for t in tags if t not in new]
    return new + rest if position == "front" else rest + new


def tag_matcher(names: Sequence[str] = (), globs: Sequence[str] = (), regexes: Sequence[str] = ()):
    """A predicate that is true for a tag equal to a name, matching a glob, or fully matching a regex."""
    exact = set(names)
    compiled = [re.compile(r) for r in regexes]

    def match(tag: str) -> bool:
        return (
            tag in exact
            or any(fnmatch.fnmatchcase(tag, g) for g in globs)
            or any(r.fullmatch(tag) for r in compiled)
        )

    return match


def remove_tags(
    tags: Sequence[str], names: Sequence[str] = (), globs: Sequence[str] = (), regexes: Sequence[str] = ()
) -> list[str]:
    """Remove tags by exact name, shell-style glob (``*hair*``) or regular expression (full match)."""
    match = tag_matcher(names, globs, regexes)
    return [t for t in tags if not match(t)]


def has_tags(tags: Sequence[str], all_of: Sequence[str] = (), any_of: Sequence[str] = ()) -> bool:
    """The AND/OR condition: every tag of ``all_of`` present and (if given) at least one of ``any_of``."""
    present = set(tags)
    if any(t not in present for t in all_of):
        return False
    return not any_of or any(t in present for t in any_of)


def replace_tags(tags: Sequence[str], old: Sequence[str], new: Sequence[str], mode: str = "any") -> list[str]:
    """Replace the tags ``old`` by ``new`` where the first of them stood.

    ``mode="any"`` (OR) replaces whichever of ``old`` are present; ``mode="all"`` (AND) only acts
    when every tag of ``old`` is present. ``new`` may be empty (a removal) or several tags; a new
    tag already elsewhere in the caption is not repeated.
    """
    if mode not in REPLACE_MODES:
        raise ValueError(f"mode must be one of {', '.join(REPLACE_MODES)}, not {mode!r}")
    old_set = set(old)
    found = [i for i, t in enumerate(tags) if t in old_set]
    if not found or (mode == "all" and not old_set <= set(tags)):
        return list(tags)
    head = [t for t in tags[: found[0]] if t not in old_set]
    tail = [t for t in tags[found[0]:] if t not in old_set]
    inserted = [t for t in dedupe(new) if t not in head and t not in tail]
    return head + inserted + tail


def substitute(tags: Sequence[str], pattern: str, repl: str) -> list[str]:
    """``re.sub(pattern, repl, tag)`` in every tag (e.g. ``"_"`` -> ``" "``); tags left empty are dropped."""
    compiled = re.compile(pattern)
    out = (compiled.sub(repl, t).strip() for t in tags)
    return [t for t in out if t]


def sort_tags(
    tags: Sequence[str], by: str = "alphabetical", counts: Counter[str] | None = None, keep: int = 0
) -> list[str]:
    """Sort the tags after the first ``keep`` (kohya's ``keep_tokens``, e.g. an activation tag).

    ``by="frequency"`` puts the tags most common in ``counts`` first (ties alphabetical).
    """
    if by not in SORT_KEYS:
        raise ValueError(f"sort by must be one of {', '.join(SORT_KEYS)}, not {by!r}")
    head, tail = list(tags[:keep]), list(tags[keep:])
    if by == "alphabetical":
        return head + sorted(tail)
    counts = counts or Counter()
    return head + sorted(tail, key=lambda t: (-counts[t], t))


def merge_tags(existing: Sequence[str] | None, new: Sequence[str], mode: str) -> list[str] | None:
    """What a tagger writes when a caption already exists; ``None`` means leave the file alone.

    ``append`` keeps the existing tags and adds the new ones not already there (kohya's
    ``--append_tags``); ``prepend`` puts the new tags first; ``overwrite`` replaces; ``skip`` keeps.
    """
    if mode not in EXISTING_MODES:
        raise ValueError(f"existing-caption mode must be one of {', '.join(EXISTING_MODES)}, not {mode!r}")
    if existing is None or mode == "overwrite":
        return list(new)
    if mode == "skip":
        return None
    if mode == "append":
        return list(existing) + [t for t in new if t not in existing]
    return list(new) + [t for t in existing if t not in new]


def count_tags(captions: Iterable[Iterable[str]]) -> Counter[str]:
    """How many captions contain each tag (a tag repeated in one caption counts once)."""
    counts: Counter[str] = Counter()
    for tags in captions:
        counts.update(set(tags))
    return counts


def escape_brackets(tag: str) -> str:
    """``smile_(expression)`` -> ``smile_\\(expression\\)``: A1111 reads bare brackets as emphasis."""
    return tag.replace("(", "\\(").replace(")", "\\)")


def unescape_brackets(tag: str) -> str:
    return tag.replace("\\(", "(").replace("\\)", ")")
