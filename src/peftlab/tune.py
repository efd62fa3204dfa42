"""`peftlab tune`: search run settings with Optuna, within a number of trials or a time budget.

    tune:
      space:
        method.name: [lora, ia3]
        method.r: {choices: [8, 16], when: {method.name: [lora]}}
        lr_factor: {low: 0.25, high: 4, log: true}
      trials: 20

Each trial is an ordinary run folder `<output_dir>/<tune>/trial-NNNN`, trained on the
training split and scored on the validation split (carved from train when the config has
none), at every validation round, where the pruner may stop it. The test split is never
seen by the search: it is evaluated once, at the end, for the best trial's settings trained
again on training + validation data (`<tune>/refit`; tune.refit=false: the trial's own
adapter). The study (TPE sampler, percentile pruner with patience) lives in `<output_dir>/<tune>/study.db`, or in a database named by
`--storage`, so a tune resumes with the same command and several workers, on one machine or
many, share one study: Optuna's storage hands out the trials.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import (
    DEFAULT_TUNE_SPACE,
    LR_FACTOR,
    RunConfig,
    SearchParam,
    TuneConfig,
    apply_overrides,
    from_dict,
    load_config,
    parse_duration,
    read_yaml,
    run_name_problems,
    set_tune_value,
    set_value,
    tune_from_dict,
)
from peftlab.errors import Interrupted, PeftlabError
from peftlab.report.tune import TrialRecord, TuneSummary, write_tune_report

log = logging.getLogger("peftlab")

DEFAULT_TRIALS = 20  # when neither a number of trials nor a time budget is given
MADE_VALIDATION = 0.1  # the validation split carved when the config has none
FAILURES_IN_A_ROW = 3  # a worker stops after this many failed trials in a row: the config is broken


class TrialFailed(Exception):
    """A trial stopped on a PeftlabError (e.g. it diverged): the study marks it failed and goes on."""


def _optuna():
    """Optuna, imported when a tune starts (so `peftlab --help` stays fast)."""
    try:
        import optuna
    except ImportError:
        raise PeftlabError('peftlab tune needs Optuna: pip install "peftlab[tune]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # peftlab logs each trial itself
    return optuna


# --- configuration -----------------------------------------------------------------------------


def load_tune(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RunConfig, TuneConfig]:
    """The base config and the search from a YAML file's `tune:` key and `tune.KEY=value`
    overrides (`tune.space.KEY=[...]` sets one axis); other overrides apply to the base.
    Both are validated. Raises PeftlabError."""
    data = read_yaml(path) if path is not None else {}
    # The search is not a RunConfig field: split it off before the config is validated.
    tune = tune_from_dict(data.pop("tune", None) or {}, source=str(path or "config"))
    base = from_dict(data, source=str(path or "config"))
    plain = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if key.startswith("tune.") and sep:
            set_tune_value(tune, key.removeprefix("tune."), yaml.safe_load(raw) if raw else None)
        else:
            plain.append(item)
    apply_overrides(base, plain)
    return base.validate(), tune.validate()


def with_validation(base: RunConfig) -> tuple[RunConfig, str]:
    """`base` with a validation split to select on: its own, or one carved from train (and a
    note saying so, for the log and the report). Raises PeftlabError for a config that cannot validate during training."""
    if base.train.engine != "native":
        raise PeftlabError(
            f"peftlab tune needs engine=native (it validates during training to prune trials), not {base.train.engine}"
        )
    if base.data.validation_size > 0:
        return base, ""
    cfg = copy.deepcopy(base)
    cfg.data.validation_size = MADE_VALIDATION
    note = (
        f"The config had no validation split, so peftlab tune carved validation_size={MADE_VALIDATION} "
        f"(stratified, from train) to select on; set validation_size to choose it."
    )
    return cfg.validate(), note


def _get(cfg: RunConfig, key: str) -> Any:
    target: Any = cfg
    for part in key.split("."):
        target = getattr(target, part)
    return target


def _contains(param: SearchParam, value: Any) -> bool:
    """Whether `value` is one the search could give `param`."""
    if param.choices is not None:
        # True == 1 in Python, but a switch is not a number.
        return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in param.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not param.low <= value <= param.high:
        return False
    if param.integer and not float(value).is_integer():
        return False
    return param.step is None or abs(round((value - param.low) / param.step) * param.step - (value - param.low)) < 1e-9


def space_problems(base: RunConfig, params: list[SearchParam]) -> list[str]:
    """Values of the space that no run could take (e.g. an unknown method), each set alone on `base`."""
    problems = []
    for param in params:
        if param.key == LR_FACTOR:
            continue
        values = param.choices if param.choices is not None else (param.low, param.high)
        for value in values:
            cfg = copy.deepcopy(base)
            try:
                set_value(cfg, param.key, value)
                cfg.validate()
            except PeftlabError as exc:
                problems.append(f"tune.space.{param.key}={value!r}: {str(exc).removeprefix('invalid config: ')}")
    return problems


def trial_config(
    base: RunConfig, chosen: dict[str, Any], number: int, tune_dir: Path, train_size: int, evals_per_epoch: int
) -> RunConfig:
    """The run config of trial `number`: the base with the chosen settings, placed at
    `<tune_dir>/trial-NNNN`, validating `evals_per_epoch` times an epoch unless the base says."""
    cfg = copy.deepcopy(base)
    # The trial's folder is the study's to reuse: numbers restart only with a new study.
    cfg.output_dir, cfg.name, cfg.overwrite = str(tune_dir), f"trial-{number:04d}", True
    for key, value in chosen.items():
        if key != LR_FACTOR:
            set_value(cfg, key, value)
    if LR_FACTOR in chosen:
        cfg.train.lr = cfg.lr * chosen[LR_FACTOR]  # cfg.lr: train.lr, else the chosen method's default
    if cfg.train.eval_every == 0:
        steps = math.ceil(train_size / cfg.train.batch_size)
        cfg.train.eval_every = max(1, steps // evals_per_epoch)
    return cfg.validate()


def _settings(base: RunConfig, tune: TuneConfig) -> dict:
    """What must not change while a study goes on: the base config, minus where runs are
    written, and the space (the budget and the pruner may change between workers)."""
    cfg = base.to_dict()
    for key in ("name", "output_dir", "overwrite"):
        cfg.pop(key)
    cfg["data"].pop("data_dir")
    return json.loads(json.dumps({"config": cfg, "space": tune.space or DEFAULT_TUNE_SPACE}))


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ; a key only one side has is a setting added (or
    removed) by another peftlab version at its default, not a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in old if k in new for d in _differences(old[k], new[k], f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


# --- the study ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _tune_lock(tune_dir: Path):
    """One worker of this machine at a time creates the study and writes the report."""
    with open(tune_dir / ".tune.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _storage(optuna, url: str, heartbeat_seconds: int):
    """The RDB storage with heartbeats: a trial whose worker died (no heartbeat for twice the
    interval) is marked failed by the next worker to start a trial, and its settings retried once."""
    import inspect

    storages = optuna.storages
    retry_class = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    parameters = inspect.signature(storages.RDBStorage.__init__).parameters
    retry_arg = (
        "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in parameters else "failed_trial_callback"
    )
    # SQLite allows one writer at a time: wait for the lock rather than fail.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the retry callback is "experimental"
        try:
            return storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_seconds,
                grace_period=2 * heartbeat_seconds,
                **{retry_arg: retry_class(max_retry=1)},
            )
        except (ImportError, ValueError) as exc:
            raise PeftlabError(f"cannot open the study storage {hide_password(url)}: {exc}: check --storage") from None
        except Exception as exc:  # SQLAlchemy's own errors: an unreachable server, a bad URL
            if type(exc).__module__.startswith("sqlalchemy"):
                raise PeftlabError(
                    f"cannot open the study storage {hide_password(url)} ({type(exc).__name__}): check --storage"
                ) from None
            raise


def hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def make_pruner(optuna, tune: TuneConfig):
    """The pruner `tune` asks for (TuneConfig.pruner and its prune_* settings)."""
    pruner = optuna.pruners.NopPruner()
    if tune.pruner != "none":
        # Percentile rather than median by default: a 400-sentence validation split moves a
        # score by ~2 points, so half of the good trials sit below the median at some round.
        percentile = 50.0 if tune.pruner == "median" else tune.prune_percentile
        pruner = optuna.pruners.PercentilePruner(
            percentile, n_startup_trials=tune.prune_after_trials, n_warmup_steps=tune.prune_after_rounds + 1
        )
        if tune.prune_patience:
            pruner = _stalled_only(optuna, pruner, tune.prune_patience)
    return pruner


def _stalled_only(optuna, wrapped, patience: int):
    """`wrapped`'s verdict, asked only for a trial whose best score of its last `patience`
    rounds is no better than its best before them. (Optuna's PatientPruner spares a trial
    whose score is flat, which is what a run collapsed onto one class shows.)"""

    class StalledOnly(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            sign = -1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else 1.0
            scores = [sign * v for _, v in sorted(trial.intermediate_values.items())]
            if len(scores) <= patience or max(scores[-patience:]) > max(scores[:-patience]):
                return False
            return wrapped.prune(study, trial)

    return StalledOnly()


def open_study(optuna, url: str, name: str, base: RunConfig, tune: TuneConfig, params: list[SearchParam]):
    """Create the study or join it; a study started with other settings is refused."""
    sampler = optuna.samplers.TPESampler(seed=tune.seed, n_startup_trials=tune.startup_trials)
    pruner = make_pruner(optuna, tune)
    study = optuna.create_study(
        storage=_storage(optuna, url, tune.heartbeat_seconds),
        study_name=name,
        direction="minimize" if base.train.metric_for_best == "loss" else "maximize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    settings, saved = _settings(base, tune), study.user_attrs.get("peftlab")
    if saved is None and study.trials:
        raise PeftlabError(f"study {name!r} in {hide_password(url)} was not made by peftlab tune: give another --name")
    changed = []
    if saved is not None:
        changed = _differences(saved["config"], settings["config"])
        changed += ["tune.space"] if saved["space"] != settings["space"] else []
    if changed:
        keys = ", ".join(changed[:6])
        raise PeftlabError(
            f"study {name!r} was started with other settings ({keys}): rerun with the same config, or give another --name"
        )
    if saved is None:
        study.set_user_attr("peftlab", settings)
        if tune.include_base:
            _enqueue_base(study, base, params)
    return study


def _enqueue_base(study, base: RunConfig, params: list[SearchParam]) -> None:
    """Queue the base config's own settings as the first trial, where the space holds them."""
    fixed: dict[str, Any] = {}
    for param in params:
        if param.when is not None and fixed.get(param.when[0]) not in param.when[1]:
            continue
        value = 1.0 if param.key == LR_FACTOR else _get(base, param.key)
        if not _contains(param, value):
            log.info(
                "tune: the base config's %s=%r is outside the space: no trial of the base config", param.key, value
            )
            return
        fixed[param.key] = value
    study.enqueue_trial(fixed, user_attrs={"note": "base config"})


