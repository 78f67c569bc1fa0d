"""Hypernetwork training on the tiny model: the loss on a fixed batch goes down, an A1111 rate
string switches the lr at the right steps, resume continues step count, schedule and optimizer,
clipping is schedulable, previews run with the hypernetwork on, and the CLI writes files A1111 loads."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from PIL import Image
from test_hypernetwork_format import a1111_check_pt

from nbkit.config import ConfigError, save_toml, to_dict
from nbkit.data.captions import CaptionState
from nbkit.data.latents import LatentCache
from nbkit.data.train_data import collect_items
from nbkit.demo import make_sample_dataset
from nbkit.formats.a1111_hypernetwork import load_optimizer_sidecar, load_saved_dict
from nbkit.networks.hypernetwork.apply import applied_hypernetworks, apply_hypernetwork, remove_hypernetwork
from nbkit.networks.hypernetwork.cli import hypernetwork_datasets
from nbkit.networks.hypernetwork.create import create_hypernetwork
from nbkit.networks.hypernetwork.module import Hypernetwork
from nbkit.train.common import diffusion_loss, encode_prompts
from nbkit.train.hooks import TrainHooks
from nbkit.train.hypernetwork import train_hypernetwork
from nbkit.train.hypernetwork_config import HypernetworkTrainConfig
from nbkit.train.hypernetwork_data import (
    TemplateCaptions,
    create_text,
    fill_filename_captions,
    folder_dataset,
    load_template,
)
from nbkit.train.noise import prepare_noise_scheduler


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster on the shared 2-core machine (no OpenMP waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("hn-data") / "imgs", size=64)


def _config(model_dir, tmp_path, images, **overrides) -> HypernetworkTrainConfig:
    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), output_name="hn",
                  resolution=64, train_batch_size=2, max_train_steps=4, learning_rate="1e-3", mixed_precision="no",
                  gradient_checkpointing=False, train_data_dir=str(images), seed=0, activation_func="relu",
                  optimizer_args=["weight_decay=0"])  # fmt: skip
    values.update(overrides)
    return HypernetworkTrainConfig(**values)


def _train(config, tmp_path, hooks=None, **kwargs):
    return train_hypernetwork(config, hypernetwork_datasets(config, {}, tmp_path), hooks=hooks, device="cpu", **kwargs)


def _fixed_batch_loss(pipe, config, datasets, hypernetwork) -> float:
    """The diffusion loss of every training image with fixed noise and timesteps, the
    hypernetwork applied (eval mode, strength 1)."""
    items, _ = collect_items(datasets, 0)
    cache = LatentCache(items, pipe.vae, "cpu")
    cache.fill()
    x0, _ = cache.batch([(i, False) for i in range(len(items))], None)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["picture"] * len(items), None, "cpu")
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(items),), generator=generator)
    apply_hypernetwork(pipe, hypernetwork.eval(), 1.0)
    with torch.no_grad():
        loss = diffusion_loss(pipe.unet, prepare_noise_scheduler("epsilon", False), x0, cond, torch.float32, config,
                              False, None, None, timesteps, noise).item()
    remove_hypernetwork(pipe, hypernetwork)
    return loss


def test_training_lowers_the_fixed_batch_loss(tiny_model_dirs, images, tmp_path):
    from nbkit.models.load import load_pipeline

    model_dir, _ = tiny_model_dirs("sd15")
    config = _config(model_dir, tmp_path, images, max_train_steps=10, train_batch_size=4, learning_rate="1e-2",
                     template_file="none.txt")  # fmt: skip
    result = _train(config, tmp_path)
    assert result.steps == 10 and len(result.losses) == 10
    pipe, _ = load_pipeline(str(model_dir))
    datasets = hypernetwork_datasets(config, {}, tmp_path)
    # What training started from: the config's structure, the model's sizes, the run's seed.
    start = create_hypernetwork("hn", replace(config.structure(), enable_sizes=[32, 64]), seed=0)
    assert result.hypernetwork.sizes == [32, 64]  # taken from the tiny UNet's attention widths
    before = _fixed_batch_loss(pipe, config, datasets, start)
    after = _fixed_batch_loss(pipe, config, datasets, Hypernetwork.load(result.hypernetwork_path))
    print(f"fixed-batch loss before {before:.4f}, after 10 steps {after:.4f}")
    assert after < before - 0.03, (before, after)  # measured: 1.1729 -> 1.0791
    a1111_check_pt(result.hypernetwork_path)
    a1111_check_pt(f"{result.hypernetwork_path}.optim")
    saved = load_saved_dict(result.hypernetwork_path)
    assert saved["step"] == 10 and saved["name"] == "hn" and saved["sd_checkpoint_name"] == model_dir.name


def test_schedule_string_and_resume_continue_step_count_and_lr(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    schedule = "1e-3:3, 5e-4:6, 1e-4"
    first = _train(_config(model_dir, tmp_path, images, learning_rate=schedule, save_every_n_steps=2), tmp_path)
    assert first.steps == 4 and first.lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])  # the lr each step used
    assert sorted(p.name for p in (tmp_path / "out").glob("*.pt*")) == ["hn-2.pt", "hn-2.pt.optim", "hn.pt",
                                                                         "hn.pt.optim"]
    # resume=latest picks hn.pt (step 4) over hn-2.pt; the step count, schedule and AdamW state continue.
    second = _train(_config(model_dir, tmp_path, images, learning_rate=schedule, max_train_steps=8, resume="latest"),
                    tmp_path)
    assert second.steps == 8 and second.lrs == pytest.approx([5e-4, 5e-4, 1e-4, 1e-4])
    assert load_saved_dict(tmp_path / "out" / "hn.pt")["step"] == 8
    _, state = load_optimizer_sidecar(tmp_path / "out" / "hn.pt")
    assert all(int(s["step"]) == 8 for s in state["state"].values())  # 4 loaded + 4 new: the state was resumed
    with pytest.raises(Exception, match="already trained for 8 steps"):
        _train(_config(model_dir, tmp_path, images, max_train_steps=8, resume=str(tmp_path / "out" / "hn.pt")),
               tmp_path)
    # A schedule that ends before max_train_steps stops training there (A1111).
    short = _train(_config(model_dir, tmp_path, images, learning_rate="1e-3:2", output_dir=str(tmp_path / "s")),
                   tmp_path)
    assert short.steps == 2


def test_clip_limit_follows_its_schedule(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    config = _config(model_dir, tmp_path, images, clip_grad_mode="value", clip_grad_value="0:2, 1e-3",
                     save_every_n_steps=2, gradient_checkpointing=True)  # the hypernetwork still gets gradients
    _train(config, tmp_path)
    start = create_hypernetwork("hn", replace(config.structure(), enable_sizes=[32, 64]), seed=0)
    at_2, at_4 = Hypernetwork.load(tmp_path / "out" / "hn-2.pt"), Hypernetwork.load(tmp_path / "out" / "hn.pt")
    # Limit 0 for steps 1-2: zero gradients, AdamW without weight decay does not move; then it trains.
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), at_2.state_dict().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(at_2.state_dict().values(), at_4.state_dict().values(), strict=True))


class _SampleProbe(TrainHooks):
    """Records, for each preview, the applied hypernetworks and the train/eval mode their
    modules ran in while the preview was generated (between on_step and on_sample)."""

    def __init__(self, pipeline):
        self.pipeline, self.modes, self.seen = pipeline, [], []

    def on_train_start(self, total_steps, info):
        hypernetwork = applied_hypernetworks(self.pipeline)[0][0]
        hypernetwork.pair(32)[0].register_forward_pre_hook(lambda module, args: self.modes.append(module.training))

    def on_step(self, step, loss, lr):
        self.modes.clear()

    def on_sample(self, step, images, prompts):
        applied = [strength for _, strength in applied_hypernetworks(self.pipeline)]
        self.seen.append((step, applied, set(self.modes), [im.size for im in images]))


def test_previews_buckets_and_a1111_data_options(tiny_model_dirs, tmp_path):
    from nbkit.models.load import load_pipeline

    model_dir, _ = tiny_model_dirs("sd15")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(64, 128), (64, 128), (128, 64), (128, 64), (96, 96), (96, 96)]):
        Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)).save(folder / f"{i:02d}-shape {i}.png")
        if i:  # the first image has no .txt: A1111 captions it by its file name minus the leading number
            (folder / f"{i:02d}-shape {i}.txt").write_text(f"tag{i}, blue, shape")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of hn --w 64 --h 64 --d 3 --s 2 --ss euler_a\n")
    config = _config(model_dir, tmp_path, folder, resolution=96, sample_prompts=str(prompts), sample_every_n_steps=2,
                     latent_sampling_method="random", shuffle_tags=True, tag_drop_out=0.2, use_dropout=True,
                     layer_structure="1, 2, 2, 1", template_file="subject_filewords.txt")  # fmt: skip
    datasets = hypernetwork_datasets(config, {}, tmp_path)
    items, _ = collect_items(datasets, 0)
    assert {it.bucket.reso for it in items} == {(64, 128), (128, 64), (64, 64)}  # one size per batch
    fill_filename_captions(items)
    assert items[0].caption == "shape 0" and items[1].caption == "tag1, blue, shape"
    pipe, info = load_pipeline(str(model_dir))
    probe = _SampleProbe(pipe)
    result = _train(config, tmp_path, hooks=probe, pipeline=pipe, model_info=info)
    assert result.steps == 4
    # Previews at steps 2 and 4 with the hypernetwork applied and in eval mode (dropout off).
    assert probe.seen == [(2, [1.0], {False}, [(64, 64)]), (4, [1.0], {False}, [(64, 64)])]
    assert len(list((tmp_path / "out" / "sample").glob("hn_*.png"))) == 2
    assert load_saved_dict(result.hypernetwork_path)["dropout_structure"] == [0.0, 0.3, 0.0, 0.0]


def test_templates_captions_and_config_errors(images, tmp_path):
    assert len(load_template("hypernetwork.txt")) == 27 and load_template("none") == ["picture"]
    custom = tmp_path / "mine.txt"
    custom.write_text("art of [name]\n\n[filewords], by [name]\n")
    assert load_template(str(custom)) == ["art of [name]", "[filewords], by [name]"]
    with pytest.raises(ConfigError, match="shipped templates"):
        load_template("nope.txt")
    rng = random.Random(0)
    assert create_text(["a photo of a [filewords]"], "red, circle ,big", "x", rng) == "a photo of a red, circle ,big"
    shuffled = create_text(["[name]: [filewords]"], "a,b,c,d,e,f", "hn", rng, shuffle_tags=True)
    assert shuffled.startswith("hn: ") and sorted(shuffled[4:].split(",")) == list("abcdef")
    dropped = [create_text(["[filewords]"], "a,b,c,d,e,f,g,h", "hn", rng, tag_drop_out=0.5) for _ in range(20)]
    assert any(len(d.split(",")) < 8 for d in dropped)
    items, _ = collect_items(folder_dataset(images, 64, 2), 0)
    fixed = TemplateCaptions(items, ["[name] [filewords]"], "hn", False, 0.0, random.Random(0))
    state = CaptionState()
    assert fixed.batch([(0, False)], random.Random(1), state) == [f"hn {items[0].caption}"]
    moving = TemplateCaptions(items, ["[filewords]"], "hn", True, 0.0, random.Random(0))
    assert moving.fixed is None
    for bad, match in (({"save_every_n_epochs": 1}, "save_every_n_steps"), ({"xformers": True}, "xformers"),
                       ({"clip_grad_mode": "norm", "max_grad_norm": 1.0}, "keep one"),
                       ({"tag_drop_out": 1.5}, "tag_drop_out")):
        config = _config("model", tmp_path, images, **bad)
        with pytest.raises(ConfigError, match=match):
            train_hypernetwork(config, [], device="cpu")


def test_cli_train_create_and_blend(tiny_model_dirs, images, tmp_path, capsys):
    from nbkit.cli import main

    _, single_file = tiny_model_dirs("sd15")  # a single-file base: sd_checkpoint is its A1111 short hash
    (tmp_path / "dataset.toml").write_text(
        f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = 64\nvalidation_split = 0.2\n"
        f"[[datasets.subsets]]\nimage_dir = '{images}'\nshuffle_caption = true\n"
    )
    config = _config(single_file, tmp_path, images, train_data_dir=None, dataset_config="dataset.toml",
                     max_train_steps=6, learning_rate=2e-3, latent_sampling_method="random")  # fmt: skip
    save_toml(to_dict(config), tmp_path / "run.toml")
    assert main(["train", "hypernetwork", "--config", str(tmp_path / "run.toml"), "--output_name", "cli_hn",
                 "--layer_structure", "1, 1.5, 1"]) == 0
    path = tmp_path / "out" / "cli_hn.pt"
    saved = load_saved_dict(path)
    assert saved["step"] == 6 and saved["layer_structure"] == [1.0, 1.5, 1.0] and len(saved["sd_checkpoint"]) == 10
    assert "validation loss at step 5" in capsys.readouterr().out  # 10 training images, batches of 2
    assert main(["hypernetwork", "create", "fresh", "--output_dir", str(tmp_path), "--enable_sizes", "32", "64",
                 "--layer_structure", "1, 1.5, 1", "--activation_func", "relu"]) == 0
    assert main(["hypernetwork", "blend", str(path), f"{tmp_path / 'fresh.pt'}:0.5", "-o",
                 str(tmp_path / "mix.pt"), "--normalize"]) == 0
    a1111_check_pt(tmp_path / "mix.pt")
    assert main(["hypernetwork", "create", "fresh", "--output_dir", str(tmp_path)]) == 2  # exists: a clear error
    assert main(["hypernetwork", "blend", str(tmp_path / "dataset.toml"), "-o", str(tmp_path / "x.pt")]) == 2


def test_config_toml_round_trip_help_and_cli_flags(tmp_path):
    import argparse
    import dataclasses

    from nbkit.config import add_dataclass_arguments, from_dict, load_toml, merge_cli

    config = HypernetworkTrainConfig(pretrained_model_name_or_path="model", learning_rate="5e-5:100, 5e-6",
                                     enable_sizes=[768, 320, 640, 1280], layer_structure="1, 2, 1",
                                     dropout_structure="0, 0.3, 0", use_dropout=True, seed=7)  # fmt: skip
    path = save_toml(to_dict(config), tmp_path / "run.toml")
    assert from_dict(HypernetworkTrainConfig, load_toml(path), str(path)) == config
    # TOML numbers and arrays as an A1111 user may write them.
    loaded = from_dict(HypernetworkTrainConfig, {"learning_rate": 1e-5, "layer_structure": [1, 2, 1]})
    assert loaded.learning_rate == "1e-05" and loaded.structure().layer_structure == "[1, 2, 1]"
    assert create_hypernetwork("x", replace(loaded.structure(), enable_sizes=[8]), seed=0).layer_structure == [1, 2, 1]
    for f in dataclasses.fields(HypernetworkTrainConfig):
        assert f.metadata.get("help") and f.metadata.get("group") in ("basic", "advanced"), f.name
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, HypernetworkTrainConfig)
    args = parser.parse_args(["--learning_rate", "1e-4:10, 1e-5", "--enable_sizes", "1024", "320",
                              "--latent_sampling_method", "deterministic"])
    merged = merge_cli(HypernetworkTrainConfig(), args)
    assert merged.learning_rate == "1e-4:10, 1e-5" and merged.enable_sizes == [1024, 320]
    with pytest.raises(ConfigError, match="latent_sampling_method"):
        from_dict(HypernetworkTrainConfig, {"latent_sampling_method": "sometimes"})
