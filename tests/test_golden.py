"""Golden outputs: each method's small fixed run must give the weights it gave when recorded.

These guard refactoring of the training loops (issue 16: one loop, methods and networks as
plug-ins): the same settings, seed and data must give the same trained weights, max abs diff
<= 1e-6 on the CPU with the same pinned torch. Four runs on the tiny SD1.5 model at 64 px, one
thread: LoRA (U-Net + text encoder, gradient accumulation, min-SNR and noise offset), LoCon
(``conv_dim``, a warm-up + cosine schedule), DreamBooth with prior preservation (reg images,
``prior_loss_weight`` 0.5) and a hypernetwork.

A fingerprint (``tests/golden/<run>.json``) holds the hash of the trained tensors' names and, per
tensor in name order, its size, its sum and its projection on a fixed random vector (float64), plus
64 weights sampled across all tensors and 16 values of the trained U-Net's output on a fixed input.
Weights that differ by at most 1e-6 each keep every sample within 1e-6 and every sum and projection
within 1e-6 times the tensor's size; the output values are compared within 1e-5.

Regenerate after an *intended* change of the numbers (say why in the commit message)::

    NBKIT_REGEN_GOLDEN=1 OMP_NUM_THREADS=1 python -m pytest -q tests/test_golden.py

which rewrites the JSON files and skips the comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from nbkit.demo import make_sample_dataset

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("NBKIT_REGEN_GOLDEN") == "1"
WEIGHT_ATOL = 1e-6
OUTPUT_ATOL = 1e-5
SAMPLES = 64
pytestmark = pytest.mark.filterwarnings("ignore:more regularisation images than training images")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Two captioned images, and DreamBooth's kohya folders (two instances, two class images)."""
    root = tmp_path_factory.mktemp("golden-data")
    pool = sorted(make_sample_dataset(root / "pool", size=64).glob("*.png"))
    folders = {"inst": root / "inst", "db_train": root / "db" / "train" / "1_sks shape",
               "db_reg": root / "db" / "reg" / "1_shape"}  # fmt: skip
    for folder in folders.values():
        folder.mkdir(parents=True)
    for name, picks, caption in (("inst", (0, 7), True), ("db_train", (0, 7), False), ("db_reg", (4, 9), False)):
        for i in picks:
            shutil.copy(pool[i], folders[name] / pool[i].name)
            if caption:
                shutil.copy(pool[i].with_suffix(".txt"), folders[name] / pool[i].with_suffix(".txt").name)
    folders["root"] = root
    return folders


def _lora_run(model_dir, images, out: Path, locon: bool):
    from safetensors.torch import load_file

    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import resolve_datasets

    common = dict(pretrained_model_name_or_path=str(model_dir), output_dir=str(out), output_name="golden",
                  resolution=64, max_train_steps=3, optimizer_type="AdamW", mixed_precision="no",
                  gradient_checkpointing=False, seed=1)  # fmt: skip
    if locon:
        options = dict(network_dim=4, network_alpha=4.0, conv_dim=2, conv_alpha=1.0, network_train_unet_only=True,
                       learning_rate=1e-3, train_batch_size=2, lr_scheduler="cosine", lr_warmup_steps=1)
    else:
        options = dict(network_dim=4, network_alpha=2.0, unet_lr=1e-3, text_encoder_lr=5e-4, learning_rate=1e-3,
                       train_batch_size=1, gradient_accumulation_steps=2, min_snr_gamma=5.0, noise_offset=0.05)
    config = LoRATrainConfig(**common, **options)
    raw = {"datasets": [{"subsets": [{"image_dir": str(images["inst"]), "caption_extension": ".txt"}]}]}
    result = train_lora(config, resolve_datasets(config, raw, images["root"]), device="cpu")
    return load_file(str(result.lora_path)), result.pipeline.unet


def _dreambooth_run(model_dir, images, out: Path):
    from nbkit.train.dreambooth import train_dreambooth
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig, folder_datasets

    config = DreamBoothTrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(out),
                                   output_name="golden", resolution=64, train_data_dir=str(images["db_train"].parent),
                                   reg_data_dir=str(images["db_reg"].parent), prior_loss_weight=0.5,
                                   train_batch_size=2, max_train_steps=3, optimizer_type="AdamW", learning_rate=1e-4,
                                   mixed_precision="no", gradient_checkpointing=False, save_precision="fp16",
                                   save_state=False, seed=1)  # fmt: skip
    result = train_dreambooth(config, folder_datasets(config), device="cpu")
    unet = result.pipeline.unet
    return {name: p.detach() for name, p in unet.named_parameters()}, unet


