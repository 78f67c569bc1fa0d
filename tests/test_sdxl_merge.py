"""SDXL LoRA files after training (issue 17 item 4, issue 18 on SDXL): continue training from an SDXL
kohya file, ``merge lora-into`` SDXL checkpoints (diffusers folder and SGM single file), ``merge loras`` /
``lora resize`` on SDXL files, checkpoint merges of SDXL single files, and LyCORIS on the SDXL U-Net under
kohya's SAI-layout names (CPU, tiny SDXL built here, nothing downloaded)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

MERGE_ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    from nbkit.models.tiny import make_tiny_model

    paths = make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl", arch="sdxl", seed=0, single_file=True)
    return Path(paths["diffusers"]), Path(paths["single_file"])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from nbkit.demo import make_sample_dataset

    root = tmp_path_factory.mktemp("sdxl-merge-data")
    pool = sorted(make_sample_dataset(root / "pool", size=64).glob("*.png"))
    folder = root / "img"
    folder.mkdir()
    for i in (0, 7):
        shutil.copy(pool[i], folder / pool[i].name)
        shutil.copy(pool[i].with_suffix(".txt"), folder / pool[i].with_suffix(".txt").name)
    return folder


def _config(model_dir, out: Path, **options):
    from nbkit.train.config import LoRATrainConfig

    base = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), output_name="xl", resolution=64,
                max_train_steps=2, optimizer_type="AdamW", mixed_precision="no", gradient_checkpointing=False, seed=1,
                network_dim=4, network_alpha=2.0, learning_rate=1e-2, save_precision="float")  # fmt: skip
    return LoRATrainConfig(**{**base, **options})


def _train(model_dir, data: Path, out: Path, **options):
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    config = _config(model_dir, out, **options)
    raw = {"datasets": [{"subsets": [{"image_dir": str(data), "caption_extension": ".txt"}]}]}
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
def _unet_out(unet):
    sample, t, context, added = _unet_inputs(unet)
    return unet.eval()(sample, t, context, added_cond_kwargs=added).sample


@torch.no_grad()
def _te_out(pipe, which: str, caption: str = "a red circle, blue background"):
    tokenizer = pipe.tokenizer if which == "text_encoder" else pipe.tokenizer_2
    ids = tokenizer([caption], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return getattr(pipe, which).eval()(ids, output_hidden_states=True).hidden_states[-2]


def _outputs(pipe) -> dict[str, torch.Tensor]:
    return {"unet": _unet_out(pipe.unet), "text_encoder": _te_out(pipe, "text_encoder"),
            "text_encoder_2": _te_out(pipe, "text_encoder_2")}  # fmt: skip


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.fixture(scope="module")
def lora(sdxl_model, data, tmp_path_factory):
    """2 steps of LoRA on the U-Net and both text encoders."""
    return _train(sdxl_model[0], data, tmp_path_factory.mktemp("sdxl-lora"))


@pytest.fixture(scope="module")
def locon(sdxl_model, data, tmp_path_factory):
    """2 steps of LoCon (conv_dim: resnet/sampler 3x3 convs too), U-Net only."""
    return _train(sdxl_model[0], data, tmp_path_factory.mktemp("sdxl-locon"), conv_dim=2, conv_alpha=1.0,
                  network_train_unet_only=True)


# ----------------------------------------------------------------------------- 1. continue training


@pytest.mark.parametrize("network", ["lora", "locon"])
def test_network_weights_start_from_the_sdxl_file(network, request, sdxl_model):
    """An SDXL kohya file given as network_weights: every tensor of the file comes back out of the
    injected network tensor for tensor (names, ranks, alphas: a swapped SGM mapping or a lost alpha
    fails), and the fresh model then equals the one nbkit trained."""
    from nbkit.networks.lora_network import LoRANetwork

    trained = request.getfixturevalue(network)
    file_sd = load_file(str(trained.lora_path))
    pipe = _fresh(sdxl_model[0])
    config = _config(sdxl_model[0], Path("unused"), network_weights=str(trained.lora_path),
                     conv_dim=2 if network == "locon" else None, conv_alpha=1.0 if network == "locon" else None,
                     network_train_unet_only=network == "locon")  # fmt: skip
    net = LoRANetwork(config)
    net.inject({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    state = net.state_dict()
    assert set(state) == set(file_sd)
    assert all(torch.equal(state[k].float(), file_sd[k].float()) for k in file_sd)
    diffs = _max_diff(_outputs(pipe), _outputs(trained.pipeline))
    print(f"{network}: network_weights vs trained model, max abs diff {diffs}")
    assert max(diffs.values()) < 1e-5


def test_training_continues_from_an_sdxl_file(lora, sdxl_model, data, tmp_path):
    """train_lora with network_weights = an SDXL file trains on from it: same keys, ranks and alphas,
    tensors moved on from the file's (and the U-Net starts from the file, not from zero)."""
    file_sd = load_file(str(lora.lora_path))
    more = _train(sdxl_model[0], data, tmp_path, network_weights=str(lora.lora_path), max_train_steps=1)
    new_sd = load_file(str(more.lora_path))
    assert set(new_sd) == set(file_sd)
    assert all(new_sd[k].shape == file_sd[k].shape for k in file_sd)
    assert all(torch.equal(new_sd[k], file_sd[k]) for k in file_sd if k.endswith(".alpha"))
    moved = max((new_sd[k] - file_sd[k]).abs().max().item() for k in file_sd if k.endswith("lora_up.weight"))
    assert 0 < moved < 0.1  # one more step of lr 1e-2 from the file's values: a small change
    with safe_open(str(more.lora_path), "pt") as fh:
        assert fh.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


