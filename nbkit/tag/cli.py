"""``nbkit tag ...`` and ``nbkit captions ...`` subcommands."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    """Register ``nbkit tag`` and ``nbkit captions`` on the top-level subparsers."""
