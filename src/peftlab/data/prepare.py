"""From raw tables to a `DataBundle`: columns, label hygiene and mapping, dedup, splits,
subsets, and facts about leakage.

`load_data` runs the steps in order: read the tables (see sources.py), pick the text and
label columns, clean the rows, map labels to ids, drop duplicates (if asked), split and
subset, then record the facts (sizes, class counts, duplicates, train/test overlap).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from peftlab.config import DataConfig
from peftlab.data.bundle import DataBundle, Split
from peftlab.data.sources import ROWS_MERGED_ATTR, Preset, RawTables, in_memory_tables, load_raw
from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")

TEXT_COLUMN_GUESSES = ("text", "sentence", "sms", "review", "content", "document", "message")
LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target", "sentiment", "y")


# --- columns and rows -------------------------------------------------------------------


def _pick_columns(df: pd.DataFrame, cfg: DataConfig, preset: Preset | None, where: str) -> tuple[str, str | None, str]:
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
        non_string = out[name].map(
            lambda t: t is not None and not isinstance(t, str) and not (isinstance(t, float) and math.isnan(t))
        )
        if non_string.any():
            raise PeftlabError(
                f"{int(non_string.sum())} {split} texts in column {col!r} are not strings "
                f"(e.g. {out[name][non_string].iloc[0]!r}): choose the text column with "
                f"{'--text-column' if name == 'text' else '--text-pair-column'}"
            )
        blank = out[name].isna() | (out[name].fillna("").str.strip() == "")
        if (blank & ~empty).any():
            log.warning(
                "dropped %d %s rows with empty or missing %s",
                int((blank & ~empty).sum()),
                split,
                "text" if name == "text" else f"second text ({col!r})",
            )
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


def _clean_test(df: pd.DataFrame, columns: tuple[str, str | None, str], split: str, dataset: str) -> pd.DataFrame:
    """The test split cleaned as `_clean` does; the columns are those chosen in train."""
    for col in columns:
        if col is not None and col not in df.columns:
            raise PeftlabError(f"column {col!r} missing from the {split} split of {dataset}")
    return _clean(df, *columns, split)


# --- labels -----------------------------------------------------------------------------


# A label column is refused when it has more classes than this and more than half as many
# classes as training rows: such a column holds texts or ids, not classes.
MAX_CLASSES_WITHOUT_CHECK = 20


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
        log.warning(
            "labels that differ only in case taken as one class %r: %s",
            target,
            ", ".join(f"{s!r} ({counts[s]} rows)" for s in spellings),
        )
    if renames:
        for df in frames:
            df["label"] = df["label"].map(lambda v: renames.get(v, v) if isinstance(v, str) else v)


def _normalise_labels(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame | None,
    column: str,
    label_names: Sequence[str] | None,
    known_names: Sequence[str] | None,
) -> tuple[list[str], dict]:
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


def _to_ids(labels: pd.Series, mapping: dict, names: list[str], split: str) -> list[int]:
    unknown = sorted({str(v) for v in labels.unique() if v not in mapping})
    if unknown:
        raise PeftlabError(
            f"the {split} split has labels the training data never had: {unknown[:5]} "
            f"(known: {names}); fix the labels or the label column"
        )
    return [int(mapping[v]) for v in labels]


# --- duplicates, splits and leakage -----------------------------------------------------


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
        log.warning(
            "dedup: %d texts appear with conflicting labels; kept the label of their first occurrence", conflicts
        )
    new_train, new_test = (
        kept[kept["split"] == name].drop(columns="split").reset_index(drop=True) for name in ("train", "test")
    )
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


def _split_and_subset(
    train_df: pd.DataFrame, test_df: pd.DataFrame | None, cfg: DataConfig, train_name: str, test_name: str | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, str]:
    """(train, test, validation or None, how the test set was made): a test set carved from
    train when there is none, the configured subsets, then validation carved from train."""
    if test_df is None:
        tr, te = stratified_split(train_df["label"].tolist(), cfg.test_size, cfg.split_seed)
        train_df, test_df = train_df.iloc[tr], train_df.iloc[te]
        split_desc = (
            f"stratified {1 - cfg.test_size:.0%}/{cfg.test_size:.0%} split of {train_name}, seed {cfg.split_seed}"
        )
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
        log.warning(
            "%d test examples also appear in train (exact text match): test scores may be "
            "optimistic; dedup=true removes them",
            overlap,
        )
    return len(train_keys) - len(train_set), overlap


def _classes_missing_from_test(names: list[str], test_labels: list[int]) -> list[str]:
    """The classes without a test example, logged as a warning: their recall and F1 are
    undefined, so macro-F1 is taken over the other classes."""
    present = set(test_labels)
    missing = [n for i, n in enumerate(names) if i not in present]
    if missing:
        log.warning(
            "%d of %d classes have no test examples: %s; their scores are undefined and macro-F1 leaves them out",
            len(missing),
            len(names),
            missing,
        )
    return missing


# --- the steps in order -----------------------------------------------------------------


def _split_names(raw: RawTables) -> tuple[str, str | None]:
    """The split to train on ("train", else the first) and the test split (the preset's,
    else test/validation/valid/dev), or None when a test set is to be carved from train."""
    train_name = "train" if "train" in raw.splits else next(iter(raw.splits))
    preset = raw.preset
    test_name = (
        preset.test_split
        if preset and preset.test_split in raw.splits
        else next((s for s in ("test", "validation", "valid", "dev") if s in raw.splits and s != train_name), None)
    )
    return train_name, test_name


def _known_label_names(raw: RawTables, label_column: str) -> Sequence[str] | None:
    """Names for integer labels: the preset's, else those of the column's ClassLabel feature."""
    if raw.preset:
        return raw.preset.label_names
    return getattr(raw.features.get(label_column), "names", None)


def _label_ids(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame | None,
    split_names: tuple[str, str | None],
    column: str,
    label_names: Sequence[str] | None,
    known_names: Sequence[str] | None,
) -> list[str]:
    """The label names, with each frame's labels replaced by their ids (in place).
    Raises PeftlabError for labels that do not make classes or that train never had."""
    names, mapping = _normalise_labels(train_df, test_df, column, label_names, known_names)
    train_name, test_name = split_names
    train_df["label"] = _to_ids(train_df["label"], mapping, names, train_name)
    if test_df is not None:
        test_df["label"] = _to_ids(test_df["label"], mapping, names, test_name)
    return names


def _as_split(df: pd.DataFrame) -> Split:
    """A frame's texts, second texts (when it has a `pair` column) and label ids as lists."""
    return Split(df["text"].tolist(), df["label"].tolist(), df["pair"].tolist() if "pair" in df.columns else None)


