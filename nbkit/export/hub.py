"""Publishing to the Hugging Face Hub without ever showing the token.

The token comes from (first found): a value the caller got from the login widget, the Colab secret
``HF_TOKEN``, or the ``HF_TOKEN`` environment variable. It lives in a :class:`Secret` whose repr is
``'***'`` and is handed to ``HfApi`` only; ``huggingface_hub.login()`` is never called, because it
writes the token to ``~/.cache/huggingface/token``.

The upload stages the plan in a local temporary folder (links to the files, the generated card and
TOMLs, a deterministic dataset zip) and sends it with ``HfApi.upload_folder``: with ``hf_xet``
(installed with huggingface_hub) large files go in chunks, and an interrupted upload resumes by
running the same command again (chunks already on the Hub are not sent twice). A Hub commit is
atomic: an interrupted upload never leaves a partial file in the repo.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from nbkit.export.plan import UploadPlan

TOKEN_HELP = (
    "no Hugging Face token: in Colab add a secret named HF_TOKEN (key icon in the left bar, allow notebook access); "
    "elsewhere set the HF_TOKEN environment variable; or use nbkit.ui.hub_login.HubLogin() in the notebook. "
    "Create a token with write access at https://huggingface.co/settings/tokens"
)


class HubError(RuntimeError):
    """The Hub refused or could not be reached; the message says what to do (never the token)."""


class Secret:
    """A token that does not show itself: ``repr``/``str`` give ``'***'``; pickling is refused."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('***', source={self.source!r})"

    def __str__(self) -> str:
        return "***"

    def __reduce__(self):
        raise TypeError("a Secret is never pickled or saved")


def _colab_secret(name: str = "HF_TOKEN") -> str | None:
    from nbkit.colab import in_colab

    if not in_colab():
        return None
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # the secret is missing, or this notebook was not given access
        return None


def resolve_token(explicit: str | Secret | None = None, *, env: Mapping[str, str] | None = None,
                  colab_get: Callable[[str], str | None] | None = None) -> Secret | None:
    """The token from the widget (``explicit``), Colab secrets, or ``$HF_TOKEN``; None when there is none."""
    if isinstance(explicit, Secret):
        return explicit
    if explicit and explicit.strip():
        return Secret(explicit.strip(), "login widget")
    value = (colab_get or _colab_secret)("HF_TOKEN")
    if value and value.strip():
        return Secret(value.strip(), "Colab secret HF_TOKEN")
    value = (os.environ if env is None else env).get("HF_TOKEN")
    if value and value.strip():
        return Secret(value.strip(), "environment variable HF_TOKEN")
    return None


def token_status(token: Secret | None) -> str:
    return f"token: found ({token.source})" if token else f"token: none. {TOKEN_HELP}"


# ---------------------------------------------------------------- staging


def write_dataset_zip(folder: Path, target: Path) -> Path:
    """Zip a dataset folder (images and captions) with fixed dates and order, so the same folder gives
    the same bytes and a re-run upload sends nothing new."""
    from nbkit.io import atomic_path

    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files:
            info = zipfile.ZipInfo(f"{folder.name}/{path.relative_to(folder).as_posix()}", (1980, 1, 1, 0, 0, 0))
            archive.writestr(info, path.read_bytes())
    return target


def write_generated(plan: UploadPlan, folder: Path) -> list[Path]:
    """Write the generated files (model card, cleaned TOMLs) under ``folder`` for review."""
    from nbkit.io import atomic_write_bytes

    return [atomic_write_bytes(folder / item.path_in_repo, item.data) for item in plan.items if item.data is not None]


def stage(plan: UploadPlan, folder: Path) -> Path:
    """The repo as a folder: links to the local files, the generated files, the dataset zip."""
    write_generated(plan, folder)
    for item in plan.items:
        target = folder / item.path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.zip_of is not None:
            write_dataset_zip(item.zip_of, target)
        elif item.source is not None:
            if target.is_symlink() or target.exists():
                target.unlink()  # a link from an earlier staging: replace the link, never write through it
            try:
                target.symlink_to(item.source.resolve())
            except OSError:  # a filesystem without links
                shutil.copyfile(item.source, target)
    return folder


def _explain(err: Exception, plan: UploadPlan) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return ("the Hub refused the token (401): create a token with write access at "
                "https://huggingface.co/settings/tokens and store it as HF_TOKEN")
    if status == 403:
        return (f"no write access to {plan.repo_id} (403): check the USER/ORG part of --repo_id and that the token "
                "has write permission")
    return f"upload to {plan.repo_id} failed ({type(err).__name__}: {err}); run the same command again to resume"


def upload(plan: UploadPlan, token: Secret, *, api=None, say: Callable[[str], None] = print,
           staging_root: str | Path | None = None) -> str:
    """Create the repo (private unless the plan says otherwise; an existing repo keeps its visibility)
    and upload the plan in one commit. Returns the repo URL. ``api``: an ``HfApi`` stand-in (tests)."""
    from huggingface_hub import HfApi

    from nbkit._version import __version__

    api = api or HfApi(token=token.reveal(), library_name="nbkit", library_version=__version__)
    try:
        api.create_repo(plan.repo_id, repo_type="model", private=plan.private, exist_ok=True)
        private = getattr(api.repo_info(plan.repo_id, repo_type="model"), "private", plan.private)
        if private != plan.private:
            say(f"note: {plan.repo_id} already exists and is {'private' if private else 'public'}; its visibility "
                "is left as it is (change it in the repo settings)")
        with tempfile.TemporaryDirectory(prefix="nbkit-hub-", dir=staging_root) as tmp:
            stage(plan, Path(tmp))
            api.upload_folder(repo_id=plan.repo_id, repo_type="model", folder_path=tmp,
                              commit_message=f"Upload {plan.kind} with nbkit")
    except Exception as err:  # HfHubHTTPError, httpx connection errors, a full disk while staging
        raise HubError(_explain(err, plan)) from None
    return f"https://huggingface.co/{plan.repo_id}"
