"""kohya LoRA export/import: key rules, metadata, hashes, and loading in diffusers/A1111/ComfyUI terms.

The base models are the tiny seeded SD1.5/SD2.1 pipelines; the LoRA "up" weights are randomised
(seeded) so that every adapted module changes the output.
"""

from __future__ import annotations

import hashlib
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from nbkit.formats.kohya_lora import (
    addnet_hash_legacy,
    addnet_hash_safetensors,
    build_metadata,
    check_kohya_state_dict,
    kohya_to_peft,
    precalculate_safetensors_hashes,
    save_kohya_lora,
    te_stem,
    unet_stem,
)
from nbkit.formats.kohya_metadata import REQUIRED_KEYS
from nbkit.models.tiny import build_tiny_pipeline
from nbkit.networks.lora import (
    export_kohya_state_dict,
    inject_lora,
    kohya_lora_targets,
    load_kohya_lora,
    lora_parameters,
)

DIM, ALPHA = 4, 2.0
CASES = {"sd15": ("sd15", None), "sd15-locon": ("sd15", 2), "sd21": ("sd21", None)}


# ----------------------------------------------------------------------------- helpers
def _perturb_up(*models: torch.nn.Module, seed: int = 1234) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _unet_out(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=gen)
    with torch.no_grad():
        return pipe.unet.eval()(sample, 10, encoder_hidden_states=hidden).sample


def _te_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder.eval()(ids)[0]


def _modules_by_stem(pipe) -> dict[str, torch.nn.Module]:
    out = {unet_stem(n): m for n, m in pipe.unet.named_modules() if n}
    out.update({te_stem(n): m for n, m in pipe.text_encoder.named_modules() if n})
    return out


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """An injected, perturbed tiny pipeline, its kohya export and the saved fp32/fp16 files."""
    arch, conv_dim = CASES[request.param]
    pipe = build_tiny_pipeline(arch)
    base = SimpleNamespace(unet=_unet_out(pipe), te=_te_out(pipe), modules=_modules_by_stem(pipe))
    adapted = inject_lora(pipe.unet, pipe.text_encoder, network_dim=DIM, network_alpha=ALPHA, conv_dim=conv_dim)
    _perturb_up(pipe.unet, pipe.text_encoder)
    sd = export_kohya_state_dict(pipe.unet, pipe.text_encoder)
    md = build_metadata(
        arch=arch, network_dim=DIM, network_alpha=ALPHA, conv_dim=conv_dim, output_name=f"test-{request.param}",
        steps=10, epoch=1, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, resolution=(512, 512),
        num_train_images=3, tag_frequency={"5_sks dog": {"sks": 3, "dog": 2}},
        dataset_dirs={"5_sks dog": {"n_repeats": 5, "img_count": 3}}, clip_skip=2, seed=42,
        mixed_precision="fp16", optimizer="bitsandbytes.optim.AdamW8bit", sd_model_name="tiny", noise_offset=0.05,
        training_started_at=1700000000.0, training_finished_at=1700000100.0, title="Test LoRA",
    )  # fmt: skip
    root = tmp_path_factory.mktemp(request.param)
    path = save_kohya_lora(sd, root / "lora.safetensors", md, "fp32")
    path16 = save_kohya_lora(sd, root / "lora16.safetensors", md, torch.float16)
    return SimpleNamespace(
        name=request.param, arch=arch, conv_dim=conv_dim, pipe=pipe, base=base, adapted=adapted,
        sd=sd, md=md, path=path, path16=path16, unet=_unet_out(pipe), te=_te_out(pipe),
    )  # fmt: skip


# ----------------------------------------------------------------------------- targets / injection
@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_default_target_counts(arch):
    pipe = build_tiny_pipeline(arch)
    unet_targets = kohya_lora_targets(pipe.unet, "unet")
    te_targets = kohya_lora_targets(pipe.text_encoder, "text_encoder")
    assert len(unet_targets) == 16 * 12
    assert len(te_targets) == pipe.text_encoder.config.num_hidden_layers * 6
    assert "down_blocks.0.attentions.0.proj_in" in unet_targets
    assert "encoder.layers.0.self_attn.out_proj" in te_targets
    locon = kohya_lora_targets(pipe.unet, "unet", conv_dim=4)
    assert set(unet_targets) < set(locon)
    extra = set(locon) - set(unet_targets)
    assert "down_blocks.0.downsamplers.0.conv" in extra and "up_blocks.0.upsamplers.0.conv" in extra
    assert "down_blocks.1.resnets.0.time_emb_proj" in extra and "conv_in" not in extra
    assert all(re.search(r"\.(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|[du]\w+samplers\.0\.conv)$", p)
               for p in extra)  # fmt: skip


