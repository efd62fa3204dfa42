"""The whole experiment, in dependency order: data, model, baseline, method, train, save,
reload, evaluate, report. This is the library API behind `peftlab run` and `peftlab train`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peftlab import artifacts, files, rundir
from peftlab.config import DataConfig, ModelConfig, RunConfig
from peftlab.data import DataBundle, PadCollator, load_data, tokenize, tokenize_split
from peftlab.engines import get_engine
from peftlab.engines.native import evaluate, predict_logits
from peftlab.errors import Interrupted, PeftlabError
from peftlab.methods import apply_method, count_parameters
from peftlab.metrics import compute_metrics, softmax
from peftlab.models import base_fingerprint, head_module_names, load_model, set_model_dropout
from peftlab.report import REPORT_FORMAT_VERSION, markdown, model_card, write_html_report
from peftlab.results import TrainSummary
from peftlab.runtime import cpu_description, distributed_state, resolve_device, resolve_precision

log = logging.getLogger("peftlab")


def prepare_run_dir(cfg: RunConfig, resume: bool = False) -> rundir.RunDir:
    """Claim the run directory (rundir.claim). A user-named one that exists needs
    `overwrite`, and only a run directory is ever replaced; a default name gets a numeric
    suffix instead, so earlier results are never replaced. With `resume`, the named directory
    must be an unfinished run's."""
    root = Path(cfg.output_dir)
    if resume:
        return rundir.reopen(root / (cfg.name or ""))
    if cfg.name:
        return rundir.claim(root, cfg.name, cfg.overwrite)
    if cfg.overwrite:
        return rundir.claim(root, cfg.default_name(), overwrite=True)
    return rundir.claim_default(root, cfg.default_name())


def _main_decides(fn):
    """Run `fn` on the main process only and hand its result (or its PeftlabError) to all
    processes, so every process agrees on e.g. the run directory's name."""
    state = distributed_state()
    if state.num_processes == 1:
        return fn()
    import torch.distributed as dist

    box = [None]
    if state.is_main_process:
        try:
            box = [("ok", fn())]
        except PeftlabError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise PeftlabError(value)
    return value


def _eval(
    engine, model, dataset, collator, bundle: DataBundle, cfg: RunConfig, precision: str, run_dir: Path, desc: str
) -> tuple[dict, np.ndarray]:
    """Logits from the run's engine; metrics computed the same way for every engine."""
    start = time.perf_counter()
    logits = engine.predict_logits(model, dataset, collator, cfg, precision, run_dir, desc)
    metrics = compute_metrics(logits, dataset.labels, bundle.label_names)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["eval_samples_per_s"] = len(dataset) / max(metrics["eval_seconds"], 1e-9)
    return metrics, logits


def _log_metrics(what: str, metrics: dict) -> None:
    log.info(
        "%s: loss %.4f  accuracy %.4f  macro-F1 %.4f  (%d examples, %.1fs)",
        what,
        metrics["loss"],
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["n"],
        metrics["eval_seconds"],
    )


def run_experiment(
    cfg: RunConfig,
    *,
    baseline: bool = True,
    reload: bool = True,
    bundle: DataBundle | None = None,
    resume: bool = False,
    on_validation: Callable[[int, dict], None] | None = None,
) -> dict:
    """Run steps 1-8 (or, with baseline/reload off, just train + evaluate) and write the run dir.

    Returns the report dict (also saved as report.json). `bundle` lets API callers pass
    data already loaded (e.g. from a DataFrame). `resume` continues the named run from its
    last checkpoint. `on_validation(round, metrics)` sees each validation round's metrics
    (rounds count from 1); an exception it raises stops the run (a search's pruner does).
    Raises PeftlabError on bad input; a run that fails leaves `FAILED.txt` in its directory
    saying why.
    """
    cfg.validate()
    if resume and cfg.train.engine != "native":
        raise PeftlabError("--resume needs engine=native (the Trainer engine keeps no peftlab checkpoints)")
    main = distributed_state().is_main_process  # under torchrun/accelerate launch, only it writes files
    claimed = []

    def prepare():
        claimed.append(prepare_run_dir(cfg, resume))
        run_dir = claimed[0].path
        if not resume:
            files.write_text_atomic(run_dir / "config.yaml", cfg.to_yaml())
        return str(run_dir), run_dir.name

    # A validated config is never changed: the run's name is its folder's (default names are numbered).
    run_dir = Path(_main_decides(prepare)[0])
    try:
        report = _run(cfg, run_dir, _Steps(baseline, reload, resume, on_validation), bundle, main)
    except KeyboardInterrupt:
        saved = (run_dir / "checkpoints" / "last").is_dir()
        exc = Interrupted(
            f"interrupted; a checkpoint is saved: continue with `peftlab run --resume {run_dir}`"
            if saved
            else "interrupted before the first checkpoint: start the run again"
        )
        if main:
            _record_failure(run_dir, exc, fresh=not resume)
        raise exc from None
    except BaseException as exc:
        if main:
            _record_failure(run_dir, exc, fresh=not resume)
        raise
    finally:
        for claim in claimed:
            claim.release()
    if main:
        (run_dir / "FAILED.txt").unlink(missing_ok=True)
    return report


