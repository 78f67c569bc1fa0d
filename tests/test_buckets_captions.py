"""kohya's buckets and caption processing, on fixed examples worked out by hand from sd-scripts."""

from __future__ import annotations

import random

import pytest

from nbkit.data.buckets import BucketManager, bucket_report, crop_box, make_bucket_resolutions
from nbkit.data.captions import CaptionOptions, CaptionState, process_caption

KOHYA_512 = sorted([
    (256, 1024), (1024, 256), (320, 768), (768, 320), (384, 640), (640, 384), (448, 576), (576, 448),
    (512, 512), (320, 704), (704, 320), (256, 832), (832, 256), (256, 896), (896, 256), (256, 960), (960, 256),
])  # fmt: skip
KOHYA_768 = sorted([
    (256, 1024), (1024, 256), (320, 1024), (1024, 320), (384, 1024), (1024, 384), (448, 1024), (1024, 448),
    (512, 1024), (1024, 512), (576, 1024), (1024, 576), (640, 896), (896, 640), (704, 832), (832, 704),
    (768, 768), (960, 576), (576, 960),
])  # fmt: skip


def test_bucket_lists_equal_kohya():
    assert make_bucket_resolutions((512, 512)) == KOHYA_512
    assert len(KOHYA_512) == 17
    assert make_bucket_resolutions((768, 768)) == KOHYA_768


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((1000, 500), (704, 320), (704, 352)),  # AR 2.0: nearest is 2.2, wider bucket: match widths
        ((500, 500), (512, 512), (512, 512)),  # square, upscaled to cover
        ((300, 900), (256, 832), (277, 832)),  # AR 0.333: nearest 0.3077, match heights
        ((576, 448), (576, 448), (576, 448)),  # an exact bucket size is kept
        ((4000, 3000), (576, 448), (597, 448)),  # AR 1.333 -> 1.286
    ],
)
def test_image_to_bucket_like_kohya(size, bucket, resized):
    choice = BucketManager((512, 512)).select_bucket(*size)
    assert (choice.reso, choice.resized_size) == (bucket, resized)


def test_no_upscale_and_single_bucket():
    manager = BucketManager((512, 512), no_upscale=True)
    assert manager.select_bucket(300, 200).reso == (256, 192)  # small: never upscaled, floored to 64
    big = manager.select_bucket(2000, 1000)
    assert (big.resized_size, big.reso) == ((640, 320), (640, 320))
    fixed = BucketManager((512, 512), enable_bucket=False).select_bucket(1000, 500)
    assert (fixed.reso, fixed.resized_size) == ((512, 512), (1024, 512))
    assert crop_box((1024, 512), (512, 512)) == (256, 0, 768, 512)
    assert bucket_report([(512, 512), (704, 320), (512, 512)], [2, 1, 3]) == [((512, 512), 2, 5), ((704, 320), 1, 1)]


def _run(caption, seed=0, state=None, **options):
    return process_caption(caption, CaptionOptions(**options), random.Random(seed), state)


def test_caption_prefix_suffix_and_first_line():
    assert _run("a, b\nsecond line", caption_prefix="sks", caption_suffix="style") == "sks a, b"
    assert _run("a, b", caption_suffix="end") == "a, b end"


def test_keep_tokens_and_shuffle_are_seeded():
    caption = "sks, one, two, three, four, five"
    out = {_run(caption, seed, shuffle_caption=True, keep_tokens=1) for seed in range(20)}
    assert all(o.startswith("sks, ") for o in out) and len(out) > 5
    assert _run(caption, 3, shuffle_caption=True, keep_tokens=1) == _run(caption, 3, shuffle_caption=True, keep_tokens=1)
    assert sorted(_run(caption, 1, shuffle_caption=True, keep_tokens=1).split(", ")) == sorted(caption.split(", "))


def test_keep_tokens_separator_fixed_head_and_tail():
    caption = "sks, 1girl ||| red, blue, green ||| masterpiece, best"
    for seed in range(10):
        out = _run(caption, seed, shuffle_caption=True, keep_tokens_separator="|||").split(", ")
        assert out[:2] == ["sks", "1girl"] and out[-2:] == ["masterpiece", "best"]
        assert sorted(out[2:5]) == ["blue", "green", "red"]
    # Without shuffling/dropout/warm-up kohya leaves the caption (separator included) as it is.
    assert _run(caption, keep_tokens_separator="|||") == caption


def test_dropout_rates_and_every_n_epochs():
    assert _run("a, b", caption_dropout_rate=1.0) == ""
    assert _run("a, b", state=CaptionState(epoch=4), caption_dropout_every_n_epochs=2) == ""
    assert _run("a, b", state=CaptionState(epoch=3), caption_dropout_every_n_epochs=2) == "a, b"
    assert _run("keep, a, b, c", caption_tag_dropout_rate=1.0, keep_tokens=1) == "keep"
    kept = [_run("k, a, b, c, d, e, f, g", seed, caption_tag_dropout_rate=0.5, keep_tokens=1) for seed in range(50)]
    lengths = [len(k.split(", ")) for k in kept]
    assert min(lengths) >= 1 and 2 < sum(lengths) / len(lengths) < 7


def test_wildcards_escapes_and_lines():
    outs = {_run("a {red|blue} ball, {{literal}}", seed, enable_wildcard=True) for seed in range(20)}
    assert outs == {"a red ball, {literal}", "a blue ball, {literal}"}
    lines = {_run("first\nsecond", seed, enable_wildcard=True) for seed in range(20)}
    assert lines == {"first", "second"}


def test_token_warmup_and_secondary_separator():
    state = CaptionState(step=0, max_train_steps=100)
    assert _run("k, a, b, c, d", state=state, keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5) == "k, a"
    state.step = 25  # halfway through a 50-step warm-up: 1 + floor(25 * 3/50) = 2 flexible tags
    assert _run("k, a, b, c, d", state=state, keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5) == "k, a, b"
    assert _run("red;;blue, c", secondary_separator=";;") == "red,blue, c"