def test_injection_trains_only_fp32_lora(case):
    unet, te = case.pipe.unet, case.pipe.text_encoder
    for model, kind in ((unet, "unet"), (te, "text_encoder")):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert len(list(lora_parameters(model))) == len(trainable) == 2 * len(case.adapted[kind])
        assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    assert len(case.adapted["unet"]) > 192 if case.conv_dim else len(case.adapted["unet"]) == 192


def test_fresh_lora_is_a_no_op_and_kohya_init():
    pipe = build_tiny_pipeline("sd15")
    before = _unet_out(pipe)
    inject_lora(pipe.unet, pipe.text_encoder, network_dim=DIM, network_alpha=ALPHA, conv_dim=2)
    assert torch.equal(_unet_out(pipe), before)
    layer = pipe.unet.get_submodule("down_blocks.1.resnets.0.conv1")
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert up.abs().max() == 0 and down.abs().max() > 0
    bound = 1 / (down[0].numel() ** 0.5)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert down.abs().max() <= bound + 1e-6


# ----------------------------------------------------------------------------- file rules
def test_every_key_follows_kohya_rules(case):
    tensors = load_file(case.path)
    assert tensors.keys() == case.sd.keys()
    check_kohya_state_dict(tensors)
    stems: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        assert stem.startswith(("lora_unet_", "lora_te_text_model_")), key
        assert part in ("lora_down.weight", "lora_up.weight", "alpha"), key
        assert "." not in stem, key
        stems.setdefault(stem, set()).add(part)
        base = case.base.modules[stem]
        is_3x3 = isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
        assert not is_3x3 or case.conv_dim, key
        if part == "alpha":
            assert tensor.dim() == 0 and tensor.item() == (1.0 if is_3x3 else ALPHA), key
        elif part == "lora_down.weight":
            assert tensor.shape[0] == (case.conv_dim if is_3x3 else DIM), key
        if isinstance(base, torch.nn.Conv2d) and part != "alpha":
            assert tensor.dim() == 4, key
            if part == "lora_down.weight":
                assert tuple(tensor.shape[2:]) == tuple(base.kernel_size)
            else:
                assert tuple(tensor.shape[2:]) == (1, 1)
        elif part != "alpha":
            assert isinstance(base, torch.nn.Linear) and tensor.dim() == 2, key
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in stems.values())
    assert len(stems) == len(case.adapted["unet"]) + len(case.adapted["text_encoder"])
    proj_in = tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert proj_in.dim() == (2 if case.arch == "sd21" else 4)  # SD1 Conv2d 1x1, SD2 Linear


def test_metadata_is_strings_with_required_keys(case):
    with safe_open(str(case.path), framework="pt") as f:
        md = f.metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    missing = [k for k in REQUIRED_KEYS + ("sshs_model_hash", "sshs_legacy_hash") if k not in md]
    assert not missing
    v2 = case.arch == "sd21"
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2.0" and md["ss_v2"] == str(v2)
    assert md["ss_base_model_version"] == ("sd_v2" if v2 else "sd_v1")
    assert md["modelspec.architecture"] == ("stable-diffusion-v2-512/lora" if v2 else "stable-diffusion-v1/lora")
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.implementation"] == "diffusers"
    assert md["modelspec.resolution"] == "512x512" and md["ss_resolution"] == "(512, 512)"
    assert md["modelspec.encoder_layer"] == "2" and md["modelspec.prediction_type"] == "epsilon"
    assert md["modelspec.title"] == "Test LoRA" and md["modelspec.date"].startswith("2023-11-1")
    assert json.loads(md["ss_tag_frequency"]) == {"5_sks dog": {"sks": 3, "dog": 2}}
    assert json.loads(md["ss_dataset_dirs"])["5_sks dog"]["n_repeats"] == 5
    if case.conv_dim:
        assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    else:
        assert "ss_network_args" not in md


def test_metadata_for_sd2_v_prediction():
    md = build_metadata(arch="sd21-v", min_timestep=100, extra={"cache_latents": True}, training_finished_at=1.7e9)
    assert md["ss_base_model_version"] == "sd_v2_v" and md["ss_v2"] == "True" and md["ss_clip_skip"] == "None"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.resolution"] == "768x768" and md["modelspec.timestep_range"] == "100,1000"
    assert md["ss_cache_latents"] == "True" and "modelspec.encoder_layer" not in md
    with pytest.raises(ValueError, match="unknown arch"):
        build_metadata(arch="sd3")