def _record_failure(run_dir: Path, exc: BaseException, fresh: bool) -> None:
    """FAILED.txt saying why; but a new run that stopped on bad input before it trained
    anything leaves no folder, so that its name is free for the corrected run."""
    if (
        fresh
        and isinstance(exc, PeftlabError)
        and not (run_dir / "checkpoints").exists()
        and not (run_dir / "adapter").exists()
    ):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    try:
        files.write_text_atomic(run_dir / "FAILED.txt", f"{type(exc).__name__}: {exc}\n")
    except OSError:  # the disk that failed the run may not take this note either
        log.warning("could not write %s", run_dir / "FAILED.txt")


@dataclass
class _Loaded:
    """The base model and what goes with it, placed on its device."""

    model: torch.nn.Module
    tokenizer: object
    source: object
    device: torch.device
    precision: str
    collator: PadCollator


def _load(cfg: RunConfig, bundle: DataBundle) -> _Loaded:
    """The model with a fresh head (seeded: its initialisation depends on it), on the
    configured device (each process its own, when distributed), and the precision."""
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.model.device)
    model_cfg = dataclasses.replace(cfg.model, quantization=cfg.quantization)  # qlora: 4bit unless set
    model, tokenizer, source = load_model(model_cfg, len(bundle.label_names), bundle.label_names)
    if cfg.model.model_dropout is not None:
        set_model_dropout(model, cfg.model.model_dropout)
    state = distributed_state()
    if state.num_processes > 1:
        device = state.device  # each process its own GPU (or the CPU)
    if cfg.quantization == "none":  # bitsandbytes places quantized weights itself
        model.to(device)
    return _Loaded(
        model,
        tokenizer,
        source,
        device,
        resolve_precision(cfg.train.precision, device),
        PadCollator(tokenizer.pad_token_id, tokenizer.padding_side),
    )


def _tokenize(tokenizer, bundle: DataBundle, cfg: RunConfig):
    """Train, test and (if any) validation sets as token ids; truncation counts go to the facts."""
    train_ds = tokenize_split(tokenizer, bundle.train, cfg.data)
    test_ds = tokenize_split(tokenizer, bundle.test, cfg.data)
    bundle.facts.update(
        max_length=cfg.data.max_length,
        truncation=cfg.data.truncation,
        truncated_train=train_ds.truncated,
        truncated_test=test_ds.truncated,
    )
    val_ds = tokenize_split(tokenizer, bundle.validation, cfg.data) if bundle.validation else None
    return train_ds, test_ds, val_ds


def _baseline(engine, loaded: _Loaded, test_ds, bundle, cfg, run_dir: Path, resume: bool, main: bool):
    """The pretrained model with its untrained head: (metrics, logits); kept on disk, so a
    resumed run reads its metrics instead (and has no logits)."""
    path = run_dir / "baseline.json"
    if resume and path.is_file():
        return json.loads(path.read_text()), None
    metrics, logits = _eval(
        engine, loaded.model, test_ds, loaded.collator, bundle, cfg, loaded.precision, run_dir, "baseline"
    )
    _log_metrics("baseline", metrics)
    if main:
        files.write_json_atomic(path, metrics)
    return metrics, logits


def _check_trackers(cfg: RunConfig) -> None:
    """A missing tracker library is reported before training, not after it."""
    if cfg.train.tensorboard or cfg.train.mlflow:
        from peftlab.tracking import check_installed

        check_installed(cfg)


def _check_finite_scores(metrics: dict) -> None:
    if not np.isfinite(metrics["loss"]):
        raise PeftlabError(
            f"the fine-tuned model's test loss is {metrics['loss']}: its outputs are not finite; "
            f"lower the learning rate (lr=...) and train again"
        )


