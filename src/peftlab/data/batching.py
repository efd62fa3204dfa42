"""Batching: padding to the batch's longest, and batches of similar-length examples.

Similar lengths per batch spend little compute on padding; stratified batches also keep
each batch's class mix near the whole set's (see `LengthGroupedBatchSampler`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class PadCollator:
    """Pad a list of examples to the batch's longest, rounded up to a multiple of 8.

    Multiples of 8 keep matrix shapes friendly to vector units and tensor cores while
    wasting at most 7 positions per row.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", multiple: int = 8):
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.multiple = multiple

    def __call__(self, examples: list[dict]) -> dict:
        longest = max(len(e["input_ids"]) for e in examples)
        width = -(-longest // self.multiple) * self.multiple

        def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
            out = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, row in enumerate(rows):
                span = slice(0, len(row)) if self.padding_side == "right" else slice(width - len(row), width)
                out[i, span] = torch.as_tensor(row, dtype=torch.long)
            return out

        batch = {
            "input_ids": pad([e["input_ids"] for e in examples], self.pad_token_id),
            "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
        }
        if "token_type_ids" in examples[0]:  # sentence pairs; padding is segment 0, as in transformers
            batch["token_type_ids"] = pad([e["token_type_ids"] for e in examples], 0)
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, so little compute is spent on padding.

    Training (`shuffle=True`): each epoch the examples are shuffled, cut into windows of
    `window` batches, sorted by length inside each window, batched, and the batches
    shuffled: similar lengths per batch while the order stays random (`window=1`: plain
    random batches). Evaluation (`shuffle=False`): batches in order of decreasing length.
    Call `set_epoch` each epoch; set `skip` to drop the epoch's first batches when resuming
    mid-epoch.

    With `labels` (stratified), a window is sorted by each example's length rank *within
    its class* instead: every batch then holds the classes in about their overall
    proportions, each of similar length for its class. Where length predicts the label
    (SMS spam is long), plain grouping makes batches of one class; in a short run those
    can stall training at the majority class.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        window: int = 50,
        labels: Sequence[int] | None = None,
    ):
        self.labels = None if labels is None else np.asarray(labels)
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.window = window
        self.epoch = 0
        self.skip = 0
        self.drop_last = False  # read by accelerate when it shards batches across processes

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order (accelerate's loaders call this at each new iterator)."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            chunk = chunk[np.argsort(-self._sort_key(chunk), kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        # At most one batch is short; keep it last, where multi-process sharding (accelerate's
        # BatchSamplerShard) expects it and fills it up instead of dropping it.
        short = [b for b in batches if len(b) < self.batch_size]
        return [b for b in batches if len(b) == self.batch_size] + short

    def _sort_key(self, chunk: np.ndarray) -> np.ndarray:
        """Length, or (stratified) length quantile within the example's class."""
        if self.labels is None:
            return self.lengths[chunk]
        key = np.empty(len(chunk))
        for label in np.unique(self.labels[chunk]):
            members = np.flatnonzero(self.labels[chunk] == label)
            ranks = np.argsort(np.argsort(self.lengths[chunk][members], kind="stable"), kind="stable")
            key[members] = (ranks + 0.5) / len(members)
        return key

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip :])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def label_skew(batches: list[list[int]], labels: Sequence[int]) -> float:
    """Mean distance (total variation) between each batch's label mix and the whole set's:
    0 when every batch has the overall proportions. Random batches of 16 from a 13%
    minority score about 0.1; length-grouped SMS spam batches about 0.2."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    return float(
        np.mean([0.5 * np.abs(np.array([(labels[b] == c).mean() for c in classes]) - overall).sum() for b in batches])
    )