def _independent_hashes(path) -> tuple[str, str]:
    """kohya: serialize with only the ss_* metadata, sha256 after the 8+N header; legacy = bytes 1 MiB..+64 KiB."""
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    blob = st_save(load_file(path), {k: v for k, v in md.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len :]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_sshs_hashes_match_independent_implementation(case):
    for path in (case.path, case.path16):
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
        model_hash, legacy_hash = _independent_hashes(path)
        assert md["sshs_model_hash"] == model_hash
        assert md["sshs_legacy_hash"] == legacy_hash
        # The data region does not depend on the metadata: the written file hashes the same.
        assert addnet_hash_safetensors(path) == model_hash
    with safe_open(str(case.path), framework="pt") as f32, safe_open(str(case.path16), framework="pt") as f16:
        assert f32.metadata()["sshs_model_hash"] != f16.metadata()["sshs_model_hash"]


def test_save_hashes_only_ss_metadata_on_a_file_larger_than_1mib(tmp_path):
    gen = torch.Generator().manual_seed(4)
    sd = {"lora_unet_big.lora_down.weight": torch.randn(8, 40_000, generator=gen),
          "lora_unet_big.lora_up.weight": torch.randn(3, 8, generator=gen), "lora_unet_big.alpha": torch.tensor(4.0)}  # fmt: skip
    meta = build_metadata(arch="sd15", title="a long user title " * 20, training_finished_at=1.7e9)
    path = save_kohya_lora(sd, tmp_path / "big.safetensors", meta, "fp32")
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == _independent_hashes(path)
    assert md["sshs_legacy_hash"] != addnet_hash_legacy(path)  # the full header shifts the 1 MiB window
    assert md["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    blob = st_save(load_file(path), {"ss_x": "1"})
    assert precalculate_safetensors_hashes(load_file(path), {"ss_x": "1", "modelspec.title": "t"}) == (
        addnet_hash_safetensors(blob),
        addnet_hash_legacy(blob),
    )


def test_fp16_save_casts_every_tensor_including_alpha(case):
    tensors = load_file(case.path16)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    alphas = [t for k, t in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(t.dim() == 0 for t in alphas)
    assert {t.dtype for t in load_file(case.path).values()} == {torch.float32}


# ----------------------------------------------------------------------------- consumers
def test_diffusers_load_lora_weights_reproduces_outputs(case):
    pipe = build_tiny_pipeline(case.arch)
    pipe.load_lora_weights(str(case.path))  # raises on any unconsumed key
    unet, te = _unet_out(pipe), _te_out(pipe)
    assert (unet - case.unet).abs().max() < 1e-5
    assert (te - case.te).abs().max() < 1e-5
    assert (unet - case.base.unet).abs().max() > 1e-3
    assert (te - case.base.te).abs().max() > 1e-3


# A1111 extensions-builtin/Lora/networks.py::convert_diffusers_name_to_compvis (interop spec §1.3).
_RESNET_SUFFIX = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}  # fmt: skip


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    def suffix(kind: str, rest: str) -> str:
        return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * j}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * i}_{2 if i > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def ldm_unet_state_dict(unet) -> dict[str, torch.Tensor]:
    """diffusers -> LDM UNet keys, after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py."""
    top = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
           "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}  # fmt: skip
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]  # fmt: skip
    layer = [("mid_block.attentions.0.", "middle_block.1.")]
    layer += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(4):
        for j in range(2):
            layer.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            layer.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            layer.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            layer.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        layer.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
        layer.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    out = {}
    for key, value in unet.state_dict().items():
        new = next((ldm + key[len(hf) :] for hf, ldm in top.items() if key.startswith(hf)), key)
        if "resnets" in new:
            for hf, ldm in resnet:
                new = new.replace(hf, ldm)
        for hf, ldm in layer:
            new = new.replace(hf, ldm)
        out[new] = value
    return out


