"""The training loop (peftlab's own, on accelerate) and the Hugging Face Trainer engine.

Both take the same model, tokenized data and config, and return the same summary, so the
rest of peftlab does not care which one ran.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab.config import RunConfig
from peftlab.data import LengthGroupedBatchSampler, PadCollator, TokenizedDataset, label_skew
from peftlab.errors import PeftlabError
from peftlab.methods import prepare_step_hook
from peftlab.metrics import append_metrics_log
from peftlab.runtime import gather_objects

log = logging.getLogger("peftlab")


def _optimizer(model, lr: float, weight_decay: float, lora_plus_ratio: float | None = None,
               head_lr: float | None = None) -> torch.optim.Optimizer:
    from peftlab.models import HEAD_NAMES

    # No weight decay on biases and norms: decaying them only hurts (standard BERT recipe).
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rate = lr
        if lora_plus_ratio and "lora_B" in name:
            rate = lr * lora_plus_ratio  # LoRA+: B matrices learn faster than A (and the rest)
        elif head_lr is not None and any(part in HEAD_NAMES for part in name.split(".")):
            rate = head_lr  # the freshly initialised head (bitfit: far above the biases' rate)
        decay = p.ndim >= 2 and "norm" not in name.lower()
        groups.setdefault((rate, decay), []).append(p)
    groups = [{"params": params, "lr": rate, "weight_decay": weight_decay if decay else 0.0}
              for (rate, decay), params in groups.items()]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def training_sampler(dataset: TokenizedDataset, batch_size: int, seed: int,
                     batching: str = "auto") -> LengthGroupedBatchSampler:
    """The training batch sampler for `batching` (TrainConfig.batching); `auto` resolved
    from the data itself and logged."""
    if batching == "auto" and dataset.labels is not None:
        length = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=seed)
        random = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=seed, window=1)
        grouped_skew, random_skew = label_skew(length.batches(), dataset.labels), label_skew(random.batches(),
                                                                                             dataset.labels)
        # Length-grouped batches that mix the classes clearly worse than random ones would
        # mean length predicts the label; within-class grouping then keeps every batch mixed.
        batching = "stratified" if grouped_skew > 1.25 * random_skew else "length"
        log.info("batching: %s (label skew of length-grouped batches %.3f vs %.3f for random ones%s)", batching,
                 grouped_skew, random_skew, ": length predicts the label here" if batching == "stratified" else "")
    elif batching == "auto":
        batching = "length"
    if batching == "stratified" and dataset.labels is None:
        raise PeftlabError("batching=stratified needs labelled training data")
    return LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=seed,
                                     window=1 if batching == "random" else 50,
                                     labels=dataset.labels if batching == "stratified" else None)


def _lora_plus_ratio(cfg: RunConfig) -> float | None:
    return cfg.method.lora_plus_ratio if cfg.method.name == "lora_plus" else None


def _schedule(optimizer, warmup: int, total: int):
    """Linear warmup to the peak LR, then linear decay to zero (as the Trainer's default)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_OPTIMIZER = "optimizer.pt"


def trainable_state(model) -> dict:
    """The parameters being trained (LoRA weights and head; every weight for `full`)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, state: dict, optimizer=None, scheduler=None,
                    rng_states: list | None = None) -> None:
    """Write a checkpoint folder atomically: weights (safetensors), optimizer/scheduler/RNG
    (a tensors-only torch file, loadable with weights_only=True) and the loop state (JSON)."""
    from safetensors.torch import save_file

    from peftlab.files import replace_dir, write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(trainable_state(model), tmp / CHECKPOINT_WEIGHTS)
        if optimizer is not None:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": rng_states or [torch.get_rng_state()],
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       tmp / CHECKPOINT_OPTIMIZER)
        write_json_atomic(tmp / CHECKPOINT_STATE, state)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint_weights(path: Path, model) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(path / CHECKPOINT_WEIGHTS)
    except (OSError, SafetensorError) as exc:
        raise PeftlabError(f"checkpoint {path / CHECKPOINT_WEIGHTS} is unreadable ({str(exc)[:80]}): the file is "
                           f"truncated or corrupted; start the run again with --overwrite") from None
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PeftlabError(f"checkpoint {path} does not fit this model ({missing[0]} unknown): "
                           f"resume with the run's own config")
    wrong = [n for n, v in weights.items() if v.shape != params[n].shape]
    if wrong:
        raise PeftlabError(f"checkpoint {path} does not fit this model ({wrong[0]} has shape "
                           f"{tuple(weights[wrong[0]].shape)}, the model {tuple(params[wrong[0]].shape)}): "
                           f"resume with the run's own config")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the loop state."""
    import pickle

    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
        extra = torch.load(path / CHECKPOINT_OPTIMIZER, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise PeftlabError(f"checkpoint {path / CHECKPOINT_OPTIMIZER} holds objects other than tensors, which "
                           f"peftlab never loads (they could run code): start the run again with --overwrite") from None
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError) as exc:
        raise PeftlabError(f"checkpoint {path} is unreadable ({type(exc).__name__}): start the run again "
                           f"with --overwrite") from None
    load_checkpoint_weights(path, model)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra["torch_rng"]
    if rank >= len(rngs):
        raise PeftlabError(f"checkpoint {path} was written by {len(rngs)} processes: resume with the same number")
    torch.set_rng_state(rngs[rank])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


# Settings a resumed run may change: where results go, logging and checkpoint frequency,
# trackers and the token cache; none of them changes what is trained.
RESUME_SAFE_KEYS = frozenset({"name", "output_dir", "overwrite", "data.data_dir", "data.token_cache",
                              "train.log_every", "train.save_every", "train.tensorboard", "train.mlflow"})


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def check_resume_config(path: Path, cfg: RunConfig) -> None:
    """Refuse to resume from checkpoint `path` with settings other than those it was trained
    with (except RESUME_SAFE_KEYS): the run would silently mix both. Raises PeftlabError."""
    try:
        saved = json.loads((path / CHECKPOINT_STATE).read_text()).get("config")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise PeftlabError(f"checkpoint {path / CHECKPOINT_STATE} is unreadable: start the run again "
                           f"with --overwrite") from None
    if saved is None:  # written before checkpoints recorded their config
        return
    before, now = _flat(saved), _flat(cfg.to_dict())
    changed = [k for k in sorted(before.keys() | now.keys())
               if k not in RESUME_SAFE_KEYS and before.get(k) != now.get(k)]
    if changed:
        what = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise PeftlabError(f"cannot resume: the run's settings changed since its last checkpoint ({what}): "
                           f"put them back in its config.yaml, or start a new run")


class _StopRequest:
    """Ctrl-C (SIGINT) during training: finish the step, save a checkpoint, then stop; a
    second Ctrl-C stops at once. A KeyboardInterrupt mid-step would leave the optimizer
    half-updated, so the first one only sets a flag that the loop reads between steps."""

    def __enter__(self):
        self.requested = False
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: SIGINT stays as it was
            self.previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: finishing this step and saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def train_native(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                 precision: str, metrics_path: Path | None = None, *, checkpoint_dir: Path | None = None,
                 resume: bool = False, validate: Callable | None = None) -> dict:
    """Train `model` in place with peftlab's own loop; returns a summary dict.

    With `checkpoint_dir`, checkpoints go to `<dir>/last` every `save_every` steps and at
    each epoch end (and `<dir>/best` with a `validate` function), and `resume=True`
    continues from `<dir>/last` exactly where it stopped: same batch order, same dropout
    masks. `validate(model) -> metrics` is called every `eval_every` steps or epoch end.
    """
    from accelerate.state import AcceleratorState

    try:
        return _train_native(model, dataset, collator, cfg, precision, metrics_path, checkpoint_dir=checkpoint_dir,
                             resume=resume, validate=validate)
    finally:
        # Each run builds its own Accelerator (possibly with another precision); drop the
        # process-wide state so the next one may differ, also after a run that failed.
        AcceleratorState._reset_state()


def _train_native(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                  precision: str, metrics_path: Path | None = None, *, checkpoint_dir: Path | None = None,
                  resume: bool = False, validate: Callable | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    tc = cfg.train
    set_seed(tc.seed)
    # split_batches: the sampler yields global batches of `batch_size`, and each of N
    # processes gets 1/N of every batch, so the run sees the same batches on any N.
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=next(model.parameters()).device.type == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = accelerator.num_processes
    if tc.batch_size % world:
        raise PeftlabError(f"batch_size={tc.batch_size} does not split over {world} processes: use a multiple of {world}")
    if world > 1:
        log.info("distributed: %d processes x %d examples = global batch %d", world, tc.batch_size // world,
                 tc.batch_size)
    sampler = training_sampler(dataset, tc.batch_size, tc.seed, tc.batching)
    # A private generator: otherwise each new epoch iterator draws its base seed from the
    # global RNG, shifting the dropout masks that exact --resume must reproduce.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         generator=torch.Generator().manual_seed(tc.seed))
    steps_per_epoch = len(sampler)
    total = math.ceil(tc.epochs * steps_per_epoch)
    if tc.max_steps:
        total = min(total, tc.max_steps)
    warmup = max(1, int(tc.warmup_ratio * total))
    optimizer = _optimizer(model, cfg.lr, tc.weight_decay, _lora_plus_ratio(cfg), cfg.head_lr)
    scheduler = _schedule(optimizer, warmup, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    plain = accelerator.unwrap_model(model)
    if tc.compile:
        # Only the training forward/backward is compiled; checkpoints and evaluation use `plain`.
        # dynamic=True: batch lengths vary, and one graph per length would recompile each time.
        model = torch.compile(model, dynamic=True)
    after_step = prepare_step_hook(plain, total)
    main = accelerator.is_main_process

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "tokens": 0, "elapsed": 0.0,
             "losses": [], "validation": [], "best": None, "best_step": None, "bad_rounds": 0,
             "config": cfg.to_dict()}
    if resume:
        if checkpoint_dir is None or not (checkpoint_dir / "last" / CHECKPOINT_STATE).is_file():
            raise PeftlabError(f"nothing to resume: no checkpoint in {checkpoint_dir}; run without --resume")
        check_resume_config(checkpoint_dir / "last", cfg)
        state = load_checkpoint(checkpoint_dir / "last", plain, optimizer, scheduler, accelerator.process_index)
        state["config"] = cfg.to_dict()
        log.info("resumed from step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch_in_epoch"])
        if metrics_path and metrics_path.is_file() and main:
            # Drop what was logged after the checkpoint: those steps run again.
            kept = [line for line in metrics_path.read_text().splitlines()
                    if json.loads(line).get("step", 0) <= state["step"]]
            metrics_path.write_text("".join(line + "\n" for line in kept))
    log.info("training: %d steps (%d per epoch, batch %d, lr %.2g%s, warmup %d), precision %s, %s",
             total, steps_per_epoch, tc.batch_size, cfg.lr,
             f", head lr {cfg.head_lr:.2g}" if cfg.head_lr != cfg.lr else "", warmup, precision, accelerator.device)

    running, unread_tokens, running_n = None, None, 0

    def record(entry: dict) -> None:
        if main:
            append_metrics_log(metrics_path, entry)

    def count_tokens() -> None:
        nonlocal unread_tokens
        if unread_tokens is not None:
            state["tokens"] += int(unread_tokens)
            unread_tokens = None

    def checkpoint() -> None:
        count_tokens()
        # Every process has its own dropout RNG stream: collect them all for an exact resume.
        rng_states = gather_objects(torch.get_rng_state()) if checkpoint_dir is not None else None
        if checkpoint_dir is not None and main:
            state["elapsed"] = elapsed_before + time.perf_counter() - start
            save_checkpoint(checkpoint_dir / "last", plain, state, optimizer, scheduler, rng_states)

    model.train()
    elapsed_before, start = state["elapsed"], time.perf_counter()
    bar = tqdm(total=total, initial=state["step"], desc="train", disable=None if main else True)
    stop = state.get("early_stopped", False)
    with _StopRequest() as interrupt:
        while state["step"] < total and not stop:
            # accelerate's loader re-sets the sampler's epoch from its own counter when iteration
            # starts (one process) or not at all (several: the sampler sits inside its shard
            # wrapper), so both are set here.
            loader.set_epoch(state["epoch"])
            sampler.set_epoch(state["epoch"])
            sampler.skip = state["batch_in_epoch"]
            for batch in loader:
                # forward/backward (autocast comes from accelerate's mixed_precision)
                loss = model(**batch).loss
                accelerator.backward(loss)
                # clip, step, schedule
                if tc.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if after_step is not None:  # AdaLoRA: needs this step's gradients, so before zero_grad
                    after_step(state["step"] + 1)
                optimizer.zero_grad(set_to_none=True)
                # Reading the loss would sync host and device every step: keep a detached sum
                # and read it only when logging, checkpointing or validating.
                running = loss.detach().float() if running_n == 0 else running + loss.detach().float()
                running_n += 1
                state["step"] += 1
                state["batch_in_epoch"] += 1
                state["samples"] += batch["input_ids"].shape[0] * world  # this process holds 1/world
                tokens = batch["attention_mask"].sum() * world  # stays on the device: no sync
                unread_tokens = tokens if unread_tokens is None else unread_tokens + tokens
                step = state["step"]
                epoch_end = state["batch_in_epoch"] == steps_per_epoch
                if epoch_end:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                last = step == total
                bar.update(1)

                if step % tc.log_every == 0 or last or (epoch_end and running_n):
                    # Each process holds the loss of its share of the batch: average them.
                    mean = float(accelerator.reduce(running, reduction="mean") if world > 1 else running) / running_n
                    running_n = 0
                    if not math.isfinite(mean):
                        kept = checkpoint_dir / "last" if checkpoint_dir and (checkpoint_dir / "last").exists() else None
                        raise PeftlabError(
                            f"training loss became {mean} by step {step}: the run diverged"
                            + (f"; the last good checkpoint is kept in {kept}" if kept else "")
                            + "; lower the learning rate (lr=...) and start again"
                        )
                    elapsed = elapsed_before + time.perf_counter() - start
                    entry = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": mean,
                             "lr": scheduler.get_last_lr()[0], "samples_per_s": state["samples"] / elapsed}
                    state["losses"].append({"step": step, "loss": mean})
                    record(entry)
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{entry['lr']:.2e}")
                    if bar.disable:
                        log.info("step %d/%d  loss %.4f  lr %.2e  %.1f samples/s", step, total, mean,
                                 entry["lr"], entry["samples_per_s"])

                if validate is not None and ((tc.eval_every and step % tc.eval_every == 0)
                                             or (not tc.eval_every and epoch_end) or last):
                    metrics = validate(plain)
                    model.train()
                    value = metrics[tc.metric_for_best]
                    entry = {"step": step, **{f"val_{k}": metrics[k] for k in ("loss", "accuracy", "macro_f1")}}
                    state["validation"].append(entry)
                    record(entry)
                    improved = _better(tc.metric_for_best, value, state["best"])
                    log.info("validation at step %d: loss %.4f  accuracy %.4f  macro-F1 %.4f%s", step,
                             metrics["loss"], metrics["accuracy"], metrics["macro_f1"], "  (best so far)" if improved else "")
                    if improved:
                        state.update(best=value, best_step=step, bad_rounds=0)
                        if checkpoint_dir is not None and main:
                            save_checkpoint(checkpoint_dir / "best", plain, {"step": step, tc.metric_for_best: value})
                    else:
                        state["bad_rounds"] += 1
                        if tc.early_stopping_patience and state["bad_rounds"] >= tc.early_stopping_patience:
                            log.info("early stopping at step %d: no better %s for %d validation rounds (best %.4f at "
                                     "step %d)", step, tc.metric_for_best, state["bad_rounds"], state["best"],
                                     state["best_step"])
                            stop = state["early_stopped"] = True

                if (tc.save_every and step % tc.save_every == 0) or epoch_end or last or stop or interrupt.requested:
                    checkpoint()
                if interrupt.requested:
                    bar.close()
                    raise KeyboardInterrupt
                if last or stop:
                    break
    bar.close()
    count_tokens()
    elapsed = elapsed_before + time.perf_counter() - start
    if validate is not None and tc.load_best and checkpoint_dir is not None and (checkpoint_dir / "best").exists() \
            and state["best_step"] != state["step"]:
        load_checkpoint_weights(checkpoint_dir / "best", plain)
        log.info("loaded the best checkpoint (step %d, %s %.4f)", state["best_step"], tc.metric_for_best, state["best"])
    accelerator.free_memory()
    return {
        "engine": "native",
        "steps": state["step"],
        "epochs": state["step"] / steps_per_epoch,
        "train_seconds": elapsed,
        "train_samples_per_s": state["samples"] / elapsed,
        "train_tokens_per_s": state["tokens"] / elapsed,
        "final_loss": state["losses"][-1]["loss"] if state["losses"] else float("nan"),
        "loss_history": state["losses"],
        "validation": state["validation"],
        "best_step": state["best_step"],
        "early_stopped": stop,
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


def _trainer_args(cfg: RunConfig, precision: str, output_dir: Path, device: torch.device):
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


def _make_trainer(model, cfg: RunConfig, precision: str, output_dir: Path, collator: PadCollator,
                  train_dataset=None, metrics_path: Path | None = None):
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
            append_metrics_log(metrics_path, {"step": state.global_step, "epoch": round(state.epoch or 0.0, 3),
                                              "loss": logs["loss"], "lr": logs.get("learning_rate")})

    # LoRA+ and a separate head rate need their own parameter groups; otherwise the
    # Trainer builds its default AdamW.
    ratio = _lora_plus_ratio(cfg)
    custom = ratio or cfg.head_lr != cfg.lr
    optimizer = _optimizer(model, cfg.lr, cfg.train.weight_decay, ratio, cfg.head_lr) if custom else None
    return Trainer(
        model=model,
        args=_trainer_args(cfg, precision, output_dir, next(model.parameters()).device),
        train_dataset=_ListDataset(train_dataset) if train_dataset is not None else None,
        data_collator=collator,
        callbacks=[StepHook(), MetricsLog()] if train_dataset is not None else None,
        optimizers=(optimizer, None),
    )


def train_with_trainer(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig,
                       precision: str, work_dir: Path, metrics_path: Path | None = None) -> dict:
    """Train `model` in place with the Hugging Face Trainer; returns the same summary. Loss
    logs are appended to `metrics_path` as the native loop writes them."""
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

    trainer = SortedBatchesTrainer(model=model, args=_trainer_args(cfg, precision, work_dir, next(model.parameters()).device),
                                   data_collator=collator)
    try:
        output = trainer.predict(_ListDataset(dataset))
    finally:
        AcceleratorState._reset_state()
    logits = np.zeros_like(output.predictions, dtype=np.float32)
    logits[order] = output.predictions
    return logits