# ----------------------------------------------------------------------------- 2. merge lora-into


def _load(path: Path):
    from nbkit.models.load import load_pipeline

    return load_pipeline(str(path))[0]


@pytest.mark.parametrize("network", ["lora", "locon"])
def test_lora_into_sgm_single_file_equals_the_trained_model(network, request, sdxl_model, tmp_path):
    """An SDXL LoRA (U-Net + both text encoders; bigG's q/k/v into thirds of in_proj_weight) / LoCon
    merged into the SGM single file at ratio 1 gives nbkit's in-memory trained model."""
    from nbkit.merge.lora_into import merge_lora_into

    trained = request.getfixturevalue(network)
    before = sdxl_model[1].read_bytes()
    out = tmp_path / "merged.safetensors"
    result = merge_lora_into(sdxl_model[1], [(trained.lora_path, 1.0)], out, progress=False)
    assert sdxl_model[1].read_bytes() == before  # the input is never touched
    assert result.modules == len({k.partition(".")[0] for k in load_file(str(trained.lora_path))})
    with safe_open(str(out), "pt") as merged, safe_open(str(sdxl_model[1]), "pt") as base:
        assert set(merged.keys()) == set(base.keys())  # every SGM key kept, no diffusers names
    got, want, plain = _outputs(_load(out)), _outputs(trained.pipeline), _outputs(_fresh(sdxl_model[0]))
    diffs, moved = _max_diff(got, want), _max_diff(got, plain)
    print(f"{network} into SGM file: max |merged - trained| {diffs}")
    assert max(diffs.values()) <= MERGE_ATOL
    parts = ("unet",) if network == "locon" else ("unet", "text_encoder", "text_encoder_2")
    assert all(moved[p] > 1e-4 for p in parts)


@pytest.mark.parametrize("network", ["lora", "locon"])
def test_lora_into_diffusers_folder_equals_diffusers_fuse_lora(network, request, sdxl_model, tmp_path):
    """Into the diffusers folder at ratio 0.6: the same model as diffusers' own
    ``load_lora_weights`` + ``fuse_lora(lora_scale=0.6)`` (its kohya SDXL conversion is independent of
    nbkit's name mapping)."""
    from nbkit.merge.lora_into import merge_lora_into

    trained = request.getfixturevalue(network)
    out = tmp_path / "merged"
    merge_lora_into(sdxl_model[0], [(trained.lora_path, 0.6)], out, progress=False)
    reference = _fresh(sdxl_model[0])
    reference.load_lora_weights(str(trained.lora_path))
    reference.fuse_lora(lora_scale=0.6)
    got, want = _outputs(_fresh(out)), _outputs(reference)
    diffs = _max_diff(got, want)
    print(f"{network} into folder at 0.6: max |merged - diffusers fuse_lora| {diffs}")
    assert max(diffs.values()) <= MERGE_ATOL
    assert max(_max_diff(got, _outputs(_fresh(sdxl_model[0]))).values()) > 1e-4