def _train(
    engine,
    model,
    train_ds,
    val_ds,
    loaded: _Loaded,
    bundle: DataBundle,
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    on_validation: Callable[[int, dict], None] | None = None,
) -> TrainSummary:
    """Train with the run's engine (validating on `val_ds`, if any); a run whose loss or
    weights are not finite fails here, rather than saving them as a result."""
    rounds = [0]

    def validate(m):
        metrics = evaluate(
            m, val_ds, loaded.collator, bundle.label_names, cfg.train.eval_batch_size, loaded.precision, "validation"
        )[0]
        if on_validation is not None:
            rounds[0] += 1
            on_validation(rounds[0], metrics)
        return metrics

    summary = engine.train(
        model,
        train_ds,
        loaded.collator,
        cfg,
        loaded.precision,
        run_dir,
        resume=resume,
        validate=validate if val_ds is not None else None,
    )
    if not np.isfinite(summary.final_loss):
        raise PeftlabError(f"training diverged (loss {summary.final_loss}): lower the learning rate (lr=...)")
    _check_finite_weights(model)
    return summary


def _adapter_meta(
    cfg: RunConfig,
    bundle: DataBundle,
    loaded: _Loaded,
    model,
    heads: list[str],
    fingerprint: str,
    metrics: dict,
    started: str,
) -> dict:
    """peftlab.json: what the adapter is, what it was trained on, and how well it did."""
    source = loaded.source
    return {
        # Aliases and Hub ids as given; local paths made absolute, so the adapter loads from anywhere.
        "base_model": cfg.model.name if source.kind in ("alias", "hub") else str(Path(cfg.model.name).resolve()),
        "base_model_class": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
        "base_model_source": {"kind": source.kind, "path": source.path, "gguf_file": source.gguf_file},
        "base_model_fingerprint": fingerprint,
        "label_names": bundle.label_names,
        "num_labels": len(bundle.label_names),
        "head_modules": heads,
        "method": cfg.to_dict()["method"],
        "quantization": cfg.quantization,
        "max_length": cfg.data.max_length,
        "truncation": cfg.data.truncation,
        "data": {
            "dataset": cfg.data.dataset,
            "fingerprint": bundle.fingerprint,
            "source": bundle.source,
            "text_pair_column": cfg.data.text_pair_column,
        },
        "metrics": {k: metrics[k] for k in ("loss", "accuracy", "macro_f1")},
        "trainable_params": count_parameters(model)[0],
        "created": started,
    }


def _reload(
    engine, adapter_dir: Path, loaded: _Loaded, test_ds, bundle, cfg, run_dir: Path, tuned_logits: np.ndarray
) -> tuple[dict, dict]:
    """Load the saved adapter into a fresh base model and evaluate it the same way: its
    metrics, and whether it predicts as the in-memory model did."""
    reloaded, _, _ = artifacts.load_adapter(
        adapter_dir,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
    )
    if cfg.quantization == "none":
        reloaded.to(loaded.device)
    metrics, logits = _eval(
        engine, reloaded, test_ds, loaded.collator, bundle, cfg, loaded.precision, run_dir, "reloaded"
    )
    _log_metrics("reloaded", metrics)
    diff = float(np.abs(logits - tuned_logits).max()) if len(tuned_logits) else 0.0
    same = bool((logits.argmax(1) == tuned_logits.argmax(1)).all())
    if not same:
        log.warning(
            "the reloaded adapter predicts differently from the in-memory model (max logit difference %.3g)", diff
        )
    return metrics, {"predictions_equal": same, "max_abs_logit_diff": diff}


@dataclass(frozen=True)
class _Steps:
    """Which optional steps a run takes, and who is shown its validation rounds."""

    baseline: bool
    reload: bool
    resume: bool
    on_validation: Callable[[int, dict], None] | None = None


