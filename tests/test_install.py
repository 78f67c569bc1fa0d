"""The package as users get it: tested pins, caps, the built wheel, the notebooks' install cell.

A fresh machine once resolved a transformers release newer than anything we had tested, and the
README's own install line failed. These tests pin down the parts of the install that a green run in
a long-lived development environment hides.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from venv_tools import ROOT, clean_env, overlay_venv, run, source_copy

FAST_MOVING = ("transformers", "diffusers", "peft", "accelerate", "huggingface_hub", "bitsandbytes")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _setup_requirements() -> dict[str, Requirement]:
    """Every requirement in setup.py (install_requires and extras), read from its source."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    found: dict[str, Requirement] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            try:
                req = Requirement(node.value)
            except Exception:
                continue
            if req.specifier:
                found[_norm(req.name)] = req
    return found


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = Version(version)
    return pins


def test_pins_fit_setup_ranges_and_fast_movers_are_capped():
    reqs, pins = _setup_requirements(), _pins()
    assert "torch" not in pins, "requirements.txt must not pin torch (Colab's own build stays)"
    for name in FAST_MOVING:
        req = reqs[_norm(name)]
        assert any(s.operator in ("<", "<=") for s in req.specifier), f"setup.py: {req} has no upper cap"
        assert _norm(name) in pins, f"requirements.txt has no tested pin for {name}"
    for name, version in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(version), f"pin {name}=={version} is outside setup.py's {reqs[name]}"


def test_this_environment_is_the_tested_set():
    """The README and .ci/run install with the pins as constraints: what runs here is what is pinned."""
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # an extra this environment did not ask for
        if installed != version:
            wrong[name] = f"{installed} (pinned {version})"
    assert not wrong, f"installed without the constraints? {wrong}: pip install -e '.[dev,tagger]' -c requirements.txt"


def test_readme_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("pip install torch==2.13.0 && pip install"))
    assert "-c requirements.txt" in line and line.rstrip().endswith("nbkit demo"), line
    install = line.split("&&")[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert install.replace("pip install", "python -m pip install --quiet") in ci, f".ci/run does not run {install!r}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel . --no-deps`` of the files a clean clone has."""
    root = tmp_path_factory.mktemp("wheel")
    src = source_copy(root / "src")
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-w", root / "dist"],
        env=clean_env(root))
    (built,) = (root / "dist").glob("nbkit-*.whl")
    return built


def test_wheel_carries_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("nbkit/assets/bpe_simple_vocab_16e6.txt.gz", "nbkit/models/configs/sd15/unet/config.json"):
        assert needed in names, f"{needed} missing from the wheel"
    assert any(n.startswith("nbkit/assets/templates/") for n in names), "A1111 prompt templates missing"
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_runs_demo_and_single_file(wheel, tmp_path):
    """Not editable: a file left out of the package data fails here, as it would for a user."""
    python = overlay_venv(tmp_path / "venv")
    env = clean_env(tmp_path, OMP_NUM_THREADS="1")
    run([python, "-m", "pip", "install", "--no-deps", "--quiet", wheel], env=env, cwd=tmp_path)
    where = run([python, "-c", "import nbkit; print(nbkit.__file__)"], env=env, cwd=tmp_path).stdout.strip()
    assert where.startswith(str(tmp_path / "venv")), f"nbkit imported from {where}, not from the installed wheel"
    nbkit = tmp_path / "venv" / "bin" / "nbkit"
    made = run([nbkit, "make-tiny-model", tmp_path / "tiny", "--single-file"], env=env, cwd=tmp_path)
    assert (tmp_path / "tiny.safetensors").is_file() or "single_file" in made.stdout, made.stdout
    demo = run([nbkit, "demo", "--steps", "2", "--out", tmp_path / "demo"], env=env, cwd=tmp_path)
    assert (tmp_path / "demo" / "output" / "demo_lora.safetensors").is_file(), demo.stdout


def _install_cell() -> str:
    nb = json.loads((ROOT / "notebooks" / "04_train_lora.ipynb").read_text(encoding="utf-8"))
    return "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])


def test_install_cell_points_at_a_ref_that_exists():
    """No cell may point at a release that was never made: the ref must exist in this repository."""
    source = re.search(r'^NBKIT_SOURCE = "(.+?)"', _install_cell(), re.M).group(1)
    assert source.startswith("git+https://"), source
    ref = source.rsplit("@", 1)[1]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", ref], capture_output=True)
    assert found.returncode == 0, f"the install cell points at {ref!r}, which does not exist in this repository"
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        sources = set(re.findall(r'NBKIT_SOURCE = \\"(.+?)\\"', path.read_text(encoding="utf-8")))
        assert sources == {source}, f"{path.name}: install sources {sources}"


def test_install_cell_installs_from_a_tagged_local_clone(tmp_path, monkeypatch):
    """The notebooks' real install cell, in a real kernel of a fresh venv, from ``git+file://...@tag``."""
    import nbformat
    from nbclient import NotebookClient

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    origin = source_copy(tmp_path / "origin")
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "release"], ["tag", "v9.9.9"]):
        run(["git", "-C", origin, *cmd])
    python = overlay_venv(tmp_path / "venv")
    kernels = tmp_path / "jupyter" / "kernels" / "fresh"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fresh venv", "language": "python"}))
    for key, value in clean_env(tmp_path, JUPYTER_PATH=str(tmp_path / "jupyter")).items():
        monkeypatch.setenv(key, value)
    cell = re.sub(r'^NBKIT_SOURCE = ".+?"', f'NBKIT_SOURCE = "git+file://{origin}@v9.9.9"', _install_cell(), flags=re.M)
    check = "import nbkit, importlib.metadata as m\nprint('NBKIT_AT', nbkit.__file__, m.version('nbkit'))"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell), nbformat.v4.new_code_cell(check)])
    NotebookClient(nb, timeout=600, kernel_name="fresh", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.outputs)
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}\n{text[-2000:]}"
    assert f"NBKIT_AT {tmp_path / 'venv'}" in text, text[-2000:]
    assert (tmp_path / "nbkit-src" / "requirements.txt").is_file(), "the cell did not clone the tag into ~/nbkit-src"
