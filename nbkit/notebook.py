"""What every notebook's first cell calls: the project folder, and demo mode.

    from nbkit.notebook import open_project
    session = open_project("my-lora", step="train")

The project folder (on Drive when mounted) is the notebooks' only shared state: each notebook
reads what earlier ones wrote there (dataset, ``dataset.toml``, ``run-<method>.toml``, outputs),
never kernel variables, so any notebook runs again after a Colab runtime reset.

``NBKIT_DEMO=1`` switches every notebook to a demo: the project lives under ``$NBKIT_HOME/_demo`` (else
``<tempdir>/nbkit-demo-projects``, one folder that notebooks in separate kernels share), the base
model is nbkit's tiny seeded model, the dataset is a drawn sample, runs are a few steps and
taggers are tiny ones built from code. Whatever a notebook needs from earlier steps is made
first (idempotently), so each one also runs on its own. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nbkit.notebook_demo import DEMO_FOLDER, draw_demo_dataset, ensure_demo_material  # noqa: F401 (API)
from nbkit.project import Project
from nbkit.runtime import demo_mode, demo_root

METHODS = ("lora", "dreambooth", "hypernetwork", "textual_inversion")
STEPS = ("setup", "dataset", "tag", "configure", "train", "merge", "export")
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
T4_PRESETS = {"lora": "T4 LoRA", "dreambooth": "T4 DreamBooth", "hypernetwork": "T4 hypernetwork"}
# Methods without a named preset yet (nbkit.presets): their T4 starting values.
T4_VALUES: dict[str, dict[str, Any]] = {
    "textual_inversion": {"resolution": 512, "train_batch_size": 1, "mixed_precision": "fp16", "optimizer_type": "AdamW",
                          "gradient_checkpointing": True, "cache_latents": True, "sdpa": True, "learning_rate": 5e-3,
                          "max_train_steps": 1500},
}
TI_TOKEN = "sksemb"  # the textual-inversion word of new configs: made up, so the model has no meaning for it yet
TI_TEMPLATE = "subject_filewords.txt"  # A1111's template: "a photo of a [name], [filewords]" and the like
DEMO_PRESET = "CPU demo"
SAMPLE_EVERY = 200  # steps between preview images on a real run
SAVE_EVERY = 250  # steps between saved files (each with its resumable state)
OUTPUT_SUFFIX = {"lora": ".safetensors", "dreambooth": ".safetensors", "hypernetwork": ".pt",
                 "textual_inversion": ".safetensors"}
NOTEBOOK_OF = {"lora": "04_train_lora", "dreambooth": "05_train_dreambooth", "hypernetwork": "06_train_hypernetwork",
               "textual_inversion": "06b_train_textual_inversion"}
DEMO_PROMPTS = ("sks, a red circle on a white background --w 64 --h 64 --s 4 --d 1",
                "sks, a blue square on a black background --w 64 --h 64 --s 4 --d 2")
# Short runs on the tiny model: a few seconds each on a CPU, samples shown live by the monitor.
DEMO_OVERRIDES: dict[str, dict[str, Any]] = {
    "lora": {"max_train_steps": 12, "sample_every_n_steps": 6, "save_every_n_steps": 6},
    "dreambooth": {"max_train_steps": 8, "sample_every_n_steps": 4, "learning_rate": 1e-4, "num_class_images": 4,
                   "class_image_steps": 3, "class_image_batch_size": 4, "save_precision": "fp16"},
    "hypernetwork": {"max_train_steps": 8, "sample_every_n_steps": 4, "save_every_n_steps": 4, "learning_rate": "0.0005",
                     "gradient_checkpointing": False},
    "textual_inversion": {"max_train_steps": 8, "sample_every_n_steps": 4, "save_every_n_steps": 4, "learning_rate": 2e-2,
                          "init_word": "shape"},
}


def config_class(method: str):
    """The config dataclass of a training method."""
    if method == "lora":
        from nbkit.train.config import LoRATrainConfig
        return LoRATrainConfig
    if method == "dreambooth":
        from nbkit.train.dreambooth_config import DreamBoothTrainConfig
        return DreamBoothTrainConfig
    if method == "hypernetwork":
        from nbkit.train.hypernetwork_config import HypernetworkTrainConfig
        return HypernetworkTrainConfig
    if method == "textual_inversion":
        from nbkit.train.textual_inversion_config import TextualInversionTrainConfig
        return TextualInversionTrainConfig
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def trainer(method: str):
    """The training function of a method (``train_lora``, ``train_dreambooth``, ``train_hypernetwork``,
    ``train_textual_inversion``)."""
    config_class(method)  # checks the name
    if method == "lora":
        from nbkit.train.lora import train_lora
        return train_lora
    if method == "dreambooth":
        from nbkit.train.dreambooth import train_dreambooth
        return train_dreambooth
    if method == "textual_inversion":
        from nbkit.train.textual_inversion import train_textual_inversion
        return train_textual_inversion
    from nbkit.train.hypernetwork import train_hypernetwork
    return train_hypernetwork


# ---------------------------------------------------------------------------- the session
@dataclass
class NotebookProject:
    """A project folder plus what the notebooks need around it (demo mode, run files, outputs).

    Attribute access falls through to :class:`~nbkit.project.Project`: ``session.dataset_dir``,
    ``session.output_dir``, ``session.dataset_toml``, ``session.path``, ...
    """

    project: Project
    demo: bool = False
    demo_paths: dict[str, Path] | None = None

    def __getattr__(self, item: str):
        if item in ("project", "demo", "demo_paths"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(item)
        return getattr(self.project, item)

    def __repr__(self) -> str:
        mode = "demo, " if self.demo else ""
        return f"<project {self.project.name} ({mode}{self.project.path})>"

    # ---------------------------------------------------------------- inputs
    def source(self, real: str) -> str:
        """The dataset source to import: ``real``, or the drawn sample in demo mode."""
        return str(self.demo_paths["samples"]) if self.demo else real

    def tagger(self, kind: str, real: str) -> dict[str, str]:
        """Options selecting a tagger model: ``real`` (a Hub id), or the tiny one in demo mode."""
        if kind not in ("wd14", "blip"):
            raise ValueError("kind is 'wd14' or 'blip'")
        if self.demo:
            local = str(self.demo_paths[kind])
            if kind == "wd14" and not (self.demo_paths[kind] / "model.onnx").is_file():
                raise FileNotFoundError("demo mode: the tiny WD14 tagger is exported with the onnx package, which is "
                                        "not installed: run `%pip install onnx`, then this cell again")
            return {"model_dir": local} if kind == "wd14" else {"model_id": local, "max_length": 12}
        return {"repo_id": real} if kind == "wd14" else {"model_id": real}

    @property
    def base_model(self) -> str:
        """The base model of new configs: the tiny model in demo mode, else SD1.5 from the Hub."""
        return str(self.demo_paths["model"]) if self.demo else DEFAULT_BASE_MODEL

    def base_model_path(self, method: str = "lora") -> Path:
        """The base model a method's run trains on, as a local file or folder (merges need one):
        a Hub id is downloaded once into the Hugging Face cache."""
        from nbkit.models.load import resolve

        return resolve(self.config(method).pretrained_model_name_or_path)[1]

    def export_folder(self, real: str | Path) -> Path:
        """Where exports go: ``real``, or a stand-in folder for Drive in demo mode."""
        if self.demo:
            return self.project.root / DEMO_FOLDER / "drive-standin" / Path(real).name
        return Path(real).expanduser()

    def upload_plan(self, method: str, repo_id: str = "", private: bool = True, trigger: str | None = None):
        """What publishing ``method``'s final file to ``repo_id`` would upload (model card included);
        nothing is sent. Without a repo id the plan uses ``your-name/<file name>``."""
        from nbkit.export.plan import build_plan

        model = self.latest(method)
        configs = [p for p in (self.run_file(method), self.project.dataset_toml) if p.is_file()]
        name = self.config(method).output_name  # this run's newest previews (their files start with its name)
        folders = [self.project.output_dir / "sample", self.project.samples_dir]
        found = [p for folder in folders if folder.is_dir() for p in folder.glob(f"{name}_*.png")]
        samples = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:4]
        return build_plan(repo_id or f"your-name/{model.stem}", [model], samples=samples, configs=configs,
                          dataset=self.project.dataset_dir, private=private, trigger=trigger)

    @property
    def sample_prompts(self) -> Path:
        """``<project>/sample_prompts.txt``: the preview prompts (kohya's format) every run uses."""
        return self.project.path / "sample_prompts.txt"

    def write_sample_prompts(self, prompts: list[str] | tuple[str, ...], overwrite: bool = True) -> Path:
        """Write the preview prompts, one per line (options like ``--w 512 --s 20`` allowed). In demo
        mode the demo's 64 px prompts are written instead (real sizes would take minutes on a CPU)."""
        from nbkit.io import atomic_write_text
        from nbkit.train.sample_prompts import load_sample_prompts

        if self.demo and tuple(prompts) != DEMO_PROMPTS:
            print("demo mode: the 64 px demo prompts are written instead")
            prompts = DEMO_PROMPTS
        if overwrite or not self.sample_prompts.is_file():
            atomic_write_text(self.sample_prompts, "\n".join(prompts) + "\n")
        load_sample_prompts(self.sample_prompts)  # a wrong option fails here, not mid-run
        return self.sample_prompts

    # ---------------------------------------------------------------- run files
    def run_file(self, method: str) -> Path:
        """``<project>/run-<method>.toml``: the saved settings of one training method."""
        config_class(method)
        return self.project.run_file(method)

    def new_config(self, method: str, preset: str | None = None):
        """Fresh settings for ``method``: a preset (T4, or the CPU demo), the project's paths."""
        from nbkit.export.drive import use_project
        from nbkit.presets import apply_preset

        cls = config_class(method)
        preset = preset or (DEMO_PRESET if self.demo else T4_PRESETS.get(method))
        config = replace(cls(), **T4_VALUES.get(method, {}))
        config = apply_preset(config, preset) if preset else config
        values: dict[str, Any] = {
            "pretrained_model_name_or_path": self.base_model,
            "dataset_config": str(self.project.dataset_toml),
            "output_name": f"{self.project.name.replace(' ', '_')}-{method}",
        }
        if self.sample_prompts.is_file():  # live previews in the training monitor
            values.update(sample_prompts=str(self.sample_prompts), sample_every_n_steps=SAMPLE_EVERY)
        if method != "dreambooth":  # a DreamBooth save is a 2 GB model (+ 5 GB of state): only at the end
            values["save_every_n_steps"] = SAVE_EVERY
        if method == "dreambooth":
            values["class_data_dir"] = str(self.project.path / "class_images")
        if method == "textual_inversion":  # A1111 and ComfyUI call the embedding by its file name: the token
            values.update(token_string=TI_TOKEN, output_name=TI_TOKEN, template_file=TI_TEMPLATE)
        if method == "hypernetwork" and isinstance(config.learning_rate, float):
            values["learning_rate"] = str(config.learning_rate)  # a number or an A1111 schedule string
        if self.demo:
            values.update(DEMO_OVERRIDES[method])
        names = {f.name for f in fields(cls)}
        config = replace(config, **{k: v for k, v in values.items() if k in names})
        if method == "textual_inversion":
            config = self.token_prompts(config)
        return use_project(config, self.project)  # outputs in output/, resumable states in state/, logs in logs/

    def token_prompts(self, config):
        """A textual-inversion run's previews need its word in the prompt: the project's preview prompts with
        ``token_string`` put first where a line lacks it, written to ``<project>/sample_prompts-<token>.txt``;
        returns ``config`` using that file (unchanged without a token or without preview prompts)."""
        from nbkit.io import atomic_write_text
        from nbkit.train.sample_prompts import load_sample_prompts

        token = getattr(config, "token_string", None)
        if not token or not self.sample_prompts.is_file():
            return config
        lines = [p.to_line() for p in load_sample_prompts(self.sample_prompts)]
        path = self.project.path / f"sample_prompts-{token}.txt"
        atomic_write_text(path, "".join(f"{line if token in line else f'{token}, {line}'}\n" for line in lines))
        return replace(config, sample_prompts=str(path), sample_every_n_steps=config.sample_every_n_steps or SAMPLE_EVERY)

    def config(self, method: str):
        """The saved settings (``run-<method>.toml``) if there are any, else :meth:`new_config`."""
        from nbkit.train.run_file import load_run_config

        path = self.run_file(method)
        if path.is_file():
            return load_run_config(path, config_class(method))[0]
        return self.new_config(method)

    def save_config(self, config, method: str) -> Path:
        """Write ``run-<method>.toml`` (kohya option names)."""
        from nbkit.config import save_toml
        from nbkit.train.run_file import run_config_dict

        return save_toml(run_config_dict(config), self.run_file(method))

    def datasets(self, config, method: str) -> list:
        """The datasets a run trains on (the project's ``dataset.toml`` unless the config says otherwise)."""
        from nbkit.train.run_file import resolve_datasets

        base = self.project.path
        if method == "dreambooth":
            from nbkit.train.dreambooth_data import resolve_dreambooth_datasets

            return resolve_dreambooth_datasets(config, {}, base)
        if method == "hypernetwork":
            from nbkit.networks.hypernetwork.cli import hypernetwork_datasets

            return hypernetwork_datasets(config, {}, base)
        return resolve_datasets(config, {}, base)

    # ---------------------------------------------------------------- outputs
    def outputs(self, method: str) -> list[Path]:
        """The method's trained files in the output folder, the final one first, then newest first."""
        config = self.config(method)
        folder, name = Path(config.output_dir), config.output_name
        suffix = OUTPUT_SUFFIX[method]
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob(f"{name}*{suffix}") if p.is_file()]
        found.sort(key=lambda p: (p.stem != name, -p.stat().st_mtime))
        return found

    def latest(self, method: str, required: bool = True) -> Path | None:
        """The newest trained file of ``method``. In demo mode a short run makes one if there is none;
        otherwise a missing file is an error naming the notebook to run (or None if not ``required``)."""
        found = self.outputs(method)
        if found:
            return found[0]
        if self.demo:
            self.train(method, quiet=True)
            return self.outputs(method)[0]
        if not required:
            return None
        raise FileNotFoundError(f"no trained {method} in {self.project.output_dir}: run {NOTEBOOK_OF[method]} first")

    def train(self, method: str, hooks=None, quiet: bool = False):
        """Train ``method`` with the saved settings (what the training notebooks do, in one call)."""
        from nbkit.train.hooks import ProgressHooks

        config = self.config(method)
        if not self.run_file(method).is_file():  # as the training notebook does: the settings stay in the project
            self.save_config(config, method)
        hooks = hooks if hooks is not None or quiet else ProgressHooks(method)
        return trainer(method)(config, self.datasets(config, method), hooks=hooks)

    def preview(self, pipeline, config, prompts: str | Path | None = None, step: int = 0):
        """Render the preview prompts with ``pipeline`` into ``<output_dir>/sample`` (where the run's own
        previews are); returns a grid labelled with the prompts."""
        from nbkit.data.gallery import make_grid
        from nbkit.train.sample_prompts import SamplePrompt, load_sample_prompts
        from nbkit.train.sampling import generate_samples

        source = prompts or config.sample_prompts
        items = load_sample_prompts(source) if source else [SamplePrompt("a photo")]
        results = generate_samples(pipeline, items, default_sampler=config.sample_sampler, step=step, epoch=None,
                                   output_dir=config.output_dir, output_name=config.output_name,
                                   default_size=config.resolution, base_seed=config.seed, clip_skip=config.clip_skip)
        return make_grid([(image, p.prompt) for p, image, _ in results], columns=min(4, len(results)), thumb=256)


    def fit_or_stop(self, check, config):
        """After the pre-flight check: the config to train with. A run that fits is trained as it is; one that
        does not gets the estimator's fix (printed), or, when there is none, stops here with the reason
        instead of running out of memory later. Demo mode trains the tiny model anyway (it fits any GPU)."""
        if check.ok or self.demo:
            return config
        if check.fitted_config is not None:
            print("the pre-flight check's changes are applied so the run fits (see the list above)")
            return check.fitted_config
        raise RuntimeError("this run does not fit this GPU and the check found no change that makes it fit: "
                           "lower resolution or train_batch_size in the form above, then run the cells again")

    def xy_grid(self, method: str = "lora", strengths=None, limit: int = 5, show: bool = False):
        """The A1111-style X/Y grid of a run: rows are the base model and the run's saved files (oldest
        first, at most ``limit``), or the final file at ``strengths``; columns are the preview prompts, with
        the same seeds. Saved as ``<project>/samples/<output_name>-xy.png``; the grid shows as a cell's
        last expression."""
        import torch

        from nbkit.generate import Axis, xy_grid
        from nbkit.models.load import load_pipeline
        from nbkit.train.sample_prompts import load_sample_prompts

        config = self.config(method)
        self.latest(method)  # a clear error naming the training notebook when there is nothing yet
        files = sorted(self.outputs(method), key=lambda p: (p.stem == config.output_name, p.stat().st_mtime))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipeline, _ = load_pipeline(config.pretrained_model_name_or_path, v2=config.v2, device=device,
                                    v_parameterization=config.v_parameterization,
                                    torch_dtype=torch.float16 if device == "cuda" else torch.float32)
        prompts = [p.to_line() for p in load_sample_prompts(config.sample_prompts or self.sample_prompts)]
        rows = Axis.strengths(strengths) if strengths else Axis.files([None, *files[-limit:]])
        return xy_grid(pipeline, rows=rows, cols=Axis.prompts(prompts), network=files[-1], seed=config.seed,
                       default_size=config.resolution, sampler=config.sample_sampler, clip_skip=config.clip_skip,
                       out=self.project.samples_dir / f"{config.output_name}-xy.png", show=show)


