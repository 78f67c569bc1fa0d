"""Bad input meets a message, never a traceback, and is refused while the config is read, before any
model loads (issue 15, item 5): training numbers, resolutions, inpainting base models, kohya folder
names, over-long captions and bad regular expressions."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from nbkit.cli import main
from nbkit.config import ConfigError
from nbkit.data.dataset_config import parse_dataset_config

MODEL_LOADED = "a model was loaded before the config was checked"


@pytest.fixture()
def no_model_load(monkeypatch):
    """Any attempt to load a base model fails the test: the config must be refused first."""
    import nbkit.models.load as load

    def boom(*args, **kwargs):
        raise AssertionError(MODEL_LOADED)

    monkeypatch.setattr(load, "load_pipeline", boom)


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "data" / "5_sks dog"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks dog, a photo\n", encoding="utf-8")
    return folder


def _run_file(tmp_path: Path, images: Path, options: str = "", dataset: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f"pretrained_model_name_or_path = '{tmp_path / 'no-model-needed'}'\noutput_dir = '{tmp_path / 'out'}'\n"
        f"mixed_precision = 'no'\n{options}\n[[datasets]]\n{dataset}\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
        "caption_extension = '.txt'\n"
    )
    return path


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must stop with exit 2 and a one-line ``nbkit: error:`` (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nbkit: error:") and "Traceback" not in err
    return err


# ---------------------------------------------------------------- 1. training numbers
@pytest.mark.parametrize(("flags", "names"), [
    (["--train_batch_size", "0"], ["train_batch_size"]),
    (["--network_dim", "0"], ["network_dim"]),
    (["--network_dim", "-4"], ["network_dim"]),
    (["--learning_rate", "0"], ["learning_rate"]),
    (["--learning_rate=-1e-4"], ["learning_rate", "1e-4"]),
    (["--learning_rate", "-1e-4"], ["learning_rate", "1e-4"]),  # plain argparse took -1e-4 for a flag
    (["--learning_rate", "-.5"], ["learning_rate"]),
    (["--unet_lr=-1e-4"], ["unet_lr"]),
    (["--text_encoder_lr=-5e-5"], ["text_encoder_lr"]),
    (["--max_train_steps", "0"], ["max_train_steps"]),
    (["--max_train_steps", "-10"], ["max_train_steps"]),
    (["--max_train_epochs", "0"], ["max_train_epochs"]),
    (["--gradient_accumulation_steps", "0"], ["gradient_accumulation_steps"]),
    (["--resolution", "0"], ["resolution"]),
])
def test_lora_numbers_refused_before_model_loads(flags, names, tmp_path, images, no_model_load, capsys):
    run = _run_file(tmp_path, images)
    err = _refused(["train", "lora", "--config", str(run), *flags], capsys)
    for name in names:
        assert name in err
    assert "set" in err or "use" in err  # the fix


def test_negative_learning_rate_names_option_and_fix(tmp_path, images, no_model_load, capsys):
    run = _run_file(tmp_path, images, "learning_rate = -0.0001")
    err = _refused(["train", "lora", "--config", str(run)], capsys)
    assert "run.toml" in err and "learning_rate = -0.0001" in err and "positive" in err and "1e-4" in err


def test_a_flag_may_fix_a_bad_value_in_the_file(tmp_path, images, no_model_load, capsys):
    """Flags override the file, so only the merged value is judged (the loader is reached)."""
    run = _run_file(tmp_path, images, "train_batch_size = 0")
    with pytest.raises(AssertionError, match=MODEL_LOADED):
        main(["train", "lora", "--config", str(run), "--train_batch_size", "2"])


def test_zero_batch_size_in_dataset_toml_refused(tmp_path, images, no_model_load, capsys):
    (tmp_path / "dataset.toml").write_text(
        f"[[datasets]]\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = '{images}'\ncaption_extension = '.txt'\n"
    )
    run = tmp_path / "run.toml"
    run.write_text("pretrained_model_name_or_path = 'x'\ndataset_config = 'dataset.toml'\n")
    err = _refused(["train", "lora", "--config", str(run)], capsys)
    assert "dataset.toml" in err and "batch_size = 0" in err and "[[datasets]] #1" in err


def test_zero_part_learning_rate_means_do_not_train_that_part_as_kohya(tmp_path, images):
    """kohya networks/lora.py::prepare_optimizer_params skips a part whose lr is 0 ("NO LR skipping!")."""
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.run_file import load_run_config

    with pytest.warns(UserWarning, match="text_encoder_lr = 0.*network_train_unet_only"):
        config = load_run_config(_run_file(tmp_path, images, "text_encoder_lr = 0"), LoRATrainConfig)[0]
    assert config.network_train_unet_only and not config.train_text_encoder
    with pytest.warns(UserWarning, match="unet_lr = 0.*network_train_text_encoder_only"):
        config = load_run_config(_run_file(tmp_path, images, "unet_lr = 0.0"), LoRATrainConfig)[0]
    assert config.network_train_text_encoder_only and not config.train_unet
    with pytest.raises(ConfigError, match="nothing to train"):
        load_run_config(_run_file(tmp_path, images, "unet_lr = 0.0\ntext_encoder_lr = 0.0"), LoRATrainConfig)


@pytest.mark.parametrize(("options", "name"), [
    ("train_batch_size = 0", "train_batch_size"),
    ("learning_rate = -1e-6", "learning_rate"),
    ("learning_rate_te = -1e-6\ntrain_text_encoder = true", "learning_rate_te"),
    ("max_train_steps = 0", "max_train_steps"),
    ("network_module = 'networks.lora'\nnetwork_dim = 0\nlearning_rate = 1e-4", "network_dim"),
])
def test_dreambooth_numbers_refused_before_model_loads(options, name, tmp_path, images, no_model_load, capsys):
    run = _run_file(tmp_path, images, options)
    err = _refused(["train", "dreambooth", "--config", str(run)], capsys)
    assert name in err


@pytest.mark.parametrize(("options", "name"), [
    ("train_batch_size = 0", "train_batch_size"),
    ("learning_rate = '-1e-5'", "learning_rate"),
    ("learning_rate = '5e-5:100, -5e-6'", "learning_rate"),
    ("max_train_steps = 0", "max_train_steps"),
])
def test_hypernetwork_numbers_refused_before_model_loads(options, name, tmp_path, images, no_model_load, capsys):
    run = _run_file(tmp_path, images, options)
    err = _refused(["train", "hypernetwork", "--config", str(run)], capsys)
    assert name in err


def _dataset(body: str, images: Path) -> dict:
    import tomllib

    return tomllib.loads(f"[[datasets]]\n{body}\n[[datasets.subsets]]\nimage_dir = '{images}'\n")


def test_resolution_off_the_bucket_grid_is_rounded_with_a_note(images):
    """Without buckets the single bucket is floored to bucket_reso_steps, as kohya floors its buckets
    (model_util.py::make_bucket_resolutions, BucketManager.round_to_steps)."""
    with pytest.warns(UserWarning, match="resolution 500x500 is not a multiple of bucket_reso_steps 64.*448x448"):
        (spec,) = parse_dataset_config(_dataset("resolution = 500", images))
    assert spec.resolution == (448, 448)
    with pytest.warns(UserWarning, match="768x448"):
        (spec,) = parse_dataset_config(_dataset("resolution = [800, 500]", images))
    assert spec.resolution == (768, 448)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_dataset_config(_dataset("resolution = 512", images))[0].resolution == (512, 512)


def test_bucketed_resolution_off_grid_keeps_kohyas_buckets(images):
    from nbkit.data.buckets import make_bucket_resolutions

    with pytest.warns(UserWarning, match="largest square bucket is 448x448"):
        (spec,) = parse_dataset_config(_dataset("resolution = 500\nenable_bucket = true", images))
    assert spec.resolution == (500, 500)  # kohya derives the buckets from this area: keep it
    assert (448, 448) in make_bucket_resolutions(spec.resolution)


def test_bucket_limits_adjusted_as_kohya(images):
    """train_util.py::BaseDataset.adjust_min_max_bucket_reso_by_steps: min down, max up, with a warning."""
    with pytest.warns(UserWarning, match="min_bucket_reso 300 -> 256.*max_bucket_reso 1000 -> 1024"):
        (spec,) = parse_dataset_config(
            _dataset("enable_bucket = true\nmin_bucket_reso = 300\nmax_bucket_reso = 1000", images))
    assert (spec.min_bucket_reso, spec.max_bucket_reso) == (256, 1024)


@pytest.mark.parametrize(("body", "text"), [
    ("resolution = 32", "resolution 32x32 is smaller than bucket_reso_steps 64"),
    ("bucket_reso_steps = 0\nenable_bucket = true", "bucket_reso_steps = 0"),
    ("bucket_reso_steps = 32\nenable_bucket = true", "bucket_reso_steps = 32"),
    ("enable_bucket = true\nmax_bucket_reso = 384", "max_bucket_reso 384 is below the resolution 512"),
    ("enable_bucket = true\nresolution = 256\nmin_bucket_reso = 320", "min_bucket_reso 320 is above"),
    ("batch_size = -1", "batch_size = -1"),
])
def test_bad_dataset_numbers_refused(body, text, images):
    with pytest.raises(ConfigError, match=text):
        parse_dataset_config(_dataset(body, images), "dataset.toml")


# ---------------------------------------------------------------- 2. inpainting base models
def _inpainting_folder(tiny_model_dirs, tmp_path) -> Path:
    from diffusers import UNet2DConditionModel

    model_dir, _ = tiny_model_dirs("sd15")
    folder = tmp_path / "tiny-inpainting"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(folder / "unet")
    return folder


def _inpainting_single_file(tiny_model_dirs, tmp_path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, single_file = tiny_model_dirs("sd15")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    with safe_open(str(single_file), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    w = tensors[key]
    tensors[key] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], dim=1)  # 4 latent + 4 masked + 1 mask
    out = tmp_path / "tiny-inpainting.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.fixture()
def no_pipeline_build(monkeypatch):
    from diffusers import StableDiffusionPipeline

    def boom(*args, **kwargs):
        raise AssertionError("the pipeline was built before the inpainting check")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", boom)
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", boom)


@pytest.mark.parametrize("kind", ["folder", "single_file"])
def test_inpainting_model_is_refused_before_the_pipeline_is_built(kind, tiny_model_dirs, tmp_path, no_pipeline_build):
    from nbkit.models.load import load_pipeline

    make = _inpainting_folder if kind == "folder" else _inpainting_single_file
    path = make(tiny_model_dirs, tmp_path)
    with pytest.raises(ConfigError, match=r"inpainting model \(9 input channels.*use the base model"):
        load_pipeline(str(path))


def test_train_lora_on_inpainting_model_is_a_message(tiny_model_dirs, tmp_path, images, capsys):
    path = _inpainting_single_file(tiny_model_dirs, tmp_path)
    run = _run_file(tmp_path, images, "max_train_steps = 1\nresolution = 64\noptimizer_type = 'AdamW'")
    err = _refused(["train", "lora", "--config", str(run), "--pretrained_model_name_or_path", str(path)], capsys)
    assert "inpainting" in err and "tiny-inpainting.safetensors" in err


def test_missing_base_model_is_a_message(tmp_path, images, capsys):
    run = _run_file(tmp_path, images, "max_train_steps = 1\nresolution = 64\noptimizer_type = 'AdamW'")
    err = _refused(["train", "lora", "--config", str(run)], capsys)
    assert "no-model-needed: not a local file or folder" in err


# ---------------------------------------------------------------- 3. kohya folder names
def _train_data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    for name in ("10_sks dog", "0_x", "abc_x"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), "red").save(root / name / "a.png")
        (root / name / "a.txt").write_text("sks dog\n", encoding="utf-8")
    return root


def test_kohya_subfolders_skip_zero_and_non_numeric_names_with_a_warning(tmp_path):
    """config_util.py::generate_dreambooth_subsets_config_by_subdirs: 'ignore directory without repeats'
    for abc_x, and num_repeats < 1 (0_x) skipped; neither is read as 1 repeat."""
    from nbkit.data.dataset_config import kohya_subdir_subsets

    root = _train_data_dir(tmp_path)
    with pytest.warns(UserWarning) as caught:
        subsets = kohya_subdir_subsets(root, is_reg=False)
    assert [(s.image_dir.name, s.num_repeats, s.class_tokens) for s in subsets] == [("10_sks dog", 10, "sks dog")]
    text = " ".join(str(w.message) for w in caught)
    assert "abc_x" in text and "without repeats" in text and "0_x" in text and "0 repeats" in text


def test_dreambooth_train_data_dir_warns_and_skips_zero_and_non_numeric_folders(tmp_path):
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig, folder_datasets

    root = _train_data_dir(tmp_path)
    config = DreamBoothTrainConfig(pretrained_model_name_or_path="x", train_data_dir=str(root))
    with pytest.warns(UserWarning) as caught:
        (dataset,) = folder_datasets(config)
    assert [(s.image_dir.name, s.num_repeats) for s in dataset.subsets] == [("10_sks dog", 10)]
    text = " ".join(str(w.message) for w in caught)
    assert "abc_x" in text and "0_x" in text


def test_dataset_check_reads_a_train_data_dir_as_kohya_does(tmp_path, capsys):
    from nbkit.data.check import check_dataset

    root = _train_data_dir(tmp_path)
    report = check_dataset(root, progress=False)
    assert [(s.subset.image_dir.name, s.subset.num_repeats) for s in report.subsets] == [("10_sks dog", 10)]
    skipped = {p.path.name: p for p in report.problems if p.kind == "ignored-folder"}
    assert set(skipped) == {"0_x", "abc_x"} and all(p.severity == "warning" for p in skipped.values())
    assert main(["dataset", "check", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "abc_x" in out and "0_x" in out and "10 steps" in out


# ---------------------------------------------------------------- 4. captions over max_token_length
def test_dataset_check_reports_captions_longer_than_max_token_length(tmp_path, capsys):
    from nbkit.data.check import check_dataset

    folder = tmp_path / "5_long"
    folder.mkdir()
    long_caption = ", ".join(f"tag{i}" for i in range(50))  # 189 CLIP tokens
    for name, caption in (("long", long_caption), ("short", "sks dog, a photo")):
        Image.new("RGB", (64, 64), "blue").save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    report = check_dataset(folder, progress=False)
    (problem,) = [p for p in report.problems if p.kind == "caption-too-long"]
    assert problem.path.name == "long.txt" and problem.severity == "warning"
    from nbkit.data.caption_checks import count_tokens

    n = count_tokens(long_caption)
    assert 150 < n <= 225
    assert f"{n} tokens" in problem.what and f"{n - 75} are cut" in problem.what
    assert "max_token_length = 150" in problem.fix
    report = check_dataset(folder, progress=False, max_token_length=225)
    assert [p for p in report.problems if p.kind == "caption-too-long"] == []
    assert main(["dataset", "check", str(folder), "--quiet", "--max_token_length", "150"]) == 0
    out = capsys.readouterr().out
    assert "long.txt" in out and f"{n - 150} are cut" in out and "short.txt" not in out


def test_token_count_is_clips():
    from nbkit.data.caption_checks import count_tokens

    assert count_tokens("a photo of sks dog, masterpiece, best quality") == 10  # CLIP ViT-L/14's tokenizer


# ---------------------------------------------------------------- 5. regular expressions in captions sub
@pytest.fixture()
def captions(tmp_path) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("long_hair, smile (happy)\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(("argv", "words"), [
    (["(", "x"], ["pattern", "'('", "escape", "--literal"]),
    (["_", r"\g<name>"], ["replacement", "escape", "--literal"]),
    (["_", r"\1"], ["replacement", "group"]),
])
def test_captions_sub_bad_regex_names_the_argument_and_fix(argv, words, captions, capsys):
    before = (captions / "a.txt").read_bytes()
    err = _refused(["captions", "sub", str(captions), *argv], capsys)
    for word in words:
        assert word in err
    assert (captions / "a.txt").read_bytes() == before


def test_captions_sub_literal_replaces_plain_text(captions, capsys):
    assert main(["captions", "sub", str(captions), "(happy)", "[glad]", "--literal"]) == 0
    assert (captions / "a.txt").read_text(encoding="utf-8") == "long_hair, smile [glad]\n"


def test_captions_remove_bad_regex_names_the_option(captions, capsys):
    err = _refused(["captions", "remove", str(captions), "--regex", "*hair"], capsys)
    assert "--regex '*hair'" in err and "--glob" in err


def test_folder_dataset_resolution_refused_before_model_loads(tmp_path, images, no_model_load, capsys):
    """train_data_dir folders are built from the run's resolution, not from a dataset TOML."""
    run = tmp_path / "run.toml"
    run.write_text(f"pretrained_model_name_or_path = 'x'\ntrain_data_dir = '{images.parent}'\nresolution = 500\n")
    err = _refused(["train", "dreambooth", "--config", str(run)], capsys)
    assert "resolution = 500" in err and "multiple of 64" in err and "448 or 512" in err
    run.write_text(f"pretrained_model_name_or_path = 'x'\ntrain_data_dir = '{images}'\nresolution = 32\n")
    err = _refused(["train", "hypernetwork", "--config", str(run)], capsys)
    assert "resolution = 32" in err
