"""``nbkit estimate`` and the ``--auto_fit`` option of ``nbkit train <method>``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from nbkit.estimate.setting import ARCHS, GPU_MEMORY_GIB, METHODS, Setting

#: the training options' defaults, as the estimator takes them from the config dataclasses
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Setting)}


def _flag(parser, name: str, **kwargs) -> None:
    """kohya's ``--train_batch_size``; ``--train-batch-size`` works too (nbkit.cli_parser adds the alias)."""
    parser.add_argument(f"--{name}", dest=name, **kwargs)


def add_estimate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("estimate", help="simulated peak GPU memory of a training step (no GPU needed)",
                       description="Runs one training step of the real model on PyTorch's meta device and prints "
                                   "the simulated peak GPU memory (GiB) with its parts; the last line is peak=<GB> (10^9 bytes).")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--arch", choices=ARCHS, default=DEFAULTS["arch"])
    _flag(p, "resolution", type=int, default=DEFAULTS["resolution"])
    _flag(p, "train_batch_size", type=int, default=DEFAULTS["train_batch_size"])
    _flag(p, "gradient_accumulation_steps", type=int, default=DEFAULTS["gradient_accumulation_steps"])
    _flag(p, "gradient_checkpointing", action="store_true", help="recompute activations in the backward")
    _flag(p, "optimizer_type", default=DEFAULTS["optimizer_type"], help="AdamW8bit, AdamW, Adafactor, Lion, Lion8bit, Prodigy, ...")
    _flag(p, "mixed_precision", choices=("fp16", "bf16", "no"), default=DEFAULTS["mixed_precision"])
    _flag(p, "train_text_encoder", action="store_true", help="train the text encoder (LoRA or full)")
    _flag(p, "cache_text_encoder_outputs", action="store_true", help="frozen text encoder off the GPU")
    _flag(p, "no_cache_latents", action="store_true", help="encode images with the VAE every step")
    _flag(p, "network_dim", type=int, default=DEFAULTS["network_dim"])
    _flag(p, "conv_dim", type=int, default=DEFAULTS["conv_dim"])
    _flag(p, "network_module", default=DEFAULTS["network_module"], help="networks.lora or lycoris.kohya")
    _flag(p, "network_args", nargs="*", default=None, help='LyCORIS options as kohya writes them: algo=lokr factor=8 dora_wd=True')
    _flag(p, "use_ema", action="store_true", help="DreamBooth EMA copy in VRAM")
    _flag(p, "max_token_length", type=int, choices=(75, 150, 225), default=DEFAULTS["max_token_length"])
    p.add_argument("--gpu", default="T4", help=f"GPU to compare with: {', '.join(GPU_MEMORY_GIB)} or GiB (default T4)")
    p.add_argument("--headroom", type=float, default=1.0, help="GiB to keep free (default 1)")
    p.add_argument("--time", action="store_true", help="also estimate seconds per step from FLOPs (slower)")
    p.set_defaults(func=_cmd_estimate)
    return p


def setting_from_args(args) -> Setting:
    return Setting(method=args.method, arch=args.arch, resolution=args.resolution, train_batch_size=args.train_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                   gradient_checkpointing=args.gradient_checkpointing, optimizer_type=args.optimizer_type,
                   mixed_precision=args.mixed_precision, train_text_encoder=args.train_text_encoder,
                   cache_text_encoder_outputs=args.cache_text_encoder_outputs, cache_latents=not args.no_cache_latents,
                   network_dim=args.network_dim, conv_dim=args.conv_dim, network_module=args.network_module,
                   network_args=tuple(args.network_args) if args.network_args else None, use_ema=args.use_ema,
                   ema_on_cpu=not args.use_ema, max_token_length=args.max_token_length)


def _cmd_estimate(args) -> int:
    from nbkit.estimate.estimator import estimate
    from nbkit.estimate.fit import gpu_memory

    try:
        setting = setting_from_args(args)
        gpu = gpu_memory(args.gpu)
    except ValueError as err:
        print(f"nbkit estimate: error: {err}", file=sys.stderr)
        return 2
    result = estimate(setting)
    lines = result.summary().splitlines()
    verdict = "fits" if result.fits(gpu, args.headroom) else "does NOT fit"
    lines.insert(-1, f"  {verdict} {args.gpu} ({gpu:.1f} GiB) with {args.headroom:.1f} GiB headroom")
    if args.time and args.gpu in GPU_MEMORY_GIB:
        from nbkit.estimate.flops import count_flops, estimate_step_seconds

        seconds = estimate_step_seconds(setting, args.gpu)
        lines.insert(-1, f"  {count_flops(setting) / 1e12:.2f} TFLOP per step -> about {seconds:.2f} s/step "
                         f"({1 / seconds:.2f} it/s) on a {args.gpu}")
    print("\n".join(lines))
    return 0


def add_auto_fit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auto_fit", dest="auto_fit", nargs="?", const="T4", default=None,
                        metavar="GPU",
                        help="before training, choose the fastest setting that fits the GPU (T4, L4, V100, A100-40GB "
                             "or GiB; default T4) with 1 GiB headroom, by nbkit's memory and time estimates: "
                             "train_batch_size with gradient_accumulation_steps (the effective batch is kept), "
                             "gradient_checkpointing, sdpa, and optimizer_type only when nothing else fits")


def apply_auto_fit(config, gpu: str, out=None, fixed=()):
    """``config`` changed by :func:`nbkit.estimate.auto_fit` for ``gpu``; prints what changed and why.
    ``fixed``: option names the user set explicitly (on the command line or in the run file), kept."""
    from nbkit.config import ConfigError
    from nbkit.estimate.fit import FitError, auto_fit, gpu_memory
    from nbkit.estimate.setting import method_of

    out = out or sys.stdout
    try:
        fitted, found, changes = auto_fit(config, method_of(config), gpu, fixed=fixed)
    except (FitError, ValueError) as err:
        raise ConfigError(f"--auto_fit {gpu}: {err}") from None
    arch = found.setting.arch
    print(f"auto-fit ({arch}, {gpu}): estimated peak {found.peak_gib:.2f} GiB of {gpu_memory(gpu):.1f} GiB; "
          + ("; ".join(changes) if changes else "no change needed"), file=out)
    return fitted


def add_commands(sub) -> None:
    add_estimate_parser(sub)
    methods = getattr(sub, "_nbkit_train_methods", None)  # the `nbkit train <method>` parsers made so far
    parsers = {id(p): p for p in methods.choices.values()} if methods is not None else {}
    for parser in parsers.values():
        add_auto_fit_option(parser)
