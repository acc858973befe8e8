"""HTML building blocks of the report: number formats, escaping, tables, images, the CSS."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.report.results import (
    _BYTES_PER_MB,
    MISSING,
    _number,
)

__all__: list[str] = []


def _fmt(value: Any, digits: int = 4) -> str:
    """A value for a table cell; ``None`` or absent shows as :data:`MISSING`."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _digits(digits: int) -> Callable[[Any], str]:
    return lambda value: _fmt(value, digits)


def _fmt_mb(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number / _BYTES_PER_MB:,.2f}"


def _fmt_general(value: Any) -> str:
    """A number with 4 significant digits (z, q, C); other values as :func:`_fmt`."""
    number = _number(value)
    if number is None or isinstance(value, int):
        return _fmt(value)
    return f"{number:.4g}" if math.isfinite(number) else str(number)


def _ratio(numerator: Any, denominator: Any) -> str:
    num, den = _number(numerator), _number(denominator)
    return f"{num / den:.1%}" if num is not None and den else MISSING


# ---------------------------------------------------------------------------------- elements

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h1 { font-size: 1.5em; overflow-wrap: anywhere; }
h1 small { color: #666; font-weight: normal; font-size: 0.6em; }
h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; white-space: nowrap; }
td.k, th.k { text-align: left; font-weight: 600; }
td.t, th.t { text-align: left; overflow-wrap: anywhere; }
.headline { font-size: 1.15em; line-height: 1.6; }
.headline .figure { font-size: 1.3em; font-weight: 700; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.box { border: 1px solid #bbb; border-radius: 6px; padding: 0.2em 1em 0.6em; margin: 1em 0;
       background: #fcfcfc; }
.verdict { font-weight: 700; padding: 0.4em 0.6em; border-radius: 4px; display: inline-block; }
.verdict.verified { background: #e3f4e6; color: #17612a; }
.verdict.failed { background: #fbe3e3; color: #8a1313; }
.verdict.unfinished, .verdict.none { background: #fdf3d9; color: #6b4e00; }
.scroll { max-height: 32em; max-width: 100%; overflow: auto; border: 1px solid #ccc;
          margin: 0.5em 0 1em; }
.scroll table { margin: 0; border-style: hidden; }
.scroll thead th { position: sticky; top: 0; z-index: 1; box-shadow: 0 1px 0 #bbb; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1em; }
code { font-size: 0.95em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    key_column: bool,
    attrs: str = "",
    text_columns: frozenset[int] = frozenset(),
) -> str:
    """An HTML table; every cell is escaped here. ``text_columns`` are left-aligned text."""
    head = "".join(
        f'<th class="k">{_e(h)}</th>' if key_column and j == 0 else
        f'<th class="t">{_e(h)}</th>' if j in text_columns else f"<th>{_e(h)}</th>"
        for j, h in enumerate(header)
    )  # fmt: skip
    body = []
    for row in rows:
        cells = []
        for j, c in enumerate(row):
            cls = "k" if key_column and j == 0 else "t" if j in text_columns else ""
            cells.append(f'<td class="{cls}">{_e(c)}</td>' if cls else f"<td>{_e(c)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    open_tag = f"<table {attrs}>" if attrs else "<table>"
    return f"{open_tag}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str, element_id: str) -> str:
    """An ``<img>`` with the PNG at ``path`` embedded as a base64 data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img id="{element_id}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------------------------- baselines
