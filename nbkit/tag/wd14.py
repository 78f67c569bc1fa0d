"""WD14 tagger on onnxruntime, option for option like kohya's finetune/tag_images_by_wd14_tagger.py.

    from nbkit.tag.wd14 import WD14Config, tag_images
    report = tag_images("dataset/10_sks", WD14Config(repo_id="SmilingWolf/wd-swinv2-tagger-v3"))

The model is ``model.onnx`` + ``selected_tags.csv`` from a Hugging Face repo (through the HF
cache, so ``HF_HUB_OFFLINE=1`` uses a cached copy) or from a local folder. Providers are tried in
kohya's order: CUDA, ROCm, CPU. The input size and a fixed batch dimension are read from the
model's input shape (a fixed batch overrides ``batch_size``; the last batch is padded).
Captions already there are skipped, overwritten, appended to or prepended to; every file the
run changes is backed up first (``nbkit captions undo DIR``).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbkit.tag.backup import BackupSession
from nbkit.tag.config import DEFAULT_WD14_REPO, WD14_REPOS, WD14Config
from nbkit.tag.files import caption_path, find_images, load_in_batches, normalize_extension, write_tags
from nbkit.tag.wd14_image import load_tagger_image
from nbkit.tag.wd14_labels import TagLabels, read_selected_tags, rename_labels, select_tags

MODEL_FILE, TAGS_FILE = "model.onnx", "selected_tags.csv"
PROVIDER_ORDER = ("CUDAExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider")
DEFAULT_INPUT_SIZE = 448


def _local_files(model_dir: Path, repo_id: str) -> tuple[Path, Path]:
    for folder in (model_dir, model_dir / repo_id.replace("/", "_")):  # the second is kohya's layout
        if (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file():
            return folder / MODEL_FILE, folder / TAGS_FILE
    raise FileNotFoundError(f"{model_dir}: no {MODEL_FILE} + {TAGS_FILE} here: pass the folder holding both")


def tagger_files(
    repo_id: str = DEFAULT_WD14_REPO,
    model_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
) -> tuple[Path, Path]:
    """``(model.onnx, selected_tags.csv)`` from a local folder or a Hub repo (via the HF cache)."""
    if model_dir is not None:
        return _local_files(Path(model_dir), repo_id)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    kwargs = {"cache_dir": None if cache_dir is None else str(cache_dir), "force_download": force_download}
    try:
        return tuple(Path(hf_hub_download(repo_id, name, **kwargs)) for name in (MODEL_FILE, TAGS_FILE))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id}: {MODEL_FILE}/{TAGS_FILE} are not in the Hugging Face cache{f' {cache_dir}' if cache_dir else ''} "
            "and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no network): run once with network access, "
            "or pass model_dir with the two files"
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{repo_id}: no such Hugging Face repo (known taggers: {', '.join(WD14_REPOS)})") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{repo_id}: the repo has no {MODEL_FILE} or {TAGS_FILE}: is it a WD14 ONNX tagger?") from err


def onnx_providers(available: list[str]) -> list[str]:
    """kohya's choice: the first of CUDA, ROCm available, with CPU as the fallback."""
    return [p for p in PROVIDER_ORDER[:-1] if p in available][:1] + ["CPUExecutionProvider"]


