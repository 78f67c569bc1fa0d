"""``nbkit export hub|drive`` and ``nbkit project usage|cleanup``.

kohya spellings are accepted too: ``--huggingface_repo_id``, ``--huggingface_repo_visibility``.
A token is never taken on the command line (it would land in the shell history and process list).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT_HELP = "projects folder (default: $NBKIT_HOME, Drive's MyDrive/nbkit, ./nbkit-projects)"


def _friendly(func):
    @functools.wraps(func)
    def run(args) -> int:
        from nbkit.config import ConfigError
        from nbkit.export.drive import CopyVerifyError, DriveLagError
        from nbkit.export.hub import HubError
        from nbkit.export.plan import ExportError

        try:
            return func(args)
        except (ExportError, HubError, ConfigError, DriveLagError, CopyVerifyError, FileNotFoundError) as err:
            print(f"nbkit: error: {err}", file=sys.stderr)
            return 2

    return run


def _project(args):
    from nbkit.export.plan import ExportError
    from nbkit.project import Project

    if not args.project:
        return None
    project = Project.open(args.project, args.root, create=False)
    if not project.path.is_dir():
        raise ExportError(f"project {args.project!r}: no folder {project.path}: check the name, or pass --root "
                          "(on Colab mount Drive first: nbkit.colab.mount_drive())")
    return project


def _hub_sources(args, project) -> tuple[Path | None, list[Path], dict]:
    """(output folder, configs, run options) from --output_dir/--config or the project."""
    from nbkit.config import flatten_run_toml, load_toml

    output_dir = Path(args.output_dir) if args.output_dir else (project.output_dir if project else None)
    configs = [Path(c) for c in args.config or []]
    if not configs and project and not args.no_config:
        configs = _project_run_file(project, args.output_name)
        configs += [project.dataset_toml] if project.dataset_toml.is_file() else []
    options = flatten_run_toml(load_toml(configs[0]))[0] if configs else {}
    return output_dir, ([] if args.no_config else configs), options


def _project_run_file(project, output_name: str | None) -> list[Path]:
    """The project's run file (run.toml or run-<method>.toml) that trained ``output_name``, else the newest."""
    from nbkit.config import flatten_run_toml, load_toml

    files = project.run_files()
    if output_name:
        files = [f for f in files if flatten_run_toml(load_toml(f))[0].get("output_name") == output_name] or files
    return files[:1]


@_friendly
def _cmd_hub(args) -> int:
    from nbkit.export.hub import resolve_token, token_status, upload, write_generated
    from nbkit.export.plan import ExportError, build_plan, find_outputs, find_samples, format_plan

    if args.huggingface_token:
        raise ExportError("--huggingface_token: a token on the command line ends up in the shell history; store it as "
                          "the Colab secret HF_TOKEN or the HF_TOKEN environment variable instead")
    project = _project(args)
    output_dir, configs, options = _hub_sources(args, project)
    if not args.model and output_dir is None:
        raise ExportError("nothing to upload: pass --model FILE, --output_dir DIR or --project NAME")
    models = [Path(m) for m in args.model] if args.model else find_outputs(output_dir, args.output_name or
                                                                            options.get("output_name"))
    sample_sources = [Path(s) for s in args.samples] if args.samples else [
        p for p in ((output_dir / "sample") if output_dir else None, project.samples_dir if project else None) if p]
    dataset = Path(args.dataset) if args.dataset else (project.dataset_dir if project else None)
    token = resolve_token()
    plan = build_plan(
        args.repo_id, models, samples=[] if args.no_samples else find_samples(sample_sources, args.max_samples),
        configs=configs, dataset=dataset, include_dataset=args.include_dataset, private=args.visibility == "private",
        base_model=args.base_model, license=args.license, trigger=args.trigger, title=args.title,
        secrets=[token.reveal()] if token else [], card_file=Path(args.card) if args.card else None,
    )
    card_dir = Path(args.card_out) if args.card_out else (output_dir or models[0].parent) / "hub" / plan.repo_id.split("/")[1]
    write_generated(plan, card_dir)
    print(format_plan(plan))
    print(f"model card and cleaned configs written to {card_dir} (edit README.md there and pass --card to use it)")
    print(token_status(token))
    if args.dry_run:
        print("dry run: nothing was uploaded")
        return 0
    if token is None:
        raise ExportError(token_status(None))
    print(f"uploaded: {upload(plan, token)}")
    return 0


