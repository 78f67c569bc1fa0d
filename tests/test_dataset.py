"""Training items from kohya subsets: captions, repeats, reg balancing, image handling."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
from nbkit.data.images import DatasetError, open_rgb, resize
from nbkit.data.train_data import collect_items, epoch_batches, tag_frequency


def _images(folder, n, captions=None, ext=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + i, 30), (i * 20, 0, 0)).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}{ext}").write_text(captions[i % len(captions)])
    return folder


def test_captions_class_tokens_and_missing_caption(tmp_path):
    folder = _images(tmp_path / "a", 2, ["red, circle"], ext=".caption")
    (folder / "img1.caption").unlink()
    sub = SubsetSpec(image_dir=folder, class_tokens="sks dog")
    items, _ = collect_items([DatasetSpec(resolution=(32, 32), subsets=[sub])])
    assert [i.caption for i in items] == ["red, circle", "sks dog"]
    sub.class_tokens = None
    with pytest.raises(DatasetError, match=r"img1\.png.*no caption file 'img1\.caption'.*class_tokens"):
        collect_items([DatasetSpec(subsets=[sub])])


@pytest.mark.parametrize(("n_reg", "warns"), [(4, False), (6, True)])
def test_surplus_reg_images_are_left_out_like_kohya(tmp_path, n_reg, warns):
    """kohya train_util.py DreamBoothDataset: reg images are registered in order until there are as
    many reg samples as train samples; the rest are never used, and only reg > train warns."""
    import warnings

    train = SubsetSpec(image_dir=_images(tmp_path / "t", 2, ["x"]), num_repeats=2, caption_extension=".txt")
    reg = SubsetSpec(image_dir=_images(tmp_path / "r", n_reg, ["y"]), num_repeats=1, is_reg=True,
                     caption_extension=".txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items, _ = collect_items([DatasetSpec(resolution=(32, 32), subsets=[train, reg])])
    regs = [i for i in items if i.subset.is_reg]
    assert sum(i.repeats for i in regs) == 4  # as many reg samples as train samples (2 images x 2)
    assert [i.repeats for i in regs] == [1, 1, 1, 1] + [0] * (n_reg - 4)
    assert any("never used" in str(w.message) for w in caught) == warns


def test_reg_repeats_balanced_like_kohya(tmp_path):
    train = SubsetSpec(image_dir=_images(tmp_path / "t", 3, ["x"]), num_repeats=5, caption_extension=".txt")
    reg = SubsetSpec(image_dir=_images(tmp_path / "r", 4, ["y"]), num_repeats=1, is_reg=True, caption_extension=".txt")
    items, _ = collect_items([DatasetSpec(resolution=(32, 32), subsets=[train, reg])])
    assert sum(i.repeats for i in items if not i.subset.is_reg) == 15
    assert sum(i.repeats for i in items if i.subset.is_reg) == 15
    assert tag_frequency(items) == {"5_t": {"x": 3}, "1_r": {"y": 4}}


def test_epoch_batches_cover_every_repeat(tmp_path):
    sub = SubsetSpec(image_dir=_images(tmp_path / "t", 5, ["x"]), num_repeats=3, caption_extension=".txt")
    items, _ = collect_items([DatasetSpec(resolution=(32, 32), batch_size=2, subsets=[sub])])
    batches = epoch_batches(items, random.Random(0))
    flat = sorted(i for b in batches for i, _ in b)
    assert flat == sorted(list(range(5)) * 3)
    assert max(len(b) for b in batches) == 2


def test_rgba_onto_white_and_crop(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (60, 20), (255, 0, 0, 0)).save(path)
    image = open_rgb(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
    assert resize(image, (16, 16)).size == (16, 16)


def test_broken_image_is_skipped_with_its_name(tmp_path):
    folder = _images(tmp_path / "b", 2, ["x"])
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("x")
    with pytest.warns(UserWarning, match="broken.png.*cannot read"):
        items, _ = collect_items([DatasetSpec(subsets=[SubsetSpec(image_dir=folder, caption_extension=".txt")])])
    assert sorted(i.image.name for i in items) == ["img0.png", "img1.png"]
    (folder / "img0.png").write_bytes(b"")
    (folder / "img1.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the images"), pytest.warns(UserWarning):
        collect_items([DatasetSpec(subsets=[SubsetSpec(image_dir=folder, caption_extension=".txt")])])


def test_user_files_untouched(tmp_path):
    folder = _images(tmp_path / "u", 2, ["a, b"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    items, _ = collect_items([DatasetSpec(resolution=(16, 16), subsets=[SubsetSpec(image_dir=folder, caption_extension=".txt")])])
    from nbkit.data.train_data import load_pixels

    assert load_pixels(items[0])[0].shape == torch.Size([3, 16, 16])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_16bit_truncated_and_latin1_inputs(tmp_path):
    import numpy as np

    folder = _images(tmp_path / "odd", 1, ["ok"])
    Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16)).save(folder / "deep.png")  # 16-bit greyscale
    (folder / "deep.txt").write_text("deep")
    assert open_rgb(folder / "deep.png").getpixel((0, 0)) == (117, 117, 117)  # 30000 >> 8, not white
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "full.jpg", quality=95)
    (folder / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])  # valid header, truncated data
    (folder / "cut.txt").write_text("cut")
    Image.new("RGB", (8, 8)).save(folder / "latin.png")
    (folder / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.warns(UserWarning) as record:
        items, _ = collect_items([DatasetSpec(subsets=[SubsetSpec(image_dir=folder, caption_extension=".txt")])])
    assert sorted(i.image.name for i in items) == ["deep.png", "img0.png"]
    messages = " ".join(str(w.message) for w in record)
    assert "cut.jpg: cannot read" in messages and "latin.txt: not UTF-8" in messages
