"""Getting model files onto the machine: Hugging Face repos and plain https URLs.

- Repo ids go through ``huggingface_hub.snapshot_download`` into the normal HF cache, limited to
  what a Stable Diffusion pipeline needs (configs, tokenizer, safetensors weights; ``.bin`` only
  for components that have no safetensors). With ``HF_HUB_OFFLINE=1`` a cached snapshot is used.
- URLs to a ``.safetensors``/``.ckpt`` are downloaded with resume (HTTP Range) into
  ``<cache>/downloads/<hash of url>/<file name>``: bytes go to a ``.part`` file that survives a
  Colab disconnect, and the file gets its final name only once complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from nbkit.models.config_dirs import cache_root

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    # sharded weights (large fine-tunes saved with a max shard size)
    "*/diffusion_pytorch_model.safetensors.index.json",
    "*/diffusion_pytorch_model-*-of-*.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*-of-*.safetensors",
    # SDXL: the second text encoder (OpenCLIP bigG) and its tokenizer
    "tokenizer_2/*",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-*-of-*.safetensors",
]
HUB_BIN_PATTERNS = {
    "unet": "unet/diffusion_pytorch_model.bin",
    "vae": "vae/diffusion_pytorch_model.bin",
    "text_encoder": "text_encoder/pytorch_model.bin",
}
_CHUNK = 1 << 20


def is_url(name: str) -> bool:
    return name.startswith(("https://", "http://"))


def hub_repo_from_url(url: str) -> str | None:
    """``https://huggingface.co/org/name`` (a repo page, not a file) -> ``org/name``."""
    parsed = urllib.parse.urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.netloc in ("huggingface.co", "hf.co") and len(parts) == 2:
        return "/".join(parts)
    return None


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix == ".safetensors" for p in folder.iterdir())


def hub_snapshot(repo_id: str, cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> Path:
    """Download (or find in the HF cache) the files of a diffusers SD repo; return the snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    kwargs = {"cache_dir": None if cache_dir is None else str(cache_dir), "revision": revision}
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, **kwargs))
        missing = [HUB_BIN_PATTERNS[c] for c in HUB_BIN_PATTERNS if not _has_weights(folder / c)]
        if missing and (folder / "model_index.json").is_file():
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS + missing, **kwargs))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id}: no local file or folder of that name, not in the Hugging Face cache"
            f"{f' {cache_dir}' if cache_dir else ''}, and the Hub cannot be reached (HF_HUB_OFFLINE=1 or "
            "no network). Download it once with network access, or pass a local folder or file."
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id}: no such Hugging Face repo, or it is private/gated (log in with "
            "huggingface_hub.login() and accept its licence on the model page)"
        ) from e
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{repo_id}: the repo has no model_index.json, so it is not a diffusers model. If it holds a "
            f"single .safetensors/.ckpt file, pass its URL: https://huggingface.co/{repo_id}/resolve/main/<file>"
        )
    return folder


def download_dir_for(url: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder a URL downloads into (one per URL, so a partial download can resume)."""
    return cache_root(cache_dir) / "downloads" / hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]


def _normalize(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc in ("huggingface.co", "hf.co") and "/blob/" in parsed.path:
        return urllib.parse.urlunparse(parsed._replace(path=parsed.path.replace("/blob/", "/resolve/", 1)))
    return url


def _file_name(response, url: str) -> str:
    disposition = response.headers.get("Content-Disposition") or ""
    found = re.search(r"filename\*=(?:UTF-8'')?([^;]+)", disposition, re.IGNORECASE) or re.search(
        r'filename="?([^";]+)"?', disposition, re.IGNORECASE
    )
    raw = found[1] if found else urllib.parse.urlparse(response.geturl() or url).path.rsplit("/", 1)[-1]
    name = os.path.basename(urllib.parse.unquote(raw).strip().replace("\\", "/"))
    if not name.lower().endswith(WEIGHT_SUFFIXES) or name.startswith("."):
        raise ValueError(
            f"{url}: the server sends {name!r}, not a .safetensors/.ckpt file; pass a direct link to the "
            "checkpoint file (for huggingface.co use a /resolve/main/<file> link)"
        )
    return name


def _open(url: str, offset: int, timeout: float):
    from nbkit._version import __version__

    headers = {"User-Agent": f"nbkit/{__version__}"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch(url: str, part: Path, timeout: float, progress: bool, name_for=None) -> tuple[str, int | None]:
    """Append the rest of ``url`` to ``part`` (HTTP Range resume); return (file name, expected total
    size). ``name_for(response, url)`` names the file (default: a checkpoint name or an error)."""
    from tqdm.auto import tqdm

    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        part.unlink()  # the partial file does not fit the remote one: start over
        offset, response = 0, _open(url, 0, timeout)
    with response:
        name = (name_for or _file_name)(response, url)
        if offset and response.status != 206:
            offset = 0  # the server ignored the Range header
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=name, disable=not progress
        ) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return name, total


def download_url(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    timeout: float = 60.0,
    progress: bool = True,
    suffixes: tuple[str, ...] = WEIGHT_SUFFIXES,
    name_for=None,
    check=None,
) -> Path:
    """Download a URL once (resuming a partial download); return the local file. By default only
    checkpoints are accepted; ``suffixes``/``name_for``/``check(part)`` adapt it to other files
    (``check`` may raise to refuse what arrived, e.g. a web page instead of a zip)."""
    url = _normalize(url)
    folder = download_dir_for(url, cache_dir)
    if folder.is_dir():
        done = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
        if done:
            return done[0]
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / ".download.part"
    try:
        name, total = _fetch(url, part, timeout, progress, name_for)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise ConnectionError(
            f"{url}: download failed ({e}); run again to resume from {part.stat().st_size if part.exists() else 0} "
            "bytes"
        ) from e
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"{url}: download incomplete ({size} of {total} bytes); run again to resume")
    if check is not None:
        check(part)
    target = folder / name
    os.replace(part, target)
    return target