def _hypernetwork_run(model_dir, images, out: Path):
    from nbkit.networks.hypernetwork.cli import hypernetwork_datasets
    from nbkit.networks.hypernetwork.module import Hypernetwork
    from nbkit.train.hypernetwork import train_hypernetwork
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    config = HypernetworkTrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(out),
                                     output_name="golden", resolution=64, train_data_dir=str(images["inst"]),
                                     train_batch_size=2, max_train_steps=3, learning_rate="1e-3",
                                     mixed_precision="no", gradient_checkpointing=False, activation_func="relu",
                                     template_file="subject_filewords.txt", seed=1)  # fmt: skip
    result = train_hypernetwork(config, hypernetwork_datasets(config, {}, images["root"]), device="cpu")
    return Hypernetwork.load(result.hypernetwork_path).state_dict(), result.pipeline.unet


def _unet_output(unet) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    unet.eval()
    with torch.no_grad():
        out = unet(sample, torch.tensor([500]), cond).sample.double().flatten()
    return out[torch.linspace(0, out.numel() - 1, 16).round().long()].tolist()


def fingerprint(tensors: dict[str, torch.Tensor], unet) -> dict:
    """The run's fingerprint: per tensor (in name order) its sum and its projection on a fixed random
    vector, ``SAMPLES`` weights spread across all tensors, and the trained U-Net's output."""
    names = sorted(tensors)
    flat = [tensors[name].detach().cpu().double().flatten() for name in names]
    projections = []
    for name, t in zip(names, flat, strict=True):
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        projections.append(float(t @ torch.randn(t.numel(), generator=generator, dtype=torch.float64)))
    every = torch.cat(flat)
    return {
        "torch": torch.__version__,
        "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
        "numel": [t.numel() for t in flat],
        "sums": [float(t.sum()) for t in flat],
        "projections": projections,
        "samples": every[torch.linspace(0, every.numel() - 1, SAMPLES).round().long()].tolist(),
        "unet_output": _unet_output(unet),
    }


def _dump(record: dict) -> str:
    """One key per line, numbers to 10 significant digits (far finer than the tolerances)."""
    def value(v):
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return f"{v:.10g}" if isinstance(v, float) else json.dumps(v)

    return "{\n" + ",\n".join(f"{json.dumps(k)}: {value(record[k])}" for k in sorted(record)) + "\n}\n"


RUNS = {
    "lora": lambda model_dir, images, out: _lora_run(model_dir, images, out, locon=False),
    "locon": lambda model_dir, images, out: _lora_run(model_dir, images, out, locon=True),
    "dreambooth_prior": _dreambooth_run,
    "hypernetwork": _hypernetwork_run,
}


@pytest.mark.parametrize("run", list(RUNS))
def test_golden_weights(run, tiny_model_dirs, images, tmp_path):
    model_dir, _ = tiny_model_dirs("sd15")
    tensors, unet = RUNS[run](model_dir, images, tmp_path / "out")
    got = fingerprint(tensors, unet)
    path = GOLDEN / f"{run}.json"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(_dump(got), encoding="utf-8")
        pytest.skip(f"NBKIT_REGEN_GOLDEN=1: wrote {path}")
    assert path.is_file(), f"{path} is missing: record it with NBKIT_REGEN_GOLDEN=1"
    want = json.loads(path.read_text(encoding="utf-8"))
    note = f" (recorded with torch {want['torch']}, this is {torch.__version__})" if want["torch"] != got["torch"] else ""
    assert got["names_sha256"] == want["names_sha256"], f"{run}: other trained tensors than recorded{note}"
    assert got["numel"] == want["numel"], f"{run}: trained tensors of other sizes than recorded{note}"
    names = sorted(tensors)
    bad = [f"{names[i]}: sum {got['sums'][i]:.10g} != {want['sums'][i]:.10g}, projection "
           f"{got['projections'][i]:.10g} != {want['projections'][i]:.10g}"
           for i, numel in enumerate(want["numel"])
           if abs(got["sums"][i] - want["sums"][i]) > WEIGHT_ATOL * numel
           or abs(got["projections"][i] - want["projections"][i]) > WEIGHT_ATOL * numel]  # fmt: skip
    assert not bad, f"{run}: {len(bad)} tensors differ from the golden run{note}, e.g.\n" + "\n".join(bad[:5])
    worst = max(abs(a - b) for a, b in zip(got["samples"], want["samples"], strict=True))
    assert worst <= WEIGHT_ATOL, f"{run}: sampled weights differ by up to {worst:.3g}{note}"
    worst = max(abs(a - b) for a, b in zip(got["unet_output"], want["unet_output"], strict=True))
    assert worst <= OUTPUT_ATOL, f"{run}: the trained U-Net's output differs by up to {worst:.3g}{note}"
