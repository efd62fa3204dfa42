"""Datasets: find them, map their columns and labels, split, tokenize, batch by length.

sources.py finds and reads the raw tables; prepare.py turns them into a `DataBundle` of
`Split`s (bundle.py); tokens.py turns a split into token ids, cached on disk;
batching.py pads or packs them and groups them into batches.
"""

from peftlab.data.batching import LengthGroupedBatchSampler, PackCollator, PadCollator, label_skew, token_batches
from peftlab.data.bundle import DataBundle, Split
from peftlab.data.prepare import load_data, stratified_split
from peftlab.data.tokens import TokenizedDataset, tokenize, tokenize_split

__all__ = [
    "DataBundle",
    "LengthGroupedBatchSampler",
    "PackCollator",
    "PadCollator",
    "Split",
    "TokenizedDataset",
    "label_skew",
    "load_data",
    "stratified_split",
    "token_batches",
    "tokenize",
    "tokenize_split",
]
