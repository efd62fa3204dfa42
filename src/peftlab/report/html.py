"""report.html: one self-contained page per run, with the plots inline, and the numbers
only the page shows (binary curves, confident mistakes, cost)."""

from __future__ import annotations

import base64
import html as _html
import logging
from pathlib import Path

import numpy as np

from peftlab.metrics import read_metrics_log
from peftlab.report import plots
from peftlab.report.tables import PAGE_CSS, html_table
from peftlab.report.text import COMPARISON_HEADER, comparison_rows, data_quality_lines

log = logging.getLogger("peftlab")


def binary_curves(positive_probs: np.ndarray, labels: np.ndarray) -> dict:
    """Precision-recall and ROC curves of a binary classifier, from P(class 1) per example.

    Thresholds are every distinct score, highest first; returns lists (JSON-ready) plus
    average precision (step-wise, as scikit-learn) and ROC AUC (trapezoidal)."""
    scores = np.asarray(positive_probs, dtype=np.float64)
    labels = np.asarray(labels) == 1
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # Cut only where the score changes, so tied examples enter together.
    cut = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(labels)[cut]
    fp = (cut + 1) - tp
    positives, negatives = labels.sum(), (~labels).sum()
    precision = tp / (tp + fp)
    recall = tp / positives if positives else np.zeros_like(tp, dtype=float)
    tpr = np.r_[0.0, recall]
    fpr = np.r_[0.0, fp / negatives if negatives else np.zeros_like(fp, dtype=float)]
    average_precision = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {
        "precision": np.r_[1.0, precision].tolist(),
        "recall": np.r_[0.0, recall].tolist(),
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "average_precision": average_precision,
        "roc_auc": float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr)),
    }


def confident_mistakes(texts: list[str], labels, probs: np.ndarray, label_names: list[str], k: int = 10) -> list[dict]:
    """The `k` wrong predictions the model was surest of: text, true and predicted label,
    and the predicted label's probability, most confident first."""
    labels = np.asarray(labels)
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:k]
    return [
        {
            "text": texts[i] if len(texts[i]) <= 300 else texts[i][:297] + "...",
            "true": label_names[labels[i]],
            "predicted": label_names[preds[i]],
            "probability": float(probs[i, preds[i]]),
        }
        for i in wrong
    ]


def report_extras(report: dict, logits: dict[str, np.ndarray | None], texts: list[str], labels) -> dict:
    """What report.html shows beyond report.json's metrics, computed from the test logits
    (title -> logits, None where unavailable): binary curves and confident mistakes."""
    from peftlab.metrics import softmax

    names = report["label_names"]
    probs = {title: softmax(v) for title, v in logits.items() if v is not None and len(v)}
    extras: dict = {"curves": {}, "mistakes": []}
    if len(names) == 2:
        extras["curves"] = {title: binary_curves(p[:, 1], labels) for title, p in probs.items()}
    if "fine-tuned" in probs:
        extras["mistakes"] = confident_mistakes(texts, labels, probs["fine-tuned"], names)
    return extras


def _measured(report: dict) -> dict[str, dict]:
    """Title -> metrics of each model the run measured: baseline (when it ran), fine-tuned."""
    return {
        title: report[key] for title, key in (("baseline", "baseline"), ("fine-tuned", "finetuned")) if report.get(key)
    }


def render_plots(report: dict, extras: dict, train_log: list[dict], val_log: list[dict]) -> dict[str, bytes]:
    """PNG bytes per plot name; empty when matplotlib is not installed (the caller says so)."""
    if not plots.matplotlib_available():
        return {}
    out = {}
    if train_log:
        out["training_curves"] = plots.training_curves(train_log, val_log)
    models = _measured(report)
    out["confusion_matrices"] = plots.confusion_matrices(
        {title: m["confusion_matrix"] for title, m in models.items()}, report["label_names"]
    )
    out["per_class_f1"] = plots.per_class_f1({title: m["per_class"] for title, m in models.items()})
    if extras["curves"]:
        out["pr_roc_curves"] = plots.binary_curves(extras["curves"])
    return out


def cost_rows(report: dict) -> list[list[str]]:
    """Trainable parameters, adapter size, times, throughput and peak memory."""
    method, train, res = report["method"], report["train"], report.get("resources", {})
    rows = [
        [
            "trainable parameters",
            f"{method['trainable_params']:,} of {method['total_params']:,} "
            f"({100 * method['trainable_params'] / method['total_params']:.2f}%)",
        ],
        ["adapter size on disk", f"{report['adapter']['size_bytes'] / 1e6:.2f} MB"],
        ["train time", f"{train['train_seconds']:.1f} s ({train['steps']} steps)"],
        ["training throughput", f"{train['train_samples_per_s']:.1f} samples/s"],
    ]
    if "wall_seconds" in res:
        rows.append(["wall time (whole run)", f"{res['wall_seconds']:.1f} s"])
    if "peak_rss_mb" in res:
        rows.append(["peak memory (process RSS)", f"{res['peak_rss_mb']:.0f} MB"])
    if res.get("peak_gpu_mb"):
        rows.append(["peak GPU memory (allocated)", f"{res['peak_gpu_mb']:.0f} MB"])
    return rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n:,}" for name, n in counts.items())


