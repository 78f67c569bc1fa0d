"""Hub: tokens that never show, the upload up to the network boundary, the CLI, and a token scan of a demo run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from nbkit.cli import main
from nbkit.export.hub import HubError, Secret, resolve_token, token_status, upload
from nbkit.export.plan import build_plan

FAKE_TOKEN = "hf_" + "nbkitTESTtoken0123456789abcdefXYZ"  # built at run time: no token-shaped literal in the source


def test_secret_never_shows_itself():
    secret = Secret(FAKE_TOKEN, "environment variable HF_TOKEN")
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"t": secret})):
        assert FAKE_TOKEN not in text
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(secret)
    assert secret.reveal() == FAKE_TOKEN


def test_token_sources_in_order():
    env = {"HF_TOKEN": " env-token "}
    assert resolve_token("typed", env=env, colab_get=lambda _: "colab").source == "login widget"
    colab = resolve_token(None, env=env, colab_get=lambda name: "colab-token" if name == "HF_TOKEN" else None)
    assert (colab.reveal(), colab.source) == ("colab-token", "Colab secret HF_TOKEN")
    from_env = resolve_token(None, env=env, colab_get=lambda _: None)
    assert (from_env.reveal(), from_env.source) == ("env-token", "environment variable HF_TOKEN")
    assert resolve_token(None, env={}, colab_get=lambda _: None) is None
    assert "add a secret named HF_TOKEN" in token_status(None)
    assert token_status(from_env) == "token: found (environment variable HF_TOKEN)"


class FakeApi:
    """The ``HfApi`` calls an upload makes, recorded; the staged folder is read while it exists."""

    def __init__(self, error: Exception | None = None, private: bool = True):
        self.calls, self.staged, self.error, self.private = [], {}, error, private

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.error:
            raise self.error

    def repo_info(self, repo_id, **kwargs):
        return type("Info", (), {"private": self.private})()

    def upload_folder(self, *, folder_path, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs["commit_message"]))
        root = Path(folder_path)
        self.staged = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def lora_file(tmp_path):
    import torch

    from nbkit.formats.kohya_lora import build_metadata, save_kohya_lora

    key = "lora_unet_mid_block_attentions_0_proj_in"
    state = {f"{key}.lora_down.weight": torch.ones(2, 8), f"{key}.lora_up.weight": torch.zeros(8, 2),
             f"{key}.alpha": torch.tensor(2.0)}
    return save_kohya_lora(state, tmp_path / "style.safetensors", build_metadata(output_name="style"), "fp16")


def test_upload_creates_a_private_repo_and_sends_exactly_the_plan(lora_file, tmp_path):
    sample = tmp_path / "s.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(sample)
    plan = build_plan("alice/style", [lora_file], samples=[sample])
    api, said = FakeApi(), []
    url = upload(plan, Secret(FAKE_TOKEN, "test"), api=api, say=said.append, staging_root=tmp_path)
    assert url == "https://huggingface.co/alice/style" and not said
    assert api.calls[0] == ("create_repo", "alice/style", {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1] == ("upload_folder", "alice/style", "Upload lora with nbkit")
    assert sorted(api.staged) == sorted(plan.paths) == ["README.md", "samples/s.png", "style.safetensors"]
    assert api.staged["style.safetensors"] == lora_file.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "style.safetensors"]  # staging removed

    upload(plan, Secret(FAKE_TOKEN, "test"), api=FakeApi(private=False), say=said.append)
    assert "already exists and is public" in said[0]


def test_upload_errors_explain_without_the_token(lora_file):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    plan = build_plan("alice/style", [lora_file])
    error = HfHubHTTPError("401 Client Error", response=httpx2.Response(401, request=request))
    with pytest.raises(HubError, match="refused the token") as info:
        upload(plan, Secret(FAKE_TOKEN, "test"), api=FakeApi(error))
    assert FAKE_TOKEN not in str(info.value)


def test_cli_refuses_a_token_flag_and_accepts_kohya_spellings(lora_file, tmp_path, capsys):
    args = ["export", "hub", "--huggingface_repo_id", "alice/style", "--huggingface_repo_visibility", "public",
            "--model", str(lora_file), "--dry-run", "--card-out", str(tmp_path / "card")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "upload plan for alice/style (public, lora)" in out and "dry run: nothing was uploaded" in out
    assert (tmp_path / "card" / "README.md").is_file()
    assert main([*args, "--huggingface_token", FAKE_TOKEN]) == 2
    assert "shell history" in capsys.readouterr().err
    assert main(["export", "hub", "--repo-id", "alice/x", "--output-dir", str(tmp_path / "nothing"), "--dry-run"]) == 2
    assert "no such output folder" in capsys.readouterr().err


def test_login_widget_hands_the_token_to_the_caller_only(monkeypatch):
    from nbkit.ui.hub_login import HubLogin

    monkeypatch.delenv("HF_TOKEN", raising=False)
    got = []
    login = HubLogin(on_token=got.append)
    assert login.token is None and "No token yet" in login.status.value
    login.password.value = f"  {FAKE_TOKEN} "
    login.submit()
    assert login.password.value == "" and got == [login.token] and login.token.reveal() == FAKE_TOKEN
    assert FAKE_TOKEN not in login.status.value and "login widget" in login.status.value
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    assert HubLogin().token.source == "environment variable HF_TOKEN"


def test_no_token_in_any_file_of_a_demo_run_and_export(tmp_path, monkeypatch, capfd):
    """HF_TOKEN set for a whole demo run, a dry-run export, staging (with the dataset zip) and a Drive copy:
    not one byte of any file written, nor of the output, holds the token."""
    import dataclasses

    from nbkit import demo as demo_module
    from nbkit.export.hub import resolve_token, stage

    plan_for = demo_module.demo_plan  # the same demo, with 1 preview denoising step instead of 10 (CPU time)
    monkeypatch.setattr(demo_module, "demo_plan", lambda *a: dataclasses.replace(plan_for(*a), preview_steps=1))

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("NBKIT_MYDRIVE", str(tmp_path / "MyDrive"))
    (tmp_path / "MyDrive").mkdir()
    demo = tmp_path / "demo"
    demo_module.run_demo(demo, steps=3)
    assert main(["export", "hub", "--repo-id", "alice/demo", "--output-dir", str(demo / "output"),
                 "--config", str(demo / "demo_run.toml"), "--samples", str(demo / "preview_grid.png"),
                 "--dataset", str(demo / "dataset"), "--include-dataset", "--dry-run"]) == 0
    plan = build_plan("alice/demo", [demo / "output" / "demo_lora.safetensors"], configs=[demo / "demo_run.toml"],
                      dataset=demo / "dataset", include_dataset=True, secrets=[resolve_token().reveal()])
    stage(plan, tmp_path / "staged")
    assert main(["export", "drive", str(demo / "output" / "demo_lora.safetensors"), "--project", "demo", "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert "token: found (environment variable HF_TOKEN)" in out

    token = FAKE_TOKEN.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 40 and (demo / "output" / "hub" / "demo" / "README.md") in files
    assert (tmp_path / "staged" / "dataset" / "dataset.zip") in files
    assert [p for p in files if token in p.read_bytes()] == []
    assert FAKE_TOKEN not in out and FAKE_TOKEN not in err
    assert not (tmp_path / "hf_home" / "token").exists()
