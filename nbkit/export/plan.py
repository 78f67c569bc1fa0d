"""The upload plan: exactly which files go to which paths of a Hub repo, decided before any network call.

Repo layout::

    README.md                      model card (nbkit.export.model_card)
    <name>.safetensors | .pt | .ckpt   the trained file(s); a diffusers folder's files at the root
    samples/<image>                sample images (prompts from their A1111 "parameters" text)
    training/<run>.toml            run/dataset TOML with tokens and absolute local paths removed
    dataset/<folder>.zip           the dataset, only when asked for

Generated files (card, cleaned TOMLs) are held as bytes; the dataset zip is written at upload time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbkit.export.model_card import IMAGE_SUFFIXES, build_model_card, gather_facts, public_value

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt")
SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
_INTERMEDIATE = re.compile(r"-(\d{6}|step\d{8})$")  # kohya epoch / step saves
_HN_STEP = re.compile(r"^(.+)-\d+\.pt$")
_SAMPLE = re.compile(r"_(?P<n>e?\d{6})_(?P<i>\d{2})(?:_\d{14})?_\d+$")  # nbkit/kohya sample names
_DROP = object()


class ExportError(ValueError):
    """Bad export input; the message names the file and the fix."""


@dataclass(frozen=True)
class UploadItem:
    path_in_repo: str
    role: str  # model | sample | config | dataset | card
    size: int
    source: Path | None = None  # a local file uploaded as it is
    data: bytes | None = None  # generated content (card, cleaned TOML)
    zip_of: Path | None = None  # a dataset folder zipped at upload time


@dataclass
class UploadPlan:
    repo_id: str
    private: bool
    kind: str
    items: list[UploadItem] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [item.path_in_repo for item in self.items]

    @property
    def total_bytes(self) -> int:
        return sum(item.size for item in self.items)

    def item(self, path_in_repo: str) -> UploadItem:
        return next(i for i in self.items if i.path_in_repo == path_in_repo)


# ---------------------------------------------------------------- what the files are


def detect_kind(path: Path) -> str:
    """``lora``, ``hypernetwork`` or ``dreambooth`` (a full model: single file or diffusers folder)."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "dreambooth"
        raise ExportError(f"{path}: a folder without model_index.json is not a diffusers model: pass the trained "
                          ".safetensors/.pt file instead")
    if not path.is_file():
        raise ExportError(f"{path}: no such file: check the path (trained files are in the project's output folder)")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return "hypernetwork"
    if suffix == ".ckpt":
        return "dreambooth"
    if suffix == ".safetensors":
        from nbkit.formats.checkpoint_io import read_safetensors_header

        try:
            keys = read_safetensors_header(path)[0]
        except ValueError as err:
            raise ExportError(f"{path}: cannot read it as .safetensors ({err}): is the file complete?") from None
        if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
            return "lora"
        if any(k.startswith("model.diffusion_model.") for k in keys):
            return "dreambooth"
    raise ExportError(f"{path}: not a kohya LoRA, A1111 hypernetwork (.pt) or SD checkpoint: pass one of those")


