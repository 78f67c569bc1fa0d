"""A project folder: the state every notebook step reads and writes (never kernel globals).

Layout (issue-9 style): ``<root>/<name>/{dataset,captions,output,samples,state,logs}`` plus
``dataset.toml`` (kohya schema) and ``run.toml``. The root is ``$NBKIT_HOME`` if set, else
``MyDrive/nbkit`` when Google Drive is mounted in Colab, else ``./nbkit-projects``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DRIVE_ROOT = Path("/content/drive/MyDrive")
SUBFOLDERS = ("dataset", "captions", "output", "samples", "state", "logs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


def default_root() -> Path:
    if os.environ.get("NBKIT_HOME"):
        return Path(os.environ["NBKIT_HOME"]).expanduser()
    from nbkit.colab import drive_mounted, drive_mydrive

    if drive_mounted():  # DRIVE_ROOT, or the folder $NBKIT_MYDRIVE names
        return drive_mydrive() / "nbkit"
    return Path.cwd() / "nbkit-projects"


@dataclass(frozen=True)
class Project:
    name: str
    root: Path

    @classmethod
    def open(cls, name: str, root: str | Path | None = None, create: bool = True) -> Project:
        if not _NAME.match(name) or ".." in name:
            raise ValueError(
                f"project name {name!r}: use letters, digits, '.', '_', '-' or spaces (no '/' or '..')"
            )
        project = cls(name, Path(root).expanduser() if root else default_root())
        if create:
            for sub in SUBFOLDERS:
                (project.path / sub).mkdir(parents=True, exist_ok=True)
        return project

    @property
    def path(self) -> Path:
        return self.root / self.name

    def __getattr__(self, item: str) -> Path:
        # project.dataset_dir, project.output_dir, ... for every subfolder
        if item.endswith("_dir") and item[:-4] in SUBFOLDERS:
            return self.path / item[:-4]
        raise AttributeError(item)

    @property
    def dataset_toml(self) -> Path:
        return self.path / "dataset.toml"

    @property
    def run_toml(self) -> Path:
        """``run.toml``: the settings file of a project driven from the command line."""
        return self.path / "run.toml"

    def run_file(self, method: str) -> Path:
        """``run-<method>.toml``: the saved settings of one training method (the notebooks keep one per
        method, since a LoRA run file does not load as DreamBooth settings)."""
        return self.path / f"run-{method}.toml"

    def run_files(self) -> list[Path]:
        """Every settings file in the project, newest first."""
        found = [p for p in [self.run_toml, *self.path.glob("run-*.toml")] if p.is_file()]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
