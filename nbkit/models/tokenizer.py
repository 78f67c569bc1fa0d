"""CLIP byte-level BPE vocabularies built in code.

Two uses:
- tiny test/demo models get a small real BPE vocabulary learned from a word list, so
  nothing is downloaded;
- the shipped SD configs get the real CLIP vocabulary rebuilt from OpenAI's merge list
  (the same construction CLIP's ``SimpleTokenizer`` uses), see ``clip_vocab_from_merges``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from itertools import pairwise

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"

# Words the demo captions and the tests use; merges are learned from them so captions
# tokenize into a handful of tokens instead of single characters.
DEFAULT_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "drawing", "painting", "style", "sks", "ohwx", "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown", "cyan", "magenta", "circle", "square", "triangle", "star", "ring", "cross", "diamond", "stripe", "stripes", "dots", "shape", "shapes", "small", "large", "big", "tiny", "background", "dark", "light", "bright", "centered", "dog", "cat", "person", "man", "woman", "portrait", "landscape", "anime", "illustration", "1girl", "solo", "smile", "looking", "at", "viewer"]


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-symbol table of GPT-2/CLIP, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_symbols(word: str, table: dict[int, str]) -> list[str]:
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] = symbols[-1] + EOW
    return symbols


def learn_merges(words: Iterable[str], num_merges: int = 400) -> list[tuple[str, str]]:
    """Learn BPE merges from a word list (deterministic: ties break on the pair text)."""
    table = bytes_to_unicode()
    corpus = Counter(w.lower() for w in words if w)
    seqs = {w: _word_symbols(w, table) for w in corpus}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, seq in seqs.items():
            for pair in pairwise(seq):
                pairs[pair] += corpus[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def clip_vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: 256 byte symbols, their ``</w>`` forms, merges, then BOS/EOS."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + EOW for s in symbols]
    vocab += ["".join(m) for m in merges]
    vocab += [BOS, EOS]
    out: dict[str, int] = {}
    for token in vocab:
        out.setdefault(token, len(out))
    return out


def build_tiny_tokenizer(pad_token: str = EOS, model_max_length: int = 77, words: Iterable[str] = DEFAULT_WORDS):
    """A real ``CLIPTokenizer`` with a small vocabulary learned in code (no download)."""
    from transformers import CLIPTokenizer

    merges = learn_merges(words)
    vocab = clip_vocab_from_merges(merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
