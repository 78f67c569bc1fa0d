"""The setup notebook's checks: GPU, memory, versions, Drive, Hub token, and a one-line "ready".

    from nbkit.runtime import environment_report, connect_drive, hub_login, ready_line
    environment_report()          # prints the GPU (warns without a T4-class card), RAM and versions

Everything here is quick and safe to run again; nothing is installed or downloaded.

Also here: the CPU thread count for training (:func:`set_torch_threads`) and the quieting of other
libraries' noise (:func:`quiet_library_noise`, applied by ``import nbkit``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import logging
import os
import platform
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "huggingface_hub",
            "onnxruntime", "onnxruntime-gpu", "ipywidgets")
T4_NAMES = ("T4",)
T4_GIB = (14.0, 16.5)  # a T4 reports ~14.6 GiB; cards in this range take the T4 presets as they are
DEMO_ENV = "NBKIT_DEMO"


def demo_mode() -> bool:
    """True when ``NBKIT_DEMO`` is set to anything but empty, 0, false or no."""
    return os.environ.get(DEMO_ENV, "").strip().lower() not in ("", "0", "false", "no")


def demo_root() -> Path:
    """``$NBKIT_HOME/_demo`` if ``NBKIT_HOME`` is set, else ``<tempdir>/nbkit-demo-projects``: stable
    across kernels, and never a real project's folder (no project name starts with ``_``)."""
    home = os.environ.get("NBKIT_HOME")
    return Path(home).expanduser() / "_demo" if home else Path(tempfile.gettempdir()) / "nbkit-demo-projects"


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions (missing packages are left out), read without importing them."""
    out = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def memory_gib() -> tuple[float | None, float | None]:
    """(total, available) system RAM in GiB from /proc/meminfo (None elsewhere)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None, None
    values = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines() if line.split()[1:2]}
    kib = 2**20
    total, free = values.get("MemTotal"), values.get("MemAvailable")
    return (total / kib if total else None), (free / kib if free else None)


@dataclass
class Environment:
    python: str
    packages: dict[str, str]
    gpu: object | None  # nbkit.colab.GpuInfo
    cuda: str | None
    ram_total_gib: float | None
    ram_free_gib: float | None
    in_colab: bool
    demo: bool
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        from nbkit.colab import describe_gpu

        out = [describe_gpu(self.gpu) + (f" (CUDA {self.cuda})" if self.cuda and self.gpu else "")]
        if self.ram_total_gib:
            out.append(f"RAM: {self.ram_total_gib:.1f} GiB total, {self.ram_free_gib or 0:.1f} GiB available")
        out.append(f"Python {self.python}" + (" in Google Colab" if self.in_colab else ""))
        out.append("packages: " + ", ".join(f"{k} {v}" for k, v in self.packages.items()))
        if self.demo:
            out.append("DEMO mode (NBKIT_DEMO=1): tiny model, drawn sample data, short runs; nothing is downloaded")
        out += [f"WARNING: {w}" for w in self.warnings]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def gpu_warnings(gpu) -> list[str]:
    """No GPU, a card that is not T4-class, or VRAM another process holds."""
    if gpu is None:
        return ["no GPU: only the demo (NBKIT_DEMO=1) is practical on a CPU. In Colab: Runtime > Change runtime "
                "type > T4 GPU, then run this notebook again."]
    out = []
    t4_class = any(n in gpu.name for n in T4_NAMES) or T4_GIB[0] <= gpu.total_gib <= T4_GIB[1]
    if not t4_class:
        if gpu.total_gib < T4_GIB[0]:
            out.append(f"{gpu.name} has {gpu.total_gib:.1f} GiB, less than a T4's 15: the T4 presets may not fit; "
                       "use the pre-flight check's suggested changes (03_configure)")
        else:
            out.append(f"{gpu.name} is not a T4: the T4 presets work as they are; with {gpu.total_gib:.0f} GiB "
                       "you can raise train_batch_size (the pre-flight check tells you what fits)")
    if gpu.free_gib < 0.8 * gpu.total_gib:
        out.append(f"only {gpu.free_gib:.1f} of {gpu.total_gib:.1f} GiB VRAM is free: another process holds the GPU "
                   "(Runtime > Restart session frees it)")
    return out


