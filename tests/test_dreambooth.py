"""DreamBooth: prior preservation, full fine-tuning, and files that A1111 / diffusers read as written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nbkit.config import ConfigError
from nbkit.demo import make_sample_dataset
from nbkit.train.dreambooth import sample_weights, train_dreambooth
from nbkit.train.dreambooth_config import DreamBoothTrainConfig, folder_datasets
from nbkit.train.hooks import TrainHooks

# Keys A1111 (sd_models_config.py) and diffusers (CHECKPOINT_KEY_NAMES) use to recognise a model.
A1111_SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
DETECTION_KEYS = ("model.diffusion_model.input_blocks.0.0.weight",
                  "model.diffusion_model.output_blocks.11.0.skip_connection.weight",  # diffusers "v1"
                  "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",  # diffusers "v2"
                  "first_stage_model.decoder.mid.attn_1.q.weight")  # fmt: skip
DIFFUSERS_NAMES = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_norm_out", "group_norm",
                   "conv_shortcut", "first_stage_model.decoder.mid.attentions", "first_stage_model.encoder.mid.attn_1.to_")


def _instance_folder(root: Path, n: int = 4, captioned: int = 1) -> Path:
    """kohya's '5_sks shape' folder: n images, the first `captioned` with a caption file."""
    folder = make_sample_dataset(root / "data" / "5_sks shape", size=64)
    for i, image in enumerate(sorted(folder.glob("*.png"))):
        if i >= n:
            image.unlink()
        if i >= captioned:
            image.with_suffix(".txt").unlink()
    return folder


def _config(model_dir, root: Path, **overrides) -> DreamBoothTrainConfig:
    values = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(root / "out"), output_name="db",
                  resolution=64, train_data_dir=str(root / "data"), num_class_images=3, class_image_steps=1,
                  class_image_batch_size=3, max_train_steps=3, optimizer_type="AdamW", learning_rate=1e-3,
                  mixed_precision="no", gradient_checkpointing=False, save_precision="float", save_diffusers=True,
                  save_state=False, seed=3)  # fmt: skip
    values.update(overrides)
    return DreamBoothTrainConfig(**values)


