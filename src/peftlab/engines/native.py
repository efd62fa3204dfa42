"""peftlab's own training loop (on accelerate) and its batched prediction.

`train` sets up in dependency order (accelerator, batches, optimizer and schedule, resumed
state), then runs the loop: one step per batch, then logging, validation and checkpointing
as named helpers of `_Loop`. A run resumed from its checkpoint continues exactly: the
same batch order and the same dropout masks as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from peftlab import checkpoint
from peftlab.checkpoint import TrainState
from peftlab.config import RunConfig
from peftlab.data import (
    LengthGroupedBatchSampler,
    PackCollator,
    PadCollator,
    TokenizedDataset,
    label_skew,
    token_batches,
)
from peftlab.errors import PeftlabError
from peftlab.fastpath import lean_layers
from peftlab.methods import prepare_step_hook
from peftlab.metrics import append_metrics_log, compute_metrics
from peftlab.models import PackedForward
from peftlab.optim import build_optimizer, linear_schedule
from peftlab.results import TrainSummary
from peftlab.runtime import autocast, cpu_dropout, frozen_weights_cast, gather_objects

log = logging.getLogger("peftlab")


def training_sampler(
    dataset: TokenizedDataset, batch_size: int, seed: int, batching: str = "auto", packed: bool = False
) -> LengthGroupedBatchSampler:
    """The training batch sampler for `batching` (TrainConfig.batching); `auto` resolved
    from the data itself (or, for `packed` batches, to stratified) and logged."""
    if batching == "auto" and packed:
        # Packed batches carry no padding whatever their lengths: keep every batch's class mix.
        batching = "stratified" if dataset.labels is not None else "random"
        log.info("batching: %s (packed batches)", batching)
    elif batching == "auto" and dataset.labels is not None:
        length = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=seed)
        random = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle=True, seed=seed, window=1)
        grouped_skew, random_skew = (
            label_skew(length.batches(), dataset.labels),
            label_skew(random.batches(), dataset.labels),
        )
        # Length-grouped batches that mix the classes clearly worse than random ones would
        # mean length predicts the label; within-class grouping then keeps every batch mixed.
        batching = "stratified" if grouped_skew > 1.25 * random_skew else "length"
        log.info(
            "batching: %s (label skew of length-grouped batches %.3f vs %.3f for random ones%s)",
            batching,
            grouped_skew,
            random_skew,
            ": length predicts the label here" if batching == "stratified" else "",
        )
    elif batching == "auto":
        batching = "length"
    if batching == "stratified" and dataset.labels is None:
        raise PeftlabError("batching=stratified needs labelled training data")
    return LengthGroupedBatchSampler(
        dataset.lengths,
        batch_size,
        shuffle=True,
        seed=seed,
        window=1 if batching == "random" else 50,
        labels=dataset.labels if batching == "stratified" else None,
    )


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


@dataclass
class _Setup:
    """What the loop runs on, built by `_set_up`."""

    accelerator: object
    model: torch.nn.Module  # prepared (and compiled, with train.compile) for training
    plain: torch.nn.Module  # the same weights unwrapped: checkpoints and validation use it
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: LengthGroupedBatchSampler
    loader: object
    steps_per_epoch: int
    total: int
    warmup: int
    packing: PackedForward | None  # hooks that let the model take packed batches (removed after training)


def _set_up(model, dataset: TokenizedDataset, collator: PadCollator, cfg: RunConfig, precision: str) -> _Setup:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    tc = cfg.train
    set_seed(tc.seed)
    # split_batches: the sampler yields global batches of `batch_size`, and each of N
    # processes gets 1/N of every batch, so the run sees the same batches on any N.
    accelerator = Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        cpu=next(model.parameters()).device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    world = accelerator.num_processes
    if tc.batch_size % world:
        raise PeftlabError(
            f"batch_size={tc.batch_size} does not split over {world} processes: use a multiple of {world}"
        )
    if world > 1:
        log.info(
            "distributed: %d processes x %d examples = global batch %d", world, tc.batch_size // world, tc.batch_size
        )
    packing = _packing(model, dataset, collator, tc.packing, world)
    # Batches depend on the setting, not on whether this model could pack: the same on any
    # number of processes (which train padded) and for methods that cannot pack.
    sampler = training_sampler(dataset, tc.batch_size, tc.seed, tc.batching, packed=tc.packing != "never")
    # A private generator: otherwise each new epoch iterator draws its base seed from the
    # global RNG, shifting the dropout masks that exact --resume must reproduce.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator if packing is None else _pack_collator(packing, collator),
        generator=torch.Generator().manual_seed(tc.seed),
    )
    total = tc.total_steps(len(sampler))
    warmup = max(1, int(tc.warmup_ratio * total))
    optimizer = build_optimizer(model, cfg)
    scheduler = linear_schedule(optimizer, warmup, total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    plain = accelerator.unwrap_model(model)
    if tc.compile:
        # Only the training forward/backward is compiled; checkpoints and evaluation use `plain`.
        # dynamic=True: batch lengths vary, and one graph per length would recompile each time.
        model = torch.compile(model, dynamic=True)
    return _Setup(
        accelerator, model, plain, optimizer, scheduler, sampler, loader, len(sampler), total, warmup, packing
    )


def _pack_collator(packing: PackedForward, collator: PadCollator) -> PackCollator:
    return PackCollator(collator.pad_token_id, pool="last" if packing.decoder else "first")


def _packing(model, dataset: TokenizedDataset, collator: PadCollator, mode: str, world: int) -> PackedForward | None:
    """PackedForward hooks on `model` if this run packs its batches (train.packing), else None."""
    if mode == "never":
        return None
    why = PackedForward.supported(model)
    if why is None and world > 1:
        why = "several processes split each batch by rows, and packed rows hold several texts"
    packing = None
    if why is None:
        packing = PackedForward(model)
        why = _packing_mismatch(model, dataset, collator, packing)
        if why is not None:
            packing.remove()
            packing = None
    if why is not None:
        if mode == "always":
            raise PeftlabError(f"train.packing=always, but {why}: use packing=auto or packing=never")
        log.info("packing: off (%s)", why)
        return None
    log.info(
        "packing: on (each batch's texts share one row, in groups of similar length; attention stays inside each text)"
    )
    return packing


# model -> (its structure when checked, the verdict): a run checks its model once, not again
# for each evaluation (two fp32 passes, 0.1 s: 6% of evaluating the SMS test split).
_PACKING_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _packing_mismatch(model, dataset: TokenizedDataset, collator: PadCollator, packing: PackedForward) -> str | None:
    """Why `model` (with `packing`'s hooks on) cannot be trusted with packed batches, judged on
    the dataset's first examples; None when packed logits equal padded ones. Judged once per
    model and structure (its modules and dtype): whether packing is exact does not depend on
    the weights' values, which training changes."""
    dtype = next(model.parameters()).dtype
    structure = (dtype, sum(1 for _ in model.modules()))
    known = _PACKING_VERDICTS.get(model)
    if known is not None and known[0] == structure:
        return known[1]
    sample = [dataset[i] for i in range(min(8, len(dataset)))]
    try:
        gap = packing_gap(model, sample, collator, _pack_collator(packing, collator))
        # fp32 sums in another order differ by ~1e-6; a wrong mask or pooled token by far more.
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        why = None if gap <= tolerance else f"packed logits differ from padded ones by {gap:.2g} on this model"
    except PeftlabError as exc:  # e.g. attention options the per-text attention does not take
        why = str(exc)
    _PACKING_VERDICTS[model] = (structure, why)
    return why


@torch.no_grad()
def packing_gap(model, examples: list[dict], collator: PadCollator, packer: PackCollator) -> float:
    """Largest difference between `model`'s logits on `examples` padded and packed (model in
    eval mode, fp32 compute, PackedForward hooks installed)."""
    was_training = model.training
    model.eval()
    try:
        padded = collator(examples)
        padded.pop("labels", None)
        packed = packer(examples)
        packed.pop("labels", None)
        device = next(model.parameters()).device
        a = model(**{k: v.to(device) for k, v in padded.items()}).logits.float()
        b = model(**{k: v.to(device) for k, v in packed.items()}).logits.float()
        return float((a - b).abs().max())
    finally:
        model.train(was_training)


def _resume(run: _Setup, cfg: RunConfig, checkpoint_dir: Path | None, metrics_path: Path | None) -> TrainState:
    """The state of the last checkpoint, restored into model, optimizer, scheduler and RNG;
    metrics logged after it are dropped (those steps run again)."""
    last = checkpoint_dir / "last" if checkpoint_dir is not None else None
    if last is None or not (last / checkpoint.STATE).is_file():
        raise PeftlabError(f"nothing to resume: no checkpoint in {checkpoint_dir}; run without --resume")
    checkpoint.check_resume_config(last, cfg.to_dict())
    state = checkpoint.load(last, run.plain, run.optimizer, run.scheduler, run.accelerator.process_index)
    state.config = cfg.to_dict()
    log.info("resumed from step %d (epoch %d, batch %d)", state.step, state.epoch, state.batch_in_epoch)
    if metrics_path and metrics_path.is_file() and run.accelerator.is_main_process:
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line).get("step", 0) <= state.step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    return state


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


