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
    # resumed from a state of step >= 4, the last run needs at most 5 updates: a fresh start would be
    # killed at its 6th
    assert _run(resumed, datasets_raw, tmp_path, "step:6") == 0

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


HYPERNETWORK_CHILD = """
from pathlib import Path
from nbkit.networks.hypernetwork.cli import hypernetwork_datasets
from nbkit.train.hypernetwork import train_hypernetwork
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

config, base = PAYLOAD
cfg = HypernetworkTrainConfig(**config)
train_hypernetwork(cfg, hypernetwork_datasets(cfg, {}, Path(base)), device="cpu")
"""


def test_kill_and_resume_gives_the_same_hypernetwork(tiny_model_dirs, tmp_path):
    """A hypernetwork with save_state resumes exactly after kill -9: per-step tag shuffling and dropout
    (the Python RNG), an A1111 lr string and a clip-value schedule (both stepped by step count)."""
    import torch

    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, train_data_dir=str(images),
                train_batch_size=2, max_train_steps=7, learning_rate="1e-2:3, 5e-3:5, 1e-3", mixed_precision="no",
                gradient_checkpointing=False, activation_func="relu", template_file="subject_filewords.txt",
                shuffle_tags=True, tag_drop_out=0.3, clip_grad_mode="value", clip_grad_value="0.1:4, 0.05",
                dropout_structure="0, 0.3, 0", layer_structure="1, 2, 1", use_dropout=True, seed=5,
                save_state=True, save_every_n_steps=2, output_name="hn")  # fmt: skip

    def run(folder: str, kill: str = "", **extra) -> int:
        return run_killable(HYPERNETWORK_CHILD, [dict(base, output_dir=str(tmp_path / folder), **extra),
                                                 str(tmp_path)], kill)

    assert run("reference") == 0
    # killed mid-step at step 3 (a state exists for step 2), then mid-step at step 5 after resuming from 2
    for kill in ("step:3", "step:4"):
        assert run("resumed", kill, resume="latest") == -9
    # resumed from the step-4 state, the last run needs 3 updates: a 4th (a fresh start) would be killed
    assert run("resumed", "step:4", resume="latest") == 0

    ours = torch.load(tmp_path / "resumed" / "hn.pt", weights_only=True)
    theirs = torch.load(tmp_path / "reference" / "hn.pt", weights_only=True)
    assert ours["step"] == theirs["step"] == 7
    for size in (k for k in theirs if isinstance(k, int)):
        for a, b in zip(ours[size], theirs[size], strict=True):
            assert a.keys() == b.keys()
            assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    first = torch.load(tmp_path / "reference" / "hn-2.pt", weights_only=True)
    size = next(k for k in theirs if isinstance(k, int))
    assert any((first[size][0][k] - theirs[size][0][k]).abs().max() > 0 for k in first[size][0])  # it trained


def test_kill_and_resume_gives_the_same_lycoris_network(tiny_model_dirs, tmp_path):
    """Exact resume holds for a second network family (LoHa with rank dropout, through the same loop)."""
    pytest.importorskip("lycoris")
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    datasets_raw = {"datasets": [{"batch_size": 2, "subsets": [
        {"image_dir": str(images), "caption_extension": ".txt", "shuffle_caption": True}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, network_dim=2, network_alpha=1.0,
                network_module="lycoris.kohya", network_args=["algo=loha", "rank_dropout=0.2", "preset=attn-mlp"],
                learning_rate=1e-2, train_batch_size=2, max_train_steps=6, optimizer_type="AdamW",
                mixed_precision="no", gradient_checkpointing=False, seed=3, save_state_every_n_steps=2,
                output_name="loha")  # fmt: skip
    assert _run(dict(base, output_dir=str(tmp_path / "reference")), datasets_raw, tmp_path) == 0
    resumed = dict(base, output_dir=str(tmp_path / "resumed"), resume="auto")
    assert _run(resumed, datasets_raw, tmp_path, "step:3") == -9  # the step-2 state exists
    # resumed from step 2, the last run needs 4 updates: a fresh start would be killed at its 5th
    assert _run(resumed, datasets_raw, tmp_path, "step:5") == 0
    ours = load_file(str(tmp_path / "resumed" / "loha.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "loha.safetensors"))
    assert ours.keys() == theirs.keys() and any(".hada_w1_a" in k for k in ours)
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) <= 1e-6


def test_kill_and_resume_gives_the_same_sdxl_lora(tiny_model_dirs, tmp_path):
    """Exact resume on SDXL: both text encoders and the U-Net trained, per-image time ids, buckets."""
    model_dir, _ = tiny_model_dirs("sdxl")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    datasets_raw = {"datasets": [{"batch_size": 2, "subsets": [
        {"image_dir": str(images), "caption_extension": ".txt", "flip_aug": True, "shuffle_caption": True}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, network_dim=2, network_alpha=1.0,
                learning_rate=1e-2, train_batch_size=2, max_train_steps=6, optimizer_type="AdamW",
                mixed_precision="no", gradient_checkpointing=False, seed=7, save_state_every_n_steps=2,
                output_name="xl")  # fmt: skip
    assert _run(dict(base, output_dir=str(tmp_path / "reference")), datasets_raw, tmp_path) == 0
    resumed = dict(base, output_dir=str(tmp_path / "resumed"), resume="auto")
    assert _run(resumed, datasets_raw, tmp_path, "step:4") == -9  # the step-2 state exists
    # resumed from step 2, the last run needs 4 updates: a fresh start would be killed at its 5th
    assert _run(resumed, datasets_raw, tmp_path, "step:5") == 0
    ours = load_file(str(tmp_path / "resumed" / "xl.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "xl.safetensors"))
    assert ours.keys() == theirs.keys()
    assert {k.split("_")[1] for k in ours} == {"unet", "te1", "te2"}
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) <= 1e-6
