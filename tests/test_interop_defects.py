"""Interop defects found by outside readers (issue 15, item 4), each checked against the reference:

- A1111 ``modules/extras.py::run_modelmerger``, add difference: a B key missing from C gives A;
- diffusers folders: the text encoder is stored with the canonical ``text_model.`` keys of the
  published SD repositories, so transformers 4 and 5 both load it strictly;
- DreamBooth: an ``is_reg`` folder with fewer than ``num_class_images`` images is filled there;
- continuing a LoRA from ``network_weights``: the metadata describes the file's ranks and alphas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nbkit.demo import make_sample_dataset

M = 0.3
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
# Key names of the text encoder in the published SD repositories (e.g. stable-diffusion-v1-5).
CANONICAL_TE_KEYS = (
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.final_layer_norm.weight",
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a shared 2-core machine a second thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- 1. add difference


def _perturbed(sd: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone() for k, v in sd.items()}


def test_add_difference_key_missing_from_c_gives_a(tiny_model_dirs, tmp_path):
    """A1111 run_modelmerger: for a B key C lacks, ``theta_1[key] = torch.zeros_like(theta_1[key])``,
    so the merged value is A + M·0 = A (also for the [:, 0:4] slice of an inpainting A)."""
    from nbkit.merge.checkpoints import merge_checkpoints

    _, single = tiny_model_dirs("sd15")
    a = load_file(str(single))
    w = a[FIRST_CONV]
    a[FIRST_CONV] = torch.cat([w, torch.randn(w.shape[0], 5, *w.shape[2:])], dim=1)  # 9-channel inpainting A
    b, c = _perturbed(load_file(str(single)), 1), _perturbed(load_file(str(single)), 2)
    missing = [k for k in c if k.startswith("model.diffusion_model.out.")] + [FIRST_CONV]
    for key in missing:
        del c[key]
    for name, sd in (("a", a), ("b", b), ("c", c)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "ad.safetensors"
    result = merge_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors",
                               out=out, method="add_difference", multiplier=M, progress=False)  # fmt: skip
    got = load_file(str(out))
    assert result.is_inpainting
    for key in missing:
        assert torch.equal(got[key], a[key]), key  # not A + M·B
    present = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(got[present], a[present] + M * (b[present] - c[present]))


# ----------------------------------------------------------------------------- 2. text encoder keys


def _te_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _te_out(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 42, 1] + [1] * 72])
    with torch.no_grad():
        return text_encoder(ids)[0]


def _check_te_folder(folder: Path, reference) -> None:
    """Canonical names only, a strict load in transformers 5, and the same outputs through diffusers."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    keys = _te_keys(folder)
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    assert set(CANONICAL_TE_KEYS) <= set(keys)
    assert set(keys) == {f"text_model.{k}" for k in reference.state_dict() if not k.endswith("position_ids")}
    te, info = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want = _te_out(reference.float())
    assert torch.equal(_te_out(te.float()), want)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert torch.equal(_te_out(pipe.text_encoder.float()), want)


def test_diffusers_folders_store_the_text_encoder_with_canonical_keys(tiny_model_dirs, tiny_pipe, tmp_path):
    from nbkit.merge.convert import to_diffusers
    from nbkit.models.tiny import build_tiny_components
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.dreambooth_save import save_dreambooth

    folder, single = tiny_model_dirs("sd15")  # nbkit make-tiny-model
    reference = build_tiny_components("sd15", seed=0)["text_encoder"]
    _check_te_folder(folder, reference)

    converted = to_diffusers(single, tmp_path / "converted")  # nbkit convert to-diffusers
    _check_te_folder(converted, reference)

    pipe = tiny_pipe("sd15")  # DreamBooth save_model_as = "diffusers" / "diffusers_safetensors"
    config = DreamBoothTrainConfig(output_dir=str(tmp_path / "db"), save_precision="float")
    info = type("Info", (), {"arch": "sd15"})()
    for fmt in ("diffusers", "diffusers_safetensors"):
        (path,) = save_dreambooth(config, fmt, pipe, info, pipe.unet, pipe.text_encoder, None, 1, 1, (fmt,))
        _check_te_folder(path, pipe.text_encoder)


