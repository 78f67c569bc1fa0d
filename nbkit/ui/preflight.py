"""Pre-flight check before training: what will run, how long, and whether it fits the GPU.

    from nbkit.ui.preflight import preflight
    check = preflight(config, "lora", datasets)   # datasets: specs, a Project, a dataset TOML or folder
    check                                         # a table in the notebook; str(check) in a terminal
    if not check.ok: config = check.fitted_config or config   # the estimator's suggested fix

Counts come from the trainer's own functions (``collect_items``, ``steps_per_epoch``), so the
numbers are the ones the run will show. Peak VRAM and time come from ``nbkit.estimate`` (imported
lazily: without it the panel says so and still counts), the GPU from ``nbkit.colab.gpu_info``.
"""

from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

T4_GIB = 15.0
NO_GPU = "no GPU detected: numbers for a free Colab T4 (Runtime > Change runtime type > T4 GPU)"


@dataclass
class Preflight:
    """The numbers of a planned run; ``ok`` is False when it cannot start or will not fit."""

    method: str
    gpu: str  # what the numbers are for
    gpu_gib: float
    images: int = 0  # training images (without regularisation and validation images)
    reg_images: int = 0
    validation_images: int = 0
    subsets: int = 0
    samples_per_epoch: int = 0  # images x repeats
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    epochs: int | None = None
    peak_gib: float | None = None
    fits: bool | None = None  # None: not estimated
    step_seconds: float | None = None
    estimate: Any = None  # nbkit.estimate.Estimate
    fixed_captions: bool | None = None  # no caption option changes a caption between steps (text can be cached)
    fixes: list[str] = field(default_factory=list)  # suggested changes when it will not fit
    fitted_config: Any = None  # the config with those changes (from auto_fit)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.fits is not False

    @property
    def total_seconds(self) -> float | None:
        if self.step_seconds is None or self.total_steps is None:
            return None
        return self.step_seconds * self.total_steps

    def rows(self) -> list[tuple[str, str]]:
        reg = f" + {self.reg_images} regularisation" if self.reg_images else ""
        val = f" + {self.validation_images} held out for validation" if self.validation_images else ""
        rows = [("GPU", self.gpu), ("dataset", f"{self.images} images{reg}{val} in {self.subsets} subsets, "
                                              f"{self.samples_per_epoch} with repeats")]
        if self.steps_per_epoch is not None:
            rows.append(("steps", f"{self.steps_per_epoch} per epoch, {self.total_steps} in total "
                                  f"(~{self.epochs} epochs)"))
        if self.peak_gib is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            rows.append(("peak VRAM", f"{self.peak_gib:.1f} GiB of {self.gpu_gib:.1f} GiB: {verdict}"))
        if self.total_seconds is not None:
            rows.append(("time", f"~{_duration(self.total_seconds)} ({self.step_seconds:.2f} s/step)"))
        return rows

    def __str__(self) -> str:
        lines = [f"{name}: {value}" for name, value in self.rows()]
        lines += [f"ERROR: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        lines += [f"fix: {f}" for f in self.fixes] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(n)}</th>"
                        f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for n, v in self.rows())
        parts = [f"<b>Pre-flight check ({html.escape(self.method)})</b><table>{cells}</table>"]
        for items, style, head in ((self.errors, "color:#c62828", "Cannot start:"),
                                   (self.warnings, "color:#8a6d00", "Warnings:"),
                                   (self.fixes, "color:#1565c0", "Suggested changes (fitted_config has them):"),
                                   (self.notes, "color:#666", "Notes:")):
            if items:
                lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
                parts.append(f"<div style='{style}'><b>{head}</b><ul style='margin:2px 0'>{lis}</ul></div>")
        return "".join(parts)

    @property
    def widget(self):
        import ipywidgets as W

        return W.HTML(self._repr_html_())


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(1, minutes)} min"


def method_of(config) -> str:
    name = type(config).__name__.lower()
    return next((m for m in ("hypernetwork", "dreambooth", "lora") if m in name), "lora")


def preflight(config, method: str | None = None, datasets=None, gpu=None, *, arch: str | None = None,
              headroom_gib: float = 1.0, estimate: bool = True) -> Preflight:
    """Check a planned run. ``datasets``: resolved specs, a Project, a dataset TOML or an image
    folder (default: the config's own dataset_config / train_data_dir). ``gpu``: None (detect),
    a name the estimator knows ("T4", "L4", ...), a size in GiB, or ``nbkit.colab.gpu_info()``.
    ``estimate=False`` skips the VRAM/time simulation (it takes seconds to a minute on 2 vCPUs)."""
    method = method or method_of(config)
    label, gib, speed_name = _gpu(gpu)
    report = Preflight(method=method, gpu=label, gpu_gib=gib)
    if gpu is None and label == NO_GPU:
        report.warnings.append("no GPU: training on a CPU takes hours; the numbers below are for a T4")
    _count(report, config, method, datasets)
    if estimate:
        _estimate(report, config, method, arch, speed_name, headroom_gib)
    _config_warnings(report, config)
    return report


