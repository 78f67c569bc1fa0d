"""kohya sd-scripts sample prompt files (``--sample_prompts``): ``.txt``, ``.toml`` and ``.json``.

The three forms kohya's ``train_util.load_prompts`` reads, parsed into :class:`SamplePrompt`:

``.txt``
    One prompt per line. Blank lines and lines whose *first character* is ``#`` are skipped
    (kohya tests ``line[0]``, so an indented ``#`` line is a prompt). Options follow the prompt,
    each introduced by ``" --"``::

        masterpiece, 1girl --n lowres, bad hands --w 512 --h 768 --d 42 --l 7 --s 28 --ss euler_a

    ``--n`` negative prompt, ``--w``/``--h`` size, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps
    (clamped to 1..1000 as kohya does), ``--ss`` sampler. Option letters are case-insensitive.
``.toml``
    kohya's layout: a ``[prompt]`` table of shared values and ``[[prompt.subset]]`` entries, each
    merged with it (``dict(**data["prompt"], **subset)``)::

        [prompt]
        width = 512
        sample_steps = 28

        [[prompt.subset]]
        prompt = "1girl, solo"
        negative_prompt = "lowres"
        seed = 42

    A key set in both ``[prompt]`` and a subset is an error, as in kohya (whose ``dict(**a, **b)``
    raises). nbkit also accepts a plain ``[[prompt]]`` array of tables.
``.json``
    A list whose items are prompt lines (parsed like ``.txt`` lines) or objects.

Keys of the table/object forms: ``prompt``, ``negative_prompt``, ``width``, ``height``, ``seed``,
``scale``, ``sample_steps``, ``sample_sampler``.

Where nbkit is stricter than kohya (kohya logs or silently drops these and samples anyway): a
malformed value (``--w 5l2``), an unknown option or key, and an unknown sampler name are errors
that name the file and the line (or entry). Options other kohya scripts use (``--cn``, ``--g``,
``--ctr``, ``--rcfg``, ``--fs``) are ignored with a warning. kohya also matches options against the
prompt text itself (a prompt starting ``"s 5 ..."`` sets 5 steps); nbkit only reads the parts after
the first ``" --"``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# kohya ``get_my_scheduler`` names (and its ``k_`` aliases) -> canonical name. kohya has no
# ``k_heun``; nbkit accepts it for symmetry with the other k-diffusion names.
SAMPLER_ALIASES: dict[str, str] = {
    "ddim": "ddim",
    "pndm": "pndm",
    "lms": "lms",
    "k_lms": "lms",
    "euler": "euler",
    "k_euler": "euler",
    "euler_a": "euler_a",
    "k_euler_a": "euler_a",
    "dpmsolver": "dpmsolver",
    "dpmsolver++": "dpmsolver++",
    "dpmsingle": "dpmsingle",
    "heun": "heun",
    "k_heun": "heun",
    "dpm_2": "dpm_2",
    "k_dpm_2": "dpm_2",
    "dpm_2_a": "dpm_2_a",
    "k_dpm_2_a": "dpm_2_a",
}
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLER_ALIASES)

DEFAULT_SIZE = 512
DEFAULT_SCALE = 7.5
DEFAULT_STEPS = 30
MAX_STEPS = 1000

_TXT_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "sample_steps",
                "ss": "sample_sampler"}
_FIELD_OPTIONS = {field: option for option, field in _TXT_OPTIONS.items()}
_IGNORED_OPTIONS = ("cn", "g", "ctr", "rcfg", "fs")
_KEYS = ("prompt", "negative_prompt", "width", "height", "seed", "scale", "sample_steps", "sample_sampler")
# kohya keys that carry no meaning for SD1/SD2 sampling here (``enum``/``subset`` are kohya internals).
_IGNORED_KEYS = ("enum", "subset", "controlnet_image", "guidance_scale", "cfg_trunc_ratio", "renorm_cfg", "flow_shift")
_EXTENSIONS = (".txt", ".toml", ".json")


class SamplePromptError(ValueError):
    """A sample prompt file (or text) has a value nbkit cannot use; the message says where."""


def canonical_sampler(name: str) -> str:
    """kohya sampler name or alias (``k_euler_a``) -> canonical name (``euler_a``); case-insensitive."""
    key = str(name).strip().lower()
    if key not in SAMPLER_ALIASES:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return SAMPLER_ALIASES[key]


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image request, with kohya's field names.

    ``None`` means "not given": ``width``/``height`` then fall back to the caller's default size
    (kohya: 512), ``seed`` to a seed derived from the run seed and ``index``, ``sample_sampler`` to
    the run's ``--sample_sampler``. ``index`` is the prompt's position in its file (kohya's
    ``enum``, used in the image file name).
    """

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scale: float = DEFAULT_SCALE
    sample_steps: int = DEFAULT_STEPS
    sample_sampler: str | None = None
    index: int | None = None

    def to_line(self) -> str:
        """This prompt as a kohya ``.txt`` line (``index`` is positional and not written)."""
        values = asdict(self)
        parts = [self.prompt]
        for field, option in _FIELD_OPTIONS.items():
            value = values[field]
            if value is None or (field == "scale" and value == DEFAULT_SCALE) or (
                field == "sample_steps" and value == DEFAULT_STEPS
            ):
                continue
            parts.append(f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}")
        return " --".join(parts)


