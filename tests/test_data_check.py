"""``nbkit dataset check`` on a corpus of broken and odd files built here, then --fix-to, quarantine, training.

Each kind of bad input must give a message naming the file and a fix; the user's originals must be
byte-identical at the end; and a LoRA must still train on the clean project dataset.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nbkit.cli import main
from nbkit.config import save_toml
from nbkit.data.check import check_dataset
from nbkit.data.fix import BACKUP_NAME, fix_dataset, quarantine_problems
from nbkit.data.images import DatasetError
from nbkit.data.importer import import_dataset

RES = 64
MAX_PIXELS = 20_000  # Image.MAX_IMAGE_PIXELS in these tests: warning above, error above twice that


def sha256_tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def noise(size=(RES, RES), seed=0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def build_corpus(root: Path) -> Path:
    """A kohya folder with one file (or folder) per kind of problem, next to good images."""
    good = root / "10_sks dog"
    good.mkdir(parents=True)
    for i in range(4):
        noise(seed=i).save(good / f"good{i}.png")
        (good / f"good{i}.txt").write_text(f"sks dog, photo {i}\n", encoding="utf-8")
    (good / "zero.png").write_bytes(b"")
    (good / "text.jpg").write_text("this is a text file, not a JPEG")
    (good / "page.png").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    buf = io.BytesIO()
    noise(seed=9).save(buf, "JPEG")
    (good / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("CMYK", (RES, RES), (0, 90, 90, 0)).save(good / "cmyk.jpg")
    Image.fromarray(np.full((RES, RES), 40000, np.uint16)).save(good / "sixteen.png")
    palette = Image.new("P", (RES, RES), 1)
    palette.putpalette([0, 0, 0] + [30, 120, 200] * 255)
    palette.save(good / "palette_alpha.png", transparency=0)
    Image.new("RGBA", (RES, RES), (255, 0, 0, 0)).save(good / "alpha.png")
    noise((16, 16), 3).save(good / "tiny.png")
    noise((250, 250), 4).save(good / "bomb.png")  # 62,500 px: over 2 x MAX_PIXELS, Pillow refuses it
    noise((180, 150), 5).save(good / "bomb_warning.png")  # 27,000 px: Pillow warns
    noise((200, 40), 6).save(good / "wide.png")  # long side above the test's max_side (160)
    noise(seed=7).save(good / "dup.png")
    noise(seed=8).convert("RGB").save(good / "dup.jpg")
    (good / "dup.txt").write_text("sks dog, twins", encoding="utf-8")
    noise(seed=10).save(good / "latin1.png")
    (good / "latin1.txt").write_bytes("sks dog, café, crème brûlée".encode("latin-1"))
    noise(seed=11).save(good / "bom.png")
    (good / "bom.txt").write_bytes("\ufeffsks dog, bom".encode())
    noise(seed=12).save(good / "multiline.png")
    (good / "multiline.txt").write_text("sks dog, one\nsks dog, two\n", encoding="utf-8")
    (good / "orphan.txt").write_text("no image for me", encoding="utf-8")
    noise(seed=13).save(good / "anim.gif")
    plain = root / "plain"  # no N_ prefix: no class tokens, so captions are required
    plain.mkdir()
    noise(seed=14).save(plain / "nocaption.png")
    noise(seed=15).save(plain / "emptycaption.png")
    (plain / "emptycaption.txt").write_text("  \n", encoding="utf-8")
    noise(seed=16).save(plain / "ok.png")
    (plain / "ok.txt").write_text("a photo", encoding="utf-8")
    (root / "empty").mkdir()
    return root


# file name -> (kind, severity) the check must report for it
EXPECTED = {
    "zero.png": ("zero-byte", "error"),
    "text.jpg": ("not-an-image", "error"),
    "page.png": ("not-an-image", "error"),
    "truncated.jpg": ("truncated", "error"),
    "bomb.png": ("pixel-limit", "error"),
    "bomb_warning.png": ("pixel-limit", "warning"),
    "cmyk.jpg": ("cmyk", "fixable"),
    "sixteen.png": ("16-bit", "fixable"),
    "palette_alpha.png": ("alpha", "warning"),
    "alpha.png": ("alpha", "warning"),
    "tiny.png": ("too-small", "warning"),
    "wide.png": ("too-large", "warning"),
    "dup.png": ("duplicate-name", "warning"),
    "latin1.txt": ("encoding", "fixable"),
    "bom.txt": ("bom", "fixable"),
    "multiline.txt": ("multi-line", "warning"),
    "orphan.txt": ("orphan-caption", "warning"),
    "anim.gif": ("unsupported-format", "warning"),
    "nocaption.png": ("no-caption", "error"),
    "emptycaption.txt": ("empty-caption", "error"),
}
# good0-3 + cmyk sixteen palette_alpha alpha tiny bomb_warning wide dup.png dup.jpg latin1 bom multiline
USABLE_IN_SKS = 16


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)
    src = build_corpus(tmp_path / "originals")
    return src, sha256_tree(src)


def _check(source, **kw):
    return check_dataset(source, resolution=RES, max_side=160, progress=False, **kw)


def test_every_kind_is_reported_with_file_and_fix(corpus, tmp_path):
    src, before = corpus
    result = import_dataset([src], "dog", root=tmp_path / "projects", progress=False)
    assert "empty is an empty folder" in result.summary()
    report = _check(result.project, batch_size=2, epochs=3)
    found = {(p.path.name, p.kind, p.severity) for p in report.problems}
    for name, (kind, severity) in EXPECTED.items():
        assert (name, kind, severity) in found, f"{name}: expected {kind}/{severity}, got " + str(
            [f for f in found if f[0] == name])
    assert len({kind for kind, _ in EXPECTED.values()}) >= 15
    for problem in report.problems:
        text = str(problem)
        assert text.startswith(str(problem.path)) and ". Fix: " in text and len(problem.fix) > 10
    printed = str(report)
    assert "latin1.txt: is not UTF-8 text (read as cp1252: 'café,')" in printed
    assert "Your files were not changed" in printed
    sks = report.subsets[0]
    assert (len(sks.files), sks.usable, sks.subset.num_repeats) == (21, USABLE_IN_SKS, 10)
    # (16 usable + anim.gif converted) x 10 + plain/ok.png = 171 samples -> 86 batches of 2 (as the fixed copy)
    assert (report.steps_per_epoch, report.total_steps) == (86, 258)
    assert "7 unusable files left out" in report.steps_note
    assert sha256_tree(src) == before


def test_fix_copy_then_train_lora_on_the_project(corpus, tmp_path, tiny_model_dirs):
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.hooks import TrainHooks
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    src, before = corpus
    project = import_dataset([src], "dog", root=tmp_path / "projects", progress=False).project
    report = _check(project, batch_size=1)
    fixed = fix_dataset(report, project.path / "dataset_fixed", project=project, max_side=160, progress=False)
    assert (project.path / BACKUP_NAME).is_file() and "dataset_fixed" in project.dataset_toml.read_text()
    out = fixed.out_dir / "10_sks dog"
    assert sorted(p.name for p in fixed.left_out) == ["bomb.png", "emptycaption.png", "nocaption.png", "page.png",
                                                      "text.jpg", "truncated.jpg", "zero.png"]
    assert (out / "latin1.txt").read_text(encoding="utf-8") == "sks dog, café, crème brûlée"
    assert (out / "bom.txt").read_bytes().startswith(b"sks dog")
    assert (out / "dup-png.png").is_file() and (out / "dup-png.txt").read_text() == "sks dog, twins"
    assert Image.open(out / "sixteen.png").convert("RGB").getpixel((0, 0)) == (156, 156, 156)  # not white
    assert Image.open(out / "alpha.png").mode == "RGB" and Image.open(out / "alpha.png").getpixel((0, 0)) == (
        255, 255, 255)
    assert Image.open(out / "cmyk.jpg").mode == "RGB" and max(Image.open(out / "wide.png").size) == 160
    assert (out / "anim.png").is_file() and (out / "good0.png").read_bytes() == (src / "10_sks dog" /
                                                                                 "good0.png").read_bytes()

    clean = _check(project, batch_size=1)
    assert not clean.by_severity("error") and not clean.by_severity("fixable")
    assert clean.steps_per_epoch == report.steps_per_epoch == 17 * 10 + 1  # the first check predicted the copy
    assert clean.steps_note == "(counted as the trainer counts them)"

    class Record(TrainHooks):
        def on_train_start(self, total_steps, info):
            self.info = info

    config = LoRATrainConfig(
        pretrained_model_name_or_path=str(tiny_model_dirs("sd15")[0]), output_dir=str(project.output_dir),
        output_name="dog", dataset_config=str(project.dataset_toml), resolution=RES, network_dim=4,
        network_alpha=2.0, train_batch_size=1, max_train_steps=2, optimizer_type="AdamW", mixed_precision="no",
        gradient_checkpointing=False, seed=0,
    )
    hooks = Record()
    result = train_lora(config, resolve_datasets(config, None, None), hooks=hooks, device="cpu")
    assert result.steps == 2 and result.lora_path.is_file()
    assert hooks.info["steps_per_epoch"] == clean.steps_per_epoch  # the check counts what the trainer runs
    assert sha256_tree(src) == before


def test_quarantine_moves_only_project_files(corpus, tmp_path):
    src, before = corpus
    project = import_dataset([src], "dog", root=tmp_path / "projects", progress=False).project
    with pytest.raises(DatasetError, match=r"only inside a project's own copy.*never moved"):
        quarantine_problems(_check(src / "10_sks dog"), tmp_path / "q")
    with pytest.raises(DatasetError, match=r"inside .*dataset, where it would be trained again"):
        quarantine_problems(_check(project), project.dataset_dir / "q")
    report = _check(project)
    moved = quarantine_problems(report, project.path / "quarantine")
    names = sorted(src_path.name for src_path, _ in moved)
    assert names == ["bomb.png", "emptycaption.png", "emptycaption.txt", "nocaption.png", "page.png", "text.jpg",
                     "truncated.jpg", "zero.png"]
    assert all(dst.is_file() and dst.is_relative_to(project.path / "quarantine") for _, dst in moved)
    log = (project.path / "quarantine" / "quarantine.log").read_text()
    assert "truncated.jpg" in log and "is truncated" in log
    after = _check(project)
    assert not after.by_severity("error") and after.by_severity("fixable")  # captions still need --fix-to
    assert sha256_tree(src) == before


def test_empty_subset_folder_and_dataset_config_source(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "5_cat").mkdir(parents=True)
    noise().save(tmp_path / "nested" / "5_cat" / "a.png")
    raw = {"datasets": [{"subsets": [{"image_dir": "empty", "class_tokens": "x"},
                                     {"image_dir": "nested", "class_tokens": "y"}]}]}
    toml = save_toml(raw, tmp_path / "dataset.toml")
    report = check_dataset(toml, progress=False)
    errors = {p.path.name: p for p in report.by_severity("error")}
    assert "holds no images" in errors["empty"].what and "remove this subset" in errors["empty"].fix
    assert "subfolders (5_cat)" in errors["nested"].fix
    assert report.steps_per_epoch is None and "training cannot start" in report.steps_note


def test_fix_from_a_dataset_toml_keeps_its_settings(tmp_path):
    folder = tmp_path / "data" / "cats"
    folder.mkdir(parents=True)
    noise().save(folder / "a.png")
    (folder / "a.caption").write_bytes("chat, café".encode("latin-1"))
    (folder / "b.png").write_bytes(b"")
    raw = {"general": {"resolution": RES, "shuffle_caption": True},
           "datasets": [{"batch_size": 2, "subsets": [{"image_dir": "data/cats", "num_repeats": 3}]}]}
    report = check_dataset(save_toml(raw, tmp_path / "dataset.toml"), progress=False)
    assert report.by_severity("error")[0].path.name == "b.png"
    fixed = fix_dataset(report, tmp_path / "clean", progress=False)
    from nbkit.config import load_toml
    from nbkit.data.dataset_config import load_dataset_config

    written = load_toml(fixed.dataset_toml)
    assert written["general"] == {"resolution": RES, "shuffle_caption": True}
    assert written["datasets"][0]["subsets"] == [{"image_dir": "cats", "num_repeats": 3}]
    spec = load_dataset_config(fixed.dataset_toml)[0]
    assert spec.batch_size == 2 and spec.subsets[0].image_dir == tmp_path / "clean" / "cats"
    assert (tmp_path / "clean" / "cats" / "a.caption").read_text(encoding="utf-8") == "chat, café"
    assert not (tmp_path / "clean" / "cats" / "b.png").exists()
    with pytest.raises(DatasetError, match="overlaps the dataset folder"):
        fix_dataset(report, tmp_path / "data", progress=False)


def test_check_folder_does_not_crash_on_decompression_bomb(monkeypatch, tmp_path):
    folder = tmp_path / "3_cat"
    folder.mkdir()
    noise().save(folder / "ok.png")
    noise((400, 400)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    report = check_dataset(folder, resolution=RES, progress=False)
    bomb = [p for p in report.problems if p.path.name == "huge.png"]
    assert bomb[0].severity == "error" and "MAX_IMAGE_PIXELS" in bomb[0].fix
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    warn = [p for p in check_dataset(folder, resolution=RES, progress=False).problems if p.path.name == "huge.png"]
    assert [p.severity for p in warn] == ["warning"] and "decompression-bomb warning limit" in warn[0].what


def test_cli_check_exit_codes_and_fix(corpus, tmp_path, capsys):
    src, before = corpus
    root = str(tmp_path / "projects")
    assert main(["dataset", "import", str(src), "--project", "dog", "--root", root, "--quiet"]) == 0
    capsys.readouterr()
    code = main(["dataset", "check", "--project", "dog", "--root", root, "--quiet", "--resolution", str(RES),
                 "--batch-size", "2", "--epochs", "3", "--max-side", "160"])
    out = capsys.readouterr().out
    assert code == 1 and "images x repeats" in out and "258 steps" in out and "ERROR    " in out
    fixed = tmp_path / "projects" / "dog" / "fixed"
    code = main(["dataset", "check", "--project", "dog", "--root", root, "--quiet", "--resolution", str(RES),
                 "--max-side", "160", "--fix-to", str(fixed)])
    assert code == 0 and "now uses the fixed copy" in capsys.readouterr().out
    code = main(["dataset", "check", "--project", "dog", "--root", root, "--quiet", "--resolution", str(RES),
                 "--max-side", "160"])
    assert code == 0 and "0 errors, 0 fixable" in capsys.readouterr().out
    assert main(["dataset", "check", "--quiet"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert sha256_tree(src) == before
