"""``nbkit merge ...``, ``nbkit lora ...`` and ``nbkit convert ...`` subcommands.

Other modules may add commands under the same groups with :func:`command_group`, e.g.
``command_group(subparsers, "merge", ...).add_parser("hypernetworks", ...)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from nbkit.merge.a1111 import METHODS

_GROUP_HELP = {
    "merge": "merge checkpoints (A1111 merger), LoRAs into a checkpoint, LoRAs with LoRAs",
    "lora": "LoRA file tools (resize)",
    "convert": "convert checkpoints: diffusers <-> single file, .ckpt -> .safetensors, prune",
}


def command_group(subparsers: argparse._SubParsersAction, name: str, help_text: str = "") -> argparse._SubParsersAction:
    """The sub-command action of ``nbkit <name>``, created on first use and shared afterwards."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help_text or _GROUP_HELP.get(name, ""))
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def _friendly(func):
    """Print an expected failure as one plain line (exit code 2) instead of a traceback."""

    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"nbkit: error: {message}", file=sys.stderr)
            return 2

    return run


def parse_lora_spec(text: str) -> tuple[str, float]:
    """``"path.safetensors:0.8"`` -> ``("path.safetensors", 0.8)``; no ``:ratio`` means 1.0."""
    path, sep, ratio = text.rpartition(":")
    if sep:
        try:
            return path, float(ratio)
        except ValueError:
            pass
    return text, 1.0


# ----------------------------------------------------------------------------- handlers


