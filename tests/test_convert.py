"""Converters: diffusers <-> single file (SD1/SD2), .ckpt -> .safetensors, prune; never over an input."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.formats.checkpoint_io import read_single_file
from nbkit.merge.convert import ckpt_to_safetensors, ema_key, prune_checkpoint, to_diffusers, to_single_file
from nbkit.models.load import load_pipeline

UNET_W = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors only: on a shared 2-core machine a second thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, name).state_dict().items()
    }


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_diffusers_to_single_file_and_back(arch, tmp_path, tiny_model_dirs):
    folder, reference = tiny_model_dirs(arch)
    single = to_single_file(folder, tmp_path / "model.safetensors")
    with safe_open(str(single), "pt") as f, safe_open(str(reference), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert f.metadata()["modelspec.architecture"] == g.metadata()["modelspec.architecture"]
    back = to_diffusers(single, tmp_path / "back")
    assert (back / "model_index.json").is_file() and (back / "tokenizer" / "merges.txt").is_file()
    original, _ = load_pipeline(str(folder))
    again, info = load_pipeline(str(back))
    assert info.arch == arch
    want, got = _state(original), _state(again)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want)
    with pytest.raises(FileExistsError, match="already exists"):
        to_diffusers(single, back)
    with pytest.raises(ValueError, match="input"):
        to_single_file(folder, folder)


def test_ckpt_to_safetensors_streams_and_keeps_global_step(tmp_path, tiny_model_dirs):
    _, single = tiny_model_dirs("sd15")
    sd = load_file(str(single))
    for zipped in (True, False):
        ckpt = tmp_path / f"model-{zipped}.ckpt"
        torch.save({"state_dict": sd, "global_step": 875000, "epoch": 3}, ckpt, _use_new_zipfile_serialization=zipped)
        out = ckpt_to_safetensors(ckpt, progress=False)
        assert out == ckpt.with_suffix(".safetensors")
        got = load_file(str(out))
        assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
        meta = safe_open(str(out), "pt").metadata()
        assert meta == {"format": "pt", "global_step": "875000", "epoch": "3"}
        with pytest.raises(ValueError, match="input"):
            ckpt_to_safetensors(ckpt, ckpt)
        with pytest.raises(FileExistsError):
            ckpt_to_safetensors(ckpt)


def test_prune_drops_ema_and_training_keys_and_halves_fp32(tmp_path, tiny_model_dirs):
    _, single = tiny_model_dirs("sd15")
    sd = load_file(str(single))
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    gen = torch.Generator().manual_seed(0)
    full = dict(sd)
    full.update({ema_key(k): torch.randn(sd[k].shape, generator=gen) for k in unet_keys})
    full.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)})
    full.update({"loss.logvar": torch.zeros(1000), "optimizer.state.0.exp_avg": torch.zeros(3)})
    src = tmp_path / "full.safetensors"
    save_file(full, str(src), metadata={"format": "pt", "modelspec.title": "full"})

    result = prune_checkpoint(src, tmp_path / "pruned.safetensors", progress=False)
    got = load_file(str(result.path))
    assert set(got) == set(sd) and len(result.dropped) == len(full) - len(sd)
    for k, v in sd.items():
        want = v.half() if v.dtype == torch.float32 else v
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert safe_open(str(result.path), "pt").metadata()["modelspec.title"] == "full"
    assert result.bytes_after < result.bytes_before / 3

    used = prune_checkpoint(src, tmp_path / "ema.ckpt", ema="use", half=False, progress=False)
    got, _ = read_single_file(used.path)
    assert used.ema_used == len(unet_keys) and set(got) == set(sd)
    assert all(torch.equal(got[k], full[ema_key(k)]) for k in unet_keys)
    assert torch.equal(got["first_stage_model.encoder.conv_in.weight"], sd["first_stage_model.encoder.conv_in.weight"])

    kept = prune_checkpoint(src, tmp_path / "keep.safetensors", ema="keep", drop="first_stage_model", progress=False)
    names = set(load_file(str(kept.path)))
    assert ema_key(UNET_W) in names and not any(k.startswith(("first_stage_model", "loss", "optimizer")) for k in names)
    with pytest.raises(ValueError, match="input"):
        prune_checkpoint(src, src)
    with pytest.raises(ValueError, match="no model_ema"):
        prune_checkpoint(single, tmp_path / "x.safetensors", ema="use")


def test_cli_convert(tmp_path, tiny_model_dirs, capsys):
    from nbkit.cli import main

    _, single = tiny_model_dirs("sd15")
    ckpt = tmp_path / "m.ckpt"
    torch.save(load_file(str(single)), ckpt)
    assert main(["convert", "ckpt-to-safetensors", str(ckpt), "--quiet"]) == 0
    assert main(["convert", "prune", str(ckpt), str(tmp_path / "p.safetensors"), "--quiet"]) == 0
    assert "dropped 0" in capsys.readouterr().out
    assert main(["convert", "prune", str(ckpt), str(ckpt)]) == 2
    assert "input of the operation" in capsys.readouterr().err