class _Loop:
    """The training loop's state between steps, and what it does besides stepping."""

    def __init__(
        self,
        run: _Setup,
        cfg: RunConfig,
        state: TrainState,
        metrics_path: Path | None,
        checkpoint_dir: Path | None,
        validate: Callable | None,
    ):
        self.run, self.tc, self.state = run, cfg.train, state
        self.metrics_path, self.checkpoint_dir, self.validate_fn = metrics_path, checkpoint_dir, validate
        self.world, self.main = run.accelerator.num_processes, run.accelerator.is_main_process
        self.after_step = prepare_step_hook(run.plain, run.total)
        # Clipping walks the parameters it is given: the trainable ones, not every frozen one.
        self.trainable = [p for p in run.model.parameters() if p.requires_grad]
        # Reading the loss or the token count would sync host and device every step: keep
        # detached sums and read them only when logging, checkpointing or validating.
        self.running, self.running_n, self.unread_tokens = None, 0, None
        self.elapsed_before, self.start = state.elapsed, time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def step(self, batch: dict) -> None:
        """One optimizer step on `batch`, and the counters that follow it."""
        run, state = self.run, self.state
        # forward/backward (autocast comes from accelerate's mixed_precision)
        loss = run.model(**batch).loss
        run.accelerator.backward(loss)
        # clip, step, schedule
        if self.tc.max_grad_norm:
            run.accelerator.clip_grad_norm_(self.trainable, self.tc.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        if self.after_step is not None:  # AdaLoRA: needs this step's gradients, so before zero_grad
            self.after_step(state.step + 1)
        run.optimizer.zero_grad(set_to_none=True)
        self.running = loss.detach().float() if self.running_n == 0 else self.running + loss.detach().float()
        self.running_n += 1
        state.step += 1
        state.batch_in_epoch += 1
        state.samples += len(batch["labels"]) * self.world  # this process holds 1/world
        real = batch["sequence_ids"] > 0 if "sequence_ids" in batch else batch["attention_mask"]
        tokens = real.sum() * self.world  # stays on the device: no sync
        self.unread_tokens = tokens if self.unread_tokens is None else self.unread_tokens + tokens
        if state.batch_in_epoch == run.steps_per_epoch:
            state.epoch += 1
            state.batch_in_epoch = 0

    def log(self, bar) -> None:
        """Log the mean loss since the last log; stop the run if it is not finite."""
        run, state = self.run, self.state
        # Each process holds the loss of its share of the batch: average them.
        total = run.accelerator.reduce(self.running, reduction="mean") if self.world > 1 else self.running
        mean = float(total) / self.running_n
        self.running_n = 0
        if not math.isfinite(mean):
            last = self.checkpoint_dir / "last" if self.checkpoint_dir else None
            kept = f"; the last good checkpoint is kept in {last}" if last and last.exists() else ""
            raise PeftlabError(
                f"training loss became {mean} by step {state.step}: the run diverged{kept}; "
                f"lower the learning rate (lr=...) and start again"
            )
        entry = {
            "step": state.step,
            "epoch": round(state.step / run.steps_per_epoch, 3),
            "loss": mean,
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_s": state.samples / self.elapsed(),
        }
        state.losses.append({"step": state.step, "loss": mean})
        if self.main:
            append_metrics_log(self.metrics_path, entry)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{entry['lr']:.2e}")
        if bar.disable:
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s",
                state.step,
                run.total,
                mean,
                entry["lr"],
                entry["samples_per_s"],
            )

    def validate(self) -> None:
        """Evaluate on the validation split, keep the best checkpoint, decide early stopping."""
        tc, state = self.tc, self.state
        metrics = self.validate_fn(self.run.plain)
        self.run.model.train()
        value = metrics[tc.metric_for_best]
        entry = {"step": state.step, **{f"val_{k}": metrics[k] for k in ("loss", "accuracy", "macro_f1")}}
        state.validation.append(entry)
        if self.main:
            append_metrics_log(self.metrics_path, entry)
        improved = _better(tc.metric_for_best, value, state.best)
        log.info(
            "validation at step %d: loss %.4f  accuracy %.4f  macro-F1 %.4f%s",
            state.step,
            metrics["loss"],
            metrics["accuracy"],
            metrics["macro_f1"],
            "  (best so far)" if improved else "",
        )
        if improved:
            state.best, state.best_step, state.bad_rounds = value, state.step, 0
            if self.checkpoint_dir is not None and self.main:
                checkpoint.save(
                    self.checkpoint_dir / "best", self.run.plain, {"step": state.step, tc.metric_for_best: value}
                )
            return
        state.bad_rounds += 1
        if tc.early_stopping_patience and state.bad_rounds >= tc.early_stopping_patience:
            log.info(
                "early stopping at step %d: no better %s for %d validation rounds (best %.4f at step %d)",
                state.step,
                tc.metric_for_best,
                state.bad_rounds,
                state.best,
                state.best_step,
            )
            state.early_stopped = True

    def count_tokens(self) -> None:
        if self.unread_tokens is not None:
            self.state.tokens += int(self.unread_tokens)
            self.unread_tokens = None

    def checkpoint(self) -> None:
        """Save `<checkpoint_dir>/last`: weights, optimizer, schedule, every process's RNG."""
        self.count_tokens()
        if self.checkpoint_dir is None:
            return
        # Every process has its own dropout RNG stream: collect them all for an exact resume.
        rng_states = gather_objects(torch.get_rng_state())
        if self.main:
            self.state.elapsed = self.elapsed()
            checkpoint.save(
                self.checkpoint_dir / "last",
                self.run.plain,
                self.state.to_dict(),
                self.run.optimizer,
                self.run.scheduler,
                rng_states,
            )