@_friendly
def _cmd_merge_checkpoints(args) -> int:
    from nbkit.merge.checkpoints import merge_checkpoints

    user = json.loads(args.metadata_json) if args.metadata_json else None
    if user is not None and not (isinstance(user, dict) and all(isinstance(v, str) for v in user.values())):
        raise ValueError("--metadata-json must be a JSON object of strings")
    result = merge_checkpoints(
        args.a, args.b, args.c, out=args.out, method=args.method, multiplier=args.multiplier,
        save_as_half=args.save_as_half, discard=args.discard, bake_in_vae=args.bake_vae,
        copy_metadata_fields=not args.no_copy_metadata, metadata=user, config_source=args.config_source,
        hash_inputs=not args.no_hash, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    print(result.summary())
    return 0


@_friendly
def _cmd_lora_into(args) -> int:
    from nbkit.merge.lora_into import merge_lora_into

    loras = [parse_lora_spec(s) for s in args.lora]
    result = merge_lora_into(
        args.model, loras, args.out, precision=args.precision, save_precision=args.save_precision,
        config_dir=args.config_dir, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    print(result.summary())
    return 0


@_friendly
def _cmd_merge_loras(args) -> int:
    from nbkit.merge.lora_merge import merge_lora_files

    if args.concat == (args.new_rank is not None):
        raise ValueError("pass either --new_rank R (SVD merge) or --concat")
    result = merge_lora_files(
        [parse_lora_spec(s) for s in args.lora], args.out, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
        concat=args.concat, clamp_quantile=None if args.no_clamp else args.clamp_quantile,
        save_precision=args.save_precision, overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    print(result.summary())
    return 0


@_friendly
def _cmd_resize(args) -> int:
    from nbkit.merge.lora_merge import resize_lora_file

    report = resize_lora_file(
        args.input, args.out, new_rank=args.new_rank, new_conv_rank=args.new_conv_rank,
        dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param, save_precision=args.save_precision,
        overwrite=args.overwrite, progress=not args.quiet,
    )  # fmt: skip
    print(report.summary(verbose=args.verbose))
    return 0


@_friendly
def _cmd_convert(args) -> int:
    from nbkit.merge import convert

    kind = args.convert_command
    if kind == "to-single-file":
        path = convert.to_single_file(args.src, args.out, half=args.half, overwrite=args.overwrite)
    elif kind == "to-diffusers":
        path = convert.to_diffusers(args.src, args.out, config_dir=args.config_dir, half=args.half,
                                    overwrite=args.overwrite)  # fmt: skip
    elif kind == "ckpt-to-safetensors":
        path = convert.ckpt_to_safetensors(args.src, args.out, overwrite=args.overwrite, progress=not args.quiet)
    else:
        result = convert.prune_checkpoint(
            args.src, args.out, ema=args.ema, half=not args.no_half, drop=args.drop, overwrite=args.overwrite,
            progress=not args.quiet,
        )  # fmt: skip
        print(result.summary())
        return 0
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parsers


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_merge_checkpoints(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("checkpoints", help="A1111 checkpoint merger (weighted sum / add difference), streamed")
    p.add_argument("--a", required=True, help="model A (.safetensors, .ckpt or diffusers folder); its keys are kept")
    p.add_argument("--b", help="model B")
    p.add_argument("--c", help="model C (add_difference: A + M·(B − C))")
    p.add_argument("--method", default="weighted_sum", choices=list(METHODS))
    p.add_argument("--multiplier", "-M", type=float, default=0.3, help="M (default 0.3, as A1111)")
    p.add_argument("--save-as-half", "--save_as_half", action="store_true", help="store fp32 tensors as fp16")
    p.add_argument("--discard", metavar="REGEX", help="drop matching keys, e.g. 'model_ema'")
    p.add_argument("--bake-vae", "--bake-in-vae", dest="bake_vae", metavar="VAE",
                   help="VAE file (or diffusers vae folder) written into first_stage_model.*")  # fmt: skip
    p.add_argument("--config-source", type=int, default=0, choices=(0, 1, 2, 3),
                   help="copy a sibling .yaml: 0 = of A, B or C; 1 = B's; 2 = C's; 3 = none")  # fmt: skip
    p.add_argument("--metadata-json", help="extra safetensors metadata, a JSON object of strings")
    p.add_argument("--no-copy-metadata", action="store_true", help="do not copy the inputs' metadata fields")
    p.add_argument("--no-hash", action="store_true", help="skip the sha256 of the inputs in the recipe")
    p.add_argument("--out", required=True, help="output .safetensors (default when no suffix) or .ckpt")
    _common(p)
    p.set_defaults(func=_cmd_merge_checkpoints)


def _add_lora_into(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("lora-into", help="bake kohya LoRAs into a checkpoint (kohya merge_lora.py math)")
    p.add_argument("--model", required=True, help="base model: .safetensors/.ckpt or diffusers folder")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]", help="repeatable")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="merge arithmetic")
    p.add_argument("--save-precision", "--save_precision", choices=("fp32", "fp16", "bf16"),
                   help="store float tensors in this dtype (default: as in the model)")  # fmt: skip
    p.add_argument("--config-dir", help="diffusers config folder for a single file without embedded config")
    p.add_argument("--out", required=True, help="OUT.safetensors/.ckpt, or a folder (diffusers model input only)")
    _common(p)
    p.set_defaults(func=_cmd_lora_into)


def _add_merge_loras(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("loras", help="merge kohya LoRAs: SVD to a new rank (svd_merge_lora) or exact concat")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:RATIO]", help="repeatable")
    p.add_argument("--new_rank", "--new-rank", type=int, help="rank of the SVD merge (alpha = rank)")
    p.add_argument("--new_conv_rank", "--new-conv-rank", type=int, help="rank for 3x3 conv modules (default new_rank)")
    p.add_argument("--concat", action="store_true", help="exact: stack along the rank, alphas folded into lora_up")
    p.add_argument("--clamp_quantile", type=float, default=0.99, help="kohya's clamp of U and Vh (default 0.99)")
    p.add_argument("--no-clamp", action="store_true", help="no clamping (exact at full rank)")
    p.add_argument("--save_precision", "--save-precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--out", required=True, help="output .safetensors")
    _common(p)
    p.set_defaults(func=_cmd_merge_loras)


def _add_resize(group: argparse._SubParsersAction) -> None:
    from nbkit.merge.lora_math import DYNAMIC_METHODS

    p = group.add_parser("resize", help="change a LoRA's rank by SVD (kohya resize_lora.py)")
    p.add_argument("input", help="kohya LoRA .safetensors")
    p.add_argument("--new_rank", "--new-rank", type=int, default=4, help="rank, or the max rank when dynamic")
    p.add_argument("--new_conv_rank", "--new-conv-rank", type=int, help="rank for 3x3 convs (default new_rank)")
    p.add_argument("--dynamic_method", "--dynamic-method", choices=DYNAMIC_METHODS)
    p.add_argument("--dynamic_param", "--dynamic-param", type=float, help="the dynamic method's target")
    p.add_argument("--save_precision", "--save-precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--verbose", action="store_true", help="print one line per module")
    p.add_argument("--out", required=True, help="output .safetensors")
    _common(p)
    p.set_defaults(func=_cmd_resize)


def _add_convert(group: argparse._SubParsersAction) -> None:
    p = group.add_parser("to-single-file", help="diffusers folder -> original-layout .safetensors (SD1/SD2)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--half", action="store_true", help="store float tensors as fp16")
    _common(p)
    p = group.add_parser("to-diffusers", help="single .safetensors/.ckpt -> diffusers folder (offline)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--config-dir", help="diffusers config folder (default: embedded or shipped configs)")
    p.add_argument("--half", action="store_true", help="save fp16 weights")
    _common(p)
    p = group.add_parser("ckpt-to-safetensors", help=".ckpt (weights only) -> .safetensors, streamed")
    p.add_argument("src")
    p.add_argument("out", nargs="?", help="default: SRC with .safetensors")
    _common(p)
    p = group.add_parser("prune", help="drop EMA and training-only keys, store fp32 as fp16")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--ema", default="drop", choices=("drop", "keep", "use"),
                   help="model_ema.*: drop (default), keep, or use (copy EMA weights into the UNet, then drop)")  # fmt: skip
    p.add_argument("--no-half", action="store_true", help="keep fp32")
    p.add_argument("--drop", metavar="REGEX", help="also drop keys matching this regex")
    _common(p)
    for name in ("to-single-file", "to-diffusers", "ckpt-to-safetensors", "prune"):
        group.choices[name].set_defaults(func=_cmd_convert)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``nbkit merge {checkpoints,lora-into,loras}``, ``nbkit lora resize``, ``nbkit convert ...``."""
    merge = command_group(subparsers, "merge")
    _add_merge_checkpoints(merge)
    _add_lora_into(merge)
    _add_merge_loras(merge)
    _add_resize(command_group(subparsers, "lora"))
    _add_convert(command_group(subparsers, "convert"))