def _outputs(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents, pixels = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    ids = pipe.tokenizer(["a sks shape"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return {"unet": pipe.unet(latents, torch.tensor([500]), cond).sample,
                "vae": pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample,
                "text_encoder": pipe.text_encoder(ids)[0]}  # fmt: skip


def _check_layout(single: Path, folder: Path, arch: str, unet) -> None:
    """Every key A1111/diffusers detect the model by, no diffusers-named key, EMA keys as LDM writes them."""
    with safe_open(str(single), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys if k.startswith("model_ema.diffusion_modelinput_blocks00")}
    assert all(k in keys for k in DETECTION_KEYS)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema."))
               for k in keys)
    assert not [k for k in keys if any(name in k for name in DIFFUSERS_NAMES)]
    assert (A1111_SD2_KEY in keys) == (arch == "sd21")
    if arch == "sd21":
        assert not [k for k in keys if "q_proj" in k or "text_model" in k]  # OpenCLIP names only
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert {"model_ema.decay", "model_ema.num_updates"} <= keys
        from diffusers import UNet2DConditionModel

        ema = UNet2DConditionModel.from_pretrained(str(folder / "unet_ema"))
        assert torch.equal(tensors["model_ema.diffusion_modelinput_blocks00weight"], ema.conv_in.weight.detach())
        assert not torch.equal(ema.conv_in.weight, unet.conv_in.weight)
    assert meta["modelspec.architecture"] == ("stable-diffusion-v1" if arch == "sd15" else "stable-diffusion-v2-512")


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_prior_preservation_run_writes_a_single_file_equal_to_the_diffusers_folder(arch, tiny_model_dirs, tmp_path):
    from diffusers import StableDiffusionPipeline

    from nbkit.train.class_images import class_image_plan

    model_dir, _ = tiny_model_dirs(arch)
    _instance_folder(tmp_path)
    # sd15: EMA saved next to the raw weights; sd21: text encoder trained for the first 2 of 3 steps,
    # a periodic save and a preview at step 2, hooks told of every save.
    (tmp_path / "prompts.txt").write_text("a sks shape --s 1 --d 4\n")
    extra = dict(use_ema=True, save_ema="both") if arch == "sd15" else dict(
        train_text_encoder=True, stop_text_encoder_training=2, save_every_n_steps=2,
        sample_prompts=str(tmp_path / "prompts.txt"), sample_every_n_steps=2)
    config = _config(model_dir, tmp_path, **extra)

    class Saves(TrainHooks):
        def __init__(self):
            self.paths = []

        def on_save(self, path, step):
            self.paths.append((path.name, step))

    hooks = Saves()
    result = train_dreambooth(config, folder_datasets(config), hooks=hooks, device="cpu")
    single, folder = result.model_paths
    assert result.steps == 3 and single == tmp_path / "out" / "db.safetensors" and (folder / "model_index.json").is_file()
    if arch == "sd21":
        assert hooks.paths == [("db-step00000002.safetensors", 2), ("db.safetensors", 3), ("db", 3)]
        assert [p.name for p in (tmp_path / "out" / "sample").glob("*.png")] == ["db_000002_00_4.png"]

    # The missing class images were generated into a kohya reg folder, captioned, and are reused.
    class_dir = tmp_path / "data" / "reg" / "1_shape"
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert (class_dir / "class_00000.txt").read_text().strip() == "shape"
    assert class_image_plan(config, folder_datasets(config)).missing == 0

    # The single file, read by diffusers through the diffusers output as config, is the same model.
    ours = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    theirs = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    base = _outputs(StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True))
    a, b = _outputs(ours), _outputs(theirs)
    for part in ("unet", "vae", "text_encoder"):
        assert (a[part] - b[part]).abs().max().item() <= 1e-5, part
    assert (a["unet"] - base["unet"]).abs().max().item() > 1e-4  # it trained
    assert ((a["text_encoder"] - base["text_encoder"]).abs().max().item() > 1e-6) == (arch == "sd21")

    _check_layout(single, folder, arch, ours.unet)


def test_prior_loss_is_kohyas_weighted_batch_mean(tiny_pipe, tmp_path):
    """1 instance + 1 class sample: loss = (l_inst + w * l_class) / 2 = (diffusers' mse_inst + w * mse_class) / 2."""
    from nbkit.data.train_data import collect_items
    from nbkit.train.common import diffusion_loss
    from nbkit.train.noise import prepare_noise_scheduler

    _instance_folder(tmp_path, n=2, captioned=0)
    make_sample_dataset(tmp_path / "reg" / "1_shape", size=64)
    config = _config("unused", tmp_path, reg_data_dir=str(tmp_path / "reg"), prior_loss_weight=0.7)
    items, _ = collect_items(folder_datasets(config))
    batch = [(next(i for i, it in enumerate(items) if not it.subset.is_reg), False),
             (next(i for i, it in enumerate(items) if it.subset.is_reg), False)]  # fmt: skip
    weights = sample_weights(items, batch, config.prior_loss_weight)
    assert weights == [1.0, 0.7]

    unet = tiny_pipe("sd15").unet.eval()
    scheduler = prepare_noise_scheduler("epsilon", False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cond, t = torch.randn(2, 77, 32, generator=g), torch.tensor([100, 800])
    with torch.no_grad():
        loss = diffusion_loss(unet, scheduler, x0, cond, torch.float32, config, False, weights, None, t, noise)
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond).sample
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_sample[0] + 0.7 * per_sample[1]) / 2, rtol=1e-6, atol=0)
    diffusers = torch.nn.functional.mse_loss(pred[0], noise[0]) + 0.7 * torch.nn.functional.mse_loss(pred[1], noise[1])
    assert torch.allclose(loss, diffusers / 2, rtol=1e-6, atol=0)


def test_missing_instance_token_fails_before_anything_loads(tmp_path):
    folder = make_sample_dataset(tmp_path / "data" / "sks", size=64)  # no "N_identifier class" name
    for caption in folder.glob("*.txt"):
        caption.unlink()
    config = DreamBoothTrainConfig(pretrained_model_name_or_path=str(tmp_path / "no-such-model"),
                                   dataset_config=None, resolution=64)  # fmt: skip
    from nbkit.data.dataset_config import DatasetSpec, SubsetSpec

    datasets = [DatasetSpec(subsets=[SubsetSpec(image_dir=folder, caption_extension=".txt")])]
    with pytest.raises(ConfigError, match=r"sks: 12 of 12 images have no \.txt caption .*instance_prompt"):
        train_dreambooth(config, datasets, device="cpu")
    with pytest.raises(ConfigError, match="num_class_images=5 needs class_prompt"):
        train_dreambooth(DreamBoothTrainConfig(num_class_images=5, instance_prompt="sks"), datasets, device="cpu")


