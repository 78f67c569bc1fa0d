"""LoRA merging: into a checkpoint (vs diffusers ``load_lora_weights``), LoRA + LoRA (SVD, concat), resize."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nbkit.formats.kohya_lora import addnet_hash_safetensors, build_metadata, check_kohya_state_dict, save_kohya_lora
from nbkit.merge.lora_into import merge_lora_into
from nbkit.merge.lora_math import group_lora, summed_deltas
from nbkit.merge.lora_merge import merge_lora_files, resize_lora_file
from nbkit.models.load import load_pipeline
from nbkit.models.tiny import build_tiny_pipeline
from nbkit.networks.lora import export_kohya_state_dict, inject_lora

RATIO = 0.7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops: on a shared 2-core machine a second thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_loras(arch: str, paths: list[Path]) -> list[Path]:
    """Tiny LoCons (dim 4 / alpha 2, conv 2 / 1), one per path, each with other random lora_up (kohya fp32)."""
    pipe = build_tiny_pipeline(arch)
    inject_lora(pipe.unet, pipe.text_encoder, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1)
    for seed, path in enumerate(paths, start=1):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for model in (pipe.unet, pipe.text_encoder):
                for name, param in model.named_parameters():
                    if ".lora_B." in name:
                        param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        sd = export_kohya_state_dict(pipe.unet, pipe.text_encoder)
        meta = build_metadata(
            arch=arch, network_dim=4, network_alpha=2, conv_dim=2, conv_alpha=1, output_name=path.stem
        )
        save_kohya_lora(sd, path, meta, "fp32")
    return paths


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=gen)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        unet = pipe.unet.eval()(sample, 10, encoder_hidden_states=hidden).sample
        te = pipe.text_encoder.eval()(ids)[0]
    return unet, te


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def case(request, tmp_path_factory, tiny_model_dirs):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}")
    folder, single = tiny_model_dirs(arch)
    lora, other = _make_loras(arch, [root / "a.safetensors", root / "b.safetensors"])
    ref = build_tiny_pipeline(arch)
    base = _outputs(ref)
    ref.load_lora_weights(str(lora), adapter_name="a")  # raises on any unconsumed key
    ref.set_adapters(["a"], adapter_weights=[RATIO])
    return SimpleNamespace(
        arch=arch, root=root, folder=folder, single=single, lora=lora, other=other, base=base, ref=_outputs(ref)
    )


def _assert_same(got, case) -> None:
    for out, ref, base in zip(got, case.ref, case.base):
        assert (out - ref).abs().max() <= 1e-4
        assert (out - base).abs().max() > 1e-3  # the LoRA really changed the model


def test_lora_into_single_file_matches_diffusers(case):
    out = case.root / "merged.safetensors"
    result = merge_lora_into(case.single, [(case.lora, RATIO)], out, progress=False)
    lora_modules = len(group_lora(load_file(str(case.lora))))
    assert result.modules == lora_modules
    if case.arch == "sd21":  # q/k/v of each layer share one in_proj_weight
        assert result.patched_keys == lora_modules - 2 * 4
    base_keys, _ = _header(case.single)
    keys, meta = _header(out)
    assert keys == base_keys and meta["format"] == "pt" and "nbkit.diffusers_config" in meta
    pipe, _ = load_pipeline(str(out))
    _assert_same(_outputs(pipe), case)


def test_lora_into_diffusers_folder_and_as_single_file(case):
    folder_out = case.root / "merged-folder"
    merge_lora_into(case.folder, [(case.lora, RATIO)], folder_out, progress=False)
    pipe, _ = load_pipeline(str(folder_out))
    _assert_same(_outputs(pipe), case)
    assert (folder_out / "tokenizer" / "vocab.json").is_file()
    file_out = case.root / "merged-from-folder.safetensors"
    merge_lora_into(case.folder, [(case.lora, RATIO)], file_out, save_precision="fp32", progress=False)
    pipe, _ = load_pipeline(str(file_out))
    _assert_same(_outputs(pipe), case)


def test_two_loras_add_up_and_half_precision(case, tiny_model_dirs):
    other = case.other
    out = case.root / "two.safetensors"
    merge_lora_into(case.single, [(case.lora, 0.5), (other, -0.25)], out, progress=False)
    base, merged = load_file(str(case.single)), load_file(str(out))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("lora" not in k for k in merged)
    half = case.root / "half.safetensors"
    merge_lora_into(case.single, [(case.lora, 1.0)], half, save_precision="fp16", progress=False)
    with safe_open(str(half), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == ({"F16", "I64"} if case.arch == "sd15" else {"F16"})


def test_lora_for_another_model_is_refused_before_writing(case, tmp_path, tiny_model_dirs):
    other_arch = "sd21" if case.arch == "sd15" else "sd15"
    _, other_single = tiny_model_dirs(other_arch)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=r"a\.safetensors"):
        merge_lora_into(other_single, [(case.lora, 1.0)], out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- LoRA + LoRA


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {stem: m.delta() for stem, m in group_lora(load_file(str(path))).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.reshape(b.shape) - b).norm() / b.norm())


def test_svd_merge_at_full_rank_is_exact(case):
    other = case.other
    out = case.root / "svd.safetensors"
    result = merge_lora_files([(case.lora, 1.0), (other, 0.5)], out, new_rank=4096, clamp_quantile=None)
    expected = summed_deltas([(group_lora(load_file(str(p))), r) for p, r in ((case.lora, 1.0), (other, 0.5))])
    got = _deltas(out)
    assert set(got) == set(expected)
    assert max(_rel(got[s], expected[s]) for s in expected) <= 1e-4
    check_kohya_state_dict(load_file(str(out)))
    _, meta = _header(out)
    assert meta["ss_network_dim"] == "4096" and meta["ss_network_alpha"] == "4096.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4096", "conv_alpha": "4096.0"}
    assert meta["sshs_model_hash"] and meta["modelspec.merged_from"] == "a, b" and result.mode == "svd"
    # kohya's default: U·S and Vh clamped to ± the 0.99 quantile of their values; alpha = rank
    small, raw = case.root / "svd2.safetensors", case.root / "svd2-raw.safetensors"
    merge_lora_files([(case.lora, 1.0), (other, 0.5)], small, new_rank=2, new_conv_rank=1)
    merge_lora_files([(case.lora, 1.0), (other, 0.5)], raw, new_rank=2, new_conv_rank=1, clamp_quantile=None)
    clamped, unclamped = group_lora(load_file(str(small))), group_lora(load_file(str(raw)))
    for stem, m in clamped.items():
        assert m.alpha == m.rank == (1 if m.is_conv3x3 else 2)
        u = unclamped[stem]
        hi = torch.quantile(torch.cat([u.up.flatten(), u.down.flatten()]), 0.99)
        assert torch.equal(m.up, u.up.clamp(-hi, hi)) and torch.equal(m.down, u.down.clamp(-hi, hi))
    pipe = build_tiny_pipeline(case.arch)
    pipe.load_lora_weights(str(small))  # diffusers consumes every key


def test_concat_is_exact(case):
    other = case.other
    out = case.root / "concat.safetensors"
    merge_lora_files([(case.lora, 0.8), (other, -0.5)], out, concat=True)
    expected = summed_deltas([(group_lora(load_file(str(p))), r) for p, r in ((case.lora, 0.8), (other, -0.5))])
    got = _deltas(out)
    assert max(_rel(got[s], expected[s]) for s in expected) <= 1e-6
    _, meta = _header(out)
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}


def test_resize_report_matches_a_direct_computation(case):
    out = case.root / "resized.safetensors"
    report = resize_lora_file(case.lora, out, new_rank=2, progress=False)
    old, new = _deltas(case.lora), _deltas(out)
    for m in report.modules:
        assert math.isclose(m.fro_retained, float(new[m.stem].norm() / old[m.stem].norm()), rel_tol=1e-4)
    direct = math.sqrt(
        sum(float(d.norm()) ** 2 for d in new.values()) / sum(float(d.norm()) ** 2 for d in old.values())
    )
    assert math.isclose(report.overall_fro_retained, direct, rel_tol=1e-4) and 0.3 < direct < 1.0
    modules = group_lora(load_file(str(out)))
    assert {(m.rank, m.alpha) for m in modules.values()} == {(2, 1.0)}  # (2/4)·2 linear, (1/2)·2 conv
    _, meta = _header(out)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "1.0")
    assert meta["sshs_model_hash"] != "" and meta["ss_training_comment"].startswith("dimension is resized from 4 to 2")
    dyn = case.root / "dynamic.safetensors"
    report = resize_lora_file(case.lora, dyn, new_rank=3, dynamic_method="sv_fro", dynamic_param=0.9, progress=False)
    _, meta = _header(dyn)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert all(m.new_rank <= 3 and (m.fro_retained >= 0.9 or m.new_rank == 3) for m in report.modules)
    assert "Frobenius norm retained: overall" in report.summary()


def test_cli_merge_loras_and_resize(case, capsys):
    from nbkit.cli import main

    out = case.root / "cli-resized.safetensors"
    assert main(["lora", "resize", str(case.lora), "--new_rank", "1", "--out", str(out), "--quiet"]) == 0
    assert "Frobenius norm retained" in capsys.readouterr().out
    merged = case.root / "cli-concat.safetensors"
    assert (
        main(["merge", "loras", "--lora", f"{case.lora}:0.5", "--lora", str(out), "--concat", "--out", str(merged)])
        == 0
    )
    assert main(["merge", "loras", "--lora", str(case.lora), "--concat", "--out", str(merged)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def _header(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata() or {}
    assert addnet_hash_safetensors(path)  # readable
    return keys, meta


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_every_real_size_lora_module_maps_to_a_checkpoint_key(arch):
    """SD1.5 / SD2.1 at full size (meta device): every default kohya LoCon module lands on a key of the
    original layout with a fitting shape; SD2's q/k/v on thirds of in_proj_weight."""
    from nbkit.formats.kohya_lora import te_stem, unet_stem
    from nbkit.merge.lora_into import ldm_target, meta_models, plan_patches
    from nbkit.merge.sources import read_config
    from nbkit.merge.streaming import TensorSpec
    from nbkit.models.config_dirs import CONFIGS_ROOT, SHIPPED_CONFIGS
    from nbkit.models.single_file import expected_shapes
    from nbkit.networks.lora import kohya_lora_targets

    folder = CONFIGS_ROOT / SHIPPED_CONFIGS[arch]
    unet_cfg, te_cfg, v2 = read_config(folder / "unet"), read_config(folder / "text_encoder"), arch != "sd15"
    unet, te = meta_models(unet_cfg, te_cfg)
    sd = {}
    for model, kind, stem in ((unet, "unet", unet_stem), (te, "text_encoder", te_stem)):
        for path in kohya_lora_targets(model, kind, conv_dim=1 if kind == "unet" else None):
            weight = model.get_submodule(path).weight
            down = (1, *weight.shape[1:]) if weight.dim() == 4 else (1, weight.shape[1])
            up = (weight.shape[0], 1, 1, 1) if weight.dim() == 4 else (weight.shape[0], 1)
            sd.update(
                {f"{stem(path)}.lora_down.weight": torch.zeros(down), f"{stem(path)}.lora_up.weight": torch.zeros(up)}
            )
            sd[f"{stem(path)}.alpha"] = torch.tensor(1.0)
    shapes = {k: TensorSpec(torch.float32, s) for k, s in expected_shapes(folder, v2).items()}
    hidden = int(te_cfg["hidden_size"])
    plan = plan_patches(
        [("real.safetensors", sd, 1.0)],
        unet_cfg,
        te_cfg,
        lambda kind, path, w: ldm_target(kind, path, unet_cfg, hidden, v2, w),
        lambda t: shapes.get(t.key),
    )
    assert sum(len(p) for p in plan.values()) == len(sd) // 3
    if v2:
        in_proj = [p for (_, k), p in plan.items() if k.endswith("attn.in_proj_weight")]
        assert len(in_proj) == 23 and all(
            sorted(x.rows for x in p) == [(0, 1024), (1024, 2048), (2048, 3072)] for p in in_proj
        )