class WD14Tagger:
    """An onnxruntime session plus its labels; ``predict`` takes an NHWC float32 BGR batch."""

    def __init__(self, model_path: str | Path, tags_csv: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            str(model_path), providers=providers or onnx_providers(ort.get_available_providers())
        )
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[-1] != 3:
            raise ValueError(f"{model_path}: input {inp.name} {inp.shape} is not NHWC [batch, size, size, 3]")
        self.input_name = inp.name
        self.input_size = inp.shape[1] if isinstance(inp.shape[1], int) else DEFAULT_INPUT_SIZE
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        self.labels: TagLabels = read_selected_tags(tags_csv)
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.labels.names):
            raise ValueError(f"{model_path}: {outputs[-1]} outputs but {tags_csv} has {len(self.labels.names)} tags")

    @classmethod
    def from_config(cls, config: WD14Config) -> WD14Tagger:
        model, tags = tagger_files(config.repo_id, config.model_dir, config.cache_dir, config.force_download)
        return cls(model, tags)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def load_image(self, path: str | Path) -> np.ndarray:
        return load_tagger_image(path, self.input_size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``[len(batch), n_tags]``; a fixed-batch model gets zero-padded chunks."""
        step = self.fixed_batch or max(1, len(batch))
        out = []
        for i in range(0, len(batch), step):
            chunk = np.asarray(batch[i : i + step], dtype=np.float32)
            n = len(chunk)
            if n < step:
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            out.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(out) if out else np.zeros((0, len(self.labels.names)), np.float32)


@dataclass
class TagReport:
    folder: Path
    images: int = 0
    written: int = 0
    skipped: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    backup: Path | None = None
    provider: str = ""

    def summary(self) -> str:
        done = self.written + len(self.failed)
        rate = done / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.folder}: {self.written} captions written, {self.skipped} kept, {len(self.failed)} unreadable "
            f"of {self.images} images; {done} tagged in {self.seconds:.1f} s ({rate:.2f} images/s, {self.provider})"
        ]
        lines += [f"  unreadable: {path}: {why}" for path, why in self.failed]
        if self.backup is not None:
            lines.append(f"  undo: nbkit captions undo {self.folder} (backup: {self.backup})")
        return "\n".join(lines)


def _gpu_hint(providers: list[str]) -> str | None:
    if "CUDAExecutionProvider" in providers or not (shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists()):
        return None
    return "a GPU is present but onnxruntime runs on CPU: `pip install onnxruntime-gpu` to tag on the GPU"


def tag_images(
    folder: str | Path,
    config: WD14Config | None = None,
    *,
    tagger: WD14Tagger | None = None,
    backup_dir: str | Path | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TagReport:
    """Tag every image in ``folder`` and write its caption file; returns what happened."""
    from tqdm.auto import tqdm

    config = config or WD14Config()
    folder, extension, mode = Path(folder), normalize_extension(config.caption_extension), config.existing_mode()
    images = find_images(folder, config.recursive)
    report = TagReport(folder, images=len(images))
    todo = [p for p in images if not (mode == "skip" and caption_path(p, extension).is_file())]
    report.skipped = len(images) - len(todo)
    if not todo:  # nothing to tag: do not download or load a model
        if verbose:
            print(report.summary())
        return report
    tagger = tagger or WD14Tagger.from_config(config)
    report.provider = tagger.providers[0]
    if verbose and (hint := _gpu_hint(tagger.providers)):
        print(hint)
    labels = rename_labels(tagger.labels, remove_underscore=config.remove_underscore,
                           tag_replacement=config.tag_replacement, character_tag_expand=config.character_tag_expand,
                           separator=config.caption_separator)
    rules, backup = config.rules(), BackupSession(folder, "wd14", backup_dir)
    batch_size = tagger.fixed_batch or max(1, config.batch_size)
    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc="WD14", disable=not progress) as bar:
        batches = load_in_batches(todo, tagger.load_image, batch_size, lambda p, e: report.failed.append((p, str(e))))
        for paths, arrays in batches:
            probs = tagger.predict(np.stack(arrays)) if arrays else []
            for path, prob in zip(paths, probs):
                tags = select_tags(prob, labels, rules)
                report.counts.update(tags)
                report.written += write_tags(caption_path(path, extension), tags, mode, config.caption_separator, backup)
            bar.update(len(report.failed) + report.written - bar.n)  # unreadable images count as done
    report.seconds, report.backup = time.perf_counter() - start, backup.path
    if verbose:
        print(report.summary())
        if config.frequency_tags:
            print("\n".join(f"{tag}: {n}" for tag, n in report.counts.most_common()))
    return report
