"""The notebooks: thin and clean as committed, and the whole suite run top to bottom in real kernels.

The run uses demo mode (``NBKIT_DEMO=1``: tiny model, drawn sample data, runs of a few steps), no
network (``HF_HUB_OFFLINE=1``) and a temporary ``NBKIT_HOME`` that the notebooks, each in its own
kernel, share through the project folder, as on Colab they share it through Drive.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
STEPS = ("00_setup", "01_dataset", "02_tag", "03_configure", "04_train_lora", "05_train_dreambooth",
         "06_train_hypernetwork", "06b_train_textual_inversion", "07_merge", "08_export")
MAX_CODE_LINES = 12  # non-blank lines in one code cell (the setup install cell is the longest: 11)
TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}|(api|access|auth)[_-]?(key|token)\s*=\s*['\"][^'\"]{8,}['\"]", re.I)
WARNING_LINE = re.compile(r"warn|deprecat|kernels-community|trust check|torchvision|float32", re.I)
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # tqdm bars on stderr are fine


def _code(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_every_step_has_a_notebook_and_they_match_the_generator():
    names = {p.stem for p in NOTEBOOKS}
    assert set(STEPS) <= names, f"missing notebooks: {set(STEPS) - names}"
    result = subprocess.run([sys.executable, str(NOTEBOOK_DIR / "build.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin_and_clean(path):
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown"
    assert "colab.research.google.com/github/" in first and f"notebooks/{path.name}" in first, "Open in Colab badge"
    assert "widgets" not in nb["metadata"], "saved widget state"
    assert not TOKEN.search(text), "something that looks like a token"
    code = _code(nb)
    assert code, "a notebook without code"
    for cell in (c for c in nb["cells"] if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        assert not cell.get("outputs") and cell.get("execution_count") is None, "commit notebooks without outputs"
        assert not re.search(r"^\s*(async\s+)?(def|class)\s", source, re.M), f"def/class in a notebook:\n{source}"
        lines = [line for line in source.splitlines() if line.strip()]
        assert len(lines) <= MAX_CODE_LINES, f"a code cell of {len(lines)} lines:\n{source}"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert all(kinds[i - 1] == "markdown" for i, k in enumerate(kinds) if k == "code"), "a code cell without its text"


@pytest.mark.parametrize("name", STEPS[1:])
def test_step_notebooks_reinstall_and_read_the_project(name):
    """After a runtime reset every notebook stands alone: install guard, then the project folder."""
    code = _code(json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8")))
    assert 'find_spec("nbkit") is None' in code[0] and "%pip install" in code[0] and "torch" not in code[0].split(
        "%pip")[1], "install cell"
    assert "open_project(PROJECT" in code[1]


def test_all_notebooks_run_in_demo_mode(tmp_path, monkeypatch):
    """Every notebook, in order, each in a fresh kernel, fails on any cell error."""
    import nbformat
    from nbclient import NotebookClient

    home = tmp_path / "home"
    for key, value in {"NBKIT_DEMO": "1", "NBKIT_HOME": str(home), "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "OMP_NUM_THREADS": "1",  # tiny matrices: one thread is faster, and far faster on a busy CPU
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    order = [NOTEBOOK_DIR / f"{name}.ipynb" for name in STEPS] + [p for p in NOTEBOOKS if p.stem not in STEPS]
    times = {}
    started = time.monotonic()
    for path in order:
        nb = nbformat.read(path, as_version=4)
        t0 = time.monotonic()
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        times[path.stem] = time.monotonic() - t0
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        noise = [line for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream" and o.name == "stderr" for line in re.split(r"[\r\n]+", o.text)
                 if WARNING_LINE.search(line) and not PROGRESS_BAR.search(line)]
        assert not noise, f"{path.name}: warning lines on stderr: {noise[:5]}"
    total = time.monotonic() - started
    print("\nnotebook run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s")

    project = home / "_demo" / "my-lora"
    for method, suffix in (("lora", ".safetensors"), ("dreambooth", ".safetensors"), ("hypernetwork", ".pt")):
        assert (project / f"run-{method}.toml").is_file()
        assert (project / "output" / f"my-lora-{method}{suffix}").is_file()
    assert any((project / "quarantine").rglob("12_red_circle_copy.jpg")), "the duplicate was not set aside"
    captions = (project / "dataset" / "10_sks shapes" / "00_red_circle.txt").read_text(encoding="utf-8")
    assert captions.startswith("sks, ") and "no_humans" in captions, captions
    assert (project / "output" / "my-lora-lora-baked.safetensors").is_file()
    assert (project / "output" / "dreambooth-merged-0.5.safetensors").is_file()
    assert (home / "_demo" / "_nbkit_demo" / "drive-standin" / "Lora" / "my-lora-lora.safetensors").is_file()
    assert (tmp_path / "nbkit-demo" / "output" / "demo_lora.safetensors").is_file()  # the quick start


def test_model_card_names_the_optimizer_as_users_choose_it():
    from nbkit.export.model_card import optimizer_name

    assert optimizer_name("torch.optim.adamw.AdamW") == "AdamW"
    assert optimizer_name("bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.01)") == "AdamW8bit(weight_decay=0.01)"
    assert optimizer_name("AdamW8bit") == "AdamW8bit"


def _run_demo(names, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    home = tmp_path / "home"
    for key, value in {"NBKIT_DEMO": "1", "NBKIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
                       "MPLBACKEND": "module://matplotlib_inline.backend_inline"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    done = {}
    for name in names:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        done[name] = nb
    return home / "_demo" / "my-lora", done


def test_lora_notebook_in_demo_mode_writes_nothing_to_stderr_and_draws_the_xy_grid(tmp_path, monkeypatch):
    """A normal run shows no warning boxes: not one stderr line (progress shows in widgets, not stderr)."""
    project, done = _run_demo(["03_configure", "04_train_lora"], tmp_path, monkeypatch)
    for name, nb in done.items():
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], name
        stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
        assert not stderr, f"{name} wrote to stderr: {stderr[:3]}"
    grid = project / "samples" / "my-lora-lora-xy.png"
    from nbkit.generate import read_grid_info

    info = read_grid_info(grid)
    assert info["row_labels"][0] == "base model" and len(info["row_labels"]) >= 3  # base, a save, the final file
    assert len(info["col_labels"]) == 2 and info["seeds"][0] == info["seeds"][-1]
    assert not (project / "samples" / "sample").exists(), "previews belong with the run's in output/sample"
    assert any((project / "output" / "sample").glob("my-lora-lora_*.png"))


def test_textual_inversion_notebook_in_demo_mode_trains_an_embedding_and_writes_nothing_to_stderr(tmp_path, monkeypatch):
    """06b on its own (the dataset made first): the embedding file is the token's name with only the new
    rows in it, previews carry the token, and not one stderr line."""
    from safetensors.torch import load_file

    project, done = _run_demo(["06b_train_textual_inversion"], tmp_path, monkeypatch)
    outputs = [o for c in done["06b_train_textual_inversion"].cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"06b wrote to stderr: {stderr[:3]}"
    embedding = load_file(project / "output" / "sksemb.safetensors")
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape[0] == 1  # one vector, SD1 layout
    assert (project / "run-textual_inversion.toml").is_file()
    prompts = (project / "sample_prompts-sksemb.txt").read_text(encoding="utf-8").splitlines()
    assert prompts and all(line.startswith("sksemb, ") for line in prompts)
    assert any((project / "output" / "sample").glob("sksemb_*.png")), "previews of the run"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "emb_params" in printed and "sksemb.safetensors" in printed
