"""Sample images during training: kohya prompt files, samplers, reproducible seeds, state restored."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nbkit.train import sampling
from nbkit.train.sample_prompts import SamplePrompt, SamplePromptError, load_sample_prompts
from nbkit.train.sampling import (
    SAMPLER_NAMES,
    derive_seed,
    generate_samples,
    make_sampler,
    sample_file_name,
    sample_grid,
    should_sample,
)

PROMPTS_TXT = """\
# kohya sample prompts: comments and blank lines are skipped

a red circle --n blurry, lowres --w 64 --h 96 --d 7 --l 5.5 --s 2 --ss euler_a
   # an indented '#' is a prompt in kohya (it tests line[0])
a blue square --W 96 --H 64 --D 11 --L 3 --S 3 --SS k_dpm_2_a
a yellow triangle --w 64 --h 64 --d 13 --s 2
"""

EXPECTED = [
    SamplePrompt("a red circle", "blurry, lowres", 64, 96, 7, 5.5, 2, "euler_a", 0),
    SamplePrompt("# an indented '#' is a prompt in kohya (it tests line[0])", index=1),
    SamplePrompt("a blue square", None, 96, 64, 11, 3.0, 3, "k_dpm_2_a", 2),
    SamplePrompt("a yellow triangle", None, 64, 64, 13, 7.5, 2, None, 3),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are latency bound: on a shared 2-vCPU box, 2 intra-op threads made each image
    10-50x slower (thread contention), 1 thread keeps this file well under its time budget."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd15():
    from nbkit.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd15")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _prompt(text: str) -> SamplePrompt:
    return load_sample_prompts(text)[0]


def _generate(pipe, prompts, out, **kw):
    kw.setdefault("step", 5)
    kw.setdefault("epoch", None)
    kw.setdefault("output_name", "test")
    kw.setdefault("default_size", 64)
    return generate_samples(pipe, prompts, output_dir=out, **kw)


# ---------------------------------------------------------------- prompt files


def test_txt_file_with_every_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS_TXT, encoding="utf-8")
    assert load_sample_prompts(path) == EXPECTED
    assert load_sample_prompts(str(path)) == EXPECTED
    assert load_sample_prompts(PROMPTS_TXT) == EXPECTED  # text, not a path
    clamped = load_sample_prompts("a --s 5000\nb --s 0")
    assert [p.sample_steps for p in clamped] == [1000, 1]  # kohya clamps --s to 1..1000


def test_options_of_other_kohya_scripts_are_ignored_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        assert load_sample_prompts("a cat --cn control.png --d 3") == [SamplePrompt("a cat", seed=3, index=0)]
    assert "--cn is not used" in caplog.text


def test_toml_and_json_parse_to_the_same_prompts(tmp_path):
    toml = tmp_path / "prompts.toml"
    toml.write_text(
        """
[prompt]
sample_steps = 2

[[prompt.subset]]
prompt = "a red circle"
negative_prompt = "blurry, lowres"
width = 64
height = 96
seed = 7
scale = 5.5
sample_sampler = "euler_a"

