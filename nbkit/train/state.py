"""Training state for exact resume after a Colab runtime dies.

A state folder holds what the next step depends on: the trainable weights, optimizer, LR
schedule, grad scaler, every RNG, and where in the epoch's shuffled order training stood.
It is written to a temporary folder and renamed into place, so a kill during a save leaves the
previous state intact. Only trainable weights are stored (a LoRA state is megabytes, not the
UNet's gigabytes), and everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nbkit.config import ConfigError

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"-step(\d{8})-state$")


@dataclass
class Progress:
    """Counters and the Python RNG, enough to rebuild the epoch's batch order and continue."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs started (1-based while running)
    batch_index: int = 0  # micro-batches of this epoch already consumed
    epoch_rng_state: list = field(default_factory=list)  # Python RNG before this epoch's shuffle
    rng_state: list = field(default_factory=list)  # Python RNG now
    run_fingerprint: str = ""  # config values that must not change across a resume


def rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def rng_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def state_dir_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}-state"


def state_dir(config) -> Path:
    """Where a run's ``*-state`` folders go: ``output_state_dir`` (a Drive project's ``state/``, which
    survives a runtime reset), else ``output_dir``."""
    return Path(getattr(config, "output_state_dir", None) or config.output_dir)


def list_states(output_dir: str | Path, output_name: str) -> list[Path]:
    """Complete state folders of a run, oldest first (temporary folders are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{output_name}-step*-state") if _STEP_DIR.search(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.search(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path, output_name: str) -> Path | None:
    """``resume`` is a state folder, or "latest"/"auto" for the newest state of this run.

    Cheap (no model needed), so trainers call it before loading the model; a wrong ``resume``
    raises ``ConfigError`` naming the folder that was searched and what to do."""
    if not resume:
        return None
    if resume in ("latest", "auto"):
        states = list_states(output_dir, output_name)
        if not states:
            if resume == "auto":
                return None
            raise ConfigError(f"resume = latest: no saved state of '{output_name}' in {output_dir} yet"
                              f"{_other_states(output_dir)}. States (<output_name>-stepNNNNNNNN-state folders) are "
                              "written at each save while save_state is on. Start without --resume, use "
                              "--resume auto (resume only if a state exists), or set output_dir / output_state_dir "
                              "/ output_name to those of the run you want to continue.")
        return states[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        what = "no such folder" if not path.exists() else f"no {STATE_FILE} in it"
        latest = list_states(output_dir, output_name)
        hint = f" (the newest state of this run is {latest[-1]})" if latest else ""
        raise ConfigError(f"resume = {path}: not a state folder ({what}): pass a <output_name>-stepNNNNNNNN-state "
                          f"folder{hint}, or 'latest' for the newest state of this run in {output_dir}.")
    return path


def _other_states(output_dir: str | Path) -> str:
    folder = Path(output_dir)
    names = sorted({m.group(1) for p in (folder.glob("*-step*-state") if folder.is_dir() else [])
                    if (m := re.match(r"(.+)-step\d{8}-state$", p.name)) and (p / STATE_FILE).is_file()})
    return f" (it holds states of {', '.join(repr(n) for n in names)}: set output_name to one of them)" if names else ""


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so a full disk surfaces as ENOSPC (with a path, torch's C++
    writer reports only 'unexpected pos')."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def save_state(path: Path, params: dict[str, torch.Tensor], optimizer, lr_scheduler, scaler, progress: Progress) -> Path:
    """Write a state folder atomically (temp folder, then rename); the free space is checked first."""
    from safetensors.torch import save_file

    from nbkit.io import atomic_dir

    optimizer_state = optimizer.state_dict()
    needed = _tensor_bytes(dict(params)) + _tensor_bytes(optimizer_state) + (64 << 10)  # + RNGs, schedule, JSON
    with atomic_dir(path, size_hint=needed) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        _torch_save(optimizer_state, tmp / "optimizer.pt")
        _torch_save(lr_scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            _torch_save(scaler.state_dict(), tmp / "scaler.pt")
        rngs = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rngs["cuda"] = torch.cuda.get_rng_state_all()
        _torch_save(rngs, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(progress)))
    return path


def load_state(path: Path, params: dict[str, torch.nn.Parameter], optimizer, lr_scheduler, scaler) -> Progress:
    """Restore a state folder into live objects; returns the progress counters."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise ValueError(f"{path}: the state does not match this run (missing {missing[:3]}): resume with the same settings")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rngs["torch"])
    if "cuda" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])
    return Progress(**json.loads((path / STATE_FILE).read_text()))


def prune_states(output_dir: str | Path, output_name: str, keep: int | None) -> None:
    """Keep the newest ``keep`` states (None keeps all)."""
    if not keep:
        return
    for old in list_states(output_dir, output_name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def restore_python_rng(rng: random.Random, state: list) -> None:
    rng.setstate(rng_from_json(state))


def save_run_state(config, step: int, rng: random.Random, params, optimizer, lr_scheduler, scaler,
                   progress: Progress) -> Path:
    """Save this run's state as ``<output_name>-step<N>-state`` and keep the newest
    ``save_last_n_steps_state`` (every trainer does it the same way)."""
    progress.rng_state = rng_to_json(rng.getstate())
    folder = state_dir(config)
    path = save_state(folder / state_dir_name(config.output_name, step), params, optimizer, lr_scheduler, scaler,
                      progress)
    prune_states(folder, config.output_name, config.save_last_n_steps_state)
    return path
