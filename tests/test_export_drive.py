"""Drive: a temporary folder stands in for /content/drive/MyDrive. Mount quirks, sync lag, verified and
interruptible copies, size summary, cleanup, and a training run resumed from the project's state/ in a new process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from kill_harness import run_killable

from nbkit.cli import main
from nbkit.colab import DriveMountError, GpuInfo, describe_gpu, gpu_info, in_colab, mount_drive
from nbkit.export.drive import (
    DriveLagError,
    apply_cleanup,
    cleanup_plan,
    copy_verified,
    export_to_folder,
    format_usage,
    project_usage,
    use_project,
    wait_for_files,
    wait_visible,
)
from nbkit.project import Project, default_root


@pytest.fixture()
def mydrive(tmp_path, monkeypatch):
    folder = tmp_path / "drive" / "MyDrive"
    folder.mkdir(parents=True)
    monkeypatch.setenv("NBKIT_MYDRIVE", str(folder))
    monkeypatch.delenv("NBKIT_HOME", raising=False)
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- environment


def test_outside_colab_and_no_gpu(monkeypatch, tmp_path):
    monkeypatch.delenv("NBKIT_MYDRIVE", raising=False)
    monkeypatch.delenv("NBKIT_HOME", raising=False)
    said = []
    assert not in_colab() and mount_drive(say=said.append) is None
    assert "only be mounted inside Colab" in said[0] and "NBKIT_HOME" in said[0]
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / "nbkit-projects"
    assert gpu_info() is None and "Runtime > Change runtime type > T4 GPU" in describe_gpu(None)
    assert describe_gpu(GpuInfo("Tesla T4", 14.748, 14.5)) == "GPU Tesla T4: 14.7 GiB total, 14.5 GiB free"


def test_projects_go_to_mydrive_when_mounted(mydrive):
    assert default_root() == mydrive / "nbkit"
    project = Project.open("dogs")
    assert project.state_dir == mydrive / "nbkit" / "dogs" / "state" and project.state_dir.is_dir()
    assert mount_drive(say=lambda _: None) == mydrive


class FakeDrive:
    """``google.colab.drive`` stand-in: mount creates MyDrive, or fails like Colab does."""

    def __init__(self, error: Exception | None = None):
        self.calls, self.error = [], error

    def mount(self, mountpoint, force_remount=False, timeout_ms=0):
        self.calls.append(("mount", force_remount))
        if self.error:
            raise self.error
        (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)

    def flush_and_unmount(self):
        self.calls.append(("unmount",))


def test_mount_moves_shadowing_files_aside(tmp_path, monkeypatch):
    monkeypatch.delenv("NBKIT_MYDRIVE", raising=False)
    mountpoint = tmp_path / "drive"
    (mountpoint / "MyDrive" / "lora").mkdir(parents=True)  # a cell wrote here before mounting (SS#40)
    (mountpoint / "MyDrive" / "lora" / "a.txt").write_text("keep me")
    said, drive = [], FakeDrive()
    assert mount_drive(mountpoint, say=said.append, drive_module=drive) == mountpoint / "MyDrive"
    aside = next(tmp_path.glob("drive-shadowed-*"))
    assert (aside / "MyDrive" / "lora" / "a.txt").read_text() == "keep me"  # moved, never deleted
    assert drive.calls == [("mount", False)] and "moved them to" in said[0]

    failing = FakeDrive(ValueError("Mountpoint must not already contain files"))
    with pytest.raises(DriveMountError, match=r"flush_and_unmount\(\).*mount again"):
        mount_drive(tmp_path / "other", drive_module=failing, say=lambda _: None)


# ---------------------------------------------------------------- Drive lag


def test_reader_waits_for_a_file_that_appears_late(tmp_path):
    target = tmp_path / "output" / "lora.safetensors"
    target.parent.mkdir()

    def write_later():
        partial = target.with_name(".lora.safetensors.x.tmp")
        partial.write_bytes(b"x" * 10)
        os.replace(partial, target)

    timer = threading.Timer(0.6, write_later)
    started = time.monotonic()
    timer.start()
    try:
        assert wait_visible(target, size=10, timeout=10, interval=0.05) == target
    finally:
        timer.join()
    assert time.monotonic() - started >= 0.55
    threading.Timer(0.4, lambda: (tmp_path / "state" / "x-step00000002-state").mkdir(parents=True)).start()
    assert [p.name for p in wait_for_files(tmp_path / "state", "*-state", timeout=10, interval=0.05)] == [
        "x-step00000002-state"]


def test_lag_timeout_says_what_to_do(tmp_path):
    clock = [0.0]
    sleep = lambda s: clock.__setitem__(0, clock[0] + s)  # noqa: E731 - a fake clock, no real waiting
    with pytest.raises(DriveLagError, match=r"not visible after 120 s.*wait a minute"):
        wait_visible(tmp_path / "missing", timeout=120, sleep=sleep, clock=lambda: clock[0])
    with pytest.raises(DriveLagError, match="folder is empty"):
        wait_for_files(tmp_path, "*.pt", timeout=30, sleep=sleep, clock=lambda: clock[0])


# ---------------------------------------------------------------- verified copies


def test_copy_verified_and_interrupted_copy(tmp_path):
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3 << 20))
    before = sha(src)
    result = copy_verified(src, tmp_path / "drive" / "model.safetensors", chunk=1 << 20)
    assert result.copied and result.sha256 == before == sha(result.target)
    assert not copy_verified(src, result.target).copied  # already identical: nothing written

    def boom(_n):
        raise KeyboardInterrupt  # the runtime stops mid-copy

    fresh = tmp_path / "drive" / "fresh.safetensors"
    with pytest.raises(KeyboardInterrupt):
        copy_verified(src, fresh, chunk=1 << 20, on_chunk=boom)
    assert not fresh.exists()
    result.target.write_bytes(b"older version")
    with pytest.raises(KeyboardInterrupt):
        copy_verified(src, result.target, chunk=1 << 20, on_chunk=boom)
    assert result.target.read_bytes() == b"older version"  # the old file stays whole under its name
    assert sorted(p.name for p in (tmp_path / "drive").iterdir()) == ["model.safetensors"]  # no temp left
    assert sha(src) == before


CHILD = """
import sys, time
from nbkit.export.drive import copy_verified
copy_verified(sys.argv[1], sys.argv[2], chunk=1 << 16, on_chunk=lambda n: time.sleep(0.01))
"""


def test_kill_during_copy_leaves_no_file_under_the_final_name(tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(8 << 20))
    dest = tmp_path / "drive" / "big.bin"
    dest.parent.mkdir()
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(src), str(dest)])
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in dest.parent.glob(".big.bin.*.tmp")):
            assert time.monotonic() < deadline and child.poll() is None, "the copy never started"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and not dest.exists()
    assert list(dest.parent.glob(".big.bin.*.tmp"))  # the partial bytes only ever had a temporary name
    assert copy_verified(src, dest).copied and sha(dest) == sha(src)
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # the stale temp was cleared


def test_export_drive_command(mydrive, tmp_path, capsys, monkeypatch):
    local = tmp_path / "local"
    (local / "unet").mkdir(parents=True)
    (local / "model_index.json").write_text("{}")
    (local / "unet" / "w.safetensors").write_bytes(b"w" * 1000)
    (tmp_path / "l.safetensors").write_bytes(b"l" * 10)
    Project.open("dogs")
    assert main(["export", "drive", str(tmp_path / "l.safetensors"), str(local), "--project", "dogs", "--quiet"]) == 0
    out = mydrive / "nbkit" / "dogs" / "output"
    assert (out / "l.safetensors").read_bytes() == b"l" * 10 and (out / "local" / "unet" / "w.safetensors").is_file()
    assert "3 files copied" in capsys.readouterr().out
    with pytest.raises(ValueError, match="inside"):
        export_to_folder([local], local / "sub")
    monkeypatch.delenv("NBKIT_MYDRIVE")
    assert main(["export", "drive", str(tmp_path / "l.safetensors"), "--project", "dogs"]) == 2
    assert "Drive is not mounted" in capsys.readouterr().err


# ---------------------------------------------------------------- usage and cleanup


def test_usage_and_cleanup_keep_the_newest(mydrive, capsys):
    project = Project.open("p")
    out, state = project.output_dir, project.state_dir
    for name in ("lora.safetensors", "lora-000001.safetensors", "lora-000002.safetensors", "lora-000003.safetensors",
                 "hn.pt", "hn-100.pt", "hn-100.pt.optim", "hn-200.pt", "hn-200.pt.optim", "notes.txt"):
        (out / name).write_bytes(b"x" * 100)
    for step in (2, 4, 6):
        (state / f"lora-step{step:08d}-state").mkdir()
        (state / f"lora-step{step:08d}-state" / "train_state.json").write_text("{}")
    stale = out / ".lora.safetensors.abc.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 7200,) * 2)

    plan = cleanup_plan([out, state], keep=1)
    assert sorted(i.path.name for i in plan) == sorted([
        "lora-000001.safetensors", "lora-000002.safetensors", "hn-100.pt", "hn-100.pt.optim",
        "lora-step00000002-state", "lora-step00000004-state", ".lora.safetensors.abc.tmp"])
    assert main(["project", "cleanup", "--project", "p"]) == 0
    assert "dry run" in capsys.readouterr().out and (out / "lora-000001.safetensors").exists()
    assert main(["project", "cleanup", "--project", "p", "--apply"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["hn-200.pt", "hn-200.pt.optim", "hn.pt", "lora-000003.safetensors",
                                                     "lora.safetensors", "notes.txt"]
    assert [p.name for p in state.iterdir()] == ["lora-step00000006-state"]
    assert apply_cleanup(cleanup_plan([out, state], keep=1)) == 0

    rows = project_usage(project)
    assert {r.path.name: r.files for r in rows}["output"] == 6
    assert main(["project", "usage", "--project", "p"]) == 0
    assert "total" in capsys.readouterr().out and "600 B" in format_usage(rows)
    assert main(["project", "usage", "--project", "nope"]) == 2


# ---------------------------------------------------------------- resume from the project's state/ in a new process

TRAIN = """
import sys
from nbkit.cli import main
sys.exit(main(["train", "lora", "--config", PAYLOAD[0], *PAYLOAD[1:]]))
"""


def test_resume_from_project_state_in_a_new_process(tiny_model_dirs, mydrive):
    from nbkit.config import save_toml
    from nbkit.demo import make_sample_dataset
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.run_file import run_config_dict

    model_dir, _ = tiny_model_dirs("sd15")
    project = Project.open("shapes")
    images = make_sample_dataset(project.dataset_dir / "1_sks shapes", size=64)
    config = use_project(LoRATrainConfig(
        pretrained_model_name_or_path=str(model_dir), output_name="lora", resolution=64, network_dim=2,
        train_batch_size=2, max_train_steps=6, save_state_every_n_steps=2, optimizer_type="AdamW",
        mixed_precision="no", gradient_checkpointing=False, seed=3), project)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    run = save_toml(run_config_dict(config, raw), project.run_toml)

    # runtime 1 dies before its 5th optimizer step: the states of steps 2 and 4 are on "Drive"
    assert run_killable(TRAIN, [str(run)], kill="step:5") == -9
    states = sorted(p.name for p in project.state_dir.iterdir())
    assert states == ["lora-step00000002-state", "lora-step00000004-state"]
    assert not list(project.output_dir.glob("*-state"))
    # runtime 2 (a new process) resumes from state/: it needs only 2 more steps, so a kill at its 3rd never fires
    assert run_killable(TRAIN, [str(run), "--resume", "latest"], kill="step:3") == 0
    meta = json.loads((project.state_dir / "lora-step00000006-state" / "train_state.json").read_text())
    assert meta["step"] == 6 and (project.output_dir / "lora.safetensors").is_file()
