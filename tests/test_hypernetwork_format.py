"""Hypernetwork .pt files as A1111 and ComfyUI read them: the pickle gate, the layer layout
rebuilt from the saved dict by each reader's rules, A1111's defaults, the .optim sidecar, blending."""

from __future__ import annotations

import collections
import itertools
import pickle
import re
import warnings
import zipfile

import pytest
import torch
from torch import nn

from nbkit.config import ConfigError
from nbkit.formats.a1111_hypernetwork import (
    COMFYUI_ACTIVATIONS,
    HypernetworkFormatError,
    load_hypernetwork_file,
    load_optimizer_sidecar,
    load_saved_dict,
    save_optimizer_sidecar,
)
from nbkit.networks.hypernetwork.blend import blend_hypernetwork_files, blend_hypernetworks
from nbkit.networks.hypernetwork.create import HypernetworkStructure, create_hypernetwork, create_hypernetwork_file
from nbkit.networks.hypernetwork.module import ACTIVATIONS, UNUSABLE_ACTIVATIONS, Hypernetwork


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread. On the shared 2-core machine two OpenMP threads make a small
    LayerNorm ~200x slower (they wait for each other while other test runs hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SIZES = [32, 64]  # the tiny sd15 UNet's attention widths (cross-attention context 32, blocks 32/64)
USABLE = sorted(set(ACTIVATIONS) - set(UNUSABLE_ACTIVATIONS))
DROPOUTS = {"none": {}, "a1111-default": {"use_dropout": True, "last_layer_dropout": True},
            "user": {"use_dropout": True, "dropout_structure": "0, 0.25, 0.1, 0"}}


# ---------------------------------------------------------------- A1111 modules/safe.py, re-implemented


class A1111Unpickler(pickle.Unpickler):
    """``RestrictedUnpickler`` of A1111's ``modules/safe.py`` (allow-list of interop spec §2.4)."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter",
                                                 "_rebuild_device_tensor_from_numpy"):
            return getattr(torch._utils, name)
        if module == "torch" and name in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                          "ByteStorage"):
            return getattr(torch, name)
        if module == "numpy.core.multiarray" and name in ("scalar", "_reconstruct"):
            import numpy.core.multiarray

            return getattr(numpy.core.multiarray, name)
        if module == "numpy" and name in ("dtype", "ndarray"):
            import numpy

            return getattr(numpy, name)
        if module == "_codecs" and name == "encode":
            import _codecs

            return _codecs.encode
        if module == "__builtin__" and name == "set":
            return set
        raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")


_ALLOWED_ZIP_NAME = re.compile(r"^[^/]+/((data/\d+)|version|data\.pkl)$")


def a1111_check_pt(path) -> None:
    """A1111 ``check_pt``: a zip must hold only allowed names and one data.pkl; the legacy format
    is five pickles; every pickle goes through the restricted unpickler. Raises when A1111 would."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not _ALLOWED_ZIP_NAME.match(name):
                    raise ValueError(f"bad file inside {path}: {name}")
            data_pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
            assert len(data_pkl) == 1
            with z.open(data_pkl[0]) as fh:
                A1111Unpickler(fh).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as fh:
            unpickler = A1111Unpickler(fh)
            for _ in range(5):
                unpickler.load()


# ---------------------------------------------------------------- the readers' layer rules, re-implemented


def a1111_rebuild(sd: dict, dim: int, saved: dict) -> nn.Sequential:
    """Interop spec §2.2 from the saved fields: Linear, activation, LayerNorm, Dropout per step."""
    ls, act = saved["layer_structure"], saved["activation_func"]
    layers: list[nn.Module] = []
    for i in range(len(ls) - 1):
        layers.append(nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
        if act not in ("linear", None) and not (i >= len(ls) - 2 and not saved["activate_output"]):
            layers.append(ACTIVATIONS[act]())
        if saved["is_layer_norm"]:
            layers.append(nn.LayerNorm(int(dim * ls[i + 1])))
        if saved["dropout_structure"][i + 1] > 0:
            layers.append(nn.Dropout(saved["dropout_structure"][i + 1]))
    net = nn.Sequential(*layers)
    net.load_state_dict({k.removeprefix("linear."): v for k, v in sd.items()}, strict=True)
    return net.eval()


COMFY_ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
                     "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign,
                     "mish": nn.Mish}


def comfy_rebuild(sd: dict, saved: dict) -> nn.Sequential:
    """ComfyUI ``load_hypernetwork_patch``: layers from the order of the ``.weight`` keys."""
    act = saved.get("activation_func", "linear")
    is_ln, use_dropout = saved.get("is_layer_norm", False), saved.get("use_dropout", False)
    activate_output, last_layer_dropout = saved.get("activate_output", False), saved.get("last_layer_dropout", False)
    names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    layers: list[nn.Module] = []
    i = 0
    while i < len(names):
        last, penultimate = i == len(names) - 1, i == len(names) - 2
        weight = sd[f"{names[i]}.weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": sd[f"{names[i]}.bias"]})
        layers.append(linear)
        if act != "linear" and (not last or activate_output):
            layers.append(COMFY_ACTIVATIONS[act]())
        if is_ln:
            i += 1
            ln = nn.LayerNorm(sd[f"{names[i]}.weight"].shape[0])
            ln.load_state_dict({"weight": sd[f"{names[i]}.weight"], "bias": sd[f"{names[i]}.bias"]})
            layers.append(ln)
        if use_dropout and not last and (not penultimate or last_layer_dropout):
            layers.append(nn.Dropout(p=0.3))
        i += 1
    return nn.Sequential(*layers).eval()