def train(
    model,
    dataset: TokenizedDataset,
    collator: PadCollator,
    cfg: RunConfig,
    precision: str,
    metrics_path: Path | None = None,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    validate: Callable | None = None,
) -> TrainSummary:
    """Train `model` in place; returns a TrainSummary.

    With `checkpoint_dir`, checkpoints go to `<dir>/last` every `save_every` steps and at
    each epoch end (and `<dir>/best` with a `validate` function), and `resume=True`
    continues from `<dir>/last` exactly where it stopped. `validate(model) -> metrics` is
    called every `eval_every` steps, or at each epoch end.
    """
    from accelerate.state import AcceleratorState

    try:
        return _train(model, dataset, collator, cfg, precision, metrics_path, checkpoint_dir, resume, validate)
    finally:
        # Each run builds its own Accelerator (possibly with another precision); drop the
        # process-wide state so the next one may differ, also after a run that failed.
        AcceleratorState._reset_state()


def _log_plan(run: _Setup, cfg: RunConfig, precision: str) -> None:
    head_lr = f", head lr {cfg.head_lr:.2g}" if cfg.head_lr != cfg.lr else ""
    tc = cfg.train
    budget = tc.epochs is None and run.total == tc.min_steps > 2 * run.steps_per_epoch
    epochs = f"{run.total / run.steps_per_epoch:.1f} epochs: train.min_steps on a small training set" if budget else ""
    log.info(
        "training: %d steps (%s%d per epoch, batch %d, lr %.2g%s, warmup %d), precision %s, %s",
        *(run.total, epochs + ", " if epochs else "", run.steps_per_epoch, tc.batch_size, cfg.lr, head_lr),
        run.warmup,
        precision,
        run.accelerator.device,
    )


