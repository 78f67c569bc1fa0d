"""Caption backups: each caption file is copied before its first change, so any edit can be undone.

One run of an edit, a tagger or a widget session is one backup folder,
``<root>/.nbkit_caption_backup/<timestamp>-<label>/`` (or ``<backup_dir>/<timestamp>-<label>/``),
holding ``files/<path relative to root>`` copies and ``log.jsonl``: a header line, then one line
per caption file saying whether it existed before. The copy is written before its log line and
the log line before the caption changes, so a Colab disconnect mid-run still leaves an undoable
backup. Undo copies the bytes back and deletes the files the run created, newest backup first.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nbkit.io import atomic_write_bytes

BACKUP_DIRNAME = ".nbkit_caption_backup"
LOG_NAME = "log.jsonl"


def backup_home(root: str | Path, backup_dir: str | Path | None = None) -> Path:
    """The folder holding the backups of ``root``: ``backup_dir`` if given, else one next to the data."""
    return Path(backup_dir) if backup_dir is not None else Path(root) / BACKUP_DIRNAME


class BackupSession:
    """Records caption files before they change. The backup folder is made on the first record."""

    def __init__(self, root: str | Path, label: str = "edit", backup_dir: str | Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.label = label
        self.home = backup_home(root, backup_dir)
        self.path: Path | None = None
        self._seen: set[str] = set()

    def _start(self) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = self.home / f"{stamp}-{self.label}"
        path.mkdir(parents=True, exist_ok=False)
        header = {"nbkit_caption_backup": 1, "root": str(self.root), "label": self.label, "created": stamp}
        (path / LOG_NAME).write_text(json.dumps(header) + "\n", encoding="utf-8")
        return path

    def record(self, caption: str | Path) -> None:
        """Save ``caption`` (or note that it does not exist yet) unless this run already did."""
        caption = Path(caption)
        try:
            key = caption.resolve().relative_to(self.root).as_posix()
        except ValueError:
            raise ValueError(f"{caption}: not inside {self.root}, so it cannot be backed up there") from None
        if key in self._seen:
            return
        if self.path is None:
            self.path = self._start()
        existed = caption.is_file()
        if existed:
            atomic_write_bytes(self.path / "files" / key, caption.read_bytes())
        with open(self.path / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(json.dumps({"path": key, "existed": existed}) + "\n")
            log.flush()
        self._seen.add(key)


@dataclass
class BackupInfo:
    path: Path
    root: str
    label: str
    created: str
    entries: list[dict] = field(default_factory=list)


def read_backup(path: str | Path) -> BackupInfo:
    path = Path(path)
    lines = (path / LOG_NAME).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    entries = [json.loads(line) for line in lines[1:] if line.strip()]
    return BackupInfo(path, header["root"], header["label"], header["created"], entries)


def list_backups(root: str | Path, backup_dir: str | Path | None = None) -> list[BackupInfo]:
    """The backups of ``root``, oldest first. A shared ``backup_dir`` is filtered by the recorded root."""
    home = backup_home(root, backup_dir)
    if not home.is_dir():
        return []
    found = [read_backup(p) for p in sorted(home.iterdir()) if (p / LOG_NAME).is_file()]
    if backup_dir is not None:
        resolved = str(Path(root).resolve())
        found = [b for b in found if b.root == resolved]
    return found


@dataclass
class UndoResult:
    backups: list[Path] = field(default_factory=list)
    restored: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def _undo_one(root: Path, backup: BackupInfo, result: UndoResult) -> None:
    for entry in backup.entries:
        target = root / entry["path"]
        if entry["existed"]:
            atomic_write_bytes(target, (backup.path / "files" / entry["path"]).read_bytes())
            result.restored.append(target)
        elif target.exists():
            target.unlink()
            result.removed.append(target)
    shutil.rmtree(backup.path)
    result.backups.append(backup.path)


def undo(root: str | Path, backup_dir: str | Path | None = None, everything: bool = False) -> UndoResult:
    """Undo the newest edit of ``root`` (all of them with ``everything=True``), byte for byte.

    The used backup folders are deleted, so calling it again undoes the edit before.
    """
    backups = list_backups(root, backup_dir)
    if not backups:
        raise FileNotFoundError(f"{root}: no caption backups in {backup_home(root, backup_dir)}: nothing to undo")
    result = UndoResult()
    for backup in reversed(backups if everything else backups[-1:]):
        _undo_one(Path(root), backup, result)
    home = backup_home(root, backup_dir)
    if home.is_dir() and not any(home.iterdir()):
        home.rmdir()
    return result
