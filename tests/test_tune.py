"""`peftlab tune`: the search space and its errors, trials as runs on the validation split,
pruning, two workers on one study, and a worker killed mid-trial."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftlab.config import DEFAULT_TUNE_SPACE, TuneConfig, load_config
from peftlab.errors import PeftlabError
from peftlab.tune import load_tune, run_tune, trial_config, with_validation

optuna = pytest.importorskip("optuna")


def _base(model: str, data: Path, tmp_path: Path, **train) -> dict:
    """A base config (as YAML data) for fast trials: 288 train / 32 validation / 80 test texts."""
    return {
        "model": {"name": model},
        "data": {"dataset": str(data), "validation_size": 0.1},
        "train": {"precision": "fp32", "batch_size": 16, "epochs": 1, "lr": 3e-3, **train},
        "output_dir": str(tmp_path / "runs"),
    }


def _write(tmp_path: Path, data: dict, name: str = "base.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _study(tune_dir: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tune_dir / 'study.db'}")


@pytest.mark.parametrize(
    "tune, message",
    [
        ({"trails": 5}, r"unknown tune key 'tune.trails': did you mean 'tune.trials'\?"),
        ({"space": {"train.lrr": [1e-3]}}, r"tune.space.train.lrr: 'train.lrr' is not a config key .*'train.lr'"),
        ({"space": {"lr": {"low": 1e-2, "high": 1e-4}}}, r"tune.space.lr needs numbers low < high"),
        ({"space": {"batching": {"low": 1, "high": 2}}}, r"tune.space.batching is a str setting: give a list"),
        ({"space": {"method.r": {"low": 1.5, "high": 8}}}, r"integer setting: give whole numbers"),
        ({"space": {"r": {"choices": [4], "when": {"method.name": ["lora"]}}}}, r"which must come earlier"),
        ({"space": {"r": [[4, 8]]}}, r"non-empty list of plain values"),
        ({"time_budget": "soon"}, r"tune.time_budget='soon' is not a duration"),
        ({"pruner": "hyperband"}, r"tune.pruner='hyperband' is not one of percentile, median, none"),
        ({"prune_percentile": 100}, r"tune.prune_percentile=100 must lie between 0 and 100"),
        (5, r"the tune: key in .* must be a mapping"),
    ],
)
def test_a_bad_tune_key_is_one_line_naming_it(tmp_path, tune, message):
    path = _write(tmp_path, {"tune": tune})
    with pytest.raises(PeftlabError, match=message) as err:
        load_tune(path)
    assert "\n" not in str(err.value)


def test_space_values_no_run_could_take_are_refused_before_any_trial(tmp_path, capsys):
    from peftlab.cli import main

    path = _write(tmp_path, {"tune": {"space": {"method.name": ["lora", "lorra"], "epochs": [1, 0]}}})
    assert main(["tune", "--config", str(path), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peftlab: error: invalid tune space:")
    assert "method.name='lorra': method.name='lorra' is not a known method: did you mean 'lora'?" in err
    assert "tune.space.train.epochs=0: train.epochs=0.0 must be positive" in err
    assert not (tmp_path / "base").exists()  # nothing was created


def test_without_optuna_the_error_says_what_to_install(tmp_path, monkeypatch, capsys):
    from peftlab.cli import main

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    assert main(["tune", f"output_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == 'peftlab: error: peftlab tune needs Optuna: pip install "peftlab[tune]"\n'


def test_time_budgets_read_as_people_write_them():
    from peftlab.config import parse_duration

    assert [parse_duration(t) for t in ("45m", "2h", "1h30m", "90s", "600", "1.5h")] == [
        2700,
        7200,
        5400,
        90,
        600,
        5400,
    ]
    for bad in ("soon", "45 min", "m45", "1h30", ""):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_the_default_space_and_overrides_load():
    base, tune = load_tune(
        None, ["tune.trials=3", "tune.time_budget=1h30m", "tune.space.lr=[0.001, 0.002]", "epochs=1"]
    )
    assert (tune.trials, tune.time_budget, tune.space) == (3, "1h30m", {"lr": [0.001, 0.002]})
    assert base.train.epochs == 1
    keys = [p.key for p in TuneConfig().search_params()]
    assert keys == list(DEFAULT_TUNE_SPACE)


def test_a_trial_is_the_base_with_its_settings_and_the_methods_own_rate_scaled(tmp_path):
    base = load_config(None, ["validation_size=0.1", "batch_size=16"])
    cfg = trial_config(base, {"method.name": "ia3", "lr_factor": 2.0}, 3, tmp_path / "t", 288, 4)
    assert cfg.method.name == "ia3" and cfg.train.lr == pytest.approx(2e-2)  # ia3's default 1e-2, doubled
    assert (cfg.output_dir, cfg.name) == (str(tmp_path / "t"), "trial-0003")
    assert cfg.train.eval_every == 4  # 18 steps an epoch, four validation rounds
    assert base.method.name == "lora" and base.train.lr is None  # the base is not changed


def test_a_config_without_validation_split_gets_one_and_says_so():
    base = load_config(None, [])
    cfg, note = with_validation(base)
    assert cfg.data.validation_size == 0.1 and base.data.validation_size == 0.0
    assert "no validation split" in note and "carved validation_size=0.1" in note
    assert with_validation(load_config(None, ["validation_size=0.2"]))[0].data.validation_size == 0.2
    with pytest.raises(PeftlabError, match="peftlab tune needs engine=native"):
        with_validation(load_config(None, ["engine=trainer"]))


def test_pruned_trials_stop_early_and_the_test_split_is_evaluated_once(pretrained_encoder, sentiment_dir, tmp_path):
    # Selected on validation loss, which a head at lr 1e-7 cannot lower (the tiny base's
    # features separate the classes at once, so every trial's macro-F1 is 1.0).
    data = _base(pretrained_encoder, sentiment_dir, tmp_path, epochs=2, metric_for_best="loss")
    data["data"]["validation_size"] = 0.0  # tune carves one, and says so
    data["tune"] = {
        "space": {"train.lr": {"low": 1e-8, "high": 1e-1, "log": True}},
        "prune_after_trials": 1,
        "prune_after_rounds": 0,
        "prune_patience": 0,  # lr 1e-7 still lowers the loss a hair each round
        "refit": False,  # the trial's own adapter on test (refit: test_refit_...)
    }
    base, tune = load_tune(_write(tmp_path, data))
    tune.trials = 1
    first = run_tune(base, tune, "p")  # trial 0: the base config, lr 3e-3
    tune_dir = tmp_path / "runs" / "p"
    assert [(t.number, t.state, t.note) for t in first.trials] == [(0, "complete", "base config")]
    # A rate that cannot learn in time: the pruner stops it at the first round it lags.
    _study(tune_dir, "p").enqueue_trial({"train.lr": 1e-7})
    tune.trials = 2
    summary = run_tune(base, tune, "p")
    good, bad = summary.trials
    assert bad.state == "pruned" and len(bad.curve) < len(good.curve) == 9  # 36 steps, validated every 4
    assert bad.curve[-1] > good.curve[len(bad.curve) - 1]
    assert not (tune_dir / "trial-0001" / "report.json").exists()
    assert (tune_dir / "trial-0001" / "PRUNED.txt").read_text().startswith("pruned by peftlab tune")
    assert not (tune_dir / "trial-0001" / "checkpoints").exists()
    board = (tune_dir / "leaderboard.md").read_text()
    assert re.search(r"\| 1 \| pruned \| [0-9.]+ \| [1-8] \|", board) and "| 0 (best) | complete |" in board
    assert "carved validation_size=0.1" in board
    # Trials are scored on the validation split; only the best trial met the test split, once.
    trial_report = json.loads((tune_dir / "trial-0000" / "report.json").read_text())
    assert trial_report["finetuned"]["n"] == 32 and trial_report["finetuned"]["loss"] == good.value
    assert summary.best == 0 and summary.best_test["n"] == 80 and summary.baseline_test["n"] == 80
    assert json.loads((tune_dir / "best_test.json").read_text())["key"]["trial"] == 0
    page = (tune_dir / "report.html").read_text()
    assert 'id="plot-history"' in page and 'id="plot-rounds"' in page and 'id="trials"' in page
    assert "evaluated once, for the best trial" in page
    # The study continues only with the settings it was started with.
    base.method.r = 16
    with pytest.raises(PeftlabError, match=r"study 'p' was started with other settings \(method.r\)"):
        run_tune(base, tune, "p")


def _worker_env() -> dict:
    # One thread per worker: two workers' thread pools on two shared cores would spin
    # against each other and make the tiny trials ten times slower.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _trials_run_by(stderr: str) -> set[int]:
    return {int(n) for n in re.findall(r"\[peftlab\] trial (\d+): ", stderr)}


def test_two_workers_share_one_study_without_duplicate_or_lost_trials(pretrained_encoder, sentiment_dir, tmp_path):
    data = _base(pretrained_encoder, sentiment_dir, tmp_path)
    data["tune"] = {"space": {"lr_factor": {"low": 0.5, "high": 2.0, "log": True}, "method.r": [4, 8, 16]}}
    path = _write(tmp_path, data, "shared.yaml")
    cmd = [sys.executable, "-m", "peftlab.cli", "tune", "--config", str(path), "--trials", "4"]
    env = _worker_env()
    workers = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    ran = [_trials_run_by(err) for _, err in outputs]
    assert ran[0] and ran[1] and not ran[0] & ran[1]  # both worked, never on the same trial

    tune_dir = tmp_path / "runs" / "shared"
    trials = _study(tune_dir, "shared").get_trials()
    states = {t.state for t in trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert 4 <= len(trials) <= 5  # a worker may finish one trial past the count
    assert ran[0] | ran[1] == {t.number for t in trials}
    folders = {p.name for p in tune_dir.glob("trial-*")}
    assert folders == {Path(t.user_attrs["run_dir"]).name for t in trials} == {f"trial-{t.number:04d}" for t in trials}
    for t in trials:
        done = "report.json" if t.state == optuna.trial.TrialState.COMPLETE else "PRUNED.txt"
        assert (tune_dir / f"trial-{t.number:04d}" / done).is_file()
    summary = json.loads((tune_dir / "tune.json").read_text())
    assert len(summary["trials"]) == len(trials) and summary["best_test"]["n"] == 80
    assert set(summary["importances"]) == {"lr_factor", "method.r"}
    assert 'id="plot-importances"' in (tune_dir / "report.html").read_text()


def test_a_worker_killed_mid_trial_leaves_the_study_usable(pretrained_encoder, sentiment_dir, tmp_path, capsys):
    from peftlab.cli import main

    data = _base(pretrained_encoder, sentiment_dir, tmp_path)
    data["tune"] = {"space": {"lr_factor": {"low": 0.5, "high": 2.0, "log": True}}, "heartbeat_seconds": 1}
    path = _write(tmp_path, data, "k.yaml")
    args = ["tune", "--config", str(path), "--trials", "2"]
    env = _worker_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tune_dir = tmp_path / "runs" / "k"
    deadline = time.monotonic() + 300
    while not (tune_dir / "trial-0001" / "config.yaml").is_file():  # trial 1 has started
        assert proc.poll() is None and time.monotonic() < deadline, "the worker ended before its second trial"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    assert _study(tune_dir, "k").trials[1].state == optuna.trial.TrialState.RUNNING
    # Past the grace period (two heartbeats, 2 s), plus a second: SQLite's clock has whole seconds.
    time.sleep(max(0.0, killed + 4.0 - time.monotonic()))

    assert main(args) == 0  # the same command continues the study
    trials = _study(tune_dir, "k").trials
    assert trials[1].state == optuna.trial.TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params and retry.state == optuna.trial.TrialState.COMPLETE
    counted = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(counted) == 2
    board = (tune_dir / "leaderboard.md").read_text()
    assert "| 1 | failed |" in board and "its worker stopped" in board and "retry of trial 1" in board
    assert "tune k: 2 complete, 1 failed" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "tune").glob("*.yaml")))
def test_shipped_tune_configs_load(path):
    assert path.read_text().startswith("# peftlab tune --config"), "each config is headed by its command"
    base, tune = load_tune(path)
    assert base.data.validation_size > 0 and tune.search_params()


def test_the_pruner_spares_a_lagging_trial_while_it_still_improves():
    from peftlab.tune import make_pruner

    study = optuna.create_study(
        direction="maximize", pruner=make_pruner(optuna, TuneConfig(prune_after_trials=2, prune_after_rounds=0))
    )
    for _ in range(2):  # two complete trials at 0.8 from the first round
        trial = study.ask()
        for step in range(1, 6):
            trial.report(0.8, step)
        study.tell(trial, 0.8)

    def rounds(scores):  # the rounds at which the pruner would stop a trial with these scores
        trial, stops = study.ask(), []
        for step, score in enumerate(scores, 1):
            trial.report(score, step)
            stops += [step] if trial.should_prune() else []
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return stops

    assert rounds([0.5, 0.55, 0.6, 0.65, 0.7]) == [], "behind, but better every round: a longer schedule"
    assert rounds([0.5, 0.5, 0.5, 0.5, 0.5])[:1] == [3], "behind and flat for 2 rounds (patience): stopped"
    assert rounds([0.9, 0.9, 0.9, 0.9, 0.9]) == [], "ahead: never"
    plain = make_pruner(optuna, TuneConfig(prune_patience=0, pruner="median"))
    assert type(plain).__name__ == "PercentilePruner" and plain._percentile == 50.0


def test_refit_trains_the_best_settings_on_train_and_validation_for_the_test_split(
    pretrained_encoder, sentiment_dir, tmp_path
):
    data = _base(pretrained_encoder, sentiment_dir, tmp_path, epochs=1)
    data["data"]["validation_size"] = 0.25
    data["tune"] = {"space": {"train.lr": [3e-3]}}
    base, tune = load_tune(_write(tmp_path, data))
    tune.trials = 1
    summary = run_tune(base, tune, "r")
    tune_dir = tmp_path / "runs" / "r"
    trial = json.loads((tune_dir / "trial-0000" / "report.json").read_text())
    refit = json.loads((tune_dir / "refit" / "report.json").read_text())
    assert refit["data"]["train_size"] == trial["data"]["train_size"] + trial["data"]["validation_size"]
    assert not refit["data"]["validation_size"]
    assert summary.best_test["accuracy"] == refit["finetuned"]["accuracy"] and summary.best_test["n"] == 80
    assert "trained once more on the training and validation data" in (tune_dir / "leaderboard.md").read_text()
    # Read back, not trained again: the test split met this model once.
    before = (tune_dir / "refit" / "report.json").stat().st_mtime_ns
    again = run_tune(base, tune, "r")
    assert again.best_test == summary.best_test and (tune_dir / "refit" / "report.json").stat().st_mtime_ns == before
