"""Training engines behind one interface, looked up by name (`TrainConfig.engine`):

- `native`: peftlab's own loop on accelerate (checkpoints, exact resume, validation).
- `trainer`: the Hugging Face Trainer.

Each trains a model in place and returns a `TrainSummary`, and predicts logits in dataset
order; `experiment` does not care which one ran. A new engine is a class with these two
methods, registered in ENGINES.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from peftlab.config import RunConfig
from peftlab.data import PadCollator, TokenizedDataset
from peftlab.engines import native, trainer
from peftlab.errors import PeftlabError
from peftlab.results import TrainSummary


class NativeEngine:
    """peftlab's loop: metrics.jsonl and checkpoints in the run directory."""

    name = "native"

    def train(
        self,
        model,
        dataset: TokenizedDataset,
        collator: PadCollator,
        cfg: RunConfig,
        precision: str,
        run_dir: Path,
        *,
        resume: bool = False,
        validate: Callable | None = None,
    ) -> TrainSummary:
        return native.train(
            model,
            dataset,
            collator,
            cfg,
            precision,
            run_dir / "metrics.jsonl",
            checkpoint_dir=run_dir / "checkpoints",
            resume=resume,
            validate=validate,
        )

    def predict_logits(
        self,
        model,
        dataset: TokenizedDataset,
        collator: PadCollator,
        cfg: RunConfig,
        precision: str,
        run_dir: Path,
        desc: str = "eval",
    ) -> np.ndarray:
        return native.predict_logits(model, dataset, collator, cfg.train.eval_batch_size, precision, desc)


class TrainerEngine:
    """The Hugging Face Trainer, working in <run dir>/trainer (removed afterwards)."""

    name = "trainer"

    def train(
        self,
        model,
        dataset: TokenizedDataset,
        collator: PadCollator,
        cfg: RunConfig,
        precision: str,
        run_dir: Path,
        *,
        resume: bool = False,
        validate: Callable | None = None,
    ) -> TrainSummary:
        if resume or validate is not None:
            raise PeftlabError(
                "--resume and validation_size need engine=native (the Trainer engine keeps no peftlab checkpoints)"
            )
        try:
            return trainer.train(
                model, dataset, collator, cfg, precision, run_dir / "trainer", run_dir / "metrics.jsonl"
            )
        finally:
            shutil.rmtree(run_dir / "trainer", ignore_errors=True)

    def predict_logits(
        self,
        model,
        dataset: TokenizedDataset,
        collator: PadCollator,
        cfg: RunConfig,
        precision: str,
        run_dir: Path,
        desc: str = "eval",
    ) -> np.ndarray:
        try:
            return trainer.predict_logits(model, dataset, collator, cfg, precision, run_dir / "trainer")
        finally:
            shutil.rmtree(run_dir / "trainer", ignore_errors=True)


ENGINES = {engine.name: engine for engine in (NativeEngine(), TrainerEngine())}


def get_engine(name: str):
    """The engine called `name` (config validation has checked it)."""
    return ENGINES[name]
