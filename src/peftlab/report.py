"""Reports: the comparison table printed at the end of a run, report.md / report.json,
the self-contained report.html with its plots, and the leaderboard over several runs."""

from __future__ import annotations

import base64
import html as _html
import json
import logging
from pathlib import Path

import numpy as np

from peftlab.errors import PeftlabError
from peftlab.metrics import read_metrics_log

log = logging.getLogger("peftlab")


def _fmt_delta(before: float | None, after: float) -> str:
    if before is None:
        return ""
    return f"{after - before:+.4f}"


def comparison_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """Rows of (measure, baseline, fine-tuned, change) for the console and Markdown tables."""
    base = report.get("baseline")
    tuned = report["finetuned"]
    rows = []
    for key, label in (("loss", "loss"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        b = base[key] if base else None
        rows.append((label, f"{b:.4f}" if b is not None else "-", f"{tuned[key]:.4f}", _fmt_delta(b, tuned[key])))
    for name, stats in tuned["per_class"].items():
        for key in ("precision", "recall", "f1"):
            b = base["per_class"][name][key] if base else None
            rows.append((f"{name}: {key}", f"{b:.4f}" if b is not None else "-",
                         f"{stats[key]:.4f}", _fmt_delta(b, stats[key])))
    method = report["method"]
    rows.append(("trainable parameters", "-",
                 f"{method['trainable_params']:,} ({100 * method['trainable_params'] / method['total_params']:.2f}%)", ""))
    rows.append(("adapter size on disk", "-", f"{report['adapter']['size_bytes'] / 1e6:.2f} MB", ""))
    train = report["train"]
    rows.append(("train time", "-", f"{train['train_seconds']:.1f} s ({train['train_samples_per_s']:.1f} samples/s)", ""))
    return rows


def console_table(report: dict) -> str:
    rows = [("", "baseline", "fine-tuned", "change")] + comparison_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _data_quality_lines(data: dict) -> list[str]:
    """Duplicates, train/test overlap and truncation, for the Data section (reports written
    before these facts existed simply lack the lines)."""
    out = []
    if data.get("duplicates_removed") is not None:
        conflicts = data.get("duplicate_label_conflicts") or 0
        out.append(f"- dedup: removed {data['duplicates_removed']:,} repeated texts before splitting"
                   + (f" ({conflicts:,} texts had conflicting labels; the first was kept)" if conflicts else ""))
    if "train_test_overlap" in data:
        overlap = data["train_test_overlap"]
        out.append(f"- duplicates: {data['duplicates_in_train']:,} repeated texts within train; "
                   + (f"**{overlap:,} test texts also in train** (scores may be optimistic)" if overlap
                      else "the test set does not overlap train"))
    if "truncated_train" in data:
        out.append(f"- truncation: {data['truncated_train']:,} train / {data['truncated_test']:,} test texts "
                   f"longer than {data['max_length']} tokens kept their {data['truncation']}")
    if data.get("rows_merged_or_dropped"):
        out.append(f"- **{data['rows_merged_or_dropped']:,} lines of the data file did not become rows of their "
                   f"own** (an unbalanced quote merged them into other rows): fix the file's quoting")
    if data.get("classes_missing_from_test"):
        out.append(f"- **classes with no test example: {', '.join(data['classes_missing_from_test'])}**; "
                   f"macro-F1 is over the classes present in the test labels")
    return out


def markdown(report: dict) -> str:
    """report.md: what ran, the comparison table, and the facts needed to trust it."""
    cfg = report["config"]
    data = report["data"]
    train = report["train"]
    out = [
        f"# peftlab run `{report['name']}`",
        "",
        f"{cfg['method']['name']} fine-tuning of **{cfg['model']['name']}** on **{data['dataset']}** "
        f"({data['train_size']:,} train / {data['test_size']:,} test examples), "
        f"{train['engine']} engine, {train['precision']}.",
        "",
        "| measure | baseline | fine-tuned | change |",
        "|---|---:|---:|---:|",
    ]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in comparison_rows(report)]
    check = report.get("reload_check")
    if check:
        out += ["", f"Reloaded adapter: predictions {'equal' if check['predictions_equal'] else 'DIFFER from'} "
                f"the in-memory model's (largest logit difference {check['max_abs_logit_diff']:.2e}); "
                f"accuracy after reload {report['reloaded']['accuracy']:.4f}."]
    out += [
        "",
        "## Data",
        "",
        f"- source: {data['source']} ({data['rows_read']:,} rows read)",
        f"- split: {data['split']}",
        f"- columns: text `{data['text_column']}`"
        + (f", second text `{data['text_pair_column']}`" if data.get("text_pair_column") else "")
        + f", label `{data['label_column']}`",
        f"- train labels: {data['train_label_counts']}",
        f"- test labels: {data['test_label_counts']}",
    ]
    out += _data_quality_lines(data)
    out += [
        f"- fingerprint: `{data['fingerprint']}`",
        "",
        "## Confusion matrices (rows: true, columns: predicted)",
        "",
    ]
    names = report["label_names"]
    for title, key in (("baseline", "baseline"), ("fine-tuned", "finetuned")):
        if not report.get(key):
            continue
        out += [f"{title}:", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, report[key]["confusion_matrix"]):
            out.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
        out.append("")
    out += [
        "## Training",
        "",
        f"- {train['steps']} steps ({train['epochs']:.2f} epochs) in {train['train_seconds']:.1f} s; "
        f"{train['train_samples_per_s']:.1f} samples/s, {train['train_tokens_per_s']:.0f} tokens/s",
        f"- final training loss: {train['final_loss']:.4f}",
        f"- adapter: `{report['adapter']['dir']}`",
        "",
    ]
    return "\n".join(out)


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


def confident_mistakes(texts: list[str], labels, probs: np.ndarray, label_names: list[str],
                       k: int = 10) -> list[dict]:
    """The `k` wrong predictions the model was surest of: text, true and predicted label,
    and the predicted label's probability, most confident first."""
    labels = np.asarray(labels)
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-probs[wrong, preds[wrong]], kind="stable")][:k]
    return [{"text": texts[i] if len(texts[i]) <= 300 else texts[i][:297] + "...",
             "true": label_names[labels[i]], "predicted": label_names[preds[i]],
             "probability": float(probs[i, preds[i]])} for i in wrong]


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


