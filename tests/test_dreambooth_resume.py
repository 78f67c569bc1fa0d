"""Exact DreamBooth resume: kill -9 mid-step and mid-save, resume, get the same weights (and EMA)."""

from __future__ import annotations

import json

from kill_harness import run_killable
from safetensors.torch import load_file

from nbkit.demo import make_sample_dataset

CHILD = """
from nbkit.train.dreambooth import train_dreambooth
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, folder_datasets

cfg = DreamBoothTrainConfig(**PAYLOAD)
train_dreambooth(cfg, folder_datasets(cfg), device="cpu")
"""


def _run(config: dict, kill: str = "") -> int:
    return run_killable(CHILD, config, kill)


def test_kill_and_resume_gives_the_same_model(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    make_sample_dataset(tmp_path / "data" / "2_sks shape", size=64)
    make_sample_dataset(tmp_path / "reg" / "1_shape", size=64)  # class images already there: prior preservation
    base = dict(pretrained_model_name_or_path=str(model_dir), train_data_dir=str(tmp_path / "data"),
                reg_data_dir=str(tmp_path / "reg"), resolution=64, train_batch_size=2, max_train_steps=6,
                learning_rate=1e-3, optimizer_type="AdamW", lr_scheduler="linear", mixed_precision="no",
                gradient_checkpointing=False, seed=5, save_state_every_n_steps=2, save_precision="float",
                train_text_encoder=True, stop_text_encoder_training=3, use_ema=True, ema_decay=0.9,
                save_ema="both", output_name="db")  # fmt: skip

    assert _run(dict(base, output_dir=str(tmp_path / "reference"))) == 0
    resumed = dict(base, output_dir=str(tmp_path / "resumed"), resume="auto")
    # Killed while writing the step-4 state (its 5th torch.save: optimizer.pt, scheduler.pt, rng.pt of
    # step 2, then optimizer.pt, scheduler.pt of step 4): the half-written folder is ignored, the resume
    # starts from step 2, mid-epoch, and crosses stop_text_encoder_training (3) again.
    assert _run(resumed, "save:5") == -9
    assert [p.name for p in (tmp_path / "resumed").glob("db-step*-state")] == ["db-step00000002-state"]
    for path in (tmp_path / "resumed").rglob("*.safetensors"):
        load_file(str(path))  # nothing truncated: every visible file loads
    assert _run(resumed) == 0

    ours = load_file(str(tmp_path / "resumed" / "db.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "db.safetensors"))
    assert ours.keys() == theirs.keys() and any(k.startswith("model_ema.") for k in ours)
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) <= 1e-6
    states = sorted((tmp_path / "resumed").glob("db-step*-state"))
    assert json.loads((states[-1] / "train_state.json").read_text())["step"] == 6
