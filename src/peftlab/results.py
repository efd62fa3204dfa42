"""Results that cross module borders, as dataclasses with a JSON round trip.

`TrainSummary` is what every engine's `train` returns; it is stored in report.json under
"train" (`to_dict`), and read back with `from_dict`, which ignores keys it does not know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainSummary:
    """How training went: steps, time, throughput, losses (and validation, native engine)."""

    engine: str
    steps: int
    epochs: float
    train_seconds: float
    train_samples_per_s: float
    train_tokens_per_s: float
    final_loss: float  # NaN when nothing was logged
    precision: str
    loss_history: list[dict] = field(default_factory=list)  # {"step", "loss"}
    validation: list[dict] = field(default_factory=list)  # {"step", "val_loss", "val_accuracy", ...}
    best_step: int | None = None
    early_stopped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainSummary:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