def test_text_encoder_rekeying_is_pure_and_never_doubles_the_prefix():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from nbkit.formats.text_encoder_keys import canonical_text_encoder_keys

    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, projection_dim=8)  # fmt: skip
    flat = CLIPTextModel(config).state_dict()
    canonical = canonical_text_encoder_keys(flat)
    assert set(canonical) == {f"text_model.{k}" for k in flat}
    assert all(canonical[f"text_model.{k}"] is v for k, v in flat.items())
    assert canonical_text_encoder_keys(canonical) == canonical  # already canonical: unchanged
    wrapped = CLIPTextModelWithProjection(config).state_dict()  # has text_model. and text_projection
    assert "text_projection.weight" in wrapped
    assert canonical_text_encoder_keys(wrapped) == wrapped


# ----------------------------------------------------------------------------- 3. DreamBooth reg folder


def _instance_folder(root: Path) -> Path:
    folder = make_sample_dataset(root / "data" / "5_sks shape", size=64)
    for image in sorted(folder.glob("*.png"))[2:]:
        image.unlink()
        image.with_suffix(".txt").unlink()
    return folder


def _db_config(model_dir, root: Path, **overrides):
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig

    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(root / "out"), output_name="db",
                  resolution=64, num_class_images=3, class_prompt="shape", class_image_steps=1,
                  class_image_batch_size=3, max_train_steps=1, optimizer_type="AdamW", learning_rate=1e-4,
                  mixed_precision="no", gradient_checkpointing=False, save_precision="float",
                  save_diffusers=False, save_state=False, seed=3, network_module="networks.lora",
                  network_dim=2, network_alpha=1.0)  # fmt: skip
    values.update(overrides)
    return DreamBoothTrainConfig(**values)


def test_empty_or_short_reg_subset_is_where_class_images_are_generated(tiny_model_dirs, tmp_path):
    from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
    from nbkit.train.dreambooth import train_dreambooth

    model_dir, _ = tiny_model_dirs("sd15")
    instances = _instance_folder(tmp_path)
    empty, short = tmp_path / "my_reg", tmp_path / "my_other_reg"
    empty.mkdir()
    user_image = sorted(make_sample_dataset(short, size=64).glob("*.png"))[0]
    for extra in sorted(short.glob("*.png"))[1:]:  # keep one user image (and its caption)
        extra.unlink()
        extra.with_suffix(".txt").unlink()
    before = {p.name: p.read_bytes() for p in short.iterdir()}

    for reg, generated in ((empty, 3), (short, 2)):
        datasets = [DatasetSpec(resolution=(64, 64), batch_size=1, subsets=[
            SubsetSpec(image_dir=instances, caption_extension=".txt"),
            SubsetSpec(image_dir=reg, class_tokens="shape", caption_extension=".txt", is_reg=True)])]  # fmt: skip
        config = _db_config(model_dir, tmp_path, output_name=f"db_{reg.name}")
        result = train_dreambooth(config, datasets, device="cpu")
        assert result.steps == 1 and result.model_paths[0].is_file()
        images = sorted(p.name for p in reg.glob("*.png"))
        assert len(images) == 3, images
        assert len([n for n in images if n.startswith("class_")]) == generated
        assert not (tmp_path / "data" / "reg").exists()  # nothing generated elsewhere
        with safe_open(str(result.model_paths[0]), "pt") as f:
            assert f.metadata()["ss_num_reg_images"] != "0"
    assert all((short / name).read_bytes() == data for name, data in before.items())  # user files untouched
    assert user_image.name in before


def test_empty_reg_data_dir_receives_the_class_images(tmp_path):
    """kohya folders: a reg_data_dir without 'N_class' subfolders yet is where class images go."""
    from nbkit.train.class_images import check_dreambooth_data, class_image_plan
    from nbkit.train.dreambooth_data import resolve_dreambooth_datasets

    _instance_folder(tmp_path)
    (tmp_path / "reg").mkdir()
    config = _db_config("unused", tmp_path, train_data_dir=str(tmp_path / "data"), reg_data_dir=str(tmp_path / "reg"))
    datasets = check_dreambooth_data(config, resolve_dreambooth_datasets(config, None, tmp_path))
    plan = class_image_plan(config, datasets)
    assert plan.folder == tmp_path / "reg" / "1_shape" and plan.missing == 3


