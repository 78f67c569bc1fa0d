"""Atomic file writing: a Colab disconnect must never leave a half-written model behind.

Everything nbkit writes goes to a temporary name in the same folder first and is renamed
into place only when complete (``os.replace`` is atomic on one filesystem).

- Temporary names are ``.<name>.<host>-<pid>.<random>.tmp`` (a file or a folder), so the next run
  can tell a killed write (its process is gone) from one in progress; a folder being replaced is
  parked as ``.<name>.<host>-<pid>.<random>.old`` for the moment of the swap.
- The first write into a folder removes such leftovers of killed writes (:func:`clean_stale_temps`)
  and says what it freed. Nothing that does not have exactly these names is ever touched.
- A full disk (``ENOSPC``/``EDQUOT``, however the writing library reports it) becomes an
  :class:`OutOfSpaceError` naming the folder, the space needed and the fix; the previous file at
  the target name is kept and no temporary file is left. Writers that know their size ask first
  (``size_hint``) and are refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.errors import ConfigError

#: a temporary file or folder whose writer cannot be checked is stale when unchanged this long (seconds)
STALE_AFTER = 600.0
_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# How libraries that do not raise OSError report it: safetensors' Rust writer ("... (os error 28)"),
# torch's C++ writer ("write(): fd 3 failed with No space left on device").
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.)?[a-z0-9_]{8}\.(?P<kind>tmp|old)$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old$")  # older nbkit's swap folder name: only reported
_CLEANED: set[str] = set()  # folders already cleaned by this process


class OutOfSpaceError(ConfigError):
    """The disk (or quota) filled up: the message names the folder, the space needed and the fix."""


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (binary units, as file managers and ``df -h`` show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ---------------------------------------------------------------- running out of space


def is_out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` (or an exception it was raised from) means the disk or quota is full."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
            return True
        if any(text in str(err).lower() for text in _NO_SPACE_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_space(folder: str | Path) -> int | None:
    """Free bytes on the filesystem of ``folder``; None where it cannot be told (some FUSE mounts)."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return None
    return usage.free if usage.total else None


def _fix(folder: Path) -> str:
    return (f"Free space in {folder} (delete files you no longer need, e.g. old intermediate saves) or write to "
            "another folder: output_dir / output_state_dir for training, --out for merges and conversions, "
            "--dest for Drive copies.")


def _kept(target: Path) -> str:
    return f" The previous {target.name} is kept." if target.exists() else ""


def check_free_space(target: str | Path, needed: int) -> None:
    """Refuse, before writing, a ``needed``-byte write of ``target`` that its disk has no room for."""
    target = Path(target)
    free = free_space(target.parent)
    if free is not None and free < needed:
        raise OutOfSpaceError(
            f"{target.parent}: not enough free space to write {target.name}: it needs about {human_size(needed)} "
            f"({needed:,} bytes), the disk has {free:,} bytes free ({human_size(free)}). {_fix(target.parent)}"
            f"{_kept(target)}"
        )


def out_of_space(target: Path, needed: int | None, written: int) -> OutOfSpaceError:
    """The error for a write of ``target`` that filled the disk after ``written`` bytes."""
    if needed:
        size = f"it needs about {human_size(needed)} ({needed:,} bytes)"
    elif written:
        size = f"it needs more than the {human_size(written)} ({written:,} bytes) it had written"
    else:
        size = "there was no room left even to create it"
    free = free_space(target.parent)
    now = "" if free is None else f", {free:,} bytes ({human_size(free)}) are free now"
    return OutOfSpaceError(
        f"{target.parent}: the disk filled up while writing {target.name}: {size}{now}. {_fix(target.parent)}"
        f"{_kept(target)} Nothing partial was left behind."
    )


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (0 for what cannot be read)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())
    except OSError:
        return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _space_errors(target: Path, needed: int | None, tmp: Callable[[], Path | None]) -> Iterator[None]:
    """Turn a full-disk error into :class:`OutOfSpaceError` after removing the partial ``tmp()``."""
    try:
        yield
    except OutOfSpaceError:
        raise
    except Exception as err:
        if not is_out_of_space(err):
            raise
        partial = tmp()
        written = _size(partial) if partial is not None and partial.exists() else 0
        if partial is not None:
            _remove(partial)
        raise out_of_space(target, needed, written) from err


# ---------------------------------------------------------------- atomic writes


def temp_prefix(name: str, pid: int | None = None) -> str:
    """The start of a temporary name for ``name`` written by process ``pid`` (default: this one)."""
    return f".{name}.{_HOST}-{os.getpid() if pid is None else pid}."


def _prepare(target: Path, size_hint: int | None) -> None:
    with _space_errors(target, size_hint, lambda: None):
        target.parent.mkdir(parents=True, exist_ok=True)
    clean_once(target.parent)
    if size_hint:
        check_free_space(target, size_hint)


