"""What a tune (`peftlab tune`) writes for people to read: the trials table for the console,
leaderboard.md, and report.html with the optimisation history, the validation rounds (where
pruned trials stop) and the parameter importances, plus tune.json for programs.

The tune's results arrive as a `TuneSummary`; this module only presents them.
"""

from __future__ import annotations

import dataclasses
import html as _html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.report import plots
from peftlab.report.html import _img
from peftlab.report.tables import PAGE_CSS, html_table, markdown_table, text_table

log = logging.getLogger("peftlab")

# tune.json's layout; a reader refuses a newer one.
TUNE_FORMAT_VERSION = 1


@dataclass
class TrialRecord:
    """One trial of the study, whatever became of it."""

    number: int
    state: str  # complete, pruned, failed, running or waiting
    value: float | None  # validation score: final (complete) or the last round's (pruned)
    params: dict[str, Any]
    curve: list[float] = field(default_factory=list)  # the validation score at each round
    seconds: float | None = None  # wall time, start to end
    lr: float | None = None  # the learning rate the trial trained at (after lr_factor)
    run_dir: str | None = None
    note: str = ""  # base config, retry of trial N, the error, where it was pruned


@dataclass
class TuneSummary:
    """A tune's state after this worker's trials: every trial, the best, and its test scores."""

    name: str
    tune_dir: str
    storage: str  # the study's URL, password hidden
    metric: str  # the validation metric trials are selected on
    direction: str  # maximize or minimize
    trials: list[TrialRecord]
    best: int | None  # the best complete trial's number
    dataset: str
    model: str
    validation_size: int  # examples in the validation split
    test_size: int
    validation_note: str = ""  # set when peftlab tune made the validation split
    base_trial: int | None = None  # the trial with the base config's own settings
    best_test: dict | None = None  # the best trial's metrics on the test split (evaluated once)
    baseline_test: dict | None = None  # the pretrained model (untrained head) on the test split
    test_note: str = ""  # why best_test is missing, or what it measured (a refit)
    importances: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""  # over how many trials they are, or why they are missing
    finished: str = ""

    def trial(self, number: int | None) -> TrialRecord | None:
        return next((t for t in self.trials if t.number == number), None)

    def counts(self) -> dict[str, int]:
        """Trials per state, in a fixed order."""
        states = ("complete", "pruned", "failed", "running", "waiting")
        return {s: sum(t.state == s for t in self.trials) for s in states}


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "default" if value is None else str(value)


def _params(record: TrialRecord) -> str:
    """The trial's settings, each by its field name (`method` for method.name)."""
    short = {"method.name": "method", "model.name": "model", "data.dataset": "dataset"}
    return ", ".join(f"{short.get(k, k.split('.')[-1])}={_param(v)}" for k, v in record.params.items())


TRIALS_HEADER = ["trial", "state", "validation", "rounds", "lr", "seconds", "settings", "note"]


def trial_rows(summary: TuneSummary) -> list[list[str]]:
    """Every trial: complete ones best first, then pruned (best last score first), then the rest."""
    sign = -1 if summary.direction == "maximize" else 1
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "failed": 4}

    def key(t: TrialRecord):
        return (order.get(t.state, 5), sign * t.value if t.value is not None else 0.0, t.number)

    return [
        [
            str(t.number) + (" (best)" if t.number == summary.best else ""),
            t.state,
            _value(t.value),
            str(len(t.curve)),
            "-" if t.lr is None else f"{t.lr:.3g}",
            "-" if t.seconds is None else f"{t.seconds:.0f}",
            _params(t),
            t.note,
        ]
        for t in sorted(summary.trials, key=key)
    ]


def _counts_line(summary: TuneSummary) -> str:
    return ", ".join(f"{n} {state}" for state, n in summary.counts().items() if n)


COMPARISON_HEADER = ["", "loss", "accuracy", "macro-F1"]


def comparison_rows(summary: TuneSummary) -> list[list[str]]:
    """The pretrained baseline and the best trial on the test split, and the change."""
    rows = []
    base, best = summary.baseline_test, summary.best_test
    if base:
        rows.append(
            ["pretrained baseline (untrained head)", *(_value(base[k]) for k in ("loss", "accuracy", "macro_f1"))]
        )
    if best:
        rows.append([f"best trial ({summary.best})", *(_value(best[k]) for k in ("loss", "accuracy", "macro_f1"))])
    if base and best:
        rows.append(["change", *(f"{best[k] - base[k]:+.4f}" for k in ("loss", "accuracy", "macro_f1"))])
    return rows


