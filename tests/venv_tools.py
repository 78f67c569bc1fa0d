"""Fresh environments for the install tests, built offline in seconds.

A test venv gets no packages of its own: a ``.pth`` file lists this interpreter's site-packages
folders, so torch, diffusers and the rest are importable there without a download, while nbkit
itself is not (the ``.pth`` files inside those folders, which hold the editable install's hook,
are not run for folders added this way). Whatever the test installs lands in the venv's own
site-packages and is found first.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def overlay_venv(path: Path) -> Path:
    """Create the venv at ``path`` and return its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    parents = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    Path(purelib, "_parent_env.pth").write_text("\n".join(parents) + "\n", encoding="utf-8")
    return python


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new user: offline, no PYTHONPATH, pip that never reaches an index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_BUILD_ISOLATION="0", **extra)
    return env


def source_copy(dest: Path) -> Path:
    """The files a clean clone has (tracked and untracked-but-not-ignored), copied to ``dest``."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