def render_plots(report: dict, extras: dict, train_log: list[dict], val_log: list[dict]) -> dict[str, bytes]:
    """PNG bytes per plot name; empty when matplotlib is not installed (the caller says so)."""
    from peftlab import plots

    if not plots.matplotlib_available():
        return {}
    out = {}
    if train_log:
        out["training_curves"] = plots.training_curves(train_log, val_log)
    models = {title: report[key] for title, key in (("baseline", "baseline"), ("fine-tuned", "finetuned"))
              if report.get(key)}
    out["confusion_matrices"] = plots.confusion_matrices(
        {title: m["confusion_matrix"] for title, m in models.items()}, report["label_names"])
    out["per_class_f1"] = plots.per_class_f1({title: m["per_class"] for title, m in models.items()})
    if extras["curves"]:
        out["pr_roc_curves"] = plots.binary_curves(extras["curves"])
    return out


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table; cells are escaped, columns from `numeric_from` on are right-aligned."""
    def cell(tag, i, v):
        cls = ' class="num"' if i >= numeric_from else ""
        return f"<{tag}{cls}>{_html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}.num{text-align:right}img{max-width:100%;display:block;margin:1em 0}
.note{color:#666}"""


def cost_rows(report: dict) -> list[list[str]]:
    """Trainable parameters, adapter size, times, throughput and peak memory."""
    method, train, res = report["method"], report["train"], report.get("resources", {})
    rows = [["trainable parameters", f"{method['trainable_params']:,} of {method['total_params']:,} "
             f"({100 * method['trainable_params'] / method['total_params']:.2f}%)"],
            ["adapter size on disk", f"{report['adapter']['size_bytes'] / 1e6:.2f} MB"],
            ["train time", f"{train['train_seconds']:.1f} s ({train['steps']} steps)"],
            ["training throughput", f"{train['train_samples_per_s']:.1f} samples/s"]]
    if "wall_seconds" in res:
        rows.append(["wall time (whole run)", f"{res['wall_seconds']:.1f} s"])
    if "peak_rss_mb" in res:
        rows.append(["peak memory (process RSS)", f"{res['peak_rss_mb']:.0f} MB"])
    if res.get("peak_gpu_mb"):
        rows.append(["peak GPU memory (allocated)", f"{res['peak_gpu_mb']:.0f} MB"])
    return rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name}: {n:,}" for name, n in counts.items())


