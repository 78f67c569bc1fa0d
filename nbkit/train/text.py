"""Text conditioning for SD1/SD2 training, as kohya sd-scripts does it.

- ``max_token_length`` 75 (default), 150 or 225: longer captions are cut into 75-token
  chunks, each encoded as its own ``<BOS> ... <EOS>`` sequence of 77, and the hidden states
  re-joined as ``BOS + 75 * n + EOS`` (kohya ``strategy_base.TokenizeStrategy._get_input_ids``
  and ``strategy_sd.SdTextEncodingStrategy.encode_tokens``). This differs from A1111, which
  cuts at commas.
- ``clip_skip=n``: ``hidden_states[-n]`` followed by the final LayerNorm, for SD1 and SD2
  alike (kohya warns that it is not meant for v2).
- ``weighted_captions``: A1111 ``(tag:1.3)`` / ``(tag)`` / ``[tag]`` syntax; each token's
  hidden state is multiplied by its weight, with no mean renormalisation (kohya
  ``encode_tokens_with_weights``; only the old ``get_weighted_text_embeddings`` used for
  sampling renormalised).

Tokenizers whose pad token is the EOS token (SD1) and those with a separate pad token (SD2,
``!``) are told apart the way kohya does: ``pad_token_id == eos_token_id``.
"""

from __future__ import annotations

import logging
import re
import warnings

import torch

logger = logging.getLogger(__name__)

CHUNK = 75  # tokens between BOS and EOS in one CLIP window of 77
ALLOWED_MAX_TOKEN_LENGTHS = (75, 150, 225)

# A1111 / kohya ``re_attention``
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)


