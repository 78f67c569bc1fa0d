"""Where we run: Colab detection, a Google Drive mount that survives its known quirks, GPU facts.

Drive quirks handled by :func:`mount_drive` (each one seen in other Colab trainers' issue trackers):

- "Mountpoint must not already contain files": a cell created ``/content/drive/MyDrive/...`` before
  mounting, so the folder shadows the real MyDrive. The stray files are moved aside (never deleted)
  to ``/content/drive-shadowed-<time>`` and the mount goes ahead.
- "Transport endpoint is not connected": the FUSE process died. We flush and unmount, then mount
  again; if that fails the message names the manual fix.
- An existing mount is reused (mounting twice asks for authorisation again).

This module imports nothing heavy: notebooks call it in their first cell.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MOUNTPOINT = Path("/content/drive")
MYDRIVE = MOUNTPOINT / "MyDrive"
MYDRIVE_ENV = "NBKIT_MYDRIVE"  # a folder standing in for MyDrive (tests, or Drive for desktop)


class DriveMountError(RuntimeError):
    """Google Drive could not be mounted; the message says what to do."""


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def drive_mydrive() -> Path:
    """The MyDrive folder of a mounted Google Drive (``$NBKIT_MYDRIVE`` overrides it)."""
    return Path(os.environ.get(MYDRIVE_ENV) or MYDRIVE).expanduser()


def drive_mounted() -> bool:
    """True when MyDrive is there to write to (a real mount, or the ``$NBKIT_MYDRIVE`` folder)."""
    try:
        return drive_mydrive().is_dir()
    except OSError:  # "Transport endpoint is not connected"
        return False


def _stale(mountpoint: Path) -> bool:
    try:
        os.stat(mountpoint / "MyDrive")
    except OSError as err:
        return err.errno == errno.ENOTCONN
    return False


def move_aside_shadowing_files(mountpoint: Path, is_mount: Callable[[str], bool] = os.path.ismount) -> Path | None:
    """If ``mountpoint`` is a plain folder with files in it (so Drive cannot mount there), move them to
    ``<mountpoint>-shadowed-<time>`` and return that folder; nothing is deleted."""
    if not mountpoint.is_dir() or is_mount(str(mountpoint)) or not any(mountpoint.iterdir()):
        return None
    aside = mountpoint.with_name(f"{mountpoint.name}-shadowed-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(mountpoint), str(aside))
    mountpoint.mkdir()
    return aside


def _colab_drive():
    from google.colab import drive  # only importable inside Colab

    return drive


def mount_drive(mountpoint: str | Path = MOUNTPOINT, *, force_remount: bool = False, timeout_ms: int = 120_000,
                say: Callable[[str], None] = print, drive_module=None) -> Path | None:
    """Mount Google Drive in Colab and return MyDrive; outside Colab say why and return None.

    ``$NBKIT_MYDRIVE`` (a folder) stands in for a mount anywhere. ``drive_module`` replaces
    ``google.colab.drive`` (tests)."""
    mountpoint = Path(mountpoint)
    if os.environ.get(MYDRIVE_ENV):
        if not drive_mounted():
            say(f"${MYDRIVE_ENV} = {drive_mydrive()} is not a folder: create it, or unset the variable")
            return None
        say(f"using {drive_mydrive()} as MyDrive (${MYDRIVE_ENV})")
        return drive_mydrive()
    if drive_module is None and not in_colab():
        say("Google Drive can only be mounted inside Colab: projects stay in a local folder "
            "(./nbkit-projects, or set NBKIT_HOME to choose one).")
        return None
    drive = drive_module or _colab_drive()
    mydrive = mountpoint / "MyDrive"
    if _stale(mountpoint):
        say("the Drive mount is stale (Transport endpoint is not connected): unmounting and mounting again")
        with contextlib.suppress(Exception):  # a dead mount may refuse a clean unmount; mounting again decides
            drive.flush_and_unmount()
        force_remount = True
    elif mydrive.is_dir() and os.path.ismount(mountpoint) and not force_remount:
        say(f"Google Drive is already mounted at {mountpoint}")
        return mydrive
    aside = None if force_remount else move_aside_shadowing_files(mountpoint)
    if aside:
        say(f"{mountpoint} held files created before mounting (they would hide your Drive); moved them to {aside}")
    try:
        drive.mount(str(mountpoint), force_remount=force_remount, timeout_ms=timeout_ms)
    except Exception as err:  # Colab raises ValueError/MessageError/TimeoutError here
        raise DriveMountError(
            f"mounting Google Drive at {mountpoint} failed ({err}). Run "
            "`from google.colab import drive; drive.flush_and_unmount()`, then mount again; if it still fails, "
            "use Runtime > Disconnect and delete runtime, and mount before any cell writes under /content/drive."
        ) from None
    if not mydrive.is_dir():
        raise DriveMountError(f"Drive mounted at {mountpoint} but {mydrive} is missing: mount again with "
                              "force_remount=True and allow access to 'My Drive'")
    say(f"Google Drive mounted: projects go to {mydrive / 'nbkit'}")
    return mydrive


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_gib: float
    free_gib: float

    def __str__(self) -> str:
        return f"{self.name}: {self.total_gib:.1f} GiB total, {self.free_gib:.1f} GiB free"


def gpu_info(device: int = 0) -> GpuInfo | None:
    """The CUDA GPU's name and memory, or None when there is no GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return GpuInfo(torch.cuda.get_device_name(device), total / 2**30, free / 2**30)


def describe_gpu(info: GpuInfo | None) -> str:
    """One line for a notebook: the GPU, or how to get one."""
    if info is None:
        return "no GPU: training would run on the CPU. In Colab use Runtime > Change runtime type > T4 GPU."
    return f"GPU {info}"
