"""The training loop (peftlab's own, on accelerate) and the Hugging Face Trainer engine.

Both take the same model, tokenized data and config, and return the same summary, so the
rest of peftlab does not care which one ran.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.config import RunConfig
from peftlab.data import LengthGroupedBatchSampler, PadCollator, TokenizedDataset

log = logging.getLogger("peftlab")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into fp32/bf16/fp16 for `device`, and log what was picked and why."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        picked = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        why = "CUDA device " + ("supports bf16" if picked == "bf16" else "lacks bf16")
    elif device.type == "cpu" and cpu_supports_bf16():
        picked, why = "bf16", "CPU has native bf16 instructions"
    else:
        picked, why = "fp32", f"no fast bf16 on {device.type}"
    log.info("precision: %s (auto: %s)", picked, why)
    return picked


def _optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norms: decaying them only hurts (standard BERT recipe).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _schedule(optimizer, warmup: int, total: int):
    """Linear warmup to the peak LR, then linear decay to zero (as the Trainer's default)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_native(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                 precision: str, metrics_path: Path | None = None) -> dict:
    """Train `model` in place with peftlab's own loop; returns a summary dict."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    tc = cfg.train
    set_seed(tc.seed)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=default_device().type == "cpu")
    sampler = LengthGroupedBatchSampler(dataset.lengths, tc.batch_size, shuffle=True, seed=tc.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    steps_per_epoch = len(sampler)
    total = math.ceil(tc.epochs * steps_per_epoch)
    if tc.max_steps:
        total = min(total, tc.max_steps)
    warmup = max(1, int(tc.warmup_ratio * total))
    optimizer = _optimizer(model, cfg.lr, tc.weight_decay)
    scheduler = _schedule(optimizer, warmup, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    log.info("training: %d steps (%d per epoch, batch %d, lr %.2g, warmup %d), precision %s, %s",
             total, steps_per_epoch, tc.batch_size, cfg.lr, warmup, precision, accelerator.device)

    metrics_file = open(metrics_path, "a") if metrics_path and accelerator.is_main_process else None
    model.train()
    step, samples, tokens = 0, 0, 0
    running, running_n = 0.0, 0
    losses = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="train", disable=None if accelerator.is_main_process else True)
    epoch = 0
    while step < total:
        sampler.set_epoch(epoch)
        for batch in loader:
            # forward/backward (autocast comes from accelerate's mixed_precision)
            loss = model(**batch).loss
            accelerator.backward(loss)
            # clip, step, schedule
            if tc.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
            # Reading the loss syncs the host with the device: only keep a detached copy
            # each step and convert at logging time.
            running += loss.detach().float()
            running_n += 1
            if step % tc.log_every == 0 or step == total:
                mean = float(running) / running_n
                losses.append({"step": step, "loss": mean})
                running, running_n = 0.0, 0
                elapsed = time.perf_counter() - start
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": mean,
                          "lr": scheduler.get_last_lr()[0], "samples_per_s": samples / elapsed}
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{record['lr']:.2e}")
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if bar.disable:
                    log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, total, mean,
                             record["lr"], record["samples_per_s"])
            bar.update(1)
            if step >= total:
                break
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - start
    if metrics_file:
        metrics_file.close()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    # Each run builds its own Accelerator (possibly with another precision); drop the
    # process-wide state so the next one may differ.
    AcceleratorState._reset_state()
    return {
        "engine": "native",
        "steps": step,
        "epochs": step / steps_per_epoch,
        "train_seconds": elapsed,
        "train_samples_per_s": samples / elapsed,
        "train_tokens_per_s": tokens / elapsed,
        "final_loss": losses[-1]["loss"] if losses else float("nan"),
        "loss_history": losses,
        "precision": precision,
    }


class _ListDataset(torch.utils.data.Dataset):
    """Plain dicts for the Trainer (it must not drop our columns: see remove_unused_columns)."""

    def __init__(self, dataset: TokenizedDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


def _trainer_args(cfg: RunConfig, precision: str, output_dir: Path, total_steps: int | None = None):
    from transformers import TrainingArguments

    tc = cfg.train
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.eval_batch_size,
        learning_rate=cfg.lr,
        weight_decay=tc.weight_decay,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        max_grad_norm=tc.max_grad_norm,
        lr_scheduler_type="linear",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=default_device().type == "cpu",
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


def _make_trainer(model, cfg: RunConfig, precision: str, output_dir: Path, collator: PadCollator,
                  train_dataset=None):
    from transformers import Trainer

    return Trainer(
        model=model,
        args=_trainer_args(cfg, precision, output_dir),
        train_dataset=_ListDataset(train_dataset) if train_dataset is not None else None,
        data_collator=collator,
    )


def train_with_trainer(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                       precision: str, work_dir: Path) -> dict:
    """Train `model` in place with the Hugging Face Trainer; returns the same summary."""
    from accelerate.state import AcceleratorState

    trainer = _make_trainer(model, cfg, precision, work_dir, collator, dataset)
    start = time.perf_counter()
    result = trainer.train()
    elapsed = time.perf_counter() - start
    tokens = sum(dataset.lengths) * result.global_step * cfg.train.batch_size / max(len(dataset), 1)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    AcceleratorState._reset_state()
    return {
        "engine": "trainer",
        "steps": result.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": elapsed,
        "train_samples_per_s": min(len(dataset) * cfg.train.epochs, result.global_step * cfg.train.batch_size) / elapsed,
        "train_tokens_per_s": tokens / elapsed,
        "final_loss": losses[-1]["loss"] if losses else float(result.training_loss),
        "loss_history": losses,
        "precision": precision,
    }


def predict_logits_trainer(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                           precision: str, work_dir: Path) -> np.ndarray:
    """Logits through `Trainer.predict`, batched exactly as the native evaluation batches.

    Same batches and precision as `evaluate.predict_logits`, so both engines produce the
    same logits for the same model and their metrics agree.
    """
    from accelerate.state import AcceleratorState
    from transformers import Trainer

    sampler = LengthGroupedBatchSampler(dataset.lengths, cfg.train.eval_batch_size, shuffle=False)
    order = [i for batch in sampler for i in batch]

    class SortedBatchesTrainer(Trainer):
        def get_test_dataloader(self, test_dataset):
            return torch.utils.data.DataLoader(test_dataset, batch_sampler=sampler, collate_fn=collator)

    trainer = SortedBatchesTrainer(model=model, args=_trainer_args(cfg, precision, work_dir),
                                   data_collator=collator)
    output = trainer.predict(_ListDataset(dataset))
    AcceleratorState._reset_state()
    logits = np.zeros_like(output.predictions, dtype=np.float32)
    logits[order] = output.predictions
    return logits
