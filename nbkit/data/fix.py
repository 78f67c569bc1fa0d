"""Acting on a check: fixed copies in a separate folder, and quarantine inside a project's own copy.

- :func:`fix_dataset` writes a clean, complete copy of the dataset to a new folder: usable files
  copied byte for byte, odd ones re-encoded (RGB, alpha flattened onto white, 16-bit scaled to
  8 bits, oversized ones downscaled), captions re-encoded as UTF-8, files sharing a name renamed,
  unusable files left out; plus a ``dataset.toml`` for it. The checked files are only read.
- :func:`quarantine_files` *moves* files, and only files inside a project folder (nbkit's own copy,
  made by ``nbkit dataset import``), never anything else: the user's originals are never touched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbkit.config import load_toml, save_toml
from nbkit.data.check import DatasetReport, SubsetReport, output_plan
from nbkit.data.dataset_config import dataset_config_to_dict
from nbkit.data.image_checks import Problem, load_fixed
from nbkit.data.images import DatasetError
from nbkit.io import atomic_dir, atomic_write_bytes, atomic_write_text
from nbkit.project import Project

BACKUP_NAME = "dataset.before-fix.toml"


@dataclass
class FixResult:
    out_dir: Path
    dataset_toml: Path
    copied: int = 0
    converted: list[Path] = field(default_factory=list)
    renamed: list[tuple[Path, str]] = field(default_factory=list)
    recaptioned: list[Path] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)
    project_toml: Path | None = None

    def summary(self) -> str:
        lines = [f"fixed copy: {self.out_dir} ({self.copied} images; {len(self.converted)} re-encoded, "
                 f"{len(self.recaptioned)} captions re-encoded as UTF-8, {len(self.renamed)} renamed, "
                 f"{len(self.left_out)} unusable files left out)"]
        lines += [f"  renamed {src} -> {name}" for src, name in self.renamed]
        lines += [f"  left out {path}" for path in self.left_out]
        if self.project_toml:
            lines.append(f"the project's dataset config {self.project_toml} now uses the fixed copy "
                         f"(the previous one is saved as {BACKUP_NAME})")
        else:
            lines.append(f"train with dataset_config = \"{self.dataset_toml}\"")
        return "\n".join(lines)


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a.is_relative_to(b) or b.is_relative_to(a)


def _fix_subset(sub: SubsetReport, dest: Path, max_side: int, result: FixResult) -> int:
    """Write one subset's fixed copy into ``dest``; return the number of images written."""
    dest.mkdir(parents=True, exist_ok=True)
    result.left_out += [f.image.path for f in [*sub.files, *sub.others] if not f.usable]
    plan = output_plan(sub)
    for f, stem, suffix in plan:
        target = dest / f"{stem}{suffix}"
        if stem != f.image.path.stem:
            result.renamed.append((f.image.path, target.name))
        if f.image.needs_conversion:
            image = load_fixed(f.image.path, max_side)
            image.save(target, **({"format": "JPEG", "quality": 95} if suffix == ".jpg" else {"format": "PNG"}))
            result.converted.append(f.image.path)
        else:
            shutil.copyfile(f.image.path, target)
        if f.caption.text is not None:
            (dest / f"{stem}{sub.subset.caption_extension}").write_text(f.caption.text, encoding="utf-8")
            if f.caption.encoding != "utf-8":
                result.recaptioned.append(f.caption.path)
    return len(plan)


def _raw_config(report: DatasetReport) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """The checked config as written (so unset keys stay unset), and its subset tables in order."""
    if report.config_path is not None:
        raw = load_toml(report.config_path)
    else:
        raw = dataset_config_to_dict(report.datasets)
        for table in raw["datasets"]:
            table.pop("resolution", None)  # not chosen by the user: the run's option applies
            table.pop("batch_size", None)
    return raw, [table.setdefault("subsets", []) for table in raw["datasets"]]


def fixed_config(report: DatasetReport, new_dirs: dict[int, Path | None], base: Path) -> dict[str, Any]:
    """The checked config with each subset's ``image_dir`` moved (relative to ``base`` when inside it)."""
    raw, tables = _raw_config(report)
    subset_reports = iter(report.subsets)
    for d_index, ds in enumerate(report.datasets):
        keep = []
        for table, _sub in zip(tables[d_index], ds.subsets):
            new = new_dirs[id(next(subset_reports))]
            if new is None:
                continue  # nothing usable left in this subset
            table["image_dir"] = (new.relative_to(base) if new.is_relative_to(base) else new).as_posix()
            keep.append(table)
        raw["datasets"][d_index]["subsets"] = keep
    raw["datasets"] = [d for d in raw["datasets"] if d["subsets"]]
    if not raw["datasets"]:
        raise DatasetError("no usable image at all: nothing to write; fix the errors the check lists")
    for table in [raw.get("general", {}), *raw["datasets"]]:
        table.pop("image_dir", None)  # every subset now names its own folder
    return raw


