"""Near-duplicates (pHash), A1111-style preprocessing and the dataset gallery; originals only read."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from nbkit.cli import main
from nbkit.data.dedup import find_near_duplicates, group_grid, quarantine_duplicates
from nbkit.data.gallery import _gallery_entries, dataset_gallery, display_image
from nbkit.data.images import DatasetError
from nbkit.data.importer import import_dataset
from nbkit.data.preprocess import (
    PreprocessOptions,
    crop_and_resize,
    preprocess_folder,
    split_count,
)


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def scene(seed: int, size=(128, 128)) -> Image.Image:
    """Random shapes on a flat background: pHashes of different seeds differ by 20+ bits."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        box = (x0, y0, x0 + rng.randrange(20, 80), y0 + rng.randrange(20, 80))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def jpeg_bytes(image: Image.Image, quality: int = 60) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_dup_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for seed in range(5):
        scene(seed).save(folder / f"s{seed}.png")
        (folder / f"s{seed}.txt").write_text(f"scene {seed}", encoding="utf-8")
    (folder / "s0_recompressed.jpg").write_bytes(jpeg_bytes(scene(0)))
    scene(0).resize((100, 100)).save(folder / "s0_small.png")
    (folder / "s0_small.txt").write_text("small copy", encoding="utf-8")
    ImageEnhance.Brightness(scene(1)).enhance(1.05).save(folder / "s1_brighter.png")
    ImageOps.mirror(scene(2)).save(folder / "s2_mirrored.png")  # a flipped copy is not a duplicate
    (folder / "broken.png").write_bytes(b"")
    return folder


def test_near_duplicates_grouped_largest_kept(tmp_path):
    folder = make_dup_folder(tmp_path / "10_sks scene")
    before = sha256_tree(folder)
    result = find_near_duplicates(folder, threshold=4, progress=False)
    groups = {g.keep.name: [p.name for p in g.extras] for g in result.groups}
    assert groups == {"s0.png": ["s0_recompressed.jpg", "s0_small.png"], "s1.png": ["s1_brighter.png"]}
    assert all(d <= 4 for g in result.groups for d in g.distances) and result.groups[0].distances[0] == 0
    assert [p.name for p, _ in result.skipped] == ["broken.png"] and result.hashed == 9
    assert "duplicate" in result.summary() and "skipped" in result.summary()
    strict = find_near_duplicates(folder, threshold=0, progress=False)
    assert {g.keep.name for g in strict.groups} == {"s0.png"}  # the brightened copy differs by a few bits
    grid = group_grid(result.groups[0], thumb=64)
    assert grid.size[0] == 3 * (64 + 8)
    assert sha256_tree(folder) == before


def test_quarantine_duplicates_only_in_project(tmp_path):
    src = make_dup_folder(tmp_path / "data" / "10_sks scene")
    before = sha256_tree(src)
    with pytest.raises(ValueError, match="threshold"):
        find_near_duplicates(src, threshold=-1, progress=False)
    project = import_dataset([tmp_path / "data"], "scenes", root=tmp_path / "projects", progress=False).project
    outside = find_near_duplicates(src, progress=False)
    with pytest.raises(DatasetError, match=r"not inside the project folder.*nothing was moved.*never your originals"):
        quarantine_duplicates(outside, project.path / "quarantine", project)
    result = find_near_duplicates(project, progress=False)
    moved = quarantine_duplicates(result, project.path / "quarantine", project)
    assert sorted(p.name for p, _ in moved) == ["s0_recompressed.jpg", "s0_small.png", "s0_small.txt",
                                                "s1_brighter.png"]
    assert find_near_duplicates(project, progress=False).groups == []
    assert "near-duplicate of" in (project.path / "quarantine" / "quarantine.log").read_text()
    assert sha256_tree(src) == before


def test_cli_dedup(tmp_path, capsys):
    make_dup_folder(tmp_path / "data" / "10_sks scene")
    root = str(tmp_path / "projects")
    main(["dataset", "import", str(tmp_path / "data"), "--project", "p", "--root", root, "--quiet"])
    capsys.readouterr()
    code = main(["dataset", "dedup", "--project", "p", "--root", root, "--quiet", "--grids", str(tmp_path / "grids"),
                 "--quarantine", str(tmp_path / "projects" / "p" / "quarantine")])
    out = capsys.readouterr().out
    assert code == 0 and "2 groups of near-duplicates" in out and "moved 4 files" in out
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["group-001.png", "group-002.png"]
    assert main(["dataset", "dedup", str(tmp_path / "data"), "--quiet", "--quarantine", str(tmp_path / "q")]) == 2
    assert "only inside a project's own copy" in capsys.readouterr().err


@pytest.mark.parametrize("h, to_h, overlap, count", [(1280, 512, 0.2, 3), (320, 128, 0.2, 3), (1024, 512, 0.2, 3),
                                                     (1024, 512, 0.0, 2), (2048, 512, 0.5, 7)])
