"""A per-image caption editor for notebooks (ipywidgets): image, editable caption, save, previous/next.

    from nbkit.tag.widgets import CaptionEditor
    CaptionEditor("dataset", caption_extension=".txt")   # the last expression of a cell shows it

Saving goes through the same atomic write and backup as the batch editor: the first save of a
session starts one backup, so ``nbkit captions undo DIR`` undoes the whole session. Only this
module imports ipywidgets; building the widgets needs no display (tests click the buttons).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as W

from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError, open_rgb
from nbkit.tag.backup import BackupSession
from nbkit.tag.files import caption_path, find_images, normalize_extension, read_text, write_caption


def thumbnail_png(path: Path, size: int) -> bytes:
    """A PNG of the image scaled to fit ``size`` px (keeps notebook traffic small)."""
    image = open_rgb(path)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class CaptionEditor:
    """Browse images one at a time and edit their captions; ``.widget`` is the ipywidgets box."""

    def __init__(
        self,
        root: str | Path,
        caption_extension: str = ".txt",
        recursive: bool = True,
        subfolders: Sequence[str] | None = None,
        backup_dir: str | Path | None = None,
        thumbnail: int = 512,
    ) -> None:
        self.root = Path(root)
        self.extension = normalize_extension(caption_extension)
        self.images = find_images(self.root, recursive, subfolders)
        if not self.images:
            raise DatasetError(f"{self.root}: no images ({', '.join(IMAGE_EXTENSIONS)}) to caption here")
        self.backup = BackupSession(self.root, "widget", backup_dir)
        self.thumbnail = thumbnail
        self.index = 0
        self.image = W.Image(format="png", layout=W.Layout(max_width=f"{thumbnail}px"))
        self.text = W.Textarea(layout=W.Layout(width="100%", height="6em"), placeholder="tag1, tag2, ...")
        self.status = W.HTML()
        self.slider = W.IntSlider(min=0, max=len(self.images) - 1, description="image", continuous_update=False)
        buttons = [("◀ previous", self.previous), ("save", self.save), ("next ▶", self.next)]
        self.buttons = {}
        for label, action in buttons:
            button = W.Button(description=label)
            button.on_click(lambda _b, action=action: action())
            self.buttons[label] = button
        self.slider.observe(lambda _change: self._render(), names="value")
        self.widget = W.VBox([W.HBox([*self.buttons.values(), self.slider]), self.image, self.text, self.status])
        self._render()

    @property
    def caption_file(self) -> Path:
        return caption_path(self.images[self.index], self.extension)

    def _current_text(self) -> str | None:
        """The caption on disk without its final newline ('' when missing); None if unreadable."""
        path = self.caption_file
        if not path.is_file():
            return ""
        try:
            return read_text(path).removeprefix("\ufeff").rstrip("\r\n")
        except DatasetError as err:
            self.status.value = f"<b>{err}</b>"
            return None

    def show(self, index: int) -> None:
        """Display image ``index`` (clamped to the list) and its caption."""
        index = max(0, min(index, len(self.images) - 1))
        if self.slider.value != index:
            self.slider.value = index  # the slider's observer renders it
        else:
            self._render()

    def _render(self) -> None:
        self.index = self.slider.value
        path = self.images[self.index]
        self.status.value = f"{self.index + 1} / {len(self.images)}: {path.relative_to(self.root)}"
        try:
            self.image.value = thumbnail_png(path, self.thumbnail)
        except DatasetError as err:
            self.image.value, self.status.value = b"", f"<b>{err}</b>"
        text = self._current_text()
        self.text.disabled = text is None
        self.text.value = text or ""

    def save(self) -> bool:
        """Write the edited caption (atomically, backed up first); False when nothing changed."""
        current = self._current_text()
        new = self.text.value.strip()
        if current is None or new == current.strip():
            if current is not None:
                self.status.value = f"{self.caption_file.name}: unchanged"
            return False
        write_caption(self.caption_file, new + "\n", self.backup)
        self.status.value = f"saved {self.caption_file.relative_to(self.root)} (undo: nbkit captions undo {self.root})"
        return True

    def next(self) -> None:
        self.show(self.index + 1)

    def previous(self) -> None:
        self.show(self.index - 1)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
