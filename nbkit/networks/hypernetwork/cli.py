"""``nbkit train hypernetwork`` and ``nbkit hypernetwork create|blend``."""

from __future__ import annotations

from pathlib import Path


def _cmd_train(args) -> int:
    from nbkit.train.hooks import ProgressHooks
    from nbkit.train.hypernetwork import train_hypernetwork
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig
    from nbkit.train.run_file import config_from_args

    config, inline, base_dir = config_from_args(args, HypernetworkTrainConfig)
    datasets = hypernetwork_datasets(config, inline, base_dir)
    result = train_hypernetwork(config, datasets, hooks=ProgressHooks("hypernetwork"))
    if result.main_process:
        print(f"hypernetwork: {result.hypernetwork_path} (step {result.steps})")
    return 0


def hypernetwork_datasets(config, inline: dict | None, base_dir: Path):
    """``train_data_dir`` (A1111's flat folder), else the kohya dataset (inline or ``dataset_config``)."""
    from nbkit.config import ConfigError
    from nbkit.train.hypernetwork_data import folder_dataset
    from nbkit.train.run_file import resolve_datasets

    if config.train_data_dir:
        if inline or config.dataset_config:
            raise ConfigError("train_data_dir and a kohya dataset (dataset_config or [[datasets]]) are both set: keep one")
        folder = Path(config.train_data_dir).expanduser()
        return folder_dataset(folder if folder.is_absolute() else base_dir / folder, config.resolution,
                              config.train_batch_size)
    return resolve_datasets(config, inline, base_dir)


def _cmd_create(args) -> int:
    from nbkit.config import merge_cli
    from nbkit.networks.hypernetwork.create import HypernetworkStructure, create_hypernetwork_file

    structure = merge_cli(HypernetworkStructure(), args)
    path = create_hypernetwork_file(args.name, args.output_dir, structure, overwrite=args.overwrite)
    print(f"hypernetwork: {path}")
    return 0


def _parse_weighted(text: str) -> tuple[str, float]:
    """``file.pt`` or ``file.pt:0.5`` (the weight after the last colon)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _cmd_blend(args) -> int:
    import sys

    from nbkit.formats.a1111_hypernetwork import HypernetworkFormatError
    from nbkit.networks.hypernetwork.blend import blend_hypernetwork_files

    sources = [_parse_weighted(text) for text in args.inputs]
    if args.weights:
        if len(args.weights) != len(sources):
            raise SystemExit(f"nbkit: error: {len(args.weights)} --weights for {len(sources)} hypernetworks")
        sources = [(path, w) for (path, _), w in zip(sources, args.weights, strict=True)]
    try:
        path = blend_hypernetwork_files(sources, args.output, name=args.name, normalize=args.normalize,
                                        overwrite=args.overwrite)
    except (HypernetworkFormatError, FileNotFoundError) as err:  # a wrong input file: one line, no traceback
        print(f"nbkit: error: {err}", file=sys.stderr)
        return 2
    print(f"blended hypernetwork: {path}")
    return 0


def add_commands(subparsers) -> None:
    """Register ``nbkit hypernetwork create|blend`` and, when the ``train`` command exposes its
    methods (``subparsers._nbkit_train_methods``), ``nbkit train hypernetwork``."""
    from nbkit.config import add_dataclass_arguments
    from nbkit.networks.hypernetwork.create import HypernetworkStructure
    from nbkit.train.hypernetwork_config import HypernetworkTrainConfig

    methods = getattr(subparsers, "_nbkit_train_methods", None)
    if methods is not None:
        train = methods.add_parser("hypernetwork", help="train an A1111 hypernetwork (.pt for A1111 and ComfyUI)")
        train.add_argument("--config", help="run TOML (A1111 creation names, kohya training names; dataset inline, "
                                            "via dataset_config, or train_data_dir)")
        add_dataclass_arguments(train, HypernetworkTrainConfig)
        train.set_defaults(func=_cmd_train)

    group = subparsers.add_parser("hypernetwork", help="create or blend A1111 hypernetworks")
    actions = group.add_subparsers(dest="hypernetwork_command", required=True)
    create = actions.add_parser("create", help="write a new, untrained hypernetwork .pt (A1111's Create tab)")
    create.add_argument("name", help="hypernetwork name (also the file name)")
    create.add_argument("--output_dir", default=".", help="folder for <name>.pt (default: current folder)")
    create.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_dataclass_arguments(create, HypernetworkStructure)
    create.set_defaults(func=_cmd_create)

    blend = actions.add_parser("blend", help="weighted sum of hypernetworks with the same structure")
    blend.add_argument("inputs", nargs="+", help="hypernetwork .pt files, each optionally FILE:WEIGHT (default 1)")
    blend.add_argument("-o", "--output", required=True, help="the blended .pt to write")
    blend.add_argument("--weights", nargs="+", type=float, help="one weight per input (instead of FILE:WEIGHT)")
    blend.add_argument("--normalize", action="store_true", help="divide the weights by their sum")
    blend.add_argument("--name", help="name stored in the file (default: the output's stem)")
    blend.add_argument("--overwrite", action="store_true", help="replace an existing output")
    blend.set_defaults(func=_cmd_blend)