[[prompt.subset]]
prompt = "a yellow triangle"
width = 64
height = 64
seed = 13
""",
        encoding="utf-8",
    )
    expected = [EXPECTED[0], SamplePrompt("a yellow triangle", None, 64, 64, 13, 7.5, 2, None, 1)]
    assert load_sample_prompts(toml) == expected

    array = tmp_path / "array.toml"  # nbkit also reads a [[prompt]] array of tables
    array.write_text('[[prompt]]\nprompt = "a yellow triangle"\nwidth = 64\nheight = 64\nseed = 13\nsample_steps = 2\n')
    assert load_sample_prompts(array) == [replace(expected[1], index=0)]

    js = tmp_path / "prompts.json"
    js.write_text(json.dumps([
        {"prompt": "a red circle", "negative_prompt": "blurry, lowres", "width": 64, "height": 96, "seed": 7,
         "scale": 5.5, "sample_steps": 2, "sample_sampler": "euler_a"},
        "a yellow triangle --w 64 --h 64 --d 13 --s 2",  # kohya: a string item is a prompt line
    ]))
    assert load_sample_prompts(js) == expected
    assert [load_sample_prompts(p.to_line())[0] for p in expected] == [replace(p, index=0) for p in expected]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a cat --w 6x4", "--w expects a whole number, got '6x4'"),
        ("a cat --d -1", "--d expects a whole number"),
        ("a cat --l high", "--l expects a number, got 'high'"),
        ("a cat --ss euler_b", "unknown sampler 'euler_b'; valid samplers: ddim"),
        ("a cat --x 3", "unknown option '--x 3'"),
        ("a cat --n", "--n needs a value"),
        ("a cat --w 0", "width must be a whole number >= 1"),
    ],
)
def test_bad_values_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(f"# header\n\n{line}\n", encoding="utf-8")
    with pytest.raises(SamplePromptError) as err:
        load_sample_prompts(path)
    assert f"{path} line 3:" in str(err.value) and message in str(err.value)


def test_bad_toml_and_json_entries(tmp_path):
    dup = tmp_path / "dup.toml"
    dup.write_text('[prompt]\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\nwidth = 96\n')
    with pytest.raises(SamplePromptError, match=r"dup.toml \[\[prompt.subset\]\] 1: width also set in \[prompt\]"):
        load_sample_prompts(dup)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "steps": 3}]))
    with pytest.raises(SamplePromptError, match=r"typo.json item 2: unknown key 'steps' \(did you mean"):
        load_sample_prompts(typo)
    with pytest.raises(SamplePromptError, match="seed must be a whole number"):
        load_sample_prompts([{"prompt": "a", "seed": True}])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_sample_prompts(tmp_path / "missing.txt")
    with pytest.raises(SamplePromptError, match="must be a .txt, .toml, .json file"):
        load_sample_prompts(tmp_path / "prompts.yaml")


# ---------------------------------------------------------------- generation


def test_file_prompts_give_requested_sizes_reproducibly(sd15, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS_TXT, encoding="utf-8")
    prompts = [p for p in load_sample_prompts(path) if p.seed is not None]  # the 3 prompts with sizes
    first = _generate(sd15, prompts, tmp_path / "a")
    again = _generate(sd15, prompts[::-1], tmp_path / "b")[::-1]  # a second run, in the other order
    assert [im.size for _, im, _ in first] == [(64, 96), (96, 64), (64, 64)]
    names = ["test_000005_00_7.png", "test_000005_02_11.png", "test_000005_03_13.png"]
    assert [p.name for _, _, p in first] == names and [p.name for _, _, p in again] == names
    for (_, a, pa), (_, b, _) in zip(first, again):
        assert np.array_equal(_pixels(a), _pixels(b)), "same prompt and seed, different pixels"
        assert np.array_equal(_pixels(Image.open(pa).convert("RGB")), _pixels(a))
    assert sorted(f.name for f in (tmp_path / "a" / "sample").iterdir()) == names  # no temp files left


def test_each_option_changes_the_image(sd15, tmp_path):
    base = "a red circle --w 64 --h 64 --d 1 --l 7.5 --s 2"
    variants = [base, base.replace("--d 1", "--d 2"), base.replace("--l 7.5", "--l 3"),
                base.replace("--s 2", "--s 3"), base + " --n blue"]
    images = [im for _, im, _ in _generate(sd15, load_sample_prompts("\n".join(variants)), tmp_path)]
    for label, image in zip(["--d", "--l", "--s", "--n"], images[1:]):
        assert not np.array_equal(_pixels(images[0]), _pixels(image)), f"{label} did not change the image"


def test_every_sampler_builds_and_generates(sd15, tmp_path):
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
                "dpmsingle": "DPMSolverSinglestepScheduler", "heun": "HeunDiscreteScheduler",
                "dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler"}
    for name in SAMPLER_NAMES:
        scheduler = make_sampler(name, sd15.scheduler.config)
        assert type(scheduler).__name__ == expected[name.removeprefix("k_")], name
    assert make_sampler("dpmsolver", sd15.scheduler).config.algorithm_type == "dpmsolver"
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; valid samplers: ddim, pndm, lms, k_lms"):
        make_sampler("plms", sd15.scheduler.config)
    prompts = [SamplePrompt("a cat", seed=1, scale=1.0, sample_steps=2, sample_sampler=name, index=i)
               for i, name in enumerate(expected)]  # scale 1: no CFG, half the UNet work
    results = _generate(sd15, prompts, tmp_path)
    assert len(results) == len(expected)
    for _, image, _ in results:
        assert image.size == (64, 64) and np.isfinite(_pixels(image)).all()


def test_v_prediction_samples_as_v(tmp_path, monkeypatch):
    from nbkit.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd21-v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for name in SAMPLER_NAMES:
        assert make_sampler(name, pipe.scheduler.config).config.prediction_type == "v_prediction", name
    used = []

    def spy(name, config):
        used.append(make_sampler(name, config))
        return used[-1]

    monkeypatch.setattr(sampling, "make_sampler", spy)
    prompts = load_sample_prompts("a cat --d 1 --s 2\na dog --d 2 --s 2 --ss dpmsolver++")
    original = pipe.scheduler
    _generate(pipe, prompts, tmp_path, default_sampler="euler_a")
    assert [type(s).__name__ for s in used] == ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
    assert all(s.config.prediction_type == "v_prediction" for s in used)
    assert pipe.scheduler is original


def test_pipeline_state_is_restored(tmp_path):
    from nbkit.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15")
    pipe.unet.train()
    pipe.unet.down_blocks[0].eval()  # a mixed state must come back exactly
    pipe.vae.requires_grad_(False)
    pipe.set_progress_bar_config(desc="outer")
    scheduler, config_entry = pipe.scheduler, pipe.config.scheduler
    modes = {n: m.training for n, m in pipe.unet.named_modules()}
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    torch.manual_seed(123)
    rng = torch.get_rng_state()

    results = _generate(pipe, load_sample_prompts("a cat --d 1 --s 2 --ss euler"), tmp_path)
    assert seen and not any(seen), "the UNet ran in training mode"
    assert pipe.scheduler is scheduler and pipe.config.scheduler == config_entry
    assert {n: m.training for n, m in pipe.unet.named_modules()} == modes
    assert pipe._progress_bar_config == {"desc": "outer"}
    assert torch.equal(torch.get_rng_state(), rng), "sampling changed the global RNG"
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert results[0][2].exists()

    def boom(texts):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # restored even when generation fails
        _generate(pipe, load_sample_prompts("a cat --s 2 --ss heun"), tmp_path, encode_prompts=boom)
    assert pipe.scheduler is scheduler and pipe.unet.training and not pipe.unet.down_blocks[0].training


def test_file_names_epoch_seed_and_atomic_writes(sd15, tmp_path, monkeypatch):
    import nbkit.io

    calls = []
    real = nbkit.io.atomic_path

    def spy(target):
        calls.append(target)
        return real(target)

    monkeypatch.setattr(nbkit.io, "atomic_path", spy)
    prompts = load_sample_prompts("a cat --s 1\na dog --s 1 --d 99")
    results = _generate(sd15, prompts, tmp_path, step=40, epoch=3, base_seed=5)
    assert [p.name for _, _, p in results] == [f"test_e000003_00_{derive_seed(5, 0)}.png", "test_e000003_01_99.png"]
    assert calls == [p for _, _, p in results]
    assert derive_seed(0, 1) == 1008266544  # stable across runs, machines and Python versions
    plain = _generate(sd15, prompts[:1], tmp_path, output_name=None, timestamp=True, step=7)
    assert re.fullmatch(rf"000007_00_\d{{14}}_{derive_seed(0, 0)}\.png", plain[0][2].name)
    assert sample_file_name("lora", 2, 42, step=120) == "lora_000120_02_42.png"
    assert Image.open(results[1][2]).text["parameters"].endswith("Seed: 99, Size: 64x64, Training step: 40")
    assert not [f for f in (tmp_path / "sample").iterdir() if f.name.endswith(".tmp")]


def test_lora_adapters_are_active_in_samples(tmp_path):
    from nbkit.models.tiny import build_tiny_pipeline
    from nbkit.networks.lora import inject_lora

    pipe = build_tiny_pipeline("sd15")
    prompts = load_sample_prompts("a cat --d 3 --s 2")
    before = _pixels(_generate(pipe, prompts, tmp_path / "base")[0][1])
    inject_lora(pipe.unet, pipe.text_encoder, network_dim=4, network_alpha=4)
    zero = _pixels(_generate(pipe, prompts, tmp_path / "zero")[0][1])
    assert np.array_equal(before, zero), "a LoRA with lora_B = 0 must not change the image"
    g = torch.Generator().manual_seed(0)
    for model in (pipe.unet, pipe.text_encoder):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=g) * 0.5
    after = _pixels(_generate(pipe, prompts, tmp_path / "lora")[0][1])
    assert not np.array_equal(before, after), "the LoRA is not active in the samples"

    pipe.unet.disable_adapters()  # e.g. left off by the caller: samples still show the LoRA
    grads = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    again = _pixels(_generate(pipe, prompts, tmp_path / "again")[0][1])
    assert np.array_equal(after, again)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads
    layer = next(m for m in pipe.unet.modules() if hasattr(m, "lora_A") and hasattr(m, "_disable_adapters"))
    assert layer.disable_adapters, "the adapters' off state was not restored"


def test_encode_prompts_and_clip_skip(sd15, tmp_path):
    def plain(texts):
        ids = sd15.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return sd15.text_encoder(ids.input_ids)[0]

    prompts = load_sample_prompts("a cat --n a dog --d 4 --s 2")
    default = _pixels(_generate(sd15, prompts, tmp_path)[0][1])
    hooked = _pixels(_generate(sd15, prompts, tmp_path, encode_prompts=plain)[0][1])
    assert np.array_equal(default, hooked)
    skip1 = _pixels(_generate(sd15, prompts, tmp_path, clip_skip=1)[0][1])
    skip2 = _pixels(_generate(sd15, prompts, tmp_path, clip_skip=2)[0][1])
    assert np.array_equal(default, skip1) and not np.array_equal(default, skip2)


# ---------------------------------------------------------------- when, and grids

# (step, epoch, n_steps, n_epochs, at_first, is_epoch_end) -> kohya sample_images_common's answer
SHOULD_SAMPLE = [
    (0, 0, 10, None, True, False, True),  # sample_at_first
    (0, 0, 10, None, False, False, False),
    (10, 1, 10, None, False, False, True),  # every 10 steps
    (15, 1, 10, None, False, False, False),
    (20, 2, 10, None, False, True, False),  # n_steps never samples at an epoch end
    (20, 2, None, 2, False, True, True),  # every 2 epochs, at the epoch end
    (30, 3, None, 2, False, True, False),
    (20, 2, None, 2, False, False, False),  # mid-epoch step with only n_epochs
    (10, 1, 10, 2, False, False, False),  # n_epochs set: n_steps is ignored (kohya)
    (40, 2, 10, 2, False, True, True),
    (10, 1, None, None, True, False, False),  # nothing set
    (10, 1, 0, 0, False, True, False),  # 0 means off
]


@pytest.mark.parametrize(("step", "epoch", "n_steps", "n_epochs", "at_first", "epoch_end", "expected"), SHOULD_SAMPLE)
def test_should_sample_follows_kohya(step, epoch, n_steps, n_epochs, at_first, epoch_end, expected):
    got = should_sample(step, epoch, sample_every_n_steps=n_steps, sample_every_n_epochs=n_epochs,
                        sample_at_first=at_first, is_epoch_end=epoch_end)
    assert got is expected


def test_should_sample_rejects_negative_intervals():
    with pytest.raises(ValueError, match="sample_every_n_steps must be >= 1"):
        should_sample(5, None, sample_every_n_steps=-1)


def test_sample_grid_layout():
    red, blue = Image.new("RGB", (64, 96), "red"), Image.new("RGB", (96, 64), "blue")
    grid = sample_grid([red, blue, red], cols=2)
    assert grid.size == (192, 192)
    assert grid.getpixel((48, 48)) == (255, 0, 0) and grid.getpixel((96 + 48, 48)) == (0, 0, 255)
    assert grid.getpixel((96 + 48, 96 + 48)) == (255, 255, 255)  # empty cell
    labelled = sample_grid([red, None, blue, red], cols=2, cell=32, row_labels=["before", "after"])
    assert labelled.size == (70 + 64, 64) and labelled.getpixel((70 + 32 + 16, 16)) == (255, 255, 255)
    with pytest.raises(ValueError, match="2 row labels for 1 rows"):
        sample_grid([red], cols=2, row_labels=["a", "b"])
