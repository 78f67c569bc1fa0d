"""The small interface between a training loop and whatever shows it.

The loop calls these methods and never imports a UI library: tqdm, a CSV log, notebook
widgets or TensorBoard each implement the hooks they care about.
"""

from __future__ import annotations

import csv
from pathlib import Path


class TrainHooks:
    """Override what you need; every method is optional."""

    def on_train_start(self, total_steps: int, info: dict) -> None: ...

    def on_step(self, step: int, loss: float, lr: float) -> None: ...

    def on_epoch_end(self, epoch: int, step: int) -> None: ...

    def on_validation(self, step: int, loss: float) -> None: ...

    def on_sample(self, step: int, images: list, prompts: list[str]) -> None: ...

    def on_save(self, path: Path, step: int) -> None: ...

    def on_train_end(self, step: int) -> None: ...

    def should_stop(self) -> bool:
        return False


class HookList(TrainHooks):
    """Fan every call out to several hooks; stop when any of them asks to."""

    def __init__(self, hooks: list[TrainHooks] | None = None):
        self.hooks = [h for h in (hooks or []) if h is not None]

    def on_train_start(self, total_steps, info):
        for h in self.hooks:
            h.on_train_start(total_steps, info)

    def on_step(self, step, loss, lr):
        for h in self.hooks:
            h.on_step(step, loss, lr)

    def on_epoch_end(self, epoch, step):
        for h in self.hooks:
            h.on_epoch_end(epoch, step)

    def on_validation(self, step, loss):
        for h in self.hooks:
            h.on_validation(step, loss)

    def on_sample(self, step, images, prompts):
        for h in self.hooks:
            h.on_sample(step, images, prompts)

    def on_save(self, path, step):
        for h in self.hooks:
            h.on_save(path, step)

    def on_train_end(self, step):
        for h in self.hooks:
            h.on_train_end(step)

    def should_stop(self):
        return any(h.should_stop() for h in self.hooks)


class ProgressHooks(TrainHooks):
    """A tqdm.auto bar (renders in notebooks and terminals) with the running loss."""

    def __init__(self, desc: str = "train"):
        self.desc = desc
        self.bar = None

    def on_train_start(self, total_steps, info):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, desc=self.desc, unit="step")

    def on_step(self, step, loss, lr):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def on_save(self, path, step):
        if self.bar is not None:
            self.bar.write(f"saved {path} (step {step})")

    def on_validation(self, step, loss):
        if self.bar is not None:
            self.bar.write(f"validation loss at step {step}: {loss:.4f}")

    def on_train_end(self, step):
        if self.bar is not None:
            self.bar.close()


class LossRecorder(TrainHooks):
    """Keeps (step, loss, lr) in memory and, if given a path, appends them to a CSV file."""

    def __init__(self, csv_path: str | Path | None = None):
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.csv_path = Path(csv_path) if csv_path else None

    def on_train_start(self, total_steps, info):
        if self.csv_path:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            with self.csv_path.open("w", newline="") as fh:
                csv.writer(fh).writerow(["step", "loss", "lr"])

    def on_step(self, step, loss, lr):
        self.steps.append(step)
        self.losses.append(loss)
        self.lrs.append(lr)
        if self.csv_path:
            with self.csv_path.open("a", newline="") as fh:
                csv.writer(fh).writerow([step, f"{loss:.6f}", f"{lr:.6g}"])