def test_lora_into_refuses_a_mismatched_family(lora, sdxl_model, tiny_model_dirs, tmp_path):
    """An SDXL LoRA into an SD1.5 model (and the reverse) is refused before anything is written."""
    from nbkit.merge.lora_into import merge_lora_into

    _, sd15_single = tiny_model_dirs("sd15")
    with pytest.raises(ValueError, match="SDXL LoRA"):
        merge_lora_into(sd15_single, [(lora.lora_path, 1.0)], tmp_path / "x.safetensors", progress=False)
    sd1_lora = tmp_path / "sd1.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 2)}, str(sd1_lora))
    with pytest.raises(ValueError, match="another base model"):
        merge_lora_into(sdxl_model[1], [(sd1_lora, 1.0)], tmp_path / "y.safetensors", progress=False)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# ----------------------------------------------------------------------------- 2b. merge loras, lora resize


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    from nbkit.merge.lora_math import group_lora

    return {stem: m.delta() for stem, m in group_lora(load_file(str(path))).items()}


def test_merge_loras_keeps_sdxl_names_and_sums_exactly(lora, locon, sdxl_model, tmp_path):
    """``merge loras --concat`` of an SDXL LoRA and LoCon: SDXL stems and SDXL metadata, ΔW = Σ ratio·ΔW
    per module; the SVD merge at full rank without clamping is the same sum; diffusers loads the result."""
    from nbkit.merge.lora_merge import merge_lora_files

    out = tmp_path / "concat.safetensors"
    merge_lora_files([(lora.lora_path, 0.5), (locon.lora_path, -0.3)], out, concat=True, progress=False)
    a, b, got = _deltas(lora.lora_path), _deltas(locon.lora_path), _deltas(out)
    assert set(got) == set(a) | set(b)
    assert all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for s in got)  # fmt: skip
    worst = max((got[s] - (0.5 * a.get(s, 0) - 0.3 * b.get(s, 0))).abs().max().item() for s in got)
    print(f"merge loras concat: max |ΔW - Σ ratio·ΔW| {worst:.3g}")
    assert worst < 1e-6
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"

    svd = tmp_path / "svd.safetensors"
    merge_lora_files([(lora.lora_path, 0.5), (locon.lora_path, -0.3)], svd, new_rank=8, new_conv_rank=8,
                     clamp_quantile=None, progress=False)  # fmt: skip
    svd_deltas = _deltas(svd)
    assert max((svd_deltas[s] - got[s]).abs().max().item() for s in got) < 1e-5
    pipe = _fresh(sdxl_model[0])
    pipe.load_lora_weights(str(out))  # kohya SDXL names all consumed


