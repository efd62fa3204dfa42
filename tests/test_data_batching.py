"""Batching: padding to a multiple of 8, length-grouped and stratified batches, packed batches."""

import itertools

import numpy as np
import pytest
import torch

from peftlab.data import LengthGroupedBatchSampler, PadCollator, label_skew


def test_length_grouped_batches_cover_every_example_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=1003).tolist()
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, shuffle=True, seed=3, window=8)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003)), "each example exactly once"
        assert len(batches) == len(sampler)
        orders.append(flat)
    assert orders[0] != orders[1], "a new order each epoch"

    # Grouping works: padding waste is far below that of random batches.
    def waste(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    random_batches = [list(range(i, min(i + 16, 1003))) for i in range(0, 1003, 16)]
    assert waste(list(sampler)) < 0.3 * waste(random_batches)


def _long_means_positive(n=1003, seed=0):
    """Lengths that predict the label, as in SMS spam: 15% positives, all long."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.15).astype(int)
    lengths = np.where(labels == 1, rng.integers(60, 200, n), rng.integers(1, 80, n))
    return lengths.tolist(), labels.tolist()


def test_stratified_batches_cover_every_example_once_and_keep_the_class_mix():
    lengths, labels = _long_means_positive()
    stratified = LengthGroupedBatchSampler(lengths, batch_size=16, shuffle=True, seed=3, labels=labels)
    for epoch in range(2):
        stratified.set_epoch(epoch)
        flat = [i for b in stratified for i in b]
        assert sorted(flat) == list(range(1003)), "each example exactly once"
    stratified.set_epoch(0)
    grouped = LengthGroupedBatchSampler(lengths, batch_size=16, shuffle=True, seed=3)
    random = LengthGroupedBatchSampler(lengths, batch_size=16, shuffle=True, seed=3, window=1)
    skews = {
        name: label_skew(s.batches(), labels)
        for name, s in (("stratified", stratified), ("grouped", grouped), ("random", random))
    }
    # Length grouping makes one-class batches here; stratified batches mix better than random.
    assert skews["stratified"] < 0.5 * skews["random"] < 0.5 * skews["grouped"], skews
    positives = [sum(labels[i] for i in b) for b in stratified.batches() if len(b) == 16]
    assert min(positives) >= 1 and max(positives) <= 4  # 15% of 16 is 2.4


def test_eval_batches_are_sorted_longest_first():
    sampler = LengthGroupedBatchSampler([3, 9, 1, 7], batch_size=2, shuffle=False)
    assert list(sampler) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collator_pads_to_multiple_of_8(side):
    batch = PadCollator(pad_token_id=0, padding_side=side)(
        [{"input_ids": [5] * 9, "labels": 1}, {"input_ids": [6, 7], "labels": 0}]
    )
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 11
    row = batch["input_ids"][1].tolist()
    assert (row[:2] == [6, 7]) if side == "right" else (row[-2:] == [6, 7])
    assert batch["labels"].tolist() == [1, 0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_segment_ids_with_zeros(side):
    batch = PadCollator(pad_token_id=0, padding_side=side)(
        [
            {"input_ids": [5, 6, 7], "token_type_ids": [0, 1, 1]},
            {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "token_type_ids": [0] * 4 + [1] * 5},
        ]
    )
    assert batch["token_type_ids"].shape == batch["input_ids"].shape == (2, 16)
    row = batch["token_type_ids"][0].tolist()
    assert row == ([0, 1, 1] + [0] * 13 if side == "right" else [0] * 13 + [0, 1, 1])
    assert batch["token_type_ids"][1].sum() == 5


def _examples(lengths, pairs=False):
    return [
        {"input_ids": [100 + i] * n, "labels": i % 3, **({"token_type_ids": [i % 2] * n} if pairs else {})}
        for i, n in enumerate(lengths)
    ]


@pytest.mark.parametrize("pool", ["first", "last"])
def test_packed_batches_hold_every_text_once_with_its_own_positions(pool):
    from peftlab.data import PackCollator

    lengths = [30, 3, 17, 9, 9, 1, 25, 6, 2, 14, 8, 5]
    batch = PackCollator(pad_token_id=0, pool=pool)(_examples(lengths, pairs=True))
    ids, pos, seq, types = (batch[k][0] for k in ("input_ids", "position_ids", "sequence_ids", "token_type_ids"))
    assert batch["input_ids"].shape[0] == 1 and len(ids) % 32 == 0, "one row, its tail padded to a multiple of 32"
    groups = batch["group_sizes"].tolist()
    assert (
        sum(t for t, _ in groups) == len(lengths)
        and sum(t * w for t, w in groups) <= len(ids) < sum(t * w for t, w in groups) + 32
    )
    assert len(ids) < 0.6 * len(lengths) * 32, "far fewer cells than padding every text to the longest"
    assert int((seq > 0).sum()) == sum(lengths) and int((ids[seq == 0] != 0).sum()) == 0, "padding is pad ids"
    slots = [
        (at + w * s, w) for at, (t, w) in zip(np.cumsum([0] + [t * w for t, w in groups]), groups) for s in range(t)
    ]
    starts = {}
    for i, n in enumerate(lengths):
        (cols,) = (ids == 100 + i).nonzero(as_tuple=True)
        assert len(cols) == n and (cols == torch.arange(cols[0], cols[0] + n)).all(), f"text {i} whole, contiguous"
        slot = next((start, width) for start, width in slots if start == int(cols[0]))
        assert n <= slot[1], "a text starts its slot and fits in it"
        starts[i] = slot
        assert pos[cols].tolist() == list(range(n)), "positions restart at 0 for each text"
        assert (seq[cols] == i + 1).all() and (types[cols] == i % 2).all()
        expected = int(cols[0] if pool == "first" else cols[-1])
        assert int(batch["pool_index"][i]) == expected and int(ids[expected]) == 100 + i
    assert len(set(starts.values())) == len(lengths), "one text per slot"
    widths = [w for _, w in groups]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths), (
        "groups longest first, as wide as their longest"
    )
    assert batch["labels"].tolist() == [i % 3 for i in range(len(lengths))], "labels in the order given"


def test_token_batches_cover_every_text_once_longest_first_within_the_budget():
    from peftlab.data import token_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200).tolist() + [90]  # one text longer than the budget
    batches = token_batches(lengths, budget=80)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths))), "every text exactly once"
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True), "longest first"
    assert batches[0] == [200], "a text longer than the budget goes alone"
    assert all(sum(lengths[i] for i in b) <= 80 for b in batches[1:])
    # Greedy: the next batch's first text would not have fitted in the one before.
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > 80 for a, b in itertools.pairwise(batches))


def test_pack_collator_pads_its_row_to_row_tokens():
    from peftlab.data import PackCollator

    examples = _examples([9, 7, 3])
    plain = PackCollator(pad_token_id=0)(examples)
    fixed = PackCollator(pad_token_id=0, row_tokens=96)(examples)
    assert plain["input_ids"].shape == (1, 32) and fixed["input_ids"].shape == (1, 96)
    for key in ("input_ids", "position_ids", "sequence_ids"):
        assert torch.equal(fixed[key][:, :32], plain[key]) and not fixed[key][:, 32:].any(), key
    assert torch.equal(fixed["pool_index"], plain["pool_index"])
    assert torch.equal(fixed["group_sizes"], plain["group_sizes"])
    # A row that needs more than row_tokens keeps its own (rounded) length.
    assert PackCollator(pad_token_id=0, row_tokens=8)(examples)["input_ids"].shape == (1, 32)


def test_pack_groups_are_the_cheapest_cut_of_the_sorted_lengths():
    import itertools

    from peftlab.data import PackCollator

    def cost(lengths, spans):
        return sum(
            (e - s) * (PackCollator.TOKEN_COST * lengths[s] + lengths[s] ** 2) + PackCollator.GROUP_COST
            for s, e in spans
        )

    rng = np.random.default_rng(3)
    for _ in range(20):
        lengths = sorted(rng.integers(1, 200, int(rng.integers(1, 9))).tolist(), reverse=True)
        spans = PackCollator.groups(lengths)
        assert (
            spans[0][0] == 0
            and spans[-1][1] == len(lengths)
            and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        )
        cuts = range(1, len(lengths))
        every = [
            list(zip((0, *c), (*c, len(lengths)))) for r in range(len(lengths)) for c in itertools.combinations(cuts, r)
        ]
        assert cost(lengths, spans) == min(cost(lengths, e) for e in every)
    assert len(PackCollator.groups([120] * 2 + [8] * 14)) == 2, "two long texts do not widen fourteen short ones"
    assert len(PackCollator.groups([20, 19, 19, 18])) == 1, "similar lengths share one group"


def test_packed_rows_never_mix_sequence_numbers():
    from peftlab.data import PackCollator

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 120, 64).tolist()
    batch = PackCollator(pad_token_id=0)(_examples(lengths))
    seq = batch["sequence_ids"][0]
    assert sorted(seq[seq > 0].unique().tolist()) == list(range(1, 65)), "each text its own number"
    assert [int((seq == i + 1).sum()) for i in range(64)] == lengths
    padded_cells = len(lengths) * (-(-max(lengths) // 8) * 8)
    assert seq.numel() < 0.7 * padded_cells, "packing spends far fewer cells than padding"
    assert seq.numel() < 1.2 * sum(lengths), "and little more than the real tokens"
