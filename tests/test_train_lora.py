"""The vertical slice: images -> LoRA training -> a kohya file that diffusers loads identically."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from safetensors import safe_open

from nbkit.demo import make_sample_dataset
from nbkit.train.config import LoRATrainConfig
from nbkit.train.lora import train_lora
from nbkit.train.run_file import resolve_datasets


def _config(model_dir, tmp_path, **overrides) -> LoRATrainConfig:
    values = dict(
        pretrained_model_name_or_path=str(model_dir),
        output_dir=str(tmp_path / "out"),
        output_name="test_lora",
        resolution=64,
        network_dim=4,
        network_alpha=2.0,
        learning_rate=5e-3,
        train_batch_size=2,
        max_train_steps=6,
        optimizer_type="AdamW",
        mixed_precision="no",
        gradient_checkpointing=False,
        seed=0,
    )
    values.update(overrides)
    return LoRATrainConfig(**values)


def _datasets(config, tmp_path):
    images = make_sample_dataset(tmp_path / "data" / "5_sks shapes", size=64)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    return resolve_datasets(config, raw, tmp_path)


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), cond).sample


@pytest.mark.parametrize("arch", ["sd15", "sd21-v"])
def test_trained_lora_loads_identically_in_diffusers(arch, tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    model_dir, _ = tiny_model_dirs(arch)
    config = _config(model_dir, tmp_path)
    result = train_lora(config, _datasets(config, tmp_path), device="cpu")
    assert result.steps == 6 and len(result.losses) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))

    trained = result.pipeline.unet.eval()
    ours = _unet_out(trained)

    fresh = StableDiffusionPipeline.from_pretrained(str(model_dir))
    base = _unet_out(fresh.unet)
    fresh.load_lora_weights(str(result.lora_path))
    theirs = _unet_out(fresh.unet)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (base - theirs).abs().max().item() > 1e-4, "the LoRA did not change the model"

    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    # Walk every key with kohya's rules, independently of nbkit's own checker.
    stems: dict[str, set[str]] = {}
    for key in keys:
        match = re.fullmatch(r"(lora_(?:unet|te)_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        assert match, f"not a kohya key: {key}"
        stems.setdefault(match[1], set()).add(match[2])
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in stems.values())
    assert all(tensors[f"{s}.alpha"].dim() == 0 and tensors[f"{s}.alpha"].item() == 2.0 for s in stems)
    assert all(tensors[f"{s}.lora_down.weight"].shape[0] == 4 for s in stems)
    assert len([s for s in stems if s.startswith("lora_unet_")]) == 192
    # sshs_model_hash: sha256 of the bytes after the 8 + N header (kohya / additional-networks).
    raw = result.lora_path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "6"
    assert meta["ss_v2"] == str(arch != "sd15") and meta["ss_output_name"] == "test_lora"
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


def test_adamw8bit_unet_only_and_continue_training(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    config = _config(model_dir, tmp_path, optimizer_type="AdamW8bit", network_train_unet_only=True, max_train_steps=3)
    first = train_lora(config, _datasets(config, tmp_path), device="cpu")
    with safe_open(str(first.lora_path), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    # Continue from the saved file: the start point is the saved LoRA, not zeros.
    config2 = _config(model_dir, tmp_path, network_weights=str(first.lora_path), network_train_unet_only=True,
                      max_train_steps=1, learning_rate=0.0, output_name="continued")
    second = train_lora(config2, _datasets(config2, tmp_path), device="cpu")
    a = _unet_out(first.pipeline.unet.eval())
    b = _unet_out(second.pipeline.unet.eval())
    assert (a - b).abs().max().item() < 1e-5


def test_cli_train_lora_from_run_file(tiny_model_dirs, tmp_path):
    from nbkit.cli import main
    from nbkit.config import save_toml, to_dict

    _, single_file = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    (tmp_path / "dataset.toml").write_text(
        f"[general]\ncaption_extension = '.txt'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}'\nnum_repeats = 1\n"
    )
    config = _config(single_file, tmp_path, dataset_config="dataset.toml", max_train_steps=2)  # a single file
    save_toml(to_dict(config), tmp_path / "run.toml")
    assert main(["train", "lora", "--config", str(tmp_path / "run.toml"), "--output_name", "from_cli"]) == 0
    assert (tmp_path / "out" / "from_cli.safetensors").is_file()


def test_cli_reports_bad_config_clearly(tmp_path, capsys):
    from nbkit.cli import main

    (tmp_path / "run.toml").write_text("network_dims = 3\n")
    assert main(["train", "lora", "--config", str(tmp_path / "run.toml")]) == 2
    err = capsys.readouterr().err
    assert "run.toml" in err and "network_dim" in err


def test_gradient_checkpointing_still_reaches_every_lora(tiny_pipe):
    """Checkpointed blocks with frozen inputs must still backpropagate into the LoRA weights."""
    from nbkit.networks.lora import inject_lora, lora_parameters
    from nbkit.train.common import enable_te_checkpointing

    pipe = tiny_pipe("sd15")
    for model in (pipe.unet, pipe.text_encoder):
        model.requires_grad_(False)
    inject_lora(pipe.unet, pipe.text_encoder, network_dim=4, network_alpha=4)
    with torch.no_grad():  # non-zero lora_up so that lora_down gets gradient too
        for name, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.add_(0.01)
    pipe.unet.enable_gradient_checkpointing()
    enable_te_checkpointing(pipe.text_encoder)
    pipe.unet.train()
    pipe.text_encoder.train()
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), pipe.text_encoder(ids)[0]).sample
    out.pow(2).mean().backward()
    for model in (pipe.unet, pipe.text_encoder):
        params = list(lora_parameters(model))
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
