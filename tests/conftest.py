"""Tiny CPU fixtures: random encoder/decoder models with a word-level tokenizer, and a
synthetic, learnable sentiment task written as CSV files."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "nasty", "dreadful"]
FILLER = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER


def make_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Texts of 3-20 filler words with one sentiment word; label = its polarity."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(3, 20))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        texts.append(" ".join(words))
        labels.append("pos" if label else "neg")
    return texts, labels


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "encoder":
        # BERT's templates: the second text of a pair is segment 1 (token_type_ids).
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    # A decoder tokenizer without a pad token, as most causal LMs ship.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def build_tiny_model(path: Path, kind: str) -> Path:
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "encoder":
        config = BertConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
        )
        model = BertForSequenceClassification(config)
    elif kind == "distilbert":  # its own layer layout: the output projection inside self-attention
        config = DistilBertConfig(
            vocab_size=len(VOCAB),
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=128,
            pad_token_id=0,
            initializer_range=0.5,  # texts whose logits differ visibly, untrained
        )
        model = DistilBertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            bos_token_id=None,
            eos_token_id=VOCAB.index("</s>"),
            pad_token_id=None,
        )
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    _tokenizer("decoder" if kind == "decoder" else "encoder").save_pretrained(path)
    return path


def pretrain_tiny_model(path: Path, kind: str) -> Path:
    """A tiny model with useful features, as a pretrained base has: fully fine-tuned on the
    sentiment task (its own 512 texts), then given a fresh classification head.

    On a random tiny base the frozen features carry almost no signal, so no adapter can
    learn in an epoch and "the method learns" could not be tested; on this base every
    method has to train its head (and adapter) from scratch to get above chance.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    build_tiny_model(path, kind)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    texts, labels = make_texts(512, seed=7)
    y = torch.tensor([label == "pos" for label in labels]).long()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(texts)).split(32):
            batch = tok([texts[i] for i in idx], padding=True, return_tensors="pt")
            model(**batch, labels=y[idx]).loss.backward()
            opt.step()
            opt.zero_grad()
    head = model.classifier if kind == "encoder" else model.score
    with torch.no_grad():  # a fresh head, initialised as transformers does
        head.weight.normal_(0.0, 0.02)
        if head.bias is not None:
            head.bias.zero_()
    model.config.pad_token_id = None if kind == "decoder" else model.config.pad_token_id
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pretrained_encoder(tmp_path_factory) -> str:
    return str(pretrain_tiny_model(tmp_path_factory.mktemp("pretrained-bert"), "encoder"))


@pytest.fixture(scope="session")
def pretrained_decoder(tmp_path_factory) -> str:
    return str(pretrain_tiny_model(tmp_path_factory.mktemp("pretrained-llama"), "decoder"))


@pytest.fixture(scope="session", autouse=True)
def token_cache_dir(tmp_path_factory):
    """Every test (and CLI subprocess) caches tokens in a temporary folder, not ~/.cache."""
    path = tmp_path_factory.mktemp("token-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PEFTLAB_CACHE_DIR", str(path))
        mp.delenv("PEFTLAB_TOKEN_CACHE", raising=False)
        yield path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "encoder"))


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert"))


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "decoder"))


def write_csv(path: Path, texts: list[str], labels: list, text_col: str = "text", label_col: str = "label") -> Path:
    import pandas as pd

    pd.DataFrame({text_col: texts, label_col: labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    """A folder with train.csv (320 rows) and test.csv (80 rows), string labels."""
    root = tmp_path_factory.mktemp("sentiment")
    write_csv(root / "train.csv", *make_texts(320, seed=1))
    write_csv(root / "test.csv", *make_texts(80, seed=2))
    return root


@pytest.fixture
def tiny_cfg(tiny_encoder, sentiment_dir, tmp_path):
    """A RunConfig for a fast run: tiny encoder, synthetic data, fp32."""
    from peftlab.config import load_config

    return load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            f"output_dir={tmp_path / 'runs'}",
            "precision=fp32",
            "epochs=1",
            "batch_size=16",
            "log_every=5",
        ],
    )


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _fresh_peftlab_logger():
    """`peftlab.cli.main` (called in-process by some tests) points the peftlab logger at
    stderr and stops propagation; undo that so caplog sees the next test's records."""
    import logging

    yield
    logger = logging.getLogger("peftlab")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