def test_ema_follows_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    from nbkit.train.dreambooth_save import EMAWeights

    weight = torch.nn.Parameter(torch.zeros(3))
    ours, theirs = EMAWeights({"w": weight}, 0.9, "cpu"), EMAModel([weight], decay=0.9)
    for step in range(1, 8):
        with torch.no_grad():
            weight.add_(1.0)
        ours.update({"w": weight}, step)
        theirs.step([weight])
        assert torch.allclose(ours.shadow["w"], theirs.shadow_params[0], atol=1e-6), step


def test_cli_lora_via_dreambooth_reuses_class_images(tiny_model_dirs, tmp_path):
    """`nbkit train dreambooth` with network_module: the DreamBooth data path writes a kohya LoRA."""
    from nbkit.cli import main
    from nbkit.config import save_toml, to_dict

    model_dir, _ = tiny_model_dirs("sd15")
    _instance_folder(tmp_path)
    make_sample_dataset(tmp_path / "data" / "reg" / "1_shape", size=64)  # 12 class images already there
    config = _config(model_dir, tmp_path, network_module="networks.lora", network_dim=2, learning_rate=1e-3,
                     save_diffusers=False, max_train_steps=2, num_class_images=4, optimizer_type="AdamW8bit")
    save_toml(to_dict(config), tmp_path / "run.toml")
    assert main(["train", "dreambooth", "--config", str(tmp_path / "run.toml"), "--output_name", "db_lora"]) == 0
    with safe_open(str(tmp_path / "out" / "db_lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)  # train_text_encoder=false: U-Net only
    assert meta["ss_num_reg_images"] != "0" and not list((tmp_path / "data" / "reg" / "1_shape").glob("class_*"))


def test_fp16_ckpt_and_diffusers_outputs_leave_the_fp32_weights_alone(tiny_pipe, tmp_path):
    """save_precision casts a CPU copy; .ckpt is kohya's {"state_dict", "epoch", "global_step"}."""
    from nbkit.formats.checkpoint_io import read_single_file
    from nbkit.train.dreambooth_save import EMAWeights, save_dreambooth

    pipe = tiny_pipe("sd15")
    ema = EMAWeights(dict(pipe.unet.named_parameters()), 0.9, "cpu")
    config = DreamBoothTrainConfig(output_dir=str(tmp_path), use_ema=True)  # save_precision fp16, save_ema "ema"
    info = type("Info", (), {"arch": "sd15"})()
    with torch.no_grad():
        ema.shadow["conv_in.bias"].add_(1.0)  # the EMA, not the raw weights, is what "ema" saves
    ckpt, folder = save_dreambooth(config, "m", pipe, info, pipe.unet, pipe.text_encoder, ema, 7, 2,
                                   ("ckpt", "diffusers_safetensors"))
    raw = torch.load(ckpt, weights_only=True)
    assert raw["global_step"] == 7 and raw["epoch"] == 2
    state, _ = read_single_file(ckpt)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    bias = state["model.diffusion_model.input_blocks.0.0.bias"]
    assert torch.equal(bias, (pipe.unet.conv_in.bias + 1.0).half())
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    from safetensors.torch import load_file

    saved = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert saved["conv_in.bias"].dtype == torch.float16 and torch.equal(saved["conv_in.bias"], bias)


def test_vae_option_loads_an_a1111_vae_file(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    from nbkit.formats.ldm_checkpoint import vae_to_ldm
    from nbkit.models.tiny import build_tiny_components
    from nbkit.train.base_model import load_vae

    base = tiny_pipe("sd15").vae
    other = build_tiny_components("sd15", seed=9)["vae"]
    ldm = {k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(other.state_dict(), other.config).items()}
    save_file(ldm, str(tmp_path / "vae-ft.safetensors"))  # A1111's VAE files have no prefix
    loaded = load_vae(tmp_path / "vae-ft.safetensors", base)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.state_dict().items())
    save_file({k: v for k, v in ldm.items() if "decoder" not in k}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ConfigError, match="half.safetensors"):
        load_vae(tmp_path / "half.safetensors", base)
