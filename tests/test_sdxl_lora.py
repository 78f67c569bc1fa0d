"""SDXL LoRA (issue 17, items 3-4): kohya's SDXL conditioning and time ids, and kohya SDXL files that
diffusers loads to the same model nbkit trained (CPU, tiny SDXL built here, nothing downloaded)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nbkit.config import ConfigError
from nbkit.demo import make_sample_dataset

ATOL = 1e-5
BUCKETS = {"enable_bucket": True, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_reso_steps": 64}


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from nbkit.models.tiny import make_tiny_model

    paths = make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl", arch="sdxl", seed=0, single_file=True)
    return paths["diffusers"], paths["single_file"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four captioned images: two square, two non-square (other buckets, other time ids)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sdxl-data")
    pool = sorted(make_sample_dataset(root / "pool", size=64).glob("*.png"))
    folder = root / "img"
    folder.mkdir()
    for i, size in zip((0, 5), ((96, 64), (64, 80))):
        Image.open(pool[i]).resize(size).save(folder / pool[i].name)
        shutil.copy(pool[i].with_suffix(".txt"), folder / pool[i].with_suffix(".txt").name)
    for i in (3, 7):
        shutil.copy(pool[i], folder / pool[i].name)
        shutil.copy(pool[i].with_suffix(".txt"), folder / pool[i].with_suffix(".txt").name)
    return folder


def _config(model_dir, out: Path, **options):
    from nbkit.train.config import LoRATrainConfig

    base = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), output_name="xl", resolution=128,
                max_train_steps=3, optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False, seed=1,
                network_dim=4, network_alpha=2.0, learning_rate=1e-2, save_precision="float")  # fmt: skip
    return LoRATrainConfig(**{**base, **options})


def _train(model_dir, data: Path, out: Path, **options):
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    config = _config(model_dir, out, **options)
    raw = {"datasets": [{**BUCKETS, "subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}]}
    return train_lora(config, resolve_datasets(config, raw, data.parent), device="cpu")


def _fresh(model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(model_dir), local_files_only=True)


def _unet_inputs(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    sample = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g)
    time_ids = torch.tensor([[80.0, 64.0, 0.0, 8.0, 80.0, 64.0], [64.0, 96.0, 4.0, 0.0, 64.0, 96.0]])
    return sample, torch.tensor([500, 200]), context, {"text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def _unet_out(unet, inputs):
    sample, t, context, added = inputs
    return unet(sample, t, context, added_cond_kwargs=added).sample


@torch.no_grad()
def _te_out(pipe, which: str, caption: str = "a red circle, blue background"):
    tokenizer = pipe.tokenizer if which == "text_encoder" else pipe.tokenizer_2
    ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return getattr(pipe, which)(ids, output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def trained(sdxl_model, data, tmp_path_factory):
    """A 3-step LoRA on the U-Net and both text encoders of the tiny SDXL model."""
    return _train(sdxl_model[0], data, tmp_path_factory.mktemp("sdxl-out"))


@pytest.fixture(scope="module")
def trained_locon(sdxl_model, data, tmp_path_factory):
    """A 2-step LoCon (conv_dim: ResnetBlock2D/Downsample2D/Upsample2D convs too)."""
    return _train(sdxl_model[0], data, tmp_path_factory.mktemp("sdxl-locon"), conv_dim=2, conv_alpha=1.0,
                  max_train_steps=2)


# ----------------------------------------------------------------------------- the file in diffusers


@pytest.mark.parametrize("network", ["trained", "trained_locon"])
def test_diffusers_loads_the_trained_lora_to_the_same_model(network, request, sdxl_model):
    """The kohya SDXL file, loaded by diffusers into a fresh base, gives nbkit's in-memory U-Net and
    text encoders (and differs from the base: the LoRA trained). LoRA and LoCon."""
    trained = request.getfixturevalue(network)
    ours = trained.pipeline
    for model in (ours.unet, ours.text_encoder, ours.text_encoder_2):
        model.eval()
    base = _fresh(sdxl_model[0])
    loaded = _fresh(sdxl_model[0])
    loaded.load_lora_weights(str(trained.lora_path))
    inputs = _unet_inputs(ours.unet)
    mine, theirs, plain = _unet_out(ours.unet, inputs), _unet_out(loaded.unet, inputs), _unet_out(base.unet, inputs)
    assert (mine - theirs).abs().max().item() < ATOL
    assert (mine - plain).abs().max().item() > 1e-3
    for which in ("text_encoder", "text_encoder_2"):
        mine, theirs, plain = _te_out(ours, which), _te_out(loaded, which), _te_out(base, which)
        assert (mine - theirs).abs().max().item() < ATOL, which
        assert (mine - plain).abs().max().item() > 1e-4, which


def _sgm_module_paths(single_file: Path) -> dict[str, set[str]]:
    """Module paths kohya names SDXL LoRA modules after, from the SGM single file itself: the U-Net's
    ``model.diffusion_model.*`` and CLIP-L's ``conditioner.embedders.0.transformer.text_model.*``."""
    with safe_open(str(single_file), "pt") as fh:
        keys = list(fh.keys())
    unet = {k.removeprefix("model.diffusion_model.").rsplit(".", 1)[0] for k in keys
            if k.startswith("model.diffusion_model.") and k.endswith(".weight")}
    te1 = {k.removeprefix("conditioner.embedders.0.transformer.").rsplit(".", 1)[0] for k in keys
           if k.startswith("conditioner.embedders.0.transformer.") and k.endswith(".weight")}
    return {"unet": unet, "te1": te1}


