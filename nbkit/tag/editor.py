"""The caption editor: batch edits over a dataset's caption files, with dry run and undo.

An :class:`Edit` is a pure tag-list function plus an optional AND/OR condition; a list of edits
runs over every caption in scope (whole folder, recursively, or some subfolders) in memory
first. The report says how many captions each edit touches; unless it is a dry run, every
changed file is then backed up (see :mod:`nbkit.tag.backup`) and rewritten atomically.
Unchanged files are never rewritten, so their bytes stay as they were.

    from nbkit.tag.editor import Edit, edit_captions
    report = edit_captions("dataset", [Edit.activate("sks"), Edit.remove(globs=["*background"])], dry_run=True)
    print(report.summary())
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbkit.tag import tags as ops
from nbkit.tag.backup import BackupSession
from nbkit.tag.files import CaptionText, caption_files, read_caption, write_caption

TagFn = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Edit:
    """One change to every caption in scope.

    ``build(counts)`` returns the per-caption function; ``counts`` holds how many captions contain
    each tag just before this edit (used by sorting by frequency). The edit only applies to
    captions holding all of ``all_of`` and (if given) any of ``any_of``.
    """

    label: str
    build: Callable[[Counter[str]], TagFn]
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    keep_tokens: int | None = None  # what kohya's keep_tokens should be after this edit

    def only_if(self, all_of: str | Iterable[str] = (), any_of: str | Iterable[str] = ()) -> Edit:
        """The same edit restricted to captions with all of / any of the given tags."""
        return dataclasses.replace(self, all_of=tuple(ops.as_tags(all_of)), any_of=tuple(ops.as_tags(any_of)))

    @staticmethod
    def _fixed(label: str, fn: TagFn, keep_tokens: int | None = None) -> Edit:
        return Edit(label, lambda _counts: fn, keep_tokens=keep_tokens)

    @staticmethod
    def activate(tags: str | Iterable[str]) -> Edit:
        """Put activation (trigger) tags first; set ``keep_tokens`` to their number when training."""
        new = ops.as_tags(tags)
        fn = functools.partial(ops.add_tags, new=new, position="front")
        return Edit._fixed(f"activate {ops.join_tags(new)}", fn, keep_tokens=len(new))

    @staticmethod
    def prefix(tags: str | Iterable[str]) -> Edit:
        new = ops.as_tags(tags)
        return Edit._fixed(f"prefix {ops.join_tags(new)}", functools.partial(ops.add_tags, new=new, position="front"))

    @staticmethod
    def suffix(tags: str | Iterable[str]) -> Edit:
        new = ops.as_tags(tags)
        return Edit._fixed(f"suffix {ops.join_tags(new)}", functools.partial(ops.add_tags, new=new, position="back"))

    @staticmethod
    def remove(names: str | Iterable[str] = (), *, globs: Iterable[str] = (), regexes: Iterable[str] = ()) -> Edit:
        """Remove tags by exact name, glob (``*_background``) or regular expression (full match)."""
        names, globs, regexes = ops.as_tags(names), list(globs), list(regexes)
        if not (names or globs or regexes):
            raise ValueError("remove: give tag names, globs or regexes")
        for regex in regexes:  # compile now: a bad pattern fails before any file is read
            _compile(regex, f"remove: --regex {regex!r}", "or use --glob for shell patterns like '*hair'")
        what = ", ".join([*names, *globs, *(f"/{r}/" for r in regexes)])
        return Edit._fixed(f"remove {what}", functools.partial(ops.remove_tags, names=names, globs=globs, regexes=regexes))

    @staticmethod
    def replace(old: str | Iterable[str], new: str | Iterable[str], mode: str = "any") -> Edit:
        """Replace tags; ``mode="all"`` only where every old tag is present (AND), ``"any"`` is OR."""
        old, new = ops.as_tags(old), ops.as_tags(new)
        ops.replace_tags([], old, new, mode)  # validates mode
        fn = functools.partial(ops.replace_tags, old=old, new=new, mode=mode)
        return Edit._fixed(f"replace ({mode}) {ops.join_tags(old)} -> {ops.join_tags(new) or 'nothing'}", fn)

    @staticmethod
    def substitute(pattern: str, repl: str, literal: bool = False) -> Edit:
        """Regular-expression substitution inside every tag (e.g. ``"_"`` -> ``" "``); ``literal``
        replaces the plain text ``pattern`` by the plain text ``repl``. Both are checked before any
        file is read."""
        label = f"substitute {pattern!r} -> {repl!r}" if literal else f"substitute /{pattern}/ -> {repl!r}"
        if literal:
            pattern, repl = re.escape(pattern), repl.replace("\\", "\\\\")
        compiled = _compile(pattern, f"sub: the pattern {pattern!r}",
                            "or add --literal (literal=True) to replace plain text")
        try:
            compiled.sub(repl, "")  # parses the replacement's group references now
        except (re.error, IndexError) as err:
            raise ValueError(f"sub: the replacement {repl!r} is not valid ({err}): a backslash starts a group "
                             "reference such as \\1 or \\g<name>; escape it as \\\\, or add --literal "
                             "(literal=True) to insert plain text") from None
        return Edit._fixed(label, functools.partial(ops.substitute, pattern=pattern, repl=repl))

    @staticmethod
    def dedupe() -> Edit:
        return Edit._fixed("dedupe", ops.dedupe)

    @staticmethod
    def sort(by: str = "alphabetical", keep: int = 0) -> Edit:
        """Sort tags alphabetically or by dataset frequency, keeping the first ``keep`` in place."""
        if by not in ops.SORT_KEYS:
            raise ValueError(f"sort by must be one of {', '.join(ops.SORT_KEYS)}, not {by!r}")
        label = f"sort by {by}" + (f" (first {keep} kept)" if keep else "")
        return Edit(label, lambda counts: functools.partial(ops.sort_tags, by=by, counts=counts, keep=keep))


def _compile(pattern: str, what: str, other: str) -> re.Pattern:
    """``re.compile``, or a ValueError naming the argument and the fix."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what} is not a valid regular expression ({err}): escape special characters "
                         f"such as ( ) [ ] * + ? with a backslash (e.g. '\\(' for a literal '('), {other}") from None


