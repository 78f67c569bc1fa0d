"""Upload plans for each kind of output, and model cards that parse back through huggingface_hub."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file

from nbkit.config import save_toml
from nbkit.demo import make_sample_dataset
from nbkit.export.hub import stage
from nbkit.export.plan import ExportError, build_plan, find_outputs, find_samples, sanitize
from nbkit.formats.kohya_lora import LoraTrainingInfo, build_metadata, save_kohya_lora
from nbkit.train.sample_prompts import SamplePrompt
from nbkit.train.sampling import generate_samples

PROMPTS = ("sks, a red circle on a white background", "sks, a blue square on a black background")


def write_lora(out: Path, name: str = "mylora", sd_model: str = "/content/models/my-merge.safetensors") -> Path:
    key = "lora_unet_mid_block_attentions_0_proj_in"
    state = {f"{key}.lora_down.weight": torch.ones(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2),
             f"{key}.alpha": torch.tensor(2.0)}
    meta = build_metadata(LoraTrainingInfo(
        arch="sd15", network_dim=2, network_alpha=2.0, output_name=name, steps=10, learning_rate=1e-4,
        resolution=64, num_train_images=24, sd_model_name=sd_model, seed=7, optimizer="torch.optim.AdamW",
        tag_frequency={"2_sks shapes": {"sks": 12}}, dataset_dirs={"2_sks shapes": {"n_repeats": 2, "img_count": 12}}))
    return save_kohya_lora(state, out / f"{name}.safetensors", meta, "fp16")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA run's output folder as the trainer leaves it: final file, epoch saves, a state, samples."""
    from nbkit.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("run")
    out = root / "output"
    out.mkdir()
    write_lora(out)
    write_lora(out, "mylora-000001")  # an epoch save: not published by default
    (out / "mylora-step00000010-state").mkdir()
    pipe = build_tiny_pipeline("sd15")
    prompts = [SamplePrompt(p, sample_steps=2, width=64, height=64, seed=i) for i, p in enumerate(PROMPTS)]
    old = generate_samples(pipe, prompts[:1], step=5, epoch=None, output_dir=out, output_name="mylora")
    os.utime(old[0][2], (1_000_000, 1_000_000))  # an older step's sample
    generate_samples(pipe, prompts, step=10, epoch=None, output_dir=out, output_name="mylora")
    dataset = make_sample_dataset(root / "dataset" / "2_sks shapes", size=32).parent
    run = save_toml({"pretrained_model_name_or_path": "/content/models/my-merge.safetensors", "output_dir": str(out),
                     "output_name": "mylora", "network_dim": 2, "learning_rate": 1e-4,
                     "huggingface_token": "hf_secretvalue", "wandb_api_key": "abc",
                     "datasets": [{"subsets": [{"image_dir": str(dataset / "2_sks shapes"), "num_repeats": 2}]}]},
                    root / "run.toml")
    return out, run, dataset


