"""``nbkit dataset import``: bring a folder, zips, a zip URL or a Hugging Face dataset into a project.

Every source is *copied* into ``<project>/dataset/<name>/`` (nested folders kept); the user's
originals are only read. Each folder holding images becomes a kohya subset: a folder named
``N_identifier class`` gives ``num_repeats = N`` and ``class_tokens = "identifier class"``
(``5_style`` gives 5 and ``"style"``; other names give 1 repeat and no class tokens). The project's
``dataset.toml`` is then written in kohya's schema. Importing the same source again keeps its copy
(unless ``replace``), so re-running a notebook cell after a Colab reset never doubles the data
nor discards captions written into the copy.
"""

from __future__ import annotations

import re
import shutil
import urllib.parse
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.config import save_toml
from nbkit.data.dataset_config import DatasetSpec, SubsetSpec, dataset_config_to_dict, detect_caption_extension
from nbkit.data.fetch import download_archive, hf_dataset_snapshot
from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError
from nbkit.data.safe_extract import (
    ExtractLimits,
    copy_planned,
    extract_zip,
    plan_folder,
)
from nbkit.io import atomic_dir
from nbkit.models.download import REPO_ID, is_url
from nbkit.project import Project

_KOHYA_NAME = re.compile(r"^([1-9]\d*)_(.+)$")
_REG_NAMES = {"reg", "regularization", "regularisation", "reg_data", "class_images"}
SOURCE_MARKER = ".nbkit-source"  # in each copy: where it came from, so a re-import is recognised


@dataclass(frozen=True)
class KohyaFolder:
    """What a kohya folder name says: ``10_sks dog`` -> repeats 10, identifier ``sks``, class ``dog``."""

    repeats: int = 1
    identifier: str | None = None
    class_name: str | None = None

    @property
    def class_tokens(self) -> str | None:
        words = [w for w in (self.identifier, self.class_name) if w]
        return " ".join(words) or None


def parse_kohya_folder_name(name: str) -> KohyaFolder:
    """Parse ``N_identifier class``; a single word after ``N_`` is the class; no prefix gives 1 repeat."""
    match = _KOHYA_NAME.match(name.strip())
    if not match:
        return KohyaFolder()
    words = match[2].strip().split(maxsplit=1)
    if len(words) == 1:
        return KohyaFolder(int(match[1]), None, words[0])
    return KohyaFolder(int(match[1]), words[0], words[1])


def discover_subsets(root: Path, relative_to: Path | None = None) -> tuple[list[SubsetSpec], list[Path]]:
    """One subset per folder under ``root`` that holds images; also the folders holding nothing."""
    subsets, empty = [], []
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        rel_parts = folder.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts):
            continue  # in-progress copies (atomic_dir temp folders), hidden folders
        files = [p for p in folder.iterdir() if p.is_file()]
        has_images = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files)
        if not has_images:
            if not files and not any(p.is_dir() for p in folder.iterdir()) and folder != root:
                empty.append(folder)
            continue
        kohya = parse_kohya_folder_name(folder.name)
        image_dir = folder.relative_to(relative_to) if relative_to else folder
        subsets.append(SubsetSpec(
            image_dir=image_dir,
            class_tokens=kohya.class_tokens,
            num_repeats=kohya.repeats,
            caption_extension=detect_caption_extension(folder),
            is_reg=any(part.lower() in _REG_NAMES for part in rel_parts[:-1]),
        ))
    return subsets, empty


def write_project_dataset_toml(project: Project, resolution: int | None = None,
                               batch_size: int | None = None) -> tuple[Path, list[SubsetSpec], list[Path]]:
    """Write ``<project>/dataset.toml`` for every image folder of the project's dataset copy.

    ``image_dir`` is relative to the project folder so the project still works when Drive is
    mounted elsewhere. ``resolution``/``batch_size`` are written only when given: otherwise the
    run's own options apply (in kohya's precedence a value in the dataset file would win).
    """
    subsets, empty = discover_subsets(project.dataset_dir, relative_to=project.path)
    if not subsets:
        raise DatasetError(
            f"{project.dataset_dir}: no images (.png/.jpg/.jpeg/.webp/.bmp) in the project's dataset folder: "
            "import a folder or zip of images first"
        )
    spec = DatasetSpec(resolution=(resolution or 512,) * 2, batch_size=batch_size or 1, subsets=subsets)
    raw = dataset_config_to_dict([spec])
    for table in raw["datasets"]:
        if resolution is None:
            table.pop("resolution", None)
        if batch_size is None:
            table.pop("batch_size", None)
        for entry in table["subsets"]:
            entry["image_dir"] = Path(entry["image_dir"]).as_posix()
    return save_toml(raw, project.dataset_toml), subsets, empty


