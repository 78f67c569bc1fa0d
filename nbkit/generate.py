"""Try a trained result: A1111-style prompts with ``<lora:name:weight>`` / ``<hypernet:name:weight>``
tags, and the X/Y grid that picks the best epoch.

    from nbkit.generate import Axis, xy_grid
    grid = xy_grid(pipeline, rows=Axis.files(session.outputs("lora")), cols=Axis.prompts(lines),
                   out=session.path / "xy-grid.png")

Axes are A1111's X/Y plot axes: ``Axis.files`` (trained files: epochs or steps; a ``.safetensors``
kohya LoRA or an A1111 ``.pt`` hypernetwork), ``Axis.strengths`` (the multiplier of the file on the
other axis, or of ``network``) and ``Axis.prompts`` (kohya prompt lines: ``--w --h --s --l --d --n``
options). Every cell of a column uses the same seed (the prompt's ``--d``, else ``seed``), so rows
differ only by what the row changes. The grid is saved as a PNG whose ``nbkit_xy`` text chunk lists
the axes, labels and seeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

_TAG = re.compile(r"<(lora|hypernet):([^>]+)>")
AXIS_KINDS = ("files", "strengths", "prompts")
LORA_SUFFIXES = (".safetensors",)
HYPERNETWORK_SUFFIXES = (".pt",)


# ----------------------------------------------------------------------------- prompt tags
def parse_network_tags(prompt: str) -> tuple[str, list[tuple[str, str, float]]]:
    """Strip A1111 ``<lora:name:weight>`` and ``<hypernet:name:weight>`` tags (weight 1.0 when left out).

    Returns ``(clean prompt, [(kind, name, weight), ...])`` with kind ``lora`` or ``hypernet``, in prompt
    order; as in A1111 a tag is replaced by nothing and the ends are stripped."""
    found: list[tuple[str, str, float]] = []

    def take(match: re.Match) -> str:
        parts = match[2].split(":")
        try:
            weight = float(parts[1]) if len(parts) > 1 and parts[1].strip() else 1.0
        except ValueError:
            raise ValueError(f"{match[0]}: the weight {parts[1]!r} is not a number, write e.g. "
                             f"<{match[1]}:{parts[0]}:0.7>") from None
        found.append((match[1], parts[0].strip(), weight))
        return ""

    return _TAG.sub(take, prompt).strip(), found


def find_network(name: str, kind: str, folders: Sequence[str | Path]) -> Path:
    """``<folder>/**/<name>.safetensors`` (LoRA) or ``.pt`` (hypernetwork), as A1111 finds them by stem."""
    suffixes = LORA_SUFFIXES if kind == "lora" else HYPERNETWORK_SUFFIXES
    for folder in folders:
        matches = sorted(p for p in Path(folder).glob("**/*") if p.suffix in suffixes and p.stem == name)
        if matches:
            return matches[0]
    where = ", ".join(str(f) for f in folders) or "(no folder given)"
    raise FileNotFoundError(f"<{kind}:{name}:...>: no {name}{suffixes[0]} under {where}")


# ----------------------------------------------------------------------------- networks on a pipeline
def _lora_layers(model) -> Iterator[Any]:
    from peft.tuners.lora import LoraLayer

    return (m for m in model.modules() if isinstance(m, LoraLayer))


@contextlib.contextmanager
def networks_applied(pipeline, networks: Sequence[tuple[Path, float]]) -> Iterator[None]:
    """Apply kohya LoRA files and A1111 hypernetworks with their weights; remove them afterwards, so the
    pipeline is the base model again."""
    from nbkit.networks.hypernetwork.apply import apply_hypernetwork, remove_hypernetwork
    from nbkit.networks.hypernetwork.module import Hypernetwork
    from nbkit.networks.lora import load_kohya_lora

    models = [m for m in (pipeline.unet, getattr(pipeline, "text_encoder", None)) if m is not None]
    loras, hypernetworks = [], []
    try:
        for path, weight in networks:
            if Path(path).suffix in HYPERNETWORK_SUFFIXES:
                hypernetwork = Hypernetwork.load(path)
                apply_hypernetwork(pipeline.unet, hypernetwork, weight)
                hypernetworks.append(hypernetwork)
                continue
            name = f"nbkit_try_{len(loras)}"
            with warnings.catch_warnings():  # a second file in one cell is a second adapter, on purpose
                warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
                load_kohya_lora(path, pipeline.unet, getattr(pipeline, "text_encoder", None), adapter_name=name)
            loras.append((name, weight))
        names = [n for n, _ in loras]
        for model in models if loras else ():
            for layer in _lora_layers(model):
                present = [n for n in names if n in layer.lora_A]
                layer.set_adapter(present)
                for n, weight in loras:
                    layer.set_scale(n, weight)
        yield
    finally:
        for hypernetwork in hypernetworks:
            remove_hypernetwork(pipeline.unet, hypernetwork)
        for model in models if loras else ():
            for layer in _lora_layers(model):
                for name, _ in loras:
                    if name in layer.lora_A:
                        layer.delete_adapter(name)
            for name, _ in loras:
                getattr(model, "peft_config", {}).pop(name, None)
            if hasattr(model, "peft_config") and not model.peft_config:  # as before: no peft warning next time
                del model.peft_config


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One axis of an X/Y grid: ``kind`` is files, strengths or prompts; ``labels`` are what it shows."""

    kind: str
    values: tuple
    labels: tuple[str, ...]

    @classmethod
    def files(cls, paths: Sequence[str | Path | None], labels: Sequence[str] | None = None) -> Axis:
        """Trained files, in the order given, labelled by their name's epoch/step number or their stem;
        ``None`` is the base model without any file (A1111's "None")."""
        paths = tuple(None if p is None else Path(p) for p in paths)
        return cls("files", paths, tuple(labels) if labels else tuple(file_label(p) for p in paths))

    @classmethod
    def strengths(cls, values: Sequence[float]) -> Axis:
        return cls("strengths", tuple(float(v) for v in values), tuple(f"strength {float(v):g}" for v in values))

    @classmethod
    def prompts(cls, lines: Sequence[str]) -> Axis:
        from nbkit.train.sample_prompts import load_sample_prompts

        items = load_sample_prompts(list(lines))  # a wrong option fails here, before any image
        return cls("prompts", tuple(items), tuple(p.prompt for p in items))

    def __post_init__(self) -> None:
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"axis kind {self.kind!r}: one of {', '.join(AXIS_KINDS)}")
        if not self.values:
            raise ValueError(f"an empty {self.kind} axis: give at least one value")


