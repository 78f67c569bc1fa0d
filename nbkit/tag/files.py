"""Caption files on disk: finding images, reading captions safely, writing them atomically.

A caption file sits next to its image with the same stem (kohya's layout): ``a.png`` ->
``a.txt``. Each non-blank line is one caption (kohya picks a line at random when there are
several), parsed into a tag list; rendering keeps the line ending, the final newline and a BOM.
Images are only ever read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError
from nbkit.io import atomic_write_text
from nbkit.tag.backup import BackupSession
from nbkit.tag.tags import SEPARATOR, join_tags, merge_tags, split_tags

T = TypeVar("T")


class CaptionError(DatasetError):
    """A caption file cannot be used; the message names the file and the fix."""


def normalize_extension(extension: str) -> str:
    """``"txt"`` -> ``".txt"``; kohya's caption extensions include the dot."""
    extension = extension.strip()
    if not extension or extension == ".":
        raise CaptionError("caption extension is empty: use e.g. .txt or .caption")
    return extension if extension.startswith(".") else "." + extension


def caption_path(image: str | Path, extension: str = ".txt") -> Path:
    """The caption file of an image: same folder, same stem, the caption extension."""
    return Path(image).with_suffix(normalize_extension(extension))


def _walk(base: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # backups, .ipynb_checkpoints
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def find_images(
    root: str | Path, recursive: bool = False, subfolders: Sequence[str] | None = None
) -> list[Path]:
    """Images under ``root`` (sorted), optionally only in some subfolders (e.g. ``10_sks``)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder: pass the folder that holds your images")
    bases = [root / s for s in subfolders] if subfolders else [root]
    for base in bases:
        if not base.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DatasetError(f"{base}: no such subfolder; {root} has: {', '.join(present) or 'no subfolders'}")
    return sorted({p for base in bases for p in _walk(base, recursive)})


def caption_files(
    root: str | Path, extension: str = ".txt", recursive: bool = True, subfolders: Sequence[str] | None = None
) -> list[Path]:
    """The existing caption files of the images in scope (each once)."""
    paths = (caption_path(p, extension) for p in find_images(root, recursive, subfolders))
    return sorted({p for p in paths if p.is_file()})


@dataclass
class CaptionText:
    """A caption file's content: one tag list per line (``None`` for a blank line) plus its format."""

    lines: list[list[str] | None] = field(default_factory=lambda: [[]])
    newline: str = "\n"
    final_newline: bool = True
    bom: bool = False

    def render(self, separator: str = SEPARATOR) -> str:
        body = self.newline.join("" if tags is None else join_tags(tags, separator) for tags in self.lines)
        return ("\ufeff" if self.bom else "") + body + (self.newline if self.final_newline else "")

    def tags(self) -> list[str]:
        """All tags of all lines, in order (the caption's tags for statistics)."""
        return [t for line in self.lines if line is not None for t in line]


def parse_caption(text: str, separator: str = ",") -> CaptionText:
    bom = text.startswith("\ufeff")
    text = text.removeprefix("\ufeff")
    newline = "\r\n" if "\r\n" in text else "\n"
    lines: list[list[str] | None] = [split_tags(line, separator) if line.strip() else None for line in text.splitlines()]
    if all(line is None for line in lines):
        lines = [[]]  # an empty caption is still one caption that edits may add to
    return CaptionText(lines, newline, text.endswith(("\n", "\r")) or not text.strip(), bom)


def read_text(path: str | Path) -> str:
    """A caption file's text; a clear error (file and fix) when it is not UTF-8."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CaptionError(
            f"{path}: not UTF-8 text (undecodable byte at position {err.start}): re-save it as UTF-8 "
            "(a text editor's 'Save as' with encoding UTF-8, or `iconv -f cp1252 -t utf-8`), then run again"
        ) from None


def read_caption(path: str | Path) -> CaptionText:
    return parse_caption(read_text(path))


def write_caption(path: str | Path, text: str, backup: BackupSession | None = None) -> Path:
    """Write a caption atomically, recording the previous version in ``backup`` first."""
    if backup is not None:
        backup.record(path)
    return atomic_write_text(path, text)


def write_tags(
    path: str | Path,
    tags: Sequence[str],
    mode: str = "overwrite",
    separator: str = SEPARATOR,
    backup: BackupSession | None = None,
) -> bool:
    """A tagger's output for one image, merged with an existing caption per ``mode``.

    Returns whether the file was written. Every line of a multi-line caption gets the merge.
    """
    path = Path(path)
    if not path.is_file() or mode == "overwrite":
        doc = CaptionText([list(tags)])
    elif mode == "skip":
        return False
    else:
        doc = parse_caption(read_text(path), separator)
        doc.lines = [None if line is None else merge_tags(line, tags, mode) for line in doc.lines]
        doc.final_newline = True
    write_caption(path, doc.render(separator), backup)
    return True


def load_in_batches(
    paths: Sequence[Path],
    load: Callable[[Path], T],
    batch_size: int,
    on_error: Callable[[Path, Exception], None],
) -> Iterator[tuple[list[Path], list[T]]]:
    """Yield ``(paths, loaded items)`` per batch while two threads load the next batch.

    An unreadable image goes to ``on_error`` and is left out of its batch (kohya logs and goes on).
    """
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), max(1, batch_size))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [pool.submit(load, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = pending
            pending = [pool.submit(load, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            done_paths, items = [], []
            for path, future in zip(chunk, current):
                try:
                    items.append(future.result())
                    done_paths.append(path)
                except (DatasetError, OSError) as err:
                    on_error(path, err)
            yield done_paths, items