# ------------------------------------------------------------------ sources
def classify_source(src: str | Path) -> tuple[str, str]:
    """(kind, value): kind is ``folder``, ``zip``, ``url`` or ``hf`` (value: the repo id)."""
    text = str(src)
    if is_url(text):
        parsed = urllib.parse.urlparse(text)
        parts = [p for p in parsed.path.split("/") if p]
        if parsed.netloc in ("huggingface.co", "hf.co") and len(parts) == 3 and parts[0] == "datasets":
            return "hf", f"{parts[1]}/{parts[2]}"
        return "url", text
    if text.startswith("hf://datasets/"):
        return "hf", text[len("hf://datasets/"):].strip("/")
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            return "zip", str(path)
        raise DatasetError(f"{path}: not a folder or a .zip file: pass the folder of images, or a zip of it")
    if REPO_ID.match(text) and not text.startswith((".", "~")):
        return "hf", text
    raise DatasetError(
        f"{text}: no such folder or file, and not an http(s) URL or a Hugging Face dataset id (org/name): "
        "check the path (on Colab, Drive is under /content/drive/MyDrive after mounting it)"
    )


# ------------------------------------------------------------------ import
@dataclass
class ImportedSource:
    """One source copied into the project: where it went and what was left out."""

    source: str
    kind: str
    target: Path
    files: int
    skipped: list[str] = field(default_factory=list)
    empty_dirs: list[str] = field(default_factory=list)
    already_imported: bool = False


@dataclass
class ImportResult:
    project: Project
    sources: list[ImportedSource]
    subsets: list[SubsetSpec]
    dataset_toml: Path

    def summary(self) -> str:
        lines = [f"project {self.project.name}: {self.project.path}"]
        for s in self.sources:
            if s.already_imported:
                lines.append(f"  {s.kind:6} {s.source}: already in the project as {s.target}, kept as it is (import "
                             "with --replace to copy it again; that discards changes made in the copy)")
                continue
            lines.append(f"  {s.kind:6} {s.source} -> {s.target} ({s.files} files)")
            if s.skipped:
                shown = ", ".join(s.skipped[:5]) + (f" and {len(s.skipped) - 5} more" if len(s.skipped) > 5 else "")
                lines.append(f"         not copied (not an image or caption): {shown}")
            lines += [f"         note: {d} is an empty folder: nothing to import" for d in s.empty_dirs]
        for sub in self.subsets:
            tokens = f", class_tokens '{sub.class_tokens}'" if sub.class_tokens else ""
            reg = ", regularisation" if sub.is_reg else ""
            lines.append(f"  subset {sub.image_dir}: {sub.num_repeats} repeats{tokens}, "
                         f"captions {sub.caption_extension}{reg}")
        lines.append(f"dataset config: {self.dataset_toml} (next: nbkit dataset check --project "
                     f"\"{self.project.name}\")")
        return "\n".join(lines)


def _target_name(kind: str, value: str) -> str:
    if kind == "hf":
        raw = value.split("/")[-1]
    elif kind == "url":
        raw = Path(urllib.parse.unquote(urllib.parse.urlparse(value).path)).stem or "download"
    else:
        path = Path(value)
        raw = path.stem if kind == "zip" else path.resolve().name
    name = re.sub(r'[\\/:*?"<>|\x00]', "_", raw).strip().lstrip(".")
    return name or "dataset"


def _refuse_overlap(path: Path, project: Project) -> None:
    real, home = path.resolve(), project.path.resolve()
    if real.is_relative_to(home) or home.is_relative_to(real):
        raise DatasetError(
            f"{path}: this is (or contains) the project folder {project.path}; import the original images "
            "from outside the project"
        )


