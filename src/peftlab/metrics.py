"""Metrics: from logits (loss, accuracy, macro-F1, per class, confusion) and the run's
training log, metrics.jsonl (one JSON object a line, written by both engines, read by the
report and the trackers). Below the engines and the report; numpy only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def compute_metrics(logits: np.ndarray, labels, label_names: list[str]) -> dict:
    """Loss, accuracy, macro-F1 and per-class precision/recall/F1/support from logits.

    Macro-F1 averages over the classes present in `labels` (`macro_f1_over` says how many):
    a class without examples has no recall, and counting its F1 as 0 would drag the mean
    down for a gap in the data, not an error of the model. `per_class` keeps every class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    # Cross-entropy in float64 from log-softmax, averaged over examples.
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    preds = logits.argmax(axis=1)
    per_class = {}
    for c, name in enumerate(label_names):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int((labels == c).sum())}
    present = [stats["f1"] for stats in per_class.values() if stats["support"]]
    confusion = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    return {
        "loss": loss,
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(np.mean(present)) if present else float("nan"),
        "macro_f1_over": f"classes present in the evaluated labels ({len(present)} of {len(label_names)})",
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "n": len(labels),
    }


def append_metrics_log(path: Path | None, entry: dict) -> None:
    """Add one entry to metrics.jsonl (`path` None: not logging)."""
    if path is not None:
        with open(path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")


def read_metrics_log(path: Path) -> tuple[list[dict], list[dict]]:
    """Training entries ({"step", "loss", "lr", ...}) and validation entries ({"step",
    "val_loss", ...}) from a run's metrics.jsonl; both empty when the file is absent."""
    train_log, val_log = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            if "loss" in entry and "lr" in entry:
                train_log.append(entry)
            elif "val_loss" in entry:
                val_log.append(entry)
    return train_log, val_log