def _summary(loop: _Loop, precision: str) -> TrainSummary:
    """How the run went; with a validation split, the best checkpoint's weights loaded first."""
    state, tc, best_dir = loop.state, loop.tc, loop.checkpoint_dir / "best" if loop.checkpoint_dir else None
    loop.count_tokens()
    elapsed = loop.elapsed()
    if loop.run.packing is not None:
        loop.run.packing.remove()
    if loop.validate_fn and tc.load_best and best_dir and best_dir.exists() and state.best_step != state.step:
        checkpoint.load_weights(best_dir, loop.run.plain)
        log.info("loaded the best checkpoint (step %d, %s %.4f)", state.best_step, tc.metric_for_best, state.best)
    loop.run.accelerator.free_memory()
    return TrainSummary(
        engine="native",
        steps=state.step,
        epochs=state.step / loop.run.steps_per_epoch,
        train_seconds=elapsed,
        train_samples_per_s=state.samples / elapsed,
        train_tokens_per_s=state.tokens / elapsed,
        final_loss=state.losses[-1]["loss"] if state.losses else float("nan"),
        precision=precision,
        loss_history=state.losses,
        validation=state.validation,
        best_step=state.best_step,
        early_stopped=state.early_stopped,
    )


def _train(model, dataset, collator, cfg, precision, metrics_path, checkpoint_dir, resume, validate) -> TrainSummary:
    tc = cfg.train
    run = _set_up(model, dataset, collator, cfg, precision)
    state = _resume(run, cfg, checkpoint_dir, metrics_path) if resume else TrainState(config=cfg.to_dict())
    _log_plan(run, cfg, precision)
    loop = _Loop(run, cfg, state, metrics_path, checkpoint_dir, validate)
    run.model.train()
    bar = tqdm(total=run.total, initial=state.step, desc="train", disable=None if loop.main else True)
    cast = frozen_weights_cast(run.plain, run.accelerator.device, precision)
    dropout = cpu_dropout(run.plain, run.accelerator.device)
    lean = contextlib.nullcontext() if tc.compile else lean_layers(run.plain, run.accelerator.device)
    with _StopRequest() as interrupt, bar, cast, dropout, lean:
        while state.step < run.total and not state.early_stopped:
            # accelerate's loader re-sets the sampler's epoch from its own counter when iteration
            # starts (one process) or not at all (several: the sampler sits inside its shard
            # wrapper), so both are set here.
            run.loader.set_epoch(state.epoch)
            run.sampler.set_epoch(state.epoch)
            run.sampler.skip = state.batch_in_epoch
            for batch in run.loader:
                loop.step(batch)
                bar.update(1)
                epoch_end, last = state.batch_in_epoch == 0, state.step == run.total
                if state.step % tc.log_every == 0 or last or (epoch_end and loop.running_n):
                    loop.log(bar)
                if validate is not None and (last or (state.step % tc.eval_every == 0 if tc.eval_every else epoch_end)):
                    loop.validate()
                saving_due = tc.save_every and state.step % tc.save_every == 0
                if saving_due or epoch_end or last or state.early_stopped or interrupt.requested:
                    loop.checkpoint()
                if interrupt.requested:
                    raise KeyboardInterrupt
                if last or state.early_stopped:
                    break
    return _summary(loop, precision)


