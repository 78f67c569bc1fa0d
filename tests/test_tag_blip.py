"""BLIP captioning end to end on a tiny random BLIP saved to a folder (gibberish text, real files)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nbkit.tag.blip import caption_images, load_blip, strip_prompt, with_prefix
from nbkit.tag.config import BlipCaptionConfig
from nbkit.tag.tiny import BLIP_WORDS as WORDS
from nbkit.tag.tiny import make_tiny_blip

PROMPT_TOKENS = 4  # [DEC] a picture of


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices run faster on one thread, and far faster on a busy 2-core machine (no OpenMP spinning)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A random BLIP + processor (BERT WordPiece tokenizer, PIL image processor) saved like a Hub repo."""
    return make_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


def images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGBA", (40 + 8 * i, 30), (60 * i, 100, 200, 128)).save(folder / f"img{i}.png")
    return folder


def test_prefix_and_prompt_helpers():
    assert with_prefix("sks", "a dog on a bed") == "sks, a dog on a bed"
    assert with_prefix("sks, ", "a dog") == "sks, a dog"
    assert with_prefix("a photo of sks ", "a dog") == "a photo of sks a dog"
    assert with_prefix("", "a dog") == "a dog" and with_prefix("sks", "") == "sks"
    assert strip_prompt("a picture of a dog", "a picture of ") == "a dog"
    assert strip_prompt("A Picture Of cats", "a picture of") == "cats"
    assert strip_prompt("two cats", "") == "two cats"


def test_sampling_writes_captions_with_extension_prefix_and_lengths(tiny_blip, tmp_path):
    folder = images(tmp_path / "img")
    config = BlipCaptionConfig(model_id=str(tiny_blip), caption_extension="cap", prefix="sks", max_length=12,
                               min_length=8, batch_size=2, device="cpu")
    report = caption_images(folder, config, progress=False, verbose=False)
    assert (report.images, report.written, report.failed) == (3, 3, [])
    for i in range(3):
        text = (folder / f"img{i}.cap").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1
        assert text.startswith("sks, ")
        words = text[len("sks, "):].split()
        assert 1 <= len(words) <= 12 - PROMPT_TOKENS  # max_length counts the prompt tokens, as kohya's
        assert all(w.startswith("w") or w in WORDS for w in words)
        assert not text[len("sks, "):].startswith("a picture of")  # the prompt is removed
    again = caption_images(folder, config, progress=False, verbose=False)  # same seed: same captions
    assert again.written == 3 and report.counts == again.counts


def test_beam_search_default_extension_and_existing_modes(tiny_blip, tmp_path):
    folder = images(tmp_path / "img", 2)
    blip = load_blip(str(tiny_blip), device="cpu")  # the code path a Hub id takes, loaded by path
    (folder / "img0.caption").write_text("kept caption", encoding="utf-8")
    config = BlipCaptionConfig(beam_search=True, num_beams=2, max_length=10, min_length=6,
                               existing_captions="skip")
    report = caption_images(folder, config, blip=blip, progress=False, verbose=False)
    assert (report.skipped, report.written) == (1, 1)
    assert (folder / "img0.caption").read_text(encoding="utf-8") == "kept caption"
    first = (folder / "img1.caption").read_text(encoding="utf-8")
    assert 1 <= len(first.split()) <= 10 - PROMPT_TOKENS
    config.existing_captions = "prepend"
    caption_images(folder, config, blip=blip, progress=False, verbose=False)
    text = (folder / "img0.caption").read_text(encoding="utf-8")
    assert text.endswith(", kept caption\n") and len(text) > len("kept caption\n")
    beam_again = (folder / "img1.caption").read_text(encoding="utf-8")
    assert beam_again == first  # beam search is deterministic; prepend skips what is already there


def test_missing_model_offline_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load a BLIP captioning model"):
        load_blip("nbkit-tests/no-such-blip", cache_dir=str(tmp_path / "hf"), device="cpu")


def test_cli_blip(tiny_blip, tmp_path, capsys):
    from nbkit.cli import main

    folder = images(tmp_path / "img", 1)
    assert main(["tag", "blip", str(folder), "--model_id", str(tiny_blip), "--prefix", "a photo of sks ",
                 "--max_length", "9", "--device", "cpu"]) == 0
    assert (folder / "img0.caption").read_text(encoding="utf-8").startswith("a photo of sks w")
    assert "images/s" in capsys.readouterr().out