def open_project(name: str, root: str | Path | None = None, step: str | None = None,
                 drive: bool = True, verbose: bool = True) -> NotebookProject:
    """Open (or create) project ``name``; in demo mode, under the demo root with demo material.

    ``step`` is the calling notebook's step (one of :data:`STEPS`): in demo mode what the earlier
    steps would have made is made first (the sample dataset is imported for every step after
    ``dataset``). ``drive``: on Colab, outside demo mode, mount Google Drive first so the project
    lives there (a no-op when mounted).
    """
    if step is not None and step not in STEPS:
        raise ValueError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    demo = demo_mode()
    if demo:
        root = Path(root) if root else demo_root()
        paths = ensure_demo_material(root)
        session = NotebookProject(Project.open(name, root), True, paths)
        session.write_sample_prompts(DEMO_PROMPTS, overwrite=False)
        if step not in (None, "setup", "dataset") and not session.dataset_toml.is_file():
            from nbkit.data.importer import import_dataset

            import_dataset([paths["samples"]], session.project, progress=False)
    else:
        if drive and root is None:
            _mount_drive_quietly()
        session = NotebookProject(Project.open(name, root))
        if "/drive/" in str(session.project.root):  # on Drive: downloads survive a runtime reset
            use_download_cache(session.project.root)
    if verbose:
        print(project_summary(session))
    if step == "train":  # the training cells call the trainers directly: torch's CPU threads are set here
        from nbkit.runtime import set_torch_threads

        note = set_torch_threads().note()
        if note and verbose:
            print(note)
    return session