def _data_rows(data: dict) -> list[list[str]]:
    """The Data table: source, split, label counts, quality notes (Markdown stripped), fingerprint."""
    rows = [
        ["source", f"{data['source']} ({data['rows_read']:,} rows read)"],
        ["split", data["split"]],
        ["train labels", _counts(data["train_label_counts"])],
        ["test labels", _counts(data["test_label_counts"])],
    ]
    rows += [["quality", line.lstrip("- ").replace("**", "")] for line in data_quality_lines(data)]
    rows.append(["fingerprint", data["fingerprint"]])
    return rows


def _confusion_tables(report: dict) -> list[str]:
    """The confusion matrices as tables, for a page that has no plot to show them."""
    names, out = report["label_names"], []
    for title, metrics in _measured(report).items():
        out += [
            f"<h3>{title}</h3>",
            html_table(
                ["true \\ predicted", *names], [[n, *row] for n, row in zip(names, metrics["confusion_matrix"])]
            ),
        ]
    return out


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    """The plot `name` as an inline PNG, or nothing when it was not drawn."""
    if name not in images:
        return ""
    src = "data:image/png;base64," + base64.b64encode(images[name]).decode("ascii")
    return f'<img id="plot-{name}" alt="{_html.escape(alt)}" src="{src}">'


def _results_sections(report: dict, extras: dict, images: dict[str, bytes]) -> list[str]:
    """The page's middle: confusion matrices, per-class F1, binary curves, confident mistakes."""
    out = [
        "<h2>Confusion matrices</h2>",
        '<p class="note">Rows: true label; columns: predicted.</p>',
        _img(images, "confusion_matrices", "confusion matrices"),
    ]
    if not images:
        out += _confusion_tables(report)
    out += ["<h2>Per-class F1</h2>", _img(images, "per_class_f1", "F1 per class")]
    if extras["curves"]:
        out += [
            "<h2>Precision-recall and ROC</h2>",
            _img(images, "pr_roc_curves", "precision-recall and ROC curves"),
            html_table(
                ["model", "average precision", "ROC AUC"],
                [[t, f"{c['average_precision']:.4f}", f"{c['roc_auc']:.4f}"] for t, c in extras["curves"].items()],
            ),
        ]
    out.append("<h2>Most confident mistakes (fine-tuned)</h2>")
    if extras["mistakes"]:
        out.append(
            html_table(
                ["text", "true", "predicted", "probability"],
                [[m["text"], m["true"], m["predicted"], f"{m['probability']:.3f}"] for m in extras["mistakes"]],
                numeric_from=3,
            )
        )
    else:
        out.append('<p class="note">None: every test example was classified correctly.</p>')
    return out


def report_page(report: dict, extras: dict, images: dict[str, bytes]) -> str:
    """report.html's text: one file with everything inline (plots as base64 PNG, CSS in
    <style>, no scripts), so it opens from disk with no network."""
    cfg, data = report["config"], report["data"]
    esc = _html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>peftlab run {esc(report['name'])}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>peftlab run <code>{esc(report['name'])}</code></h1>",
        f"<p>{esc(cfg['method']['name'])} fine-tuning of <b>{esc(cfg['model']['name'])}</b> on "
        f"<b>{esc(str(data['dataset']))}</b> ({data['train_size']:,} train / {data['test_size']:,} test), "
        f"{esc(report['train']['engine'])} engine, {esc(report['train']['precision'])}; "
        f"finished {esc(report['finished'])}.</p>",
    ]
    if not images:
        out.append('<p class="note">No plots: matplotlib is not installed (pip install "peftlab[report]").</p>')
    out += [
        "<h2>Baseline vs fine-tuned</h2>",
        html_table(COMPARISON_HEADER, comparison_rows(report), table_id="comparison"),
    ]
    if "training_curves" in images:
        out += ["<h2>Training</h2>", _img(images, "training_curves", "training loss and learning rate")]
    out += _results_sections(report, extras, images)
    out += ["<h2>Cost</h2>", html_table(["", "value"], cost_rows(report))]
    out += ["<h2>Data</h2>", html_table(["", "value"], _data_rows(data), numeric_from=99)]
    out += [
        f'<p class="note">Adapter: <code>{esc(report["adapter"]["dir"])}</code>. '
        "Full details in report.json beside this file.</p>",
        "</body></html>",
        "",
    ]
    return "\n".join(out)


def write_html_report(
    report: dict, run_dir: Path, logits: dict[str, np.ndarray | None], texts: list[str], labels
) -> Path:
    """Write run_dir/report.html and the plots as run_dir/plots/*.png; returns the HTML path.

    `logits` maps "baseline" / "fine-tuned" to test logits (None where not kept, e.g. a
    resumed run's baseline). Without matplotlib the page is written without plots."""
    from peftlab.files import write_text_atomic

    extras = report_extras(report, logits, texts, labels)
    train_log, val_log = read_metrics_log(run_dir / "metrics.jsonl")
    images = render_plots(report, extras, train_log, val_log)
    if images:
        (run_dir / "plots").mkdir(exist_ok=True)
        for name, png in images.items():
            (run_dir / "plots" / f"{name}.png").write_bytes(png)
    else:
        log.warning('matplotlib is not installed: report.html has no plots (pip install "peftlab[report]")')
    path = run_dir / "report.html"
    # Non-ASCII (e.g. in the mistakes' texts) as character references: the file is then
    # correct whatever encoding the locale would write it in.
    write_text_atomic(path, report_page(report, extras, images).encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path
