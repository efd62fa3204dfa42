"""The real CLI, in subprocesses, on the tiny encoder and synthetic data."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_texts, write_csv


def peftlab(*args, cwd, stdin=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "peftlab.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )


@pytest.fixture(scope="module")
def finished_run(tiny_encoder, sentiment_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    out = peftlab(
        "run",
        f"model={tiny_encoder}",
        f"dataset={sentiment_dir}",
        "method=full",
        "lr=3e-3",
        "epochs=3",
        "precision=fp32",
        "--name",
        "e2e",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    return cwd, cwd / "runs" / "e2e", out


def test_run_writes_a_complete_run_directory(finished_run):
    cwd, run_dir, out = finished_run
    assert "baseline" in out.stdout and "fine-tuned" in out.stdout and "adapter size on disk" in out.stdout
    for name in ("config.yaml", "report.json", "report.md", "metrics.jsonl", "adapter/peftlab.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "FAILED.txt").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["finetuned"]["accuracy"] >= 0.9 > report["baseline"]["accuracy"]
    assert (
        report["reload_check"]["predictions_equal"]
        and report["reloaded"]["accuracy"] == report["finetuned"]["accuracy"]
    )
    assert report["data"]["train_size"] == 320 and report["label_names"] == ["neg", "pos"]
    assert "| accuracy |" in (run_dir / "report.md").read_text()
    assert "[peftlab] data:" in out.stderr and "from folder" in out.stderr  # the log names the source


def test_config_yaml_reruns_the_same_experiment(finished_run):
    cwd, run_dir, _ = finished_run
    out = peftlab("run", "--config", run_dir / "config.yaml", "--name", "again", cwd=cwd)
    assert out.returncode == 0, out.stderr
    first = json.loads((run_dir / "report.json").read_text())["finetuned"]
    second = json.loads((cwd / "runs" / "again" / "report.json").read_text())["finetuned"]
    assert first["loss"] == second["loss"] and first["accuracy"] == second["accuracy"]


def test_predict_from_args_stdin_and_file(finished_run, tmp_path):
    cwd, run_dir, _ = finished_run
    texts = ["w1 good w2 w3", "w4 awful w5"]
    out = peftlab("predict", run_dir, *texts, "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in rows)
    piped = peftlab("predict", run_dir / "adapter", "--json", cwd=cwd, stdin="\n".join(texts) + "\n")
    assert [json.loads(x)["label"] for x in piped.stdout.splitlines()] == ["pos", "neg"]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    from_file = peftlab("predict", run_dir, "--file", tmp_path / "t.txt", cwd=cwd)
    assert [line.split("\t")[0] for line in from_file.stdout.splitlines()] == ["pos", "neg"]


def test_predict_keeps_one_output_line_per_input_line_in_order(finished_run, tmp_path):
    """Blank lines keep their place (one output per input line), and a file longer than one
    chunk streams out in input order."""
    cwd, run_dir, _ = finished_run
    piped = peftlab("predict", run_dir, "--json", cwd=cwd, stdin="w1 good w2\n\n   \nw4 awful w5\n")
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", None, None, "neg"], piped.stderr
    assert rows[1]["error"] == "empty line"
    texts = [t for t, _ in zip(*make_texts(1100, seed=9))]
    (tmp_path / "many.txt").write_text("\n".join(texts) + "\n")
    out = peftlab("predict", run_dir, "--file", tmp_path / "many.txt", cwd=cwd)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1100
    assert [line.split("\t")[2] for line in lines[::97]] == [t[:57] + "..." if len(t) > 60 else t for t in texts[::97]]


def test_evaluate_adapter_matches_run_report(finished_run, sentiment_dir):
    cwd, run_dir, _ = finished_run
    out = peftlab(
        "evaluate",
        "--adapter",
        run_dir / "adapter",
        "--dataset",
        sentiment_dir,
        "--precision",
        "fp32",
        "--output",
        cwd / "eval.json",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads((cwd / "eval.json").read_text())["metrics"]
    report = json.loads((run_dir / "report.json").read_text())
    assert metrics["accuracy"] == report["finetuned"]["accuracy"]
    assert np.isclose(metrics["loss"], report["finetuned"]["loss"], atol=1e-6)


def test_train_command_saves_an_adapter(tiny_encoder, sentiment_dir, tmp_path):
    out = peftlab(
        "train", f"model={tiny_encoder}", f"dataset={sentiment_dir}", "max_steps=3", "precision=fp32", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["baseline"] is None and (run_dir / "adapter" / "adapter_model.safetensors").is_file()


BAD_INPUTS = [
    (["run", "dataset=no_such_dataset_xyz"], "dataset 'no_such_dataset_xyz' not found"),
    (["run", "{sentiment}", "text_column=body"], "text column 'body' not in"),
    (["run", "model=./models/does-not-exist"], "model path ./models/does-not-exist does not exist"),
    (["run", "epoch=3"], "did you mean 'epochs'"),
    (["run", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["predict", "no-such-run", "hello"], "adapter folder no-such-run does not exist"),
    (["predict", "{sentiment}", "hello"], "not a peftlab adapter folder"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[a[0][1][:24] for a in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(args, message, tiny_encoder, sentiment_dir, tmp_path):
    args = [
        a.replace("{sentiment}", f"dataset={sentiment_dir}")
        if a == "{sentiment}" and args[0] == "run"
        else a.replace("{sentiment}", str(sentiment_dir))
        for a in args
    ]
    if args[0] == "run" and not any(a.startswith("model=") for a in args):
        args.append(f"model={tiny_encoder}")
    out = peftlab(*args, cwd=tmp_path, env_extra={"PEFTLAB_DATA_DIR": ""})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    assert lines[-1].startswith("peftlab: error:") and message in lines[-1], out.stderr


def test_existing_named_run_is_not_overwritten(finished_run):
    cwd, run_dir, _ = finished_run
    before = (run_dir / "report.json").read_bytes()
    out = peftlab("run", "--config", run_dir / "config.yaml", "--name", "e2e", cwd=cwd)
    assert out.returncode == 2 and "already exists: pass --overwrite" in out.stderr
    assert (run_dir / "report.json").read_bytes() == before


def test_help_explains_every_command(tmp_path):
    for command in ("run", "train", "evaluate", "predict"):
        out = peftlab(command, "--help", cwd=tmp_path)
        assert out.returncode == 0 and "examples:" in out.stdout, command
    assert "--max-train-samples" in peftlab("run", "--help", cwd=tmp_path).stdout


def test_predict_pairs_need_a_pair_adapter_and_tabs(finished_run):
    cwd, run_dir, _ = finished_run
    out = peftlab("predict", run_dir, "--pairs", "w1 good\tw2", cwd=cwd)
    assert out.returncode == 2 and "trained on single texts: give no second texts" in out.stderr
    out = peftlab("predict", run_dir, "--pairs", "w1 good", cwd=cwd)
    assert out.returncode == 2 and "text #1 has no TAB" in out.stderr


def test_string_labels_from_user_csv_reach_predict(tiny_encoder, tmp_path):
    texts, labels = make_texts(120, seed=5)
    write_csv(tmp_path / "mine.csv", texts, ["happy" if y == "pos" else "sad" for y in labels], "body", "mood")
    out = peftlab(
        "run",
        f"model={tiny_encoder}",
        f"dataset={tmp_path / 'mine.csv'}",
        "text_column=body",
        "label_column=mood",
        "max_steps=2",
        "precision=fp32",
        "--name",
        "mine",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    pred = peftlab("predict", tmp_path / "runs" / "mine", "w1 good", "--json", cwd=tmp_path)
    assert json.loads(pred.stdout)["label"] in ("happy", "sad")
    assert set(json.loads(pred.stdout)["probabilities"]) == {"happy", "sad"}


def _shell_commands(script: str) -> list[list[str]]:
    """The commands of a shell script as argument lists: comments dropped, `\\` continuations
    joined, `a && b` split in two."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while "&&" in words:
            cut = words.index("&&")
            commands.append(words[:cut])
            words = words[cut + 1 :]
        if words:
            commands.append(words)
    return commands


def test_readme_commands_are_the_ones_ci_runs():
    """CI installs with the README's install command, then runs the README's test command on
    the whole suite (only -q added: no paths, no -k, no -m that would run less)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install, _, test = _shell_commands(quick_start)
    assert (install, test) == (["bash", "scripts/install.sh"], ["python", "-m", "pytest"])
    ci = _shell_commands((root / ".ci" / "run").read_text())
    suite = [i for i, c in enumerate(ci) if [a for a in c if a != "-q"] == test]
    assert install in ci and suite and ci.index(install) < suite[0], ci


def test_readme_names_the_avx2_rerun_ci_does():
    """The README states the exact environment and test file of CI's second, AVX2-kernel run."""
    root = Path(__file__).resolve().parents[1]
    readme = " ".join((root / "README.md").read_text().split())
    reruns = [c for c in _shell_commands((root / ".ci" / "run").read_text()) if "=" in c[0]]
    assert len(reruns) == 1, reruns
    env = [w for w in reruns[0] if "=" in w]
    tests = [w for w in reruns[0] if w.startswith("tests/")]
    assert env and tests, reruns[0]
    assert f"`{' '.join(env)}`" in readme and all(f"`{t}`" in readme for t in tests)
