"""Keeping a project on Google Drive: verified copies, Drive's sync lag, size summary and cleanup.

Drive's FUSE mount is not a local disk: a file written a moment ago (or from another runtime) may
not be visible yet, a folder can look empty for a minute after mounting, and a runtime can die in
the middle of a copy. So:

- every copy goes to a hidden temporary name next to the target, is checked (size and sha256,
  read back from the disk) and only then renamed to its final name: an interrupted copy never
  leaves a truncated file under the final name;
- readers wait for a file to become visible (with a growing poll interval) instead of failing;
- cleanup only ever removes intermediate saves (``<name>-000003.safetensors``,
  ``<name>-step00000200-state``, ...) and stale temporary files, never final files, and only lists
  what it would remove unless asked to apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nbkit.io import atomic_path, human_size, temp_owner_alive

CHUNK = 8 << 20
_TEMP = re.compile(r"^\..+\.tmp$")  # nbkit.io.atomic_path / atomic_dir temporary names


class DriveLagError(TimeoutError):
    """A file or folder did not show up in time; the message names it and what to do."""


class CopyVerifyError(OSError):
    """A copy did not read back identical to its source."""


def file_sha256(path: str | Path, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _polls(timeout: float, interval: float, sleep: Callable[[float], None], clock: Callable[[], float]):
    """Yield until ``timeout`` seconds have passed, sleeping a growing interval in between."""
    deadline = clock() + timeout
    while True:
        yield
        if clock() >= deadline:
            return
        sleep(min(interval, max(0.0, deadline - clock())))
        interval = min(interval * 1.5, 10.0)


def wait_visible(path: str | Path, *, size: int | None = None, timeout: float = 120.0, interval: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Path:
    """Wait until ``path`` exists (and has ``size`` bytes when given): Drive shows new files late."""
    path = Path(path)
    for _ in _polls(timeout, interval, sleep, clock):
        try:
            if path.exists() and (size is None or path.is_dir() or path.stat().st_size == size):
                return path
        except OSError:  # a mount that is reconnecting
            pass
    what = f"{path} ({size} bytes)" if size is not None else str(path)
    raise DriveLagError(f"{what} is not visible after {timeout:.0f} s. If it is on Google Drive, Drive may still be "
                        "syncing: wait a minute or two and run the cell again (remount if it stays missing).")


def wait_settled(path: str | Path, *, timeout: float = 120.0, interval: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Path:
    """Wait until a visible file stops growing (Drive may show a file while its bytes still arrive), so it
    is not hashed or loaded half-synced. A file whose size is the same on two polls is taken as complete."""
    path = Path(path)
    last = -1
    for _ in _polls(timeout, interval, sleep, clock):
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        if size >= 0 and size == last:
            return path
        last = size
    raise DriveLagError(f"{path} is still changing after {timeout:.0f} s: Drive may still be syncing it; wait and "
                        "run the cell again.")


def wait_for_files(folder: str | Path, pattern: str = "*", *, timeout: float = 120.0, interval: float = 0.5,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> list[Path]:
    """Wait until ``folder`` holds something matching ``pattern`` (a fresh Drive mount can show an empty
    folder for a while); return the matches, sorted."""
    folder = Path(folder)
    for _ in _polls(timeout, interval, sleep, clock):
        try:
            found = sorted(p for p in folder.glob(pattern) if not _TEMP.match(p.name))
        except OSError:
            found = []
        if found:
            return found
    raise DriveLagError(f"{folder} has no {pattern!r} after {timeout:.0f} s. If it is on Google Drive, the folder may "
                        "still be syncing (Drive shows 'folder is empty' for a while after mounting): wait a minute "
                        "or two and run the cell again.")


@dataclass(frozen=True)
class CopyResult:
    source: Path
    target: Path
    size: int
    sha256: str
    copied: bool  # False: the target already held the same bytes


def _remove_stale_temps(target: Path) -> None:
    """Temporary files an earlier, killed copy to ``target`` left behind (not those of a running copy)."""
    if target.parent.is_dir():
        for old in target.parent.glob(f".{target.name}.*.tmp"):
            if old.is_file() and not temp_owner_alive(old.name):
                old.unlink(missing_ok=True)


def copy_verified(source: str | Path, target: str | Path, *, progress: bool = False, timeout: float = 120.0,
                  on_chunk: Callable[[int], None] | None = None, chunk: int = CHUNK) -> CopyResult:
    """Copy a file through a temporary name, check size and sha256 read back from disk, then rename.

    An identical target is left alone. The source is only read. A disk without room for the copy is
    refused before copying; one that fills up during it raises ``nbkit.io.OutOfSpaceError`` (the
    previous target is kept, the partial copy removed). ``on_chunk(bytes)`` is called as
    data is written (a progress hook; an exception from it aborts the copy cleanly)."""
    from tqdm.auto import tqdm

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file to copy: check the path")
    size = source.stat().st_size
    if target.exists() and target.resolve() == source.resolve():
        return CopyResult(source, target, size, file_sha256(source), False)
    if target.is_file() and target.stat().st_size == size:
        digest = file_sha256(source)
        if file_sha256(target) == digest:
            return CopyResult(source, target, size, digest, False)
    _remove_stale_temps(target)
    digest = hashlib.sha256()
    with atomic_path(target, size_hint=size) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst, tqdm(
        total=size, unit="B", unit_scale=True, desc=target.name, disable=not progress
    ) as bar:
        while block := src.read(chunk):
            digest.update(block)
            dst.write(block)
            bar.update(len(block))
            if on_chunk:
                on_chunk(len(block))
        dst.flush()
        os.fsync(dst.fileno())
        dst.close()
        if tmp.stat().st_size != size or file_sha256(tmp) != digest.hexdigest():
            raise CopyVerifyError(f"copying {source} to {target}: the copy does not read back identical "
                                  "(disk full or Drive disconnected?): run it again")
    wait_visible(target, size=size, timeout=timeout)
    return CopyResult(source, target, size, digest.hexdigest(), True)


def copy_tree_verified(source: str | Path, target: str | Path, *, progress: bool = False,
                       timeout: float = 120.0) -> list[CopyResult]:
    """:func:`copy_verified` for every file of a folder (e.g. a diffusers model), keeping the layout."""
    source, target = Path(source), Path(target)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not _TEMP.match(p.name))
    return [copy_verified(p, target / p.relative_to(source), progress=progress, timeout=timeout) for p in files]


def export_to_folder(sources: Iterable[str | Path], dest: str | Path, *, progress: bool = True,
                     timeout: float = 120.0) -> list[CopyResult]:
    """Copy files and folders into ``dest`` (a folder on Drive, usually the project's ``output``)."""
    dest = Path(dest).expanduser()
    results: list[CopyResult] = []
    for item in map(Path, sources):
        item = item.expanduser()
        if not item.exists():
            raise FileNotFoundError(f"{item}: nothing to export there: check the path")
        if item.is_dir():
            if dest.resolve().is_relative_to(item.resolve()):
                raise ValueError(f"{dest} is inside {item}: choose a destination outside the folder you copy")
            results += copy_tree_verified(item, dest / item.name, progress=progress, timeout=timeout)
        else:
            results.append(copy_verified(item, dest / item.name, progress=progress, timeout=timeout))
    return results


# ---------------------------------------------------------------- size summary


@dataclass(frozen=True)
class FolderUsage:
    path: Path
    files: int
    bytes: int


def folder_usage(path: str | Path) -> FolderUsage:
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return FolderUsage(path, len(files), sum(p.stat().st_size for p in files))


def project_usage(project) -> list[FolderUsage]:
    """Files and bytes per subfolder of a :class:`nbkit.project.Project` (and its top-level files)."""
    from nbkit.project import SUBFOLDERS

    rows = [folder_usage(project.path / sub) for sub in SUBFOLDERS]
    top = [p for p in project.path.iterdir() if p.is_file()] if project.path.is_dir() else []
    rows.append(FolderUsage(project.path, len(top), sum(p.stat().st_size for p in top)))
    return rows


def format_usage(rows: list[FolderUsage]) -> str:
    lines = [f"{human_size(r.bytes):>10}  {r.files:6d} files  {r.path}" for r in rows]
    total = FolderUsage(Path("total"), sum(r.files for r in rows), sum(r.bytes for r in rows))
    return "\n".join([*lines, f"{human_size(total.bytes):>10}  {total.files:6d} files  total"])


# ---------------------------------------------------------------- cleanup of intermediate saves

_INTERMEDIATE = (
    ("state", re.compile(r"^(?P<name>.+)-step(?P<n>\d{8})-state$")),  # nbkit.train.state folders
    ("step", re.compile(r"^(?P<name>.+)-step(?P<n>\d{8})(?:\.(?:safetensors|ckpt))?$")),  # save_every_n_steps
    ("epoch", re.compile(r"^(?P<name>.+)-(?P<n>\d{6})(?:\.(?:safetensors|ckpt))?$")),  # save_every_n_epochs
    ("hypernetwork step", re.compile(r"^(?P<name>.+)-(?P<n>\d{1,7})\.pt$")),  # A1111 <name>-<step>.pt
)


@dataclass(frozen=True)
class CleanupItem:
    path: Path
    group: str  # "<kind> <output name>"
    number: int  # epoch or step
    bytes: int


def _classify(path: Path) -> tuple[str, int] | None:
    if _TEMP.match(path.name):
        return None
    if path.is_dir() and not ((path / "train_state.json").is_file() or (path / "model_index.json").is_file()):
        return None  # only state folders and diffusers saves are intermediate folders
    for kind, pattern in _INTERMEDIATE:
        match = pattern.match(path.name)
        if match:
            return f"{kind} {match['name']}", int(match["n"])
    return None


def cleanup_plan(folders: Iterable[str | Path], keep: int = 1, stale_after: float = 3600.0) -> list[CleanupItem]:
    """What :func:`apply_cleanup` would remove: all but the newest ``keep`` intermediate saves of each
    kind and output name, plus temporary files older than ``stale_after`` seconds (killed writes)."""
    if keep < 0:
        raise ValueError(f"keep = {keep}: keep at least 0 intermediate saves")
    groups: dict[str, list[tuple[int, Path]]] = {}
    stale: list[CleanupItem] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if _TEMP.match(path.name) and time.time() - path.stat().st_mtime > stale_after:
                stale.append(CleanupItem(path, "temporary", 0, _size(path)))
            elif found := _classify(path):
                groups.setdefault(found[0], []).append((found[1], path))
    items = []
    for group, saves in sorted(groups.items()):
        saves.sort()
        items += [CleanupItem(p, group, n, _size(p)) for n, p in saves[: max(0, len(saves) - keep)]]
        items += [CleanupItem(sidecar, group, n, _size(sidecar)) for n, p in saves[: max(0, len(saves) - keep)]
                  if (sidecar := p.with_name(p.name + ".optim")).is_file()]  # hypernetwork optimizer sidecars
    return items + stale


def _size(path: Path) -> int:
    return folder_usage(path).bytes if path.is_dir() else path.stat().st_size


def apply_cleanup(items: Iterable[CleanupItem]) -> int:
    """Remove the planned items; return the bytes freed."""
    freed = 0
    for item in items:
        if item.path.is_dir():
            shutil.rmtree(item.path)
        else:
            item.path.unlink(missing_ok=True)
        freed += item.bytes
    return freed


def format_cleanup(items: list[CleanupItem], applied: bool) -> str:
    if not items:
        return "nothing to clean up"
    verb = "removed" if applied else "would remove"
    lines = [f"{verb} {human_size(i.bytes):>10}  {i.path}" for i in items]
    tail = "" if applied else "  (dry run: add --apply to remove them)"
    return "\n".join([*lines, f"{verb} {human_size(sum(i.bytes for i in items))} in total{tail}"])


def use_project(config, project):
    """``config`` with its outputs in the project: files in ``output/``, resumable states in ``state/``
    (on Drive they survive a runtime reset), logs in ``logs/``."""
    changes = {"output_dir": str(project.output_dir), "logging_dir": str(project.logs_dir)}
    if any(f.name == "output_state_dir" for f in dataclasses.fields(config)):
        changes["output_state_dir"] = str(project.state_dir)
    return dataclasses.replace(config, **changes)
