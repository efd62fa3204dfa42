"""Token cache benchmark: load IMDB (full train split) and tokenize it for MiniLM at 512
tokens, twice; the first run fills a fresh cache, the second reads it.

    PEFTLAB_DATA_DIR=../shared/data python bench/data_cache.py

Each time is end to end: load_data (reading, cleaning and splitting both IMDB files) plus
tokenize of the 25,000 training reviews. The tokenizer is loaded once, before either run.
Acceptance: the second run takes at most a tenth of the first.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from peftlab.config import DataConfig
from peftlab.data import load_data, tokenize
from peftlab.models import load_tokenizer, resolve


def timed_load(data_dir: str, tokenizer, max_length: int):
    start = time.perf_counter()
    bundle = load_data(DataConfig(dataset="imdb"), data_dir)
    dataset = tokenize(tokenizer, bundle.train.texts, bundle.train.labels, max_length)
    return time.perf_counter() - start, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("PEFTLAB_DATA_DIR"),
        help="Folder holding the imdb mirror (default $PEFTLAB_DATA_DIR).",
    )
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("give --data-dir or set PEFTLAB_DATA_DIR to the folder holding imdb/")

    tokenizer = load_tokenizer(resolve("minilm"))
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-cache-") as cache:
        os.environ["PEFTLAB_CACHE_DIR"] = cache  # fresh: the first run must tokenize
        os.environ.pop("PEFTLAB_TOKEN_CACHE", None)
        first, fresh = timed_load(args.data_dir, tokenizer, args.max_length)
        second, cached = timed_load(args.data_dir, tokenizer, args.max_length)
    assert cached.input_ids == fresh.input_ids, "the cache returned different token ids"
    tokens = sum(fresh.lengths)
    from peftlab.runtime import cpu_description

    print(f"CPU: {cpu_description()}")
    print(
        f"IMDB train: {len(fresh):,} reviews, {tokens:,} tokens at max_length {args.max_length} "
        f"({fresh.truncated:,} truncated)"
    )
    print(f"first  (tokenize, fill cache): {first:7.2f} s")
    print(f"second (read cache):           {second:7.2f} s")
    print(f"second / first: {second / first:.3f}  ({first / second:.1f}x faster; acceptance: <= 0.100)")


if __name__ == "__main__":
    main()
