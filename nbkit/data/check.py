"""``nbkit dataset check``: what training will see, and every problem with the files, before a run.

:func:`check_dataset` returns a :class:`DatasetReport`: per subset the image count, repeats,
captions found/missing/empty, images x repeats, then steps per epoch and total steps counted by
the trainer's own :func:`~nbkit.data.train_data.steps_per_epoch`, and a list of problems that
each name the file, what is wrong and the fix. Nothing is changed: fixed copies
(:func:`nbkit.data.fix.fix_dataset`) and quarantine (:func:`nbkit.data.fix.quarantine_problems`)
happen only when asked.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.data.caption_checks import CaptionCheck, check_caption, long_caption_problem
from nbkit.data.dataset_config import DatasetSpec, SubsetSpec, kohya_subdirs, load_dataset_config
from nbkit.data.image_checks import ERROR, FIXABLE, WARNING, ImageCheck, Problem, check_image
from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError
from nbkit.data.safe_extract import CAPTION_EXTENSIONS, OTHER_IMAGE_EXTENSIONS
from nbkit.project import Project

MAX_SIDE = 3000


@dataclass
class FileReport:
    """One image of a subset and its caption."""

    image: ImageCheck
    caption: CaptionCheck

    @property
    def usable(self) -> bool:
        return self.image.usable and not any(p.severity == ERROR for p in self.caption.problems)


@dataclass
class SubsetReport:
    subset: SubsetSpec
    files: list[FileReport] = field(default_factory=list)
    others: list[FileReport] = field(default_factory=list)  # .gif/.tif/...: ignored by training
    problems: list[Problem] = field(default_factory=list)  # folder-level problems

    @property
    def usable(self) -> int:
        return sum(f.usable for f in self.files)

    def captions(self, status: str) -> int:
        return sum(f.caption.status == status for f in self.files)

    @property
    def samples(self) -> int:
        """Images x repeats (before kohya's regularisation balancing)."""
        return self.usable * self.subset.num_repeats

    def all_problems(self) -> list[Problem]:
        out = list(self.problems)
        for f in self.files:
            out += f.image.problems + f.caption.problems
        for other in self.others:  # their captions matter only once converted: reported with the image's
            out += other.image.problems + (other.caption.problems if other.image.usable else [])
        return out


def _folder_problems(sub: SubsetSpec, images: list[Path], files: list[Path]) -> list[Problem]:
    folder, out = sub.image_dir, []
    if not images:
        nested = sorted({p.parent.name for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS})
        hint = (f"the images are in subfolders ({', '.join(nested[:5])}); kohya reads only the folder itself: point "
                "image_dir at them (`nbkit dataset import` does)") if nested else \
            "put images in it, or remove this subset (folder) from the dataset config"
        out.append(Problem(folder, ERROR, "empty-folder", "holds no images (.png .jpg .jpeg .webp .bmp); training "
                           "stops with 'no images found'", hint))
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for image in images:
        by_stem[image.stem].append(image)
    for stem, same in by_stem.items():
        if len(same) > 1:
            names = " and ".join(p.name for p in same)
            out.append(Problem(same[1], WARNING, "duplicate-name", f"{names} share the caption file "
                               f"{stem}{sub.caption_extension} (captions are matched by name)", "rename one and give "
                               "it its own caption, or remove the duplicate; the --fix_to copy renames it"))
    stems = {p.stem for p in images}
    for caption in files:
        if caption.suffix.lower() in CAPTION_EXTENSIONS and caption.stem not in stems:
            out.append(Problem(caption, WARNING, "orphan-caption", "is a caption with no image of the same name; "
                               "it is ignored", "rename it to match its image, or remove it"))
    return out


def check_subset(sub: SubsetSpec, resolution: tuple[int, int], max_side: int = MAX_SIDE,
                 progress=None, max_token_length: int | None = None) -> SubsetReport:
    """Check every file of one subset folder (only that folder, as kohya reads it); captions longer
    than ``max_token_length`` CLIP tokens (75 when None) are reported with how many are cut."""
    report = SubsetReport(sub)
    if not sub.image_dir.is_dir():
        report.problems.append(Problem(sub.image_dir, ERROR, "missing-folder", "does not exist",
                                       "fix image_dir in the dataset config"))
        return report
    files = sorted(p for p in sub.image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    for path in images:
        caption = check_caption(path, sub.caption_extension, sub.class_tokens)
        long = long_caption_problem(caption, sub.caption_prefix, sub.caption_suffix, sub.enable_wildcard,
                                    max_token_length)
        caption.problems += [long] if long else []
        report.files.append(FileReport(check_image(path, resolution, max_side), caption))
        if progress:
            progress.update(1)
    for path in files:
        if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
            other = check_image(path, resolution, max_side)
            if other.usable:
                other.problems.insert(0, Problem(path, WARNING, "unsupported-format", f"is a {path.suffix} file; "
                                                 "training reads only .png .jpg .jpeg .webp .bmp, so it is ignored",
                                                 "convert it to PNG or JPEG; the --fix_to copy converts it to PNG"))
            report.others.append(FileReport(other, check_caption(path, sub.caption_extension, sub.class_tokens)))
    report.problems += _folder_problems(sub, images, files)
    missing = report.captions("missing")
    if missing and sub.class_tokens:
        report.problems.append(Problem(sub.image_dir, WARNING, "captions-missing", f"{missing} of {len(images)} "
                                       f"images have no {sub.caption_extension} caption; they train with the class "
                                       f"tokens '{sub.class_tokens}'", "caption them (`nbkit tag`) if they show more "
                                       "than the subject"))
    return report


@dataclass
class DatasetReport:
    """Everything :func:`check_dataset` found. ``str(report)`` is the printed table and problem list."""

    datasets: list[DatasetSpec]
    subsets: list[SubsetReport]
    batch_size: int | None = None  # None: each dataset's own batch_size (as the trainer does)
    epochs: int = 1
    gradient_accumulation_steps: int = 1
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    steps_note: str = ""
    extra_problems: list[Problem] = field(default_factory=list)  # project-level (folders not in the config)
    project: Project | None = None
    config_path: Path | None = None  # the dataset TOML checked (None for a folder or specs)
    buckets: list = field(default_factory=list)  # (bucket, images, images x repeats) as the trainer assigns them

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.subsets for p in s.all_problems()] + self.extra_problems

    def by_severity(self, severity: str) -> list[Problem]:
        return [p for p in self.problems if p.severity == severity]

    @property
    def ok(self) -> bool:
        """True when training can use every file exactly as it is."""
        return not self.by_severity(ERROR) and not self.by_severity(FIXABLE)

    def table(self) -> str:
        rows = [("subset", "images", "usable", "repeats", "captions found/missing/empty", "images x repeats")]
        for s in self.subsets:
            name = _short(s.subset.image_dir, self.project) + (" (reg)" if s.subset.is_reg else "")
            rows.append((name, str(len(s.files)), str(s.usable), str(s.subset.num_repeats),
                         f"{s.captions('found')}/{s.captions('missing')}/{s.captions('empty')}", str(s.samples)))
        rows.append(("total", str(sum(len(s.files) for s in self.subsets)), str(sum(s.usable for s in self.subsets)),
                     "", "", str(sum(s.samples for s in self.subsets))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        batch = self.batch_size or "per dataset (" + ", ".join(str(d.batch_size) for d in self.datasets) + ")"
        if self.steps_per_epoch is None:
            lines.append(f"steps: unknown ({self.steps_note})")
        else:
            accum = f", gradient accumulation {self.gradient_accumulation_steps}" \
                if self.gradient_accumulation_steps > 1 else ""
            lines.append(f"batch size {batch}{accum}: {self.steps_per_epoch} steps per epoch x {self.epochs} epochs "
                         f"= {self.total_steps} steps {self.steps_note}")
        if self.buckets:
            lines.append("buckets: " + ", ".join(f"{w}x{h}: {n} ({r} with repeats)" for (w, h), n, r in self.buckets))
        return "\n".join(lines)

    def problem_lines(self) -> list[str]:
        order = {ERROR: 0, FIXABLE: 1, WARNING: 2}
        return [f"{p.severity.upper():8} {p}" for p in sorted(self.problems, key=lambda p: order[p.severity])]

    def __str__(self) -> str:
        counts = {s: len(self.by_severity(s)) for s in (ERROR, FIXABLE, WARNING)}
        head = f"problems: {counts[ERROR]} errors, {counts[FIXABLE]} fixable, {counts[WARNING]} warnings"
        tail = []
        if counts[ERROR] or counts[FIXABLE]:
            tail.append("Your files were not changed. Write fixed copies with --fix_to DIR (nbkit.data.fix.fix_dataset)"
                        "; move unusable files out of a project copy with --quarantine DIR.")
        return "\n".join([self.table(), head, *self.problem_lines(), *tail])


def _short(path: Path, project: Project | None) -> str:
    if project is not None and Path(path).is_relative_to(project.path):
        return Path(path).relative_to(project.path).as_posix()
    return str(path)


def trainer_items(datasets: list[DatasetSpec], seed: int = 0) -> list:
    """The training items exactly as the trainer collects them (warnings about skipped files hidden)."""
    from nbkit.data.train_data import collect_items

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = collect_items(datasets, seed)
    return result[0] if isinstance(result, tuple) else result


def output_plan(sub: SubsetReport) -> list[tuple[FileReport, str, str]]:
    """(file, stem, suffix) of every file a clean copy of ``sub`` holds: the usable images, plus the
    readable .gif/.tif/... converted to PNG; a stem already taken gets the old extension appended
    (``a.png`` + ``a.jpg`` -> ``a.png`` + ``a-jpg.jpg``), so each image has its own caption."""
    used: set[str] = set()
    out = []
    for f in [*sub.files, *sub.others]:
        if not f.usable:
            continue
        path = f.image.path
        suffix = (".jpg" if f.image.format == "JPEG" else ".png") if f.image.needs_conversion else path.suffix
        stem, n = path.stem, 2
        if stem.lower() in used:
            stem = base = f"{path.stem}-{path.suffix.lstrip('.').lower()}"
            while stem.lower() in used:
                stem, n = f"{base}-{n}", n + 1
        used.add(stem.lower())
        out.append((f, stem, suffix))
    return out


def _clean_view(report: DatasetReport, folder: Path) -> list[DatasetSpec]:
    """Datasets over ``folder`` laid out like the --fix_to copy, with links instead of image copies."""
    out, index = [], 0
    by_dir = {id(s.subset): s for s in report.subsets}
    for ds in report.datasets:
        subsets = []
        for sub in ds.subsets:
            sub_report, index = by_dir[id(sub)], index + 1
            view = folder / str(index)
            view.mkdir()
            for f, stem, suffix in output_plan(sub_report):
                os.symlink(f.image.path.resolve(), view / f"{stem}{suffix}")
                if f.caption.text is not None:
                    (view / f"{stem}{sub.caption_extension}").write_text(f.caption.text, encoding="utf-8")
            if any(view.iterdir()):
                subsets.append(dataclasses.replace(sub, image_dir=view))
        if subsets:
            out.append(dataclasses.replace(ds, subsets=subsets))
    return out


def count_steps(report: DatasetReport, seed: int = 0) -> None:
    """Fill the step counts with the trainer's own functions.

    With no unusable file the trainer's items are counted directly. Otherwise the count is for the
    data without the unusable files (what the --fix_to copy trains on), through a temporary view.
    """
    from nbkit.data.buckets import bucket_report
    from nbkit.data.train_data import steps_per_epoch

    unusable = sum(len(s.files) - s.usable for s in report.subsets)
    converted = any(p.kind in ("encoding", "bom", "unsupported-format") for p in report.problems)
    try:
        if not unusable and not converted:
            items = trainer_items(report.datasets, seed)
            report.steps_note = "(counted as the trainer counts them)"
        else:
            with tempfile.TemporaryDirectory(prefix="nbkit-check-") as tmp:
                datasets = _clean_view(report, Path(tmp))
                if not datasets:
                    raise DatasetError("no usable images at all")
                items = trainer_items(datasets, seed)
            report.steps_note = f"(as in the --fix_to copy: {unusable} unusable files left out, .gif/.tif converted)"
    except (ValueError, OSError) as err:  # DatasetError / ConfigError: what the trainer would stop with
        report.steps_note = f"training cannot start: {err}"
        return
    report.steps_per_epoch = steps_per_epoch(items, report.batch_size, report.gradient_accumulation_steps)
    report.total_steps = report.steps_per_epoch * report.epochs
    report.buckets = bucket_report([it.bucket.reso for it in items], [it.repeats for it in items])


def _project_problems(project: Project, datasets: list[DatasetSpec]) -> list[Problem]:
    """Folders of the project's dataset copy that are empty, or hold images the config does not train."""
    from nbkit.data.importer import discover_subsets

    configured = {Path(s.image_dir).resolve() for ds in datasets for s in ds.subsets}
    found, empty = discover_subsets(project.dataset_dir)
    out = [Problem(folder, WARNING, "empty-folder", "is an empty folder; nothing in it is trained",
                   "add images to it, or remove it") for folder in empty]
    if not any(d.is_relative_to(project.dataset_dir.resolve()) for d in configured):
        return out  # the config trains a fixed copy elsewhere (fix_dataset): the imported copy is not expected
    for sub in found:
        if Path(sub.image_dir).resolve() not in configured:
            out.append(Problem(sub.image_dir, WARNING, "not-in-config", "holds images the dataset config does not "
                               "train", f"add a subset for it to {project.dataset_toml}, or import again to rewrite "
                               "the config"))
    return out


def load_datasets(source: Project | str | Path | list[DatasetSpec], resolution: int | None = None,
                  batch_size: int | None = None) -> tuple[list[DatasetSpec], Project | None, Path | None]:
    """(datasets, project, dataset TOML) from a project, a dataset TOML, a folder of images, or resolved specs."""
    from nbkit.data.importer import detect_caption_extension, parse_kohya_folder_name

    defaults = {"resolution": resolution or 512, "batch_size": batch_size or 1}
    if isinstance(source, list):
        return source, None, None
    if isinstance(source, Project):
        if not source.dataset_toml.is_file():
            raise DatasetError(f"{source.dataset_toml}: no dataset config yet: run `nbkit dataset import` first")
        return load_dataset_config(source.dataset_toml, defaults), source, source.dataset_toml
    path = Path(source).expanduser()
    if path.is_dir():
        layout = _train_data_dir(path)
        if layout is not None:  # kohya's train_data_dir: one subset per 'N_name' subfolder
            subsets = [SubsetSpec(image_dir=folder, class_tokens=tokens, num_repeats=repeats,
                                  caption_extension=detect_caption_extension(folder))
                       for folder, repeats, tokens in layout[0]]
        else:
            kohya = parse_kohya_folder_name(path.name)
            subsets = [SubsetSpec(image_dir=path, class_tokens=kohya.class_tokens, num_repeats=kohya.repeats,
                                  caption_extension=detect_caption_extension(path))]
        return [DatasetSpec(resolution=(defaults["resolution"],) * 2, batch_size=defaults["batch_size"],
                            subsets=subsets)], None, None
    return load_dataset_config(path, defaults), None, path


def _train_data_dir(path: Path):
    """``kohya_subdirs(path)`` when ``path`` is laid out as kohya's train_data_dir (no images of its own,
    at least one ``N_name`` subfolder), else None."""
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return None
    found, ignored = kohya_subdirs(path)
    return (found, ignored) if found else None


def _ignored_folders(source) -> list[Problem]:
    """The subfolders kohya would skip in a train_data_dir given to the check."""
    path = Path(source).expanduser() if isinstance(source, (str, Path)) else None
    layout = _train_data_dir(path) if path is not None and path.is_dir() else None
    return [Problem(folder, WARNING, "ignored-folder", f"is not trained: it {why}",
                    "rename it to '<repeats>_<class tokens>' (e.g. '10_sks dog') to train it, or move it out")
            for folder, why in (layout[1] if layout else [])]


def check_dataset(
    source: Project | str | Path | list[DatasetSpec],
    *,
    batch_size: int | None = None,
    epochs: int = 1,
    gradient_accumulation_steps: int = 1,
    resolution: int | None = None,
    max_side: int = MAX_SIDE,
    seed: int = 0,
    progress: bool = True,
    max_token_length: int | None = None,
) -> DatasetReport:
    """Check a project (its ``dataset.toml``), a dataset TOML, a folder (of images, or kohya's
    train_data_dir with ``N_name`` subfolders), or resolved specs.

    ``batch_size`` None uses each dataset's own batch size, as the trainer does; ``resolution``
    is the default for datasets that do not set one; captions longer than ``max_token_length``
    (the run's option: 75, 150 or 225; None is 75) are reported. Only reads files.
    """
    from tqdm.auto import tqdm

    datasets, project, config_path = load_datasets(source, resolution)
    total = sum(1 for ds in datasets for s in ds.subsets if s.image_dir.is_dir()
                for p in s.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    report = DatasetReport(datasets, [], batch_size, epochs, gradient_accumulation_steps, project=project,
                           config_path=config_path)
    with tqdm(total=total, desc="checking images", unit="img", disable=not progress) as bar:
        for ds in datasets:
            for sub in ds.subsets:
                report.subsets.append(check_subset(sub, ds.resolution, max_side, bar, max_token_length))
    if project is not None:
        report.extra_problems = _project_problems(project, datasets)
    report.extra_problems += _ignored_folders(source)
    count_steps(report, seed)
    return report
