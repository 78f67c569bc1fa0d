"""``nbkit dataset import``: folders, zips, zip URLs (local HTTP server) and HF datasets (offline cache).

Every test checks that the user's originals are byte-identical afterwards and that a refused
source leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import pytest
from http_server import serve_files
from PIL import Image

from nbkit.cli import main
from nbkit.data.dataset_config import load_dataset_config
from nbkit.data.images import DatasetError
from nbkit.data.importer import classify_source, import_dataset, parse_kohya_folder_name, remove_imported
from nbkit.data.safe_extract import ExtractLimits, UnsafeSourceError
from nbkit.models.download import download_dir_for
from nbkit.project import Project


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (links are hashed as their target path)."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_symlink():
            out[str(path)] = "link:" + os.readlink(path)
        elif path.is_file():
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def png_bytes(color=(200, 40, 40), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def make_kohya_folder(root: Path) -> Path:
    """train_data_dir style: N_token folders, .txt and .caption captions, a reg folder, junk, an empty folder."""
    for folder, ext in (("10_sks dog", ".txt"), ("5_style", ".caption"), ("plain", ".txt"), ("reg/1_dog", ".txt")):
        d = root / folder
        d.mkdir(parents=True)
        for i in range(2):
            (d / f"img{i}.png").write_bytes(png_bytes((i * 90, 50, 50)))
            (d / f"img{i}{ext}").write_text(f"{folder}, picture {i}", encoding="utf-8")
    (root / "10_sks dog" / ".DS_Store").write_bytes(b"junk")
    (root / "10_sks dog" / "notes.pdf").write_bytes(b"%PDF")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._img0.png").write_bytes(b"fork")
    (root / "empty").mkdir()
    return root


@pytest.mark.parametrize("name, repeats, identifier, class_name, tokens", [
    ("10_sks dog", 10, "sks", "dog", "sks dog"),
    ("5_style", 5, None, "style", "style"),
    ("3_sks black dog", 3, "sks", "black dog", "sks black dog"),
    ("dog", 1, None, None, None),
    ("0_zero", 1, None, None, None),
    ("v2_photos", 1, None, None, None),
])
def test_kohya_folder_names(name, repeats, identifier, class_name, tokens):
    parsed = parse_kohya_folder_name(name)
    assert (parsed.repeats, parsed.identifier, parsed.class_name, parsed.class_tokens) == (
        repeats, identifier, class_name, tokens)


def test_import_folder_writes_kohya_toml_and_keeps_originals(tmp_path):
    src = make_kohya_folder(tmp_path / "my_lora")
    before = sha256_tree(src)
    result = import_dataset([src], "dogs", root=tmp_path / "projects", progress=False)
    assert sha256_tree(src) == before
    project = result.project
    copy = project.dataset_dir / "my_lora"
    assert (copy / "10_sks dog" / "img0.png").read_bytes() == (src / "10_sks dog" / "img0.png").read_bytes()
    assert not (copy / "10_sks dog" / ".DS_Store").exists() and not (copy / "__MACOSX").exists()
    assert "notes.pdf" in " ".join(result.sources[0].skipped)
    assert "empty is an empty folder" in result.summary()

    specs = load_dataset_config(result.dataset_toml)[0].subsets
    by_name = {s.image_dir.name: s for s in specs}
    assert by_name["10_sks dog"].num_repeats == 10 and by_name["10_sks dog"].class_tokens == "sks dog"
    assert by_name["5_style"].num_repeats == 5 and by_name["5_style"].class_tokens == "style"
    assert by_name["5_style"].caption_extension == ".caption"
    assert by_name["plain"].num_repeats == 1 and by_name["plain"].class_tokens is None
    assert by_name["1_dog"].is_reg and not by_name["10_sks dog"].is_reg
    assert all(s.image_dir.is_relative_to(project.dataset_dir) for s in specs)
    raw = result.dataset_toml.read_text()
    assert 'image_dir = "dataset/my_lora/10_sks dog"' in raw  # relative: the project moves with Drive
    assert "resolution" not in raw and "batch_size" not in raw  # the run's own options apply

    caption = copy / "10_sks dog" / "img0.txt"
    caption.write_text("edited by the tagger", encoding="utf-8")
    again = import_dataset([src], project, progress=False)  # a re-run cell keeps the copy, never doubles it
    assert again.sources[0].already_imported and "kept as it is" in again.summary()
    assert sorted(p.name for p in project.dataset_dir.iterdir()) == ["my_lora"]
    assert len(again.subsets) == len(specs) and caption.read_text() == "edited by the tagger"
    import_dataset([src], project, replace=True, progress=False)
    assert caption.read_text() == "10_sks dog, picture 0"
    other = make_kohya_folder(tmp_path / "elsewhere" / "my_lora")  # same name, another source
    import_dataset([other], project, progress=False)
    assert sorted(p.name for p in project.dataset_dir.iterdir()) == ["my_lora", "my_lora-2"]
    remove_imported(project, "my_lora-2")  # deletes the project's copy only
    assert sorted(p.name for p in project.dataset_dir.iterdir()) == ["my_lora"]
    assert "my_lora-2" not in project.dataset_toml.read_text() and (other / "plain" / "img0.png").is_file()
    with pytest.raises(DatasetError, match="not a folder of"):
        remove_imported(project, "../../elsewhere")
    assert sha256_tree(src) == before


def test_import_refuses_symlink_out_of_folder(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    src = tmp_path / "data" / "10_sks dog"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(png_bytes())
    (src / "inside.png").symlink_to(src / "a.png")  # a link inside the folder is copied as a file
    before = sha256_tree(tmp_path / "data")
    project = Project.open("p", tmp_path / "projects")
    ok = import_dataset([src], project, progress=False)
    assert (ok.sources[0].target / "inside.png").read_bytes() == png_bytes()
    assert not (ok.sources[0].target / "inside.png").is_symlink()

    (src / "evil.png").symlink_to(outside)
    with pytest.raises(UnsafeSourceError, match=r"evil\.png: a symbolic link to .*secret\.png, outside .*remove the link"):
        import_dataset([tmp_path / "data"], project, progress=False)
    assert sorted(p.name for p in project.dataset_dir.iterdir()) == ["10_sks dog"]  # nothing new written
    assert sha256_tree(tmp_path / "data") == {**before, str(src / "evil.png"): "link:" + str(outside)}


def _zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None,
         encrypted: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    if encrypted:  # zipfile cannot write encrypted entries: set the "encrypted" bit in the central directory
        raw = bytearray(path.read_bytes())
        name_at = raw.find(encrypted.encode(), raw.find(b"PK\x01\x02"))
        at = raw.rfind(b"PK\x01\x02", 0, name_at)
        raw[at + 8] |= 0x1
        path.write_bytes(bytes(raw))
    return path


GOOD = {"10_sks dog/a.png": png_bytes(), "10_sks dog/a.txt": b"sks dog, red"}


@pytest.mark.parametrize("entries, symlinks, encrypted, limits, message", [
    ({**GOOD, "../evil.png": png_bytes()}, None, None, None, r"'\.\./evil\.png' climbs out .*path traversal.*nothing"),
    ({**GOOD, "a/../../evil.txt": b"x"}, None, None, None, r"climbs out of the target folder"),
    ({**GOOD, "/etc/evil.png": png_bytes()}, None, None, None, r"'/etc/evil\.png' has an absolute path.*nothing"),
    ({**GOOD, "C:\\evil.png": png_bytes()}, None, None, None, r"absolute path"),
    (GOOD, {"10_sks dog/link.png": "../../../etc/passwd"}, None, None, r"symbolic link pointing outside"),
    (GOOD, {"link.png": "/etc/passwd"}, None, None, r"symbolic link pointing outside"),
    ({**GOOD, "10_sks dog/zeros.png": bytes(2 * 1024**2)}, None, None, None, r"ratio \d+, limit 200.*zip bomb"),
    (GOOD, None, None, ExtractLimits(max_unpacked_gb=100 / 1024**3), r"over the limit of .* GB.*--max_unpacked_gb"),
    (GOOD, None, None, ExtractLimits(max_files=1), r"more than the limit of 1.*--max_files"),
    (GOOD, None, "10_sks dog/a.png", None, r"encrypted"),
], ids=["dotdot", "nested-dotdot", "absolute", "drive-letter", "symlink-relative", "symlink-absolute",
        "bomb-ratio", "bomb-total", "too-many-files", "encrypted"])
def test_zip_refused_before_writing(tmp_path, entries, symlinks, encrypted, limits, message):
    archive = _zip(tmp_path / "upload.zip", entries, symlinks, encrypted)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    project = Project.open("p", tmp_path / "projects")
    with pytest.raises(UnsafeSourceError, match=message) as err:
        import_dataset([archive], project, limits=limits, progress=False)
    assert "upload.zip" in str(err.value)
    assert list(project.dataset_dir.iterdir()) == []  # not even a partial copy
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "projects" / "evil.png").exists()
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest


def test_zip_bomb_limit_is_configurable(tmp_path):
    archive = _zip(tmp_path / "zeros.zip", {**GOOD, "10_sks dog/zeros.txt": bytes(2 * 1024**2)})
    result = import_dataset([archive], "p", root=tmp_path, limits=ExtractLimits(max_ratio=1e6), progress=False)
    assert (result.sources[0].target / "10_sks dog" / "zeros.txt").stat().st_size == 2 * 1024**2


def test_several_zips_top_folder_stripped_and_internal_links_skipped(tmp_path):
    one = _zip(tmp_path / "set.zip", {"set/10_sks dog/a.png": png_bytes(), "set/10_sks dog/a.txt": b"sks dog",
                                      "set/readme.md": b"hi"}, {"set/10_sks dog/b.png": "a.png"})
    two = _zip(tmp_path / "more.zip", {"3_style\\b.png": png_bytes((1, 2, 3))})  # Windows separators
    drive = tmp_path / "drive" / "set.zip"  # same name from another folder: kept apart
    drive.parent.mkdir()
    drive.write_bytes(two.read_bytes())
    result = import_dataset([one, two, drive], "p", root=tmp_path / "projects", progress=False)
    names = [s.target.name for s in result.sources]
    assert names == ["set", "more", "set-2"]
    assert (result.sources[0].target / "10_sks dog" / "a.png").is_file()  # "set/" not doubled
    assert not (result.sources[0].target / "10_sks dog" / "b.png").exists()
    assert any("link" in s for s in result.sources[0].skipped)
    assert (result.sources[1].target / "3_style" / "b.png").is_file()
    assert {s.num_repeats for s in result.subsets} == {10, 3}


def test_not_a_zip_and_missing_source(tmp_path):
    fake = tmp_path / "data.zip"
    fake.write_text("<html>sign in</html>")
    with pytest.raises(DatasetError, match=r"data\.zip: not a valid zip file.*download it again"):
        import_dataset([fake], "p", root=tmp_path / "projects", progress=False)
    with pytest.raises(DatasetError, match=r"no such folder or file.*MyDrive"):
        import_dataset([str(tmp_path / "nope")], "p", root=tmp_path / "projects", progress=False)
    assert classify_source("https://huggingface.co/datasets/org/pets") == ("hf", "org/pets")
    assert classify_source("hf://datasets/org/pets") == ("hf", "org/pets")
    assert classify_source("org/pets") == ("hf", "org/pets")
    assert classify_source("https://example.org/a.zip") == ("url", "https://example.org/a.zip")


@pytest.fixture()
def http_server():
    with serve_files() as served:
        yield served


def test_url_import_resumes_a_partial_download(tmp_path, http_server):
    server, base = http_server
    payload = _zip(tmp_path / "x.zip", {f"10_sks dog/{i}.png": png_bytes((i, 9, 9), (64, 64)) for i in range(8)})
    server.files["/files/dogs.zip"] = data = payload.read_bytes()
    url = f"{base}/files/dogs.zip"
    cache = tmp_path / "cache"
    part = download_dir_for(url, cache) / ".download.part"  # what a Colab disconnect leaves behind
    part.parent.mkdir(parents=True)
    part.write_bytes(data[: len(data) // 2])
    result = import_dataset([url], "p", root=tmp_path / "projects", cache_dir=cache, timeout=5, progress=False)
    assert server.requests == [("/files/dogs.zip", f"bytes={len(data) // 2}-")]
    assert result.sources[0].kind == "url" and result.sources[0].target.name == "dogs"
    assert len(list((result.sources[0].target / "10_sks dog").glob("*.png"))) == 8
    again = import_dataset([url], "p", root=tmp_path / "projects", cache_dir=cache, timeout=5, replace=True,
                           progress=False)
    assert len(server.requests) == 1 and again.sources[0].files == 8  # the finished download is reused

    server.files["/login.html"] = b"<!doctype html><html>sign in</html>"
    with pytest.raises(DatasetError, match=r"login\.html: the server sent a web page, not a zip"):
        import_dataset([f"{base}/login.html"], "p", root=tmp_path / "projects", cache_dir=cache, timeout=5,
                       progress=False)
    with pytest.raises(ConnectionError, match=r"missing\.zip: download failed.*run the import again"):
        import_dataset([f"{base}/missing.zip"], "p", root=tmp_path / "projects", cache_dir=cache, timeout=5,
                       progress=False)


def test_hf_dataset_import_from_offline_cache(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "datasets--someone--pets"
    snapshot = repo / "snapshots" / sha
    files = {"10_sks cat/a.png": png_bytes(), "10_sks cat/a.txt": b"sks cat, sofa", "README.md": b"# pets",
             "extra.zip": _zip(tmp_path / "extra.zip", {"2_toy/t.png": png_bytes((0, 0, 255))}).read_bytes()}
    for n, (name, data) in enumerate(files.items()):  # the HF cache layout: snapshot links into blobs/
        blob = repo / "blobs" / f"blob{n}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    result = import_dataset(["someone/pets"], "p", root=tmp_path / "projects", cache_dir=tmp_path / "hf",
                            progress=False)
    target = result.sources[0].target
    assert target.name == "pets" and (target / "10_sks cat" / "a.txt").read_text() == "sks cat, sofa"
    assert (target / "extra" / "2_toy" / "t.png").is_file()
    assert {(s.num_repeats, s.class_tokens) for s in result.subsets} == {(10, "sks cat"), (2, "toy")}
    with pytest.raises(DatasetError, match=r"someone/other: not in the Hugging Face cache"):
        import_dataset(["someone/other"], "p", root=tmp_path / "projects", cache_dir=tmp_path / "hf", progress=False)


def test_cli_import(tmp_path, capsys):
    src = make_kohya_folder(tmp_path / "data")
    code = main(["dataset", "import", str(src), "--project", "cli", "--root", str(tmp_path / "projects"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "subset dataset/data/10_sks dog: 10 repeats, class_tokens 'sks dog'" in out
    bad = _zip(tmp_path / "bad.zip", {"../evil.png": png_bytes()})
    code = main(["dataset", "import", str(bad), "--project", "cli", "--root", str(tmp_path / "projects"), "--quiet"])
    assert code == 2 and "path traversal" in capsys.readouterr().err
    bomb = _zip(tmp_path / "bomb.zip", {"z.png": bytes(2 * 1024**2)})
    code = main(["dataset", "import", str(bomb), "--project", "cli", "--root", str(tmp_path / "projects"),
                 "--quiet", "--max_ratio", "10"])
    assert code == 2 and "limit 10" in capsys.readouterr().err
