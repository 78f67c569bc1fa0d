"""Per-file checks of training images and captions, and the conversions ``--fix_to`` applies.

Every check only reads. A :class:`Problem` says which file, what is wrong and how to fix it, in
plain words, with a severity:

- ``error``: training cannot use the file (it stops or skips it); left out of fixed copies;
- ``fixable``: training would misread it (CMYK, 16-bit, non-UTF-8 caption); fixed copies convert it;
- ``warning``: trains, but the result may suffer (tiny, huge, transparent, palette images).
"""

from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from nbkit.data.images import ALPHA_MODES, SIXTEEN_BIT_MODES, flatten_to_rgb

ERROR, FIXABLE, WARNING = "error", "fixable", "warning"
#: Problem kinds that make ``--fix_to`` re-encode the image instead of copying its bytes.
CONVERT_KINDS = {"cmyk", "16-bit", "alpha", "palette", "too-large", "pixel-limit", "unsupported-format"}
FIX_COPY = "the --fix_to copy"


@dataclass
class Problem:
    """One thing wrong with one file: ``what`` is wrong, ``fix`` says what to do."""

    path: Path
    severity: str
    kind: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}. Fix: {self.fix}"


@dataclass
class ImageCheck:
    path: Path
    size: tuple[int, int] | None = None
    mode: str | None = None
    format: str | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    @property
    def needs_conversion(self) -> bool:
        return any(p.kind in CONVERT_KINDS for p in self.problems)


def read_text_tolerant(path: Path) -> tuple[str, str]:
    """(text, encoding) of a caption file: UTF-8 (with or without BOM), UTF-16, else Windows-1252/Latin-1."""
    data = Path(path).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace"), "utf-16"
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def _sniff(path: Path) -> str:
    """What a file Pillow cannot identify probably is."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered[:200]:
        return "is a web page (HTML), not an image: often a failed download or a sign-in page saved under an image name"
    if head.startswith(b"PK"):
        return "is a zip archive, not an image"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "is a text file, not an image"
        except UnicodeDecodeError:
            pass
    return "is not an image Pillow can read (unknown or damaged format)"


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _open_problem(path: Path, err: BaseException) -> Problem:
    """Turn an exception from opening/decoding ``path`` into a plain-words problem."""
    if isinstance(err, Image.DecompressionBombError):
        return Problem(path, ERROR, "pixel-limit",
                       f"has more pixels than Pillow will open ({err}); it is refused as a possible 'decompression "
                       "bomb'", "downscale it (long side 3000 px or less) in an image editor; if you trust the file, "
                       "set PIL.Image.MAX_IMAGE_PIXELS higher before running")
    if isinstance(err, UnidentifiedImageError):
        return Problem(path, ERROR, "not-an-image", _sniff(path),
                       "remove it, or replace it with the real image (download or copy it again)")
    if "truncated" in str(err).lower() or "premature end" in str(err).lower():
        return Problem(path, ERROR, "truncated",
                       "is truncated: the file ends before the image does (an interrupted copy, upload or download)",
                       "copy it again from the original, or remove it")
    return Problem(path, ERROR, "unreadable", f"cannot be decoded ({err})",
                   "open and re-save it as PNG or JPEG in an image editor, or remove it")


def _mode_problems(path: Path, im: Image.Image) -> list[Problem]:
    out = []
    if im.mode == "CMYK":
        out.append(Problem(path, FIXABLE, "cmyk", "is a CMYK image (a print colour format); training converts it "
                           "with a simple formula, so colours can come out wrong",
                           f"re-export it as RGB (sRGB) from your editor; {FIX_COPY} converts it to RGB"))
    if im.mode in SIXTEEN_BIT_MODES:
        out.append(Problem(path, FIXABLE, "16-bit", f"is a 16-bit greyscale image (mode {im.mode}); read as it is, "
                           "it trains as an almost white picture", f"re-save it as 8-bit; {FIX_COPY} scales it to 8 bits"))
    elif im.format == "PNG" and _png_bit_depth(path) == 16:
        out.append(Problem(path, WARNING, "16-bit-rgb", "is a 16-bit PNG; it is read with 8 bits per channel",
                           "nothing to do unless colours look banded; re-save as 8-bit to save space"))
    transparent = im.mode in ALPHA_MODES or "transparency" in im.info
    if transparent:
        out.append(Problem(path, WARNING, "alpha", "has transparency; transparent areas are filled with white when "
                           "training", f"fine for a white background; otherwise put the subject on the background you "
                           f"want; {FIX_COPY} is flattened onto white"))
    if im.mode == "P" and not transparent:
        out.append(Problem(path, WARNING, "palette", "is a palette image (256 colours at most, like a GIF); its "
                           "banding and dithering will be learned", f"use the full-colour original if you have one; "
                           f"{FIX_COPY} is stored as RGB"))
    return out


def _size_problems(path: Path, size: tuple[int, int], resolution: tuple[int, int], max_side: int,
                   bomb_warning: bool) -> list[Problem]:
    width, height = size
    out = []
    if min(width, height) < min(resolution) / 2:
        out.append(Problem(path, WARNING, "too-small", f"is only {width}x{height} px for {resolution[0]}x"
                           f"{resolution[1]} training; it is upscaled and the blur is learned",
                           "use a larger version of the image, or remove it"))
    if bomb_warning:
        out.append(Problem(path, WARNING, "pixel-limit", f"is {width}x{height} = {width * height:,} px, over "
                           f"Pillow's decompression-bomb warning limit ({Image.MAX_IMAGE_PIXELS:,}); it loads slowly "
                           "and uses a lot of RAM", f"downscale it; {FIX_COPY} is downscaled to {max_side} px"))
    elif max(width, height) > max_side:
        ram = width * height * 3 / 1024**2
        out.append(Problem(path, WARNING, "too-large", f"is {width}x{height} px (about {ram:.0f} MB in memory); "
                           "large images slow down loading and use Colab RAM", f"downscale it; {FIX_COPY} is "
                           f"downscaled to {max_side} px on the long side"))
    return out


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not hide the image itself
        return 1


def check_image(path: Path, resolution: tuple[int, int] = (512, 512), max_side: int = 3000) -> ImageCheck:
    """Open, fully decode and inspect one image file; never raises for a bad file."""
    path = Path(path)
    check = ImageCheck(path)
    if path.stat().st_size == 0:
        check.problems.append(Problem(path, ERROR, "zero-byte", "is an empty file (0 bytes)",
                                      "copy the image again from the original, or remove the file"))
        return check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                check.format, check.mode = im.format, im.mode
                rotated = _orientation(im) in (5, 6, 7, 8)  # EXIF orientation swaps the sides
                check.size = (im.height, im.width) if rotated else im.size
                mode_problems = _mode_problems(path, im)
                if im.format == "JPEG":  # decode at 1/8 scale: fast, and still reads every byte of the file
                    im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()  # decodes the pixels: finds truncated and damaged files
                check.problems += mode_problems
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            check.problems.append(_open_problem(path, err))
            return check
    bomb = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
    check.problems += _size_problems(path, check.size, resolution, max_side, bomb)
    return check


def load_fixed(path: Path, max_side: int) -> Image.Image:
    """The image as ``--fix_to`` writes it: flattened RGB, long side at most ``max_side``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            rgb = flatten_to_rgb(im)
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.LANCZOS)
    return rgb