def test_split_count_is_a1111s_formula(h, to_h, overlap, count):
    assert split_count(h, to_h, overlap) == count


def test_crop_and_resize_is_a1111_mode_1():
    image = scene(3, (200, 100))
    out = crop_and_resize(image, 128, 128)
    expected = image.resize((256, 128), Image.Resampling.LANCZOS).crop((64, 0, 192, 128))
    assert out.size == (128, 128) and list(out.getdata()) == list(expected.getdata())


def test_preprocess_split_flip_and_captions(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    scene(1, (128, 320)).save(src / "tall.png")
    (src / "tall.txt").write_bytes("tall, café".encode("latin-1"))
    scene(2, (320, 128)).save(src / "wide.png")
    scene(3, (150, 140)).save(src / "square.png")
    (src / "zero.png").write_bytes(b"")
    before = sha256_tree(src)
    options = PreprocessOptions(width=128, height=128, flip=True, split=True)
    result = preprocess_folder(src, tmp_path / "out", options, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    tall = [f"00001-{i}-tall.png" for i in range(6)]  # 3 crops, each followed by its mirror
    assert [n for n in names if n.endswith("-tall.png")] == tall
    assert [n for n in names if "wide" in n] == [f"00002-{i}-wide.png" for i in range(6)]
    assert [n for n in names if "square" in n] == ["00000-0-square.png", "00000-1-square.png"]
    assert all((tmp_path / "out" / n.replace(".png", ".txt")).read_text(encoding="utf-8") == "tall, café" for n in tall)
    assert not (tmp_path / "out" / "00000-0-square.txt").exists()
    resized = scene(1, (128, 320)).resize((128, 320), Image.Resampling.LANCZOS)
    for i, y in enumerate((0, 96, 192)):  # y_step = (320 - 128) / (3 - 1)
        crop = Image.open(tmp_path / "out" / f"00001-{2 * i}-tall.png")
        assert list(crop.getdata()) == list(resized.crop((0, y, 128, y + 128)).getdata())
        mirrored = Image.open(tmp_path / "out" / f"00001-{2 * i + 1}-tall.png")
        assert list(mirrored.getdata()) == list(ImageOps.mirror(crop).getdata())
    assert all(Image.open(p).size == (128, 128) for p in result.written)
    assert [p.name for p, _ in result.skipped] == ["zero.png"]
    assert sha256_tree(src) == before

    with pytest.raises(DatasetError, match="not empty"):
        preprocess_folder(src, tmp_path / "out", options, progress=False)
    with pytest.raises(DatasetError, match="overlaps the source folder"):
        preprocess_folder(src, src / "out", options, progress=False)
    keep = preprocess_folder(src, tmp_path / "out", PreprocessOptions(keep_original_size=True, caption_action="ignore"),
                             overwrite=True, progress=False)
    assert sorted(Image.open(p).size for p in keep.written) == [(128, 320), (150, 140), (320, 128)]
    assert not list((tmp_path / "out").glob("*.txt"))


def test_cli_preprocess(tmp_path, capsys):
    src = tmp_path / "raw"
    src.mkdir()
    scene(1, (64, 160)).save(src / "a.png")
    code = main(["dataset", "preprocess", str(src), str(tmp_path / "out"), "--width", "64", "--height", "64",
                 "--split", "--flip", "--overlap_ratio", "0.2", "--quiet"])
    assert code == 0 and "6 images written" in capsys.readouterr().out


def test_gallery_shows_captions_and_buckets(tmp_path):
    folder = tmp_path / "5_sks scene"
    folder.mkdir()
    for seed in range(5):
        scene(seed, (96, 64)).save(folder / f"s{seed}.png")
        (folder / f"s{seed}.txt").write_text(f"sks scene, number {seed}", encoding="utf-8")
    sheet = dataset_gallery(folder, columns=3, thumb=64, resolution=64, show=False)
    assert sheet.size[0] == 3 * (64 + 8) and sheet.size[1] == 2 * (64 + 8 + 4 * 15 + 4)
    from nbkit.data.check import load_datasets

    labels = [label for _, label in _gallery_entries(load_datasets(folder, 64)[0], None)]
    assert labels[0].startswith("s0.png [64x64] sks scene, number 0")
    assert display_image(sheet) is False  # not inside a notebook kernel

    (folder / "s1.txt").write_bytes("caf\xe9".encode("latin-1"))  # the trainer skips it (check reports it)
    (folder / "s2.txt").unlink()  # no caption: the class tokens from the folder name
    entries = _gallery_entries(load_datasets(folder, 64)[0], lambda w, h: (w // 32 * 32, h))
    assert [label for _, label in entries][:2] == ["s0.png [64x64] sks scene, number 0", "s2.png [64x64] sks scene"]
    out = tmp_path / "sheet.png"
    assert main(["dataset", "gallery", str(folder), "--out", str(out), "--thumb", "48"]) == 0
    assert Image.open(out).size[0] == 4 * (48 + 8)
