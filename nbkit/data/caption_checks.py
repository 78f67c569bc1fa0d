"""Caption checks of ``nbkit dataset check``: the caption file kohya would read for an image
(missing, empty, not UTF-8, extra lines) and its length in CLIP tokens against ``max_token_length``.

Tokens are counted with CLIP's own BPE vocabulary rebuilt offline from the merge list nbkit ships
(:mod:`nbkit.models.config_dirs`), the tokenizer of SD1.x and SD2.x alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nbkit.data.image_checks import ERROR, FIXABLE, WARNING, Problem, read_text_tolerant

CHUNK = 75  # tokens between <BOS> and <EOS> in one CLIP window (kohya's max_token_length default)
LONGER = {75: 150, 150: 225}  # kohya allows 75, 150 and 225


@dataclass
class CaptionCheck:
    path: Path  # the caption file kohya would read (it may not exist)
    status: str  # "found", "missing" or "empty"
    text: str | None = None
    encoding: str | None = None
    problems: list[Problem] = field(default_factory=list)


def check_caption(image: Path, extension: str, class_tokens: str | None) -> CaptionCheck:
    """The caption kohya would read for ``image``: missing, empty, encoding, extra lines."""
    path = image.with_suffix(extension)
    fallback = f"it trains with the class tokens '{class_tokens}'" if class_tokens else None
    stop = ("training stops here: write the caption (e.g. with `nbkit tag`), or set class_tokens for this subset "
            "(a folder named like '10_sks dog')")
    if not path.is_file():
        check = CaptionCheck(path, "missing")
        if not fallback:
            check.problems.append(Problem(image, ERROR, "no-caption", f"has no caption file {path.name} and the "
                                          "subset has no class_tokens", stop))
        return check
    text, encoding = read_text_tolerant(path)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    check = CaptionCheck(path, "found" if lines else "empty", text, encoding)
    if encoding not in ("utf-8", "utf-8-sig"):
        sample = next((w for w in text.split() if any(ord(c) > 127 for c in w)), "")
        seen = f" (read as {encoding}: '{sample}')" if sample else ""
        check.problems.append(Problem(path, FIXABLE, "encoding", f"is not UTF-8 text{seen}; training stops with an "
                                      "encoding error", "re-save it as UTF-8 in a text editor; the --fix_to copy is "
                                      "re-encoded as UTF-8"))
    elif encoding == "utf-8-sig":
        check.problems.append(Problem(path, FIXABLE, "bom", "starts with an invisible byte-order mark that becomes "
                                      "part of the first tag", "re-save it as UTF-8 without BOM; the --fix_to copy has "
                                      "none"))
    if not lines:
        check.problems.append(Problem(path, WARNING if fallback else ERROR, "empty-caption", "is empty",
                                      f"write the caption; until then {fallback}" if fallback else stop))
    elif len(lines) > 1:
        check.problems.append(Problem(path, WARNING, "multi-line", f"has {len(lines)} lines; only the first is used "
                                      "(enable_wildcard picks one at random)", "join the lines with ', ' if they "
                                      "are all tags of this image"))
    return check


@lru_cache(maxsize=1)
def clip_tokenizer():
    """CLIP ViT-L/14's tokenizer built from nbkit's bundled merge list (no download)."""
    from transformers import CLIPTokenizer

    from nbkit.models.config_dirs import clip_merges, clip_vocab
    from nbkit.models.tokenizer import EOS

    return CLIPTokenizer(vocab=clip_vocab(), merges=list(clip_merges()), pad_token=EOS, model_max_length=CHUNK + 2)


def caption_token_ids(text: str) -> list[int]:
    """The caption's CLIP token ids, without <BOS>/<EOS>, untruncated."""
    return clip_tokenizer()(text, add_special_tokens=False, verbose=False).input_ids


def count_tokens(text: str) -> int:
    return len(caption_token_ids(text))


def _could_exceed(text: str, limit: int) -> bool:
    """Cheap bound: a BPE token holds at least one byte of a word, so a short caption needs no tokenizer."""
    return len(re.sub(r"\s+", "", text.lower()).encode("utf-8")) > limit


def long_caption_problem(check: CaptionCheck, prefix: str | None, suffix: str | None, wildcard: bool,
                         max_token_length: int | None) -> Problem | None:
    """A warning when the caption training uses (prefix + caption + suffix; with wildcards its longest
    line) has more CLIP tokens than ``max_token_length`` (75 when unset): the rest is cut off."""
    limit = max_token_length or CHUNK
    lines = [line.strip() for line in (check.text or "").splitlines() if line.strip()]
    if not lines:
        return None
    texts = [" ".join(t for t in (prefix, line, suffix) if t) for line in (lines if wildcard else lines[:1])]
    texts = [t for t in texts if _could_exceed(t, limit)]
    if not texts:
        return None
    ids = max((caption_token_ids(t) for t in texts), key=len)
    if len(ids) <= limit:
        return None
    cut = clip_tokenizer().decode(ids[limit:limit + 6]).strip()
    longer = LONGER.get(limit)
    fix = (f"shorten it (drop tags that add little), or set max_token_length = {longer} in the run (kohya's "
           "longer captions)" if longer else "shorten it: 225 is the most max_token_length allows")
    return Problem(check.path, WARNING, "caption-too-long", f"has {len(ids)} tokens; max_token_length {limit} keeps "
                   f"the first {limit}, so {len(ids) - limit} are cut (from '{cut} ...')", fix)
