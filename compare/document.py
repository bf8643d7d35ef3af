"""A tiny document model rendered twice: Markdown (report.md) and self-contained HTML (report.html).

The report is built once as a list of blocks, so the two files always carry
the same content. HTML embeds every image as base64 and uses only inline CSS:
the file opens anywhere, offline, with no external URL.
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from compare.tables import display_frame


@dataclass
class Block:
    """One piece of the report. ``kind``: h1 | h2 | h3 | p | list | table | image | code."""

    kind: str
    text: str = ""  # heading / paragraph / code text; image caption
    items: list[str] = field(default_factory=list)  # list items
    table: pd.DataFrame | None = None  # table cells (numbers are formatted on render)
    highlight: list[bool] | None = None  # per table row: render as an asymmetry
    path: Path | None = None  # image file
    link: str = ""  # image path relative to the report (Markdown)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
tr.asym td { background: #ffd9d9; font-weight: bold; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { background: #f5f5f5; border-radius: 3px; font-family: Menlo, Consolas, monospace; }
pre { padding: .8em; overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
"""
_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?$")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(block: Block) -> str:
    frame = display_frame(block.table)
    if frame.empty:
        return "_(no rows)_"
    if block.highlight:
        for index, flagged in enumerate(block.highlight):
            if flagged:
                frame.iloc[index] = [f"**{v}**" for v in frame.iloc[index]]
    frame = frame.map(_md_cell)
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True)


def to_markdown(blocks: list[Block]) -> str:
    """The report as GitHub-flavoured Markdown (images linked relative to the report)."""
    parts = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            parts.append("#" * int(block.kind[1]) + " " + block.text)
        elif block.kind == "p":
            parts.append(block.text)
        elif block.kind == "list":
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif block.kind == "table":
            parts.append(_md_table(block))
        elif block.kind == "image":
            parts.append(f"![{block.text}]({block.link})")
        elif block.kind == "code":
            parts.append(f"```\n{block.text}\n```")
    return "\n\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then turn `code` and **bold** spans (the only inline Markdown the report uses) into tags."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _html_table(block: Block) -> str:
    frame = display_frame(block.table)
    if frame.empty:
        return "<p><em>(no rows)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for index, values in enumerate(frame.itertuples(index=False)):
        css = ' class="asym"' if block.highlight and block.highlight[index] else ""
        cells = "".join(f'<td class="num">{html.escape(v)}</td>' if _NUMERIC.match(v)
                        else f"<td>{html.escape(v)}</td>" for v in values)
        rows.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _html_image(block: Block) -> str:
    data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
    caption = html.escape(block.text)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def to_html(blocks: list[Block], title: str) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 images)."""
    body = []
    for block in blocks:
        if block.kind in ("h1", "h2", "h3"):
            body.append(f"<{block.kind}>{_inline_html(block.text)}</{block.kind}>")
        elif block.kind == "p":
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif block.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif block.kind == "table":
            body.append(_html_table(block))
        elif block.kind == "image":
            body.append(_html_image(block))
        elif block.kind == "code":
            body.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
