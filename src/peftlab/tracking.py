"""Optional experiment trackers, off by default: TensorBoard event files and a local MLflow
run, written after training from metrics.jsonl and the report (so the training loop knows
nothing about them, and a tracker failing cannot cost a finished run).

Both libraries are optional extras (`pip install peftlab[tracking]`), imported only when
their switch is on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peftlab.config import RunConfig
from peftlab.errors import PeftlabError
from peftlab.metrics import read_metrics_log

log = logging.getLogger("peftlab")


def final_metrics(report: dict) -> dict[str, float]:
    """Test-set metrics of the fine-tuned model (and of the baseline, when it was evaluated)."""
    out = {f"test_{k}": report["finetuned"][k] for k in ("loss", "accuracy", "macro_f1")}
    if report.get("baseline"):
        out.update({f"baseline_{k}": report["baseline"][k] for k in ("loss", "accuracy", "macro_f1")})
    out["train_seconds"] = report["train"]["train_seconds"]
    out["train_samples_per_s"] = report["train"]["train_samples_per_s"]
    return out


def _flat_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:500]  # MLflow's limit on a parameter's value
    return out


def write_tensorboard(run_dir: Path, report: dict) -> Path:
    """Event files in run_dir/tensorboard: training loss and LR per step, validation metrics,
    and the final test metrics at the last step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PeftlabError('train.tensorboard=true needs TensorBoard: pip install "peftlab[tracking]"') from None
    train_log, val_log = read_metrics_log(run_dir / "metrics.jsonl")
    out = run_dir / "tensorboard"
    writer = SummaryWriter(log_dir=str(out))
    try:
        for e in train_log:
            writer.add_scalar("train/loss", e["loss"], e["step"])
            writer.add_scalar("train/lr", e["lr"], e["step"])
        for e in val_log:
            for key, value in e.items():
                if key.startswith("val_"):
                    writer.add_scalar(f"validation/{key[4:]}", value, e["step"])
        last = report["train"]["steps"]
        for key, value in final_metrics(report).items():
            writer.add_scalar(f"final/{key}", value, last)
    finally:
        writer.close()
    return out


def mlflow_uri(run_dir: Path) -> str:
    """Tracking URI of a run's MLflow store (`mlflow ui --backend-store-uri <this>` shows it)."""
    return "sqlite:///" + str((run_dir / "mlruns" / "mlflow.db").resolve())


def write_mlflow(run_dir: Path, report: dict) -> Path:
    """One MLflow run (experiment "peftlab") in the local store run_dir/mlruns: the config as
    parameters, per-step training metrics, final metrics, report.md/html as artefacts."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise PeftlabError('train.mlflow=true needs MLflow: pip install "peftlab[tracking]"') from None
    store = run_dir / "mlruns"
    store.mkdir(exist_ok=True)
    # SQLite, not MLflow's plain-file store: MLflow 3 refuses that one unless an environment
    # variable opts in. A client bound to this store, rather than mlflow.set_tracking_uri,
    # which is process-wide and would redirect any MLflow logging of the caller's own.
    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    experiment = client.get_experiment_by_name("peftlab")
    # Artefacts beside the database (MLflow's default is ./mlartifacts under the current folder).
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("peftlab", artifact_location=(store / "artifacts").resolve().as_uri())
    )
    run = client.create_run(experiment_id, run_name=report["name"])
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in _flat_params(report["config"]).items()]
    train_log, val_log = read_metrics_log(run_dir / "metrics.jsonl")
    metrics = [
        Metric(name, e[key], 0, e["step"]) for e in train_log for name, key in (("train_loss", "loss"), ("lr", "lr"))
    ]
    metrics += [Metric(k, v, 0, e["step"]) for e in val_log for k, v in e.items() if k.startswith("val_")]
    metrics += [Metric(k, v, 0, report["train"]["steps"]) for k, v in final_metrics(report).items()]
    # MLflow caps one batch at 100 parameters and 1000 metrics.
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for name in ("report.md", "report.html"):
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    client.set_terminated(run_id)
    return store


def check_installed(cfg: RunConfig) -> None:
    """Raise PeftlabError naming the extra to install when a switched-on tracker is missing."""
    import importlib.util

    for switch, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow")):
        if getattr(cfg.train, switch) and importlib.util.find_spec(module) is None:
            raise PeftlabError(
                f'train.{switch}=true needs {module}: pip install "peftlab[tracking]" or set train.{switch}=false'
            )


def write_trackers(cfg: RunConfig, run_dir: Path, report: dict) -> None:
    """Write the trackers switched on in `cfg.train`; nothing at all when both are off."""
    if cfg.train.tensorboard:
        log.info("wrote TensorBoard events to %s", write_tensorboard(run_dir, report))
    if cfg.train.mlflow:
        log.info("wrote MLflow run to %s", write_mlflow(run_dir, report))
