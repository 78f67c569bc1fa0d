"""Checkpoint merger (A1111 rules) and the streaming safetensors writer, on tiny single files."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.merge.a1111 import CHECKPOINT_DICT_SKIP_ON_MERGE, parse_a1111_metadata
from nbkit.merge.arch import ArchitectureMismatchError
from nbkit.merge.checkpoints import merge_checkpoints
from nbkit.merge.streaming import StreamingSafetensorsWriter, TensorSpec, stream_safetensors

POS_IDS = CHECKPOINT_DICT_SKIP_ON_MERGE[0]
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
M = 0.3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors only: on a shared 2-core machine a second thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturbed(sd: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tmp_path_factory):
    """A (with extra pass-through keys), B and C (C lacks some keys) as tiny SD1.5 single files."""
    root = tmp_path_factory.mktemp("merge")
    _, single = tiny_model_dirs("sd15")
    a = load_file(str(single))
    a["alphas_cumprod"] = torch.linspace(1, 0, 10)  # no 'model' in the name: always A's
    a["model_ema.decay"] = torch.tensor(0.9999)
    a["model_ema.diffusion_modelout2bias"] = torch.randn(4)  # 'model' key only A has
    b, c = _perturbed(a, 1), _perturbed(a, 2)
    del b["model_ema.diffusion_modelout2bias"]
    b["alphas_cumprod"] = torch.zeros(10)
    missing_in_c = [k for k in c if k.startswith("model.diffusion_model.out.")]
    for k in missing_in_c:
        del c[k]
    for name, sd in (("a", a), ("b", b), ("c", c)):
        save_file(sd, str(root / f"{name}.safetensors"), metadata={"format": "pt", "modelspec.title": name})
    return dict(root=root, a=a, b=b, c=c, missing_in_c=missing_in_c)


def _merged_keys(a: dict, b: dict) -> list[str]:
    return [k for k in a if "model" in k and k in b and k != POS_IDS]


def test_weighted_sum_and_add_difference_follow_the_formulas(models):
    a, b, c = models["a"], models["b"], models["c"]
    out = models["root"] / "ws.safetensors"
    result = merge_checkpoints(_p(models, "a"), _p(models, "b"), out=out, multiplier=M, progress=False)
    got = load_file(str(out))
    assert set(got) == set(a)
    merged = _merged_keys(a, b)
    assert result.merged == len(merged) and result.passed_through == len(a) - len(merged)
    for k in a:
        want = ((1 - M) * a[k]) + (M * b[k]) if k in merged else a[k]
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    assert torch.equal(got[POS_IDS], a[POS_IDS]) and torch.equal(got["alphas_cumprod"], a["alphas_cumprod"])

    out = models["root"] / "ad.safetensors"
    merge_checkpoints(_p(models, "a"), _p(models, "b"), _p(models, "c"), out=out, method="add_difference",
                      multiplier=M, progress=False)  # fmt: skip
    got = load_file(str(out))
    for k in a:
        if k in merged:
            want = a[k] + M * ((b[k] - c[k]) if k in c else torch.zeros_like(b[k]))
        else:
            want = a[k]
        assert torch.equal(got[k], want), k
    for k in models["missing_in_c"]:  # A1111 run_modelmerger: B − C is zeros when C lacks the key, so A
        assert torch.equal(got[k], a[k])


def _p(models: dict, name: str) -> Path:
    return models["root"] / f"{name}.safetensors"


def test_inpainting_and_pix2pix_first_conv(models, tmp_path):
    a, b = dict(models["a"]), models["b"]
    for channels, kind in ((9, "inpainting"), (8, "instruct-pix2pix")):
        w = a[FIRST_CONV]
        a[FIRST_CONV] = torch.cat([w, torch.randn(w.shape[0], channels - 4, *w.shape[2:])], dim=1)
        path = tmp_path / f"a{channels}.safetensors"
        save_file(a, str(path))
        out = tmp_path / f"m{channels}.safetensors"
        result = merge_checkpoints(path, _p(models, "b"), out=out, multiplier=M, progress=False)
        got = load_file(str(out))[FIRST_CONV]
        assert got.shape == a[FIRST_CONV].shape
        assert torch.equal(got[:, :4], (1 - M) * a[FIRST_CONV][:, :4] + M * b[FIRST_CONV])
        assert torch.equal(got[:, 4:], a[FIRST_CONV][:, 4:])
        assert (result.is_inpainting, result.is_instruct_pix2pix) == (kind == "inpainting", kind != "inpainting")
        recipe = json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])
        assert recipe["is_inpainting"] == (kind == "inpainting")
        with pytest.raises(ArchitectureMismatchError, match=f"A must be the {kind} model"):
            merge_checkpoints(_p(models, "b"), path, out=tmp_path / "rev.safetensors", progress=False)
        a[FIRST_CONV] = w
    assert not (tmp_path / "rev.safetensors").exists()


def test_embedded_config_is_always_as(models, tmp_path):
    """Copied metadata lets B's fields win (A1111), but nbkit's embedded config must describe A's shapes."""
    a, b = dict(models["a"]), models["b"]
    save_file(a, str(tmp_path / "a.safetensors"), metadata={"nbkit.diffusers_config": "A", "x": "a"})
    save_file(b, str(tmp_path / "b.safetensors"), metadata={"nbkit.diffusers_config": "B", "x": "b"})
    merge_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors", out=tmp_path / "ab", progress=False)
    meta = safe_open(str(tmp_path / "ab.safetensors"), "pt").metadata()
    assert meta["nbkit.diffusers_config"] == "A" and meta["x"] == "b"
    w = a[FIRST_CONV]
    a[FIRST_CONV] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], dim=1)
    save_file(a, str(tmp_path / "a9.safetensors"))
    merge_checkpoints(
        tmp_path / "a9.safetensors", tmp_path / "b.safetensors", out=tmp_path / "m.safetensors", progress=False
    )
    assert "nbkit.diffusers_config" not in safe_open(str(tmp_path / "m.safetensors"), "pt").metadata()