def test_lora_plan_card_and_staging(lora_run, tmp_path):
    out, run, dataset = lora_run
    models = find_outputs(out, "mylora")
    samples = find_samples([out / "sample"])
    plan = build_plan("alice/shapes", models, samples=samples, configs=[run], dataset=dataset, include_dataset=True,
                      secrets=["hf_secretvalue"])
    assert plan.private and plan.kind == "lora"
    assert plan.paths == ["README.md", "mylora.safetensors", "samples/mylora_000010_00_0.png",
                          "samples/mylora_000010_01_1.png", "training/run.toml", "dataset/dataset.zip"]

    # the card parses back with every metadata field, and its widget images are in the upload
    card_path = tmp_path / "README.md"
    card_path.write_bytes(plan.item("README.md").data)
    card = ModelCard.load(card_path)
    assert isinstance(card.data, ModelCardData)
    data = card.data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local base -> closest Hub id
    assert data["license"] == "creativeml-openrail-m"
    assert {"stable-diffusion", "text-to-image", "lora", "diffusers"} <= set(data["tags"])
    assert data["instance_prompt"] == "sks shapes"
    assert [(w["text"], w["output"]["url"]) for w in data["widget"]] == [
        (PROMPTS[0], "samples/mylora_000010_00_0.png"), (PROMPTS[1], "samples/mylora_000010_01_1.png")]
    assert all(w["output"]["url"] in plan.paths for w in data["widget"])
    body = card.text
    for needed in ("load_lora_weights(\"alice/shapes\", weight_name=\"mylora.safetensors\")", "<lora:mylora:0.8>",
                   "ComfyUI/models/loras", "`network_dim` | 2", "Dataset: 12 images (24 per epoch with repeats)",
                   "`my-merge.safetensors` (a local model, SD 1.x)"):
        assert needed in body
    assert "/content/" not in card.content and "hf_secretvalue" not in card.content

    # the training config: no secrets, no absolute local paths, still the run's settings
    config = plan.item("training/run.toml").data.decode()
    assert "hf_secretvalue" not in config and "wandb" not in config and "huggingface_token" not in config
    assert str(out) not in config and 'output_dir = "output"' in config and "network_dim = 2" in config

    # staged exactly as planned: same bytes, and the dataset zip is deterministic
    first, second = stage(plan, tmp_path / "a"), stage(plan, tmp_path / "b")
    staged = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert staged == sorted(plan.paths)
    original = (out / "mylora.safetensors").read_bytes()
    assert (stage(plan, first) / "mylora.safetensors").read_bytes() == original  # staging again: links replaced
    assert (out / "mylora.safetensors").read_bytes() == original  # the original is never written through a link
    assert (first / "dataset/dataset.zip").read_bytes() == (second / "dataset/dataset.zip").read_bytes()
    names = zipfile.ZipFile(first / "dataset/dataset.zip").namelist()
    assert "dataset/2_sks shapes/00_red_circle.png" in names and "dataset/2_sks shapes/00_red_circle.txt" in names


def test_overrides_and_hub_base_model(lora_run):
    out, _, _ = lora_run
    plan = build_plan("alice/x", [out / "mylora.safetensors"], private=False, base_model="someone/base-model",
                      license="mit", trigger="zzk", title="Shapes")
    card = ModelCard(plan.item("README.md").data.decode())
    assert (card.data.base_model, card.data.license, card.data.instance_prompt) == ("someone/base-model", "mit", "zzk")
    assert not plan.private and plan.paths == ["README.md", "mylora.safetensors"] and card.text.lstrip().startswith("# Shapes")
    (out.parent / "hub_named").mkdir()
    hub = write_lora(out.parent / "hub_named", "l2", sd_model="https://huggingface.co/org/base/blob/main/m.ckpt")
    card = ModelCard(build_plan("alice/y", [hub]).item("README.md").data.decode())
    assert card.data.base_model == "org/base" and "a local model" not in card.text


def test_hypernetwork_plan_and_card(tmp_path):
    from nbkit.networks.hypernetwork import create_hypernetwork_file

    pt = create_hypernetwork_file("myhn", tmp_path)
    (tmp_path / "myhn-500.pt").write_bytes(pt.read_bytes())  # a step save: left out
    assert find_outputs(tmp_path) == [pt]  # no output name: the file without an epoch/step number
    plan = build_plan("alice/hn", find_outputs(tmp_path, "myhn"))
    assert plan.kind == "hypernetwork" and plan.paths == ["README.md", "myhn.pt"]
    card = ModelCard(plan.item("README.md").data.decode())
    assert "hypernetwork" in card.data.tags and card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "models/hypernetworks" in card.text and "<hypernet:myhn:1>" in card.text
    assert "apply_hypernetwork(pipe, Hypernetwork.load(hf_hub_download(\"alice/hn\", \"myhn.pt\"))" in card.text
    assert "`layer_structure` | [1.0, 2.0, 1.0]" in card.text


