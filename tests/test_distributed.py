"""The same run under torchrun with 2 CPU processes (gloo) as in one process."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_texts, write_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory, tiny_encoder):
    """The tiny encoder without dropout: the processes' separate dropout RNG streams would
    otherwise make 1 and 2 processes differ by design, not by a bug."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("no-dropout")
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_encoder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_encoder).save_pretrained(path)
    return path


def _launch(args, cwd, nproc):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prefix = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return subprocess.Popen(
        [*prefix, "-m", "peftlab.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions
    of their own, so killing its process group would leave them running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += parents.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _report(cwd, name):
    return json.loads((cwd / "runs" / name / "report.json").read_text())


def test_two_processes_match_one(no_dropout_model, sentiment_dir, tmp_path):
    settings = [
        f"model={no_dropout_model}",
        f"dataset={sentiment_dir}",
        "precision=fp32",
        "method=full",
        "lr=3e-3",
        "epochs=3",
        "log_every=1",
        # Several processes train on padded batches (packed rows cannot be split between
        # them); one process packs by default, which changes float sums by ~1e-6 a step.
        "packing=never",
    ]
    procs = {n: _launch(["run", *settings, "--name", f"p{n}"], tmp_path, n) for n in (1, 2)}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        if n == 2:
            assert out.count("fine-tuned") == 1, "only the main process prints the table"
            assert "distributed: 2 processes x 8 examples = global batch 16" in err
    one, two = _report(tmp_path, "p1"), _report(tmp_path, "p2")
    # Same global batches; only the order of floating-point reductions differs.
    assert two["finetuned"]["accuracy"] == one["finetuned"]["accuracy"] >= 0.9
    assert abs(two["finetuned"]["loss"] - one["finetuned"]["loss"]) < 1e-5
    assert two["train"]["steps"] == one["train"]["steps"] == 60
    # Every test example evaluated once: the gathered confusion matrix counts 80.
    assert sum(map(sum, two["finetuned"]["confusion_matrix"])) == 80
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["p1", "p2"]
    assert len(list((tmp_path / "runs" / "p2").rglob("peftlab.json"))) == 1


def test_two_process_run_killed_and_resumed(no_dropout_model, tmp_path):
    write_csv(tmp_path / "train.csv", *make_texts(1600, seed=21))
    write_csv(tmp_path / "test.csv", *make_texts(80, seed=22))
    settings = [
        f"model={no_dropout_model}",
        f"dataset={tmp_path}",
        "precision=fp32",
        "lr=5e-3",
        "epochs=2",
        "save_every=5",
    ]
    proc = _launch(["run", *settings, "--name", "killed"], tmp_path, 2)
    state_file = tmp_path / "runs" / "killed" / "checkpoints" / "last" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state_file.read_text())["step"] >= 20:
                _kill_tree(proc.pid)  # the launcher and both workers
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "report.json").exists()
    resumed = _launch(["run", "--resume", tmp_path / "runs" / "killed"], tmp_path, 2)
    straight = _launch(["run", *settings, "--name", "straight"], tmp_path, 2)
    for p in (resumed, straight):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = _report(tmp_path, "killed"), _report(tmp_path, "straight")
    assert a["train"]["steps"] == b["train"]["steps"] == 200
    # Each process restores its own RNG stream, so dropout (LoRA's) replays exactly.
    assert a["finetuned"]["loss"] == pytest.approx(b["finetuned"]["loss"], abs=1e-6)
    assert a["finetuned"]["accuracy"] == b["finetuned"]["accuracy"]


@pytest.mark.parametrize(
    "name,strategy", [("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DEEPSPEED"), ("multi_cpu.yaml", "MULTI_CPU")]
)
def test_launcher_configs_parse_and_name_their_strategy(name, strategy):
    from accelerate.commands.config.config_args import ClusterConfig

    path = ROOT / "configs" / "accelerate" / name
    assert path.read_text().startswith("# accelerate launch --config_file configs/accelerate/")
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type.value == strategy and config.num_processes == 2