@dataclass
class EditReport:
    """What an edit run did (or, for a dry run, would do)."""

    root: Path
    files: int = 0
    touched: list[tuple[str, int]] = field(default_factory=list)
    changed: list[Path] = field(default_factory=list)
    examples: list[tuple[Path, str, str]] = field(default_factory=list)
    dry_run: bool = False
    backup: Path | None = None
    keep_tokens: int | None = None

    def summary(self) -> str:
        verb = "would change" if self.dry_run else "changed"
        lines = [f"{self.root}: {len(self.changed)} of {self.files} caption files {verb}"]
        lines += [f"  {label}: {n} caption(s)" for label, n in self.touched]
        for path, before, after in self.examples:
            lines.append(f"  e.g. {path.name}:\n    - {before}\n    + {after}")
        if self.keep_tokens is not None:
            lines.append(
                f"  training: set keep_tokens = {self.keep_tokens} (with shuffle_caption = true) so the "
                "activation tag stays first"
            )
        if self.backup is not None:
            lines.append(f"  backup: {self.backup} (undo: nbkit captions undo {self.root})")
        return "\n".join(lines)


def _apply(edit: Edit, docs: list[CaptionText]) -> int:
    """Run one edit over the captions in memory; return how many caption files it changed."""
    fn = edit.build(ops.count_tags(doc.tags() for doc in docs))
    touched = 0
    for doc in docs:
        changed = False
        for i, line in enumerate(doc.lines):
            if line is None or not ops.has_tags(line, edit.all_of, edit.any_of):
                continue
            new = fn(list(line))
            if new != line:
                doc.lines[i], changed = new, True
        touched += changed
    return touched


def edit_captions(
    root: str | Path,
    edits: Sequence[Edit],
    *,
    caption_extension: str = ".txt",
    recursive: bool = True,
    subfolders: Sequence[str] | None = None,
    dry_run: bool = False,
    backup_dir: str | Path | None = None,
    max_examples: int = 3,
) -> EditReport:
    """Apply ``edits`` in order to the caption files of the images under ``root``.

    All files are read (and checked for UTF-8) before any is written. With ``dry_run`` nothing is
    written; otherwise each changed file is backed up first, so ``nbkit captions undo`` restores it.
    """
    root = Path(root)
    paths = caption_files(root, caption_extension, recursive, subfolders)
    originals = [read_caption(p) for p in paths]
    docs = [dataclasses.replace(d, lines=[None if line is None else list(line) for line in d.lines]) for d in originals]
    report = EditReport(root, files=len(paths), dry_run=dry_run)
    for edit in edits:
        report.touched.append((edit.label, _apply(edit, docs)))
        if edit.keep_tokens is not None:
            report.keep_tokens = edit.keep_tokens
    changed = [(p, o, d) for p, o, d in zip(paths, originals, docs) if d.lines != o.lines]
    report.changed = [p for p, _, _ in changed]
    report.examples = [(p, o.render().strip(), d.render().strip()) for p, o, d in changed[:max_examples]]
    if not dry_run and changed:
        backup = BackupSession(root, "edit", backup_dir)
        for path, _, doc in changed:
            write_caption(path, doc.render(), backup)
        report.backup = backup.path
    return report