def test_save_as_half_touches_only_fp32(models, tmp_path):
    a = dict(models["a"])
    a["model.diffusion_model.out.2.bias"] = a["model.diffusion_model.out.2.bias"].half()  # fp16 A, fp32 B
    a["model.diffusion_model.out.0.bias"] = a["model.diffusion_model.out.0.bias"].bfloat16()
    path = tmp_path / "mixed.safetensors"
    save_file(a, str(path))
    out = tmp_path / "half.safetensors"
    merge_checkpoints(path, _p(models, "b"), out=out, save_as_half=True, progress=False)
    got, merged = load_file(str(out)), set(_merged_keys(a, models["b"]))
    for k, v in got.items():
        if k in merged:  # merged -> fp32 (A1111's type promotion) -> fp16
            assert v.dtype == torch.float16, k
        else:
            assert v.dtype == a[k].dtype and torch.equal(v, a[k]), k
    out = tmp_path / "half-noint.safetensors"
    merge_checkpoints(path, out=out, method="no_interpolation", save_as_half=True, progress=False)
    got = load_file(str(out))
    for k, v in got.items():
        want = a[k].half() if a[k].dtype == torch.float32 else a[k]
        assert v.dtype == want.dtype and torch.equal(v, want), k


def test_discard_bake_vae_and_ckpt_output(models, tmp_path, tiny_model_dirs):
    a = models["a"]
    vae = {
        k.removeprefix("first_stage_model."): torch.randn(v.shape)
        for k, v in a.items()
        if k.startswith("first_stage_model.")
    }
    vae["loss.logvar"] = torch.zeros(())
    (tmp_path / "vae").mkdir()
    bare, prefixed = tmp_path / "vae" / "bare.safetensors", tmp_path / "vae" / "prefixed.ckpt"
    save_file(vae, str(bare))
    torch.save({"state_dict": {f"first_stage_model.{k}": v for k, v in vae.items()}}, prefixed)
    for vae_file in (bare, prefixed):
        out = tmp_path / f"baked-{vae_file.suffix[1:]}.safetensors"
        result = merge_checkpoints(_p(models, "a"), out=out, method="no_interpolation", discard="model_ema",
                                   bake_in_vae=vae_file, progress=False)  # fmt: skip
        got = load_file(str(out))
        assert not any(k.startswith("model_ema") for k in got) and "alphas_cumprod" in got
        assert result.vae_keys == len(vae) - 1
        assert all(torch.equal(got[f"first_stage_model.{k}"], v) for k, v in vae.items() if k != "loss.logvar")
        assert json.loads(safe_open(str(out), "pt").metadata()["sd_merge_recipe"])["bake_in_vae"] == vae_file.name
    folder, _ = tiny_model_dirs("sd15")  # a diffusers VAE folder is converted to LDM names
    out = tmp_path / "baked-folder.ckpt"
    merge_checkpoints(_p(models, "b"), out=out, method="no_interpolation", bake_in_vae=folder / "vae", progress=False)
    assert not zipfile.is_zipfile(out)  # legacy torch format: A1111's unpickler accepts it
    got = torch.load(out, weights_only=True)
    original = load_file(str(tiny_model_dirs("sd15")[1]))
    assert all(torch.equal(got[k], original[k]) for k in original if k.startswith("first_stage_model."))
    assert torch.equal(got[FIRST_CONV], models["b"][FIRST_CONV])


