"""The ``nbkit`` command. Training flags are generated from the config dataclasses; every flag is
spelt with kohya's underscores and takes dashes too (:mod:`nbkit.cli_parser`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nbkit._version import __version__

# Modules with an ``add_commands(subparsers)`` function: ``nbkit dataset ...``, ``nbkit tag ...``.
COMMAND_MODULES = ("nbkit.data.cli", "nbkit.tag.cli", "nbkit.merge.cli",
                   "nbkit.networks.hypernetwork.cli", "nbkit.export.cli", "nbkit.estimate.cli",
                   "nbkit.generate")


def _cmd_make_tiny_model(args) -> int:
    from nbkit.models.tiny import make_tiny_model

    if args.v_pred and args.arch != "sdxl":
        print("nbkit: error: --v_pred is for --arch sdxl; a v-prediction SD2 model is --arch sd21-v", file=sys.stderr)
        return 2
    paths = make_tiny_model(args.out, arch=args.arch, seed=args.seed, single_file=args.single_file, v_pred=args.v_pred)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_train_lora(args) -> int:
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.hooks import ProgressHooks
    from nbkit.train.lora import train_lora
    from nbkit.train.run_file import config_from_args, resolve_datasets

    config, inline, base_dir = config_from_args(args, LoRATrainConfig)
    datasets = resolve_datasets(config, inline, base_dir)
    result = train_lora(config, datasets, hooks=ProgressHooks("LoRA"))
    if result.main_process:
        print(f"LoRA: {result.lora_path} ({result.steps} steps)")
    return 0


def _cmd_train_dreambooth(args) -> int:
    from nbkit.train.dreambooth import train_dreambooth
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.dreambooth_data import resolve_dreambooth_datasets
    from nbkit.train.hooks import ProgressHooks
    from nbkit.train.run_file import config_from_args

    config, inline, base_dir = config_from_args(args, DreamBoothTrainConfig)
    datasets = resolve_dreambooth_datasets(config, inline, base_dir)
    result = train_dreambooth(config, datasets, hooks=ProgressHooks("DreamBooth"))
    if result.main_process:
        print(f"DreamBooth: {', '.join(map(str, result.model_paths))} ({result.steps} steps)")
    return 0


def _cmd_train_textual_inversion(args) -> int:
    from nbkit.train.hooks import ProgressHooks
    from nbkit.train.run_file import config_from_args, resolve_datasets
    from nbkit.train.textual_inversion import train_textual_inversion
    from nbkit.train.textual_inversion_config import TextualInversionTrainConfig

    config, inline, base_dir = config_from_args(args, TextualInversionTrainConfig)
    datasets = resolve_datasets(config, inline, base_dir)
    result = train_textual_inversion(config, datasets, hooks=ProgressHooks("embedding"))
    if result.main_process:
        print(f"embedding: {result.embedding_path} ({result.steps} steps; prompt word {result.tokens[0]!r})")
    return 0


def _cmd_demo(args) -> int:
    from nbkit.demo import run_demo

    run_demo(out=args.out, model=args.model or "", steps=args.steps, threads=args.threads)
    return 0


def _thread_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of threads, 1 or more")
    return int(text)


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_thread_count, metavar="N",
                        help="CPU threads for torch (default: the cores other processes leave free, or "
                             "$OMP_NUM_THREADS when set)")


def build_parser() -> argparse.ArgumentParser:
    from nbkit.cli_parser import NbkitArgumentParser, add_spelling_aliases
    from nbkit.config import add_dataclass_arguments
    from nbkit.train.config import LoRATrainConfig
    from nbkit.train.dreambooth_config import DreamBoothTrainConfig
    from nbkit.train.textual_inversion_config import TextualInversionTrainConfig

    parser = NbkitArgumentParser(prog="nbkit", description="Train Stable Diffusion add-ons on a free Colab GPU. "
                                 "Flags take kohya's spelling (--network_dim); dashes instead of underscores work too.")
    parser.add_argument("--version", action="version", version=f"nbkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny seeded SD model (diffusers folder, optional single file)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--arch", default="sd15", choices=("sd15", "sd21", "sd21-v", "sdxl"))
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--single_file", action="store_true",
                      help="also write OUT.safetensors in the original layout (SGM layout for sdxl)")
    tiny.add_argument("--v_pred", action="store_true",
                      help="sdxl: a v-prediction model (the single file gets ComfyUI's v_pred key); for SD2 use --arch sd21-v")
    tiny.set_defaults(func=_cmd_make_tiny_model)

    train = sub.add_parser("train", help="train a network")
    methods = train.add_subparsers(dest="method", required=True)
    lora = methods.add_parser("lora", help="train a LoRA (kohya option names)")
    lora.add_argument("--config", help="run TOML (kohya option names; dataset inline or via dataset_config)")
    add_dataclass_arguments(lora, LoRATrainConfig)
    lora.set_defaults(func=_cmd_train_lora)
    dreambooth = methods.add_parser("dreambooth", help="DreamBooth: fine-tune the model (kohya train_db names)")
    dreambooth.add_argument("--config", help="run TOML (kohya option names; train_data_dir, dataset inline or dataset_config)")
    add_dataclass_arguments(dreambooth, DreamBoothTrainConfig)
    dreambooth.set_defaults(func=_cmd_train_dreambooth)
    embedding = methods.add_parser("textual_inversion", help="train a textual-inversion embedding (kohya "
                                   "train_textual_inversion names; SD1, SD2, SDXL)")
    embedding.add_argument("--config", help="run TOML (kohya option names; dataset inline or via dataset_config)")
    add_dataclass_arguments(embedding, TextualInversionTrainConfig)
    embedding.set_defaults(func=_cmd_train_textual_inversion)
    sub._nbkit_train_methods = methods  # COMMAND_MODULES may add `nbkit train <method>` here

    for module in COMMAND_MODULES:  # each feature area adds its own subcommands
        importlib.import_module(module).add_commands(sub)

    demo = sub.add_parser("demo", help="train a LoRA on a bundled tiny model and sample data (CPU, offline)")
    demo.add_argument("--out", default="nbkit-demo", help="output folder (default: ./nbkit-demo)")
    demo.add_argument("--model", help="a real base model (Hub id, URL or file) instead of the tiny one")
    demo.add_argument("--steps", type=int, help="training steps (default 60 tiny, 400 real)")
    _add_threads_option(demo)
    demo.set_defaults(func=_cmd_demo)
    for method in dict.fromkeys(methods.choices.values()):  # lora, dreambooth and the ones modules added
        _add_threads_option(method)
    add_spelling_aliases(parser)  # every flag: kohya's underscores shown, dashes accepted
    return parser


def _set_threads(explicit: int | None) -> None:
    from nbkit.runtime import set_torch_threads

    note = set_torch_threads(explicit).note()
    if note:
        print(note)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from nbkit.config import ConfigError
    from nbkit.data.images import DatasetError

    if args.command == "train":
        _set_threads(args.threads)
    try:
        return args.func(args)
    except (ConfigError, DatasetError) as err:
        print(f"nbkit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
