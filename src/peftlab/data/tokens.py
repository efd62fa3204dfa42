"""Tokenization: token ids cut to max_length by a chosen truncation, and the token cache.

Tokenized texts are cached on disk as NumPy arrays (flat token ids + offsets, no pickle) in
$PEFTLAB_CACHE_DIR (default ~/.cache/peftlab/tokens), keyed by the tokenizer, the texts,
max_length and the truncation mode; PEFTLAB_TOKEN_CACHE=0 or `token_cache=false` turns it
off. Files there can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from peftlab.config import DataConfig
from peftlab.data.bundle import Split
from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")


class TokenizedDataset(torch.utils.data.Dataset):
    """Token ids (unpadded) and labels, tokenized once up front; `truncated` counts the
    texts that were cut to fit max_length. `second_starts` (sentence pairs, for models
    with segment embeddings) is where each example's second segment begins: its
    token_type_ids are 0 before and 1 from there on."""

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: list[int] | None,
        truncated: int = 0,
        second_starts: list[int] | None = None,
    ):
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
    return ids[:head] + ids[len(ids) - (keep - head) :]


def _encode(
    tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, truncation: str
) -> tuple[list[list[int]], int, list[int] | None]:
    """Token ids of each text (pair) cut to max_length with special tokens; number cut;
    for pairs, where each second segment (second text + closing specials) begins."""
    before, between, after = _special_tokens(tokenizer, pairs is not None)
    budget = max_length - len(before) - len(between) - len(after)
    if budget < 1:
        raise PeftlabError(
            f"max_length={max_length} leaves no room for text beside the tokenizer's special tokens: raise max_length"
        )
    # Whole texts first (verbose=False: their length beyond the model's is expected here).
    firsts = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    seconds = (
        tokenizer(list(pairs), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        if pairs is not None
        else itertools.repeat([])
    )
    input_ids, truncated, starts = [], 0, []
    for first, second in zip(firsts, seconds):
        if len(first) + len(second) > budget:
            truncated += 1
            keep_first, keep_second = (
                _pair_lengths(len(first), len(second), budget) if pairs is not None else (budget, 0)
            )
            first, second = _cut(first, keep_first, truncation), _cut(second, keep_second, truncation)
        input_ids.append(before + first + between + second + after)
        starts.append(len(before) + len(first) + len(between))
    return input_ids, truncated, starts if pairs is not None else None


# --- the token cache --------------------------------------------------------------------


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


def _cache_path(
    root: Path, tokenizer, texts: list[str], pairs: list[str] | None, max_length: int, truncation: str
) -> Path:
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


def _write_cache(path: Path, input_ids: list[list[int]], truncated: int, starts: list[int] | None, about: dict) -> None:
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
            np.savez(
                fh, ids=flat, offsets=offsets, truncated=np.int64(truncated), about=np.array(json.dumps(about)), **extra
            )
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning(
            "could not write the token cache %s (%s): set PEFTLAB_CACHE_DIR to a writable folder",
            path,
            exc.strerror or exc,
        )


# --- tokenizing -------------------------------------------------------------------------


def tokenize(
    tokenizer,
    texts: list[str],
    labels: list[int] | None,
    max_length: int,
    *,
    pairs: list[str] | None = None,
    truncation: str = "head",
    cache: bool = True,
) -> TokenizedDataset:
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
        log.info("tokens of %d texts read from the cache %s in %.1fs", len(texts), path, time.perf_counter() - started)
    else:
        input_ids, truncated, starts = _encode(tokenizer, texts, pairs, max_length, truncation)
        if starts is not None and not _marks_segments(tokenizer):
            starts = None  # RoBERTa, decoders: their tokenizers give no segment ids
        if path:
            _write_cache(
                path,
                input_ids,
                truncated,
                starts,
                {
                    "tokenizer": tokenizer.name_or_path,
                    "texts": len(texts),
                    "pairs": pairs is not None,
                    "max_length": max_length,
                    "truncation": truncation,
                    "truncated": truncated,
                },
            )
    if truncated:
        log.info(
            "%d of %d texts were longer than %d tokens: kept their %s", truncated, len(texts), max_length, truncation
        )
    return TokenizedDataset(input_ids, labels, truncated, starts)


def tokenize_split(tokenizer, split: Split, cfg: DataConfig) -> TokenizedDataset:
    """`tokenize` one split's texts (and second texts) with labels, with the max_length,
    truncation and token cache settings of `cfg`."""
    return tokenize(
        tokenizer,
        split.texts,
        split.labels,
        cfg.max_length,
        pairs=split.pairs,
        truncation=cfg.truncation,
        cache=cfg.token_cache,
    )