def count_chunks(max_token_length: int | None) -> int:
    """Number of 77-token windows: 1 for ``None``/75, 2 for 150, 3 for 225."""
    if max_token_length is None:
        return 1
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length={max_token_length}: choose 75, 150 or 225 (kohya allows only these)")
    return max_token_length // CHUNK


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a caption into ``(text, weight)`` runs (A1111 / kohya ``parse_prompt_attention``).

    ``(abc)`` x1.1, ``(abc:3.12)`` x3.12, ``[abc]`` /1.1, nesting multiplies, ``\\(`` ``\\)``
    ``\\[`` ``\\]`` ``\\\\`` are literals, unbalanced brackets apply to the rest of the text,
    neighbouring runs of equal weight are merged.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            res.append([token, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge runs of identical weights
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def _weighted_ids(tokenizer, text: str, max_length: int) -> tuple[list[int], list[float]]:
    """``[BOS] tokens [EOS] [PAD]...`` of ``max_length`` and one weight per position
    (kohya ``_get_weighted_input_ids``: each run is tokenized on its own)."""
    limit = max_length - 2
    tokens: list[int] = []
    weights: list[float] = []
    for word, weight in parse_prompt_attention(text):
        ids = tokenizer(word, verbose=False).input_ids[1:-1]
        tokens += ids
        weights += [weight] * len(ids)
        if len(tokens) > limit:
            break
    if len(tokens) > limit:
        logger.warning("caption truncated to %d tokens: %s", limit, text[:80])
        tokens, weights = tokens[:limit], weights[:limit]
    ids = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (limit - len(tokens))
    return ids, [1.0, *weights] + [1.0] * (max_length - 1 - len(weights))


def _split_chunks(tokenizer, ids: torch.Tensor, max_length: int) -> torch.Tensor:
    """``[max_length]`` ids -> ``[n, 77]`` windows ``ids[0] + 75 ids + ids[-1]``. With a
    separate pad token (SD2) a window ending in a real token gets EOS as its last token, and
    a window that is only padding starts ``<BOS> <EOS> <PAD>...`` (kohya ``_get_input_ids``)."""
    window = tokenizer.model_max_length
    if max_length <= window:
        return ids[None]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for i in range(1, max_length - window + 2, window - 2):
        chunk = torch.cat((ids[0:1], ids[i : i + window - 2], ids[-1:]))
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def _max_length(tokenizer, max_token_length: int | None) -> int:
    window = tokenizer.model_max_length
    if window != CHUNK + 2:
        raise ValueError(f"expected a CLIP tokenizer with model_max_length 77, got {window}")
    return window if max_token_length is None else count_chunks(max_token_length) * CHUNK + 2


def tokenize_chunks(tokenizer, captions: list[str], *, max_token_length: int | None = None) -> torch.Tensor:
    """Token ids ``[B, n, 77]`` (n = ``count_chunks``), each window ``<BOS> ... <EOS|PAD>``
    (kohya ``SdTokenizeStrategy.tokenize``)."""
    max_length = _max_length(tokenizer, max_token_length)
    ids = tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).input_ids
    return torch.stack([_split_chunks(tokenizer, row, max_length) for row in ids])


def tokenize_chunks_with_weights(
    tokenizer, captions: list[str], *, max_token_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights, both ``[B, n, 77]``, for weighted captions; BOS, EOS
    and padding have weight 1 (kohya ``SdTokenizeStrategy.tokenize_with_weights``)."""
    max_length = _max_length(tokenizer, max_token_length)
    all_ids, all_weights = [], []
    for caption in captions:
        ids, weights = _weighted_ids(tokenizer, caption, max_length)
        chunks = _split_chunks(tokenizer, torch.tensor(ids), max_length)
        w = torch.tensor(weights)
        if chunks.shape[0] == 1:
            chunk_w = w[None]
        else:
            chunk_w = torch.ones(chunks.shape)
            for k in range(chunks.shape[0]):
                chunk_w[k, 1 : 1 + CHUNK] = w[1 + k * CHUNK : 1 + (k + 1) * CHUNK]
        all_ids.append(chunks)
        all_weights.append(chunk_w)
    return torch.stack(all_ids), torch.stack(all_weights)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """The CLIP text model's final LayerNorm (``text_model.final_layer_norm`` before
    transformers 5, ``final_layer_norm`` after)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm


def _run_encoder(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


def encode_chunks(text_encoder, ids: torch.Tensor, *, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states for ``[B, n, 77]`` ids: ``[B, 77, H]`` for n = 1, else the first
    window's BOS, every window's 75 middle states and the last window's final state,
    ``[B, n*75 + 2, H]`` (kohya ``SdTextEncodingStrategy.encode_tokens``).

    kohya's SD2 branch also tries to patch windows that are pure padding, but its test
    compares a token id with the EOS *string* and never fires, so SD1 and SD2 re-join alike.
    """
    b, n, window = ids.shape
    hidden = _run_encoder(text_encoder, ids.reshape(-1, window), clip_skip)
    hidden = hidden.reshape(b, n * window, hidden.shape[-1])
    if n == 1:
        return hidden
    parts = [hidden[:, :1]]
    parts += [hidden[:, i : i + window - 2] for i in range(1, n * window, window)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each position's hidden state by its caption weight, no renormalisation
    (kohya ``encode_tokens_with_weights``). ``weights`` is ``[B, n, 77]``; the joined BOS and
    EOS keep weight 1."""
    b, n, _ = weights.shape
    weights = weights.to(hidden.device, hidden.dtype)
    if n == 1:
        return hidden * weights[:, 0, :, None]
    ones = torch.ones(b, 1, device=hidden.device, dtype=hidden.dtype)
    flat = torch.cat([ones, weights[:, :, 1:-1].reshape(b, n * CHUNK), ones], dim=1)
    return hidden * flat[:, :, None]


def encode_text(
    tokenizer,
    text_encoder,
    captions: list[str],
    *,
    max_token_length: int | None = None,
    clip_skip: int | None = None,
    weighted_captions: bool = False,
    v2: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """UNet conditioning ``[B, 77, H]`` (75 tokens) or ``[B, n*75 + 2, H]`` (150/225) for
    captions, as kohya's training scripts compute it.

    ``clip_skip`` ``None`` or 1 give the last layer (1 goes through ``hidden_states[-1]`` and
    the final LayerNorm, which is the same tensor). ``v2`` only checks the tokenizer (SD2 pads
    with a separate token) and warns about ``clip_skip`` like kohya; the padding rules follow
    the tokenizer itself.
    """
    if clip_skip is not None and clip_skip < 1:
        raise ValueError(f"clip_skip={clip_skip}: use 1 or more (or None)")
    pad_is_eos = tokenizer.pad_token_id == tokenizer.eos_token_id
    if v2 and pad_is_eos:
        warnings.warn("v2=True but the tokenizer pads with EOS like SD1: is this an SD2 tokenizer?", stacklevel=2)
    if v2 and clip_skip is not None:
        warnings.warn("clip_skip with v2 is not what SD2 was trained with (kohya warns too)", stacklevel=2)
    device = device if device is not None else text_encoder.device
    if weighted_captions:
        ids, weights = tokenize_chunks_with_weights(tokenizer, captions, max_token_length=max_token_length)
        hidden = encode_chunks(text_encoder, ids.to(device), clip_skip=clip_skip)
        return apply_token_weights(hidden, weights)
    ids = tokenize_chunks(tokenizer, captions, max_token_length=max_token_length)
    return encode_chunks(text_encoder, ids.to(device), clip_skip=clip_skip)