def file_label(path: Path | None) -> str:
    """``name-000003`` -> ``epoch 3``, ``name-step00000600`` -> ``step 600``, else the file's stem."""
    if path is None:
        return "base model"
    a1111_step = re.search(r"-(\d+)$", path.stem)
    if path.suffix in HYPERNETWORK_SUFFIXES and a1111_step:  # A1111's hypernetwork saves: <name>-<step>.pt
        return f"step {int(a1111_step[1])}"
    epoch = re.search(r"-(\d{6})$", path.stem)
    step = re.search(r"-step(\d+)$", path.stem)
    return f"epoch {int(epoch[1])}" if epoch else f"step {int(step[1])}" if step else path.stem


@dataclass
class XYGrid:
    """The grid image and what is where: ``cells[r][c]`` are the images, ``seeds[r][c]`` their seeds."""

    image: Image.Image
    row_labels: list[str]
    col_labels: list[str]
    cells: list[list[Image.Image]]
    seeds: list[list[int]]
    origin: tuple[int, int]  # the top-left pixel of cell (0, 0)
    cell_size: tuple[int, int]
    path: Path | None = None
    info: dict = field(default_factory=dict)

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        (x0, y0), (w, h) = self.origin, self.cell_size
        return x0 + col * w, y0 + row * h, x0 + (col + 1) * w, y0 + (row + 1) * h

    def _repr_png_(self) -> bytes:  # shown in a notebook as the last expression of a cell
        import io

        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def _cell_inputs(row: Any, col: Any, axes: tuple[Axis, Axis], prompt, network, seed: int):
    chosen = {"files": network, "strengths": 1.0, "prompts": prompt}
    for axis, value in zip(axes, (row, col), strict=True):
        chosen[axis.kind] = value
    item = chosen["prompts"]
    item = dataclasses.replace(item, seed=item.seed if item.seed is not None else seed)
    return chosen["files"], chosen["strengths"], item


