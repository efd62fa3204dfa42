"""The comparison table printed at the end of a run, and report.md."""

from __future__ import annotations

from peftlab.report.tables import markdown_table, text_table

COMPARISON_HEADER = ["measure", "baseline", "fine-tuned", "change"]


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
            rows.append(
                (f"{name}: {key}", f"{b:.4f}" if b is not None else "-", f"{stats[key]:.4f}", _fmt_delta(b, stats[key]))
            )
    method = report["method"]
    rows.append(
        (
            "trainable parameters",
            "-",
            f"{method['trainable_params']:,} ({100 * method['trainable_params'] / method['total_params']:.2f}%)",
            "",
        )
    )
    rows.append(("adapter size on disk", "-", f"{report['adapter']['size_bytes'] / 1e6:.2f} MB", ""))
    train = report["train"]
    rows.append(
        ("train time", "-", f"{train['train_seconds']:.1f} s ({train['train_samples_per_s']:.1f} samples/s)", "")
    )
    return rows


def console_table(report: dict) -> str:
    """The baseline vs fine-tuned table printed when a run finishes."""
    return text_table(["", *COMPARISON_HEADER[1:]], comparison_rows(report))


def data_quality_lines(data: dict) -> list[str]:
    """Duplicates, train/test overlap and truncation, for the Data section (reports written
    before these facts existed simply lack the lines)."""
    out = []
    if data.get("duplicates_removed") is not None:
        conflicts = data.get("duplicate_label_conflicts") or 0
        out.append(
            f"- dedup: removed {data['duplicates_removed']:,} repeated texts before splitting"
            + (f" ({conflicts:,} texts had conflicting labels; the first was kept)" if conflicts else "")
        )
    if "train_test_overlap" in data:
        overlap = data["train_test_overlap"]
        out.append(
            f"- duplicates: {data['duplicates_in_train']:,} repeated texts within train; "
            + (
                f"**{overlap:,} test texts also in train** (scores may be optimistic)"
                if overlap
                else "the test set does not overlap train"
            )
        )
    if "truncated_train" in data:
        out.append(
            f"- truncation: {data['truncated_train']:,} train / {data['truncated_test']:,} test texts "
            f"longer than {data['max_length']} tokens kept their {data['truncation']}"
        )
    if data.get("rows_merged_or_dropped"):
        out.append(
            f"- **{data['rows_merged_or_dropped']:,} lines of the data file did not become rows of their "
            f"own** (an unbalanced quote merged them into other rows): fix the file's quoting"
        )
    if data.get("classes_missing_from_test"):
        out.append(
            f"- **classes with no test example: {', '.join(data['classes_missing_from_test'])}**; "
            f"macro-F1 is over the classes present in the test labels"
        )
    return out


def _confusion_sections(report: dict) -> list[str]:
    """report.md's confusion matrices, baseline (when measured) then fine-tuned."""
    names = report["label_names"]
    out = []
    for title, key in (("baseline", "baseline"), ("fine-tuned", "finetuned")):
        if not report.get(key):
            continue
        out += [f"{title}:", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, report[key]["confusion_matrix"]):
            out.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
        out.append("")
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
        *markdown_table(COMPARISON_HEADER, comparison_rows(report)),
    ]
    check = report.get("reload_check")
    if check:
        out += [
            "",
            f"Reloaded adapter: predictions {'equal' if check['predictions_equal'] else 'DIFFER from'} "
            f"the in-memory model's (largest logit difference {check['max_abs_logit_diff']:.2e}); "
            f"accuracy after reload {report['reloaded']['accuracy']:.4f}.",
        ]
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
    out += data_quality_lines(data)
    out += [
        f"- fingerprint: `{data['fingerprint']}`",
        "",
        "## Confusion matrices (rows: true, columns: predicted)",
        "",
        *_confusion_sections(report),
        "## Training",
        "",
        f"- {train['steps']} steps ({train['epochs']:.2f} epochs) in {train['train_seconds']:.1f} s; "
        f"{train['train_samples_per_s']:.1f} samples/s, {train['train_tokens_per_s']:.0f} tokens/s",
        f"- final training loss: {train['final_loss']:.4f}",
        f"- adapter: `{report['adapter']['dir']}`",
        "",
    ]
    return "\n".join(out)
