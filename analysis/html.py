"""Small HTML pieces every page of the report builds from: tables, inlined figures, numbers."""

from __future__ import annotations

import base64
import html
import math

import numpy as np


def img(png: bytes, alt: str) -> str:
    """A PNG inlined as base64 (the pages are self-contained: no file beside them)."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def fmt(value, spec: str = "{:.3f}") -> str:
    """A number in `spec`; a missing one (None, nan) as a dash; anything else escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return spec.format(value) if isinstance(value, (int, float, np.floating)) else html.escape(str(value))


def pm(value, se, spec: str) -> str:
    """value ± standard error, both in the metric's format (the value alone when the error is missing)."""
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return fmt(value, spec)
    return f"{fmt(value, spec)} ± {fmt(se, spec)}"


def table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Headers are escaped here; cells are HTML already."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
