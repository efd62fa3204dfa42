"""What a run and a set of runs write for people to read. Each module writes one thing:

- `text`: the comparison table printed at the end of a run, and report.md;
- `html`: report.html, self-contained, with the numbers only the page shows;
- `plots`: report.html's figures as PNG (matplotlib, imported only when drawing);
- `leaderboard`: reading report.json back, and the leaderboard over runs (console, .md, .html);
- `card`: the adapter folder's README.md (Hugging Face model card);
- `tables`: the text, Markdown and HTML tables and page style they share.
"""

from peftlab.report.card import model_card
from peftlab.report.html import binary_curves, confident_mistakes, write_html_report
from peftlab.report.leaderboard import (
    REPORT_FORMAT_VERSION,
    leaderboard_rows,
    leaderboard_text,
    load_run_report,
    seed_summary_rows,
    write_leaderboard,
)
from peftlab.report.text import console_table, markdown

__all__ = [
    "REPORT_FORMAT_VERSION",
    "binary_curves",
    "confident_mistakes",
    "console_table",
    "leaderboard_rows",
    "leaderboard_text",
    "load_run_report",
    "markdown",
    "model_card",
    "seed_summary_rows",
    "write_html_report",
    "write_leaderboard",
]