def environment_report(verbose: bool = True) -> Environment:
    """GPU model and free VRAM, RAM, Python and package versions; prints them unless ``verbose`` is False."""
    import torch

    from nbkit.colab import gpu_info, in_colab
    versions = {"nbkit": _nbkit_version(), **package_versions()}
    gpu = gpu_info()
    total, free = memory_gib()
    env = Environment(platform.python_version(), versions, gpu, torch.version.cuda, total, free, in_colab(),
                      demo_mode(), gpu_warnings(gpu))
    if total is not None and total < 11.0:
        env.warnings.append(f"{total:.1f} GiB of RAM, less than a free Colab's ~12.7: loading or merging SD1.5 "
                            "checkpoints may run out of memory")
    if "onnxruntime" in versions and "onnxruntime-gpu" in versions:
        env.warnings.append("both onnxruntime and onnxruntime-gpu are installed: `pip uninstall -y onnxruntime` "
                            "so the WD14 tagger uses the GPU")
    if verbose:
        print(env)
    return env


def _nbkit_version() -> str:
    from nbkit._version import __version__

    return __version__


def connect_drive(enabled: bool = True):
    """Mount Google Drive (Colab, not in demo mode); returns MyDrive or None, saying why."""
    if demo_mode():
        print(f"demo mode: Google Drive is not used; demo projects live in {demo_root()}")
        return None
    if not enabled:
        print("Drive not used: projects stay on this runtime's disk and are lost when it is deleted")
        return None
    from nbkit.colab import mount_drive

    return mount_drive()


def hub_login():
    """The Hugging Face token box (``nbkit.ui.hub_login.HubLogin``), or None in demo mode.

    A token typed into the box is cleared from it at once and kept in this runtime's memory only
    (as ``HF_TOKEN`` for downloads of gated models); it is never printed or written to a file.
    A Colab secret named HF_TOKEN is found by every notebook, also after a runtime reset."""
    if demo_mode():
        print("demo mode: Hub login skipped (nothing is downloaded or uploaded)")
        return None
    from nbkit.ui.hub_login import HubLogin

    return HubLogin(on_token=lambda token: os.environ.__setitem__("HF_TOKEN", token.reveal()))


def ready_line(session=None) -> str:
    """One line: nbkit version, GPU and free VRAM, Drive, Hub token, project."""
    from nbkit.colab import drive_mounted, gpu_info
    from nbkit.export.hub import resolve_token

    gpu = gpu_info()
    parts = [f"nbkit {_nbkit_version()}",
             f"{gpu.name} ({gpu.free_gib:.1f} GiB free)" if gpu else "no GPU",
             "Drive mounted" if drive_mounted() else "no Drive"]
    token = resolve_token()
    parts.append(f"Hub token: {token.source}" if token else "no Hub token")
    if session is not None:
        parts.append(f"project '{session.project.name}'" + (" (demo)" if session.demo else ""))
    warn = "" if gpu is not None or (session is not None and session.demo) else "  (warning: no GPU)"
    return "ready: " + " | ".join(parts) + warn


# ---------------------------------------------------------------- CPU threads
@dataclass
class ThreadChoice:
    threads: int
    cores: int
    load: float | None  # other runnable work, when the count was picked by load
    source: str  # "--threads", "OMP_NUM_THREADS" or "load"

    def note(self) -> str | None:
        """One line when nbkit chose fewer threads than there are cores (None otherwise)."""
        if self.source != "load" or self.threads >= self.cores:
            return None
        return (f"threads: {self.threads} of {self.cores} cores (other processes keep about {self.load:.1f} busy); "
                "choose with --threads N or OMP_NUM_THREADS=N")