def validation_rows(summary: TuneSummary) -> list[list[str]]:
    """The base config's own trial and the best trial on the validation split (what selected)."""
    rows = []
    base, best = summary.trial(summary.base_trial), summary.trial(summary.best)
    if base is not None:
        rows.append([f"base config (trial {base.number}, {base.state})", _value(base.value)])
    if best is not None:
        rows.append([f"best trial ({best.number})", _value(best.value)])
    return rows


def _selection_note(summary: TuneSummary) -> str:
    note = (
        f"Trials were selected on the validation split only ({summary.validation_size:,} examples, "
        f"validation {summary.metric}); the test split ({summary.test_size:,} examples) was evaluated "
        f"once, for the best trial, at the end."
    )
    return note + (f" {summary.validation_note}" if summary.validation_note else "")


def tune_text(summary: TuneSummary) -> str:
    """The console summary: the trials, the best one, and its test scores against the baseline."""
    out = [
        f"tune {summary.name}: {_counts_line(summary) or 'no trials'}",
        "",
        text_table(TRIALS_HEADER[:-1], [row[:-1] for row in trial_rows(summary)]),
        "",
    ]
    best = summary.trial(summary.best)
    if best is None:
        out.append("no complete trial yet: nothing to compare")
        return "\n".join(out)
    out += [
        f"best: trial {best.number}, validation {summary.metric} {best.value:.4f}: {_params(best)}",
        _selection_note(summary),
    ]
    rows = comparison_rows(summary)
    if rows:
        out += ["", "on the test split:", text_table(COMPARISON_HEADER, rows)]
    if summary.test_note:
        out.append(summary.test_note)
    return "\n".join(out)


def tune_markdown(summary: TuneSummary) -> str:
    """leaderboard.md: every trial, then the best against the baseline."""
    out = [
        f"# peftlab tune `{summary.name}`",
        "",
        f"{summary.model} on {summary.dataset}; {_counts_line(summary) or 'no trials'}; study in "
        f"`{summary.storage}`. {_selection_note(summary)}",
        "",
        *markdown_table(TRIALS_HEADER, trial_rows(summary)),
    ]
    if summary.best is not None:
        out += [
            "",
            "## Best trial against the baseline (test split)",
            "",
            *markdown_table(COMPARISON_HEADER, comparison_rows(summary)),
        ]
        out += [
            "",
            "## Validation (what selected)",
            "",
            *markdown_table(["", summary.metric], validation_rows(summary)),
        ]
    if summary.test_note:
        out += ["", summary.test_note]
    return "\n".join(out) + "\n"


def render_plots(summary: TuneSummary) -> dict[str, bytes]:
    """PNG bytes per plot name; empty without matplotlib or before any trial reported."""
    if not plots.matplotlib_available() or not any(t.curve or t.value is not None for t in summary.trials):
        return {}
    out = {"history": history_plot(summary), "rounds": rounds_plot(summary)}
    if summary.importances:
        out["importances"] = importance_plot(summary.importances)
    return out


def history_plot(summary: TuneSummary) -> bytes:
    """Each trial's validation score by trial number (pruned: its last round's), and the best so far."""
    fig = plots._new_figure(6.5, 3.6)
    ax = fig.subplots()
    for state, style in (("complete", dict(marker="o", color="tab:blue")), ("pruned", dict(marker="x", color="grey"))):
        shown = [t for t in summary.trials if t.state == state and t.value is not None]
        ax.scatter([t.number for t in shown], [t.value for t in shown], label=state, **style)
    complete = sorted((t for t in summary.trials if t.state == "complete"), key=lambda t: t.number)
    if complete:
        pick = max if summary.direction == "maximize" else min
        best_so_far = [pick(t.value for t in complete[: i + 1]) for i in range(len(complete))]
        ax.step([t.number for t in complete], best_so_far, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel=f"validation {summary.metric}", title="Optimisation history")
    ax.legend()
    return plots._png(fig)


