"""Predictions and metrics.

Both engines produce logits in the dataset's original order; the metrics are then computed
here from those logits, so the two engines can only differ through the logits themselves.
"""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.data import LengthGroupedBatchSampler, PadCollator, TokenizedDataset

log = logging.getLogger("peftlab")


def autocast(device: torch.device, precision: str):
    """Autocast context for 'bf16'/'fp16'; a no-op for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_logits(model, dataset: TokenizedDataset, collator: PadCollator, batch_size: int,
                   precision: str = "fp32", desc: str = "eval") -> np.ndarray:
    """Logits (float32, shape [n, num_labels]) in dataset order.

    Batches are formed longest-first so each is padded only to its own longest text.
    """
    import torch.distributed as dist

    from peftlab.train import gather_objects

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=False))
    # Under several processes each evaluates every N-th batch and the logits are gathered:
    # every example is counted exactly once, with no padding of the last shard.
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        batches = batches[dist.get_rank()::dist.get_world_size()]
    out = np.zeros((len(dataset), model.config.num_labels), dtype=np.float32)
    start = time.perf_counter()
    with autocast(device, precision):
        for indices in tqdm(batches, desc=desc, leave=False, disable=None):
            batch = collator([dataset[i] for i in indices])
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out[indices] = logits.float().cpu().numpy()
    if distributed:
        mine = [i for b in batches for i in b]
        for indices, logits in gather_objects((mine, out[mine])):
            out[indices] = logits
    elapsed = time.perf_counter() - start
    log.debug("%s: %d examples in %.1fs", desc, len(dataset), elapsed)
    model.train(was_training)
    return out


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
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": int((labels == c).sum())}
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


def evaluate(model, dataset: TokenizedDataset, collator: PadCollator, label_names: list[str],
             batch_size: int, precision: str = "fp32", desc: str = "eval") -> tuple[dict, np.ndarray]:
    """Metrics and logits of `model` on a labelled dataset (native engine)."""
    start = time.perf_counter()
    logits = predict_logits(model, dataset, collator, batch_size, precision, desc)
    metrics = compute_metrics(logits, dataset.labels, label_names)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_samples_per_s"] = len(dataset) / max(metrics["eval_seconds"], 1e-9)
    return metrics, logits