def _import_one(kind: str, value: str, target: Path, name: str, limits: ExtractLimits, cache_dir, progress: bool,
                timeout: float) -> ImportedSource:
    """Fill ``target`` (a fresh temporary folder for copy ``name``) from one source."""
    if kind == "folder":
        plan = plan_folder(Path(value))
        copy_planned(plan, target, progress, desc=f"copy {Path(value).name}")
        return ImportedSource(value, kind, target, len(plan.files), plan.skipped, plan.empty_dirs)
    if kind in ("zip", "url"):
        archive = Path(value) if kind == "zip" else download_archive(value, cache_dir, timeout=timeout,
                                                                      progress=progress)
        plan = extract_zip(archive, target, limits, progress, strip_prefix=name)
        return ImportedSource(value, kind, target, len(plan.files), plan.skipped)
    snapshot = hf_dataset_snapshot(value, cache_dir)
    plan = plan_folder(snapshot, allowed_root=snapshot.parents[1])  # cache files link to ../../blobs
    copy_planned(plan, target, progress, desc=value)
    files, skipped = len(plan.files), []
    for name in plan.skipped:
        if name.lower().endswith(".zip"):  # datasets are often shipped as a zip inside the repo
            files += len(extract_zip((snapshot / name).resolve(), target / Path(name).with_suffix(""), limits,
                                     progress, strip_prefix=Path(name).stem).files)
        elif not name.startswith((".git", "README")):
            skipped.append(name)
    return ImportedSource(value, kind, target, files, skipped, plan.empty_dirs)


def _choose_target(project: Project, base: str, source_id: str, used: set[str]) -> tuple[Path, bool]:
    """(copy folder, True if this very source was imported there before)."""
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        target = project.dataset_dir / name
        if name.lower() not in used:
            marker = target / SOURCE_MARKER
            same = marker.is_file() and marker.read_text(encoding="utf-8") == source_id
            if same or not target.exists():
                used.add(name.lower())
                return target, same
        n += 1


def import_dataset(
    sources: Sequence[str | Path],
    project: Project | str,
    *,
    root: str | Path | None = None,
    limits: ExtractLimits | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
    timeout: float = 60.0,
    replace: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Copy each source into ``<project>/dataset/<name>/`` and write the project's ``dataset.toml``.

    ``sources``: folders, local ``.zip`` files, http(s) URLs of zips, Hugging Face dataset ids.
    ``limits``: zip-bomb guards. Every source is checked completely before anything is written,
    and each copy appears only when complete. The originals are only read. A source imported
    before is kept as it is (captions written into the copy survive) unless ``replace``; another
    source with the same name gets ``<name>-2``.
    """
    if isinstance(project, str):
        project = Project.open(project, root)
    limits = limits or ExtractLimits()
    if not sources:
        raise DatasetError("nothing to import: pass a folder, a .zip, a URL or a Hugging Face dataset id")
    imported, used = [], set()
    for src in sources:
        kind, value = classify_source(src)
        if kind in ("folder", "zip"):
            _refuse_overlap(Path(value), project)
        source_id = str(Path(value).resolve()) if kind in ("folder", "zip") else f"{kind}:{value}"
        target, seen = _choose_target(project, _target_name(kind, value), source_id, used)
        if seen and not replace:  # a re-run notebook cell: keep the copy (and any captions written into it)
            imported.append(ImportedSource(str(src), kind, target, 0, already_imported=True))
            continue
        with atomic_dir(target) as tmp:
            done = _import_one(kind, value, tmp, target.name, limits, cache_dir, progress, timeout)
            (tmp / SOURCE_MARKER).write_text(source_id, encoding="utf-8")
        done.source, done.target = str(src), target
        imported.append(done)
    toml, subsets, _ = write_project_dataset_toml(project, resolution, batch_size)
    return ImportResult(project, imported, subsets, toml)


def remove_imported(project: Project, name: str) -> None:
    """Delete one imported copy from the project (never the original) and rewrite ``dataset.toml``."""
    target = (project.dataset_dir / name).resolve()
    if not target.is_relative_to(project.dataset_dir.resolve()) or target == project.dataset_dir.resolve():
        raise DatasetError(f"{name}: not a folder of {project.dataset_dir}")
    shutil.rmtree(target)
    write_project_dataset_toml(project)
