"""Inputs from anywhere, each checked: a file in a Hub repo, an http(s) URL, a path on Drive or disk.

- ``hf://owner/repo/path/in/repo`` (``hf://owner/repo@revision/path``) or :func:`hub_file`: through
  ``huggingface_hub.hf_hub_download`` (HF cache, progress bar, resumes a partial download).
- ``https://...``: :func:`nbkit.models.download.download_url` (progress, HTTP Range resume, the file
  gets its final name only when complete).
- a path: waited for (a file on Drive may not be visible yet right after mounting), never copied or changed.

With ``sha256`` the file is checked; a download that does not match is removed before it gets its
final name, so the next run starts clean.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

from nbkit.models.download import WEIGHT_SUFFIXES, download_url, is_url

INPUT_SUFFIXES = (*WEIGHT_SUFFIXES, ".zip", ".onnx", ".json", ".yaml", ".yml", ".toml", ".txt", ".csv", ".png",
                  ".jpg", ".jpeg", ".webp", ".optim")
_HF_URI = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[^/]+))?/(?P<path>.+)$")


class ChecksumError(ValueError):
    """A file's sha256 is not the expected one."""


def _mismatch(path: Path, expected: str | None) -> str | None:
    """The actual sha256 of ``path`` when it is not ``expected`` (None when it matches or none is expected)."""
    if not expected:
        return None
    from nbkit.export.drive import file_sha256

    actual = file_sha256(path)
    return None if actual.lower() == expected.strip().lower() else actual


def verify_sha256(path: Path, expected: str | None) -> Path:
    if actual := _mismatch(path, expected):
        raise ChecksumError(f"{path}: sha256 is {actual}, expected {expected}: the file is damaged or a different "
                            "version; delete it and download again, or check the expected checksum")
    return path


def hub_file(repo_id: str, filename: str, *, revision: str | None = None, sha256: str | None = None,
             cache_dir: str | os.PathLike | None = None, repo_type: str = "model") -> Path:
    """One file of a Hub repo, from the HF cache or downloaded (resumable, with a progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{repo_id}/{filename}" + (f" (revision {revision})" if revision else "")
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type,
                                    cache_dir=None if cache_dir is None else str(cache_dir)))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{where}: not in the Hugging Face cache and the Hub cannot be reached "
                                "(HF_HUB_OFFLINE=1 or no network): download it once with network access") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{where}: the repo has no such file: check the file name on the repo's "
                                "'Files' tab") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}: no such repo, or it is private/gated: log in (HF_TOKEN) and accept its "
                                "licence on the model page") from None
    return verify_sha256(path, sha256)


def _check_part(url: str, sha256: str | None):
    def check(part: Path) -> None:
        if actual := _mismatch(part, sha256):
            part.unlink()  # resuming onto wrong bytes would never match
            raise ChecksumError(f"{url}: sha256 is {actual}, expected {sha256}: the server sent another file (or a "
                                "damaged one); the download was removed, so a re-run starts over. Check the URL and "
                                "the expected checksum")

    return check


def _any_name(response, url: str) -> str:
    raw = urllib.parse.urlparse(response.geturl() or url).path.rsplit("/", 1)[-1]
    name = Path(urllib.parse.unquote(raw).replace("\\", "/")).name.strip().lstrip(".")
    if not name.lower().endswith(INPUT_SUFFIXES):
        raise ValueError(f"{url}: the server sends {name!r}, not a model, dataset or config file: pass a direct "
                         "download link")
    return name


def url_file(url: str, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool = True, timeout: float = 60.0) -> Path:
    """Download a URL once (resuming a partial download) and check its sha256 when given."""
    path = download_url(url, cache_dir, timeout=timeout, progress=progress, suffixes=INPUT_SUFFIXES,
                        name_for=_any_name, check=_check_part(url, sha256))
    return verify_sha256(path, sha256)  # a file cached by an earlier run is checked too


def local_file(path: str | Path, *, sha256: str | None = None, drive_timeout: float = 120.0) -> Path:
    """A path on disk or Drive (waited for up to ``drive_timeout`` s while Drive syncs); it is only read."""
    from nbkit.colab import MOUNTPOINT, drive_mydrive
    from nbkit.export.drive import wait_settled, wait_visible

    path = Path(path).expanduser().absolute()
    on_drive = any(path.is_relative_to(root) for root in (MOUNTPOINT, drive_mydrive()))
    if not on_drive and not path.exists():
        raise FileNotFoundError(f"{path}: no such file: check the path (relative paths start at {Path.cwd()})")
    path = wait_visible(path, timeout=drive_timeout if on_drive else 0)
    if on_drive and path.is_file():
        wait_settled(path, timeout=drive_timeout)  # still syncing: do not hash or load half a file
    return verify_sha256(path, sha256)


def fetch_input(source: str | Path, *, sha256: str | None = None, cache_dir: str | os.PathLike | None = None,
                progress: bool = True, timeout: float = 60.0, drive_timeout: float = 120.0) -> Path:
    """``hf://owner/repo[@rev]/file``, an http(s) URL, or a local/Drive path -> a local file."""
    text = str(source)
    match = _HF_URI.match(text)
    if match:
        return hub_file(match["repo"], match["path"], revision=match["rev"], sha256=sha256, cache_dir=cache_dir)
    if text.startswith("hf://"):
        raise ValueError(f"{text}: use hf://OWNER/REPO/path/to/file (hf://OWNER/REPO@REVISION/path for a revision)")
    if is_url(text):
        return url_file(text, sha256=sha256, cache_dir=cache_dir, progress=progress, timeout=timeout)
    return local_file(text, sha256=sha256, drive_timeout=drive_timeout)