def _run(cfg: RunConfig, run_dir: Path, steps: _Steps, bundle: DataBundle | None, main: bool) -> dict:
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    wall_start = time.perf_counter()
    _check_trackers(cfg)
    # 1-2. data, then model
    bundle = bundle if bundle is not None else load_data(cfg.data, cfg.data_dir)
    loaded = _load(cfg, bundle)
    train_ds, test_ds, val_ds = _tokenize(loaded.tokenizer, bundle, cfg)
    engine, collator, precision = get_engine(cfg.train.engine), loaded.collator, loaded.precision
    # 3. baseline: the pretrained model with its untrained head
    base_metrics, base_logits = (
        _baseline(engine, loaded, test_ds, bundle, cfg, run_dir, steps.resume, main) if steps.baseline else (None, None)
    )
    # 4-5. adapt and train
    heads, fingerprint = head_module_names(loaded.model), base_fingerprint(loaded.model)
    model = apply_method(loaded.model, cfg.method)
    del loaded.model  # the adapted model replaces it (and the reload check loads a fresh one)
    summary = _train(engine, model, train_ds, val_ds, loaded, bundle, cfg, run_dir, steps.resume, steps.on_validation)
    tuned_metrics, tuned_logits = _eval(engine, model, test_ds, collator, bundle, cfg, precision, run_dir, "fine-tuned")
    _log_metrics("fine-tuned", tuned_metrics)
    _check_finite_scores(tuned_metrics)
    # 6. save the adapter (trainable weights + head) as one self-describing unit
    adapter_dir = run_dir / "adapter"
    meta = _adapter_meta(cfg, bundle, loaded, model, heads, fingerprint, tuned_metrics, started)
    total = count_parameters(model)[1]
    if main:
        artifacts.save_adapter(model, adapter_dir, meta, loaded.tokenizer)
    distributed_state().wait_for_everyone()
    # 7-8. load it back into a fresh base model and evaluate it the same way
    reloaded, reload_check = None, None
    if steps.reload:
        del model
        reloaded, reload_check = _reload(engine, adapter_dir, loaded, test_ds, bundle, cfg, run_dir, tuned_logits)
    report = {
        "name": run_dir.name,
        "run_dir": str(run_dir),
        "started": started,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "data": bundle.facts,
        "label_names": bundle.label_names,
        "model": {"name": cfg.model.name, "class": meta["base_model_class"], "total_params": total},
        "method": {"name": cfg.method.name, "trainable_params": meta["trainable_params"], "total_params": total},
        "baseline": base_metrics,
        "finetuned": tuned_metrics,
        "reloaded": reloaded,
        "reload_check": reload_check,
        "train": summary.to_dict(),
        "adapter": {"dir": str(adapter_dir), "size_bytes": files.dir_size(adapter_dir)},
        "resources": _resources(time.perf_counter() - wall_start, loaded.device),
        "versions": artifacts.package_versions(),
        "format_version": REPORT_FORMAT_VERSION,
    }
    if main:
        _write_report(report, cfg, run_dir, {"baseline": base_logits, "fine-tuned": tuned_logits}, bundle)
    distributed_state().wait_for_everyone()
    log.info("wrote %s", run_dir / "report.md")
    return report


def _write_report(report: dict, cfg: RunConfig, run_dir: Path, logits: dict, bundle: DataBundle) -> None:
    """The model card, report.md, report.html, then report.json (last: it marks the run
    finished) and the trackers; the checkpoints, which only served to resume, go."""
    adapter_dir = Path(report["adapter"]["dir"])
    # peft's save_pretrained leaves a placeholder README.md; replace it with a real card.
    files.write_text_atomic(adapter_dir / "README.md", model_card(report))
    report["adapter"]["size_bytes"] = files.dir_size(adapter_dir)
    files.write_text_atomic(run_dir / "report.md", markdown(report))
    write_html_report(report, run_dir, logits, bundle.test.texts, bundle.test.labels)
    files.write_json_atomic(run_dir / "report.json", report)
    if cfg.train.tensorboard or cfg.train.mlflow:
        from peftlab.tracking import write_trackers

        write_trackers(cfg, run_dir, report)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _check_finite_weights(model) -> None:
    """A run whose trained weights hold NaN or inf must fail, not save them as a result."""
    bad = total = 0
    for p in model.parameters():
        if p.requires_grad:
            bad += int((~torch.isfinite(p.detach())).sum())
            total += p.numel()
    if bad:
        raise PeftlabError(
            f"training left {bad:,} of {total:,} trained weights non-finite (NaN or inf): the run "
            f"diverged; lower the learning rate (lr=...) and train again"
        )


