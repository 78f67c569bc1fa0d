"""Every option family of the LoRA trainer changes what the loop does (tiny models, CPU)."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from nbkit.config import ConfigError
from nbkit.demo import make_sample_dataset
from nbkit.train.config import LoRATrainConfig
from nbkit.train.hooks import TrainHooks
from nbkit.train.lora import train_lora
from nbkit.train.run_file import resolve_datasets


class Record(TrainHooks):
    def __init__(self):
        self.lrs, self.losses, self.samples = [], [], []

    def on_step(self, step, loss, lr):
        self.lrs.append(lr)
        self.losses.append(loss)

    def on_sample(self, step, images, prompts):
        self.samples.append((step, [im.size for im in images], prompts))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("opts") / "imgs", size=64)


def _train(model_dir, out, images, hooks=None, subset=None, **overrides):
    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), resolution=64, network_dim=2,
                  network_alpha=2.0, learning_rate=1e-3, train_batch_size=2, max_train_steps=1, optimizer_type="AdamW",
                  mixed_precision="no", gradient_checkpointing=False, seed=3, save_state=False)  # fmt: skip
    values.update(overrides)
    config = LoRATrainConfig(**values)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt", **(subset or {})}]}]}
    return train_lora(config, resolve_datasets(config, raw, out), hooks=hooks, device="cpu")


@pytest.fixture(scope="module")
def baseline(tiny_model_dirs, images, tmp_path_factory):
    model_dir, _ = tiny_model_dirs("sd15")
    return _train(model_dir, tmp_path_factory.mktemp("base"), images).losses[0]


@pytest.mark.parametrize(
    "options",
    [
        {"noise_offset": 0.1},
        {"multires_noise_iterations": 6},
        {"ip_noise_gamma": 0.1},
        {"min_snr_gamma": 5.0},
        {"debiased_estimation_loss": True},
        {"loss_type": "huber"},
        {"loss_type": "l1"},
        {"min_timestep": 900, "max_timestep": 1000},
        {"clip_skip": 2},
        {"max_token_length": 225},
        {"network_dropout": 0.5, "rank_dropout": 0.5},
    ],
    ids=lambda o: ",".join(o),
)
def test_option_changes_the_loss(options, tiny_model_dirs, images, tmp_path, baseline):
    model_dir, _ = tiny_model_dirs("sd15")
    loss = _train(model_dir, tmp_path, images, **options).losses[0]
    assert abs(loss - baseline) > 1e-6, f"{options} had no effect"


def test_v_prediction_options(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd21-v")
    base = _train(model_dir, tmp_path / "a", images).losses[0]
    for options in ({"zero_terminal_snr": True}, {"scale_v_pred_loss_like_noise_pred": True},
                    {"min_snr_gamma": 5.0}):  # fmt: skip
        assert abs(_train(model_dir, tmp_path / "b", images, **options).losses[0] - base) > 1e-6, options


def test_weighted_captions_change_the_loss(tiny_model_dirs, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    folder = make_sample_dataset(tmp_path / "w", size=64)
    for caption in folder.glob("*.txt"):
        caption.write_text(caption.read_text().replace("sks", "(sks:1.8)"))
    plain = _train(model_dir, tmp_path / "a", folder).losses[0]
    weighted = _train(model_dir, tmp_path / "b", folder, weighted_captions=True).losses[0]
    assert abs(plain - weighted) > 1e-6


def test_lr_per_step_for_a1111_string_and_cosine(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    record = Record()
    result = _train(model_dir, tmp_path / "a", images, hooks=record, max_train_steps=8,
                    lr_scheduler="1e-3:2, 5e-4:5, 1e-4")  # fmt: skip
    assert result.steps == 8
    assert record.lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 1e-4, 1e-4, 1e-4])  # the lr each step used
    record = Record()
    _train(model_dir, tmp_path / "b", images, hooks=record, max_train_steps=4, lr_scheduler="cosine",
           lr_warmup_steps=0.5)  # 2 warm-up steps from 0, then half a cosine
    assert record.lrs == pytest.approx([0.0, 5e-4, 1e-3, 5e-4], abs=1e-9)


def test_optimizer_args_and_metadata(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    result = _train(model_dir, tmp_path, images, optimizer_type="AdamW8bit", optimizer_args=["weight_decay=0.05"],
                    conv_dim=2, conv_alpha=1.0, min_snr_gamma=5.0)  # fmt: skip
    with safe_open(str(result.lora_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert "AdamW8bit(weight_decay=0.05)" in meta["ss_optimizer"]
    assert meta["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1.0"}' and meta["ss_min_snr_gamma"] == "5.0"
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)


def test_samples_during_training(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\nsks, a red circle --w 64 --h 96 --d 7 --s 2 --l 5 --n blurry --ss euler_a\n"
                       "sks, a blue square --s 2\n")  # fmt: skip
    record = Record()
    _train(model_dir, tmp_path / "out", images, hooks=record, max_train_steps=4, sample_prompts=str(prompts),
           sample_every_n_steps=2, sample_at_first=True)  # fmt: skip
    assert [s for s, _, _ in record.samples] == [0, 2, 4]
    assert record.samples[0][1] == [(64, 96), (64, 64)]
    assert len(list((tmp_path / "out" / "sample").glob("*.png"))) == 6


def test_saving_names_and_pruning(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    _train(model_dir, tmp_path, images, max_train_epochs=3, save_every_n_epochs=1, save_last_n_epochs=1,
           save_every_n_steps=4, output_name="run", save_state=True, save_last_n_steps_state=1)  # fmt: skip
    names = sorted(p.name for p in tmp_path.glob("run*.safetensors"))
    assert names == ["run-000002.safetensors", "run-step00000004.safetensors", "run-step00000008.safetensors",
                     "run-step00000012.safetensors", "run-step00000016.safetensors", "run.safetensors"]  # fmt: skip
    assert [p.name for p in tmp_path.glob("run-step*-state")] == ["run-step00000018-state"]


def test_text_encoder_output_cache(tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    plain = _train(model_dir, tmp_path / "a", images, network_train_unet_only=True).losses[0]
    cached = _train(model_dir, tmp_path / "b", images, network_train_unet_only=True, cache_text_encoder_outputs=True)
    assert abs(cached.losses[0] - plain) < 1e-6
    assert cached.pipeline.text_encoder.device.type == "cpu"
    with pytest.raises(ConfigError, match="text encoder is trained"):
        _train(model_dir, tmp_path / "c", images, cache_text_encoder_outputs=True)
    with pytest.raises(ConfigError, match="shuffle_caption"):
        _train(model_dir, tmp_path / "d", images, subset={"shuffle_caption": True}, network_train_unet_only=True,
               cache_text_encoder_outputs=True)


def test_networks_lora_reads_kohya_network_args(tiny_model_dirs, tmp_path):
    """kohya networks/lora.py create_network kwargs written as network_args (conv_dim, conv_alpha,
    rank_dropout, module_dropout) act as the options of the same name and land in ss_network_args;
    an unknown or contradicting one is a message before any model loads."""
    import json

    from safetensors import safe_open

    from nbkit.config import ConfigError
    from nbkit.demo import make_sample_dataset
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.run_file import resolve_datasets

    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), resolution=64,
                max_train_steps=1, optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False,
                network_dim=2, network_alpha=1.0)
    config = LoRATrainConfig(**base, network_args=["conv_dim=2", "conv_alpha=0.5", "module_dropout=0.1"]).checked()
    path = train_lora(config, resolve_datasets(config, raw, tmp_path), device="cpu").lora_path
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.5", "module_dropout": "0.1"}
    conv = [k for k in keys if "resnets" in k and "conv1" in k and k.endswith("lora_down.weight")]
    assert conv, "conv_dim from network_args made no LoCon modules"
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(conv[0].replace("lora_down.weight", "alpha")).item() == 0.5
    for args, match in ((["block_dims=2,2"], "block_dims is not an option"), (["conv_dim=two"], "not a number"),
                        (["conv_dim"], "not key=value")):
        with pytest.raises(ConfigError, match=match):
            LoRATrainConfig(**base, network_args=args).checked()
    with pytest.raises(ConfigError, match="keep one"):
        LoRATrainConfig(**base, conv_dim=4, network_args=["conv_dim=2"]).checked()
    with pytest.raises(ConfigError, match="block_dims"):  # a direct call is checked too, before the model loads
        train_lora(LoRATrainConfig(**dict(base, pretrained_model_name_or_path="/nonexistent"),
                                   network_args=["block_dims=2"]), [], device="cpu")


def test_auto_fit_keeps_what_the_run_file_and_flags_set(tmp_path, capsys):
    """`--auto_fit` may trade micro-batch for accumulation (same effective batch) to run faster, but
    never changes an option the user wrote in the run file or gave as a flag."""
    from nbkit.cli import build_parser
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.run_file import config_from_args

    run = tmp_path / "run.toml"
    run.write_text('train_batch_size = 1\ngradient_accumulation_steps = 4\nmixed_precision = "fp16"\n'
                   '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "x"\n')
    import io

    from nbkit.estimate.cli import apply_auto_fit

    parse = build_parser().parse_args
    kept = config_from_args(parse(["train", "lora", "--config", str(run), "--auto_fit", "T4",
                                   "--gradient_checkpointing"]), LoRATrainConfig)[0]
    assert (kept.train_batch_size, kept.gradient_accumulation_steps, kept.gradient_checkpointing) == (1, 4, True)
    # the same values not fixed: auto-fit changes them (so the test above is not vacuous)
    free = apply_auto_fit(LoRATrainConfig(train_batch_size=1, gradient_accumulation_steps=4, mixed_precision="fp16",
                                          gradient_checkpointing=True), "T4", out=io.StringIO())
    assert (free.train_batch_size, free.gradient_accumulation_steps, free.gradient_checkpointing) != (1, 4, True)


@pytest.mark.parametrize("name", ["T4 LoRA", "T4 SDXL LoRA", "T4 LoHa (LyCORIS)", "T4 DreamBooth", "T4 hypernetwork"])
def test_every_preset_is_a_valid_config_of_its_method(name):
    """A preset's values pass its method's checks (network_args included), so choosing it never ends
    in a config error."""
    from nbkit.notebook import config_class
    from nbkit.presets import PRESETS, apply_preset

    preset = PRESETS[name]
    config = apply_preset(config_class(preset.method)(pretrained_model_name_or_path="x"), name).checked()
    assert all(getattr(config, k) == v for k, v in preset.values.items() if hasattr(config, k))


def test_a_frozen_cached_text_encoder_is_not_handed_to_accelerate(tiny_model_dirs, tmp_path, monkeypatch):
    """accelerate's prepare() moves every model it gets to the training device: a text encoder that
    cached its outputs and left the GPU must not go back (on a T4, SDXL's two encoders are ~1.6 GB).
    One that trains must be prepared (DDP, precision)."""
    import accelerate

    from nbkit.demo import make_sample_dataset
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.run_file import resolve_datasets

    prepared: list = []
    original = accelerate.Accelerator.prepare

    def recording(self, *args, **kwargs):
        prepared.append([type(a).__name__ for a in args])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "prepare", recording)
    model_dir, _ = tiny_model_dirs("sd15")
    images = make_sample_dataset(tmp_path / "imgs", size=64)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    base = dict(pretrained_model_name_or_path=str(model_dir), resolution=64, max_train_steps=1, optimizer_type="AdamW",
                mixed_precision="no", gradient_checkpointing=False, network_dim=2, network_alpha=1.0)
    for frozen in (True, False):
        config = LoRATrainConfig(**base, output_dir=str(tmp_path / f"out{frozen}"), network_train_unet_only=frozen,
                                 cache_text_encoder_outputs=frozen)
        prepared.clear()
        result = train_lora(config, resolve_datasets(config, raw, tmp_path), device="cpu")
        assert ("CLIPTextModel" in prepared[-1]) is not frozen, prepared
        if frozen:
            assert next(result.pipeline.text_encoder.parameters()).device.type == "cpu"
