"""The training monitor: hooks drawn as widgets, Stop during a real run, and the click pump in a kernel."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from nbkit.demo import make_sample_dataset
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import HookList, TrainHooks
from nbkit.train.lora import train_lora
from nbkit.train.run_file import resolve_datasets
from nbkit.ui.kernel_pump import KernelPump
from nbkit.ui.monitor import TrainingMonitor, format_duration, loss_curve_png


def test_hooks_update_every_widget(tmp_path):
    monitor = TrainingMonitor(plot_every=2, plot_seconds=0)
    monitor.on_train_start(6, {"images": 12, "steps_per_epoch": 3})
    assert monitor.bar.max == 6 and "12 images" in monitor.label.value
    for step in range(1, 5):
        monitor.on_step(step, 0.5 / step, 1e-4)
    assert monitor.bar.value == 4 and "step <b>4</b>/6" in monitor.label.value and "ETA" in monitor.label.value
    assert monitor.plots_drawn == 2 and bytes(monitor.loss_image.value).startswith(b"\x89PNG")
    monitor.on_epoch_end(1, 3)
    monitor.on_validation(3, 0.2)
    monitor.on_sample(4, [Image.new("RGB", (64, 64), "red")] * 2, ["a", "b"])
    assert len(monitor.sample_box.children) == 2 and "step 4" in monitor.sample_label.value
    monitor.on_save(tmp_path / "x.safetensors", 4)
    assert not monitor.should_stop()  # not in a kernel: the pump is a no-op
    monitor.stop_button.click()
    assert monitor.should_stop() and monitor.stop_button.disabled
    monitor.on_train_end(4)
    assert "stopped early at step 4/6" in monitor.summary.value and "x.safetensors" in monitor.summary.value
    assert monitor.outputs()["final"] == tmp_path / "x.safetensors"


def test_resumed_hypernetwork_counts_absolute_steps():
    monitor = TrainingMonitor()
    monitor.on_train_start(10, {"start_step": 90})  # hypernetworks pass the remaining steps
    monitor.on_step(91, 0.1, 1e-5)
    assert (monitor.bar.max, monitor.bar.value) == (100, 91) and "/100" in monitor.label.value


def test_helpers():
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "?"
    assert loss_curve_png(list(range(1, 50)), [1 / s for s in range(1, 50)], [(10, 0.1)]).startswith(b"\x89PNG")
    assert not KernelPump().active and KernelPump()(force=True) == 0


class ClickAt(TrainHooks):
    """Clicks the monitor's Stop button during a step, as a user would."""

    def __init__(self, monitor: TrainingMonitor, step: int):
        self.monitor, self.step = monitor, step

    def on_step(self, step, loss, lr):
        if step == self.step:
            self.monitor.stop_button.click()


def test_stop_button_leaves_a_lora_that_loads_in_diffusers(tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    model_dir, _ = tiny_model_dirs("sd15")
    config = LoRATrainConfig(
        pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), output_name="stopped",
        resolution=64, network_dim=4, network_alpha=2.0, learning_rate=5e-3, train_batch_size=2,
        max_train_steps=40, optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False, seed=0,
        sample_prompts="sks, a red circle --w 64 --h 64 --s 2 --d 1", sample_every_n_steps=2,
    )
    images = make_sample_dataset(tmp_path / "data" / "1_sks shapes", size=64)
    datasets = resolve_datasets(config, {"datasets": [{"subsets": [{"image_dir": str(images),
                                                                     "caption_extension": ".txt"}]}]}, tmp_path)
    monitor = TrainingMonitor(config, plot_every=1, plot_seconds=0)
    result = train_lora(config, datasets, hooks=HookList([monitor, ClickAt(monitor, 3)]), device="cpu")

    assert result.steps == 3 and monitor.final_step == 3, "the loop did not stop at the click"
    assert result.lora_path.is_file() and monitor.outputs()["final"] == result.lora_path
    states = monitor.outputs()["states"]
    assert [s.name for s in states] == ["stopped-step00000003-state"] and any(states[0].iterdir())
    assert monitor.plots_drawn >= 3 and monitor.samples == [(2, "sks, a red circle")]
    assert len(monitor.sample_box.children) == 1
    assert "stopped early at step 3/40" in monitor.summary.value and str(result.lora_path) in monitor.summary.value

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.load_lora_weights(str(result.lora_path))  # the file written at the Stop is a complete LoRA


# ----------------------------------------------------------------------------- a real kernel
SETUP = """
from nbkit.ui.monitor import TrainingMonitor
import ipywidgets as W
monitor = TrainingMonitor(pump_interval=0.05)
text = W.Text()
print("MODEL", monitor.stop_button.model_id, text.model_id)
"""
LOOP = """
import time
started = time.monotonic()
print("LOOP STARTED", flush=True)
while not monitor.should_stop() and time.monotonic() - started < 30:
    sum(range(20000))  # busy, as a training step is
print("STOPPED", monitor.stop_requested, monitor.pump.handled, monitor.pump.deferred, flush=True)
"""


def _run_until_idle(kc, msg_ids: set[str], on_stream, idle: list | None = None, timeout: float = 60.0) -> list[str]:
    """Stream texts in arrival order until every ``msg_ids`` request is idle (``idle``: every idle parent)."""
    texts, deadline = [], time.monotonic() + timeout
    while msg_ids and time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=deadline - time.monotonic())
        parent = msg["parent_header"].get("msg_id")
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
            on_stream(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise AssertionError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            msg_ids.discard(parent)
            if idle is not None:
                idle.append(parent)
    assert not msg_ids, f"timed out; output so far: {texts}"
    return texts


def test_stop_click_reaches_a_busy_kernel_and_queued_cells_still_run(tmp_path):
    """A Stop click sent while a cell loops is handled by ``should_stop``; a cell queued meanwhile
    runs afterwards, in order (the pump gives it back to the kernel)."""
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        model = [t for t in _run_until_idle(kc, {kc.execute(SETUP)}, lambda t: None) if "MODEL" in t]
        button_id, text_id = model[0].split()[1:3]

        def on_stream(text: str) -> None:
            if "LOOP STARTED" in text:
                time.sleep(0.3)
                pending.add(kc.execute("print('AFTER', monitor.stop_requested, text.value)"))  # queued
                typed = {"comm_id": text_id, "data": {"method": "update", "state": {"value": "typed"},
                                                      "buffer_paths": []}}
                update = kc.session.msg("comm_msg", typed)
                kc.shell_channel.send(update)
                sent.append(update["header"]["msg_id"])
                click = {"comm_id": button_id, "data": {"method": "custom", "content": {"event": "click"}}}
                kc.shell_channel.send(kc.session.msg("comm_msg", click))

        pending, sent, idle = {kc.execute(LOOP)}, [], []
        output = "".join(_run_until_idle(kc, pending, on_stream, idle))
        stopped = output.index("STOPPED True 2 1")  # 2 comm messages handled, 1 cell given back
        assert output.index("AFTER True typed") > stopped, output
        assert sent[0] in idle  # the frontend's widget-update throttle gets its idle
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