def rounds_plot(summary: TuneSummary) -> bytes:
    """Each trial's validation score at every round: pruned trials end early."""
    fig = plots._new_figure(6.5, 3.6)
    ax = fig.subplots()
    for t in summary.trials:
        if not t.curve:
            continue
        rounds = range(1, len(t.curve) + 1)
        if t.state == "pruned":
            ax.plot(rounds, t.curve, "x-", color="grey", alpha=0.7, linewidth=1)
        else:
            ax.plot(rounds, t.curve, "-", color="tab:red" if t.number == summary.best else "tab:blue", alpha=0.6)
    ax.plot([], [], "x-", color="grey", label="pruned")
    ax.plot([], [], "-", color="tab:blue", label="complete")
    ax.plot([], [], "-", color="tab:red", label="best")
    ax.set(xlabel="validation round", ylabel=f"validation {summary.metric}", title="Trials by validation round")
    ax.legend()
    return plots._png(fig)


def importance_plot(importances: dict[str, float]) -> bytes:
    """Horizontal bars: each searched setting's share of the variation in the score."""
    names = list(importances)[::-1]
    fig = plots._new_figure(6.5, 0.5 + 0.4 * len(names))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (share of the score's variation)", title="Parameter importances")
    return plots._png(fig)


def tune_page(summary: TuneSummary, images: dict[str, bytes]) -> str:
    """report.html's text: one self-contained page (plots inline, no scripts)."""
    esc = _html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>peftlab tune {esc(summary.name)}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>peftlab tune <code>{esc(summary.name)}</code></h1>",
        f"<p><b>{esc(summary.model)}</b> on <b>{esc(summary.dataset)}</b>: {esc(_counts_line(summary) or 'no trials')}; "
        f"study in <code>{esc(summary.storage)}</code>; written {esc(summary.finished)}.</p>",
        f'<p class="note">{esc(_selection_note(summary))}</p>',
    ]
    if not images:
        out.append('<p class="note">No plots: matplotlib is not installed (pip install "peftlab[report]").</p>')
    if summary.best is not None:
        out += [
            "<h2>Best trial against the baseline (test split)</h2>",
            html_table(COMPARISON_HEADER, comparison_rows(summary), table_id="comparison"),
            f'<p class="note">{esc(summary.test_note)}</p>' if summary.test_note else "",
            "<h2>Validation (what selected)</h2>",
            html_table(["", summary.metric], validation_rows(summary)),
            f"<p>Best settings: <code>{esc(_params(summary.trial(summary.best)))}</code></p>",
        ]
    out += ["<h2>Optimisation history</h2>", _img(images, "history", "validation score by trial")]
    out += ["<h2>Validation rounds</h2>", _img(images, "rounds", "validation score by round per trial")]
    out.append("<h2>Parameter importances</h2>")
    if summary.importances:
        out += [
            f'<p class="note">Each setting\'s share of the variation in the validation score, {esc(summary.importance_note)}.</p>',
            _img(images, "importances", "parameter importances"),
            html_table(["setting", "importance"], [[k, f"{v:.3f}"] for k, v in summary.importances.items()]),
        ]
    else:
        out.append(f'<p class="note">Not computed: {esc(summary.importance_note)}</p>')
    out += [
        "<h2>Trials</h2>",
        html_table(TRIALS_HEADER, trial_rows(summary), table_id="trials"),
        '<p class="note">Each trial is a run folder beside this page (trial-NNNN); full details in tune.json.</p>',
        "</body></html>",
        "",
    ]
    return "\n".join(out)


def write_tune_report(summary: TuneSummary, tune_dir: Path) -> dict[str, Path]:
    """Write leaderboard.md, report.html (+ plots/*.png) and tune.json into `tune_dir`."""
    from peftlab.files import write_json_atomic, write_text_atomic

    images = render_plots(summary)
    if images:
        (tune_dir / "plots").mkdir(exist_ok=True)
        for name, png in images.items():
            (tune_dir / "plots" / f"{name}.png").write_bytes(png)
    elif not plots.matplotlib_available():
        log.warning('matplotlib is not installed: the tune report has no plots (pip install "peftlab[report]")')
    paths = {
        "leaderboard": tune_dir / "leaderboard.md",
        "report": tune_dir / "report.html",
        "json": tune_dir / "tune.json",
    }
    write_text_atomic(paths["leaderboard"], tune_markdown(summary))
    page = tune_page(summary, images).encode("ascii", "xmlcharrefreplace").decode("ascii")
    write_text_atomic(paths["report"], page)
    write_json_atomic(paths["json"], {"format_version": TUNE_FORMAT_VERSION, **dataclasses.asdict(summary)})
    return paths