def xy_grid(pipeline, *, rows: Axis, cols: Axis, prompt: str | None = None, network: str | Path | None = None,
            network_dirs: Sequence[str | Path] = (), seed: int = 0, default_size: int = 512,
            sampler: str = "euler_a", clip_skip: int | None = None, out: str | Path | None = None,
            show: bool = False) -> XYGrid:
    """Render the X/Y grid: one image per (row, column), the same seed down each column.

    ``prompt`` is the prompt of every cell when no axis is ``prompts``; ``network`` the file of every cell
    when no axis is ``files`` (a strengths axis then scales it). Prompt tags ``<lora:name:w>`` and
    ``<hypernet:name:w>`` load files by name from ``network_dirs`` on top. ``out``: write the PNG there."""
    from nbkit.train.sample_prompts import load_sample_prompts
    from nbkit.train.sampling import generate_samples

    if rows.kind == cols.kind:
        raise ValueError(f"rows and columns are both {rows.kind}: choose two different axes")
    if "strengths" in (rows.kind, cols.kind) and "files" not in (rows.kind, cols.kind) and network is None:
        raise ValueError("a strengths axis scales a file: give network=<file> or a files axis")
    default_prompt = load_sample_prompts([prompt or "a photo"])[0]
    cells, seeds = [], []
    with tempfile.TemporaryDirectory(prefix="nbkit-xy-") as tmp:
        for row in rows.values:
            cells.append([])
            seeds.append([])
            for col in cols.values:
                file, strength, item = _cell_inputs(row, col, (rows, cols), default_prompt, network, seed)
                text, tags = parse_network_tags(item.prompt)
                nets = ([(Path(file), strength)] if file else []) + [
                    (find_network(name, kind, network_dirs), weight) for kind, name, weight in tags]
                with networks_applied(pipeline, nets):
                    (_, image, _), = generate_samples(pipeline, [dataclasses.replace(item, prompt=text)], step=0,
                                                      epoch=None, output_dir=tmp, output_name="xy",
                                                      default_sampler=sampler, default_size=default_size,
                                                      clip_skip=clip_skip)
                cells[-1].append(image)
                seeds[-1].append(item.seed)
    grid = render_grid(cells, list(rows.labels), list(cols.labels), seeds)
    grid.info = {"rows": rows.kind, "cols": cols.kind, "row_labels": grid.row_labels, "col_labels": grid.col_labels,
                 "seeds": seeds, "cell_size": list(grid.cell_size), "origin": list(grid.origin)}
    if out is not None:
        grid.path = save_grid(grid, out)
    if show:
        from nbkit.data.gallery import display_image

        display_image(grid.image)
    return grid


