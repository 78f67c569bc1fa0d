"""The estimator's accuracy, asserted exactly as docs/estimator.md states it, and its constants as the
fit gives them.

The claims are read from the docs ("within ±X% on the N fitted rows, ...") and checked against
errors computed here from the published rows through the public path users get (``estimate`` and
``estimate_step_seconds``, i.e. with the shipped constants): a constant raised or lowered by hand, a
simulation that drifts, or docs that overstate or understate the error all fail. Each stated bound is
the worst error rounded up to 0.1%, so it must also be tight.

The SD1.5 simulations take a few seconds each and are cached per setting for the session."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from nbkit.estimate import estimate, estimate_step_seconds
from nbkit.estimate import fit_constants as fc

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "estimator.md"
CLAIM = (r"\*\*{label}\*\*: within ±([\d.]+)% on the (\d+) fitted rows?, within ±([\d.]+)% on the (\d+) held-out "
         r"rows?, within ±([\d.]+)% on the (\d+) held-out rows? no recorded modelling choice rests on\.")


def _stated(label: str) -> dict[str, tuple[float, int]]:
    """{group: (bound, number of rows)} as docs/estimator.md states them for ``label``."""
    text = DOCS.read_text(encoding="utf-8")
    found = re.search(CLAIM.format(label=re.escape(label)), text)
    assert found, f"docs/estimator.md no longer states the {label} accuracy in the checked form: update this test"
    values = found.groups()
    return {group: (float(values[2 * i]) / 100, int(values[2 * i + 1]))
            for i, group in enumerate(("fitted", "held-out", "blind"))}


def _check(label: str, kind: str, errors: dict[str, float]) -> None:
    stated = _stated(label)
    print(f"{label} errors:", {name: f"{e:+.2%}" for name, e in errors.items()})
    for group, rows in fc.groups(fc.published_rows(), kind).items():
        bound, count = stated[group]
        assert len(rows) == count, f"{label}, {group}: the docs count {count} rows, the fit has {len(rows)}"
        worst = max((r.name for r in rows), key=lambda name: abs(errors[name]))
        error = errors[worst]
        assert abs(error) <= bound + 1e-9, f"{label}, {group} row {worst}: {error:+.2%} is outside the docs' ±{bound:.1%}"
        assert abs(error) > bound - 0.001 - 1e-9, (f"{label}, {group}: the docs' ±{bound:.1%} overstates the worst "
                                                   f"error ({worst}: {error:+.2%}); rerun bench/fit_estimator.py --docs")


def test_memory_accuracy_is_what_the_docs_state():
    errors = {row.name: estimate(row.setting).peak_gb / row.published.gb - 1 for row in fc.published_rows()}
    _check("Memory (peak GB)", "memory", errors)


def test_speed_accuracy_is_what_the_docs_state():
    """The table's it/s counts micro-batches: gradient_accumulation_steps per optimizer step."""
    errors = {}
    for row in fc.published_rows():
        its = row.setting.gradient_accumulation_steps / estimate_step_seconds(row.setting, "T4")
        errors[row.name] = its / row.published.its - 1
    _check("Speed (it/s)", "speed", errors)


def test_shipped_constants_are_what_the_fit_gives():
    """nbkit/estimate/constants.py is the fit's output (``python bench/fit_estimator.py --write``)."""
    fitted, shipped = fc.fit(), fc.shipped()
    assert shipped == fitted, f"constants.py holds {shipped}, the fit gives {fitted}"
    rows = fc.published_rows()  # and the rounding is the only difference from the raw fit
    assert abs(fitted.context_bytes - fc.fit_context(rows)) <= 0.5e7
    for rounded, raw in zip(fitted.speed, fc.fit_speed(rows)):
        assert abs(rounded - raw) <= 0.005


def _bench():
    spec = importlib.util.spec_from_file_location("fit_estimator", ROOT / "bench" / "fit_estimator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_numbers_are_the_bench_output():
    """The tables of docs/estimator.md are what ``python bench/fit_estimator.py --docs`` writes today."""
    bench = _bench()
    fitted, raw, shipped, errors, ablation = bench.compute()
    block = bench.report(fitted, raw, shipped, errors, ablation)
    text = DOCS.read_text(encoding="utf-8")
    assert text == bench.docs_with(block, text), "docs/estimator.md is stale: run python bench/fit_estimator.py --docs"


@pytest.mark.parametrize("kind", ["memory", "speed"])
def test_every_row_is_fitted_or_held_out_as_documented(kind):
    rows = fc.published_rows()
    fitted = {r.name for r in rows if getattr(r, f"{kind}_fit")}
    assert fitted == set(fc.MEMORY_FIT if kind == "memory" else fc.SPEED_FIT)
    informed = fc.MEMORY_INFORMED if kind == "memory" else fc.SPEED_INFORMED
    assert not fitted & set(informed), "a fitted row cannot also be a held-out row that informed a choice"
    assert 0 < len(fitted) < len(rows)