def find_outputs(folder: Path, output_name: str | None = None) -> list[Path]:
    """The final trained files of ``folder`` (``<output_name>.*``; epoch/step saves left out)."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such output folder: pass --output_dir or --model")
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.endswith("-state"):
            continue
        stem = path.stem if path.is_file() else path.name
        model = (path.is_file() and path.suffix.lower() in MODEL_SUFFIXES) or (path / "model_index.json").is_file()
        if model and (stem == output_name if output_name else not _INTERMEDIATE.search(stem)):
            found.append(path)
    if not output_name:  # A1111 hypernetwork step saves: <name>-<step>.pt next to <name>.pt
        found = [p for p in found if not (p.suffix == ".pt" and (m := _HN_STEP.match(p.name))
                                          and (p.parent / f"{m[1]}.pt").is_file())]
    if not found:
        what = f"'{output_name}.*'" if output_name else "a trained .safetensors/.pt/.ckpt"
        raise ExportError(f"{folder}: no {what} here: train first, or pass --model FILE")
    return found


def png_prompt(path: Path) -> str | None:
    """The prompt of an image with A1111 "parameters" text (what nbkit's samples carry)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except OSError:
        return None
    if not text:
        return None
    prompt = re.split(r"\n(?:Negative prompt:|Steps:)", text, maxsplit=1)[0].strip()
    return prompt or None


def find_samples(sources: Iterable[Path], limit: int = 8) -> list[Path]:
    """Sample images: the files given, and from folders the newest step's nbkit/kohya samples (then others)."""
    found: list[Path] = []
    for source in sources:
        if source.is_file():
            found.append(source)
            continue
        images = sorted(p for p in source.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else []
        named = [(m["n"], p) for p in images if (m := _SAMPLE.search(p.stem))]
        if named:
            newest = max(named, key=lambda t: (t[1].stat().st_mtime, t[0]))[0]
            images = [p for n, p in named if n == newest] + [p for p in images if not _SAMPLE.search(p.stem)]
        found += images
    return list(dict.fromkeys(found))[:limit]


# ---------------------------------------------------------------- configs without secrets or local paths


def sanitize(value: Any, secrets: Sequence[str] = ()) -> Any:
    """Drop keys that name secrets and values containing one; absolute local paths become file names."""
    if isinstance(value, dict):
        cleaned = {k: sanitize(v, secrets) for k, v in value.items() if not SECRET_KEY.search(str(k))}
        return {k: v for k, v in cleaned.items() if v is not _DROP}
    if isinstance(value, list):
        return [v for v in (sanitize(v, secrets) for v in value) if v is not _DROP]
    if isinstance(value, str):
        if any(s and s in value for s in secrets):
            return _DROP
        return public_value(value)
    return value


def sanitized_toml(path: Path, secrets: Sequence[str] = ()) -> bytes:
    import tomli_w

    from nbkit.config import load_toml

    return tomli_w.dumps(sanitize(load_toml(path), secrets)).encode("utf-8")


def _run_options(configs: Sequence[Path]) -> tuple[dict[str, Any], list[str]]:
    """Options of the first run TOML, and the image folder names of its datasets."""
    from nbkit.config import flatten_run_toml, load_toml

    options: dict[str, Any] = {}
    folders: list[str] = []
    for path in configs:
        raw = load_toml(path)
        opts, datasets = flatten_run_toml(raw)
        if not options and ("output_name" in opts or "pretrained_model_name_or_path" in opts):
            options = opts
        for dataset in datasets.get("datasets", []):
            for subset in dataset.get("subsets", []):
                if subset.get("image_dir"):
                    folders.append(Path(str(subset["image_dir"])).name)
        if opts.get("train_data_dir") and Path(str(opts["train_data_dir"])).is_dir():  # kohya N_identifier class
            folders += [p.name for p in sorted(Path(str(opts["train_data_dir"])).iterdir()) if p.is_dir()]
    return options, folders


# ---------------------------------------------------------------- the plan


def _model_items(models: Sequence[Path]) -> list[UploadItem]:
    items = []
    for model in models:
        if model.is_dir():  # a diffusers model: its files at the repo root, as from_pretrained expects
            files = sorted(p for p in model.rglob("*") if p.is_file() and not p.name.startswith("."))
            items += [UploadItem(p.relative_to(model).as_posix(), "model", p.stat().st_size, source=p) for p in files]
        else:
            items.append(UploadItem(model.name, "model", model.stat().st_size, source=model))
    return items


def _unique(items: list[UploadItem]) -> list[UploadItem]:
    seen: dict[str, UploadItem] = {}
    for item in items:
        if item.path_in_repo in seen:
            other = seen[item.path_in_repo]
            raise ExportError(f"{item.source or item.zip_of} and {other.source or other.zip_of} would both be uploaded "
                              f"as {item.path_in_repo}: rename one of them or pass only one")
        seen[item.path_in_repo] = item
    return items


def build_plan(repo_id: str, models: Sequence[Path], *, samples: Sequence[Path] = (), configs: Sequence[Path] = (),
               dataset: Path | None = None, include_dataset: bool = False, private: bool = True,
               base_model: str | None = None, license: str | None = None, trigger: str | None = None,
               title: str | None = None, secrets: Sequence[str] = (), card_file: Path | None = None) -> UploadPlan:
    """Everything an upload would send, including the generated model card."""
    from nbkit.models.download import REPO_ID

    if not REPO_ID.match(repo_id or ""):
        raise ExportError(f"--repo_id {repo_id!r}: use USER/NAME (or ORG/NAME), e.g. alice/my-style-lora")
    if not models:
        raise ExportError("nothing to upload: pass --model FILE or a project/output folder with a trained file")
    kinds = {detect_kind(Path(m)) for m in models}
    if len(kinds) > 1:
        raise ExportError(f"{', '.join(map(str, models))}: one repo per kind of model ({', '.join(sorted(kinds))}): "
                          "upload them to separate repos")
    plan = UploadPlan(repo_id, private, kinds.pop())
    items = _model_items([Path(m) for m in models])
    weight_files = [i.path_in_repo for i in items  # single files at the root; a diffusers folder is its model_index
                    if i.path_in_repo.endswith(MODEL_SUFFIXES) and "/" not in i.path_in_repo] or ["model_index.json"]
    items += [UploadItem(f"samples/{p.name}", "sample", p.stat().st_size, source=p) for p in samples]
    for config in configs:
        data = sanitized_toml(config, secrets)
        items.append(UploadItem(f"training/{config.name}", "config", len(data), data=data))
    if include_dataset:
        if dataset is None or not dataset.is_dir():
            raise ExportError(f"--include_dataset: no dataset folder {dataset or ''}: pass --dataset DIR")
        size = sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file())
        items.append(UploadItem(f"dataset/{dataset.name}.zip", "dataset", size, zip_of=dataset))
    options, folders = _run_options(configs)
    prompts = [(f"samples/{p.name}", png_prompt(p)) for p in samples]
    facts = gather_facts(repo_id, plan.kind, Path(models[0]), weight_files, options=options, samples=prompts,
                         dataset=dataset, base_model=base_model, license=license, trigger=trigger, title=title,
                         dataset_folders=folders)
    card = card_text_from(card_file) if card_file else build_model_card(facts).content
    items.insert(0, UploadItem("README.md", "card", len(card.encode("utf-8")), data=card.encode("utf-8")))
    plan.items = _unique(items)
    missing = [u for u in widget_urls(card) if u not in plan.paths]
    if missing:
        raise ExportError(f"model card: widget images {missing} are not in the upload: add them with --samples "
                          "or remove them from the card")
    return plan


def card_text_from(path: Path) -> str:
    """A card the user edited: it must parse as a model card."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        raise ExportError(f"--card {path}: no such file")
    try:
        return ModelCard.load(path).content
    except Exception as err:  # huggingface_hub raises ValueError / yaml errors for bad metadata
        raise ExportError(f"--card {path}: not a valid model card ({err}): fix its YAML header") from None


def widget_urls(card_text: str) -> list[str]:
    from huggingface_hub import ModelCard

    widgets = getattr(ModelCard(card_text).data, "widget", None) or []
    return [w["output"]["url"] for w in widgets if isinstance(w, dict) and isinstance(w.get("output"), dict)]


def format_plan(plan: UploadPlan) -> str:
    from nbkit.export.drive import human_size

    visibility = "private" if plan.private else "public"
    head = (f"upload plan for {plan.repo_id} ({visibility}, {plan.kind}): {len(plan.items)} files, "
            f"{human_size(plan.total_bytes)}")
    lines = []
    for item in plan.items:
        origin = item.source or (f"zip of {item.zip_of}" if item.zip_of else "generated")
        lines.append(f"  {human_size(item.size):>10}  {item.path_in_repo}  <- {origin}")
    return "\n".join([head, *lines])
