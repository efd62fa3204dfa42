"""Checkpoints, --resume after SIGKILL, model selection and the divergence guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_texts, write_csv
from safetensors.torch import load_file

from peftlab.errors import PeftlabError
from peftlab.experiment import run_experiment


def _cli(*args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def big_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_csv(root / "train.csv", *make_texts(2400, seed=11))
    write_csv(root / "test.csv", *make_texts(200, seed=12))
    return root


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tiny_encoder, big_data, tmp_path):
    settings = [
        f"model={tiny_encoder}",
        f"dataset={big_data}",
        "precision=fp32",
        "epochs=2",
        "save_every=10",
        "lr=5e-3",
    ]
    # 1. the interrupted run: killed as soon as a mid-epoch checkpoint exists
    proc = _cli("run", *settings, "--name", "killed", cwd=tmp_path)
    state_file = tmp_path / "runs" / "killed" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if state["step"] >= 30:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = json.loads(state_file.read_text())
    assert state["batch_in_epoch"] > 0 and state["step"] < 300, "killed mid-epoch"
    assert not (tmp_path / "runs" / "killed" / "report.json").exists()

    # 2. resume it, and 3. an uninterrupted run with the same seed
    resumed = _cli("run", "--resume", tmp_path / "runs" / "killed", cwd=tmp_path)
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err
    assert f"resumed from step {state['step']}" in err
    straight = _cli("run", *settings, "--name", "straight", cwd=tmp_path)
    _, err2 = straight.communicate(timeout=900)
    assert straight.returncode == 0, err2

    a = json.loads((tmp_path / "runs" / "killed" / "report.json").read_text())
    b = json.loads((tmp_path / "runs" / "straight" / "report.json").read_text())
    assert a["train"]["steps"] == b["train"]["steps"] == 300
    assert a["finetuned"]["loss"] == b["finetuned"]["loss"]  # exact on CPU: same batches, same dropout
    assert a["finetuned"]["accuracy"] == b["finetuned"]["accuracy"]
    wa = load_file(tmp_path / "runs" / "killed" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "runs" / "straight" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs" / "killed" / "metrics.jsonl").open()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), "no step logged twice after resume"
    assert not (tmp_path / "runs" / "killed" / "checkpoints").exists(), "checkpoints cleaned up when done"


def test_resume_refuses_finished_or_unknown_runs(tiny_cfg):
    tiny_cfg.name = "nothing-here"
    with pytest.raises(PeftlabError, match="cannot resume: run directory .* does not exist"):
        run_experiment(tiny_cfg, resume=True)


def test_validation_picks_the_best_checkpoint(tiny_cfg):
    cfg = tiny_cfg
    cfg.data.validation_size = 0.25
    cfg.train.epochs, cfg.train.lr, cfg.train.metric_for_best = 4, 5e-3, "loss"
    report = run_experiment(cfg, baseline=False, reload=True)
    history = report["train"]["validation"]
    assert len(history) == 4 and report["data"]["validation_size"] == 80 and report["data"]["train_size"] == 240
    best = min(history, key=lambda h: h["val_loss"])
    assert report["train"]["best_step"] == best["step"]
    assert report["reload_check"]["predictions_equal"]


def test_early_stopping_stops_when_validation_stops_improving(tiny_cfg):
    cfg = tiny_cfg
    cfg.data.validation_size = 0.25
    # A learning rate this small barely moves the loss: accuracy plateaus at once.
    cfg.train.epochs, cfg.train.lr, cfg.train.metric_for_best = 10, 1e-9, "accuracy"
    cfg.train.early_stopping_patience = 2
    report = run_experiment(cfg, baseline=False, reload=False)
    assert report["train"]["early_stopped"] and len(report["train"]["validation"]) == 3
    assert report["train"]["steps"] == 3 * 15


def test_diverging_loss_stops_with_a_clear_message(tiny_cfg):
    cfg = tiny_cfg
    cfg.name = "diverged"
    cfg.train.lr, cfg.train.log_every, cfg.train.save_every, cfg.train.max_grad_norm = 1e30, 1, 1, 0
    with pytest.raises(
        PeftlabError,
        match=r"training loss became nan by step \d+: the run diverged; the last "
        r"good checkpoint is kept in .*lower the learning rate",
    ):
        run_experiment(cfg, baseline=False)
    run_dir = Path(cfg.output_dir) / cfg.name
    assert (run_dir / "FAILED.txt").read_text().startswith("PeftlabError: training loss became nan")
    assert not (run_dir / "report.json").exists() and (run_dir / "checkpoints" / "last").is_dir()


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_encoder, big_data, tmp_path):
    """SIGINT mid-training: the step finishes, a checkpoint is written, the run exits 130
    with the resume command; resuming finishes the run."""
    proc = _cli(
        "run",
        f"model={tiny_encoder}",
        f"dataset={big_data}",
        "precision=fp32",
        "epochs=1",
        "save_every=0",
        "log_every=1",
        "--name",
        "stopped",
        cwd=tmp_path,
    )
    metrics = tmp_path / "runs" / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    run_dir = tmp_path / "runs" / "stopped"
    assert (
        err.strip().splitlines()[-1]
        == "peftlab: error: interrupted; a checkpoint is saved: continue with `peftlab run --resume runs/stopped`"
    )
    step = json.loads((run_dir / "checkpoints" / "last" / "state.json").read_text())["step"]
    assert 0 < step < 150  # mid-run: 2,400 texts are 150 steps
    resumed = _cli("run", "--resume", run_dir, cwd=tmp_path)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads((run_dir / "report.json").read_text())["train"]["steps"] == 150
