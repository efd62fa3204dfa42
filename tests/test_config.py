from dataclasses import fields
from pathlib import Path

import pytest

from peftlab.cli import FLAG_NAMES, main
from peftlab.config import SECTIONS, RunConfig, apply_overrides, load_config
from peftlab.errors import PeftlabError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_offline_quickstart():
    cfg = load_config(None)
    assert (cfg.model.name, cfg.data.dataset, cfg.method.name) == ("minilm", "sms_spam", "lora")
    assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (8, 16, 0.1)
    assert (cfg.data.test_size, cfg.data.split_seed) == (0.2, 42)
    assert cfg.model.trust_remote_code is False


def test_plain_dotted_and_alias_keys():
    cfg = apply_overrides(
        RunConfig(),
        ["lr=5e-4", "method.r=4", "model=smollm2-135m", "dataset=imdb", "target_modules=query,value", "overwrite=true"],
    )
    assert cfg.train.lr == 5e-4 and cfg.method.r == 4
    assert cfg.model.name == "smollm2-135m" and cfg.data.dataset == "imdb"
    assert cfg.method.target_modules == ["query", "value"] and cfg.overwrite is True


def test_unknown_key_suggests_the_closest():
    with pytest.raises(PeftlabError, match=r"unknown config key 'epoch'.*did you mean 'epochs'"):
        apply_overrides(RunConfig(), ["epoch=2"])


def test_wrong_type_names_key():
    with pytest.raises(PeftlabError, match=r"batch_size='big' is not a valid int"):
        apply_overrides(RunConfig(), ["batch_size=big"])


def test_validation_collects_every_problem():
    with pytest.raises(PeftlabError) as err:
        load_config(None, ["method=lorra", "test_size=1.5", "engine=keras"])
    msg = str(err.value)
    assert "did you mean 'lora'" in msg and "test_size=1.5" in msg and "engine='keras'" in msg


def test_rates_must_be_positive_and_flags_boolean():
    with pytest.raises(PeftlabError) as err:
        load_config(None, ["lr=0", "head_lr=-1"])
    assert "train.lr=0" in str(err.value) and "train.head_lr=-1" in str(err.value)
    with pytest.raises(PeftlabError, match=r"compile='maybe'"):
        apply_overrides(RunConfig(), ["compile=maybe"])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["epochs=2", "lr=3e-4", "max_train_samples=100", "target_modules=[query]"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path).to_dict() == cfg.to_dict()


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(PeftlabError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(PeftlabError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    assert path.read_text().startswith("# peftlab run --config"), "each config is headed by its command"
    load_config(path)


def test_data_options_are_validated():
    with pytest.raises(PeftlabError) as err:
        load_config(None, ["truncation=middle", "train_fraction=0", "text_column=a", "text_pair_column=a"])
    msg = str(err.value)
    assert "data.truncation='middle' is not one of head, tail, head+tail" in msg
    assert "data.train_fraction=0.0 must be in (0, 1]" in msg and "text_pair_column must differ" in msg
    cfg = load_config(
        None,
        ["truncation=head+tail", "dedup=true", "text_pair_column=sentence2", "train_fraction=0.5", "token_cache=false"],
    )
    assert (cfg.data.truncation, cfg.data.dedup, cfg.data.text_pair_column) == ("head+tail", True, "sentence2")
    assert cfg.data.train_fraction == 0.5 and cfg.data.token_cache is False


def test_data_options_reach_the_experiment_from_the_cli(monkeypatch, capsys):
    """`peftlab run` hands the experiment a config holding the data flags and key=value
    overrides it was given (the experiment is replaced, so nothing trains)."""
    import peftlab.experiment

    received = []

    def stop_before_training(cfg, **kwargs):
        received.append(cfg)
        raise PeftlabError("stopped before training")

    monkeypatch.setattr(peftlab.experiment, "run_experiment", stop_before_training)
    code = main(
        [
            "run",
            "--truncation",
            "head+tail",
            "--dedup",
            "--text-pair-column",
            "sentence2",
            "--train-fraction",
            "0.5",
            "token_cache=false",
        ]
    )
    assert code == 2 and "peftlab: error: stopped before training" in capsys.readouterr().err
    data = received[0].data
    assert (data.truncation, data.dedup, data.text_pair_column) == ("head+tail", True, "sentence2")
    assert data.train_fraction == 0.5 and data.token_cache is False


def test_every_setting_is_a_run_flag_with_its_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    with pytest.raises(SystemExit, match="0"):
        main(["run", "--help"])
    page = " ".join(capsys.readouterr().out.split())
    for section, cls in [(None, RunConfig), *SECTIONS.items()]:
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            flag = "--" + FLAG_NAMES.get((section, f.name), f.name).replace("_", "-")
            metavar = "" if str(f.type).startswith("bool") else " X"
            assert f.metadata["help"] and f"{flag}{metavar} {f.metadata['help']}" in page, flag
