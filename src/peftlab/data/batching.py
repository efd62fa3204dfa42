"""Batching: padding to the batch's longest, and batches of similar-length examples.

Similar lengths per batch spend little compute on padding; stratified batches also keep
each batch's class mix near the whole set's (see `LengthGroupedBatchSampler`).
"""

from __future__ import annotations

import math
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


def token_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices longest first, cut into batches of at most `budget` tokens each (a text
    longer than that alone): evaluation's packed rows. Rows of about one size let the
    matmul kernels a CPU builds per shape be built once, where batches of a fixed count of
    sorted texts make a new shape for every batch (a one-pass evaluation ran 1.12x faster)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, used = [], [], 0
    for i in order.tolist():
        if current and used + lengths[i] > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + [current] if current else batches


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


class PackCollator:
    """Padding-free batches: the batch's texts side by side in one row, in groups of similar length.

    The texts are sorted longest first and cut into a few groups (`groups`); inside a group
    each text takes a slot as wide as the group's longest, so the row holds the real tokens
    plus the little padding of ragged groups, and its tail is padded to a multiple of
    `multiple` (fewer distinct shapes for the matmul kernels to prepare). Every token-wise
    layer (the matmuls, norms, dropout) then works on about the real tokens of the batch,
    whatever its mix of lengths, and attention runs per group on its own [texts, width,
    width] block (`peftlab.runtime.peftlab_attention`): no token attends across texts, and
    none pays for a longer text's width. Positions restart at 0 for each text, and
    `sequence_ids` numbers the texts from 1 (0: padding). `group_sizes` holds each group's
    (texts, width). `pool_index` holds, in the order the examples were given (the order of
    `labels`), the flat index of each text's pooled token: its first for encoders
    (`[CLS]`), its last for decoders (`pool="last"`).
    """

    # A group's fixed cost (its own attention kernels in every layer), in token-cells: with
    # it a batch of 16 short texts makes one to three groups.
    GROUP_COST = 3000
    TOKEN_COST = 48  # a token's share of the token-wise layers, in attention cells

    def __init__(self, pad_token_id: int, pool: str = "first", multiple: int = 32, row_tokens: int | None = None):
        if pool not in ("first", "last"):
            raise ValueError(f"pool must be 'first' or 'last', not {pool!r}")
        self.pad_token_id = pad_token_id
        self.pool = pool
        self.multiple = multiple
        self.row_tokens = row_tokens  # pad every row to at least this (token_batches' rows: one shape)

    @classmethod
    def groups(cls, lengths: Sequence[int]) -> list[tuple[int, int]]:
        """Cut `lengths` (sorted longest first) into groups [(start, end)] that minimise
        what the batch costs: each text's slot (the group's longest) in the token-wise layers
        and in attention (its square), plus a fixed cost per group. Exact, by dynamic
        programming over the cut points; only where the length changes, since a cut inside
        a run of equal lengths adds a group and saves nothing (runs^2 steps: a serving batch
        of 800 short texts has a few dozen runs)."""
        n = len(lengths)
        if n == 0:
            return []
        cuts = [0] + [i for i in range(1, n) if lengths[i] != lengths[i - 1]] + [n]
        best, back = [0.0] + [math.inf] * (len(cuts) - 1), [0] * len(cuts)
        for j in range(1, len(cuts)):
            for i in range(j):
                width, texts = lengths[cuts[i]], cuts[j] - cuts[i]
                cost = best[i] + texts * (cls.TOKEN_COST * width + width * width) + cls.GROUP_COST
                if cost < best[j]:
                    best[j], back[j] = cost, i
        spans, j = [], len(cuts) - 1
        while j > 0:
            spans.append((cuts[back[j]], cuts[j]))
            j = back[j]
        return spans[::-1]

    def __call__(self, examples: list[dict]) -> dict:
        lengths = [len(e["input_ids"]) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: -lengths[i])
        spans = self.groups([lengths[i] for i in order])
        slots = sum((end - start) * lengths[order[start]] for start, end in spans)
        total = max(-(-slots // self.multiple) * self.multiple, self.row_tokens or 0)
        input_ids = torch.full((1, total), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((1, total), dtype=torch.long)
        sequence_ids = torch.zeros((1, total), dtype=torch.long)
        token_type_ids = torch.zeros((1, total), dtype=torch.long) if "token_type_ids" in examples[0] else None
        pool_index = torch.empty(len(examples), dtype=torch.long)
        at = 0
        for start, end in spans:
            width = lengths[order[start]]
            for i in order[start:end]:
                span = slice(at, at + lengths[i])
                input_ids[0, span] = torch.as_tensor(examples[i]["input_ids"], dtype=torch.long)
                position_ids[0, span] = torch.arange(lengths[i])
                sequence_ids[0, span] = i + 1
                if token_type_ids is not None:
                    token_type_ids[0, span] = torch.as_tensor(examples[i]["token_type_ids"], dtype=torch.long)
                pool_index[i] = at if self.pool == "first" else at + lengths[i] - 1
                at += width
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "sequence_ids": sequence_ids,
            "group_sizes": torch.tensor([(end - start, lengths[order[start]]) for start, end in spans]),
            "pool_index": pool_index,
        }
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch
