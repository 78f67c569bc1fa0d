"""LyCORIS networks (``network_module = "lycoris.kohya"``): LoHa, LoKr, DoRA trained by nbkit, checked
against the lycoris-lora package itself.

The reference is the package's own loader, ``lycoris.create_lycoris_from_weights`` (it rebuilds every
module from the file with the module classes' ``make_module_from_state_dict``, as
``lycoris.kohya.create_network_from_weights`` does; the kohya entry point itself cannot be used on an SD
U-Net with 4.1.3: its ``LycorisNetworkKohya`` constructor asserts on ``time_embedding.linear_1``, which
the default preset selects twice). The text encoder it loads into sits under a ``text_model`` attribute:
kohya's (transformers 4) module paths, which the file's stems name and A1111/ComfyUI map.

Not covered here (after the loop refactor lands): exact resume after kill -9 with a LyCORIS network,
forms and the memory estimator.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nbkit.errors import ConfigError

lycoris = pytest.importorskip("lycoris", reason="pip install 'nbkit[lycoris]' (the dev extra pulls it)")

from nbkit.formats.kohya_lora import build_metadata, save_kohya_lora  # noqa: E402
from nbkit.formats.lycoris import group_lycoris, lycoris_stem  # noqa: E402
from nbkit.merge.lora_into import merge_lora_into  # noqa: E402
from nbkit.merge.lora_merge import merge_lora_files, resize_lora_file  # noqa: E402
from nbkit.models.load import load_pipeline  # noqa: E402
from nbkit.models.tiny import build_tiny_pipeline  # noqa: E402
from nbkit.networks.base import make_network  # noqa: E402
from nbkit.networks.lycoris import LycorisNetwork, lycoris_targets, preset_targets  # noqa: E402
from nbkit.train.config import LoRATrainConfig  # noqa: E402

RATIO = 0.7
#: the two trained runs: LoHa with tucker 3x3 convs (hada_t1/t2); LoKr with DoRA, U-Net only
RUNS = {
    "loha": dict(network_args=["algo=loha", "conv_dim=2", "conv_alpha=1", "use_tucker=True"], network_dim=4,
                 network_alpha=2.0),
    "lokr_dora": dict(network_args=["algo=lokr", "factor=4", "dora_wd=True"], network_dim=2, network_alpha=1.0,
                      network_train_unet_only=True),
}  # fmt: skip
PARTS = {"loha": set(lycoris.LohaModule.weight_list), "lokr": set(lycoris.LokrModule.weight_list),
         "locon": set(lycoris.LoConModule.weight_list)}  # fmt: skip
pytestmark = pytest.mark.filterwarnings("ignore:more regularisation images than training images")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before, logger = torch.get_num_threads(), logging.getLogger("LyCORIS")
    level = logger.level
    torch.set_num_threads(1)
    logger.setLevel(logging.ERROR)  # LyCORIS logs every module it builds
    yield
    torch.set_num_threads(before)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from nbkit.demo import make_sample_dataset

    root = tmp_path_factory.mktemp("lycoris-data")
    pool = sorted(make_sample_dataset(root / "pool", size=64).glob("*.png"))
    folder = root / "inst"
    folder.mkdir()
    for i in (0, 7):
        shutil.copy(pool[i], folder / pool[i].name)
        shutil.copy(pool[i].with_suffix(".txt"), folder / pool[i].with_suffix(".txt").name)
    return folder


def _config(model_dir, out: Path, **options) -> LoRATrainConfig:
    common = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), output_name="lyco",
                  resolution=64, max_train_steps=3, optimizer_type="AdamW", mixed_precision="no",
                  gradient_checkpointing=False, learning_rate=1e-2, seed=1, network_module="lycoris.kohya")  # fmt: skip
    return LoRATrainConfig(**{**common, **options})


def _train(config: LoRATrainConfig, images: Path):
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    raw = {"datasets": [{"subsets": [{"image_dir": str(images), "caption_extension": ".txt"}]}]}
    return train_lora(config, resolve_datasets(config, raw, images.parent), device="cpu")


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, images, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Each run of RUNS trained 3 steps by the real trainer: its config, file, tensors and in-memory model."""
    model_dir, single = tiny_model_dirs("sd15")
    out = {}
    for name, options in RUNS.items():
        config = _config(model_dir, tmp_path_factory.mktemp(name), **options)
        result = _train(config, images)
        with safe_open(str(result.lora_path), "pt") as f:
            meta = f.metadata()
        out[name] = SimpleNamespace(config=config, path=result.lora_path, sd=load_file(str(result.lora_path)),
                                    meta=meta, pipe=result.pipeline, model_dir=model_dir, single=single)  # fmt: skip
    return out


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """U-Net output on a fixed noisy latent and context; text-encoder hidden states of a fixed prompt."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet = pipe.unet.eval()(sample, 10, encoder_hidden_states=hidden).sample
        te = pipe.text_encoder.eval()(ids)[0]
    return unet, te


def kohya_shaped(pipe):
    """The pipeline's U-Net and text encoder with kohya's module paths (see the module docstring)."""
    holder = torch.nn.Module()
    holder.text_model = pipe.text_encoder
    return pipe.unet, holder


def lycoris_applied(model, state: dict[str, torch.Tensor], multiplier: float = 1.0):
    """``model`` with ``state`` applied by the LyCORIS package's own loader (kept alive on the models)."""
    unet, holder = kohya_shaped(model)
    for prefix, target in (("lora_unet_", unet), ("lora_te_", holder)):
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        network, _ = lycoris.create_lycoris_from_weights(multiplier, None, target, weights_sd=part)
        assert len(network.loras) == len({k.partition(".")[0] for k in part}), "the loader skipped modules"
        network.apply_to()
    return model


