"""Near-duplicate images by perceptual hash (``imagehash.phash``), grouped, shown, optionally quarantined.

Two images are near-duplicates when the Hamming distance between their pHashes is at most
``threshold`` bits (of ``hash_size**2``; default 4 of 64): re-saves, small resizes and
re-compressions of one picture. Duplicates weigh a picture more than intended, so kohya users
remove them. Groups are the connected components of "near-duplicate of"; in each group the
image kept first is the one with the most pixels (a lossless file before a JPEG re-save). Quarantine moves the others, and only inside a
project's own copy (:func:`nbkit.data.fix.quarantine_files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nbkit.data.images import IMAGE_EXTENSIONS, DatasetError, open_rgb
from nbkit.project import Project

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class DuplicateGroup:
    """Near-duplicate images; ``paths[0]`` is the one to keep, ``distances[i]`` is to ``paths[0]``."""

    paths: list[Path]
    distances: list[int]
    sizes: list[tuple[int, int]]

    @property
    def keep(self) -> Path:
        return self.paths[0]

    @property
    def extras(self) -> list[Path]:
        return self.paths[1:]


@dataclass
class DedupResult:
    groups: list[DuplicateGroup]
    hashed: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files (see `nbkit dataset check`)

    def summary(self) -> str:
        lines = [f"{self.hashed} images hashed, {len(self.groups)} groups of near-duplicates"]
        for n, group in enumerate(self.groups, 1):
            lines.append(f"group {n}: keep {group.keep}")
            lines += [f"         duplicate {p} (distance {d})" for p, d in zip(group.extras, group.distances[1:])]
        lines += [f"skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def collect_image_paths(source: Project | str | Path | Sequence[str | Path]) -> list[Path]:
    """Every image under a project's dataset copy, under a folder (recursively), or the given files."""
    if isinstance(source, Project):
        source = source.dataset_dir
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise DatasetError(f"{folder}: not a folder: pass a folder of images or a project")
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [Path(p) for p in source]


def image_hashes(paths: Sequence[Path], hash_size: int = 8, progress: bool = True
                 ) -> tuple[list[Path], np.ndarray, list[tuple[int, int]], list[tuple[Path, str]]]:
    """(hashed paths, packed hash bits [n, bytes], image sizes, skipped) with ``imagehash.phash``."""
    import imagehash
    from tqdm.auto import tqdm

    kept, rows, sizes, skipped = [], [], [], []
    for path in tqdm(paths, desc="hashing", unit="img", disable=not progress):
        try:
            image = open_rgb(path)
        except (DatasetError, OSError, ValueError) as err:  # DecompressionBombError is caught by open_rgb
            skipped.append((path, str(err)))
            continue
        rows.append(np.packbits(imagehash.phash(image, hash_size=hash_size).hash.flatten()))
        kept.append(path)
        sizes.append(image.size)
    bits = np.stack(rows) if rows else np.zeros((0, max(1, hash_size * hash_size // 8)), np.uint8)
    return kept, bits, sizes, skipped


def hamming_pairs(bits: np.ndarray, threshold: int, block: int = 256) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j with distance <= threshold, computed in blocks of rows."""
    out = []
    for start in range(0, len(bits), block):
        chunk = bits[start:start + block]
        distance = _POPCOUNT[chunk[:, None, :] ^ bits[None, :, :]].sum(-1, dtype=np.int32)
        for a, b in zip(*np.nonzero(distance <= threshold)):
            i = start + int(a)
            if i < int(b):
                out.append((i, int(b), int(distance[a, b])))
    return out


def _components(n: int, pairs: list[tuple[int, int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def find_near_duplicates(source: Project | str | Path | Sequence[str | Path], threshold: int = 4,
                         hash_size: int = 8, progress: bool = True) -> DedupResult:
    """Group near-duplicate images (pHash Hamming distance <= ``threshold``); only reads files."""
    if threshold < 0:
        raise ValueError("threshold is a number of differing hash bits: 0 (identical) or more")
    paths, bits, sizes, skipped = image_hashes(collect_image_paths(source), hash_size, progress)
    groups = []
    for members in _components(len(paths), hamming_pairs(bits, threshold)):
        # keep the largest picture, preferring lossless files over JPEG re-saves, then the larger file
        members.sort(key=lambda i: (-sizes[i][0] * sizes[i][1], paths[i].suffix.lower() in (".jpg", ".jpeg"),
                                    -paths[i].stat().st_size, len(str(paths[i]))))
        first = bits[members[0]]
        distances = [int(_POPCOUNT[first ^ bits[i]].sum()) for i in members]
        groups.append(DuplicateGroup([paths[i] for i in members], distances, [sizes[i] for i in members]))
    groups.sort(key=lambda g: str(g.keep))
    return DedupResult(groups, len(paths), skipped)


def group_grid(group: DuplicateGroup, thumb: int = 160):
    """One row of thumbnails: the kept image first, then its near-duplicates with their distance."""
    from nbkit.data.gallery import make_grid

    cells = []
    for n, (path, distance, size) in enumerate(zip(group.paths, group.distances, group.sizes)):
        role = "KEEP" if n == 0 else f"duplicate, distance {distance}"
        cells.append((path, f"{role} {path.name} {size[0]}x{size[1]}"))
    return make_grid(cells, columns=len(cells), thumb=thumb, label_lines=3)


def show_groups(result: DedupResult, limit: int = 20, thumb: int = 160) -> list:
    """Grids of the first ``limit`` groups, displayed in a notebook (returned either way)."""
    from nbkit.data.gallery import display_image

    grids = [group_grid(g, thumb) for g in result.groups[:limit]]
    for grid in grids:
        display_image(grid)
    return grids


def save_group_grids(result: DedupResult, out_dir: str | Path, thumb: int = 160) -> list[Path]:
    """Write ``group-001.png``, ... into ``out_dir`` (never into a dataset folder you train from)."""
    from nbkit.data.gallery import save_gallery

    out_dir = Path(out_dir)
    return [save_gallery(group_grid(g, thumb), out_dir / f"group-{n:03d}.png") for n, g in enumerate(result.groups, 1)]


def quarantine_duplicates(result: DedupResult, dest: str | Path, project: Project) -> list[tuple[Path, Path]]:
    """Move every group's extra images (and their captions) out of a project's dataset copy."""
    from nbkit.data.fix import quarantine_files
    from nbkit.data.safe_extract import CAPTION_EXTENSIONS

    files = []
    for group in result.groups:
        for path in group.extras:
            reason = f"near-duplicate of {group.keep}"
            files.append((path, reason))
            same_stem = [p for p in path.parent.iterdir() if p.stem == path.stem and p.suffix.lower() in IMAGE_EXTENSIONS]
            if len(same_stem) == 1:  # the caption belongs to this image only
                files += [(path.with_suffix(ext), f"caption of {path.name}") for ext in CAPTION_EXTENSIONS
                          if path.with_suffix(ext).is_file()]
    return quarantine_files(files, dest, project)
