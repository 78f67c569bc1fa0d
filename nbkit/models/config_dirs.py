"""Local diffusers config folders, so single-file checkpoints load with no download.

``StableDiffusionPipeline.from_single_file(path, config=<folder>)`` needs a diffusers folder
holding ``model_index.json``, the component ``config.json`` files and a tokenizer. nbkit gets
one from three places:

- the real SD1.5 / SD2.1-base / SD2.1-v / SDXL-base configs shipped in ``nbkit/models/configs``; their
  tokenizer vocabulary (``vocab.json``/``merges.txt``, 2 MB) is not shipped but rebuilt from
  OpenAI's bundled BPE merge list into a cache folder (both tokenizers of SDXL use it);
- the ``nbkit.diffusers_config`` metadata nbkit writes into its own single files (see
  ``diffusers_config_payload``), which makes tiny and non-standard models self-describing;
- a folder the user passes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

CONFIGS_ROOT = Path(__file__).parent / "configs"
BPE_PATH = Path(__file__).resolve().parents[1] / "assets" / "bpe_simple_vocab_16e6.txt.gz"

#: arch name -> shipped folder (real Hugging Face repo it was taken from in the comment)
SHIPPED_CONFIGS = {
    "sd15": "sd15",  # runwayml/stable-diffusion-v1-5
    "sd21": "sd21-base",  # stabilityai/stable-diffusion-2-1-base
    "sd21-v": "sd21-v",  # stabilityai/stable-diffusion-2-1
    "sdxl": "sdxl",  # stabilityai/stable-diffusion-xl-base-1.0
}
PAYLOAD_FORMAT = 1
CLIP_VOCAB_SIZE = 49408
_TOKENIZER_META_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """nbkit's cache folder: ``cache_dir``, else ``$NBKIT_CACHE_DIR``, else ``~/.cache/nbkit``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("NBKIT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "nbkit"


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """OpenAI CLIP's 48,894 BPE merges, read the way CLIP's ``SimpleTokenizer`` reads them."""
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    pairs = (line.split() for line in lines[1 : 49152 - 256 - 2 + 1])
    return tuple((a, b) for a, b in pairs)


@lru_cache(maxsize=1)
def clip_vocab() -> dict[str, int]:
    """The 49,408-token CLIP vocabulary (same ids as ``openai/clip-vit-large-patch14``)."""
    from nbkit.models.tokenizer import clip_vocab_from_merges

    return clip_vocab_from_merges(list(clip_merges()))


def write_clip_vocab_files(folder: str | os.PathLike) -> None:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(f"{a} {b}" for a, b in clip_merges())
    (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _cached_folder(name: str, digest: str, cache_dir: str | os.PathLike | None, fill) -> Path:
    """Return ``<cache>/configs/<name>-<digest>``, creating it with ``fill(tmp)`` + an atomic rename.

    The name is content-addressed, so when two processes race the first rename wins and the
    other copy is dropped; a folder in use is never replaced.
    """
    target = cache_root(cache_dir) / "configs" / f"{name}-{digest}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)  # fails if another process created a non-empty target meanwhile
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def shipped_config_dir(arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A complete diffusers config folder for ``arch`` (sd15|sd21|sd21-v|sdxl), tokenizer(s) included."""
    if arch not in SHIPPED_CONFIGS:
        raise ValueError(f"no shipped config for arch {arch!r}: choose one of {', '.join(SHIPPED_CONFIGS)}")
    src = CONFIGS_ROOT / SHIPPED_CONFIGS[arch]
    files = {str(p.relative_to(src)): p.read_text(encoding="utf-8") for p in sorted(src.rglob("*")) if p.is_file()}

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for name in ("tokenizer", "tokenizer_2"):
            if (src / name).is_dir():
                write_clip_vocab_files(tmp / name)

    return _cached_folder(src.name, _digest(files), cache_dir, fill)


def tokenizer_payload(tokenizer: Any) -> dict:
    """Tokenizer files as text; the standard CLIP vocabulary is referenced, not copied."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}
    vocab = tokenizer.get_vocab()
    if len(vocab) == CLIP_VOCAB_SIZE and vocab == clip_vocab():
        return {"clip_bpe": True, "files": {k: v for k, v in files.items() if k in _TOKENIZER_META_FILES}}
    return {"clip_bpe": False, "files": files}


def _config(json_text: str) -> dict:
    # ``_name_or_path`` is where the model was loaded from: a local path the file must not leak.
    return {k: v for k, v in json.loads(json_text).items() if k != "_name_or_path"}


def diffusers_config_payload(pipe: Any) -> dict:
    """Everything needed to rebuild ``pipe``'s diffusers config folder (no weights); an SDXL pipeline
    adds ``text_encoder_2`` and ``tokenizer_2``."""
    payload = {
        "format": PAYLOAD_FORMAT,
        "model_index": _config(pipe.to_json_string()),
        "unet": _config(pipe.unet.to_json_string()),
        "vae": _config(pipe.vae.to_json_string()),
        "text_encoder": _config(pipe.text_encoder.config.to_json_string()),
        "scheduler": _config(pipe.scheduler.to_json_string()),
        "tokenizer": tokenizer_payload(pipe.tokenizer),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        payload["text_encoder_2"] = _config(pipe.text_encoder_2.config.to_json_string())
        payload["tokenizer_2"] = tokenizer_payload(pipe.tokenizer_2)
    return payload


def _write_payload(payload: dict, folder: Path) -> None:
    index = dict(payload["model_index"])
    # Only the SD components travel in the file: drop safety checker / feature extractor.
    for name in ("safety_checker", "feature_extractor", "image_encoder"):
        if name in index:
            index[name] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    configs = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
    configs["scheduler"] = "scheduler_config.json"
    if "text_encoder_2" in payload:
        configs["text_encoder_2"] = "config.json"
    for sub, name in configs.items():
        (folder / sub).mkdir()
        (folder / sub / name).write_text(json.dumps(payload[sub], indent=2))
    for sub in ("tokenizer", "tokenizer_2"):
        if sub in payload:
            _write_tokenizer(payload[sub], folder / sub)


def _write_tokenizer(tokenizer: dict, tok: Path) -> None:
    tok.mkdir()
    for name, text in tokenizer["files"].items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"refusing tokenizer file name {name!r} in embedded config")
        (tok / name).write_text(text, encoding="utf-8")
    if tokenizer.get("clip_bpe"):
        write_clip_vocab_files(tok)


def config_dir_from_payload(payload: dict | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild (once, cached by content) the folder described by a ``nbkit.diffusers_config`` payload."""
    if isinstance(payload, str):
        payload = json.loads(payload)
    if payload.get("format") != PAYLOAD_FORMAT:
        raise ValueError(
            f"embedded nbkit.diffusers_config has format {payload.get('format')!r}, this nbkit reads "
            f"format {PAYLOAD_FORMAT}: upgrade nbkit or pass config_dir=<diffusers folder>"
        )
    return _cached_folder("embedded", _digest(payload), cache_dir, lambda tmp: _write_payload(payload, tmp))