_TORCH_DEFAULT_THREADS: list[int] = []  # torch's own count, read before nbkit first changes it


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    return max(1, cores)


def other_load() -> float:
    """Runnable work besides this process: the 1-minute load average, or the tasks runnable right now
    (less this one) when that is lower, so work that just ended, this process's own included, does not count."""
    try:
        average = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return average
    return max(0.0, min(average, float(running)))


def pick_threads(cores: int, load: float) -> int:
    """Intra-op threads for ``cores`` usable cores while other processes keep ``load`` of them busy:
    one per core left free (rounded), at least 1, at most ``cores``.

    torch's OpenMP threads wait for each other at every operation, so one thread more than the free
    cores costs far more than one fewer: the 60-step CPU demo took 17 s on an idle 2-core machine and
    27 min on a loaded one with torch's default of one thread per core."""
    return max(1, min(cores, round(cores - load)))


def set_torch_threads(explicit: int | None = None, cores: int | None = None, load: float | None = None) -> ThreadChoice:
    """Set torch's intra-op thread count: ``explicit`` (``--threads``) if given; left alone when
    ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` is set (torch follows it); else :func:`pick_threads`
    for the usable cores (at most torch's own default) and the current load."""
    import torch

    if not _TORCH_DEFAULT_THREADS:
        _TORCH_DEFAULT_THREADS.append(torch.get_num_threads())
    cores = cores or min(usable_cores(), _TORCH_DEFAULT_THREADS[0])
    if explicit:
        torch.set_num_threads(explicit)
        return ThreadChoice(explicit, cores, None, "--threads")
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return ThreadChoice(torch.get_num_threads(), cores, None, "OMP_NUM_THREADS")
    load = other_load() if load is None else load
    threads = pick_threads(cores, load)
    torch.set_num_threads(threads)
    return ThreadChoice(threads, cores, load, "load")


# ---------------------------------------------------------------- library noise
# Messages other libraries print in every nbkit run that tell the user nothing they can act on.
# Each is dropped by its own text, on the logger that emits it; nothing else from those loggers is.
NOISE = {
    # transformers 5 without torchvision (it does not import beside the CPU torch wheel): the PIL
    # image processors it falls back to are the ones nbkit uses anyway
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    # diffusers 0.42 warns on every ``model.to(dtype)`` even when no module must stay in float32
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
    # bitsandbytes' optional 4-bit CPU inference kernel (nbkit uses only its 8-bit optimizers)
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
_BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"


class _DropMessages(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


class _WithoutKernelsPackage(importlib.abc.Loader):
    """Runs bitsandbytes' CPU backend module with the ``kernels`` package hidden.

    On import, that module asks the Hub for ``kernels-community/quantization-bitsandbytes`` (a
    4-bit *inference* kernel) through ``kernels.get_kernel`` when ``kernels`` is installed and the
    CPU has AVX512-BF16; no setting turns this off. Offline it warns "Skipping publisher trust
    check..."; online it downloads code. Hidden, the import fails and bitsandbytes keeps its own
    kernels, which its 8-bit optimizers use. ``kernels`` stays importable for everything else."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        missing = object()
        saved = sys.modules.get("kernels", missing)
        sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if saved is missing:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = saved


class _BitsandbytesCpuOpsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _BNB_CPU_OPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _WithoutKernelsPackage(spec.loader)
        return spec


def quiet_library_noise() -> None:
    """Drop the messages in :data:`NOISE` and stop bitsandbytes' Hub kernel lookup (idempotent;
    ``import nbkit`` calls it, so it is in place before any of those libraries is imported)."""
    for name, texts in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(texts))
    warnings.filterwarnings("ignore", message=r"Skipping publisher trust check for 'kernels-community/",
                            category=UserWarning)
    if _BNB_CPU_OPS not in sys.modules and not any(isinstance(f, _BitsandbytesCpuOpsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesCpuOpsFinder())
