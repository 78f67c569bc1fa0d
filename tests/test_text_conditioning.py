"""Text conditioning against kohya: 75-token chunks, clip_skip, A1111 weighted captions."""

from __future__ import annotations

import pytest
import torch

from nbkit.train import text as T

LONG = "red dog " * 40  # 80 tokens with the tiny vocabulary: spills into the second window
SHORT = "a photo of a cat"


@pytest.fixture(scope="module", params=["sd15", "sd21-v"])
def clip(request):
    from nbkit.models.tiny import build_tiny_components

    parts = build_tiny_components(request.param)
    return request.param, parts["tokenizer"], parts["text_encoder"]


def plain_clip(tokenizer, text_encoder, captions):
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("a (red:1.5) [ball]", [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("ball", 1 / 1.1)]),
        ("((nested))", [("nested", 1.1 * 1.1)]),
        ("((tag:1.2))", [("tag", 1.2 * 1.1)]),
        ("[[small]]", [("small", 1 / 1.1 / 1.1)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a \(red\) (ball)", [("a (red) ", 1.0), ("ball", 1.1)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parse_prompt_attention(text, expected):
    got = T.parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_count_chunks():
    assert [T.count_chunks(n) for n in (None, 75, 150, 225)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="75, 150 or 225"):
        T.count_chunks(100)


# ---------------------------------------------------------------- tokens


def test_token_windows(clip):
    arch, tok, _ = clip
    ids = T.tokenize_chunks(tok, [LONG, SHORT], max_token_length=225)
    assert ids.shape == (2, 3, 77)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert (ids[:, :, 0] == bos).all()
    flat = tok([LONG], padding="max_length", max_length=227, truncation=True, return_tensors="pt").input_ids[0]
    for k in range(3):  # every window carries the next 75 tokens of the caption
        assert torch.equal(ids[0, k, 2:76], flat[2 + 75 * k : 76 + 75 * k])
    assert torch.equal(ids[0, :2, 1], flat[[1, 76]])  # (position 1 of the empty third window: see below)
    if arch == "sd15":  # pad == EOS: windows end with the caption's last (EOS) token
        assert (ids[:, :, -1] == eos).all()
    else:  # SD2: a window ending in a real token ends in EOS; an empty window starts <BOS> <EOS> <PAD>
        assert pad != eos
        assert ids[0, 0, -2] not in (eos, pad) and ids[0, 0, -1] == eos
        assert ids[0, 2, 1] == eos and (ids[0, 2, 2:] == pad).all()
        assert ids[1, 1, 1] == eos and ids[1, 1, -1] == pad


def test_default_tokens_are_one_window(clip):
    _, tok, _ = clip
    ids = T.tokenize_chunks(tok, [SHORT])
    expected = tok([SHORT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids[:, 0], expected) and ids.shape == (1, 1, 77)
    assert torch.equal(T.tokenize_chunks(tok, [SHORT], max_token_length=75), ids)


# ---------------------------------------------------------------- encoding


@torch.no_grad()
def test_75_tokens_equals_plain_clip(clip):
    _, tok, te = clip
    from nbkit.train.common import encode_prompts

    got = T.encode_text(tok, te, [SHORT, LONG])
    assert got.shape[:2] == (2, 77)
    torch.testing.assert_close(got, plain_clip(tok, te, [SHORT, LONG]))
    torch.testing.assert_close(got, encode_prompts(tok, te, [SHORT, LONG], None, "cpu"))


@torch.no_grad()
def test_225_tokens_joins_separately_encoded_windows(clip):
    _, tok, te = clip
    got = T.encode_text(tok, te, [LONG, SHORT], max_token_length=225)
    assert got.shape[:2] == (2, 3 * 75 + 2)
    ids = T.tokenize_chunks(tok, [LONG, SHORT], max_token_length=225)
    windows = [te(ids[:, k])[0] for k in range(3)]  # each window encoded on its own
    expected = torch.cat([windows[0][:, :1]] + [w[:, 1:76] for w in windows] + [windows[2][:, 76:]], dim=1)
    torch.testing.assert_close(got, expected)
    # the long caption's second window really holds caption tokens, not padding
    assert not torch.allclose(got[0, 76:151], got[1, 76:151])
    assert T.encode_text(tok, te, [LONG], max_token_length=150).shape[1] == 152


@torch.no_grad()
def test_clip_skip(clip):
    _, tok, te = clip
    ids = tok([SHORT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids, output_hidden_states=True).hidden_states
    got = T.encode_text(tok, te, [SHORT], clip_skip=2)
    torch.testing.assert_close(got, te.final_layer_norm(hidden[-2]))
    assert not torch.allclose(got, T.encode_text(tok, te, [SHORT]))
    torch.testing.assert_close(T.encode_text(tok, te, [SHORT], clip_skip=1), T.encode_text(tok, te, [SHORT]))
    long = T.encode_text(tok, te, [LONG], clip_skip=2, max_token_length=150)
    ids2 = T.tokenize_chunks(tok, [LONG], max_token_length=150)[0]
    second = te.final_layer_norm(te(ids2[1:2], output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(long[0, 76:151], second[0, 1:76])  # clip_skip in every window


def test_v2_warnings(clip):
    arch, tok, te = clip
    if arch == "sd21-v":
        with pytest.warns(UserWarning, match="clip_skip"):
            T.encode_text(tok, te, [SHORT], clip_skip=2, v2=True)
    else:
        with pytest.warns(UserWarning, match="SD2 tokenizer"):
            T.encode_text(tok, te, [SHORT], v2=True)


# ---------------------------------------------------------------- weighted captions


def test_weighted_tokens_match_plain_tokens(clip):
    _, tok, _ = clip
    ids, weights = T.tokenize_chunks_with_weights(tok, ["a (red:1.5) [dog]", "(cat)"])
    plain = T.tokenize_chunks(tok, ["a red dog", "cat"])
    assert torch.equal(ids, plain)
    red = tok("red").input_ids[1:-1]
    a = tok("a").input_ids[1:-1]
    assert len(red) == 1 and len(a) == 1  # so "red" is at position 2
    expected = torch.ones(2, 1, 77)
    expected[0, 0, 2] = 1.5
    expected[0, 0, 3 : 3 + len(tok("dog").input_ids) - 2] = 1 / 1.1
    expected[1, 0, 1 : 1 + len(tok("cat").input_ids) - 2] = 1.1
    torch.testing.assert_close(weights, expected)


@torch.no_grad()
def test_weights_scale_hidden_states_without_renormalising(clip):
    _, tok, te = clip
    weighted = T.encode_text(tok, te, ["a (red:1.5) dog"], weighted_captions=True)
    plain = T.encode_text(tok, te, ["a red dog"])
    torch.testing.assert_close(weighted[0, 2], plain[0, 2] * 1.5)
    keep = [i for i in range(77) if i != 2]
    torch.testing.assert_close(weighted[0, keep], plain[0, keep])  # everything else untouched, no rescaling
    unweighted = T.encode_text(tok, te, ["a red dog"], weighted_captions=True)
    torch.testing.assert_close(unweighted, plain)


@torch.no_grad()
def test_weights_in_later_windows(clip):
    _, tok, te = clip
    caption = LONG + "(cat:2)"  # "cat" is token 81: second window, position 6
    weighted = T.encode_text(tok, te, [caption], weighted_captions=True, max_token_length=150)
    plain = T.encode_text(tok, te, [LONG + "cat"], max_token_length=150)
    assert weighted.shape[1] == 152
    _, weights = T.tokenize_chunks_with_weights(tok, [caption], max_token_length=150)
    assert (weights != 1).nonzero().tolist() == [[0, 1, 6]]
    torch.testing.assert_close(weighted[0, 81], plain[0, 81] * 2)
    keep = [i for i in range(152) if i != 81]
    torch.testing.assert_close(weighted[0, keep], plain[0, keep])