def fix_dataset(report: DatasetReport, out_dir: str | Path, *, project: Project | None = None,
                max_side: int = 3000, progress: bool = True) -> FixResult:
    """Write a clean copy of the checked dataset to ``out_dir`` (replacing an earlier copy there).

    With ``project``, the project's ``dataset.toml`` is switched to the fixed copy (the previous
    one is kept as ``dataset.before-fix.toml``), so the next training run uses it.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir).expanduser().absolute()
    for sub in report.subsets:
        if _overlaps(out_dir, sub.subset.image_dir):
            raise DatasetError(f"{out_dir}: overlaps the dataset folder {sub.subset.image_dir}: choose a separate "
                               "folder for the fixed copy")
    if project is not None and out_dir.resolve().is_relative_to(project.dataset_dir.resolve()):
        raise DatasetError(f"{out_dir}: inside {project.dataset_dir}, where imports go: use e.g. "
                           f"{project.path / 'dataset_fixed'}")
    root = Path(os.path.commonpath([s.subset.image_dir.absolute().parent for s in report.subsets]))
    result = FixResult(out_dir, out_dir / "dataset.toml")
    new_dirs: dict[int, Path | None] = {}
    with atomic_dir(out_dir) as tmp:  # the copy appears only when complete
        for sub in tqdm(report.subsets, desc="fixed copy", unit="subset", disable=not progress):
            rel = sub.subset.image_dir.absolute().relative_to(root)
            written = _fix_subset(sub, tmp / rel, max_side, result)
            result.copied += written
            new_dirs[id(sub)] = out_dir / rel if written else None
        save_toml(fixed_config(report, new_dirs, out_dir), tmp / "dataset.toml")
    if project is not None:
        if project.dataset_toml.is_file():
            atomic_write_bytes(project.path / BACKUP_NAME, project.dataset_toml.read_bytes())
        save_toml(fixed_config(report, new_dirs, project.path), project.dataset_toml)
        result.project_toml = project.dataset_toml
    return result


def quarantine_files(files: list[tuple[Path, str]], dest: str | Path, project: Project) -> list[tuple[Path, Path]]:
    """Move ``(file, reason)`` pairs into ``dest``, keeping their path relative to the project.

    Refuses (moving nothing) if any file is outside the project folder or is a link: nbkit moves
    only its own copies, never a user's originals. ``dest/quarantine.log`` records each move.
    """
    home = project.path.resolve()
    dest = Path(dest).expanduser().absolute()
    if dest.resolve().is_relative_to(project.dataset_dir.resolve()):
        raise DatasetError(f"{dest}: inside {project.dataset_dir}, where it would be trained again: use e.g. "
                           f"{project.path / 'quarantine'}")
    for path, _ in files:
        if path.is_symlink() or not path.resolve().is_relative_to(home):
            raise DatasetError(
                f"{path}: not inside the project folder {project.path}; nothing was moved. nbkit only moves files "
                "in its own copy (made by `nbkit dataset import`), never your originals: remove it yourself"
            )
    moved = []
    for path, reason in files:
        if not path.exists():
            continue
        target = dest / path.resolve().relative_to(home)
        n = 2
        while target.exists():
            target, n = target.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        moved.append((path, target, reason))
    if moved:
        log = dest / "quarantine.log"
        old = log.read_text(encoding="utf-8") if log.is_file() else ""
        atomic_write_text(log, old + "".join(f"{src}\t->\t{dst}\t{why}\n" for src, dst, why in moved))
    return [(src, dst) for src, dst, _ in moved]


def quarantine_problems(report: DatasetReport, dest: str | Path, project: Project | None = None) -> list[tuple[Path, Path]]:
    """Move the unusable files the check found (and their captions) out of a project's dataset copy."""
    project = project or report.project
    if project is None:
        raise DatasetError("quarantine moves files only inside a project's own copy: check with --project NAME "
                           "(your original files are never moved)")
    files: list[tuple[Path, str]] = []
    for sub in report.subsets:
        usable_stems = {f.image.path.stem for f in sub.files if f.usable}
        for check in [f.image for f in [*sub.files, *sub.others] if not f.image.usable]:
            files.append((check.path, _reason(check.problems)))
            caption = check.path.with_suffix(sub.subset.caption_extension)
            if caption.is_file() and check.path.stem not in usable_stems:
                files.append((caption, "caption of a quarantined image"))
        for f in (f for f in sub.files if f.image.usable and not f.usable):  # the caption is the problem
            files.append((f.image.path, _reason(f.caption.problems)))
            if f.caption.path.is_file() and f.image.path.stem not in usable_stems:
                files.append((f.caption.path, "caption of a quarantined image"))
    return quarantine_files(files, dest, project)


def _reason(problems: list[Problem]) -> str:
    return next((p.what for p in problems if p.severity == "error"), "unusable")
