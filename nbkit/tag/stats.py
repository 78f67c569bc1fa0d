"""Tag statistics: how many captions hold each tag, as a table and a top-N bar chart.

The chart is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot), so it works with the
Agg backend on a headless machine, keeps no global figure state, and still shows inline when
a notebook cell returns it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nbkit.tag.files import caption_files, read_caption
from nbkit.tag.tags import count_tags

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def dataset_tag_counts(
    root: str | Path, caption_extension: str = ".txt", recursive: bool = True, subfolders: Sequence[str] | None = None
) -> tuple[Counter[str], int]:
    """``(counts, number of caption files)``: how many caption files contain each tag."""
    paths = caption_files(root, caption_extension, recursive, subfolders)
    return count_tags(read_caption(p).tags() for p in paths), len(paths)


def frequency_table(counts: Counter[str], total: int | None = None, top: int | None = None) -> str:
    """A plain-text table, most frequent first (ties alphabetical), with the share of captions."""
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if not rows:
        return "(no tags)"
    width = max(len(tag) for tag, _ in rows)
    lines = [f"{'tag':<{width}}  count" + ("  share" if total else "")]
    for tag, n in rows:
        share = f"  {100.0 * n / total:5.1f}%" if total else ""
        lines.append(f"{tag:<{width}}  {n:5d}{share}")
    return "\n".join(lines)


def plot_top_tags(
    counts: Counter[str], top: int = 30, path: str | Path | None = None, title: str | None = None
) -> Figure:
    """A horizontal bar chart of the ``top`` most frequent tags; saved as PNG when ``path`` is given."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    fig = Figure(figsize=(8, 0.3 * max(len(rows), 3) + 1.2), layout="constrained")
    ax = fig.subplots()
    labels = [tag for tag, _ in reversed(rows)]
    values = [n for _, n in reversed(rows)]
    ax.barh(range(len(rows)), values, color="#4c72b0")
    ax.set_yticks(range(len(rows)), labels)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("captions containing the tag")
    ax.set_title(title or f"top {len(rows)} tags")
    if path is not None:
        from nbkit.io import atomic_path

        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    return fig
