"""``nbkit tag ...`` and ``nbkit captions ...`` subcommands.

    nbkit tag wd14 DIR [--repo_id ID | --model_dir DIR] [kohya tagger flags]
    nbkit tag blip DIR [--model_id ID] [--beam_search --num_beams 3] [--prefix sks]
    nbkit captions activate|prefix|suffix|remove|replace|sub|dedupe|sort DIR ... [--dry-run]
    nbkit captions stats DIR [--top 30] [--png tags.png]
    nbkit captions undo DIR [--all | --list]

Tagger flags are generated from the config dataclasses (kohya's names; ``--repo-id`` style
spellings are accepted too). Heavy modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import wraps

from nbkit.config import add_dataclass_arguments, merge_cli
from nbkit.tag.config import BlipCaptionConfig, WD14Config


def _friendly(func):
    """Bad input (a regex, a missing backup, an unknown model) -> a one-line error, exit code 2."""

    @wraps(func)
    def run(args) -> int:
        try:
            return func(args)
        except (ValueError, FileNotFoundError, re.error) as err:
            print(f"nbkit: error: {err}", file=sys.stderr)
            return 2

    return run


@_friendly
def _cmd_wd14(args) -> int:
    from nbkit.tag.wd14 import tag_images

    tag_images(args.dir, merge_cli(WD14Config(), args), backup_dir=args.backup_dir)
    return 0


@_friendly
def _cmd_blip(args) -> int:
    from nbkit.tag.blip import caption_images

    caption_images(args.dir, merge_cli(BlipCaptionConfig(), args), backup_dir=args.backup_dir)
    return 0


def _edit_from_args(args):
    from nbkit.tag.editor import Edit

    builders = {
        "activate": lambda: Edit.activate(args.tags),
        "prefix": lambda: Edit.prefix(args.tags),
        "suffix": lambda: Edit.suffix(args.tags),
        "remove": lambda: Edit.remove(args.tags or (), globs=args.glob, regexes=args.regex),
        "replace": lambda: Edit.replace(args.old, args.new, mode=args.mode),
        "sub": lambda: Edit.substitute(args.pattern, args.repl, literal=args.literal),
        "dedupe": Edit.dedupe,
        "sort": lambda: Edit.sort(args.by, keep=args.keep),
    }
    return builders[args.action]().only_if(all_of=args.if_all or (), any_of=args.if_any or ())


@_friendly
def _cmd_edit(args) -> int:
    from nbkit.tag.editor import edit_captions

    report = edit_captions(
        args.dir,
        [_edit_from_args(args)],
        caption_extension=args.caption_extension,
        recursive=args.recursive,
        subfolders=args.subfolders,
        dry_run=args.dry_run,
        backup_dir=args.backup_dir,
    )
    print(report.summary())
    return 0


@_friendly
def _cmd_stats(args) -> int:
    from nbkit.tag.stats import dataset_tag_counts, frequency_table, plot_top_tags

    counts, files = dataset_tag_counts(args.dir, args.caption_extension, args.recursive, args.subfolders)
    print(f"{args.dir}: {files} caption files, {len(counts)} distinct tags")
    print(frequency_table(counts, files, args.top))
    if args.png:
        plot_top_tags(counts, args.top, args.png)
        print(f"chart: {args.png}")
    return 0


@_friendly
def _cmd_undo(args) -> int:
    from nbkit.tag.backup import list_backups, undo

    if args.list:
        for b in list_backups(args.dir, args.backup_dir):
            print(f"{b.path.name}: {b.label}, {len(b.entries)} file(s)")
        return 0
    result = undo(args.dir, args.backup_dir, everything=args.all)
    print(f"{args.dir}: restored {len(result.restored)} caption file(s), removed {len(result.removed)} created "
          f"one(s), from {len(result.backups)} backup(s)")
    return 0


def _scope_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("dir", help="dataset folder (images with caption files next to them)")
    parent.add_argument("--caption-extension", "--caption_extension", default=".txt", help="default .txt")
    parent.add_argument("--subfolder", action="append", dest="subfolders", help="only this subfolder (repeatable)")
    parent.add_argument("--no-recursive", dest="recursive", action="store_false", help="skip subfolders")
    parent.add_argument("--backup-dir", "--backup_dir", help="keep backups here (default DIR/.nbkit_caption_backup)")
    return parent


def _add_tagger(kinds, name: str, cls, func, help_text: str) -> None:
    parser = kinds.add_parser(name, help=help_text)
    parser.add_argument("dir", help="image folder")
    parser.add_argument("--backup-dir", "--backup_dir", help="keep caption backups here (default DIR/.nbkit_caption_backup)")
    add_dataclass_arguments(parser, cls)  # dashed spellings come from nbkit.cli_parser, for every flag
    # kohya command lines paste as they are: its misspelt alias, and --onnx (always on here)
    parser.add_argument("--caption_extention", dest="caption_extension", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(func=func)


def _add_edit_commands(actions, scope: argparse.ArgumentParser) -> None:
    edit = argparse.ArgumentParser(add_help=False, parents=[scope])
    edit.add_argument("--if-all", help="only captions with all of these comma-separated tags (AND)")
    edit.add_argument("--if-any", help="only captions with any of these comma-separated tags (OR)")
    edit.add_argument("--dry-run", action="store_true", help="only report how many captions would change")

    def add(name: str, help_text: str):
        parser = actions.add_parser(name, help=help_text, parents=[edit])
        parser.set_defaults(func=_cmd_edit, action=name)
        return parser

    for name, text in (("activate", "put activation (trigger) tags first and print keep_tokens"),
                       ("prefix", "put tags first"), ("suffix", "put tags last")):
        add(name, text).add_argument("tags", help="comma-separated tags, e.g. 'sks, 1girl'")
    remove = add("remove", "remove tags by name, glob or regex")
    remove.add_argument("tags", nargs="?", help="comma-separated exact tag names")
    remove.add_argument("--glob", action="append", default=[], help="shell pattern, e.g. '*background' (repeatable)")
    remove.add_argument("--regex", action="append", default=[], help="regular expression, full match (repeatable)")
    replace = add("replace", "replace tags (in the place of the first one found)")
    replace.add_argument("old", help="comma-separated tags to replace")
    replace.add_argument("new", help="comma-separated replacement tags ('' removes)")
    replace.add_argument("--mode", choices=("any", "all"), default="any",
                         help="any: whichever are present (OR); all: only if all are present (AND)")
    sub = add("sub", "regular-expression substitution inside tags, e.g. '_' ' '")
    sub.add_argument("pattern", help="regular expression (escape ( ) [ ] * + ? with a backslash, or use --literal)")
    sub.add_argument("repl", help="replacement (\\1 or \\g<name> insert a group)")
    sub.add_argument("--literal", action="store_true", help="PATTERN and REPL are plain text, not a regular expression")
    add("dedupe", "drop repeated tags")
    sort = add("sort", "sort tags")
    sort.add_argument("--by", choices=("alphabetical", "frequency"), default="alphabetical")
    sort.add_argument("--keep", type=int, default=0, help="leave the first N tags in place (keep_tokens)")


def add_commands(subparsers) -> None:
    """Register ``nbkit tag`` and ``nbkit captions`` on the top-level subparsers."""
    tag = subparsers.add_parser("tag", help="auto-caption images: WD14 tags (onnxruntime) or BLIP sentences")
    kinds = tag.add_subparsers(dest="tagger", required=True)
    _add_tagger(kinds, "wd14", WD14Config, _cmd_wd14, "WD14 tagger (kohya's tag_images_by_wd14_tagger.py options)")
    _add_tagger(kinds, "blip", BlipCaptionConfig, _cmd_blip, "BLIP captions (kohya's make_captions.py options)")

    captions = subparsers.add_parser("captions", help="edit captions in bulk, tag statistics, undo")
    actions = captions.add_subparsers(dest="action", required=True)
    scope = _scope_parent()
    _add_edit_commands(actions, scope)
    stats = actions.add_parser("stats", help="tag frequency table and top-N chart", parents=[scope])
    stats.add_argument("--top", type=int, default=30)
    stats.add_argument("--png", help="also save a bar chart of the top tags")
    stats.set_defaults(func=_cmd_stats)
    undo = actions.add_parser("undo", help="restore the captions from before the last edit")
    undo.add_argument("dir")
    undo.add_argument("--backup-dir", "--backup_dir")
    group = undo.add_mutually_exclusive_group()
    group.add_argument("--all", action="store_true", help="undo every recorded edit (back to the originals)")
    group.add_argument("--list", action="store_true", help="list the backups")
    undo.set_defaults(func=_cmd_undo)
