"""Data features end to end: the experiment tokenizes pairs, truncates, and reports leakage."""

import pandas as pd
import pytest
from conftest import SHARED_DATA, make_texts

from peftlab.config import load_config
from peftlab.data import load_data
from peftlab.experiment import run_experiment


def _cfg(tiny_encoder, tmp_path, *extra):
    return load_config(None, [f"model={tiny_encoder}", f"output_dir={tmp_path / 'runs'}", "precision=fp32",
                              "max_steps=2", "batch_size=8", *extra])


def test_sentence_pairs_from_a_dataframe_run_and_are_reported(tiny_encoder, tmp_path):
    texts, labels = make_texts(48, seed=6)
    df = pd.DataFrame({"premise": texts, "hypothesis": [t.split()[0] for t in texts], "label": labels})
    df = pd.concat([df, df.head(4)])  # four repeated rows: they leak into the carved test set or stay in train
    cfg = _cfg(tiny_encoder, tmp_path, "dataset=pairs-frame", "text_pair_column=hypothesis", "max_length=12",
               "truncation=head+tail", "name=pairs")
    bundle = load_data(cfg.data, source=df)
    report = run_experiment(cfg, bundle=bundle, baseline=False, reload=False)
    data = report["data"]
    assert data["text_pair_column"] == "hypothesis" and data["truncated_train"] > 0
    assert data["duplicates_in_train"] + data["train_test_overlap"] == 4
    md = (tmp_path / "runs" / "pairs" / "report.md").read_text()
    assert "second text `hypothesis`" in md and "longer than 12 tokens kept their head+tail" in md
    assert "repeated texts within train" in md


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data not beside the checkout")
def test_sst2_mirror_experiment_reports_no_overlap(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(SHARED_DATA))
    cfg = _cfg(tiny_encoder, tmp_path, "dataset=glue/sst2", "max_train_samples=64", "max_eval_samples=32",
               "name=sst2")
    report = run_experiment(cfg, baseline=False, reload=False)
    assert report["data"]["train_size"] == 64 and report["label_names"] == ["negative", "positive"]
    md = (tmp_path / "runs" / "sst2" / "report.md").read_text()
    assert "the test set does not overlap train" in md