def _closest(word: str, choices: Sequence[str]) -> str:
    contains = [c for c in choices if len(word) > 1 and word.lower() in c]
    match = contains or difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _int(value: Any, key: str, where: str, minimum: int, maximum: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise SamplePromptError(f"{where}: {key} must be a whole number >= {minimum}{upper}, got {value!r}")
    return value


def _prompt_from_dict(raw: Mapping[str, Any], where: str, index: int) -> SamplePrompt:
    """Validate one kohya prompt dict (from a parsed line, a TOML table or a JSON object)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _IGNORED_KEYS:
            if key not in ("enum", "subset"):
                logger.warning("%s: %r is not used for SD1/SD2 samples; ignored", where, key)
            continue
        if key not in _KEYS:
            raise SamplePromptError(f"{where}: unknown key {key!r}{_closest(key, _KEYS)}; valid keys: {', '.join(_KEYS)}")
        values[key] = value
    if "prompt" not in values:
        raise SamplePromptError(f"{where}: no 'prompt' given")
    for key in ("prompt", "negative_prompt", "sample_sampler"):
        if key in values and not isinstance(values[key], str):
            raise SamplePromptError(f"{where}: {key} must be text, got {values[key]!r}")
    for key in ("width", "height"):
        if key in values:
            values[key] = _int(values[key], key, where, 1)
    if "seed" in values:
        values["seed"] = _int(values["seed"], "seed", where, 0, 2**64 - 1)
    if "sample_steps" in values:  # kohya clamps --s to 1..1000
        values["sample_steps"] = max(1, min(MAX_STEPS, _int(values["sample_steps"], "sample_steps", where, 0)))
    if "scale" in values:
        scale = values["scale"]
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 0:
            raise SamplePromptError(f"{where}: scale must be a number >= 0, got {scale!r}")
        values["scale"] = float(scale)
    if values.get("sample_sampler") is not None:
        try:
            canonical_sampler(values["sample_sampler"])
        except ValueError as err:
            raise SamplePromptError(f"{where}: {err}") from None
    return SamplePrompt(**values, index=index)


def _parse_number(text: str, option: str, where: str, kind: type) -> int | float:
    try:
        if kind is int and not text.isdigit():  # kohya's regex is ``\d+``: no sign, no decimals
            raise ValueError
        return kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise SamplePromptError(f"{where}: --{option} expects {noun}, got {text!r}") from None


def line_to_prompt_dict(line: str, where: str = "prompt") -> dict[str, Any]:
    """Split a kohya prompt line on ``" --"`` into kohya's prompt dict (values typed, not yet
    range-checked). ``where`` names the line in error messages."""
    parts = line.split(" --")
    result: dict[str, Any] = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        option, _, value = part.strip().partition(" ")
        option, value = option.lower(), value.strip()
        if option in _IGNORED_OPTIONS:
            logger.warning("%s: --%s is not used for SD1/SD2 samples; ignored", where, option)
            continue
        if option not in _TXT_OPTIONS:
            valid = ", ".join(f"--{o}" for o in _TXT_OPTIONS)
            hint = _closest(option, list(_TXT_OPTIONS))
            raise SamplePromptError(f"{where}: unknown option '--{part.strip()}'{hint}; valid options: {valid}")
        if not value:
            raise SamplePromptError(f"{where}: --{option} needs a value")
        key = _TXT_OPTIONS[option]
        if option in ("w", "h", "d", "s"):
            result[key] = _parse_number(value, option, where, int)
        elif option == "l":
            result[key] = _parse_number(value, option, where, float)
        else:
            result[key] = value
    return result


def _txt_prompts(text: str, name: str) -> list[SamplePrompt]:
    prompts: list[SamplePrompt] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line[0] == "#":
            continue
        where = f"{name} line {number}"
        prompts.append(_prompt_from_dict(line_to_prompt_dict(line.strip(), where), where, len(prompts)))
    return prompts


def _item_prompts(items: Sequence[Any], name: str, label: str) -> list[SamplePrompt]:
    prompts: list[SamplePrompt] = []
    for i, item in enumerate(items):
        where = f"{name} {label} {i + 1}"
        if isinstance(item, str):
            item = line_to_prompt_dict(item.strip(), where)
        elif not isinstance(item, Mapping):
            raise SamplePromptError(f"{where}: expected a prompt line or a table/object, got {type(item).__name__}")
        prompts.append(_prompt_from_dict(item, where, i))
    return prompts


def _toml_prompts(text: str, name: str) -> list[SamplePrompt]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SamplePromptError(f"{name}: not valid TOML: {err}") from None
    table = data.get("prompt")
    if isinstance(table, list):  # nbkit extension: [[prompt]] array of tables
        return _item_prompts(table, name, "[[prompt]] entry")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise SamplePromptError(f"{name}: expected a [prompt] table with [[prompt.subset]] entries (kohya's layout)")
    shared = {k: v for k, v in table.items() if k != "subset"}
    merged = []
    for i, subset in enumerate(table["subset"]):
        both = sorted(set(shared) & set(subset)) if isinstance(subset, dict) else []
        if both:
            raise SamplePromptError(
                f"{name} [[prompt.subset]] {i + 1}: {', '.join(both)} also set in [prompt]; kohya rejects this, "
                "set it in one place"
            )
        merged.append({**shared, **subset} if isinstance(subset, dict) else subset)
    return _item_prompts(merged, name, "[[prompt.subset]]")


def _json_prompts(text: str, name: str) -> list[SamplePrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SamplePromptError(f"{name}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise SamplePromptError(f"{name}: expected a JSON list of prompts, got {type(data).__name__}")
    return _item_prompts(data, name, "item")


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (os.path.isfile(text) or text.strip().lower().endswith(_EXTENSIONS))


def load_sample_prompts(path_or_text: str | os.PathLike | Sequence[str | Mapping[str, Any]]) -> list[SamplePrompt]:
    """Read kohya sample prompts from a ``.txt``/``.toml``/``.json`` file, from ``.txt``-format text,
    or from a list of prompt lines/dicts (handled like a JSON list).

    A ``str`` is a file path if it names an existing file or ends in ``.txt``/``.toml``/``.json``
    (and has no newline); otherwise it is prompt text. Raises :class:`SamplePromptError` naming
    the file and line (or entry) for a bad value, ``FileNotFoundError`` for a missing file.
    """
    if isinstance(path_or_text, Sequence) and not isinstance(path_or_text, str):
        return _item_prompts(list(path_or_text), "<prompts>", "item")
    if isinstance(path_or_text, str) and not _looks_like_path(path_or_text):
        return _txt_prompts(path_or_text, "<text>")
    path = Path(path_or_text)
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise SamplePromptError(f"{path}: sample prompts must be a {', '.join(_EXTENSIONS)} file")
    if not path.is_file():
        raise FileNotFoundError(f"sample prompt file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")  # kohya reads utf-8; -sig also accepts a Notepad BOM
    reader = {".txt": _txt_prompts, ".toml": _toml_prompts, ".json": _json_prompts}[suffix]
    return reader(text, str(path))