def suggest(trial, params: list[SearchParam]) -> dict[str, Any]:
    """The trial's settings, one per axis of the space whose `when` holds."""
    chosen: dict[str, Any] = {}
    for p in params:
        if p.when is not None and chosen.get(p.when[0]) not in p.when[1]:
            continue
        if p.choices is not None:
            chosen[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.integer:
            chosen[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            chosen[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
    return chosen


# --- trials ------------------------------------------------------------------------------------


class _Objective:
    """Runs one trial as a peftlab run on the validation split; its score is the objective."""

    def __init__(self, optuna, base: RunConfig, tune: TuneConfig, params: list[SearchParam], tune_dir: Path, bundle):
        self.optuna, self.base, self.tune, self.params, self.tune_dir = optuna, base, tune, params, tune_dir
        self.bundle, self.metric = bundle, base.train.metric_for_best

    def _trial_bundle(self, cfg: RunConfig):
        """The data with the validation split in the test split's place, so that the run's
        final evaluation is on validation too, and the test split is never touched."""
        from peftlab.data import load_data

        bundle = self.bundle if cfg.data == self.base.data else load_data(cfg.data, cfg.data_dir)
        names, labels = bundle.label_names, bundle.validation.labels
        facts = {
            **bundle.facts,
            "split": bundle.facts["split"]
            + "; tune trial: scored on the validation split (the test split is held out)",
            "test_size": len(labels),
            "test_label_counts": {n: labels.count(i) for i, n in enumerate(names)},
        }
        return dataclasses.replace(bundle, test=bundle.validation, facts=facts)

    def _reporter(self, trial):
        """Hands each validation round's score to the pruner; raises TrialPruned when it says stop."""

        def report(round_: int, metrics: dict) -> None:
            value = float(metrics[self.metric])
            trial.report(value, round_)
            if trial.should_prune():
                raise self.optuna.TrialPruned(
                    f"validation {self.metric} {value:.4f} at round {round_} is among the worst of earlier trials' there"
                )

        return report

    def __call__(self, trial) -> float:
        from peftlab.experiment import run_experiment

        # A heartbeat now, from this thread: Optuna's heartbeat thread writes its first one
        # concurrently, and a worker killed before that left its trial "running" for good
        # (fail_stale_trials only fails trials that have a stale heartbeat).
        storage = trial.study._storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)():
            storage.record_heartbeat(trial._trial_id)
        chosen = suggest(trial, self.params)
        cfg = trial_config(
            self.base, chosen, trial.number, self.tune_dir, len(self.bundle.train), self.tune.evals_per_epoch
        )
        run_dir = Path(cfg.output_dir) / cfg.name
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("lr", cfg.lr)
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v!r}" for k, v in chosen.items()) or "base config")
        try:
            report = run_experiment(
                cfg, baseline=False, reload=False, bundle=self._trial_bundle(cfg), on_validation=self._reporter(trial)
            )
        except self.optuna.TrialPruned as exc:
            _mark_pruned(run_dir, str(exc))
            raise
        except Interrupted:
            raise Interrupted(
                "interrupted: the study keeps every finished trial; run the same peftlab tune command to continue"
            ) from None
        except PeftlabError as exc:
            trial.set_user_attr("error", str(exc))
            raise TrialFailed(str(exc)) from None
        return float(report["finetuned"][self.metric])


def _mark_pruned(run_dir: Path, why: str) -> None:
    """A pruned trial's folder says so (not FAILED.txt) and drops its checkpoints."""
    import shutil

    from peftlab.files import write_text_atomic

    (run_dir / "FAILED.txt").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_text_atomic(run_dir / "PRUNED.txt", f"pruned by peftlab tune: {why}\n")


class _Progress:
    """After each trial: log it, stop after too many failures in a row or when the time left
    would not fit another trial."""

    def __init__(self, optuna, metric: str, deadline: float | None):
        self.optuna, self.metric, self.deadline = optuna, metric, deadline
        self.failures: list[str] = []

    def __call__(self, study, trial) -> None:
        state = self.optuna.trial.TrialState
        if trial.state == state.FAIL:
            self.failures.append(trial.user_attrs.get("error", "see the log"))
            log.warning("trial %d failed: %s", trial.number, self.failures[-1])
            if len(self.failures) >= FAILURES_IN_A_ROW:
                study.stop()
            return
        self.failures.clear()
        if trial.state == state.COMPLETE:
            best = study.best_trial
            log.info(
                "trial %d complete: validation %s %.4f (best: trial %d, %.4f)",
                *(trial.number, self.metric, trial.value, best.number, best.value),
            )
        else:
            log.info("trial %d pruned after %d validation rounds", trial.number, len(trial.intermediate_values))
        self._stop_before_overrun(study)

    def _stop_before_overrun(self, study) -> None:
        if self.deadline is None:
            return
        complete = study.get_trials(deepcopy=False, states=(self.optuna.trial.TrialState.COMPLETE,))
        durations = sorted(t.duration.total_seconds() for t in complete if t.duration is not None)
        left = self.deadline - time.monotonic()
        if durations and left < durations[len(durations) // 2]:
            log.info(
                "tune: %.0f s of the budget left, less than a typical trial (%.0f s): stopping",
                left,
                durations[len(durations) // 2],
            )
            study.stop()


def _optimize(optuna, study, objective: _Objective, tune: TuneConfig) -> None:
    """This worker's share of the trials: until the study holds the wanted number of complete
    or pruned trials, or the time budget would be overrun."""
    budget = parse_duration(tune.time_budget) if tune.time_budget else None
    wanted = tune.trials if tune.trials is not None else (None if budget else DEFAULT_TRIALS)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=counted))
    if wanted is not None and done >= wanted:
        log.info("tune: the study already holds %d complete or pruned trials (of %d): no new trial", done, wanted)
        return
    log.info(
        "tune: %d trials done; running %s%s",
        done,
        f"until {wanted}" if wanted else "trials",
        f" within {tune.time_budget}" if budget else "",
    )
    progress = _Progress(optuna, objective.metric, time.monotonic() + budget if budget else None)
    callbacks = [progress] + ([optuna.study.MaxTrialsCallback(wanted, states=counted)] if wanted else [])
    study.optimize(objective, timeout=budget, callbacks=callbacks, catch=(TrialFailed,), gc_after_trial=True)
    if len(progress.failures) >= FAILURES_IN_A_ROW:
        raise PeftlabError(
            f"{FAILURES_IN_A_ROW} trials failed in a row, the last with: {progress.failures[-1]}; "
            f"fix the config or the space, and run the same command again"
        )


# --- the result --------------------------------------------------------------------------------


def _record(optuna, trial) -> TrialRecord:
    """A trial as the report shows it."""
    states = optuna.trial.TrialState
    state = {
        states.COMPLETE: "complete",
        states.PRUNED: "pruned",
        states.FAIL: "failed",
        states.RUNNING: "running",
        states.WAITING: "waiting",
    }[trial.state]
    curve = [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)]
    value = trial.value if state == "complete" else (curve[-1] if state == "pruned" and curve else None)
    notes = [trial.user_attrs.get("note", "")]
    if trial.system_attrs.get("failed_trial") is not None:
        notes.append(f"retry of trial {trial.system_attrs['failed_trial']}")
    if state == "failed":
        notes.append(trial.user_attrs.get("error", "its worker stopped (killed, or no heartbeat)"))
    if state == "pruned":
        notes.append(f"pruned at round {len(curve)}")
    return TrialRecord(
        number=trial.number,
        state=state,
        value=value,
        params=dict(trial.params),
        curve=curve,
        seconds=trial.duration.total_seconds() if trial.duration is not None else None,
        lr=trial.user_attrs.get("lr"),
        run_dir=trial.user_attrs.get("run_dir"),
        note="; ".join(n for n in notes if n),
    )


