"""Fetching datasets from the network for ``nbkit dataset import``: zip URLs and Hugging Face datasets.

- A zip URL is downloaded once into ``<cache>/downloads/<hash of url>/`` (the same cache as model
  URLs, :func:`nbkit.models.download.download_dir_for`), through a ``.download.part`` file that
  survives a Colab disconnect and is resumed with an HTTP Range request; a tqdm bar shows progress.
- A Hugging Face dataset repo goes through ``huggingface_hub.snapshot_download(repo_type="dataset")``
  into the normal HF cache; with ``HF_HUB_OFFLINE=1`` a cached snapshot is used.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from nbkit.data.images import DatasetError
from nbkit.models.download import download_url

_CHUNK = 1 << 20


def _zip_name(response, url: str) -> str:
    disposition = response.headers.get("Content-Disposition") or ""
    found = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', disposition, re.IGNORECASE)
    raw = found[1] if found else urllib.parse.urlparse(response.geturl() or url).path.rsplit("/", 1)[-1]
    name = Path(urllib.parse.unquote(raw).replace("\\", "/")).name.strip() or "download"
    name = re.sub(r"[^\w.\- ]", "_", name).lstrip(".") or "download"
    return name if name.lower().endswith(".zip") else f"{name}.zip"


def _require_zip(part: Path, url: str) -> None:
    if zipfile.is_zipfile(part):
        return
    head = part.read_bytes()[:200].lower()
    part.unlink()
    what = "a web page" if b"<html" in head or b"<!doctype" in head else "not a zip file"
    raise DatasetError(
        f"{url}: the server sent {what}, not a zip. Use a direct download link (for Google Drive, mount Drive "
        "and pass the file path instead)"
    )


def download_archive(url: str, cache_dir: str | Path | None = None, *, timeout: float = 60.0,
                     progress: bool = True) -> Path:
    """Download a zip once into nbkit's cache, resuming a partial download; return the local file."""
    try:
        return download_url(url, cache_dir, timeout=timeout, progress=progress, suffixes=(".zip",),
                            name_for=_zip_name, check=lambda part: _require_zip(part, url))
    except ConnectionError as err:
        raise ConnectionError(f"{err} (run the import again to resume)") from err


def hf_dataset_snapshot(repo_id: str, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) a Hugging Face *dataset* repo; return the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      cache_dir=None if cache_dir is None else str(cache_dir)))
    except LocalEntryNotFoundError as err:
        raise DatasetError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (no network or "
            "HF_HUB_OFFLINE=1): connect and run again, or download the dataset and import the folder "
            f"(if {repo_id} is meant to be a local folder: it does not exist, check the path)"
        ) from err
    except RepositoryNotFoundError as err:
        raise DatasetError(
            f"{repo_id}: no such Hugging Face dataset, or it is private/gated: check the id (org/name) and log in "
            f"with huggingface_hub.login() (if {repo_id} is meant to be a local folder: it does not exist)"
        ) from err
