"""The pipeline's own rules (peftlab.experiment): how run folders are named and claimed,
what a failed run leaves behind, the non-finite weights check, and how evaluate_model and
Predictor follow what the adapter was trained with."""

import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlab import artifacts
from peftlab.config import DataConfig, load_config
from peftlab.errors import PeftlabError
from peftlab.experiment import Predictor, _check_finite_weights, evaluate_model, prepare_run_dir, run_experiment


def _claim(cfg, name=None, overwrite=False) -> Path:
    """Claim a run folder as run_experiment does (writing its config.yaml), then release it."""
    cfg.name, cfg.overwrite = name, overwrite
    claimed = prepare_run_dir(cfg)
    (claimed.path / "config.yaml").write_text(cfg.to_yaml())
    claimed.release()
    return claimed.path


def test_unnamed_runs_are_numbered_never_replaced(tiny_cfg):
    paths = [_claim(tiny_cfg) for _ in range(3)]
    base = tiny_cfg.default_name()
    assert [p.name for p in paths] == [base, f"{base}-2", f"{base}-3"]
    assert all(p.is_dir() for p in paths)


def test_an_existing_named_run_is_refused_without_overwrite(tiny_cfg):
    first = _claim(tiny_cfg, "mine")
    (first / "report.json").write_text("{}")
    with pytest.raises(PeftlabError, match=r"run directory .*mine already exists: pass --overwrite"):
        _claim(tiny_cfg, "mine")
    assert (first / "report.json").read_text() == "{}"
    assert sorted(os.listdir(first.parent)) == ["mine"]


def test_unnamed_run_with_overwrite_replaces_the_default_folder(tiny_cfg):
    first = _claim(tiny_cfg)
    (first / "report.json").write_text("{}")
    again = _claim(tiny_cfg, overwrite=True)
    assert again == first and not (again / "report.json").exists()
    assert os.listdir(first.parent) == [first.name]


def test_resume_with_the_trainer_engine_is_refused_before_any_folder(tiny_cfg):
    tiny_cfg.train.engine, tiny_cfg.name = "trainer", "resumed"
    with pytest.raises(PeftlabError, match=r"--resume needs engine=native"):
        run_experiment(tiny_cfg, resume=True)
    assert not Path(tiny_cfg.output_dir).exists()


def test_a_failure_after_training_leaves_the_folder_and_failed_txt(tiny_cfg, monkeypatch):
    """Unlike bad input (which leaves no folder), a run that fails once its adapter is saved
    keeps the folder, with FAILED.txt saying why and no report.json (it is not finished)."""

    def unreadable(*args, **kwargs):
        raise PeftlabError("adapter unreadable in this test")

    monkeypatch.setattr(artifacts, "load_adapter", unreadable)
    tiny_cfg.train.max_steps, tiny_cfg.name = 2, "failed"
    with pytest.raises(PeftlabError, match="adapter unreadable in this test"):
        run_experiment(tiny_cfg, baseline=False)
    run_dir = Path(tiny_cfg.output_dir) / "failed"
    assert (run_dir / "FAILED.txt").read_text() == "PeftlabError: adapter unreadable in this test\n"
    assert (run_dir / "adapter" / "peftlab.json").is_file() and not (run_dir / "report.json").exists()


def test_a_trained_nan_weight_fails_the_run():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 1] = math.nan
    with pytest.raises(PeftlabError, match=r"training left 1 of 8 trained weights non-finite \(NaN or inf\)"):
        _check_finite_weights(model)


def test_a_frozen_non_finite_weight_does_not_fail_the_run():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf
    model[0].requires_grad_(False)
    _check_finite_weights(model)  # raises if the frozen layer were counted


@pytest.fixture(scope="module")
def short_adapter(tiny_encoder, sentiment_dir, tmp_path_factory):
    """A run trained on 8-token texts keeping their tail: its report and adapter folder."""
    root = tmp_path_factory.mktemp("experiment")
    cfg = load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            f"output_dir={root}",
            "precision=fp32",
            "max_steps=3",
            "max_length=8",
            "truncation=tail",
            "name=short",
        ],
    )
    report = run_experiment(cfg, baseline=False, reload=False)
    return report, root / "short" / "adapter"


def test_evaluate_model_tokenizes_as_the_adapter_was_trained(short_adapter, sentiment_dir):
    report, adapter_dir = short_adapter
    data_cfg = DataConfig(dataset=str(sentiment_dir))  # max_length 256, truncation head
    result = evaluate_model(None, data_cfg, adapter_dir=str(adapter_dir), precision="fp32")
    assert (result["data"]["max_length"], result["data"]["truncation"]) == (8, "tail")
    assert result["data"]["truncated_test"] > 0
    assert result["metrics"]["accuracy"] == report["finetuned"]["accuracy"]
    assert np.isclose(result["metrics"]["loss"], report["finetuned"]["loss"], atol=1e-6)


def test_predictor_refuses_second_texts_for_a_single_text_adapter(short_adapter):
    predictor = Predictor(short_adapter[1])
    with pytest.raises(PeftlabError, match=r"trained on single texts: give no second texts"):
        predictor(["w1 good"], pairs=["w2"])


def test_predictor_needs_one_second_text_per_text(short_adapter):
    predictor = Predictor(short_adapter[1])
    with pytest.raises(PeftlabError, match=r"2 texts but 1 second texts: give one pair per text"):
        predictor(["w1 good", "w2 bad"], pairs=["w3"])


def test_a_validated_config_is_never_changed_by_a_run(tiny_cfg):
    """The run's name comes from its folder, qlora's 4-bit base from the method: neither is
    written back into the config the caller passed."""
    tiny_cfg.train.max_steps = 1
    before = copy.deepcopy(tiny_cfg.to_dict())
    report = run_experiment(tiny_cfg, baseline=False, reload=False)
    assert tiny_cfg.to_dict() == before and tiny_cfg.name is None
    assert report["name"] == Path(report["run_dir"]).name == tiny_cfg.default_name()
