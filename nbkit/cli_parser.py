"""The ``nbkit`` argument parser: one flag spelling, and "did you mean" for a misspelt flag.

Every command's flags are spelt as kohya spells its options, with underscores (``--network_dim``,
``--single_file``); the same flag with dashes (``--network-dim``, ``--single-file``) is accepted too,
for every command, but not listed in ``--help``. :func:`add_spelling_aliases` does this once for the
whole tree after it is built, so a feature area only declares its flags (in either spelling).

A flag no command knows gets the closest one of the command it was given to, as a misspelt TOML
key does (:func:`nbkit.config.closest`)::

    nbkit train lora: error: unrecognized arguments: --netwrok_dim 4 (did you mean --network_dim?)
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Iterator

_ALIASES = "_nbkit_aliases"  # on an action: its accepted-but-unlisted option strings
_USED = "_nbkit_parser"  # on a namespace while parsing: the deepest (sub)command's parser
_ARGUMENT = re.compile(r"argument (\S+): ")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


class NbkitHelpFormatter(argparse.HelpFormatter):
    """Lists each flag in its canonical spelling only (the dashed aliases work but are not shown)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        aliases = getattr(action, _ALIASES, ())
        if not aliases:
            return super()._format_action_invocation(action)
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if s not in aliases]
        return super()._format_action_invocation(shown)


class NbkitArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors name the closest flag or subcommand.

    ``add_subparsers`` makes its parsers with ``type(parent)``, so every subcommand below a
    parser of this class is one too."""

    # argparse takes only "-5" and "-0.5" for negative numbers, so "--learning_rate -1e-4" failed
    # with "expected one argument" instead of reaching the check that names the option; no nbkit
    # flag looks like a number, so scientific notation is safe to read as a value.
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", NbkitHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if not hasattr(namespace, _USED):  # a subcommand's parser, deeper down, ran (and set it) first
            setattr(namespace, _USED, self)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        used = vars(namespace).pop(_USED, self)
        if extras:
            used.error(unrecognized_message(used, extras))
        return namespace

    def error(self, message: str):
        message = _without_aliases(message)
        match = _CHOICE.search(message)
        if match:  # a misspelt subcommand: argparse lists the choices, nbkit adds the likely one
            from nbkit.config import closest

            hint = closest(match.group(1), [c.strip(" '") for c in match.group(2).split(",")])
            message += f": did you mean '{hint}'?" if hint else ""
        super().error(message)

    def _get_option_tuples(self, option_string: str) -> list:
        """Abbreviations: ``--single`` matches ``--single_file`` and its alias ``--single-file``, one
        flag, so it is not ambiguous (a BooleanOptionalAction's ``--no-`` form stays a separate match)."""
        seen, out = set(), []
        for tup in super()._get_option_tuples(option_string):
            key = (id(tup[0]), tup[1].replace("-", "_"))
            if key not in seen:
                seen.add(key)
                out.append(tup)
        return out


def _without_aliases(message: str) -> str:
    """``argument --network_dim/--network-dim: ...`` (argparse names a flag by all its strings) ->
    ``argument --network_dim: ...``: a dashed alias is left out when its underscore spelling is there."""
    match = _ARGUMENT.match(message)
    if not match:
        return message
    names = match.group(1).split("/")

    def alias(name: str) -> bool:
        same = [n for n in names if n[2:].replace("-", "_") == name[2:].replace("-", "_")]
        return any(n.count("-") < name.count("-") for n in same)

    return f"argument {'/'.join(n for n in names if not alias(n))}: " + message[match.end():]


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand's parser below it, each once."""
    seen: set[int] = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())


def _spellings(action: argparse.Action, option: str) -> tuple[str, str]:
    """(canonical underscore spelling, dashed spelling) of a long option; a BooleanOptionalAction's
    ``--no-`` prefix is kept, since argparse tells its negative form by that prefix."""
    negative = isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-") \
        and "--" + option[5:] in action.option_strings
    prefix = "--no-" if negative else "--"
    body = option[len(prefix):]
    return prefix + body.replace("-", "_"), prefix + body.replace("_", "-")


def add_spelling_aliases(root: argparse.ArgumentParser) -> None:
    """For every long flag of every parser: show the underscore spelling, accept the dashed one too."""
    for parser in walk_parsers(root):
        for action in parser._actions:
            _alias_action(parser, action)


def _alias_action(parser: argparse.ArgumentParser, action: argparse.Action) -> None:
    aliases: set[str] = set(getattr(action, _ALIASES, ()))
    shown: list[str] = []
    for option in [s for s in action.option_strings if s not in aliases]:
        if not option.startswith("--"):
            shown.append(option)
            continue
        canonical, dashed = _spellings(action, option)
        for variant in (canonical, dashed):
            parser._option_string_actions.setdefault(variant, action)  # never take another action's string
        ours = parser._option_string_actions[canonical] is action
        name = canonical if ours else option
        if name not in shown:
            shown.append(name)
        aliases.update(s for s in (option, canonical, dashed) if s != name and parser._option_string_actions[s] is action)
    aliases -= set(shown)
    action.option_strings = shown + sorted(aliases)
    setattr(action, _ALIASES, frozenset(aliases))
    if aliases and isinstance(action, argparse.BooleanOptionalAction):  # its usage lists all its strings
        action.format_usage = lambda strings=tuple(shown): " | ".join(strings)


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    """The listed long flags of ``parser`` (no aliases, no hidden flags)."""
    out = []
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            aliases = getattr(action, _ALIASES, ())
            out += [s for s in action.option_strings if s.startswith("--") and s not in aliases]
    return out


def unrecognized_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's message, plus the closest flag of ``parser`` for each unknown one."""
    from nbkit.config import closest

    options = {s[2:].replace("-", "_"): s for s in long_options(parser)}
    hints = []
    for arg in extras:
        if arg.startswith("--") and len(arg) > 2:
            name = arg.split("=", 1)[0]
            match = closest(name[2:].replace("-", "_"), options)
            if match:
                hints.append((name, options[match]))
    message = "unrecognized arguments: " + " ".join(extras)
    if len(hints) == 1:
        return f"{message} (did you mean {hints[0][1]}?)"
    if hints:
        return f"{message} (did you mean " + ", ".join(f"{hint} for {name}" for name, hint in hints) + "?)"
    return message
