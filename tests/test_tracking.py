"""Optional trackers: TensorBoard events and a local MLflow run, only when switched on."""

from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.errors import PeftlabError


def tiny_run(tiny_encoder, sentiment_dir, tmp_path, *extra):
    from peftlab.experiment import run_experiment

    cfg = load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            f"output_dir={tmp_path}",
            "precision=fp32",
            "max_steps=4",
            "log_every=2",
            "batch_size=16",
            "name=t",
            *extra,
        ],
    )
    return Path(run_experiment(cfg, reload=False)["run_dir"])


def test_trackers_write_nothing_when_off(tiny_encoder, sentiment_dir, tmp_path):
    run_dir = tiny_run(tiny_encoder, sentiment_dir, tmp_path)
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "mlruns").exists()


def test_tensorboard_and_mlflow_record_the_run(tiny_encoder, sentiment_dir, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run_dir = tiny_run(tiny_encoder, sentiment_dir, tmp_path, "train.tensorboard=true", "train.mlflow=true")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert "final/test_accuracy" in events.Tags()["scalars"]

    from mlflow.tracking import MlflowClient

    from peftlab.tracking import mlflow_uri

    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("peftlab").experiment_id])
    assert run.info.run_name == "t" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["method.name"] == "lora"
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2, 4]
    assert (run_dir / "mlruns" / "artifacts").is_dir() and not (Path.cwd() / "mlartifacts").exists()


def test_missing_tracker_library_fails_before_training(monkeypatch, tiny_cfg):
    import importlib.util

    from peftlab.tracking import check_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    tiny_cfg.train.mlflow = True
    with pytest.raises(PeftlabError, match=r"train.mlflow=true needs mlflow: pip install \"peftlab\[tracking\]\""):
        check_installed(tiny_cfg)
