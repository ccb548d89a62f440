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


def figures(images: list[str]) -> str:
    """Figures side by side in a grid: two or three to a row on a wide screen, one on a narrow one."""
    return f'<div class="figures">{"".join(images)}</div>' if images else ""


CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
table.wide{font-size:.75em}
.gap{background:#f6f8fa;border-left:4px solid #1f77b4;padding:.5em .8em}
img{max-width:100%;display:block;margin:.5em 0}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:.6em 1em;align-items:start}
.figures img{width:100%;margin:0}
section{border-top:2px solid #ddd;margin-top:2em}
.small{color:#777;font-size:.85em} .warn{color:#a00}
mark{background:#ffd54f;font-weight:bold}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:.85em}
.act{display:inline-block;min-width:3.5em;font-family:ui-monospace,monospace}
ul.examples{list-style:none;padding-left:.5em}
.dash{margin:0 0 1em .5em} svg.hist{display:block;border-bottom:1px solid #999}
"""