def test_metadata_is_what_a1111_writes(models, tmp_path):
    a_path, b_path, c_path = _p(models, "a"), _p(models, "b"), _p(models, "c")
    out = tmp_path / "ad.safetensors"
    merge_checkpoints(a_path, b_path, c_path, out=out, method="add_difference", multiplier=0.5, discard="model_ema",
                      metadata={"note": "hi"}, progress=False)  # fmt: skip
    meta = safe_open(str(out), "pt").metadata()
    assert meta["format"] == "pt" and meta["note"] == "hi" and meta["modelspec.title"] == "c"  # copied A, B, C
    recipe = json.loads(meta["sd_merge_recipe"])
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in (("a", a_path), ("b", b_path), ("c", c_path))}
    assert list(recipe.items()) == [
        ("type", "webui"), ("primary_model_hash", sha["a"]), ("secondary_model_hash", sha["b"]),
        ("tertiary_model_hash", sha["c"]), ("interp_method", "Add difference"), ("multiplier", 0.5),
        ("save_as_half", False), ("custom_name", "ad"), ("config_source", 0), ("bake_in_vae", "None"),
        ("discard_weights", "model_ema"), ("is_inpainting", False), ("is_instruct_pix2pix", False),
    ]  # fmt: skip
    models_meta = json.loads(meta["sd_merge_models"])
    legacy = hashlib.sha256(a_path.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert models_meta[sha["a"]] == {"name": "a.safetensors", "legacy_hash": legacy, "sd_merge_recipe": None}
    assert list(models_meta) == [sha["a"], sha["b"], sha["c"]]
    # merging the result again accumulates sd_merge_models and nests its recipe as JSON
    again = tmp_path / "again.safetensors"
    merge_checkpoints(out, a_path, out=again, progress=False)
    parsed = parse_a1111_metadata(safe_open(str(again), "pt").metadata())
    out_sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert list(parsed["sd_merge_models"]) == [out_sha, sha["a"], sha["b"], sha["c"]]
    assert parsed["sd_merge_models"][out_sha]["sd_merge_recipe"] == recipe
    assert parsed["sd_merge_recipe"]["interp_method"] == "Weighted sum"


def test_architecture_mismatch_is_reported_before_writing(models, tmp_path, tiny_model_dirs):
    _, sd21 = tiny_model_dirs("sd21")
    out = tmp_path / "x.safetensors"
    with pytest.raises(ArchitectureMismatchError, match=r"SD1\.x .*SD2\.x.*First mismatching keys: model\.diffusion"):
        merge_checkpoints(_p(models, "a"), sd21, out=out, progress=False)
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, str(lora)
    )
    with pytest.raises(ArchitectureMismatchError, match="LoRA.*lora-into"):
        merge_checkpoints(_p(models, "a"), lora, out=out, progress=False)
    with pytest.raises(ValueError, match="input"):
        merge_checkpoints(_p(models, "a"), _p(models, "b"), out=_p(models, "a"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_diffusers_folder_and_ckpt_inputs_give_the_same_merge(models, tmp_path, tiny_model_dirs):
    folder, single = tiny_model_dirs("sd15")
    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": models["b"], "global_step": 5}, ckpt)
    (tmp_path / "b.yaml").write_text("model: {}\n")
    ref, got = tmp_path / "ref.safetensors", tmp_path / "got.safetensors"
    merge_checkpoints(single, _p(models, "b"), out=ref, progress=False)
    result = merge_checkpoints(folder, ckpt, out=got, progress=False)
    assert result.config_copied_from == tmp_path / "b.yaml" and (tmp_path / "got.yaml").is_file()
    ref_sd, got_sd = load_file(str(ref)), load_file(str(got))
    assert set(ref_sd) == set(got_sd) and all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    recipe = json.loads(safe_open(str(got), "pt").metadata()["sd_merge_recipe"])
    assert recipe["primary_model_hash"] is None and recipe["secondary_model_hash"]


def test_cli(models, tmp_path, capsys):
    from nbkit.cli import main

    out = tmp_path / "cli.safetensors"
    args = ["merge", "checkpoints", "--a", str(_p(models, "a")), "--b", str(_p(models, "b")), "--out", str(out)]
    assert main([*args, "--multiplier", "0.5", "--save-as-half", "--quiet"]) == 0
    assert "keys merged" in capsys.readouterr().out and out.is_file()
    assert main([*args[:-1], str(tmp_path / "y.safetensors"), "--method", "add_difference"]) == 2
    assert "needs a model C" in capsys.readouterr().err


# ----------------------------------------------------------------------------- streaming writer


def test_streamed_file_is_byte_identical_to_save_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=gen), "a.bias": torch.randn(7, generator=gen).half(),
        "ids": torch.arange(77).unsqueeze(0), "scalar": torch.tensor(2.5), "bf": torch.randn(4, generator=gen).bfloat16(),
        "empty": torch.zeros(0), "mask": torch.tensor([True, False, True]), "u8": torch.arange(3, dtype=torch.uint8),
    }  # fmt: skip
    for meta in (None, {"format": "pt"}):
        ref, got = tmp_path / "ref.safetensors", tmp_path / "got.safetensors"
        save_file(tensors, str(ref), metadata=meta)
        specs = {k: TensorSpec.of(v) for k, v in tensors.items()}
        stream_safetensors(got, specs, tensors.__getitem__, meta, progress=False)
        assert got.read_bytes() == ref.read_bytes()
        loaded = load_file(str(got))
        assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
        with safe_open(str(got), "pt") as f:
            assert f.metadata() == meta and torch.equal(f.get_slice("b.weight")[1:2], tensors["b.weight"][1:2])
        got.unlink()


def test_streaming_writer_is_atomic_and_strict(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (2,)), "b": TensorSpec(torch.float32, (3,))}
    target = tmp_path / "out.safetensors"

    def failing(key: str) -> torch.Tensor:
        if key == "b":
            raise RuntimeError("disk full")
        return torch.zeros(2)

    with pytest.raises(RuntimeError, match="disk full"):
        stream_safetensors(target, specs, failing, progress=False)
    with pytest.raises(ValueError, match="header promised"):
        stream_safetensors(target, specs, lambda k: torch.zeros(2, dtype=torch.float16), progress=False)
    with pytest.raises(RuntimeError, match="never written"), StreamingSafetensorsWriter(target, specs) as w:
        w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []
