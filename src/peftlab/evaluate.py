"""Predictions and metrics.

Both engines produce logits in the dataset's original order; the metrics are then computed
here from those logits, so the two engines can only differ through the logits themselves.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.data import LengthGroupedBatchSampler, PadCollator, TokenizedDataset
from peftlab.metrics import compute_metrics
from peftlab.runtime import autocast, gather_objects

log = logging.getLogger("peftlab")


@torch.inference_mode()
def predict_logits(model, dataset: TokenizedDataset, collator: PadCollator, batch_size: int,
                   precision: str = "fp32", desc: str = "eval") -> np.ndarray:
    """Logits (float32, shape [n, num_labels]) in dataset order.

    Batches are formed longest-first so each is padded only to its own longest text.
    """
    import torch.distributed as dist

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


def evaluate(model, dataset: TokenizedDataset, collator: PadCollator, label_names: list[str],
             batch_size: int, precision: str = "fp32", desc: str = "eval") -> tuple[dict, np.ndarray]:
    """Metrics and logits of `model` on a labelled dataset (native engine)."""
    start = time.perf_counter()
    logits = predict_logits(model, dataset, collator, batch_size, precision, desc)
    metrics = compute_metrics(logits, dataset.labels, label_names)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_samples_per_s"] = len(dataset) / max(metrics["eval_seconds"], 1e-9)
    return metrics, logits