def _importances(optuna, study) -> tuple[dict[str, float], str]:
    """Each searched setting's importance over the complete trials, or why there is none."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"needs at least 2 complete trials ({len(complete)} so far)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ImportError) as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    if not found:
        return {}, "no setting varied between the complete trials"
    caution = ": few, so a rough guide" if len(complete) < 10 else ""
    return {k: float(v) for k, v in found.items()}, f"over {len(complete)} complete trials{caution}"


def _evaluate_once(path: Path, key: dict, evaluate) -> dict:
    """`evaluate()`'s metrics, kept in `path` with `key`, so that a rerun (or another worker)
    reads them instead of evaluating the test split again."""
    from peftlab.files import write_json_atomic

    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    metrics = evaluate()
    write_json_atomic(path, {"key": key, "metrics": metrics})
    return metrics


_TEST_KEYS = ("loss", "accuracy", "macro_f1", "n", "per_class", "confusion_matrix")


def _refit(run_dir: Path, tune_dir: Path) -> dict:
    """The best trial's settings trained again on its training and validation data together
    (into `<tune_dir>/refit`), evaluated on the test split: the metrics."""
    from peftlab.experiment import run_experiment

    cfg = load_config(run_dir / "config.yaml")
    cfg.data.validation_size = 0.0  # what the trials held out to select on now trains too
    cfg.train.early_stopping_patience = None
    cfg.output_dir, cfg.name, cfg.overwrite = str(tune_dir), "refit", True
    log.info("tune: training the best trial's settings on train + validation (refit), then the test split, once")
    result = run_experiment(cfg.validate(), baseline=False, reload=False)
    return {k: result["finetuned"][k] for k in _TEST_KEYS if k in result["finetuned"]}


def _test_scores(
    base: RunConfig, best: TrialRecord | None, tune_dir: Path, refit: bool = False
) -> tuple[dict | None, dict, str]:
    """The best trial (or, with `refit`, its settings trained on train + validation) and the
    pretrained baseline on the test split, each evaluated once; and a note on what was."""
    import torch

    from peftlab.experiment import evaluate_model

    def baseline() -> dict:
        torch.manual_seed(base.train.seed)  # the untrained head is random: seed it as a run does
        result = evaluate_model(
            base.model.name,
            base.data,
            data_dir=base.data_dir,
            batch_size=base.train.eval_batch_size,
            precision=base.train.precision,
        )
        return {k: result["metrics"][k] for k in _TEST_KEYS if k in result["metrics"]}

    baseline_test = _evaluate_once(tune_dir / "baseline_test.json", {"model": base.model.name}, baseline)
    if best is None:
        return None, baseline_test, ""
    run_dir = Path(best.run_dir or "")
    if not (run_dir / "adapter").is_dir():
        return (
            None,
            baseline_test,
            f"The best trial's folder {run_dir} is not on this machine: evaluate it where it ran.",
        )
    cfg = load_config(run_dir / "config.yaml")

    def best_trial() -> dict:
        log.info("tune: evaluating the best trial (%d) on the test split, once", best.number)
        result = evaluate_model(
            None,
            cfg.data,
            adapter_dir=str(run_dir / "adapter"),
            data_dir=cfg.data_dir,
            batch_size=cfg.train.eval_batch_size,
            precision=cfg.train.precision,
        )
        return {k: result["metrics"][k] for k in _TEST_KEYS if k in result["metrics"]}

    if refit:
        key = {"trial": best.number, "run_dir": str(run_dir), "refit": str(tune_dir / "refit")}
        note = (
            f"Test scores: the best trial's settings trained once more on the training and validation "
            f"data together (the validation split had only selected), in {tune_dir / 'refit'}."
        )
        return _evaluate_once(tune_dir / "best_test.json", key, lambda: _refit(run_dir, tune_dir)), baseline_test, note
    key = {"trial": best.number, "run_dir": str(run_dir)}
    return _evaluate_once(tune_dir / "best_test.json", key, best_trial), baseline_test, ""


def summarize(
    optuna, study, base: RunConfig, tune_dir: Path, url: str, bundle, validation_note: str, refit: bool = False
) -> TuneSummary:
    """Every trial, the best one's test scores against the baseline, the importances; written
    as leaderboard.md, report.html and tune.json in `tune_dir`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial is not "running"
    records = [_record(optuna, t) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in records if t.state == "complete"]
    best = study.best_trial.number if complete else None
    best_test, baseline_test, test_note = _test_scores(
        base, next((t for t in complete if t.number == best), None), tune_dir, refit
    )
    importances, importance_note = _importances(optuna, study)
    summary = TuneSummary(
        name=study.study_name,
        tune_dir=str(tune_dir),
        storage=hide_password(url),
        metric=base.train.metric_for_best,
        direction="minimize" if base.train.metric_for_best == "loss" else "maximize",
        trials=records,
        best=best,
        dataset=base.data.dataset,
        model=base.model.name,
        validation_size=len(bundle.validation),
        test_size=len(bundle.test),
        validation_note=validation_note,
        base_trial=next((t.number for t in records if t.note.startswith("base config")), None),
        best_test=best_test,
        baseline_test=baseline_test,
        test_note=test_note,
        importances=importances,
        importance_note=importance_note,
        finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    write_tune_report(summary, tune_dir)
    return summary


def run_tune(base: RunConfig, tune: TuneConfig, name: str, storage: str | None = None) -> TuneSummary:
    """Join (or start) the study `name` and run trials until the budget is spent; then
    evaluate the best trial on the test split and write the report. Returns the summary.
    Raises PeftlabError on bad input."""
    from peftlab.data import load_data

    if run_name_problems(name):
        raise PeftlabError(f"tune {run_name_problems(name)[0]}")
    optuna = _optuna()
    params = tune.validate().search_params()
    base, validation_note = with_validation(base)
    problems = space_problems(base, params)
    if problems:
        raise PeftlabError("invalid tune space: " + "; ".join(problems))
    if validation_note:
        log.warning("%s", validation_note)
    tune_dir = Path(base.output_dir) / name
    tune_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    # Loaded once, before the first trial: bad data fails here, and trials share it.
    bundle = load_data(base.data, base.data_dir)
    with _tune_lock(tune_dir):
        study = open_study(optuna, url, name, base, tune, params)
    log.info("tune %s: study in %s; trials in %s/trial-NNNN", name, hide_password(url), tune_dir)
    _optimize(optuna, study, _Objective(optuna, base, tune, params, tune_dir, bundle), tune)
    with _tune_lock(tune_dir):
        return summarize(optuna, study, base, tune_dir, url, bundle, validation_note, tune.refit)