def _facts(
    cfg: DataConfig,
    raw: RawTables,
    columns: tuple[str, str | None, str],
    split_desc: str,
    bundle: DataBundle,
    cleanliness: dict,
) -> dict:
    """What the report says about the data: where it came from, its columns, split sizes and
    class counts, the `cleanliness` counts (duplicates, overlap) and the fingerprint."""
    text, pair, label = columns
    names, train_labels, test_labels = bundle.label_names, bundle.train.labels, bundle.test.labels
    return {
        "dataset": cfg.dataset,
        "source": raw.source,
        "rows_read": sum(len(df) for df in raw.splits.values()),
        "rows_merged_or_dropped": sum(df.attrs.get(ROWS_MERGED_ATTR, 0) for df in raw.splits.values()),
        "split": split_desc,
        "text_column": text,
        "text_pair_column": pair,
        "label_column": label,
        "train_size": len(train_labels),
        "test_size": len(test_labels),
        "validation_size": len(bundle.validation) if bundle.validation is not None else 0,
        "train_label_counts": {n: train_labels.count(i) for i, n in enumerate(names)},
        "test_label_counts": {n: test_labels.count(i) for i, n in enumerate(names)},
        "classes_missing_from_test": _classes_missing_from_test(names, test_labels),
        **cleanliness,
        "fingerprint": bundle.fingerprint,
    }


def _log_summary(facts: dict) -> None:
    log.info(
        "data: %s from %s (%d rows); %s -> %d train, %d test%s",
        facts["dataset"],
        facts["source"],
        facts["rows_read"],
        facts["split"],
        facts["train_size"],
        facts["test_size"],
        f", {facts['validation_size']} validation (from train)" if facts["validation_size"] else "",
    )


def load_data(
    cfg: DataConfig, data_dir: str | None = None, label_names: list[str] | None = None, *, source=None
) -> DataBundle:
    """Load, clean, label-map, deduplicate (if asked) and split the data. Raises PeftlabError.

    `label_names`, when given (e.g. from a trained adapter), fixes the label order so that
    evaluation data map to the ids the model was trained with. `source`, when given, is the
    data itself instead of `cfg.dataset`: a pandas DataFrame or `datasets.Dataset` (the
    train split; a test split is carved from it as for a single file), or a dict of split
    name to either, such as a `datasets.DatasetDict`; `cfg.dataset` then only names it in
    logs and reports, and ClassLabel names of a Dataset become the label names.
    """
    raw = in_memory_tables(source) if source is not None else load_raw(cfg, data_dir)
    train_name, test_name = _split_names(raw)
    text, pair, label = _pick_columns(raw.splits[train_name], cfg, raw.preset, f"{cfg.dataset} [{train_name}]")

    train_df = _clean(raw.splits[train_name], text, pair, label, train_name)
    test_df = _clean_test(raw.splits[test_name], (text, pair, label), test_name, cfg.dataset) if test_name else None

    names = _label_ids(train_df, test_df, (train_name, test_name), label, label_names, _known_label_names(raw, label))

    # Duplicates go before splitting, so a carved test set cannot share texts with train.
    removed = conflicts = None
    if cfg.dedup:
        train_df, test_df, removed, conflicts = _dedup(train_df, test_df)
    train_df, test_df, val_df, split_desc = _split_and_subset(train_df, test_df, cfg, train_name, test_name)
    duplicates_in_train, overlap = _leakage(train_df, test_df)

    bundle = DataBundle(
        _as_split(train_df),
        _as_split(test_df),
        names,
        raw.source,
        validation=_as_split(val_df) if val_df is not None else None,
    )
    bundle.facts = _facts(
        cfg,
        raw,
        (text, pair, label),
        split_desc,
        bundle,
        {
            "duplicates_in_train": duplicates_in_train,
            "train_test_overlap": overlap,
            "duplicates_removed": removed,
            "duplicate_label_conflicts": conflicts,
        },
    )
    _log_summary(bundle.facts)
    return bundle