def test_lora_resize_keeps_sdxl_names_and_scales(lora, tmp_path):
    """``lora resize`` of an SDXL file: the same stems, kohya's new alpha = old_alpha/old_rank·new_rank,
    lossless at the old rank, the best rank-2 approximation at rank 2; SDXL metadata kept."""
    from nbkit.merge.lora_merge import resize_lora_file

    full, half = tmp_path / "r4.safetensors", tmp_path / "r2.safetensors"
    resize_lora_file(lora.lora_path, full, new_rank=4, progress=False)
    resize_lora_file(lora.lora_path, half, new_rank=2, progress=False)
    old, same, small = _deltas(lora.lora_path), _deltas(full), _deltas(half)
    assert set(old) == set(same) == set(small)
    assert max((same[s] - old[s]).abs().max().item() for s in old) < 1e-5
    sd = load_file(str(half))
    ranks = {k.removesuffix(".lora_down.weight"): v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    # kohya: new_alpha = 2.0 / 4 · new_rank (rank 1 for an all-zero module: the last text-encoder layers,
    # whose output SDXL's penultimate-layer conditioning never reads, got no gradient)
    assert {float(sd[f"{s}.alpha"]) - 0.5 * r for s, r in ranks.items()} == {0.0}
    assert sum(r == 2 for r in ranks.values()) > len(ranks) // 2
    for stem in list(old)[:6]:
        u, s, vh = torch.linalg.svd(old[stem].flatten(1).double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert (small[stem].flatten(1).double() - best).abs().max() < 1e-5
    with safe_open(str(half), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "2"


# ----------------------------------------------------------------------------- 2c. checkpoint merges


def test_checkpoint_merges_of_sgm_files(lora, sdxl_model, tmp_path):
    """Weighted sum and add difference of SDXL single files, streamed key by key in the SGM layout
    (A1111's rules): every tensor is (1−M)·A + M·B or A + M·(B − C), the SGM keys stay, the result loads;
    a diffusers SDXL folder as B is read in the SGM layout (same model: the merge is A again)."""
    from nbkit.merge.checkpoints import merge_checkpoints
    from nbkit.merge.lora_into import merge_lora_into

    a = sdxl_model[1]
    b = tmp_path / "b.safetensors"
    merge_lora_into(a, [(lora.lora_path, 1.0)], b, progress=False)
    ws, ad, same = tmp_path / "ws.safetensors", tmp_path / "ad.safetensors", tmp_path / "same.safetensors"
    merge_checkpoints(a, b, out=ws, method="weighted_sum", multiplier=0.25, progress=False)
    merge_checkpoints(a, b, a, out=ad, method="add_difference", multiplier=0.5, progress=False)
    merge_checkpoints(a, sdxl_model[0], out=same, method="weighted_sum", multiplier=0.5, progress=False)
    ta, tb, tws, tad, tsame = (load_file(str(p)) for p in (a, b, ws, ad, same))
    assert set(tws) == set(ta) == set(tad) == set(tsame)
    changed = [k for k in ta if ta[k].is_floating_point() and not torch.equal(ta[k], tb[k])]
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") and "in_proj" in k for k in changed)
    for k in ta:
        if not ta[k].is_floating_point() or not ta[k].numel():
            continue
        assert torch.allclose(tws[k], 0.75 * ta[k] + 0.25 * tb[k], atol=1e-6), k
        assert torch.allclose(tad[k], ta[k] + 0.5 * (tb[k] - ta[k]), atol=1e-6), k
        assert torch.allclose(tsame[k], ta[k], atol=1e-6), k
    got = _outputs(_load(ws))
    assert max(_max_diff(got, _outputs(_fresh(sdxl_model[0]))).values()) > 1e-5


# ----------------------------------------------------------------------------- 3. LyCORIS on the SDXL U-Net


def _sgm_view(unet: torch.nn.Module, single_file: Path) -> torch.nn.Module:
    """The U-Net's Linear/Conv layers (the same objects) registered under the module paths kohya's
    ``sdxl_original_unet.py`` has, found by matching each layer's weight to the SGM single file's
    ``model.diffusion_model.<path>.weight`` tensor: independent of nbkit's name map."""
    file = {k.removeprefix("model.diffusion_model.").removesuffix(".weight"): v for k, v in load_file(str(single_file)).items()
            if k.startswith("model.diffusion_model.") and k.endswith(".weight")}  # fmt: skip
    root = torch.nn.Module()
    for layer in unet.modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = layer.weight.detach()
        found = [p for p, v in file.items() if v.shape == weight.shape and torch.equal(v, weight)]
        if len(found) != 1:
            continue  # not (uniquely) in the file: no LyCORIS stem can name it
        parent = root
        *parents, leaf = found[0].split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


LOHA = dict(network_module="lycoris.kohya", network_args=["algo=loha", "conv_dim=2", "conv_alpha=1"], network_dim=4,
            network_alpha=2.0)  # fmt: skip


@pytest.fixture(scope="module")
def loha(sdxl_model, data, tmp_path_factory):
    """2 steps of LoHa (preset full, 3x3 convs at conv_dim 2) on the U-Net and both text encoders."""
    return _train(sdxl_model[0], data, tmp_path_factory.mktemp("sdxl-loha"), **LOHA)


def test_lycoris_picks_kohyas_sdxl_unet_modules():
    """``full``: every Linear/Conv inside Transformer2DModel/ResnetBlock2D/Downsample2D/Upsample2D (the
    classes kohya's sdxl_original_unet has), none of conv_in/conv_out/time_embedding (their kohya names
    are input_blocks.0.0/out.2/time_embed, which the preset's names do not match) nor add_embedding;
    ``attn-mlp``: the Transformer2DModel layers only. Stems are the SGM names."""
    import nbkit.models.tiny as tiny
    from nbkit.formats.kohya_sdxl import unet_stem
    from nbkit.networks.lycoris import LycorisNetwork
    from nbkit.train.config import LoRATrainConfig

    for preset, classes in (("full", ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")),
                            ("attn-mlp", ("Transformer2DModel",))):  # fmt: skip
        parts = tiny.build_tiny_sdxl_components()
        unet = parts["unet"]
        expected = set()
        for name, module in unet.named_modules():
            if type(module).__name__ in classes:
                expected |= {f"{name}.{n}" for n, m in module.named_modules()
                             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
        config = LoRATrainConfig(network_module="lycoris.kohya", network_dim=2,
                                 network_args=["algo=loha", f"preset={preset}"], network_train_unet_only=True)  # fmt: skip
        network = LycorisNetwork(config)
        network.inject({k: parts[k] for k in ("unet", "text_encoder", "text_encoder_2")})
        stems = {k.partition(".")[0] for k in network.state_dict()}
        assert stems == {unet_stem(p, dict(unet.config)) for p in expected}, preset
        assert not stems & {"lora_unet_input_blocks_0_0", "lora_unet_out_2", "lora_unet_time_embed_0",
                            "lora_unet_time_embed_2", "lora_unet_label_emb_0_0", "lora_unet_label_emb_0_2"}  # fmt: skip
        if preset == "full":
            assert any(s.endswith("_in_layers_2") for s in stems) and any(s.endswith("_0_op") for s in stems)


def _same_output_in_lycoris(result, sdxl_model, marker: str) -> None:
    """The trained file, loaded by the lycoris package's own loader (``create_lycoris_from_weights``)
    into a fresh U-Net seen under kohya's SGM module paths, gives the U-Net output of nbkit's in-memory
    model; every U-Net stem finds its module."""
    import lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    sd = load_file(str(result.lora_path))
    unet_sd = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in sd.items() if k.startswith("lora_unet_")}
    assert any(marker in k for k in unet_sd)
    fresh = _fresh(sdxl_model[0])
    base = _unet_out(fresh.unet)
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, _sgm_view(fresh.unet, sdxl_model[1]), weights_sd=unet_sd)
    assert len(network.loras) == len({k.partition(".")[0] for k in unet_sd})  # no stem left unmatched
    network.apply_to()
    theirs, ours = _unet_out(fresh.unet), _unet_out(result.pipeline.unet)
    diff = (theirs - ours).abs().max().item()
    print(f"SDXL {marker} in LyCORIS vs nbkit: U-Net max abs diff {diff:.3g}")
    assert diff < 1e-5 and (ours - base).abs().max().item() > 1e-4


def test_sdxl_loha_loads_in_lycoris_on_kohyas_unet_names(loha, sdxl_model):
    _same_output_in_lycoris(loha, sdxl_model, ".hada_w1_a")


def test_sdxl_lokr_with_dora_loads_in_lycoris_on_kohyas_unet_names(sdxl_model, data, tmp_path):
    """LoKr with DoRA-style weight decomposition on the SDXL U-Net, as LyCORIS reads it."""
    result = _train(sdxl_model[0], data, tmp_path, network_module="lycoris.kohya", network_dim=4, network_alpha=2.0,
                    network_args=["algo=lokr", "factor=4", "dora_wd=True", "preset=attn-mlp"],
                    network_train_unet_only=True)  # fmt: skip
    assert any(k.endswith(".dora_scale") for k in load_file(str(result.lora_path)))
    _same_output_in_lycoris(result, sdxl_model, ".lokr_w1")


def test_sdxl_loha_continues_and_merges(loha, sdxl_model, tmp_path):
    """network_weights = the SDXL LoHa file: the network comes back tensor for tensor; merged into the
    SGM single file, the checkpoint equals nbkit's trained model (U-Net and both text encoders)."""
    from nbkit.merge.lora_into import merge_lora_into
    from nbkit.networks.lycoris import LycorisNetwork

    file_sd = load_file(str(loha.lora_path))
    pipe = _fresh(sdxl_model[0])
    network = LycorisNetwork(_config(sdxl_model[0], Path("unused"), network_weights=str(loha.lora_path), **LOHA))
    network.inject({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    state = network.state_dict()
    assert set(state) == set(file_sd) and all(torch.equal(state[k].float(), file_sd[k].float()) for k in file_sd)
    out = tmp_path / "loha-merged.safetensors"
    merge_lora_into(sdxl_model[1], [(loha.lora_path, 1.0)], out, progress=False)
    diffs = _max_diff(_outputs(_load(out)), _outputs(loha.pipeline))
    print(f"SDXL LoHa merged into the SGM file: max |merged - trained| {diffs}")
    assert max(diffs.values()) <= MERGE_ATOL