# ----------------------------------------------------------------------------- parts
def _gpu(gpu) -> tuple[str, float, str | None]:
    """(label, GiB, name for the speed table)."""
    if gpu is None:
        try:
            from nbkit.colab import gpu_info

            gpu = gpu_info()
        except ImportError:
            gpu = None
        if gpu is None:
            return NO_GPU, T4_GIB, "T4"
    if isinstance(gpu, (int, float)):
        return f"a {gpu:g} GiB GPU", float(gpu), None
    if isinstance(gpu, str):
        known = _known_gpus()
        if gpu not in known:
            raise ValueError(f"gpu={gpu!r}: use one of {', '.join(known)}, a size in GiB, or None to detect it")
        return f"{gpu} ({known[gpu]:g} GiB)", known[gpu], gpu
    name, total = str(getattr(gpu, "name", "GPU")), float(gpu.total_gib)
    return f"{name} ({total:.1f} GiB)", total, _speed_name(name)


def _known_gpus() -> dict[str, float]:
    try:
        from nbkit.estimate import GPU_MEMORY_GIB

        return dict(GPU_MEMORY_GIB)
    except ImportError:
        return {"T4": T4_GIB}


def _speed_name(detected: str) -> str | None:
    """'Tesla T4' -> 'T4' (the estimator's names), longest match first."""
    names = sorted(_known_gpus(), key=len, reverse=True)
    compact = detected.replace(" ", "").upper()
    return next((n for n in names if n.replace("-", "").upper() in compact.replace("-", "")), None)


def _resolve(config, method: str, datasets):
    from nbkit.data.check import load_datasets

    if datasets is not None:
        return load_datasets(datasets, config.resolution, config.train_batch_size)[0]
    if method == "dreambooth":
        from nbkit.train.dreambooth_data import resolve_dreambooth_datasets

        return resolve_dreambooth_datasets(config, None, None)
    if method == "hypernetwork" and getattr(config, "train_data_dir", None):
        from nbkit.train.hypernetwork_data import folder_dataset

        return folder_dataset(config.train_data_dir, config.resolution, config.train_batch_size)
    from nbkit.train.run_file import resolve_datasets

    return resolve_datasets(config, None, None)


def _count(report: Preflight, config, method: str, datasets) -> None:
    from nbkit.data.train_data import collect_items, steps_per_epoch

    try:
        specs = _resolve(config, method, datasets)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items, held_out = collect_items(specs, config.seed)
    except (ValueError, OSError) as err:  # ConfigError / DatasetError: what the trainer would stop with
        report.errors.append(str(err))
        return
    report.warnings += [str(w.message) for w in caught]
    report.fixed_captions = _fixed_captions(items)
    report.subsets = sum(len(ds.subsets) for ds in specs)
    report.images = sum(1 for it in items if not it.subset.is_reg)
    report.reg_images = len(items) - report.images
    report.validation_images = len(held_out)
    report.samples_per_epoch = sum(it.repeats for it in items)
    report.steps_per_epoch = steps_per_epoch(items, None, config.gradient_accumulation_steps)
    epochs = getattr(config, "max_train_epochs", None)
    report.total_steps = epochs * report.steps_per_epoch if epochs else config.max_train_steps
    report.epochs = math.ceil(report.total_steps / max(1, report.steps_per_epoch))
    if report.total_steps < report.steps_per_epoch:
        report.warnings.append(f"max_train_steps={report.total_steps} is less than one epoch "
                               f"({report.steps_per_epoch} steps): some images are never seen")


def _fixed_captions(items) -> bool | None:
    """True when no subset option changes captions from step to step (the trainer's own rule)."""
    try:
        from nbkit.train.caching import changing_caption_options
    except ImportError:
        return None
    return not changing_caption_options(items)


def _estimate(report: Preflight, config, method: str, arch, speed_name, headroom_gib: float) -> None:
    est = _estimator()
    if est is None:
        report.notes.append("VRAM and time estimator not available (nbkit.estimate): counts only")
        return
    try:
        setting = est.setting_from_config(config, method, arch=arch)
        report.estimate = est.estimate(setting)
        report.peak_gib = float(report.estimate.peak_gib)
        report.fits = report.peak_gib + headroom_gib <= report.gpu_gib
    except Exception as err:  # an estimator failure must not hide the rest of the panel
        report.notes.append(f"VRAM estimate failed: {err}")
        return
    if speed_name:
        try:
            report.step_seconds = float(est.estimate_step_seconds(setting, gpu=speed_name))
        except Exception as err:
            report.notes.append(f"time estimate failed: {err}")
    if not report.fits:
        report.warnings.append(f"estimated peak {report.peak_gib:.1f} GiB + {headroom_gib:g} GiB headroom exceeds "
                               f"the {report.gpu_gib:.1f} GiB GPU: training would stop with CUDA out of memory")
        _suggest(report, config, method, arch, headroom_gib, est)