@pytest.mark.parametrize(("network", "conv_dim"), [("trained", None), ("trained_locon", 2)])
def test_every_key_follows_kohya_sdxl_naming(network, conv_dim, request, sdxl_model):
    """Each stem is lora_unet_ + an SGM U-Net module path, lora_te1_/lora_te2_ + a text_model path,
    with exactly kohya's module set: Transformer2DModel linears (proj_in/out 1x1 or linear too) and
    every CLIPAttention/CLIPMLP linear of both encoders (LoCon: the resnet/sampler convs too, under
    their SGM names in_layers_2/out_layers_3/op/conv); 3 tensors per module."""
    from nbkit.networks.lora import kohya_lora_targets

    sd = load_file(str(request.getfixturevalue(network).lora_path))
    paths = _sgm_module_paths(sdxl_model[1])
    stems: dict[str, set[str]] = {"unet": set(), "te1": set(), "te2": set()}
    for key in sd:
        stem, _, part = key.partition(".")
        assert part in ("lora_down.weight", "lora_up.weight", "alpha"), key
        match = re.fullmatch(r"lora_(unet|te1|te2)_(.+)", stem)
        assert match, key
        stems[match[1]].add(match[2])
    sgm_unet = {p.replace(".", "_"): p for p in paths["unet"]}
    assert stems["unet"] <= set(sgm_unet), sorted(stems["unet"] - set(sgm_unet))[:5]
    assert all(s.startswith(("input_blocks_", "middle_block_", "output_blocks_")) for s in stems["unet"])
    assert {sgm_unet[s].split(".")[0] for s in stems["unet"]} == {"input_blocks", "middle_block", "output_blocks"}
    te1 = {p.replace(".", "_") for p in paths["te1"]}
    assert stems["te1"] <= te1 and all(s.startswith("text_model_encoder_layers_") for s in stems["te1"])
    te2_paths = {n.replace(".", "_") for n, _ in _fresh(sdxl_model[0]).text_encoder_2.named_modules()}
    assert stems["te2"] <= te2_paths and all(s.startswith("text_model_encoder_layers_") for s in stems["te2"])
    # kohya's module counts: every target of each model, none twice
    base = _fresh(sdxl_model[0])
    assert len(stems["unet"]) == len(kohya_lora_targets(base.unet, "unet", conv_dim))
    if conv_dim:
        assert any(s.endswith("_0_in_layers_2") for s in stems["unet"])  # an SGM resnet conv
        assert any(s.endswith("_0_op") for s in stems["unet"])  # an SGM downsampler
    assert len(stems["te1"]) == len(kohya_lora_targets(base.text_encoder, "text_encoder"))
    assert len(stems["te2"]) == len(kohya_lora_targets(base.text_encoder_2, "text_encoder"))
    assert len(sd) == 3 * sum(len(s) for s in stems.values())
    # a known SGM name: the first attention block's q projection
    assert "input_blocks_1_1_transformer_blocks_0_attn1_to_q" in stems["unet"] or any(
        re.fullmatch(r"input_blocks_\d+_1_transformer_blocks_0_attn1_to_q", s) for s in stems["unet"])