@torch.inference_mode()
def predict_logits(
    model,
    dataset: TokenizedDataset,
    collator: PadCollator,
    batch_size: int,
    precision: str = "fp32",
    desc: str = "eval",
) -> np.ndarray:
    """Logits (float32, shape [n, num_labels]) in dataset order.

    Batches are formed longest-first and packed where the model takes them (`_eval_packing`),
    else each is padded to its own longest text.
    """
    import torch.distributed as dist

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    out = np.zeros((len(dataset), model.config.num_labels), dtype=np.float32)
    start = time.perf_counter()
    # Packing's check against padding runs (in fp32) before autocast and the bf16 weights.
    packing = _eval_packing(model, dataset, collator)
    cast = frozen_weights_cast(model, device, precision)
    with packing as collate, autocast(device, precision), cast, lean_layers(model, device):
        batches, collate = _eval_batches(dataset, batch_size, collate)
        # Under several processes each evaluates every N-th batch and the logits are gathered:
        # every example is counted exactly once, with no padding of the last shard.
        if distributed:
            batches = batches[dist.get_rank() :: dist.get_world_size()]
        for indices in tqdm(batches, desc=desc, leave=False, disable=None):
            batch = collate([dataset[i] for i in indices])
            batch.pop("labels", None)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            out[indices] = logits.float().cpu().numpy()
    if distributed:
        mine = [i for b in batches for i in b]
        for indices, logits in gather_objects((mine, out[mine])):
            out[indices] = logits
    log.debug("%s: %d examples in %.1fs", desc, len(dataset), time.perf_counter() - start)
    model.train(was_training)
    return out