def _perturbed_network(arch: str, args: list[str], **options):
    """A LyCORIS network injected into a fresh tiny model, every parameter moved off its init (seeded)."""
    pipe = build_tiny_pipeline(arch)
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=args, **options)
    network = make_network(config)
    network.inject({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for part in ("unet", "text_encoder"):
            for p in network.parameters(part):
                p.add_(torch.randn(p.shape, generator=gen) * (0.02 if p.dim() and p.shape[-1] == 1 else 0.2))
    return pipe, network


# ----------------------------------------------------------------------------- the trained files


@pytest.mark.parametrize("name", list(RUNS))
def test_lycoris_loader_reproduces_the_trained_model(runs, name):
    run = runs[name]
    base = _outputs(load_pipeline(str(run.model_dir))[0])
    ours = _outputs(run.pipe)
    theirs = _outputs(lycoris_applied(load_pipeline(str(run.model_dir))[0], run.sd))
    diff_unet = (ours[0] - theirs[0]).abs().max().item()
    diff_te = (ours[1] - theirs[1]).abs().max().item()
    print(f"{name}: |nbkit - LyCORIS| U-Net {diff_unet:.3g}, text encoder {diff_te:.3g}; "
          f"|trained - base| U-Net {(ours[0] - base[0]).abs().max().item():.3g}")  # fmt: skip
    assert diff_unet < 1e-5 and diff_te < 1e-5
    assert (ours[0] - base[0]).abs().max() > 1e-3  # the network really changed the model
    # the LyCORIS modules live inside the base models (resume state, DDP), which stay frozen
    trained = [n for n, p in run.pipe.unet.named_parameters() if p.requires_grad]
    assert trained and all(".lycoris." in n for n in trained)
    if run.config.train_text_encoder:
        assert (ours[1] - base[1]).abs().max() > 1e-4


@pytest.mark.parametrize("name", list(RUNS))
def test_every_key_follows_lycoris_naming(runs, name):
    run = runs[name]
    algo = json.loads(run.meta["ss_network_args"])["algo"]
    pipe = build_tiny_pipeline("sd15")
    unet, holder = kohya_shaped(pipe)  # kohya's module paths: what LyCORIS's own stems are built from
    known = {"lora_unet_" + n.replace(".", "_") for n, _ in unet.named_modules()}
    known |= {"lora_te_" + n.replace(".", "_") for n, _ in holder.named_modules()}
    stems: dict[str, set[str]] = {}
    for key, tensor in run.sd.items():
        stem, _, part = key.partition(".")
        stems.setdefault(stem, set()).add(part)
        assert stem in known, key
        assert part in PARTS[algo], f"{key}: not a {algo} tensor of LyCORIS's weight_list"
        if part == "alpha":
            assert tensor.dim() == 0
    assert any(s.startswith("lora_unet_") for s in stems)
    te = [s for s in stems if s.startswith("lora_te_")]
    assert (len(te) > 0) == run.config.train_text_encoder
    assert all(s.startswith("lora_te_text_model_encoder_layers_") for s in te)  # the form A1111/ComfyUI map
    for stem, parts in stems.items():
        assert {"alpha"} < parts and ("dora_scale" in parts) == ("dora_wd=True" in run.config.network_args), stem
    if name == "loha":  # tucker 3x3 convs, 2-D factors elsewhere
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
        assert {"hada_t1", "hada_t2"} <= stems[conv] and run.sd[f"{conv}.hada_t1"].shape[2:] == (3, 3)
        assert "hada_t1" not in stems["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert run.meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(run.meta["ss_network_args"]) == dict(a.split("=", 1) for a in run.config.network_args)
    assert run.meta["ss_network_dim"] == str(run.config.network_dim)
    group_lycoris(run.sd)  # nbkit's own reader accepts it


@pytest.mark.parametrize("preset", ["attn-mlp", "unet-convblock-only"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "locon"])
def test_module_selection_matches_lycoris_kohya(preset, algo):
    """The same stems, tensors and shapes as ``lycoris.kohya.create_network`` on a kohya-shaped model (the
    default preset ``full`` makes LyCORIS 4.1.3 assert there; it is these two presets' union plus names)."""
    import lycoris.kohya

    args = [f"algo={algo}", f"preset={preset}", "conv_dim=2", "factor=4"]
    _, network = _perturbed_network("sd15", args, network_dim=4, network_alpha=2.0)
    def described(state):  # shapes, and the values of alpha (ranks, conv_alpha, LoKr's full-matrix rule)
        return {k: float(v) if k.endswith(".alpha") else tuple(v.shape) for k, v in state.items()}

    ours = described(network.state_dict())
    ref = build_tiny_pipeline("sd15")
    unet, holder = kohya_shaped(ref)
    kw = dict(a.split("=", 1) for a in args)
    theirs = {}
    for lora in lycoris.kohya.create_network(1.0, 4, 2.0, None, holder, unet, **kw).loras:
        theirs.update({f"{lora.lora_name}.{k}": v for k, v in lora.custom_state_dict().items()})
    assert ours == described(theirs)


def test_full_preset_and_kohya_class_names():
    """``full`` (the default): convs with conv_dim = network_dim, conv_in/conv_out/time_embedding by name;
    ``attn-only`` targets kohya's ``CrossAttention`` blocks, diffusers' ``Attention``."""
    pipe = build_tiny_pipeline("sd15")
    full = {p for p, _ in lycoris_targets(pipe.unet, "unet", preset_targets("full"))}
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.0.downsamplers.0.conv",
            "down_blocks.2.resnets.0.conv_shortcut", "up_blocks.0.upsamplers.0.conv"} <= full  # fmt: skip
    attn = {p for p, _ in lycoris_targets(pipe.unet, "unet", preset_targets("attn-only"))}
    assert all(".attn1." in p or ".attn2." in p for p in attn)
    assert len(attn) == 16 * 2 * 4  # 16 transformer blocks, attn1/attn2, to_q/k/v/out.0
    assert lycoris_stem("text_encoder", "encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert lycoris_stem("text_encoder", "encoder.layers.0.mlp.fc1", sdxl=True).startswith("lora_te1_text_model_")
    assert lycoris_stem("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1").startswith("lora_te2_text_model_enc")


def test_alpha_zero_means_alpha_equals_rank():
    """LyCORIS's rule (``alpha = lora_dim if alpha is None or alpha == 0``), the same as kohya's LoRA."""
    _, network = _perturbed_network("sd15", ["algo=loha", "conv_dim=2", "conv_alpha=0"], network_dim=4,
                                    network_alpha=0)  # fmt: skip
    state = network.state_dict()
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in state.items() if k.endswith(".alpha")}
    ranks = {stem: state[f"{stem}.hada_w1_b"].shape[0] for stem in alphas}
    assert alphas == {stem: float(r) for stem, r in ranks.items()} and set(ranks.values()) == {2, 4}
    assert {m.scale for m in group_lycoris(state).values()} == {1.0}


def test_sdxl_text_encoders_are_te1_and_te2():
    """SDXL: the two text encoders' stems are lora_te1_/lora_te2_ (what LyCORIS's kohya network writes
    for a list of text encoders), read back by LyCORIS's loader output for output; U-Net stems are the
    SGM names of kohya's SAI-layout U-Net (tests/test_sdxl_merge.py loads them in LyCORIS)."""
    import nbkit.models.tiny as tiny

    if not hasattr(tiny, "build_tiny_sdxl_components"):
        pytest.skip("no tiny SDXL model in this tree")
    parts = tiny.build_tiny_sdxl_components()
    models = {k: parts[k] for k in ("unet", "text_encoder", "text_encoder_2")}
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=["algo=loha"], network_dim=2)
    network = LycorisNetwork(config)
    network.inject(models)
    unet_stems = {k.partition(".")[0] for k in network.state_dict() if k.startswith("lora_unet_")}
    assert unet_stems and all(s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                            "lora_unet_output_blocks_")) for s in unet_stems)  # fmt: skip
    parts = tiny.build_tiny_sdxl_components()
    models = {k: parts[k] for k in ("unet", "text_encoder", "text_encoder_2")}
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=["algo=loha"], network_dim=2,
                             network_train_text_encoder_only=True)  # fmt: skip
    ids = torch.arange(77)[None] % 50
    with torch.no_grad():
        base = {name: models[name].eval()(ids)[0] for name in ("text_encoder", "text_encoder_2")}
    network = LycorisNetwork(config)
    network.inject(models)
    with torch.no_grad():
        for p in network.parameters("text_encoder") + network.parameters("text_encoder_2"):
            p.add_(0.1)
    state = network.state_dict()
    prefixes = {k.partition("text_model_")[0] for k in state}
    assert prefixes == {"lora_te1_", "lora_te2_"} and network.parameters("unet") == []
    ref = tiny.build_tiny_sdxl_components()
    holder = torch.nn.Module()
    holder.text_model = ref["text_encoder"]
    for prefix, target in (("lora_te1_", holder), ("lora_te2_", ref["text_encoder_2"])):
        part = {"lycoris_" + k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        lyco, _ = lycoris.create_lycoris_from_weights(1.0, None, target, weights_sd=part)
        assert len(lyco.loras) == len({k.partition(".")[0] for k in part})
        lyco.apply_to()
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            ours, theirs = models[name].eval()(ids)[0], ref[name].eval()(ids)[0]
            assert (ours - theirs).abs().max() < 1e-6 and (ours - base[name]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- merging


def test_merged_checkpoint_equals_the_network_applied(runs, tmp_path):
    """``merge lora-into`` a single file: LoHa at RATIO vs LyCORIS at multiplier RATIO; LoKr+DoRA at 1
    vs nbkit's trained model; into a diffusers folder, one file given twice adds up (0.5 + 0.25)."""
    loha, dora = runs["loha"], runs["lokr_dora"]
    out = tmp_path / "loha.safetensors"
    result = merge_lora_into(loha.single, [(loha.path, RATIO)], out, progress=False)
    assert result.modules == len({k.partition(".")[0] for k in loha.sd})
    got = _outputs(load_pipeline(str(out))[0])
    want = _outputs(lycoris_applied(load_pipeline(str(loha.model_dir))[0], loha.sd, RATIO))
    base = _outputs(load_pipeline(str(loha.model_dir))[0])
    for g, w, b in zip(got, want, base, strict=True):
        assert (g - w).abs().max() <= 1e-4 and (g - b).abs().max() > 1e-4
    print(f"loha merged at {RATIO}: max |merged - LyCORIS| {max((g - w).abs().max().item() for g, w in zip(got, want)):.3g}")

    out = tmp_path / "dora.safetensors"
    merge_lora_into(dora.single, [(dora.path, 1.0)], out, progress=False)
    got, want = _outputs(load_pipeline(str(out))[0]), _outputs(dora.pipe)
    print(f"lokr+dora merged: max |merged - nbkit| U-Net {(got[0] - want[0]).abs().max().item():.3g}")
    assert (got[0] - want[0]).abs().max() <= 1e-4 and (got[1] - base[1]).abs().max() == 0  # U-Net only
    # DoRA at another strength: LyCORIS's rule, (W + ΔW)·(m·(s/‖W + ΔW‖ − 1) + 1)
    out = tmp_path / "dora-ratio.safetensors"
    merge_lora_into(dora.single, [(dora.path, RATIO)], out, progress=False)
    got = _outputs(load_pipeline(str(out))[0])[0]
    want = _outputs(lycoris_applied(load_pipeline(str(dora.model_dir))[0], dora.sd, RATIO))[0]
    assert (got - want).abs().max() <= 1e-4

    folder = tmp_path / "twice"
    merge_lora_into(loha.model_dir, [(loha.path, 0.5), (loha.path, 0.25)], folder, progress=False)
    ref = lycoris_applied(load_pipeline(str(loha.model_dir))[0], loha.sd, 0.75)
    for g, w in zip(_outputs(load_pipeline(str(folder))[0]), _outputs(ref), strict=True):
        assert (g - w).abs().max() <= 1e-4


def test_sd2_merge_with_dora_on_in_proj_thirds(tiny_model_dirs, tmp_path):
    """SD2's OpenCLIP text encoder stores q/k/v in one ``in_proj_weight``: DoRA's row norms on each third.
    The reference is nbkit's in-memory network run by LyCORIS's forward at multiplier RATIO."""
    _, single = tiny_model_dirs("sd21")
    pipe, network = _perturbed_network("sd21", ["algo=loha", "dora_wd=True", "preset=attn-mlp"], network_dim=2,
                                       network_alpha=1.0)  # fmt: skip
    path = tmp_path / "sd2.safetensors"
    save_kohya_lora(network.state_dict(), path, build_metadata(arch="sd21", network_module="lycoris.kohya"), "fp32")
    for loras in network.loras.values():
        for lora in loras.values():
            lora.multiplier = RATIO
    out = tmp_path / "merged.safetensors"
    merge_lora_into(single, [(path, RATIO)], out, progress=False)
    for g, w in zip(_outputs(load_pipeline(str(out))[0]), _outputs(pipe), strict=True):
        assert (g - w).abs().max() <= 1e-4


def test_merge_loras_and_resize_refuse_lycoris_files(runs, tmp_path):
    path = runs["loha"].path
    with pytest.raises(ValueError, match=r"LyCORIS loha file.*no LoHa/LoKr.*merge lora-into"):
        merge_lora_files([(path, 1.0), (runs["lokr_dora"].path, 1.0)], tmp_path / "m.safetensors", new_rank=4,
                         progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="merge lora-into"):
        resize_lora_file(path, tmp_path / "r.safetensors", new_rank=2, progress=False)
    assert not list(tmp_path.iterdir())


def test_lycoris_file_for_another_model_is_refused_before_writing(runs, tiny_model_dirs, tmp_path):
    _, sd2_single = tiny_model_dirs("sd21")
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"match no module of the model|does not fit"):
        merge_lora_into(sd2_single, [(runs["loha"].path, 1.0)], out, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- continuing


def test_continue_training_from_a_lycoris_file(runs, images, tmp_path):
    run = runs["loha"]
    # injected from the file, the network is the trained one, tensor for tensor
    config = _config(run.model_dir, tmp_path, **RUNS["loha"], network_weights=str(run.path))
    pipe = load_pipeline(str(run.model_dir))[0]
    network = make_network(config)
    network.inject({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    state = network.state_dict()
    assert set(state) == set(run.sd) and all(torch.equal(state[k], run.sd[k]) for k in state)
    assert (_outputs(pipe)[0] - _outputs(run.pipe)[0]).abs().max() < 1e-6
    # and the trainer goes on from it
    result = _train(config, images)
    again = load_file(str(result.lora_path))
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in run.sd.items()}
    moved = max((again[k] - run.sd[k]).abs().max().item() for k in again)
    assert 0 < moved < 0.2  # trained on from the file's weights (a fresh init differs from them by O(1))
    with safe_open(str(result.lora_path), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"])["algo"] == "loha"


@pytest.mark.parametrize("args", [["algo=lokr", "use_tucker=True", "conv_dim=2", "decompose_both=True"],
                                  ["algo=loha", "dora_wd=True", "wd_on_output=False"],
                                  ["algo=locon", "use_tucker=True", "dora_wd=True"]])  # fmt: skip
def test_files_the_lycoris_loader_gets_wrong_still_continue(args, tmp_path):
    """Tucker LoKr and column-wise DoRA: LyCORIS 4.1.3's own loader cannot rebuild them
    (make_module_from_state_dict); nbkit's network_weights does, tensor for tensor and output for output."""
    pipe, network = _perturbed_network("sd15", args, network_dim=2, network_alpha=1.0)
    path = tmp_path / "f.safetensors"
    save_kohya_lora(network.state_dict(), path, build_metadata(network_module="lycoris.kohya"), "fp32")
    again = build_tiny_pipeline("sd15")
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=args, network_weights=str(path))
    loaded = LycorisNetwork(config)
    loaded.inject({"unet": again.unet, "text_encoder": again.text_encoder})
    state, want = loaded.state_dict(), network.state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in state)
    for g, w in zip(_outputs(again), _outputs(pipe), strict=True):
        assert (g - w).abs().max() < 1e-6


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(("args", "options", "message"), [
    (["algo=lohaa"], {}, r"algo=lohaa is not a LyCORIS algorithm: use one of lora, locon, loha, lokr"),
    (["algo=ia3"], {}, r"algo=ia3 is a LyCORIS algorithm nbkit does not train"),
    (["conv_dimm=4"], {}, r"unknown LyCORIS option 'conv_dimm' \(did you mean conv_dim\?\).*dora_wd"),
    (["dora_wd=yes"], {}, r"dora_wd=yes: write dora_wd=True or dora_wd=False"),
    (["factor=eight"], {}, r"factor=eight: must be a whole number"),
    (["factor=0"], {}, r"factor=0: LoKr's factor is -1"),
    (["preset=everything"], {}, r"preset=everything: not a built-in LyCORIS preset \(full, full-lin, attn-mlp"),
    (["preset=ia3"], {}, r"preset=ia3: per-module algorithms"),
    (["algo"], {}, r"'algo' is not key=value"),
    (["rank_dropout=1.5"], {}, r"rank_dropout=1.5: a dropout is in \[0, 1\)"),
    (["loraplus_lr_ratio=16"], {}, r"loraplus_lr_ratio: LoRA\+ learning rates are not supported"),
    (["conv_dim=2"], {"conv_dim": 4}, r"conv_dim = 4 but network_args has conv_dim=2: give it once"),
])  # fmt: skip
def test_bad_network_args_give_clear_messages(args, options, message):
    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=args, **options)
    with pytest.raises(ConfigError, match=message):
        make_network(config)


def test_config_fields_and_aliases_become_lycoris_options():
    from nbkit.networks.lycoris import check_network_args

    config = LoRATrainConfig(network_module="lycoris.kohya", network_args=["algo=LoHa", "use_cp=True"], conv_dim=4,
                             conv_alpha=1.0, network_dropout=0.1)  # fmt: skip
    args = check_network_args(config)
    assert (args.algo, args.use_tucker, args.conv_dim, args.conv_alpha, args.dropout) == ("loha", True, 4, 1.0, 0.1)
    assert args.written == {"algo": "LoHa", "use_cp": "True", "conv_dim": "4", "conv_alpha": "1.0", "dropout": "0.1"}


def test_readers_point_lycoris_files_to_the_lycoris_path(runs):
    from nbkit.merge.lora_math import group_lora
    from nbkit.networks.lora import load_kohya_lora

    pipe = build_tiny_pipeline("sd15")
    with pytest.raises(ValueError, match=r"a LyCORIS file .*lycoris\.kohya"):
        load_kohya_lora(runs["loha"].sd, pipe.unet, pipe.text_encoder)
    with pytest.raises(ValueError, match="merge it into a checkpoint with `nbkit merge lora-into`"):
        group_lora(runs["loha"].sd)
    broken = dict(runs["lokr_dora"].sd)
    mixed = next(k for k in broken if k.endswith(".lokr_w1")).partition(".")[0]
    broken[f"{mixed}.hada_w1_a"] = torch.zeros(2, 2)
    half = next(k for k in broken if k.endswith(".lokr_w2_b") and not k.startswith(mixed + "."))
    broken.pop(half)
    with pytest.raises(ValueError) as err:
        group_lycoris(broken, "broken.safetensors")
    assert f"{mixed}: mixes the tensors of loha and lokr" in str(err.value)
    assert f"{half.partition('.')[0]}: needs lokr_w2 or both lokr_w2_a and lokr_w2_b" in str(err.value)