@pytest.fixture(scope="module")
def ldm_module_names():
    """A1111's network_layer_mapping names of the tiny UNets, checked against diffusers' own LDM converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    names = {}
    for arch in ("sd15", "sd21"):
        unet = build_tiny_pipeline(arch).unet
        ldm = ldm_unet_state_dict(unet)
        back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, dict(unet.config))
        assert set(back) == set(unet.state_dict())  # the LDM layout above is the one diffusers reads
        names[arch] = {"diffusion_model_" + k.rsplit(".", 1)[0].replace(".", "_") for k in ldm}
    return names


def test_a1111_compvis_mapping_resolves_every_key(case, ldm_module_names):
    stems = {k.partition(".")[0] for k in case.sd}
    unet_stems = [s for s in stems if s.startswith("lora_unet_")]
    unresolved = [
        s for s in unet_stems if a1111_compvis_name(s, case.arch == "sd21") not in ldm_module_names[case.arch]
    ]
    assert not unresolved
    te = case.pipe.text_encoder
    is_sd2 = case.arch == "sd21"
    for stem in (s for s in stems if s.startswith("lora_te_")):
        name = a1111_compvis_name(stem, is_sd2)
        if is_sd2:  # OpenCLIP names; q/k/v resolve through A1111's re_x_proj fallback onto attn.in_proj
            m = re.fullmatch(
                r"model_transformer_resblocks_(\d+)_(attn_[qkv]_proj|attn_out_proj|mlp_c_fc|mlp_c_proj)", name
            )
            assert m and int(m[1]) < te.config.num_hidden_layers, name
        else:  # FrozenCLIPEmbedder.transformer is a CLIPTextModel with the text_model segment
            assert name in {"transformer_text_model_" + n.replace(".", "_") for n, _ in te.named_modules()}, name
    assert (
        a1111_compvis_name("lora_unet_down_blocks_1_resnets_0_conv1", False)
        == "diffusion_model_input_blocks_4_0_in_layers_2"
    )


def test_comfyui_key_maps_cover_every_module(case):
    stems = {k.partition(".")[0] for k in case.sd}
    te_pattern = re.compile(
        r"lora_te_text_model_encoder_layers_(\d+)_(mlp_fc1|mlp_fc2|self_attn_[qkv]_proj|self_attn_out_proj)"
    )
    te_stems = [s for s in stems if s.startswith("lora_te")]
    assert te_stems and all(te_pattern.fullmatch(s) for s in te_stems)
    # comfy/lora.py::model_lora_keys_unet: "lora_unet_" + diffusers weight key without ".weight", "." -> "_"
    base = build_tiny_pipeline(case.arch).unet.state_dict()
    comfy = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in base if k.endswith(".weight")}
    assert {s for s in stems if s.startswith("lora_unet_")} <= comfy


# ----------------------------------------------------------------------------- round trip
def test_round_trip_through_load_kohya_lora(case):
    pipe = build_tiny_pipeline(case.arch)
    adapted = load_kohya_lora(case.path, pipe.unet, pipe.text_encoder)
    assert {k: sorted(v) for k, v in adapted.items()} == {k: sorted(v) for k, v in case.adapted.items()}
    assert (_unet_out(pipe) - case.unet).abs().max() < 1e-6
    assert (_te_out(pipe) - case.te).abs().max() < 1e-6
    again = export_kohya_state_dict(pipe.unet, pipe.text_encoder)
    assert again.keys() == case.sd.keys()
    assert all(torch.equal(again[k], case.sd[k]) for k in again)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora_parameters(pipe.unet))


def test_kohya_to_peft_without_model_and_without_text_model_segment(case):
    with_names = kohya_to_peft(
        case.sd,
        unet_module_names=[n for n, _ in case.pipe.unet.named_modules()],
        te_module_names=[n for n, _ in case.pipe.text_encoder.named_modules()],
    )
    guessed = kohya_to_peft(case.sd)  # SD-vocabulary heuristic
    assert [list(d) for d in with_names] == [list(d) for d in guessed]
    short = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in case.sd.items()}
    assert [list(d) for d in kohya_to_peft(short)] == [list(d) for d in guessed]
    assert all(k.startswith("encoder.layers.") for k in guessed[1])  # transformers >= 5.6 paths


def test_load_errors_are_clear(tmp_path):
    pipe = build_tiny_pipeline("sd15")
    bad = {"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "bundle_emb.sks.string_to_param.*": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"not SD1/SD2 kohya LoRA keys.*bundle_emb"):
        load_kohya_lora(bad, pipe.unet, pipe.text_encoder)
    unknown = {
        "lora_unet_nope_block_0.lora_down.weight": torch.zeros(1, 4),
        "lora_unet_nope_block_0.lora_up.weight": torch.zeros(4, 1),
    }
    with pytest.raises(ValueError, match=r"match no module of the unet.*lora_unet_nope_block_0"):
        load_kohya_lora(unknown, pipe.unet, pipe.text_encoder)
    sd21 = build_tiny_pipeline("sd21")
    inject_lora(sd21.unet, sd21.text_encoder, network_dim=DIM, network_alpha=ALPHA)
    with pytest.raises(ValueError, match=r"has shape .* but the model needs"):
        load_kohya_lora(export_kohya_state_dict(sd21.unet, sd21.text_encoder), pipe.unet, pipe.text_encoder)
    with pytest.raises(ValueError, match="must be .safetensors"):
        save_kohya_lora(export_kohya_state_dict(sd21.unet, None), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a valid kohya LoRA"):
        save_kohya_lora({"lora_unet_a.lora_down.weight": torch.zeros(2, 3)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="must be str"):
        save_kohya_lora(export_kohya_state_dict(sd21.unet, None), tmp_path / "x.safetensors", {"ss_steps": 3})
