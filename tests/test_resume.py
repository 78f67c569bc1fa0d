"""Exact resume: kill -9 a training process (mid-step, during a save), resume, and get the same LoRA."""

from __future__ import annotations

import json

import pytest
from kill_harness import run_killable
from safetensors.torch import load_file

from nbkit.demo import make_sample_dataset

CHILD = """
from pathlib import Path
from nbkit.train.config import LoRATrainConfig
from nbkit.train.lora import train_lora
from nbkit.train.run_file import resolve_datasets

config, datasets_raw, base = PAYLOAD
cfg = LoRATrainConfig(**config)
train_lora(cfg, resolve_datasets(cfg, datasets_raw, Path(base)), device="cpu")
"""


def _run(config: dict, datasets_raw: dict, base, kill: str = "") -> int:
    return run_killable(CHILD, [config, datasets_raw, str(base)], kill)


def test_kill_and_resume_gives_the_same_lora(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    datasets_raw = {"datasets": [{"batch_size": 2, "subsets": [
        {"image_dir": str(images), "caption_extension": ".txt", "flip_aug": True, "shuffle_caption": True}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, network_dim=2, network_alpha=1.0,
                learning_rate=1e-2, train_batch_size=2, max_train_steps=9, optimizer_type="AdamW",
                mixed_precision="no", gradient_checkpointing=False, seed=11, save_state_every_n_steps=2,
                lr_scheduler="linear", output_name="lora")  # fmt: skip

    reference = dict(base, output_dir=str(tmp_path / "reference"))
    assert _run(reference, datasets_raw, tmp_path) == 0

    resumed = dict(base, output_dir=str(tmp_path / "resumed"), resume="auto")
    # 1: mid-step at step 3 (states exist for step 2); 2: during the state save at step 4 (second
    # torch.save of that folder); 3: mid-step at step 8, after a resume from step 4 (epoch 2).
    for kill in ("step:3", "save:2", "step:4"):
        assert _run(resumed, datasets_raw, tmp_path, kill) == -9
        for path in (tmp_path / "resumed").rglob("*.safetensors"):
            load_file(str(path))  # nothing truncated: every visible file loads
    assert _run(resumed, datasets_raw, tmp_path) == 0

    ours = load_file(str(tmp_path / "resumed" / "lora.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "lora.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    assert any(theirs[k].abs().sum() > 0 for k in theirs if "lora_up" in k)  # it did train
    meta_steps = json.loads((sorted((tmp_path / "resumed").glob("lora-step*-state"))[-1] / "train_state.json").read_text())
    assert meta_steps["step"] == 9


def test_stop_request_saves_a_loadable_lora_and_state(tiny_model_dirs, tmp_path):
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.hooks import TrainHooks
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    class StopAt3(TrainHooks):
        step = 0

        def on_step(self, step, loss, lr):
            self.step = step

        def should_stop(self):
            return self.step >= 3

    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    config = LoRATrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"),
                             resolution=64, network_dim=2, max_train_steps=50, optimizer_type="AdamW",
                             mixed_precision="no", gradient_checkpointing=False, output_name="stopped")  # fmt: skip
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    result = train_lora(config, resolve_datasets(config, raw, tmp_path), hooks=StopAt3(), device="cpu")
    assert result.steps == 3
    assert load_file(str(tmp_path / "out" / "stopped.safetensors"))
    assert (tmp_path / "out" / "stopped-step00000003-state" / "train_state.json").is_file()


def test_nan_loss_stops_with_a_clear_message(tiny_model_dirs, tmp_path):
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.lora import TrainingError, train_lora
    from nbkit.train.run_file import resolve_datasets

    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    config = LoRATrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"),
                             resolution=64, network_dim=2, max_train_steps=5, optimizer_type="AdamW",
                             learning_rate=float("inf"), mixed_precision="no", gradient_checkpointing=False)  # fmt: skip
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    with pytest.raises(TrainingError, match="NaN/inf at step 2: lower learning_rate"):
        train_lora(config, resolve_datasets(config, raw, tmp_path), device="cpu")
