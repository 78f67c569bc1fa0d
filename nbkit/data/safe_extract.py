"""Unpacking zips and copying folders of user data so that nothing lands outside the target.

A zip can come from anywhere (a Drive upload, a forum link), so every entry is checked before a
single byte is written:

- path traversal: absolute names (``/etc/x``, ``C:\\x``) and ``..`` components are refused;
- symbolic-link entries (Unix mode stored in ``external_attr``) that point outside the archive
  are refused; links that stay inside are skipped (nbkit never creates links);
- zip bombs: the total unpacked size, the compression ratio (per entry and overall), the number
  of entries and the free disk space are checked against :class:`ExtractLimits`, and the sizes
  are counted again while writing (headers can lie);
- encrypted entries are refused.

Folder copies refuse symbolic links that resolve outside the source folder. Both only ever
*read* the user's files.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from nbkit.config import help_
from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError

#: Files worth copying into a project: trainable images, images check/fix can convert, captions.
OTHER_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".jfif", ".heic", ".heif", ".avif", ".jxl")
CAPTION_EXTENSIONS = (".txt", ".caption")
KEEP_SUFFIXES = IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS + CAPTION_EXTENSIONS
#: Operating-system clutter that is never copied.
JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"}
_CHUNK = 1 << 20
_GB = 1024**3


class UnsafeSourceError(DatasetError):
    """A zip or folder that would write outside its target, or a zip bomb. Nothing was written."""


@dataclass
class ExtractLimits:
    """Zip-bomb guards. The defaults let through any real image dataset that fits on a Colab disk."""

    max_unpacked_gb: float = field(
        default=20.0, metadata=help_("Refuse a zip that unpacks to more than this many GB (zip-bomb guard).")
    )
    max_ratio: float = field(
        default=200.0,
        metadata=help_(
            "Refuse zip entries compressed more than this (unpacked / packed size). Images rarely exceed 5.", "advanced"
        ),
    )
    ratio_min_mb: float = field(
        default=1.0,
        metadata=help_("Entries smaller than this many MB are not ratio-checked (a short caption compresses well).",
                       "advanced"),
    )
    max_files: int = field(default=200_000, metadata=help_("Refuse a zip with more entries than this.", "advanced"))

    @property
    def max_bytes(self) -> int:
        return int(self.max_unpacked_gb * _GB)


@dataclass
class CopyPlan:
    """What will be written: (source, path relative to the target) pairs, and what was left out."""

    files: list[tuple[str, PurePosixPath]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    total_bytes: int = 0
    empty_dirs: list[str] = field(default_factory=list)  # folders of the source with nothing in them


def is_wanted(rel: PurePosixPath) -> bool:
    """Images and captions, minus hidden files, macOS resource forks and OS clutter."""
    if any(part in JUNK_NAMES or part.startswith(".") for part in rel.parts):
        return False
    return rel.suffix.lower() in KEEP_SUFFIXES


def safe_relpath(name: str, source: str) -> PurePosixPath:
    """An archive member name as a relative path, or :class:`UnsafeSourceError`."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or "\x00" in raw:
        raise UnsafeSourceError(
            f"{source}: entry {name!r} has an absolute path and would be written outside the target folder; "
            "nothing was extracted. Re-create the zip from inside the dataset folder (relative paths only)."
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeSourceError(
            f"{source}: entry {name!r} climbs out of the target folder with '..' (path traversal); nothing was "
            "extracted. Do not use this zip; re-create it from the original images."
        )
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _link_escapes(rel: PurePosixPath, target: str) -> bool:
    target = target.replace("\\", "/")
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
        return True
    joined = posixpath.normpath(posixpath.join(str(rel.parent), target))
    return joined == ".." or joined.startswith("../")


def _check_bomb(info: zipfile.ZipInfo, limits: ExtractLimits, source: str) -> None:
    if info.file_size < limits.ratio_min_mb * 1024**2:
        return
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        raise UnsafeSourceError(
            f"{source}: entry {info.filename!r} unpacks from {info.compress_size} bytes to {info.file_size} "
            f"(ratio {ratio:.0f}, limit {limits.max_ratio:g}): this looks like a zip bomb; nothing was extracted. "
            "If you trust the file, raise the limit (--max_ratio)."
        )


def plan_zip(zf: zipfile.ZipFile, limits: ExtractLimits, source: str) -> tuple[CopyPlan, list[zipfile.ZipInfo]]:
    """Check every entry of ``zf``; return the plan and the entries to extract, or raise."""
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise UnsafeSourceError(
            f"{source}: {len(infos)} entries, more than the limit of {limits.max_files}; nothing was extracted. "
            "Split the dataset into several zips, or raise --max_files if you trust it."
        )
    plan, chosen = CopyPlan(), []
    for info in infos:
        rel = safe_relpath(info.filename, source)
        if _is_symlink(info):
            link = zf.read(info).decode("utf-8", "replace") if info.file_size < 4096 else "/"
            if _link_escapes(rel, link):
                raise UnsafeSourceError(
                    f"{source}: entry {info.filename!r} is a symbolic link pointing outside the archive; nothing was "
                    "extracted. Re-create the zip without links (plain `zip -r` stores the files themselves)."
                )
            plan.skipped.append(f"{info.filename} (a link; links are not extracted)")
            continue
        if info.is_dir() or str(rel) == ".":
            continue
        if info.flag_bits & 0x1:
            raise UnsafeSourceError(
                f"{source}: entry {info.filename!r} is encrypted; nbkit cannot unpack password-protected zips. "
                "Unzip it yourself and import the folder."
            )
        _check_bomb(info, limits, source)
        if not is_wanted(rel):
            plan.skipped.append(info.filename)
            continue
        plan.files.append((info.filename, rel))
        plan.total_bytes += info.file_size
        chosen.append(info)
    _check_totals(plan, sum(i.compress_size for i in chosen), limits, source)
    return plan, chosen


def _check_totals(plan: CopyPlan, packed: int, limits: ExtractLimits, source: str) -> None:
    if plan.total_bytes > limits.max_bytes:
        raise UnsafeSourceError(
            f"{source}: unpacks to {plan.total_bytes / _GB:.2f} GB, over the limit of {limits.max_unpacked_gb:g} GB "
            "(zip-bomb guard); nothing was extracted. If you trust it, raise --max_unpacked_gb."
        )
    ratio = plan.total_bytes / max(packed, 1)
    if plan.total_bytes >= limits.ratio_min_mb * 1024**2 and ratio > limits.max_ratio:
        raise UnsafeSourceError(
            f"{source}: the whole archive unpacks {ratio:.0f} times larger than it is packed (limit "
            f"{limits.max_ratio:g}): this looks like a zip bomb; nothing was extracted. If you trust it, raise --max_ratio."
        )


def ensure_free_space(target: Path, needed: int, source: str) -> None:
    """Refuse early rather than fill the Colab disk (or Drive) halfway through."""
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DatasetError(
            f"{source}: needs {needed / _GB:.2f} GB but only {free / _GB:.2f} GB is free at {probe}: "
            "free some space (delete old outputs) or import fewer files"
        )


def extract_zip(path: Path, target: Path, limits: ExtractLimits, progress: bool = True,
                strip_prefix: str | None = None) -> CopyPlan:
    """Extract the wanted entries of ``path`` into ``target`` after checking them all.

    ``strip_prefix``: a top folder to drop when every entry is inside it (``data.zip`` holding ``data/...``).
    """
    from tqdm.auto import tqdm

    source = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DatasetError(
            f"{path}: not a valid zip file (damaged, incomplete download, or a web page saved as .zip): "
            "download it again or re-create it"
        ) from None
    with zf:
        plan, infos = plan_zip(zf, limits, source)
        ensure_free_space(target, plan.total_bytes, source)
        if not (strip_prefix and plan.files and all(
            len(rel.parts) > 1 and rel.parts[0].lower() == strip_prefix.lower() for _, rel in plan.files
        )):
            strip_prefix = None
        written = 0
        for info, (_, rel) in tqdm(list(zip(infos, plan.files)), desc=f"unzip {path.name}", unit="file",
                                   disable=not progress):
            if strip_prefix:
                rel = PurePosixPath(*rel.parts[1:])
            written += _extract_one(zf, info, target, rel, limits, written, source)
    return plan


def _extract_one(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, rel: PurePosixPath,
                 limits: ExtractLimits, written: int, source: str) -> int:
    dest = target.joinpath(*rel.parts)
    if not dest.resolve().is_relative_to(target.resolve()):  # belt and braces after safe_relpath
        raise UnsafeSourceError(f"{source}: entry {info.filename!r} would be written outside {target}; refused")
    dest.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with zf.open(info) as src, open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            count += len(chunk)
            if count > info.file_size or written + count > limits.max_bytes:
                raise UnsafeSourceError(
                    f"{source}: entry {info.filename!r} unpacks to more than its header says (zip bomb); stopped. "
                    "Do not use this zip."
                )
            out.write(chunk)
    return count


def plan_folder(src: Path, allowed_root: Path | None = None) -> CopyPlan:
    """List the wanted files under ``src``; refuse links that resolve outside ``allowed_root`` (default ``src``)."""
    src = Path(src)
    root = (allowed_root or src).resolve()
    plan = CopyPlan()
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in JUNK_NAMES and not d.startswith("."))
        if not dirnames and not filenames:
            plan.empty_dirs.append(here.relative_to(src).as_posix())
        for name in [*dirnames, *sorted(filenames)]:
            path = here / name
            rel = PurePosixPath(path.relative_to(src).as_posix())
            if path.is_symlink():
                real = path.resolve()
                if not real.is_relative_to(root):
                    raise UnsafeSourceError(
                        f"{path}: a symbolic link to {real}, outside {src}; nothing was copied. Copy the real file "
                        "into the folder, or remove the link."
                    )
                if real.is_dir() or not real.exists():
                    plan.skipped.append(f"{rel} (a link to a folder, or a broken link)")
                    continue
            if path.is_dir():
                continue
            if not is_wanted(rel):
                plan.skipped.append(str(rel))
                continue
            plan.files.append((str(path), rel))
            plan.total_bytes += path.stat().st_size
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
    return plan


def copy_planned(plan: CopyPlan, target: Path, progress: bool = True, desc: str = "copy") -> None:
    """Copy the planned files (the sources are only read)."""
    from tqdm.auto import tqdm

    ensure_free_space(target, plan.total_bytes, desc)
    for source, rel in tqdm(plan.files, desc=desc, unit="file", disable=not progress):
        dest = target.joinpath(*rel.parts)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)  # content only: Drive mounts may refuse timestamps
