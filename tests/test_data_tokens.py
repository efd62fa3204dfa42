"""Tokenization: truncation modes, segment ids of sentence pairs, and the token cache."""

import json
import logging

import numpy as np
import pytest
from conftest import make_texts

from peftlab.data import tokenize
from peftlab.errors import PeftlabError


@pytest.fixture(scope="module")
def tokenizer(tiny_encoder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_encoder)


def _long_texts():
    texts, _ = make_texts(30, seed=5)
    return texts, [t[: len(t) // 2] or "w1" for t in reversed(texts)]


@pytest.mark.parametrize("max_length", [8, 13, 64])
def test_head_truncation_matches_transformers(tokenizer, max_length):
    texts, pairs = _long_texts()
    single = tokenize(tokenizer, texts, None, max_length, cache=False)
    assert single.input_ids == tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    paired = tokenize(tokenizer, texts, None, max_length, pairs=pairs, cache=False)
    expected = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    assert paired.input_ids == expected["input_ids"]
    # The second text is segment 1 (BERT's token_type_ids), as the tokenizer marks it.
    assert [paired[i]["token_type_ids"] for i in range(len(texts))] == expected["token_type_ids"]
    assert "token_type_ids" not in single[0]  # one segment: the model's default (all 0)


def test_segment_ids_only_for_tokenizers_that_mark_them(tokenizer, tiny_decoder):
    from transformers import AutoTokenizer

    texts, pairs = _long_texts()
    assert 1 in tokenize(tokenizer, texts, None, 64, pairs=pairs, cache=False)[0]["token_type_ids"]
    decoder = AutoTokenizer.from_pretrained(tiny_decoder)  # a causal LM: no segment embeddings
    assert "token_type_ids" not in tokenize(decoder, texts, None, 64, pairs=pairs, cache=False)[0]


def test_tail_and_head_tail_keep_special_tokens_and_count_cuts(tokenizer):
    text = " ".join(f"w{i}" for i in range(30))  # 30 tokens + [CLS] + [SEP]
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    tail = tokenize(tokenizer, [text, "w1 w2"], None, 10, truncation="tail", cache=False)
    assert tail.input_ids[0] == [cls] + words[-8:] + [sep] and tail.truncated == 1
    both = tokenize(tokenizer, [text], None, 34, truncation="head+tail", cache=False)
    assert both.input_ids[0] == [cls] + words + [sep] and both.truncated == 0  # fits: untouched
    both = tokenize(tokenizer, [text], None, 22, truncation="head+tail", cache=False)
    assert both.input_ids[0] == [cls] + words[:5] + words[-15:] + [sep]  # 128/510 of 20 = 5 head tokens


def test_max_length_without_room_for_text_is_an_error(tokenizer):
    with pytest.raises(PeftlabError, match="max_length=2 leaves no room for text"):
        tokenize(tokenizer, ["w1"], None, 2, cache=False)


def test_second_tokenize_reads_the_cache_without_the_tokenizer(tokenizer, token_cache_dir, monkeypatch):
    texts, pairs = _long_texts()
    first = tokenize(tokenizer, texts, [0] * 30, 12, pairs=pairs, truncation="head+tail")
    assert first.truncated > 0 and list(token_cache_dir.glob("*.npz"))

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the tokenizer was called")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    second = tokenize(tokenizer, texts, [0] * 30, 12, pairs=pairs, truncation="head+tail")
    assert second.input_ids == first.input_ids and second.truncated == first.truncated
    assert second.second_starts == first.second_starts and second.second_starts is not None
    assert second.lengths == first.lengths and second.labels == [0] * 30
    with pytest.raises(AssertionError, match="tokenizer was called"):  # other settings: another key
        tokenize(tokenizer, texts, None, 12, pairs=pairs, truncation="tail")
    monkeypatch.setenv("PEFTLAB_TOKEN_CACHE", "0")
    with pytest.raises(AssertionError, match="tokenizer was called"):
        tokenize(tokenizer, texts, None, 12, pairs=pairs, truncation="head+tail")


def test_cache_files_are_plain_arrays_and_corrupt_ones_are_ignored(tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PEFTLAB_CACHE_DIR", str(tmp_path))
    texts, _ = _long_texts()
    first = tokenize(tokenizer, texts, None, 16)
    (path,) = tmp_path.glob("*.npz")
    with np.load(path, allow_pickle=False) as saved:  # no pickle needed to read it
        assert saved["ids"].dtype == np.int32 and len(saved["offsets"]) == 31
        assert json.loads(str(saved["about"]))["max_length"] == 16
    path.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        again = tokenize(tokenizer, texts, None, 16)
    assert again.input_ids == first.input_ids and "ignoring unreadable token cache" in caplog.text
    assert not list(tmp_path.glob(".*.tmp"))