def render_grid(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                seeds: list[list[int]]) -> XYGrid:
    """Cells at their own size (no resampling, so a cell is the generated image pixel for pixel), a
    header row with the column labels and a left margin with the row labels."""
    from nbkit.data.gallery import _font, _wrap

    font = _font(12)
    w = max(im.width for row in cells for im in row)
    h = max(im.height for row in cells for im in row)
    col_w = max(w, 96)
    lines = [_wrap(label, font, col_w - 4, 4) for label in col_labels]
    header = 6 + 15 * max(len(x) for x in lines)
    margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) for t in row_labels)
    sheet = Image.new("RGB", (margin + len(col_labels) * w, header + len(row_labels) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(lines):
        for n, line in enumerate(text):
            draw.text((margin + c * w + 2, 3 + 15 * n), line, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((4, header + r * h + h // 2 - 7), label, fill="black", font=font)
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (margin + c * w, header + r * h))
    return XYGrid(sheet, row_labels, col_labels, cells, seeds, (margin, header), (w, h))


def save_grid(grid: XYGrid, path: str | Path) -> Path:
    """Write the grid as PNG with its axes, labels and seeds in the ``nbkit_xy`` text chunk."""
    from nbkit.io import atomic_path

    info = PngInfo()
    info.add_text("nbkit_xy", json.dumps(grid.info))
    with atomic_path(path) as tmp:
        grid.image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_grid_info(path: str | Path) -> dict:
    """The ``nbkit_xy`` chunk of a saved grid."""
    with Image.open(path) as im:
        return json.loads(im.text["nbkit_xy"])


def load_embeddings(pipeline, paths: Sequence[str | Path]) -> list[str]:
    """Textual-inversion files into the pipeline as A1111 reads its embeddings folder: a file's stem is
    its prompt word (kohya/nbkit ``.safetensors`` with ``emb_params`` or ``clip_l``/``clip_g``, or an A1111
    ``.pt``, read with ``weights_only``). Loaded with diffusers' ``load_textual_inversion``, which expands a
    multi-vector word; returns the words."""
    from nbkit.formats.embeddings import load_embedding_file

    words = []
    for path in map(Path, paths):
        vectors, _ = load_embedding_file(path)
        for part, rows in vectors.items():  # text_encoder (and SDXL's text_encoder_2)
            tokenizer = getattr(pipeline, "tokenizer" if part == "text_encoder" else "tokenizer_2")
            pipeline.load_textual_inversion(rows, token=path.stem, text_encoder=getattr(pipeline, part),
                                            tokenizer=tokenizer)
        words.append(path.stem)
    return words


# ----------------------------------------------------------------------------- the command
def add_commands(sub) -> None:
    """``nbkit generate``: an X/Y grid (or one column of prompts) from the command line."""
    gen = sub.add_parser("generate", help="render prompts (A1111 <lora:name:w> / <hypernet:name:w> tags) as an "
                         "X/Y grid: rows and columns are trained files, strengths or prompts")
    gen.add_argument("model", help="base model: diffusers folder, Hub id, URL or single file")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a kohya prompt line (--w --h --s --l --d --n options; repeat for more)")
    gen.add_argument("--from_file", help="kohya prompt file (.txt, .toml, .json) with more prompts")
    gen.add_argument("--files", nargs="+", default=[], help="trained files (.safetensors LoRA, .pt hypernetwork)")
    gen.add_argument("--base_row", action="store_true", help="add a row without any file (the base model)")
    gen.add_argument("--strengths", nargs="+", type=float, default=[], help="multipliers, e.g. 0.5 0.75 1")
    gen.add_argument("--network", help="the file every cell uses when no axis is files")
    gen.add_argument("--network_dir", action="append", default=[], help="where <lora:name> tags look (repeatable)")
    gen.add_argument("--rows", choices=AXIS_KINDS, help="row axis (default: files, else strengths)")
    gen.add_argument("--cols", choices=AXIS_KINDS, help="column axis (default: prompts)")
    gen.add_argument("--seed", type=int, default=0, help="seed of every prompt without --d (default 0)")
    gen.add_argument("--size", type=int, default=512, help="image size of prompts without --w/--h (default 512)")
    gen.add_argument("--sampler", default="euler_a", help="sampler of prompts without --ss (default euler_a)")
    gen.add_argument("--clip_skip", type=int, help="2 for many anime models")
    gen.add_argument("--embeddings", nargs="+", default=[],
                     help="textual-inversion files; each file's name is its word in the prompts (as in A1111)")
    gen.add_argument("--out", default="xy-grid.png", help="the grid PNG (default ./xy-grid.png)")
    gen.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from nbkit.models.load import load_pipeline
    from nbkit.train.sample_prompts import load_sample_prompts

    lines = list(args.prompt) + ([p.to_line() for p in load_sample_prompts(args.from_file)] if args.from_file else [])
    files = ([None] if args.base_row else []) + list(args.files)
    axes = {"prompts": Axis.prompts(lines or ["a photo"]),
            "files": Axis.files(files) if files else None,
            "strengths": Axis.strengths(args.strengths) if args.strengths else None}
    rows = args.rows or ("files" if files else "strengths" if args.strengths else None)
    cols = args.cols or ("prompts" if rows != "prompts" else "strengths")
    if rows is None:  # prompts only: one row, the base model (or --network)
        rows, axes["files"] = "files", Axis.files([args.network])
    for kind in (rows, cols):
        if axes[kind] is None:
            raise SystemExit(f"nbkit generate: error: --{kind} has no values for the {kind} axis")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipeline, _ = load_pipeline(args.model, device=device, torch_dtype=dtype)
    load_embeddings(pipeline, args.embeddings)
    grid = xy_grid(pipeline, rows=axes[rows], cols=axes[cols], prompt=lines[0] if lines else None,
                   network=args.network, network_dirs=args.network_dir, seed=args.seed, default_size=args.size,
                   sampler=args.sampler, clip_skip=args.clip_skip, out=args.out)
    print(f"{grid.path}: {len(grid.row_labels)} rows ({rows}) x {len(grid.col_labels)} columns ({cols})")
    return 0

