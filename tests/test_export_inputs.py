"""Inputs from a Hub repo (offline HF cache), an http URL (local server: resume + checksum) or a Drive path (lag)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
from http_server import serve_files

from nbkit.models.download import download_dir_for
from nbkit.models.inputs import ChecksumError, fetch_input, hub_file

DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


def test_url_resumes_and_checks_the_checksum(tmp_path):
    with serve_files() as (server, base):
        server.files["/m/style.safetensors"] = DATA
        url = f"{base}/m/style.safetensors"
        part = download_dir_for(url, tmp_path / "c") / ".download.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(DATA[:1000])  # a download a runtime reset interrupted
        path = fetch_input(url, sha256=SHA, cache_dir=tmp_path / "c", progress=False)
        assert path.name == "style.safetensors" and path.read_bytes() == DATA and not part.exists()
        assert server.requests == [("/m/style.safetensors", "bytes=1000-")]

        server.files["/m/other.zip"] = b"not what was promised"
        bad = f"{base}/m/other.zip"
        with pytest.raises(ChecksumError, match=r"other\.zip: sha256 is \w+, expected \w+: the server sent another file"):
            fetch_input(bad, sha256=SHA, cache_dir=tmp_path / "c", progress=False)
        assert list(download_dir_for(bad, tmp_path / "c").iterdir()) == []  # nothing under any name


def test_hub_file_from_the_offline_cache(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--someone--styles"
    (repo / "snapshots" / commit / "loras").mkdir(parents=True)
    (repo / "snapshots" / commit / "loras" / "a.safetensors").write_bytes(DATA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = fetch_input("hf://someone/styles/loras/a.safetensors", sha256=SHA, cache_dir=tmp_path / "hf")
    assert path.read_bytes() == DATA
    assert hub_file("someone/styles", "loras/a.safetensors", cache_dir=tmp_path / "hf") == path
    with pytest.raises(ChecksumError, match="a.safetensors: sha256"):
        hub_file("someone/styles", "loras/a.safetensors", sha256="0" * 64, cache_dir=tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="someone/styles/loras/b.safetensors: not in the Hugging Face cache"):
        hub_file("someone/styles", "loras/b.safetensors", cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match="hf://OWNER/REPO/path"):
        fetch_input("hf://just-a-name")


def test_drive_path_waits_for_sync_and_local_typos_fail_fast(tmp_path, monkeypatch):
    mydrive = tmp_path / "MyDrive"
    (mydrive / "models").mkdir(parents=True)
    monkeypatch.setenv("NBKIT_MYDRIVE", str(mydrive))
    late = mydrive / "models" / "base.safetensors"
    timer = threading.Timer(0.5, late.write_bytes, args=(DATA,))
    timer.start()
    try:
        assert fetch_input(str(late), sha256=SHA, drive_timeout=20) == late  # visible only after a delay
    finally:
        timer.join()
    with pytest.raises(FileNotFoundError, match="no such file: check the path"):
        fetch_input(str(tmp_path / "typo.safetensors"))


def test_a_drive_file_still_syncing_is_waited_for_until_complete(tmp_path, monkeypatch):
    """Drive can list a file while its bytes still arrive: nbkit waits until the size settles before the
    checksum, instead of failing on (or loading) half a file."""
    mydrive = tmp_path / "MyDrive"
    mydrive.mkdir()
    monkeypatch.setenv("NBKIT_MYDRIVE", str(mydrive))
    growing = mydrive / "base.safetensors"

    def sync():
        with growing.open("wb") as fh:
            fh.write(DATA[: len(DATA) // 2])
            fh.flush()
            time.sleep(0.2)
            fh.write(DATA[len(DATA) // 2:])

    writer = threading.Thread(target=sync)
    writer.start()
    try:
        assert fetch_input(str(growing), sha256=SHA, drive_timeout=30) == growing
    finally:
        writer.join()