def _estimator():
    """The estimator's functions, or None while ``nbkit.estimate`` is missing or incomplete."""
    try:
        from nbkit.estimate import auto_fit, estimate, estimate_step_seconds, setting_from_config
    except ImportError:
        return None
    try:
        from nbkit.estimate.guard import needed_gpu
    except ImportError:
        needed_gpu = None
    return SimpleNamespace(auto_fit=auto_fit, estimate=estimate, estimate_step_seconds=estimate_step_seconds,
                           setting_from_config=setting_from_config, needed_gpu=needed_gpu)


def _suggest(report: Preflight, config, method: str, arch, headroom_gib: float, est) -> None:
    options = {"fixed_captions": True} if report.fixed_captions else {}
    try:
        fitted, fitted_estimate, changes = est.auto_fit(config, method, gpu_gib=report.gpu_gib,
                                                        headroom_gib=headroom_gib, arch=arch, **options)
    except Exception as err:  # nbkit.estimate.FitError: nothing fits; its message says why
        report.warnings.append(f"no automatic fix: {err}")
        if est.needed_gpu is not None and report.peak_gib is not None:
            report.warnings.append(f"as set, this run would need {est.needed_gpu(report.peak_gib, headroom_gib)}")
        fitted, fitted_estimate, changes = None, None, None
    if changes:
        report.fixes = _describe_changes(changes)
        report.fitted_config = fitted
        if fitted_estimate is not None:
            report.fixes.append(f"estimated peak with these changes: {float(fitted_estimate.peak_gib):.1f} GiB")
    else:
        report.fixes = generic_fixes(config)


def _describe_changes(changes) -> list[str]:
    if isinstance(changes, dict):
        return [f"{key} = {value!r}" for key, value in changes.items()]
    out = []
    for change in changes:
        if isinstance(change, (tuple, list)) and len(change) == 3:
            out.append(f"{change[0]}: {change[1]!r} -> {change[2]!r}")
        elif isinstance(change, (tuple, list)) and len(change) == 2:
            out.append(f"{change[0]} = {change[1]!r}")
        else:
            out.append(str(change))
    return out


def generic_fixes(config) -> list[str]:
    """The usual VRAM savers the config does not use yet, biggest saving first."""
    get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
    fixes = []
    if get("gradient_checkpointing") is False:
        fixes.append("enable gradient_checkpointing (much less VRAM, ~20% slower)")
    if "8bit" not in str(get("optimizer_type", "")).lower():
        fixes.append("use optimizer_type = \"AdamW8bit\" (optimizer state in 8 bits)")
    if get("mixed_precision") == "no":
        fixes.append("set mixed_precision = \"fp16\"")
    if (get("train_batch_size") or 1) > 1:
        fixes.append("set train_batch_size = 1 (raise gradient_accumulation_steps to keep the effective batch)")
    if get("cache_latents") is False:
        fixes.append("enable cache_latents (the VAE leaves the GPU)")
    if get("use_ema") and not get("ema_on_cpu", True):
        fixes.append("set ema_on_cpu = true")
    if get("train_text_encoder") or (hasattr(config, "network_train_unet_only") and not config.network_train_unet_only):
        fixes.append("train the U-Net only (network_train_unet_only / train_text_encoder = false)")
    if (get("resolution") or 512) > 512:
        fixes.append("lower resolution to 512")
    return fixes


def _config_warnings(report: Preflight, config) -> None:
    precision = getattr(config, "mixed_precision", None)
    if precision == "bf16" and "T4" in report.gpu:
        report.warnings.append("a T4 has no bf16: set mixed_precision = \"fp16\"")
    if getattr(config, "sample_prompts", None) and not (getattr(config, "sample_every_n_steps", None)
                                                        or getattr(config, "sample_every_n_epochs", None)):
        report.notes.append("sample_prompts is set but no sample_every_n_steps/epochs: no previews during training")
    if not getattr(config, "pretrained_model_name_or_path", "x"):
        report.errors.append("pretrained_model_name_or_path is empty: choose a base model")
    output = Path(getattr(config, "output_dir", ".") or ".")
    if output.exists() and not output.is_dir():
        report.errors.append(f"output_dir {output} is a file: choose a folder")
