"""``nbkit dataset ...`` subcommands."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    """Register ``nbkit dataset`` and its subcommands on the top-level subparsers."""
