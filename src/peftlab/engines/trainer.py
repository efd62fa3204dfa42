"""The Hugging Face Trainer as a peftlab engine: the same model, data and config as the
native loop, the same TrainSummary back, and logits batched as the native evaluation
batches them, so both engines' metrics agree."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from peftlab.config import RunConfig
from peftlab.data import LengthGroupedBatchSampler, PadCollator, TokenizedDataset
from peftlab.methods import prepare_step_hook
from peftlab.metrics import append_metrics_log
from peftlab.optim import build_optimizer, needs_own_groups
from peftlab.results import TrainSummary

log = logging.getLogger("peftlab")


class _ListDataset(torch.utils.data.Dataset):
    """Plain dicts for the Trainer (it must not drop our columns: see remove_unused_columns)."""

    def __init__(self, dataset: TokenizedDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def _trainer_args(cfg: RunConfig, precision: str, output_dir: Path, device: torch.device, train_size: int = 0):
    from transformers import TrainingArguments

    tc = cfg.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.eval_batch_size,
        learning_rate=cfg.lr,
        weight_decay=tc.weight_decay,
        # The step count peftlab's own loop would take (epochs, or the min_steps budget).
        max_steps=tc.total_steps(math.ceil(train_size / tc.batch_size)) if train_size else -1,
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        max_grad_norm=tc.max_grad_norm,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # The model's own device: device=cpu on a CUDA machine must stay on the CPU.
        use_cpu=device.type == "cpu",
        seed=tc.seed,
        logging_steps=tc.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        # PeftModel.forward takes **kwargs, so the Trainer cannot tell which columns the
        # model uses and would drop all of them; and it cannot infer the label column.
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=False,
    )


def _make_trainer(
    model,
    cfg: RunConfig,
    precision: str,
    output_dir: Path,
    collator: PadCollator,
    train_dataset=None,
    metrics_path: Path | None = None,
):
    from transformers import Trainer, TrainerCallback

    class StepHook(TrainerCallback):
        """Runs the method's per-step hook (AdaLoRA) after optimizer.step, before zero_grad."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.hook = prepare_step_hook(model, state.max_steps)

        def on_optimizer_step(self, args, state, control, **kwargs):
            if self.hook is not None:
                self.hook(state.global_step + 1)

    class MetricsLog(TrainerCallback):
        """The Trainer's loss logs as metrics.jsonl entries, the native loop's format, so the
        report draws the same loss and learning-rate curves for both engines."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if metrics_path is None or not state.is_world_process_zero or "loss" not in (logs or {}):
                return
            append_metrics_log(
                metrics_path,
                {
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 3),
                    "loss": logs["loss"],
                    "lr": logs.get("learning_rate"),
                },
            )

    # LoRA+ and a separate head rate need their own parameter groups; otherwise the
    # Trainer builds its default AdamW.
    optimizer = build_optimizer(model, cfg) if needs_own_groups(cfg) else None
    return Trainer(
        model=model,
        args=_trainer_args(
            cfg, precision, output_dir, next(model.parameters()).device, len(train_dataset) if train_dataset else 0
        ),
        train_dataset=_ListDataset(train_dataset) if train_dataset is not None else None,
        data_collator=collator,
        callbacks=[StepHook(), MetricsLog()] if train_dataset is not None else None,
        optimizers=(optimizer, None),
    )


def train(
    model,
    dataset: TokenizedDataset,
    collator: PadCollator,
    cfg: RunConfig,
    precision: str,
    work_dir: Path,
    metrics_path: Path | None = None,
) -> TrainSummary:
    """Train `model` in place with the Hugging Face Trainer; returns the same TrainSummary as
    the native loop. Loss logs are appended to `metrics_path` as the native loop writes them."""
    from accelerate.state import AcceleratorState

    trainer = _make_trainer(model, cfg, precision, work_dir, collator, dataset, metrics_path)
    start = time.perf_counter()
    try:
        result = trainer.train()
    finally:
        AcceleratorState._reset_state()  # also after a failure: the next run may use another precision
    elapsed = time.perf_counter() - start
    tokens = sum(dataset.lengths) * result.global_step * cfg.train.batch_size / max(len(dataset), 1)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return TrainSummary(
        engine="trainer",
        steps=result.global_step,
        epochs=trainer.state.epoch,
        train_seconds=elapsed,
        train_samples_per_s=len(dataset)
        * result.global_step
        / math.ceil(len(dataset) / cfg.train.batch_size)
        / elapsed,
        train_tokens_per_s=tokens / elapsed,
        final_loss=losses[-1]["loss"] if losses else float(result.training_loss),
        precision=precision,
        loss_history=losses,
    )


def predict_logits(
    model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig, precision: str, work_dir: Path
) -> np.ndarray:
    """Logits through `Trainer.predict`, in batches of sorted lengths as the native
    evaluation pads them.

    Same precision as `engines.native.predict_logits`, whose packed batches (where it packs)
    give the padded logits (tested to 1e-5 in fp32), so both engines' metrics agree.
    """
    from accelerate.state import AcceleratorState
    from transformers import Trainer

    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.train.eval_batch_size, shuffle=False)
    order = [i for batch in sampler for i in batch]

    class SortedBatchesTrainer(Trainer):
        def get_test_dataloader(self, test_dataset):
            return torch.utils.data.DataLoader(test_dataset, batch_sampler=sampler, collate_fn=collator)

    trainer = SortedBatchesTrainer(
        model=model,
        args=_trainer_args(cfg, precision, work_dir, next(model.parameters()).device),
        data_collator=collator,
    )
    try:
        output = trainer.predict(_ListDataset(dataset))
    finally:
        AcceleratorState._reset_state()
    logits = np.zeros_like(output.predictions, dtype=np.float32)
    logits[order] = output.predictions
    return logits