def test_two_short_reg_folders_ask_which_one_to_fill(tmp_path):
    """Two is_reg folders below num_class_images: the message names class_data_dir; naming one fills
    that one, and the other, still empty, is reported before any model loads."""
    from nbkit.config import ConfigError
    from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
    from nbkit.data.images import DatasetError
    from nbkit.train.class_images import check_dreambooth_data

    instances = _instance_folder(tmp_path)
    regs = [tmp_path / "reg_a", tmp_path / "reg_b"]
    for reg in regs:
        reg.mkdir()
    datasets = [DatasetSpec(resolution=(64, 64), subsets=[SubsetSpec(image_dir=instances, caption_extension=".txt")]
                            + [SubsetSpec(image_dir=r, class_tokens="shape", is_reg=True) for r in regs])]
    with pytest.raises(ConfigError, match="class_data_dir"):
        check_dreambooth_data(_db_config("unused", tmp_path), datasets)
    with pytest.raises(DatasetError, match="reg_b: no images"):
        check_dreambooth_data(_db_config("unused", tmp_path, class_data_dir=str(regs[0])), datasets)


# ----------------------------------------------------------------------------- 4. continuing a LoRA


def _lora_config(model_dir, root: Path, **overrides):
    from nbkit.train.config import LoRATrainConfig

    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(root / "out"), resolution=64,
                  learning_rate=1e-3, train_batch_size=1, max_train_steps=1, optimizer_type="AdamW",
                  mixed_precision="no", gradient_checkpointing=False, seed=0, network_train_unet_only=True)  # fmt: skip
    values.update(overrides)
    return LoRATrainConfig(**values)


def _lora_datasets(config, root: Path):
    from nbkit.train.run_file import resolve_datasets

    images = make_sample_dataset(root / "data" / "1_sks shapes", size=64)
    for image in sorted(images.glob("*.png"))[1:]:
        image.unlink()
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    return resolve_datasets(config, raw, root)


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_continuing_from_a_file_describes_the_files_ranks(tiny_model_dirs, tmp_path, capsys):
    """kohya create_network_from_weights: dim = lora_down.shape[0] and alpha from each module's
    ``.alpha``; the output's ss_network_dim/alpha and conv args must say the same."""
    from nbkit.train.lora import train_lora

    model_dir, _ = tiny_model_dirs("sd15")
    first_config = _lora_config(model_dir, tmp_path, output_name="first", network_dim=4, network_alpha=2.0,
                                conv_dim=2, conv_alpha=1.5)  # fmt: skip
    datasets = _lora_datasets(first_config, tmp_path)
    first = train_lora(first_config, datasets, device="cpu")
    config = _lora_config(model_dir, tmp_path, output_name="continued", network_dim=8,
                          network_weights=str(first.lora_path))  # network_alpha 8.0 (default), no conv_dim
    capsys.readouterr()
    second = train_lora(config, datasets, device="cpu")
    note = capsys.readouterr().out
    assert "first.safetensors" in note and "network_dim=8" in note and "rank 4" in note

    meta, tensors = _read(second.lora_path)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.5"}
    downs = {k: v for k, v in tensors.items() if k.endswith("lora_down.weight")}
    conv3 = [k for k, v in downs.items() if v.dim() == 4 and v.shape[2:] != (1, 1)]
    assert conv3 and all(downs[k].shape[0] == 2 for k in conv3)
    assert all(v.shape[0] == 4 for k, v in downs.items() if k not in conv3)
    first_meta, first_tensors = _read(first.lora_path)
    assert set(tensors) == set(first_tensors)
    assert all(torch.equal(tensors[k], first_tensors[k]) for k in tensors if k.endswith(".alpha"))
    assert meta["ss_network_dim"] == first_meta["ss_network_dim"]


def test_relative_reg_data_dir_in_a_run_file_is_beside_the_file_for_class_images(tmp_path, monkeypatch):
    """The datasets read ``reg_data_dir`` beside the run file; the class images must go there too,
    not into a folder of the same name under the current directory."""
    from types import SimpleNamespace

    from nbkit.train.class_images import check_dreambooth_data, class_image_plan
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.dreambooth_data import resolve_dreambooth_datasets
    from nbkit.train.run_file import config_from_args

    project = tmp_path / "project"
    _instance_folder(project)
    (project / "reg").mkdir()
    run = project / "run.toml"
    run.write_text('pretrained_model_name_or_path = "unused"\ntrain_data_dir = "data"\nreg_data_dir = "reg"\n'
                   'num_class_images = 3\nclass_prompt = "shape"\nresolution = 64\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config, inline, base_dir = config_from_args(SimpleNamespace(config=str(run)), DreamBoothTrainConfig)
    datasets = check_dreambooth_data(config, resolve_dreambooth_datasets(config, inline, base_dir))
    plan = class_image_plan(config, datasets)
    assert plan.folder == project / "reg" / "1_shape", plan.folder
    assert not (elsewhere / "reg").exists()
