"""Bad input and bad luck on disk: a full disk, damaged downloads, a missing state, stale temp files.

Each case must end in one plain message (a ``ConfigError``) naming the file or folder and the fix,
never a traceback, and must leave the previous file and no temporary file behind.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nbkit.cli import main
from nbkit.config import ConfigError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors only: on a shared 2-core machine a second thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- helpers


class FullDiskFile:
    """A writable file with ``room`` bytes left: it writes what fits, then fails as a full disk does."""

    def __init__(self, fh, room: int) -> None:
        self._fh = fh
        self.room = room

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        fits = max(0, min(len(view), self.room))
        if fits:
            self._fh.write(view[:fits])
            self.room -= fits
        if fits < len(view):
            self._fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._fh.name))
        return len(view)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


def full_disk_open(room: int):
    """A stand-in for ``open`` whose files opened for writing fill the disk after ``room`` bytes."""

    def fake_open(file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by FullDiskFile or the caller)
        return FullDiskFile(fh, room) if any(c in mode for c in "wax") else fh

    return fake_open


def small_disk(monkeypatch, under: Path, free: int) -> None:
    """``shutil.disk_usage`` reports ``free`` bytes for paths under ``under`` (a nearly full disk)."""
    real = shutil.disk_usage

    def fake(path):
        if Path(path).resolve().is_relative_to(under.resolve()):
            return shutil._ntuple_diskusage(10 << 30, (10 << 30) - free, free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", fake)


def temp_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")))


def no_traceback(err: str) -> None:
    assert "Traceback" not in err and err.startswith("nbkit: error: "), err


# ---------------------------------------------------------------- 1. disk full: LoRA save (through training)


def _lora_config(model_dir, tmp_path, **overrides):
    from nbkit.train.config import LoRATrainConfig

    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"),
                  output_name="test_lora", resolution=64, network_dim=4, network_alpha=2.0, learning_rate=5e-3,
                  train_batch_size=2, max_train_steps=1, optimizer_type="AdamW", mixed_precision="no",
                  gradient_checkpointing=False, seed=0)  # fmt: skip
    values.update(overrides)
    return LoRATrainConfig(**values)


def _datasets(config, tmp_path):
    from nbkit.demo import make_sample_dataset
    from nbkit.train.run_file import resolve_datasets

    images = make_sample_dataset(tmp_path / "data" / "5_sks shapes", size=64)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    return resolve_datasets(config, raw, tmp_path)


def _safetensors_error(message: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(message)


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_disk_full_while_saving_a_lora_keeps_the_previous_file(failure, tiny_model_dirs, tmp_path, monkeypatch):
    """safetensors' own writer reports a full disk as ``SafetensorError(... (os error 28))``, not OSError."""
    import safetensors.torch

    from nbkit.train.lora import train_lora

    model_dir, _ = tiny_model_dirs("sd15")
    config = _lora_config(model_dir, tmp_path, save_state=False)
    datasets = _datasets(config, tmp_path)
    out = Path(config.output_dir)
    out.mkdir()
    (out / "test_lora.safetensors").write_bytes(b"the LoRA of yesterday")

    def fake_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)  # part of the file made it to the disk
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise _safetensors_error("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", fake_save_file)
    with pytest.raises(ConfigError) as caught:
        train_lora(config, datasets, device="cpu")
    message = str(caught.value)
    assert str(out) in message and "test_lora.safetensors" in message
    assert "free" in message and "output_dir" in message and "bytes" in message
    assert (out / "test_lora.safetensors").read_bytes() == b"the LoRA of yesterday"
    assert temp_names(out) == []


# ---------------------------------------------------------------- 1. disk full: training state


def _state_objects():
    params = {"w": torch.nn.Parameter(torch.randn(64, 64)), "b": torch.nn.Parameter(torch.zeros(64))}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3)
    sum(p.sum() for p in params.values()).backward()
    optimizer.step()  # the optimizer now holds exp_avg / exp_avg_sq
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return params, optimizer, scheduler


def test_disk_full_while_saving_a_state_keeps_the_previous_state(tmp_path, monkeypatch):
    from nbkit.train.state import Progress, save_state

    params, optimizer, scheduler = _state_objects()
    target = tmp_path / "state" / "run-step00000010-state"
    target.mkdir(parents=True)
    (target / "train_state.json").write_text('{"step": 9}')
    real_save = torch.save

    def fake_save(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("optimizer.pt"):
            if isinstance(f, (str, os.PathLike)):
                Path(f).write_bytes(b"\0" * 1000)
            else:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fake_save)
    with pytest.raises(ConfigError) as caught:
        save_state(target, params, optimizer, scheduler, None, Progress(step=10))
    message = str(caught.value)
    assert str(target.parent) in message and "free" in message and "output_dir" in message
    assert sorted(p.name for p in target.iterdir()) == ["train_state.json"]
    assert (target / "train_state.json").read_text() == '{"step": 9}'
    assert temp_names(tmp_path) == []


def test_state_save_checks_free_space_before_writing(tmp_path, monkeypatch):
    from nbkit.train.state import Progress, save_state

    params, optimizer, scheduler = _state_objects()
    small_disk(monkeypatch, tmp_path, free=1000)
    target = tmp_path / "run-step00000010-state"
    with pytest.raises(ConfigError) as caught:
        save_state(target, params, optimizer, scheduler, None, Progress(step=10))
    message = str(caught.value)
    # weights 16.6 KB + AdamW's two moments 33 KB: at least 49 KB are needed, 1000 bytes are free
    needed = int(message.split(" bytes")[0].rsplit("(", 1)[1].replace(",", ""))
    assert needed >= 3 * (64 * 64 + 64) * 4, message
    assert str(tmp_path) in message and "1000 bytes free" in message.replace(",", "")
    assert not target.exists() and temp_names(tmp_path) == []


# ---------------------------------------------------------------- 1. disk full: merge output, through the CLI


@pytest.fixture(scope="module")
def pair(tiny_model_dirs, tmp_path_factory):
    """Two tiny SD1.5 single files, A and B."""
    root = tmp_path_factory.mktemp("pair")
    _, single = tiny_model_dirs("sd15")
    a = load_file(str(single))
    b = {k: v + 0.1 if v.is_floating_point() else v.clone() for k, v in a.items()}
    save_file(a, str(root / "a.safetensors"))
    save_file(b, str(root / "b.safetensors"))
    return root / "a.safetensors", root / "b.safetensors"


def _merge_args(pair, out: Path) -> list[str]:
    return ["merge", "checkpoints", "--a", str(pair[0]), "--b", str(pair[1]), "--out", str(out), "--quiet",
            "--no-hash", "--config-source", "3"]  # fmt: skip