@_friendly
def _cmd_drive(args) -> int:
    from nbkit.colab import drive_mounted, drive_mydrive
    from nbkit.export.drive import export_to_folder, human_size
    from nbkit.export.plan import ExportError
    from nbkit.project import Project

    if args.dest:
        dest = Path(args.dest)
    elif not args.project:
        raise ExportError("pass --project NAME (the Drive project) or --dest FOLDER")
    elif not drive_mounted():
        raise ExportError("Google Drive is not mounted: in Colab run nbkit.colab.mount_drive() first, or pass --dest")
    else:
        dest = getattr(Project.open(args.project, drive_mydrive() / "nbkit"), f"{args.into}_dir")
    results = export_to_folder(args.paths, dest, progress=not args.quiet)
    copied = [r for r in results if r.copied]
    print(f"{len(copied)} files copied ({human_size(sum(r.size for r in copied))}), "
          f"{len(results) - len(copied)} already identical, into {dest}; every copy checked by size and sha256")
    return 0


@_friendly
def _cmd_usage(args) -> int:
    from nbkit.export.drive import format_usage, project_usage

    print(format_usage(project_usage(_project(args))))
    return 0


@_friendly
def _cmd_cleanup(args) -> int:
    from nbkit.export.drive import apply_cleanup, cleanup_plan, format_cleanup

    project = _project(args)
    items = cleanup_plan([project.output_dir, project.state_dir], keep=args.keep)
    if args.apply:
        apply_cleanup(items)
    print(format_cleanup(items, applied=args.apply))
    return 0


def _add_hub(group) -> None:
    p = group.add_parser("hub", help="publish a trained file to a Hugging Face repo with a model card (private by default)")
    p.add_argument("--repo-id", "--repo_id", "--huggingface_repo_id", dest="repo_id", required=True, help="USER/NAME")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="visibility", action="store_const", const="private", help="private repo (default)")
    vis.add_argument("--public", dest="visibility", action="store_const", const="public", help="public repo")
    vis.add_argument("--huggingface_repo_visibility", dest="visibility", choices=("private", "public"))
    p.set_defaults(visibility="private")
    p.add_argument("--project", help="project name (its output, samples, run settings and dataset)")
    p.add_argument("--root", help=ROOT_HELP)
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="folder of the trained files")
    p.add_argument("--output-name", "--output_name", dest="output_name", help="which run (default: from the run TOML)")
    p.add_argument("--model", nargs="+", help="the file(s) to publish: LoRA .safetensors, hypernetwork .pt, checkpoint "
                                              "or diffusers folder (default: the final file of the output folder)")
    p.add_argument("--samples", nargs="+", help="sample images or folders (default: output/sample and samples/)")
    p.add_argument("--no-samples", action="store_true")
    p.add_argument("--max-samples", type=int, default=8)
    p.add_argument("--config", nargs="+", help="run/dataset TOMLs to publish, cleaned (default: the project's)")
    p.add_argument("--no-config", action="store_true", help="publish no training config")
    p.add_argument("--dataset", help="dataset folder (counted for the card; zipped with --include_dataset)")
    p.add_argument("--include-dataset", action="store_true", help="also upload the dataset as a zip")
    p.add_argument("--base-model", help="Hub id of the base model (default: from the file's metadata)")
    p.add_argument("--license", help="licence id (default: the base model's, e.g. creativeml-openrail-m)")
    p.add_argument("--trigger", help="trigger words / instance prompt (default: from the dataset folder names)")
    p.add_argument("--title", help="card title (default: the repo name)")
    p.add_argument("--card", help="use this README.md (e.g. the generated one, edited) instead of generating one")
    p.add_argument("--card-out", help="where to write the generated card (default: <output>/hub/<name>/)")
    p.add_argument("--dry-run", action="store_true", help="write the card, print the plan, touch no network")
    p.add_argument("--huggingface_token", help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_hub)


def add_commands(subparsers) -> None:
    from nbkit.merge.cli import command_group

    export = command_group(subparsers, "export", "copy results to Google Drive or publish them on the Hugging Face Hub")
    _add_hub(export)
    drive = export.add_parser("drive", help="copy files into the Drive project (or --dest), verified by size + sha256")
    drive.add_argument("paths", nargs="+", metavar="PATH", help="files or folders to copy (never changed)")
    drive.add_argument("--project", help="Drive project name (MyDrive/nbkit/<project>)")
    drive.add_argument("--into", default="output", choices=("output", "samples", "dataset", "state", "logs"))
    drive.add_argument("--dest", help="copy into this folder instead")
    drive.add_argument("--quiet", action="store_true", help="no progress bars")
    drive.set_defaults(func=_cmd_drive)

    project = command_group(subparsers, "project", "project folder: disk usage and cleanup of old saves")
    usage = project.add_parser("usage", help="size of each project folder")
    cleanup = project.add_parser("cleanup", help="remove old epoch/step saves and states (dry run unless --apply)")
    for p in (usage, cleanup):
        p.add_argument("--project", required=True, help="project name")
        p.add_argument("--root", help=ROOT_HELP)
    cleanup.add_argument("--keep", type=int, default=1, help="newest intermediate saves to keep per run (default 1)")
    cleanup.add_argument("--apply", action="store_true", help="really remove them")
    usage.set_defaults(func=_cmd_usage)
    cleanup.set_defaults(func=_cmd_cleanup)
