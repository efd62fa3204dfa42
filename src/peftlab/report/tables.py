"""Tables as the report's three outputs write them: aligned console text, Markdown and HTML,
plus the stylesheet every peftlab page shares (report.html and the leaderboard)."""

from __future__ import annotations

import html as _html

PAGE_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}.num{text-align:right}img{max-width:100%;display:block;margin:1em 0}
.note{color:#666}"""


def text_table(header: list[str], rows: list) -> str:
    """Columns padded to line up in a terminal: the first left-aligned, the rest right-aligned,
    with a dashed rule under the header."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip() for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list) -> list[str]:
    """The table's lines in Markdown, every column but the first right-aligned."""
    return [
        "| " + " | ".join(header) + " |",
        "|---" + "|---:" * (len(header) - 1) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def html_table(header: list[str], rows: list, numeric_from: int = 1, table_id: str | None = None) -> str:
    """An HTML table; cells are escaped, columns from `numeric_from` on are right-aligned."""

    def cell(tag, i, v):
        cls = ' class="num"' if i >= numeric_from else ""
        return f"<{tag}{cls}>{_html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    opening = f'<table id="{table_id}">' if table_id else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
