"""What a newcomer hits first: clean --help pages, "did you mean" for a misspelt flag, one flag
spelling (kohya's underscores, dashes accepted), a sane thread count, the same LoRA wherever the
dataset lives, and no warning lines on stderr in a normal run."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbkit.cli import build_parser, main

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
WARNING_WORDS = re.compile(r"warn|deprecat|kernels-community|trust check|torchvision|float32", re.I)
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+|^\s*$")  # tqdm lines ("LoRA:  50%|█████     | 1/2 [...]")


def warning_lines(text: str) -> list[str]:
    """stderr lines that are not progress bars and mention a warning (tqdm redraws with \\r)."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text)]
    return [line for line in lines if not PROGRESS_BAR.search(line) and WARNING_WORDS.search(line)]


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser) of the tree, the top one first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


# ----------------------------------------------------------------------------- --help
def test_every_help_page_prints_without_a_raw_dict(capsys):
    paths = [path for path, _ in _parsers(build_parser())]
    assert ("train", "lora") in paths and ("train", "hypernetwork") in paths and ("merge", "checkpoints") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main([*path, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0, path
        assert "'option_strings'" not in out and "{'help'" not in out, f"nbkit {' '.join(path)} --help:\n{out}"
        assert "usage: nbkit" in out
    with pytest.raises(SystemExit):
        main(["train", "lora", "--help"])
    assert "~20% slower" in capsys.readouterr().out  # the % itself is still shown


# ----------------------------------------------------------------------------- did you mean
@pytest.mark.parametrize(("argv", "hint", "prog"), [
    (["train", "lora", "--netwrok_dim", "4"], "did you mean --network_dim?", "nbkit train lora"),
    (["train", "lora", "--netwrok-dim=4"], "did you mean --network_dim?", "nbkit train lora"),
    (["train", "dreambooth", "--lerning_rate", "1e-5"], "did you mean --learning_rate?", "nbkit train dreambooth"),
    (["make-tiny-model", "out", "--singel_file"], "did you mean --single_file?", "nbkit make-tiny-model"),
    (["merge", "loras", "--lora", "a.safetensors", "--out", "o.safetensors", "--new_rnak", "4"],
     "did you mean --new_rank?", "nbkit merge loras"),
])
def test_a_misspelt_flag_names_the_closest_one_of_the_command_used(capsys, argv, hint, prog):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unrecognized arguments" in err and hint in err, err
    assert f"usage: {prog}" in err, err  # the usage of the command the flag was given to


def test_every_parser_is_the_suggesting_kind(capsys):
    for path, parser in _parsers(build_parser()):
        assert type(parser).__name__ == "NbkitArgumentParser", path
    with pytest.raises(SystemExit):
        main(["trian", "lora"])
    assert "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "lora", "--network-dim", "x"])
    assert "argument --network_dim: invalid int value: 'x'" in capsys.readouterr().err  # named once, as listed


# ----------------------------------------------------------------------------- one spelling
def _long_options(parser):
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            yield action, [s for s in action.option_strings if s.startswith("--")]


def test_underscores_are_shown_and_dashes_accepted_for_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside a flag name
    for path, parser in _parsers(build_parser()):
        for action, strings in _long_options(parser):
            for s in strings:
                negative = (isinstance(action, argparse.BooleanOptionalAction) and s.startswith("--no-")
                            and s[5:].replace("-", "_") == action.dest)  # not kohya's own no_half_vae
                prefix = "--no-" if negative else "--"
                body = s[len(prefix):]
                for variant in (prefix + body.replace("-", "_"), prefix + body.replace("_", "-")):
                    found = parser._option_string_actions.get(variant)
                    assert found is not None and found.dest == action.dest, (path, s, variant)
        with pytest.raises(SystemExit):
            main([*path, "--help"])
        shown = [s for s in re.findall(r"(?<![\w-])--[a-z0-9_]+-[a-z0-9_-]+", capsys.readouterr().out)
                 if not re.fullmatch(r"--no-[a-z0-9_]+", s)]  # BooleanOptionalAction's --no-NAME
        assert not shown, f"nbkit {' '.join(path)} --help shows dashed flags: {sorted(set(shown))}"


@pytest.mark.parametrize(("argv", "dest", "value"), [
    (["make-tiny-model", "out", "--single_file"], "single_file", True),
    (["make-tiny-model", "out", "--single-file"], "single_file", True),
    (["make-tiny-model", "out", "--single"], "single_file", True),  # a unique prefix still works
    (["train", "lora", "--network-dim", "8"], "network_dim", 8),
    (["train", "lora", "--network_dim", "8"], "network_dim", 8),
    (["train", "lora", "--no-gradient-checkpointing"], "gradient_checkpointing", False),
    (["train", "lora", "--gradient-checkpointing"], "gradient_checkpointing", True),
    (["train", "lora", "--resume", "latest"], "resume", "latest"),
    (["train", "lora", "--auto_fit", "L4"], "auto_fit", "L4"),
    (["train", "lora", "--auto-fit"], "auto_fit", "T4"),
    (["merge", "loras", "--lora", "a", "--out", "b", "--new-rank", "3"], "new_rank", 3),
    (["merge", "checkpoints", "--a", "a", "--out", "o", "--save_as_half"], "save_as_half", True),
    (["export", "hub", "--repo-id", "u/n", "--dry_run"], "dry_run", True),
    (["dataset", "check", "d", "--max_side", "100"], "max_side", 100),
    (["captions", "remove", "d", "x", "--dry_run"], "dry_run", True),
])
def test_both_spellings_parse_to_the_same_option(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize(("cores", "load", "threads"), [
    (2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 2.4, 1), (2, 9.0, 1),
    (8, 0.2, 8), (8, 3.0, 5), (8, 30.0, 1), (1, 0.0, 1),
])
def test_thread_count_leaves_busy_cores_alone(cores, load, threads):
    from nbkit.runtime import pick_threads

    assert pick_threads(cores, load) == threads


def test_thread_count_never_overrides_the_user(monkeypatch):
    import torch

    from nbkit.runtime import set_torch_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_torch_threads().source == "OMP_NUM_THREADS"
        assert torch.get_num_threads() == before
        choice = set_torch_threads(explicit=1)
        assert (choice.threads, choice.source) == (1, "--threads") and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        choice = set_torch_threads(cores=2, load=5.0)
        assert (choice.threads, choice.source) == (1, "load") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_demo_and_train_take_a_threads_flag():
    assert build_parser().parse_args(["demo", "--threads", "3"]).threads == 3
    for method in ("lora", "dreambooth", "hypernetwork"):
        assert build_parser().parse_args(["train", method, "--threads", "2"]).threads == 2


# ----------------------------------------------------------------------------- same LoRA anywhere
def test_same_data_and_seed_give_the_same_lora_wherever_the_dataset_lives(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file

    from nbkit.data.dataset_config import DatasetSpec, SubsetSpec
    from nbkit.demo import make_sample_dataset
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.lora import train_lora

    model_dir, _ = tiny_model_dirs("sd15")
    source = make_sample_dataset(tmp_path / "source", size=64)
    # absolute paths sort the other way round in the two places; relative names are the same
    places = {"a": ("zz_first", "aa_second"), "b": ("aa_first", "zz_second")}
    loras = []
    for place, (first, second) in places.items():
        subsets = []
        for name, pattern in ((first, "0[0-5]_*"), (second, "[01][6-9]_*")):  # 6 images each, sorted names
            folder = tmp_path / place / name
            folder.mkdir(parents=True)
            for path in source.glob(pattern):
                shutil.copy2(path, folder / path.name)
            subsets.append(SubsetSpec(image_dir=folder, caption_extension=".txt", num_repeats=1, flip_aug=True))
        datasets = [DatasetSpec(resolution=(64, 64), batch_size=2, enable_bucket=True, min_bucket_reso=64,
                                max_bucket_reso=256, bucket_reso_steps=64, subsets=subsets)]
        config = LoRATrainConfig(pretrained_model_name_or_path=str(model_dir), output_dir=str(tmp_path / place / "out"),
                                 resolution=64, network_dim=2, network_alpha=2.0, learning_rate=1e-2,
                                 train_batch_size=2, max_train_steps=3, optimizer_type="AdamW", mixed_precision="no",
                                 gradient_checkpointing=False, seed=7, cache_latents=True)
        loras.append(load_file(str(train_lora(config, datasets, device="cpu").lora_path)))
    assert loras[0].keys() == loras[1].keys()
    differing = [k for k in loras[0] if not loras[0][k].equal(loras[1][k])]
    assert not differing, f"{len(differing)} of {len(loras[0])} tensors differ, e.g. {differing[:3]}"


# ----------------------------------------------------------------------------- stderr
def _env(**extra) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "OMP_NUM_THREADS": "1", **extra}
    env.pop("HF_TOKEN", None)
    return env


def test_demo_prints_no_warning_lines_to_stderr(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nbkit", "demo", "--steps", "2", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not warning_lines(result.stderr), "\n".join(warning_lines(result.stderr))


FAKE_KERNELS = '''
import os, warnings
def get_kernel(repo_id, *args, **kwargs):
    open(os.environ["FAKE_KERNELS_MARK"], "a").write(repo_id + "\\n")
    warnings.warn(f"Skipping publisher trust check for '{repo_id}' because Hugging Face Hub is in offline mode.")
    raise FileNotFoundError(f"{repo_id} is not in the local cache")
'''


@pytest.mark.parametrize("imports", ["nbkit, bitsandbytes, kernels", "kernels, nbkit, bitsandbytes"])
def test_bitsandbytes_does_not_look_up_hub_kernels(tmp_path, imports):
    """With the ``kernels`` package installed, importing bitsandbytes asks the Hub for a 4-bit CPU kernel."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes only looks the kernel up on CPUs with AVX512-BF16")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    mark = tmp_path / "lookups.txt"
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), FAKE_KERNELS_MARK=str(mark))
    code = f"import {imports}; print(bitsandbytes.optim.AdamW8bit.__name__, kernels.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) in result.stdout, "the fake kernels package was not importable"  # still usable afterwards
    assert not mark.exists(), f"Hub kernel lookups: {mark.read_text()}"
    assert not warning_lines(result.stderr), result.stderr


def test_setup_notebook_prints_no_warning_lines_to_stderr(tmp_path, monkeypatch):
    """The acceptance line, on the quickest notebook that loads the models' libraries (00_setup)."""
    import nbformat
    from nbclient import NotebookClient

    env = _env(NBKIT_DEMO="1", NBKIT_HOME=str(tmp_path / "home"), MPLBACKEND="module://matplotlib_inline.backend_inline")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    nb = nbformat.read(NOTEBOOK_DIR / "00_setup.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    streams = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.output_type == "stream" and o.name == "stderr"]
    found = [line for text in streams for line in warning_lines(text)]
    assert not found, json.dumps(found, indent=1)
