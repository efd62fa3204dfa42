"""`peftlab sweep`: a grid of runs, deterministic names, restart after a kill, leaderboard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.errors import PeftlabError
from peftlab.sweep import combinations, load_sweep, run_name


def test_grid_is_split_off_the_config_and_expanded_in_order(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"epochs": 2}, "sweep": {"method.name": ["lora", "head"], "train.lr": [1e-3, 5e-3]}})
    )
    base, grid = load_sweep(path, ["sweep.train.seed=[1, 2]", "batch_size=8"])
    assert base.train.epochs == 2 and base.train.batch_size == 8
    combos = combinations(grid)
    assert len(combos) == 8
    assert run_name(combos[0]) == "method.name=lora,train.lr=0.001,train.seed=1"
    assert run_name(combos[-1]) == "method.name=head,train.lr=0.005,train.seed=2"
    assert run_name({"method.target_modules": ["query", "value"]}) == "method.target_modules=__query_,__value__"


def test_sweep_without_grid_or_with_bad_values_is_a_clear_error(tmp_path):
    with pytest.raises(PeftlabError, match="nothing to sweep"):
        load_sweep(None, ["epochs=1"])
    with pytest.raises(PeftlabError, match=r"sweep.lr must be a non-empty list"):
        load_sweep(None, ["sweep.lr=1e-3"])


def test_invalid_combinations_are_all_reported_before_any_run(tmp_path):
    from peftlab.sweep import plan

    base, grid = load_sweep(None, ["sweep.method.name=[lora, nosuch]", "sweep.lr=[1e-3, 2e-3]"])
    with pytest.raises(
        PeftlabError, match=r"invalid sweep: s/method.name=nosuch,lr=0.001: .*; s/method.name=nosuch,lr=0.002"
    ):
        plan(base, grid, "s")


def test_killed_sweep_restarts_with_the_remaining_runs(tiny_encoder, sentiment_dir, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": tiny_encoder},
                "data": {"dataset": str(sentiment_dir)},
                "train": {"max_steps": 2, "precision": "fp32", "batch_size": 16},
                "sweep": {"method.name": ["lora", "head"], "train.lr": [1e-3, 5e-3]},
            }
        )
    )
    cmd = [sys.executable, "-m", "peftlab.cli", "sweep", "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sweep_dir = tmp_path / "runs" / "grid"
    first, second = (sweep_dir / "method.name=lora,train.lr=0.001", sweep_dir / "method.name=lora,train.lr=0.005")

    # Kill (SIGKILL: no clean-up) as soon as the second run has finished.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (second / "report.json").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before its second run finished"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    mtimes = {d: (d / "report.json").stat().st_mtime_ns for d in (first, second)}

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("already finished, skipped") == 2
    assert {d: (d / "report.json").stat().st_mtime_ns for d in (first, second)} == mtimes
    assert all((d / "report.json").is_file() for d in sweep_dir.iterdir() if d.is_dir())
    assert len([d for d in sweep_dir.iterdir() if d.is_dir()]) == 4
    assert out.stdout.startswith("run ") and "method.name=head,train.lr=0.005" in out.stdout
    assert (sweep_dir / "leaderboard.md").is_file() and (sweep_dir / "leaderboard.html").is_file()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_sweep_configs_plan(path):
    from peftlab.sweep import plan

    base, grid = load_sweep(path)
    assert len(plan(base, grid, path.stem)) == len(combinations(grid)) > 1


def test_run_killed_mid_training_is_resumed_not_restarted(tiny_encoder, sentiment_dir, tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": tiny_encoder},
                "data": {"dataset": str(sentiment_dir)},
                "train": {"max_steps": 30, "save_every": 5, "log_every": 5, "precision": "fp32", "batch_size": 8},
                "sweep": {"method.name": ["lora", "head"]},
            }
        )
    )
    cmd = [sys.executable, "-m", "peftlab.cli", "sweep", "--config", str(path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = tmp_path / "runs" / "grid" / "method.name=lora"
    state = first / "checkpoints" / "last" / "state.json"

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not state.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (first / "report.json").is_file()

    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "method.name=lora was killed part-way: resuming it from its last checkpoint" in out.stderr
    assert "resumed from step" in out.stderr and out.stderr.count("resuming it") == 1
    steps = [
        json.loads(line)["step"]
        for line in (first / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # continued: no step logged twice