def test_disk_full_during_a_merge_is_one_message(pair, tmp_path, monkeypatch, capsys):
    import nbkit.merge.streaming as streaming

    out = tmp_path / "merged" / "m.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an older merge")
    monkeypatch.setattr(streaming, "open", full_disk_open(room=50_000), raising=False)
    assert main([*_merge_args(pair, out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert str(out.parent) in err and "m.safetensors" in err and "--out" in err
    data = sum(t.numel() * t.element_size() for t in load_file(str(pair[0])).values())  # A's tensors, dtypes, shapes
    needed = int(err.split(" bytes")[0].rsplit("(", 1)[1].replace(",", ""))
    assert data < needed < data + 300_000, err  # + the header (names, shapes, recipe metadata)
    assert out.read_bytes() == b"an older merge" and temp_names(out.parent) == []


def test_merge_checks_free_space_before_computing(pair, tmp_path, monkeypatch, capsys):
    import nbkit.merge.streaming as streaming

    out = tmp_path / "m.safetensors"
    small_disk(monkeypatch, tmp_path, free=4096)
    calls = []
    monkeypatch.setattr(streaming, "tensor_bytes", lambda t: calls.append(t) or b"")
    assert main(_merge_args(pair, out)) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "4,096 bytes free" in err and str(tmp_path) in err
    assert calls == [] and not out.exists() and temp_names(tmp_path) == []


# ---------------------------------------------------------------- 1. disk full: Drive copy


def test_disk_full_during_a_drive_copy_keeps_the_previous_copy(tmp_path, monkeypatch, capsys):
    import nbkit.export.drive as drive

    src = tmp_path / "lora.safetensors"
    src.write_bytes(os.urandom(300_000))
    dest = tmp_path / "drive" / "output" / "lora.safetensors"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"last week's copy")
    monkeypatch.setattr(drive, "open", full_disk_open(room=100_000), raising=False)
    with pytest.raises(ConfigError) as caught:
        drive.copy_verified(src, dest, chunk=1 << 16)
    message = str(caught.value)
    assert str(dest.parent) in message and "300,000 bytes" in message and "free" in message
    assert dest.read_bytes() == b"last week's copy" and temp_names(dest.parent) == []


def test_drive_copy_checks_free_space_first_and_the_cli_says_so(tmp_path, monkeypatch, capsys):
    src = tmp_path / "lora.safetensors"
    src.write_bytes(os.urandom(300_000))
    dest = tmp_path / "drive"
    dest.mkdir()
    small_disk(monkeypatch, dest, free=20_000)
    assert main(["export", "drive", str(src), "--dest", str(dest), "--quiet"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert "300,000 bytes" in err and "20,000 bytes free" in err and str(dest) in err
    assert sorted(p.name for p in dest.iterdir()) == []


# ---------------------------------------------------------------- 2. damaged .safetensors given to merge checkpoints


def _tamper(good: Path, bad: Path, how: str) -> None:
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    key = next(k for k in sorted(header) if k != "__metadata__" and header[k]["data_offsets"][1] > 0)
    if how == "truncated":  # an interrupted download
        bad.write_bytes(raw[: len(raw) // 2])
        return
    if how == "header_longer_than_file":
        bad.write_bytes(struct.pack("<Q", len(raw) + 1000) + raw[8:])
        return
    if how == "invalid_json":
        bad.write_bytes(raw[:8] + b"{" * n + data)
        return
    if how == "offsets_past_end":
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header[key]["data_offsets"] = [end, end + header[key]["data_offsets"][1] - header[key]["data_offsets"][0]]
    elif how == "shape_disagrees_with_offsets":
        header[key]["shape"] = [2 * header[key]["shape"][0], *header[key]["shape"][1:]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("how", ["truncated", "header_longer_than_file", "invalid_json", "offsets_past_end",
                                 "shape_disagrees_with_offsets"])  # fmt: skip
def test_damaged_safetensors_given_to_merge_is_named_before_merging(how, pair, tmp_path, monkeypatch, capsys):
    import nbkit.merge.checkpoints as checkpoints

    bad = tmp_path / "downloaded.safetensors"
    _tamper(pair[1], bad, how)
    merged = []
    monkeypatch.setattr(checkpoints, "stream_safetensors", lambda *a, **k: merged.append(a))
    out = tmp_path / "m.safetensors"
    assert main(["merge", "checkpoints", "--a", str(pair[0]), "--b", str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert str(bad) in err and ("damaged" in err or "incomplete" in err) and "download it again" in err, err
    assert merged == [] and not out.exists()


def test_damaged_safetensors_error_is_a_config_error(pair, tmp_path):
    from nbkit.merge.sources import open_source

    bad = tmp_path / "cut.safetensors"
    _tamper(pair[0], bad, "truncated")
    with pytest.raises(ConfigError, match="cut.safetensors"):
        open_source(bad)


# ---------------------------------------------------------------- 3. --resume without a state


def _run_file(tmp_path, model_dir) -> Path:
    from nbkit.demo import make_sample_dataset

    images = make_sample_dataset(tmp_path / "data" / "5_sks shapes", size=64)
    run = tmp_path / "run.toml"
    run.write_text(
        f'pretrained_model_name_or_path = "{model_dir}"\noutput_dir = "{tmp_path / "out"}"\n'
        f'output_name = "mine"\nresolution = 64\nmixed_precision = "no"\noptimizer_type = "AdamW"\n'
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\ncaption_extension = ".txt"\n'
    )
    return run


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading a model is an error: the checks must come first."""
    import nbkit.models.load
    import nbkit.train.base_model
    import nbkit.train.dreambooth
    import nbkit.train.hypernetwork
    import nbkit.train.lora

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(nbkit.models.load, "load_pipeline", refuse)
    for module in (nbkit.train.base_model, nbkit.train.lora, nbkit.train.dreambooth, nbkit.train.hypernetwork):
        monkeypatch.setattr(module, "load_base", refuse)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_resume_latest_without_a_state_is_a_message_before_the_model_loads(method, tmp_path, no_model_load, capsys):
    run = _run_file(tmp_path, tmp_path / "no-model-needed")
    assert main(["train", method, "--config", str(run), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert str(tmp_path / "out") in err and "mine" in err and "resume" in err


def test_resume_from_a_folder_that_is_not_a_state(tmp_path, no_model_load, capsys):
    run = _run_file(tmp_path, tmp_path / "no-model-needed")
    not_state = tmp_path / "out"
    not_state.mkdir()
    (not_state / "mine.safetensors").write_bytes(b"x")
    assert main(["train", "lora", "--config", str(run), "--resume", str(not_state)]) == 2
    err = capsys.readouterr().err
    no_traceback(err)
    assert str(not_state) in err and "-state" in err


def test_resume_error_is_a_config_error(tmp_path):
    from nbkit.train.state import resolve_resume

    with pytest.raises(ConfigError, match=str(tmp_path)):
        resolve_resume("latest", tmp_path, "mine")
    with pytest.raises(ConfigError, match="not a state folder"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path, "mine")
    assert resolve_resume("auto", tmp_path, "mine") is None


# ---------------------------------------------------------------- 4. stale temporary files


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then))


def test_a_merge_removes_stale_temps_of_killed_writes_and_nothing_else(pair, tmp_path, capsys):
    from nbkit.export.drive import human_size

    folder = tmp_path / "models"
    folder.mkdir()
    stale_file = folder / ".m.safetensors.k3j4h5g6.tmp"
    stale_file.write_bytes(b"\0" * 5000)
    _age(stale_file, 3600)
    stale_dir = folder / ".other.a1b2c3d4.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    (stale_dir / "unet" / "w.safetensors").write_bytes(b"\0" * 3000)
    _age(stale_dir, 3600)
    users = {".hidden.txt": b"mine", "model.tmp": b"mine", ".notes.tmp": b"mine", "m.safetensors.tmp": b"mine",
             ".m.safetensors.tmp": b"mine", ".m.safetensors.old": b"mine", "a.b.c.tmp": b"mine"}  # fmt: skip
    for name, data in users.items():
        (folder / name).write_bytes(data)
        _age(folder / name, 3600)
    fresh = folder / ".x.safetensors.zzzzzzzz.tmp"  # maybe another run writing now: kept, mentioned
    fresh.write_bytes(b"\0" * 10)
    (folder / "model").mkdir()
    (folder / ".model.old").mkdir()  # an older nbkit's swap folder, or the user's backup: only mentioned
    (folder / ".model.old" / "unet.safetensors").write_bytes(b"mine")

    assert main([*_merge_args(pair, folder / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert not stale_file.exists() and not stale_dir.exists()
    assert all((folder / name).read_bytes() == data for name, data in users.items())
    assert fresh.exists() and (folder / "m.safetensors").is_file()
    assert stale_file.name in out and stale_dir.name in out and f"{human_size(8000)} freed" in out, out
    assert fresh.name in out and ".model.old" in out
    assert (folder / ".model.old" / "unet.safetensors").read_bytes() == b"mine"


def test_a_state_save_removes_the_temp_of_a_dead_writer_at_once(tmp_path, capsys):
    from nbkit.io import temp_prefix
    from nbkit.train.state import Progress, save_state

    folder = tmp_path / "state"
    folder.mkdir()
    dead = folder / f"{temp_prefix('run-step00000002-state', pid=_dead_pid())}abcd1234.tmp"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "optimizer.pt").write_bytes(b"\0" * 100)
    alive = folder / f"{temp_prefix('run-step00000004-state', pid=os.getppid())}abcd1234.tmp"
    alive.mkdir()
    _age(alive, 3600)  # old, but its writer is still running: kept
    params, optimizer, scheduler = _state_objects()
    save_state(folder / "run-step00000006-state", params, optimizer, scheduler, None, Progress(step=6))
    assert not dead.exists() and alive.exists()
    assert dead.name in capsys.readouterr().out


def test_an_interrupted_folder_swap_is_restored_not_deleted(tmp_path, capsys):
    from nbkit.io import clean_stale_temps, temp_prefix

    folder = tmp_path / "out"
    folder.mkdir()
    old = folder / f"{temp_prefix('model', pid=_dead_pid())}abcd1234.old"  # killed between the two renames
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    removed = clean_stale_temps(folder)
    assert (folder / "model" / "model_index.json").is_file() and not old.exists()
    assert removed.restored == [folder / "model"] and "restored" in capsys.readouterr().out