def _eval_batches(dataset: TokenizedDataset, batch_size: int, collate) -> tuple[list[list[int]], Callable]:
    """Evaluation's batches, longest first, and the collate function for them: `batch_size`
    texts each when padded; when packed, rows of about `batch_size` texts of the mean length
    (`token_batches`), all padded to one length (the last aside), so a CPU's matmul kernels
    are built for one shape, not one per batch (SMS test split, MiniLM, bf16: see
    bench/README.md)."""
    lengths = dataset.lengths
    if not isinstance(collate, PackCollator) or not len(lengths):
        return list(LengthGroupedBatchSampler(lengths, batch_size, shuffle=False)), collate
    budget = max(max(lengths), round(batch_size * sum(lengths) / len(lengths)))
    budget = -(-budget // collate.multiple) * collate.multiple
    # A row's slots add a little to its texts' tokens (ragged groups): room for that.
    rows = PackCollator(collate.pad_token_id, collate.pool, collate.multiple, row_tokens=budget + 2 * collate.multiple)
    return token_batches(lengths, budget), rows


@contextlib.contextmanager
def _eval_packing(model, dataset: TokenizedDataset, collator: PadCollator):
    """The collate function evaluation uses: packed batches where the model takes them (the
    training run's PackedForward if its hooks are on, else hooks for this evaluation,
    checked against padding on the first examples first, in fp32), else `collator`. Sorted
    batches still pad each text to its batch's longest rounded up to 8; packed ones do not
    (MiniLM on the SMS test split, bf16: 1.18x, forward passes interleaved)."""
    packing = PackedForward.active(model)
    own = None
    if packing is None and PackedForward.supported(model) is None and len(dataset) > 1:
        own = PackedForward(model)
        if _packing_mismatch(model, dataset, collator, own) is not None:
            own.remove()
            own = None
        packing = own
    try:
        yield collator if packing is None else _pack_collator(packing, collator)
    finally:
        if own is not None:
            own.remove()


def evaluate(
    model,
    dataset: TokenizedDataset,
    collator: PadCollator,
    label_names: list[str],
    batch_size: int,
    precision: str = "fp32",
    desc: str = "eval",
) -> tuple[dict, np.ndarray]:
    """Metrics (with eval_seconds and eval_samples_per_s) and logits of `model` on a labelled dataset."""
    start = time.perf_counter()
    logits = predict_logits(model, dataset, collator, batch_size, precision, desc)
    metrics = compute_metrics(logits, dataset.labels, label_names)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_samples_per_s"] = len(dataset) / max(metrics["eval_seconds"], 1e-9)
    return metrics, logits
