"""What loading data produces: a `DataBundle` of `Split`s of plain Python lists.

Each split holds texts (and second texts of sentence pairs) and integer labels; the bundle
adds the label names, plus facts about where the data came from and how clean it is
(duplicates, train/test overlap). Its own module, so that tokenizing a split need not
import the code that prepares one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass
class Split:
    """One split's examples: texts, integer labels and, for sentence pairs, second texts."""

    texts: list[str]
    labels: list[int]
    # The second text of each example for sentence-pair tasks (text_pair_column); else None.
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DataBundle:
    """Train and test splits with their label names, and where they came from."""

    train: Split
    test: Split
    label_names: list[str]
    source: str
    # Carved from train when validation_size > 0; used for model selection only.
    validation: Split | None = None
    facts: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (first 16 hex digits) of every text, second text and label, train then test.

        Adapters record it, so the bytes hashed must never change for the same data.
        """
        h = hashlib.sha256()
        for split in (self.train, self.test):
            for i, (text, label) in enumerate(zip(split.texts, split.labels)):
                h.update(text.encode("utf-8", "surrogatepass"))
                if split.pairs is not None:  # absent for single texts, so their fingerprints stay as before
                    h.update(b"\x02" + split.pairs[i].encode("utf-8", "surrogatepass"))
                h.update(b"\x00%d\n" % label)
            h.update(b"\x01")
        return h.hexdigest()[:16]