def _make(activation: str, layer_norm: bool, dropout: str, activate_output: bool, **extra) -> Hypernetwork:
    structure = HypernetworkStructure(enable_sizes=SIZES, layer_structure="1, 2, 1.5, 1", activation_func=activation,
                                      add_layer_norm=layer_norm, activate_output=activate_output,
                                      **DROPOUTS[dropout], **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ComfyUI warnings are tested on their own
        return create_hypernetwork("hn", structure, seed=0)


def _randomize(hn: Hypernetwork) -> Hypernetwork:
    """Weights far from the near-identity init, so any layout difference shows in the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return hn


pytestmark = pytest.mark.filterwarnings("ignore:Implicit dimension choice:UserWarning")  # softmax & co, as in A1111
COMBOS = list(itertools.product([False, True], list(DROPOUTS), [False, True]))


@pytest.mark.parametrize("activation", USABLE)
def test_every_file_passes_a1111_gate_and_rebuilds_in_a1111_and_comfyui(activation, tmp_path):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)) * 2
    for layer_norm, dropout, activate_output in COMBOS:
        hn = _randomize(_make(activation, layer_norm, dropout, activate_output))
        path = hn.save(tmp_path / f"{activation}-{layer_norm}-{dropout}-{activate_output}.pt")
        assert not zipfile.is_zipfile(path)  # the legacy format (torch's zip adds records A1111 refuses)
        a1111_check_pt(path)  # A1111's zip-name rule and unpickler allow-list accept it
        saved = load_saved_dict(path)  # ComfyUI: weights_only
        # Every field stored explicitly (writer rules), plain containers, fp32 tensors.
        assert {"step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                "last_layer_dropout", "optional_info"} <= set(saved)
        assert isinstance(saved["activation_func"], str) and len(saved["dropout_structure"]) == 4
        assert saved["dropout_structure"][0] == saved["dropout_structure"][-1] == 0
        for size in SIZES:
            assert type(saved[size]) is tuple and all(type(sd) is dict for sd in saved[size])
            assert all(t.dtype == torch.float32 for sd in saved[size] for t in sd.values())
            for index in (0, 1):
                sd = saved[size][index]
                ours = hn.pair(size)[index].eval()
                with torch.no_grad():
                    expected = ours(x[..., :size], 1.0)
                    a1111 = x[..., :size] + a1111_rebuild(sd, size, saved)(x[..., :size])
                    assert torch.allclose(a1111, expected, atol=1e-6), (layer_norm, dropout, activate_output)
                    if activation not in COMFYUI_ACTIVATIONS:
                        continue  # ComfyUI refuses these activations (nbkit warns at creation)
                    comfy = x[..., :size] + comfy_rebuild(sd, saved)(x[..., :size])
                # ComfyUI counts LayerNorm weights as layers, so with LayerNorm it also activates the
                # last layer; the same network only when that changes nothing (nbkit warns about it).
                same_in_comfy = not (layer_norm and activation != "linear" and not activate_output)
                assert torch.allclose(comfy, expected, atol=1e-6) == same_in_comfy, (layer_norm, dropout)


def test_torch_default_zip_format_is_rejected_and_fp16_accepted(tmp_path):
    hn = _make("relu", False, "none", False)
    data = hn.to_data()
    from nbkit.formats.a1111_hypernetwork import save_hypernetwork_file, to_saved_dict

    torch.save(to_saved_dict(data), tmp_path / "zip.pt")  # torch's default: a zip with byteorder records
    with pytest.raises(ValueError, match="bad file inside"):
        a1111_check_pt(tmp_path / "zip.pt")
    data.layers = {s: tuple({k: v.half() for k, v in sd.items()} for sd in pair) for s, pair in data.layers.items()}
    save_hypernetwork_file(data, tmp_path / "half.pt")
    a1111_check_pt(tmp_path / "half.pt")
    assert load_saved_dict(tmp_path / "half.pt")[32][0]["linear.0.weight"].dtype == torch.float16
    data.layers[32][0]["linear.0.weight"] = data.layers[32][0]["linear.0.weight"].bfloat16()
    save_hypernetwork_file(data, tmp_path / "bf16.pt")  # no bf16 storage in A1111's list: written as fp32
    a1111_check_pt(tmp_path / "bf16.pt")
    assert load_saved_dict(tmp_path / "bf16.pt")[32][0]["linear.0.weight"].dtype == torch.float32


def test_round_trip_and_optimizer_sidecar(tmp_path):
    hn = _randomize(_make("leakyrelu", True, "user", True, weight_init="KaimingNormal"))
    hn.step, hn.sd_checkpoint, hn.optional_info = 123, "0123456789", "note"
    path = hn.save(tmp_path / "hn.pt")
    again = Hypernetwork.load(path)
    assert again.structure() == hn.structure() and again.step == 123 and again.sd_checkpoint == "0123456789"
    assert again.weight_init == "KaimingNormal" and again.optional_info == "note"
    assert all(torch.equal(a, b) for a, b in zip(hn.state_dict().values(), again.state_dict().values(), strict=True))
    optimizer = torch.optim.AdamW(hn.parameters(), lr=1e-3)
    sum(p.sum() for p in hn.parameters()).backward()
    optimizer.step()
    sidecar = save_optimizer_sidecar(path, "AdamW", optimizer.state_dict())
    assert sidecar.name == "hn.pt.optim"
    a1111_check_pt(sidecar)
    name, state = load_optimizer_sidecar(path)
    assert name == "AdamW" and len(state["state"]) == len(list(hn.parameters()))
    hn.step = 124
    hn.save(path)  # the .pt changed: the sidecar's hash no longer matches, so it is ignored
    with pytest.warns(UserWarning, match="hash mismatch"):
        assert load_optimizer_sidecar(path) is None


def test_a1111_defaults_for_old_and_comfyui_era_files(tmp_path):
    d = 32
    old = {"linear1.weight": torch.randn(2 * d, d), "linear1.bias": torch.randn(2 * d),
           "linear2.weight": torch.randn(d, 2 * d), "linear2.bias": torch.randn(d)}
    torch.save({d: (old, dict(old))}, tmp_path / "old.pt")  # the first A1111 files: two named Linears
    hn = Hypernetwork.load(tmp_path / "old.pt")
    assert hn.name == "old" and hn.layer_structure == [1, 2, 1] and hn.activation_func is None
    x = torch.randn(3, d)
    with torch.no_grad():
        expected = x + (x @ old["linear1.weight"].T + old["linear1.bias"]) @ old["linear2.weight"].T + old["linear2.bias"]
        assert torch.allclose(hn.pair(d)[0](x), expected, atol=1e-5)
    assert load_hypernetwork_file(tmp_path / "old.pt").activate_output is True  # A1111's default
    # A ComfyUI-era file with relu and no activate_output: A1111 activates the output (default True).
    relu = _randomize(_make("relu", False, "a1111-default", True)).to_data()  # trained with dropout layers
    from nbkit.formats.a1111_hypernetwork import to_saved_dict

    saved = to_saved_dict(relu)
    for key in ("activate_output", "dropout_structure", "last_layer_dropout", "weight_initialization"):
        del saved[key]
    saved["use_dropout"], saved["last_layer_dropout"] = True, True
    torch.save(saved, tmp_path / "era.pt")
    data = load_hypernetwork_file(tmp_path / "era.pt")
    assert data.activate_output is True and data.dropout_structure == [0.0, 0.3, 0.3, 0.0]
    assert data.weight_initialization == "Normal"
    era = Hypernetwork.load(tmp_path / "era.pt")
    assert [type(m).__name__ for m in era.pair(32)[0].linear] == [
        "Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear", "ReLU"]
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}}, tmp_path / "embedding.pt")
    with pytest.raises(HypernetworkFormatError, match="embedding.pt: no integer size keys"):
        Hypernetwork.load(tmp_path / "embedding.pt")


def test_create_options_and_errors(tmp_path):
    hn = create_hypernetwork("my hn!", HypernetworkStructure(), seed=0)
    assert hn.name == "my hn" and hn.sizes == [320, 640, 768, 1280]  # A1111's defaults
    linear = hn.pair(320)[0].linear[0]
    assert abs(linear.weight.std().item() - 0.01) < 1e-3 and linear.bias.abs().max() == 0
    wide = create_hypernetwork("x", HypernetworkStructure(enable_sizes=[32], normal_std=0.1), seed=0)
    assert abs(wide.pair(32)[0].linear[0].weight.std().item() - 0.1) < 0.02
    same = create_hypernetwork("x", HypernetworkStructure(enable_sizes=[32], generation_seed=7))
    again = create_hypernetwork("x", HypernetworkStructure(enable_sizes=[32], generation_seed=7))
    assert torch.equal(same.pair(32)[1].linear[0].weight, again.pair(32)[1].linear[0].weight)
    for bad, match in (({"layer_structure": "2, 1"}, "start and end with 1"),
                       ({"activation_func": "threshold"}, "needs threshold"),
                       ({"activation_func": "nope"}, "unknown"),
                       ({"weight_init": "Zeros"}, "weight_init"),
                       ({"use_dropout": True, "dropout_structure": "0, 0.3"}, "give 3 values"),
                       ({"dropout_structure": "0, 0.3, 0"}, "use_dropout is false")):
        with pytest.raises(ConfigError, match=match):
            create_hypernetwork("x", HypernetworkStructure(enable_sizes=[32], **bad))
    with pytest.warns(UserWarning, match="ComfyUI refuses"):
        create_hypernetwork("x", HypernetworkStructure(enable_sizes=[32], activation_func="gelu"))
    path = create_hypernetwork_file("made", tmp_path, HypernetworkStructure(enable_sizes=[32]))
    with pytest.raises(ConfigError, match="already exists"):
        create_hypernetwork_file("made", tmp_path, HypernetworkStructure(enable_sizes=[32]))
    a1111_check_pt(path)


def test_blend_is_a_weighted_sum_and_refuses_other_structures(tmp_path):
    a = _randomize(_make("relu", False, "none", False)).save(tmp_path / "a.pt")
    b = _make("relu", False, "none", False)
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(2.0)
    b.save(tmp_path / "b.pt")
    out = blend_hypernetwork_files([(a, 0.25), (tmp_path / "b.pt", 0.5)], tmp_path / "ab.pt")
    a1111_check_pt(out)
    blended, first = Hypernetwork.load(out), Hypernetwork.load(a)
    assert blended.name == "ab" and blended.structure() == first.structure()
    for (_, x), (_, y) in zip(blended.state_dict().items(), first.state_dict().items(), strict=True):
        assert torch.allclose(x, 0.25 * y + 1.0)
    normalized = blend_hypernetworks([(a, 1.0), (a, 3.0)], "n", normalize=True)
    assert torch.allclose(normalized.pair(32)[0].linear[0].weight, first.pair(32)[0].linear[0].weight)
    _make("tanh", False, "none", False).save(tmp_path / "tanh.pt")
    with pytest.raises(ConfigError, match=r"tanh\.pt.*activation_func differs"):
        blend_hypernetwork_files([(a, 0.5), (tmp_path / "tanh.pt", 0.5)], tmp_path / "bad.pt")