def use_download_cache(projects_root: str | Path) -> Path:
    """Send this runtime's model downloads (Hugging Face repos and URL files) to ``<projects root>/_cache``
    unless ``HF_HUB_CACHE`` / ``NBKIT_CACHE_DIR`` say otherwise, so base models and taggers are downloaded
    once onto Drive instead of after every runtime reset."""
    import os
    import sys

    from nbkit.models.catalog import cache_dir_for

    cache = cache_dir_for(projects_root)
    os.environ.setdefault("NBKIT_CACHE_DIR", str(cache))
    os.environ.setdefault("HF_HUB_CACHE", str(cache / "huggingface"))
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: its cache path was read at import time
        constants.HF_HUB_CACHE = os.environ["HF_HUB_CACHE"]
    return cache


def _mount_drive_quietly() -> None:
    from nbkit.colab import mount_drive

    if _in_colab():
        mount_drive()  # reuses a mount; asks for permission only the first time in a runtime


def _in_colab() -> bool:
    from nbkit.colab import in_colab

    return in_colab()


def project_summary(session: NotebookProject) -> str:
    """A few lines: where the project is, and what earlier steps left in it."""
    p = session.project
    lines = [f"project '{p.name}': {p.path}" + ("  [DEMO: tiny model, sample data, short runs]" if session.demo else "")]
    if not session.demo and _in_colab() and "/drive/" not in str(p.path):
        lines.append("  note: not on Google Drive: a Colab runtime reset deletes it (mount Drive in 00_setup)")
    images = sum(1 for x in p.dataset_dir.rglob("*") if x.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    lines.append(f"  dataset: {images} images" + ("" if p.dataset_toml.is_file() else " (no dataset.toml yet: 01_dataset)"))
    saved = [m for m in METHODS if session.run_file(m).is_file()]
    lines.append(f"  run files: {', '.join(f'run-{m}.toml' for m in saved) or 'none yet (03_configure)'}")
    trained = [m for m in METHODS if session.outputs(m)]
    lines.append(f"  trained: {', '.join(trained) or 'nothing yet'}")
    return "\n".join(lines)