def test_dreambooth_single_file_and_diffusers_folder(tmp_path):
    single = tmp_path / "db.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(single),
              metadata={"modelspec.architecture": "stable-diffusion-v2-512"})
    plan = build_plan("alice/db", [single], configs=[save_toml({"output_name": "db", "instance_prompt": "photo of sks dog",
                                                               "learning_rate": 1e-6}, tmp_path / "run.toml")])
    card = ModelCard(plan.item("README.md").data.decode())
    assert plan.kind == "dreambooth" and plan.paths == ["README.md", "db.safetensors", "training/run.toml"]
    assert (card.data.base_model, card.data.license) == ("stabilityai/stable-diffusion-2-1-base", "openrail++")
    assert card.data.instance_prompt == "photo of sks dog" and "dreambooth" in card.data.tags
    assert "from_single_file(" in card.text and "models/Stable-diffusion" in card.text

    folder = tmp_path / "db-diffusers"
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps({"file": rel}))
    plan = build_plan("alice/dbf", [folder])
    assert plan.paths == ["README.md", "model_index.json", "unet/config.json",
                          "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]
    text = ModelCard(plan.item("README.md").data.decode()).text
    assert 'StableDiffusionPipeline.from_pretrained("alice/dbf"' in text and "nbkit convert to-single-file" in text


def test_bad_inputs_name_the_file_and_fix(tmp_path, lora_run):
    out, _, _ = lora_run
    with pytest.raises(ExportError, match="USER/NAME"):
        build_plan("not a repo", [out / "mylora.safetensors"])
    (tmp_path / "notes.safetensors").write_bytes(b"garbage!garbage")
    with pytest.raises(ExportError, match=r"notes\.safetensors: cannot read it as \.safetensors"):
        build_plan("a/b", [tmp_path / "notes.safetensors"])
    with pytest.raises(ExportError, match="no 'other.*' here"):
        find_outputs(out, "other")
    edited = tmp_path / "README.md"
    edited.write_text("---\nlicense: mit\nwidget:\n- text: hi\n  output:\n    url: samples/missing.png\n---\n# x\n")
    with pytest.raises(ExportError, match=r"samples/missing\.png.*not in the upload"):
        build_plan("a/b", [out / "mylora.safetensors"], card_file=edited)
    edited.write_text("---\nlicense: mit\n---\n# edited by hand\n")
    assert build_plan("a/b", [out / "mylora.safetensors"], card_file=edited).item("README.md").data.endswith(
        b"# edited by hand\n")


def test_sanitize_nested():
    raw = {"a": {"hub_token": "x", "path": "/home/me/data/img", "rel": "data/img", "n": 3},
           "list": ["C:\\Users\\me\\x.png", "ok", "has hf_TOKENVALUE inside"], "api_key": 1}
    assert sanitize(raw, ["hf_TOKENVALUE"]) == {"a": {"path": "img", "rel": "data/img", "n": 3}, "list": ["x.png", "ok"]}


def test_project_export_finds_the_run_file_of_the_published_output(tmp_path, capsys):
    """The notebooks keep one settings file per method (run-<method>.toml): `export hub --project` reads the one
    that trained the chosen output, so the card's base model and settings are that run's."""
    from nbkit.cli import main
    from nbkit.project import Project

    project = Project.open("dogs", tmp_path)
    write_lora(project.output_dir, "doglora", sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    save_toml({"output_name": "doglora", "network_dim": 2,
               "pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
              project.run_file("lora"))
    save_toml({"output_name": "dogmodel", "pretrained_model_name_or_path": "other/base"}, project.run_file("dreambooth"))
    os.utime(project.run_file("lora"), (1_000_000, 1_000_000))  # older: picked by output_name, not by age
    assert project.run_files()[0] == project.run_file("dreambooth")
    card_dir = tmp_path / "card"
    assert main(["export", "hub", "--repo-id", "alice/dog", "--project", "dogs", "--root", str(tmp_path),
                 "--output-name", "doglora", "--dry-run", "--card-out", str(card_dir)]) == 0
    out = capsys.readouterr().out
    assert "run-lora.toml" in out and "run-dreambooth.toml" not in out
    card = ModelCard.load(card_dir / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