@contextlib.contextmanager
def atomic_path(target: str | Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    ``size_hint``: the bytes about to be written, checked against the free space first."""
    target = Path(target)
    _prepare(target, size_hint)
    tmp_path: Path | None = None
    try:
        with _space_errors(target, size_hint, lambda: tmp_path):
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            yield tmp_path
            if tmp_path.exists():  # mkstemp creates 0600; give the file the mode a plain open() would
                umask = os.umask(0)
                os.umask(umask)
                tmp_path.chmod(0o666 & ~umask)
            os.replace(tmp_path, target)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; it replaces ``target`` when complete."""
    target = Path(target)
    _prepare(target, size_hint)
    tmp: Path | None = None
    try:
        with _space_errors(target, size_hint, lambda: tmp):
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
            yield tmp
            if target.exists():
                old = tmp.with_suffix(".old")  # a killed swap leaves it for clean_stale_temps to restore
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def safetensors_size(tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """About the size of the ``.safetensors`` file of ``tensors`` (data + header)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    names = sum(len(k) + 80 for k in tensors)  # dtype, shape and offsets of each entry
    meta = sum(len(k) + len(v) + 6 for k, v in (metadata or {}).items())
    return 8 + data + names + meta


def save_safetensors_atomic(tensors: dict, target: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temp file and a rename (free space checked first)."""
    from safetensors.torch import save_file

    with atomic_path(target, size_hint=safetensors_size(tensors, metadata)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(target)


# ---------------------------------------------------------------- leftovers of killed writes


@dataclass
class StaleTemps:
    """What :func:`clean_stale_temps` did in one folder."""

    removed: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)  # folders put back from an interrupted swap
    kept: list[Path] = field(default_factory=list)  # recent, writer unknown: maybe a write in progress
    unsure: list[Path] = field(default_factory=list)  # ".name.old" folders next to "name": maybe older nbkit's
    freed: int = 0


def temp_owner_alive(name: str) -> bool | None:
    """Whether the process that made temporary name ``name`` still runs (None: cannot tell, e.g. it was
    written on another machine, by an older nbkit, or ``name`` is not an nbkit temporary name)."""
    match = _TEMP_NAME.match(name)
    if match is None or match["pid"] is None or match["host"] != _HOST or os.name != "posix":
        return None
    pid = int(match["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def _last_change(path: Path) -> float:
    """The newest modification time of ``path`` and, for a folder, of anything in it (a write in
    progress keeps touching its file, or the folder it adds files to)."""
    times = []
    for p in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        with contextlib.suppress(OSError):
            times.append(p.lstat().st_mtime)
    return max(times, default=time.time())


def _stale(path: Path, match: re.Match, min_age: float) -> bool | None:
    """True: remove; False: leave alone silently; None: leave alone and mention it."""
    if match["kind"] == "old" and (match["pid"] is None or not path.is_dir()):
        return False  # only nbkit's own swap folders, never a user's ".name.old"
    alive = temp_owner_alive(path.name)
    if alive:
        return False
    if alive is None and time.time() - _last_change(path) < min_age:
        return None
    return True


def clean_stale_temps(folder: str | Path, *, min_age: float = STALE_AFTER,
                      say: Callable[[str], None] | None = print) -> StaleTemps:
    """Remove what killed nbkit writes left in ``folder``: temporary files and folders whose writer is
    gone (or, when that cannot be told, that have not changed for ``min_age`` seconds). A folder left
    mid-swap while its target is missing is renamed back (it is the previous complete version).
    Only nbkit's own temporary names are looked at; ``say`` reports what was done."""
    folder = Path(folder)
    result = StaleTemps()
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return result
    for path in entries:
        match = _TEMP_NAME.match(path.name)
        if match is None or path.is_symlink():
            legacy = _LEGACY_OLD.match(path.name)
            if legacy and path.is_dir() and not path.is_symlink() and (folder / legacy["name"]).exists():
                result.unsure.append(path)
            continue
        verdict = _stale(path, match, min_age)
        if verdict is None:
            result.kept.append(path)
        elif verdict:
            target = folder / match["name"]
            with contextlib.suppress(OSError):
                if match["kind"] == "old" and not target.exists():
                    os.replace(path, target)
                    result.restored.append(target)
                    continue
                size = _size(path)
                _remove(path)
                if not path.exists():
                    result.removed.append(path)
                    result.freed += size
    if say is not None:
        _report(folder, result, min_age, say)
    return result


def _report(folder: Path, result: StaleTemps, min_age: float, say: Callable[[str], None]) -> None:
    if result.removed:
        names = ", ".join(p.name for p in result.removed)
        say(f"nbkit: removed {len(result.removed)} temporary file(s) left by interrupted writes in {folder} "
            f"({human_size(result.freed)} freed): {names}")
    for target in result.restored:
        say(f"nbkit: restored {target}: replacing it had been interrupted; this is its previous complete version")
    for path in result.unsure:
        say(f"nbkit: {path} may be the previous version of {path.name[1:-4]} left by an interrupted write of an "
            "older nbkit; nbkit does not remove it: delete it yourself if you do not need it")
    for path in result.kept:
        say(f"nbkit: {path} is the temporary file of a write that is running elsewhere or was interrupted less "
            f"than {min_age / 60:.0f} minutes ago; left alone (the next run after that removes it if it is stale)")


def clean_once(folder: str | Path) -> StaleTemps | None:
    """:func:`clean_stale_temps` the first time this process writes into ``folder``."""
    key = os.path.abspath(folder)
    if key in _CLEANED:
        return None
    _CLEANED.add(key)
    return clean_stale_temps(folder, say=lambda line: print(line, flush=True))
