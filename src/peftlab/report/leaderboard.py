"""The leaderboard over finished runs, read from their report.json files: console text,
leaderboard.md and leaderboard.html, with mean ± std over seeds where runs differ only in seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from peftlab.errors import PeftlabError
from peftlab.report.tables import PAGE_CSS, html_table, markdown_table, text_table

# The newest report.json layout this peftlab reads; experiment.py writes it as "format_version".
# Reports from before the key existed lack it and are read as they are.
REPORT_FORMAT_VERSION = 1


def load_run_report(run_dir: str | Path) -> dict:
    """A finished run's report.json. Raises PeftlabError when the folder has none, when it is
    not JSON, or when a newer peftlab wrote it in a format this one does not know."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise PeftlabError(f"{run_dir} has no report.json: give finished run folders (e.g. runs/<name>)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PeftlabError(f"{path} is not valid JSON: rerun that experiment") from None
    version = report.get("format_version", 0)
    if version > REPORT_FORMAT_VERSION:
        raise PeftlabError(
            f"{path} was written by a newer peftlab (report format {version}, "
            f"this one reads up to {REPORT_FORMAT_VERSION}): upgrade peftlab"
        )
    return report


LEADERBOARD_HEADER = ["run", "accuracy", "macro-F1", "trainable params", "adapter MB", "train s", "samples/s"]


def leaderboard_rows(reports: list[dict]) -> list[list[str]]:
    """One row per run (LEADERBOARD_HEADER's columns), best macro-F1 first."""
    rows = []
    for r in sorted(reports, key=lambda r: -r["finetuned"]["macro_f1"]):
        tuned, train = r["finetuned"], r["train"]
        rows.append(
            [
                r["name"],
                f"{tuned['accuracy']:.4f}",
                f"{tuned['macro_f1']:.4f}",
                f"{r['method']['trainable_params']:,}",
                f"{r['adapter']['size_bytes'] / 1e6:.2f}",
                f"{train['train_seconds']:.1f}",
                f"{train['train_samples_per_s']:.1f}",
            ]
        )
    return rows


def _settings_without_seed(report: dict) -> str:
    """The run's config minus what does not change the experiment (seed, name, folders)."""
    cfg = json.loads(json.dumps(report["config"]))
    for key in ("name", "output_dir", "overwrite", "data_dir"):
        cfg.pop(key, None)
    cfg.get("train", {}).pop("seed", None)
    return json.dumps(cfg, sort_keys=True)


SEED_HEADER = ["runs (seeds)", "n", "accuracy mean ± std", "macro-F1 mean ± std"]


def seed_summary_rows(reports: list[dict]) -> list[list[str]]:
    """Mean and spread (sample std) over seeds, for each group of runs whose settings are
    otherwise equal and that has more than one run; best mean macro-F1 first."""
    groups: dict[str, list[dict]] = {}
    for r in reports:
        groups.setdefault(_settings_without_seed(r), []).append(r)
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        acc = np.array([m["finetuned"]["accuracy"] for m in members])
        f1 = np.array([m["finetuned"]["macro_f1"] for m in members])
        seeds = ",".join(str(m["config"]["train"]["seed"]) for m in members)
        rows.append(
            (
                f1.mean(),
                [
                    f"{members[0]['name']} … (seeds {seeds})",
                    str(len(members)),
                    f"{acc.mean():.4f} ± {acc.std(ddof=1):.4f}",
                    f"{f1.mean():.4f} ± {f1.std(ddof=1):.4f}",
                ],
            )
        )
    return [row for _, row in sorted(rows, key=lambda x: -x[0])]


def leaderboard_text(reports: list[dict]) -> str:
    """The leaderboard for the console, with the over-seeds table when there is one."""
    out = text_table(LEADERBOARD_HEADER, leaderboard_rows(reports))
    seeds = seed_summary_rows(reports)
    if seeds:
        out += "\n\nover seeds (otherwise equal settings):\n" + text_table(SEED_HEADER, seeds)
    return out


def leaderboard_markdown(reports: list[dict]) -> str:
    """leaderboard.md: the runs, then the over-seeds table when there is one."""
    out = [
        "# peftlab leaderboard",
        "",
        "Sorted by macro-F1 on each run's test split.",
        "",
        *markdown_table(LEADERBOARD_HEADER, leaderboard_rows(reports)),
    ]
    seeds = seed_summary_rows(reports)
    if seeds:
        out += ["", "## Over seeds (otherwise equal settings)", "", *markdown_table(SEED_HEADER, seeds)]
    return "\n".join(out) + "\n"


def leaderboard_html(reports: list[dict]) -> str:
    """leaderboard.html: the same tables as leaderboard.md, as one self-contained page."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>peftlab leaderboard</title>',
        f"<style>{PAGE_CSS}</style></head><body>",
        "<h1>peftlab leaderboard</h1>",
        "<p>Sorted by macro-F1 on each run's test split.</p>",
        html_table(LEADERBOARD_HEADER, leaderboard_rows(reports), table_id="leaderboard"),
    ]
    seeds = seed_summary_rows(reports)
    if seeds:
        out += ["<h2>Over seeds (otherwise equal settings)</h2>", html_table(SEED_HEADER, seeds)]
    return "\n".join([*out, "</body></html>", ""])


def write_leaderboard(reports: list[dict], prefix: str | Path) -> tuple[Path, Path]:
    """Write PREFIX.md and PREFIX.html; returns their paths."""
    from peftlab.files import write_text_atomic

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, page = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".html")
    write_text_atomic(md, leaderboard_markdown(reports))
    write_text_atomic(page, leaderboard_html(reports))
    return md, page
