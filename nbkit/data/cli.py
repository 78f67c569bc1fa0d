"""``nbkit dataset ...`` subcommands: import, check, dedup, preprocess, gallery.

Option dataclasses (zip limits, preprocessing) give their flags through
:func:`nbkit.config.add_dataclass_arguments`, like the training commands.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path


def _friendly(func):
    """Print the plain-words message of an expected failure instead of a traceback; exit code 2."""

    @functools.wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            print(f"nbkit: error: {err}", file=sys.stderr)
            return 2

    return run


def _project(args):
    from nbkit.project import Project

    return Project.open(args.project, args.root, create=False) if args.project else None


def _source(args):
    """A project, a dataset TOML or a folder, from ``--project`` / ``--dataset_config`` / FOLDER."""
    given = [x for x in (args.project, getattr(args, "dataset_config", None), getattr(args, "folder", None)) if x]
    if len(given) != 1:
        raise ValueError("say what to use: --project NAME, --dataset_config TOML or a folder (exactly one)")
    return _project(args) or Path(given[0])


@_friendly
def _cmd_import(args) -> int:
    from nbkit.config import merge_cli
    from nbkit.data.importer import import_dataset
    from nbkit.data.safe_extract import ExtractLimits

    result = import_dataset(
        args.sources, args.project, root=args.root, limits=merge_cli(ExtractLimits(), args),
        resolution=args.resolution, batch_size=args.batch_size, cache_dir=args.cache_dir, replace=args.replace,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0


@_friendly
def _cmd_check(args) -> int:
    from nbkit.data.check import check_dataset
    from nbkit.data.fix import fix_dataset, quarantine_problems

    source = _source(args)

    def run(progress: bool):
        return check_dataset(source, batch_size=args.batch_size, epochs=args.epochs,
                             gradient_accumulation_steps=args.gradient_accumulation_steps,
                             resolution=args.resolution, max_side=args.max_side, progress=progress,
                             max_token_length=args.max_token_length)

    report = run(not args.quiet)
    print(report)
    acted = False
    if args.quarantine:
        moved = quarantine_problems(report, args.quarantine, report.project)
        print(f"moved {len(moved)} files to {args.quarantine} (see quarantine.log there)")
        acted = True
    if args.fix_to:
        if args.quarantine:  # the moved files are gone: check again before copying
            report = run(False)
        print(fix_dataset(report, args.fix_to, project=report.project, max_side=args.max_side,
                          progress=not args.quiet).summary())
        acted = True
    return 1 if report.by_severity("error") and not acted else 0


@_friendly
def _cmd_dedup(args) -> int:
    from nbkit.data.dedup import find_near_duplicates, quarantine_duplicates, save_group_grids

    project = _project(args)
    source = project or Path(args.folder or "")
    if not project and not args.folder:
        raise ValueError("say what to scan: --project NAME or a folder")
    result = find_near_duplicates(source, threshold=args.threshold, hash_size=args.hash_size,
                                  progress=not args.quiet)
    print(result.summary())
    if args.grids and result.groups:
        print(f"group pictures: {', '.join(str(p) for p in save_group_grids(result, args.grids))}")
    if args.quarantine:
        if project is None:
            raise ValueError("--quarantine moves files only inside a project's own copy: use --project NAME "
                             "(your original files are never moved)")
        moved = quarantine_duplicates(result, args.quarantine, project)
        print(f"moved {len(moved)} files to {args.quarantine} (see quarantine.log there)")
    return 0


@_friendly
def _cmd_preprocess(args) -> int:
    from nbkit.config import merge_cli
    from nbkit.data.preprocess import PreprocessOptions, preprocess_folder

    options = merge_cli(PreprocessOptions(), args)
    print(preprocess_folder(args.src, args.dst, options, overwrite=args.overwrite, progress=not args.quiet).summary())
    return 0


@_friendly
def _cmd_gallery(args) -> int:
    from nbkit.data.gallery import dataset_gallery, save_gallery

    sheet = dataset_gallery(_source(args), limit=args.limit, columns=args.columns, thumb=args.thumb,
                            resolution=args.resolution, show=False)
    print(f"gallery: {save_gallery(sheet, args.out)}")
    return 0


def _add_source_args(parser: argparse.ArgumentParser, config: bool = True) -> None:
    parser.add_argument("folder", nargs="?", help="a folder of images (instead of --project)")
    parser.add_argument("--project", help="project name (its dataset.toml / dataset copy)")
    parser.add_argument("--root", help="projects folder (default: $NBKIT_HOME, Drive's MyDrive/nbkit, ./nbkit-projects)")
    if config:
        parser.add_argument("--dataset-config", help="a kohya dataset TOML")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_commands(subparsers) -> None:
    """Register ``nbkit dataset`` and its subcommands on the top-level subparsers."""
    from nbkit.config import add_dataclass_arguments
    from nbkit.data.preprocess import PreprocessOptions
    from nbkit.data.safe_extract import ExtractLimits

    dataset = subparsers.add_parser("dataset", help="import, check, deduplicate, preprocess and view datasets")
    sub = dataset.add_subparsers(dest="dataset_command", required=True)

    imp = sub.add_parser("import", help="copy folders, zips, zip URLs or HF datasets into a project")
    imp.add_argument("sources", nargs="+", metavar="SRC", help="folder, .zip, http(s) URL of a zip, or HF dataset id")
    imp.add_argument("--project", required=True, help="project name")
    imp.add_argument("--root", help="projects folder (default: $NBKIT_HOME, Drive's MyDrive/nbkit, ./nbkit-projects)")
    imp.add_argument("--resolution", type=int, help="write this resolution into dataset.toml (default: the run's)")
    imp.add_argument("--batch-size", type=int, help="write this batch size into dataset.toml (default: the run's)")
    imp.add_argument("--cache-dir", help="where URL and Hugging Face downloads are cached")
    imp.add_argument("--replace", action="store_true",
                     help="copy sources imported before again (discards changes made in the project copy)")
    imp.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_arguments(imp, ExtractLimits)
    imp.set_defaults(func=_cmd_import)

    check = sub.add_parser("check", help="count images/captions/steps and list every problem, before training")
    _add_source_args(check)
    check.add_argument("--batch-size", type=int, help="batch size for the step count (default: the dataset's)")
    check.add_argument("--epochs", type=int, default=1, help="epochs for the total step count")
    check.add_argument("--gradient-accumulation-steps", type=int, default=1)
    check.add_argument("--resolution", type=int, help="training resolution (default: the dataset's, else 512)")
    check.add_argument("--max-side", type=int, default=3000, help="warn above this many pixels on the long side")
    check.add_argument("--max-token-length", "--max_token_length", type=int, choices=(75, 150, 225),
                       help="the run's max_token_length: captions with more CLIP tokens are reported (default 75)")
    check.add_argument("--fix-to", metavar="DIR", help="write fixed copies (RGB, alpha on white, UTF-8 captions) here")
    check.add_argument("--quarantine", metavar="DIR", help="move unusable files out of the project copy into DIR")
    check.set_defaults(func=_cmd_check)

    dedup = sub.add_parser("dedup", help="find near-duplicate images (perceptual hash)")
    _add_source_args(dedup, config=False)
    dedup.add_argument("--threshold", type=int, default=4, help="max differing hash bits (of 64) to call duplicates")
    dedup.add_argument("--hash-size", type=int, default=8, help="pHash size (8 gives 64-bit hashes)")
    dedup.add_argument("--grids", metavar="DIR", help="write one picture per group here")
    dedup.add_argument("--quarantine", metavar="DIR", help="move the extra copies out of the project copy into DIR")
    dedup.set_defaults(func=_cmd_dedup)

    pre = sub.add_parser("preprocess", help="A1111-style crop/resize, flipped copies, split oversized images")
    pre.add_argument("src", help="folder of images (captions next to them)")
    pre.add_argument("dst", help="new folder to write")
    pre.add_argument("--overwrite", action="store_true", help="replace DST if it is not empty")
    pre.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_arguments(pre, PreprocessOptions)
    pre.set_defaults(func=_cmd_preprocess)

    gallery = sub.add_parser("gallery", help="write a contact sheet of images with their captions")
    _add_source_args(gallery)
    gallery.add_argument("--out", required=True, help="PNG file to write")
    gallery.add_argument("--limit", type=int, default=48)
    gallery.add_argument("--columns", type=int, default=4)
    gallery.add_argument("--thumb", type=int, default=192, help="tile size in pixels")
    gallery.add_argument("--resolution", type=int, help="training resolution (default: the dataset's, else 512)")
    gallery.set_defaults(func=_cmd_gallery)