def html(report: dict, extras: dict, images: dict[str, bytes]) -> str:
    """report.html: one file with everything inline (plots as base64 PNG, CSS in <style>,
    no scripts), so it opens from disk with no network."""
    cfg, data = report["config"], report["data"]
    esc = _html.escape

    def img(name: str, alt: str) -> str:
        if name not in images:
            return ""
        src = "data:image/png;base64," + base64.b64encode(images[name]).decode("ascii")
        return f'<img id="plot-{name}" alt="{esc(alt)}" src="{src}">'

    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>peftlab run {esc(report['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>peftlab run <code>{esc(report['name'])}</code></h1>",
        f"<p>{esc(cfg['method']['name'])} fine-tuning of <b>{esc(cfg['model']['name'])}</b> on "
        f"<b>{esc(str(data['dataset']))}</b> ({data['train_size']:,} train / {data['test_size']:,} test), "
        f"{esc(report['train']['engine'])} engine, {esc(report['train']['precision'])}; "
        f"finished {esc(report['finished'])}.</p>",
    ]
    if not images:
        out.append('<p class="note">No plots: matplotlib is not installed (pip install "peftlab[report]").</p>')
    out += ["<h2>Baseline vs fine-tuned</h2>",
            _table(["measure", "baseline", "fine-tuned", "change"], comparison_rows(report)).replace(
                "<table>", '<table id="comparison">', 1)]
    if "training_curves" in images:
        out += ["<h2>Training</h2>", img("training_curves", "training loss and learning rate")]
    out += ["<h2>Confusion matrices</h2>", '<p class="note">Rows: true label; columns: predicted.</p>',
            img("confusion_matrices", "confusion matrices")]
    if not images:
        names = report["label_names"]
        for title, key in (("baseline", "baseline"), ("fine-tuned", "finetuned")):
            if report.get(key):
                out += [f"<h3>{title}</h3>",
                        _table(["true \\ predicted", *names],
                               [[n, *row] for n, row in zip(names, report[key]["confusion_matrix"])])]
    out += ["<h2>Per-class F1</h2>", img("per_class_f1", "F1 per class")]
    if extras["curves"]:
        out += ["<h2>Precision-recall and ROC</h2>", img("pr_roc_curves", "precision-recall and ROC curves"),
                _table(["model", "average precision", "ROC AUC"],
                       [[t, f"{c['average_precision']:.4f}", f"{c['roc_auc']:.4f}"]
                        for t, c in extras["curves"].items()])]
    out.append("<h2>Most confident mistakes (fine-tuned)</h2>")
    if extras["mistakes"]:
        out.append(_table(["text", "true", "predicted", "probability"],
                          [[m["text"], m["true"], m["predicted"], f"{m['probability']:.3f}"]
                           for m in extras["mistakes"]], numeric_from=3))
    else:
        out.append('<p class="note">None: every test example was classified correctly.</p>')
    out += ["<h2>Cost</h2>", _table(["", "value"], cost_rows(report))]
    data_rows = [["source", f"{data['source']} ({data['rows_read']:,} rows read)"], ["split", data["split"]],
                 ["train labels", _counts(data["train_label_counts"])],
                 ["test labels", _counts(data["test_label_counts"])]]
    data_rows += [["quality", line.lstrip("- ").replace("**", "")] for line in _data_quality_lines(data)]
    data_rows.append(["fingerprint", data["fingerprint"]])
    out += ["<h2>Data</h2>", _table(["", "value"], data_rows, numeric_from=99)]
    out += [f"<p class=\"note\">Adapter: <code>{esc(report['adapter']['dir'])}</code>. "
            "Full details in report.json beside this file.</p>", "</body></html>", ""]
    return "\n".join(out)


def write_html_report(report: dict, run_dir: Path, logits: dict[str, np.ndarray | None], texts: list[str],
                      labels) -> Path:
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
        log.warning("matplotlib is not installed: report.html has no plots (pip install \"peftlab[report]\")")
    path = run_dir / "report.html"
    # Non-ASCII (e.g. in the mistakes' texts) as character references: the file is then
    # correct whatever encoding the locale would write it in.
    write_text_atomic(path, html(report, extras, images).encode("ascii", "xmlcharrefreplace").decode("ascii"))
    return path


def load_run_report(run_dir: str | Path) -> dict:
    """A finished run's report.json. Raises PeftlabError when the folder has none."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise PeftlabError(f"{run_dir} has no report.json: give finished run folders (e.g. runs/<name>)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PeftlabError(f"{path} is not valid JSON: rerun that experiment") from None


LEADERBOARD_HEADER = ["run", "accuracy", "macro-F1", "trainable params", "adapter MB", "train s", "samples/s"]


def leaderboard_rows(reports: list[dict]) -> list[list[str]]:
    """One row per run (LEADERBOARD_HEADER's columns), best macro-F1 first."""
    rows = []
    for r in sorted(reports, key=lambda r: -r["finetuned"]["macro_f1"]):
        tuned, train = r["finetuned"], r["train"]
        rows.append([r["name"], f"{tuned['accuracy']:.4f}", f"{tuned['macro_f1']:.4f}",
                     f"{r['method']['trainable_params']:,}", f"{r['adapter']['size_bytes'] / 1e6:.2f}",
                     f"{train['train_seconds']:.1f}", f"{train['train_samples_per_s']:.1f}"])
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
        rows.append((f1.mean(), [f"{members[0]['name']} … (seeds {seeds})", str(len(members)),
                                 f"{acc.mean():.4f} ± {acc.std(ddof=1):.4f}",
                                 f"{f1.mean():.4f} ± {f1.std(ddof=1):.4f}"]))
    return [row for _, row in sorted(rows, key=lambda x: -x[0])]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def leaderboard_text(reports: list[dict]) -> str:
    """The leaderboard for the console, with the over-seeds table when there is one."""
    out = _text_table(LEADERBOARD_HEADER, leaderboard_rows(reports))
    seeds = seed_summary_rows(reports)
    if seeds:
        out += "\n\nover seeds (otherwise equal settings):\n" + _text_table(SEED_HEADER, seeds)
    return out


def leaderboard_markdown(reports: list[dict]) -> str:
    out = ["# peftlab leaderboard", "", "Sorted by macro-F1 on each run's test split.", "",
           *_markdown_table(LEADERBOARD_HEADER, leaderboard_rows(reports))]
    seeds = seed_summary_rows(reports)
    if seeds:
        out += ["", "## Over seeds (otherwise equal settings)", "", *_markdown_table(SEED_HEADER, seeds)]
    return "\n".join(out) + "\n"


def leaderboard_html(reports: list[dict]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>peftlab leaderboard</title>',
           f"<style>{_CSS}</style></head><body>", "<h1>peftlab leaderboard</h1>",
           "<p>Sorted by macro-F1 on each run's test split.</p>",
           _table(LEADERBOARD_HEADER, leaderboard_rows(reports)).replace("<table>", '<table id="leaderboard">', 1)]
    seeds = seed_summary_rows(reports)
    if seeds:
        out += ["<h2>Over seeds (otherwise equal settings)</h2>", _table(SEED_HEADER, seeds)]
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


# What loads a method's artifact (MethodSpec.artifact), for the card's library_name: peft
# adapter files, a complete transformers model, or head.safetensors, which only peftlab reads.
CARD_LIBRARY = {"peft": "peft", "full": "transformers", "head": "peftlab"}


def model_card(report: dict) -> str:
    """README.md for the adapter folder, in the Hugging Face model-card convention: YAML front
    matter (library_name, base_model, tags, datasets, metrics), then what was trained on
    what, how well, and how to load it with peftlab and, where the artifact allows, with
    plain transformers/peft."""
    import yaml

    from peftlab.methods.registry import METHODS

    cfg, data = report["config"], report["data"]
    spec, base, names = METHODS[cfg["method"]["name"]], cfg["model"]["name"], report["label_names"]
    rows = [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in comparison_rows(report)
            if a in ("loss", "accuracy", "macro-F1") or ": f1" in a]
    out = [
        "---", yaml.safe_dump(_card_front_matter(report, spec), sort_keys=False).rstrip(), "---", "",
        f"# {report['name']}", "",
        f"A **{spec.name}** adapter for text classification into {len(names)} classes "
        f"({', '.join(f'`{n}`' for n in names)}), trained with peftlab on top of the base model below.", "",
        "## Base model", "", f"`{base}` ({report['model']['class']}, {report['model']['total_params']:,} parameters; "
        f"{report['method']['trainable_params']:,} trained).", "",
        "## Data", "",
        f"- dataset: `{data['dataset']}` from {data['source']}",
        f"- split: {data['split']} ({data['train_size']:,} train / {data['test_size']:,} test)",
        f"- train labels: {data['train_label_counts']}",
        f"- max length: {data.get('max_length', cfg['data']['max_length'])} tokens",
        f"- fingerprint: `{data['fingerprint']}`", "",
        "## Method", "", f"`{spec.name}`: {spec.description}.", "",
        "```yaml", yaml.safe_dump({"method": cfg["method"], "train": cfg["train"]}, sort_keys=False).rstrip(), "```",
        "",
        "## Metrics (test split)", "",
        "| measure | baseline | fine-tuned | change |", "|---|---:|---:|---:|", *rows, "",
        *_card_usage(spec, base, len(names)),
        f"Labels by class index: {dict(enumerate(names))}. Training details: `peftlab.json` in this folder.",
        "",
    ]
    return "\n".join(out)


def _card_front_matter(report: dict, spec) -> dict:
    """The model card's YAML header: what loads it, base model, tags, data and test metrics."""
    dataset, tuned = str(report["data"]["dataset"]), report["finetuned"]
    return {
        "library_name": CARD_LIBRARY[spec.artifact],
        "base_model": report["config"]["model"]["name"],
        "pipeline_tag": "text-classification",
        "tags": ["peftlab", "text-classification", spec.name],
        "datasets": [dataset],
        "metrics": ["accuracy", "f1"],
        "model-index": [{"name": report["name"], "results": [{
            "task": {"type": "text-classification"},
            "dataset": {"name": dataset, "type": dataset, "split": "test"},
            "metrics": [{"type": "accuracy", "value": round(tuned["accuracy"], 4)},
                        {"type": "f1", "name": "macro-F1", "value": round(tuned["macro_f1"], 4)}]}]}],
    }


def _card_usage(spec, base: str, num_labels: int) -> list[str]:
    """The card's "How to use" section: with peftlab, then as the artifact allows without it."""
    out = ["## How to use", "", "With peftlab:", "", "```python", "from peftlab import Predictor", "",
           'predict = Predictor("path/to/adapter")  # this folder', 'predict(["some text"])', "```", "",
           "```bash", "peftlab predict path/to/adapter \"some text\"", "```", ""]
    if spec.artifact == "head":
        return [*out, f"{spec.name} trains {spec.about}. `head.safetensors` in this folder holds those weights, not "
                      f"a complete model: load it with peftlab, which puts them on a fresh copy of `{base}`.", ""]
    if spec.artifact == "full":
        return [*out, "With plain transformers:", "", "```python",
                "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                'model = AutoModelForSequenceClassification.from_pretrained("path/to/adapter")  # this folder',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")', "```", ""]
    out += ["With plain transformers and peft:", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
            f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={num_labels})',
            'model = PeftModel.from_pretrained(base, "path/to/adapter")  # this folder',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", ""]
    if spec.past_key_values:
        out += ["On transformers 5 the base model must first take the learned prefixes as `past_key_values`: "
                "call `peftlab.methods.accept_past_key_values(base)` before `PeftModel.from_pretrained`, as "
                "peftlab's `Predictor` does.", ""]
    elif spec.family == "prompt":
        out += ["peftlab's `Predictor` also applies its pooling fix, `peftlab.methods.fix_prompt_pooling(model)`: "
                "without it, pooling reads a virtual token instead of [CLS] (encoders) or of the last real "
                "token (decoders), and predictions differ.", ""]
    return out