def _resources(wall_seconds: float, device: torch.device) -> dict:
    """Wall time and peak memory of this process (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "wall_seconds": wall_seconds,
        "peak_rss_mb": rss / (1e6 if sys.platform == "darwin" else 1e3),
        "cpu": cpu_description(),
    }  # speed figures mean little without the machine
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 1e6
    return out


def evaluate_model(
    model_name: str | None,
    data_cfg: DataConfig,
    *,
    adapter_dir: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Evaluate a base model (fresh head) or base + adapter on the test split of a dataset.

    With an adapter, texts are tokenized as in its training (max_length, truncation, and the
    second-text column of sentence pairs unless `data_cfg` names one).
    """
    if adapter_dir is not None:
        model, tokenizer, meta = artifacts.load_adapter(
            Path(adapter_dir), model_name, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        data_cfg = dataclasses.replace(
            data_cfg,
            max_length=meta.get("max_length", data_cfg.max_length),
            truncation=meta.get("truncation", data_cfg.truncation),
            text_pair_column=data_cfg.text_pair_column or meta.get("data", {}).get("text_pair_column"),
        )
        bundle = load_data(data_cfg, data_dir, label_names=meta["label_names"])
    else:
        if model_name is None:
            raise PeftlabError("nothing to evaluate: give --model and/or --adapter")
        bundle = load_data(data_cfg, data_dir)
        model, tokenizer, _ = load_model(
            ModelConfig(name=model_name, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle),
            len(bundle.label_names),
            bundle.label_names,
        )
    device = resolve_device()
    model.to(device)
    precision = resolve_precision(precision, device)
    dataset = tokenize_split(tokenizer, bundle.test, data_cfg)
    bundle.facts.update(
        max_length=data_cfg.max_length, truncation=data_cfg.truncation, truncated_test=dataset.truncated
    )
    metrics, _ = evaluate(
        model,
        dataset,
        PadCollator(tokenizer.pad_token_id, tokenizer.padding_side),
        bundle.label_names,
        batch_size,
        precision,
    )
    return {
        "model": model_name,
        "adapter": adapter_dir,
        "data": bundle.facts,
        "label_names": bundle.label_names,
        "metrics": metrics,
    }


def check_texts(meta: dict, texts: list[str], pairs: list[str] | None = None) -> None:
    """Raise PeftlabError unless `texts` (and second texts `pairs`) suit the adapter that
    `meta` (its peftlab.json) describes: non-empty texts, and pairs exactly when it was
    trained on pairs, one per text."""
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise PeftlabError(f"text #{empty[0] + 1} is empty: give non-empty texts to classify")
    if pairs is not None and len(pairs) != len(texts):
        raise PeftlabError(f"{len(texts)} texts but {len(pairs)} second texts: give one pair per text")
    # A pair model shown single texts (or the reverse) answers confidently and wrongly.
    pair_column = meta.get("data", {}).get("text_pair_column")
    if pair_column and pairs is None:
        raise PeftlabError(
            f"this adapter was trained on sentence pairs (second text {pair_column!r}): "
            f"give a second text for each text (CLI: --pairs, 'first<TAB>second' lines)"
        )
    if pairs is not None and not pair_column:
        raise PeftlabError("this adapter was trained on single texts: give no second texts")
    if pairs is not None:
        empty = [i for i, t in enumerate(pairs) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise PeftlabError(f"second text #{empty[0] + 1} is empty: give non-empty second texts")


def encode_texts(tokenizer, meta: dict, texts: list[str], pairs: list[str] | None = None):
    """Token ids of `texts` (checked by check_texts) as the adapter described by `meta` was
    trained on them: its max_length and truncation mode."""
    # No cache: predictions are on ad-hoc texts, seldom repeated.
    return tokenize(
        tokenizer,
        texts,
        None,
        meta.get("max_length", 512),
        pairs=pairs,
        truncation=meta.get("truncation", "head"),
        cache=False,
    )


class Predictor:
    """A loaded adapter that classifies texts: `Predictor(adapter_dir)(["text", ...])`."""

    def __init__(
        self,
        adapter_dir: str | Path,
        model_name: str | None = None,
        precision: str = "auto",
        allow_pickle: bool = False,
    ):
        self.model, self.tokenizer, self.meta = artifacts.load_adapter(
            Path(adapter_dir), model_name, allow_pickle=allow_pickle
        )
        self.device = resolve_device()
        self.model.to(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.label_names = self.meta["label_names"]
        self.collator = PadCollator(self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def __call__(self, texts: list[str], batch_size: int = 64, pairs: list[str] | None = None) -> list[dict]:
        """Label and class probabilities per text; `pairs` gives second texts for a model
        trained on sentence pairs."""
        check_texts(self.meta, texts, pairs)
        dataset = encode_texts(self.tokenizer, self.meta, texts, pairs)
        probs = softmax(predict_logits(self.model, dataset, self.collator, batch_size, self.precision, "predict"))
        results = [
            {
                "text": text,
                "label": self.label_names[int(p.argmax())],
                "probabilities": {n: float(v) for n, v in zip(self.label_names, p)},
            }
            for text, p in zip(texts, probs)
        ]
        for result, second in zip(results, pairs or ()):
            result["pair"] = second
        return results