def test_metadata_says_sdxl(trained):
    with safe_open(str(trained.lora_path), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_module"] == "networks.lora"


def test_unet_names_are_the_single_file_writers(sdxl_model):
    """kohya_sdxl's U-Net names agree with the SGM single-file layout for every U-Net module."""
    from nbkit.formats.kohya_sdxl import sgm_unet_path

    unet = _fresh(sdxl_model[0]).unet
    sgm = _sgm_module_paths(sdxl_model[1])["unet"]
    config = dict(unet.config)
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not name.startswith(("time_embedding", "add_")):
            assert sgm_unet_path(name, config) in sgm, name


# ----------------------------------------------------------------------------- conditioning and time ids


def _item(size, reso, enable_bucket: bool = True):
    from types import SimpleNamespace

    from nbkit.data.train_data import Item

    bucket = SimpleNamespace(reso=reso, resized_size=None)
    return Item(Path("x.png"), "", None, SimpleNamespace(enable_bucket=enable_bucket), 0, size, bucket, 1)


@pytest.mark.parametrize(("size", "reso", "flipped", "expected"), [
    # kohya train_util.py: BucketManager.get_crop_ltrb, then (h, w) / (top, left) / (h, w); flipped: left = W - right
    ((300, 200), (256, 192), False, (200, 300, 10, 0, 192, 256)),  # bucket narrower: crop_top = (192 - 170.67) // 2
    ((300, 200), (256, 192), True, (200, 300, 10, 0, 192, 256)),  # right = 256: flipped left = 0
    ((200, 300), (192, 256), False, (300, 200, 0, 10, 256, 192)),  # bucket wider: crop_left = (192 - 170.67) // 2
    ((200, 300), (192, 256), True, (300, 200, 0, 11, 256, 192)),  # right = 180.67: left = int(11.33)
    ((1024, 1024), (1024, 1024), False, (1024, 1024, 0, 0, 1024, 1024)),
    ((1500, 1000), (1216, 832), False, (1000, 1500, 10, 0, 832, 1216)),  # (832 - 810.67) // 2 = 10.0
])  # fmt: skip
def test_time_ids_are_kohyas(size, reso, flipped, expected):
    from nbkit.data.train_data import sdxl_time_ids

    w, h = size
    bw, bh = reso
    # the closed form, written out independently of the code under test
    if bw / bh > w / h:
        rw, rh = bh * w / h, bh
    else:
        rw, rh = bw, bw / (w / h)
    left, top = (bw - rw) // 2, (bh - rh) // 2
    left = bw - (left + rw) if flipped else left
    closed = (h, w, int(top), int(left), bh, bw)
    assert closed == expected
    assert sdxl_time_ids(_item(size, reso), flipped) == expected


def test_time_ids_without_buckets_are_the_crop():
    from nbkit.data.train_data import sdxl_time_ids

    # kohya without buckets: original size = the cropped image, crop_ltrb = (0, 0, 0, 0)
    assert sdxl_time_ids(_item((300, 200), (128, 128), enable_bucket=False), False) == (128, 128, 0, 0, 128, 128)
    assert sdxl_time_ids(_item((300, 200), (128, 128), enable_bucket=False), True) == (128, 128, 0, 128, 128, 128)


def test_sdxl_conditioning_is_kohyas(sdxl_model):
    """encode: penultimate hidden states of both encoders concatenated, pooled = bigG's first-EOS
    state projected (kohya get_hidden_states_sdxl / pool_workaround); the loss passes the batch's
    time ids to the U-Net."""
    from nbkit.train.architectures import SDXLConditioning, conditioning_for
    from nbkit.train.common import diffusion_loss
    from nbkit.train.noise import prepare_noise_scheduler

    pipe = _fresh(sdxl_model[0])
    config = _config(sdxl_model[0], Path("unused"))
    info = type("Info", (), {"arch": "sdxl"})()
    arch = conditioning_for(pipe, info, config, torch.device("cpu"), sdxl=True)
    assert isinstance(arch, SDXLConditioning)
    assert set(arch.text_encoders()) == {"text_encoder", "text_encoder_2"}
    captions = ["a red circle", "a blue square, green background, and more words"]
    with torch.no_grad():
        cond = arch.encode(captions)
        ids1 = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        ids2 = pipe.tokenizer_2(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        h1 = pipe.text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids2, output_hidden_states=True)
        eos = [row.tolist().index(pipe.tokenizer_2.eos_token_id) for row in ids2]
        pooled = pipe.text_encoder_2.text_projection(out2.last_hidden_state[torch.arange(2), torch.tensor(eos)])
    assert torch.equal(cond.context, torch.cat([h1, out2.hidden_states[-2]], dim=2))
    assert torch.allclose(cond.text_embeds, pooled, atol=1e-6)
    assert eos[0] < eos[1]  # the EOS position depends on the caption: a fixed index would be wrong
    # stack of cached per-caption entries == the batch encoding
    stacked = arch.stack([cond[0].cpu(), cond[1].cpu()])
    assert torch.equal(stacked.context, cond.context) and torch.equal(stacked.text_embeds, cond.text_embeds)
    # the loss uses the time ids it is given
    scheduler = prepare_noise_scheduler("epsilon", False)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise, t = torch.randn_like(x0), torch.tensor([300, 700])
    ids_a = torch.tensor([[64, 64, 0, 0, 64, 64], [80, 64, 0, 8, 80, 64]])
    ids_b = torch.tensor([[1024, 1024, 0, 0, 64, 64], [80, 64, 0, 8, 80, 64]])
    with torch.no_grad():
        loss_a = diffusion_loss(pipe.unet, scheduler, x0, cond.with_time_ids(ids_a), torch.float32, config, False,
                                timesteps=t, noise=noise)
        loss_b = diffusion_loss(pipe.unet, scheduler, x0, cond.with_time_ids(ids_b), torch.float32, config, False,
                                timesteps=t, noise=noise)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = pipe.unet(noisy, t, cond.context, added_cond_kwargs={"text_embeds": cond.text_embeds,
                                                                  "time_ids": ids_a.float()}).sample
    assert torch.allclose(loss_a, torch.nn.functional.mse_loss(pred, noise), atol=1e-6)
    assert (loss_a - loss_b).abs().item() > 1e-6


def test_the_conditioning_attaches_each_samples_time_ids(sdxl_model, data):
    """The SDXL conditioning gives each sample of a batch kohya's time ids (per image, flipped or not)."""
    from nbkit.data.train_data import collect_items, sdxl_time_ids
    from nbkit.models.load import load_pipeline
    from nbkit.train.architectures import conditioning_for
    from nbkit.train.run_file import resolve_datasets

    config = _config(sdxl_model[0], Path("unused"))
    raw = {"datasets": [{**BUCKETS, "subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}]}
    items, _ = collect_items(resolve_datasets(config, raw, data.parent), 0)
    pipe, info = load_pipeline(str(sdxl_model[0]))
    arch = conditioning_for(pipe, info, config, "cpu", sdxl=True)
    wide = next(i for i, it in enumerate(items) if it.size == (96, 64))
    other = next(i for i, it in enumerate(items) if it.size != (96, 64))
    with torch.no_grad():
        cond = arch.for_batch(arch.encode(["a", "b"]), items, [(wide, True), (other, False)])
    assert cond.time_ids.tolist() == [list(sdxl_time_ids(items[wide], True)), list(sdxl_time_ids(items[other], False))]
    assert cond.time_ids[0, :2].tolist() == [64, 96]  # original (h, w), not the bucket


# ----------------------------------------------------------------------------- options


def test_cached_text_and_unet_only_match_uncached(sdxl_model, data, tmp_path):
    """network_train_unet_only + cache_text_encoder_outputs on SDXL: the same LoRA as encoding every
    step, U-Net keys only, and the text encoders leave the GPU (here: stay on the CPU)."""
    a = _train(sdxl_model[0], data, tmp_path / "a", network_train_unet_only=True, max_train_steps=2)
    b = _train(sdxl_model[0], data, tmp_path / "b", network_train_unet_only=True, max_train_steps=2,
               cache_text_encoder_outputs=True)
    sa, sb = load_file(str(a.lora_path)), load_file(str(b.lora_path))
    assert set(sa) == set(sb) and all(k.startswith("lora_unet_") for k in sa)
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-6
    assert max(sa[k].abs().max().item() for k in sa if "lora_up" in k) > 0  # it trained


def test_text_cache_refuses_trained_text_encoders(sdxl_model, data, tmp_path):
    with pytest.raises(ConfigError, match="cache_text_encoder_outputs: the text encoder is trained"):
        _train(sdxl_model[0], data, tmp_path, cache_text_encoder_outputs=True, max_train_steps=1)


def test_other_methods_refuse_sdxl(sdxl_model):
    """DreamBooth and hypernetwork call conditioning_for without sdxl=True: a clear refusal."""
    from nbkit.train.architectures import conditioning_for

    pipe = _fresh(sdxl_model[0])
    info = type("Info", (), {"arch": "sdxl"})()
    with pytest.raises(ConfigError, match="SDXL model; this method trains SD1.x/SD2.x bases only"):
        conditioning_for(pipe, info, _config(sdxl_model[0], Path("unused")), torch.device("cpu"))


def test_previews_render_with_the_sdxl_pipeline_and_show_the_lora(sdxl_model, data, tmp_path):
    """kohya's sample prompts render through the SDXL pipeline (both encoders, time ids) before and
    after training; the trained LoRA changes the picture with the same seed."""
    import numpy as np
    from PIL import Image

    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 3 --d 7\n")
    config = _config(sdxl_model[0], tmp_path / "out", resolution=64, max_train_steps=2, learning_rate=5e-2,
                     sample_prompts=str(prompts), sample_at_first=True, sample_every_n_steps=2)
    raw = {"datasets": [{"subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}]}
    train_lora(config, resolve_datasets(config, raw, data.parent), device="cpu")
    first, last = sorted((tmp_path / "out").rglob("xl_00000*_00_7.png"))
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (first, last))
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() > 0, "the step-2 preview equals the untrained one: the LoRA is not in the preview"


def test_a_ztsnr_v_pred_file_trains_with_zero_terminal_snr(tmp_path, data):
    """A v-pred SDXL single file with ComfyUI's ztsnr marker (NoobAI-XL v-pred) trains with a
    zero-terminal-SNR schedule as if zero_terminal_snr were set; the same weights without the marker
    train without it unless asked."""
    from nbkit.formats.sgm_checkpoint import save_sdxl_pipeline_as_single_file
    from nbkit.models.load import load_pipeline
    from nbkit.models.tiny import make_tiny_model
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    folder = make_tiny_model(tmp_path / "vpred", arch="sdxl", seed=0, v_pred=True)["diffusers"]
    pipe, _ = load_pipeline(str(folder))
    marked = save_sdxl_pipeline_as_single_file(pipe, tmp_path / "marked.safetensors", ztsnr=True)
    plain = save_sdxl_pipeline_as_single_file(pipe, tmp_path / "plain.safetensors", ztsnr=False)
    raw = {"datasets": [{"subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}]}

    def first_loss(model, **options) -> float:
        config = _config(model, tmp_path / f"out-{model.stem}-{len(options)}", resolution=64, max_train_steps=1,
                         **options)
        assert load_pipeline(str(model))[1].v_parameterization
        return train_lora(config, resolve_datasets(config, raw, data.parent), device="cpu").losses[0]

    marked_loss = first_loss(marked)
    assert marked_loss == pytest.approx(first_loss(plain, zero_terminal_snr=True), abs=1e-6)
    assert abs(marked_loss - first_loss(plain)) > 1e-4
