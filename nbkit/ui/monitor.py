"""A training monitor for notebooks: the trainers' hooks drawn as widgets, in the main thread.

    from nbkit.ui.monitor import TrainingMonitor
    monitor = TrainingMonitor(config)
    display(monitor)
    result = train_lora(config, datasets, hooks=monitor)

Progress bar with it/s and ETA, a loss curve redrawn every few steps, the newest sample images,
a Stop button and a final summary with the output paths. Everything happens inside the hook calls
the loop makes (no background thread touches a widget). The Stop button works during training
because :meth:`TrainingMonitor.should_stop` lets pending widget messages through
(:class:`~nbkit.ui.kernel_pump.KernelPump`); the loop then saves the file and the state as at
the end of a run.
"""

from __future__ import annotations

import html
import io
import time
from collections import deque
from pathlib import Path
from typing import Any

import ipywidgets as W

from nbkit.train.hooks import TrainHooks
from nbkit.ui.kernel_pump import KernelPump


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:d}:{rest % 60:02d}"


def loss_curve_png(steps: list[int], losses: list[float], validation: list[tuple[int, float]] | None = None,
                   width: float = 6.0, height: float = 3.0) -> bytes:
    """The loss (and a running mean, and validation points) as PNG bytes. No pyplot: no global figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, alpha=0.35, linewidth=1, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        sums = [0.0]
        for value in losses:
            sums.append(sums[-1] + value)
        mean = [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(window, i + 1) for i in range(len(losses))]
        ax.plot(steps, mean, linewidth=1.5, label=f"mean of {window}")
    if validation:
        ax.plot([s for s, _ in validation], [v for _, v in validation], "o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def image_png(image, size: int) -> bytes:
    """A PIL image as PNG bytes, scaled to fit ``size`` px (keeps notebook traffic small)."""
    copy = image.copy()
    copy.thumbnail((size, size))
    buffer = io.BytesIO()
    copy.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class TrainingMonitor(TrainHooks):
    """Hooks that draw a run. ``config`` (optional) lets the summary list the state folders.

    ``plot_every``: redraw the loss curve every N steps (and at most every ``plot_seconds``);
    ``pump_interval``: how often ``should_stop`` lets widget clicks through (seconds);
    ``sample_size``: largest side of the sample thumbnails (px).
    """

    def __init__(self, config: Any = None, *, title: str = "training", plot_every: int = 10,
                 plot_seconds: float = 2.0, pump_interval: float = 0.5, sample_size: int = 256) -> None:
        self.config = config
        self.plot_every, self.plot_seconds, self.sample_size = max(1, plot_every), plot_seconds, sample_size
        self.pump = KernelPump(pump_interval)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.validation: list[tuple[int, float]] = []
        self.saved: list[Path] = []
        self.samples: list[tuple[int, str]] = []  # (step, prompt) of every sample shown
        self.total_steps = 0
        self.info: dict = {}
        self.stop_requested = False
        self.finished = False
        self.final_step: int | None = None
        self._times: deque[tuple[float, int]] = deque(maxlen=30)
        self._started = self._last_plot = 0.0
        self._epoch: int | None = None
        self.plots_drawn = 0

        self.title = W.HTML(f"<b>{html.escape(title)}</b>")
        self.bar = W.IntProgress(value=0, min=0, max=1, bar_style="info", layout=W.Layout(width="60%"))
        self.label = W.HTML("waiting for the first step")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="danger",
                                    tooltip="Stop after this step: the file and the state are saved")
        self.stop_button.on_click(lambda _b: self.request_stop())
        self.loss_image = W.Image(format="png", layout=W.Layout(max_width="520px"))
        self.sample_box = W.HBox(layout=W.Layout(flex_flow="row wrap"))
        self.sample_label = W.HTML()
        self.log = W.HTML()
        self.summary = W.HTML()
        self.widget = W.VBox([
            self.title, W.HBox([self.bar, self.stop_button]), self.label, self.loss_image,
            self.sample_label, self.sample_box, self.log, self.summary,
        ])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ stop
    def request_stop(self) -> None:
        """What the Stop button does: the loop stops after its current step and saves."""
        self.stop_requested = True
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping..."
        self._log("stop requested: saving the file and the state after this step")

    def should_stop(self) -> bool:
        self.pump()  # lets a Stop click that arrived during training run its callback now
        return self.stop_requested

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, total_steps: int, info: dict) -> None:
        self.info = dict(info)
        start = int(info.get("start_step", 0))  # hypernetworks count the remaining steps
        self.total_steps = total_steps + start
        self.bar.max, self.bar.value = max(1, self.total_steps), start
        self._started = time.monotonic()
        self._times.append((self._started, start))
        images = info.get("images")
        per_epoch = info.get("steps_per_epoch")
        facts = [f"{total_steps} steps"] + ([f"{images} images"] if images else [])
        facts += [f"{per_epoch} steps per epoch"] if per_epoch else []
        self.label.value = "started: " + ", ".join(facts)
        self.pump(force=True)

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.steps.append(step)
        self.losses.append(float(loss))
        self.lrs.append(float(lr))
        now = time.monotonic()
        self._times.append((now, step))
        self.bar.value = min(step, self.bar.max)
        self.label.value = self._status(step, loss, lr)
        due = step % self.plot_every == 0 or step >= self.total_steps
        if due and now - self._last_plot >= self.plot_seconds:
            self.draw_loss()

    def _status(self, step: int, loss: float, lr: float) -> str:
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None
        eta = (self.total_steps - step) / rate if rate else None
        speed = "?" if rate is None else f"{rate:.2f} it/s" if rate >= 1 else f"{1 / rate:.2f} s/it"
        epoch = f" &middot; epoch {self._epoch + 1}" if self._epoch is not None else ""
        return (f"step <b>{step}</b>/{self.total_steps} &middot; {speed} &middot; elapsed "
                f"{format_duration(time.monotonic() - self._started)} &middot; ETA {format_duration(eta)}"
                f" &middot; loss {loss:.4f} &middot; lr {lr:.2e}{epoch}")

    def draw_loss(self) -> None:
        if self.steps:
            self.loss_image.value = loss_curve_png(self.steps, self.losses, self.validation)
            self._last_plot = time.monotonic()
            self.plots_drawn += 1

    def on_epoch_end(self, epoch: int, step: int) -> None:
        self._epoch = epoch

    def on_validation(self, step: int, loss: float) -> None:
        self.validation.append((step, float(loss)))
        self._log(f"validation loss at step {step}: {loss:.4f}")

    def on_sample(self, step: int, images: list, prompts: list[str]) -> None:
        boxes = []
        for image, prompt in zip(images, prompts):
            picture = W.Image(value=image_png(image, self.sample_size), format="png",
                              layout=W.Layout(max_width=f"{self.sample_size}px"))
            caption = W.HTML(f"<small>{html.escape(prompt[:120])}</small>",
                             layout=W.Layout(max_width=f"{self.sample_size}px"))
            boxes.append(W.VBox([picture, caption]))
            self.samples.append((step, prompt))
        self.sample_box.children = boxes  # only the newest set: old images leave the notebook's memory
        self.sample_label.value = f"<b>samples at step {step}</b>"
        self.pump(force=True)

    def on_save(self, path: Path, step: int) -> None:
        self.saved.append(Path(path))
        self._log(f"saved {path} (step {step})")

    def on_train_end(self, step: int) -> None:
        self.final_step = step
        self.finished = True
        self.draw_loss()
        self.bar.value = min(step, self.bar.max)
        self.bar.bar_style = "warning" if self.stop_requested else "success"
        self.stop_button.disabled = True
        self.stop_button.description = "Stopped" if self.stop_requested else "Done"
        self.summary.value = self._summary_html(step)

    # ------------------------------------------------------------------ summary
    def _log(self, line: str) -> None:
        self.log.value += f"<div><small>{html.escape(line)}</small></div>"

    def state_folders(self) -> list[Path]:
        """The run's ``*-state`` folders (needs ``config``), oldest first."""
        if self.config is None:
            return []
        folder = Path(getattr(self.config, "output_state_dir", None) or self.config.output_dir)
        return sorted(folder.glob(f"{self.config.output_name}-step*-state"))

    def outputs(self) -> dict[str, Any]:
        """What the run left behind: final file, every saved file, state folders, sample folder."""
        out: dict[str, Any] = {"final": self.saved[-1] if self.saved else None, "saved": list(self.saved),
                               "states": self.state_folders()}
        if self.config is not None and self.samples:
            out["samples"] = Path(self.config.output_dir) / "sample"
        return out

    def _summary_html(self, step: int) -> str:
        how = "stopped early" if self.stop_requested else "finished"
        took = format_duration(time.monotonic() - self._started) if self._started else "?"
        head = f"<b>Training {how} at step {step}/{self.total_steps}</b> in {took}"
        if self.losses:
            tail = self.losses[-min(10, len(self.losses)):]
            head += f"; loss {self.losses[-1]:.4f} (mean of the last {len(tail)}: {sum(tail) / len(tail):.4f})"
        rows = []
        for name, value in self.outputs().items():
            paths = value if isinstance(value, list) else [value] if value else []
            if paths:
                rows.append(f"<li>{name}: " + ", ".join(f"<code>{html.escape(str(p))}</code>" for p in paths) + "</li>")
        note = ("<div>The file is usable as it is; resume from the newest state folder with "
                "<code>resume = \"latest\"</code>.</div>") if self.stop_requested else ""
        return f"<div>{head}<ul>{''.join(rows)}</ul>{note}</div>"
