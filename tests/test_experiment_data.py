"""Data features end to end: the experiment tokenizes pairs, truncates, and reports leakage."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA, make_texts
from test_cli import peftlab

from peftlab.config import load_config
from peftlab.data import load_data
from peftlab.experiment import run_experiment


def _cfg(tiny_encoder, tmp_path, *extra):
    return load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"output_dir={tmp_path / 'runs'}",
            "precision=fp32",
            "max_steps=2",
            "batch_size=8",
            *extra,
        ],
    )


def test_sentence_pairs_from_a_dataframe_run_and_are_reported(tiny_encoder, tmp_path):
    texts, labels = make_texts(48, seed=6)
    df = pd.DataFrame({"premise": texts, "hypothesis": [t.split()[0] for t in texts], "label": labels})
    df = pd.concat([df, df.head(4)])  # four repeated rows: they leak into the carved test set or stay in train
    cfg = _cfg(
        tiny_encoder,
        tmp_path,
        "dataset=pairs-frame",
        "text_pair_column=hypothesis",
        "max_length=12",
        "truncation=head+tail",
        "name=pairs",
    )
    bundle = load_data(cfg.data, source=df)
    report = run_experiment(cfg, bundle=bundle, baseline=False, reload=False)
    data = report["data"]
    assert data["text_pair_column"] == "hypothesis" and data["truncated_train"] > 0
    assert data["duplicates_in_train"] + data["train_test_overlap"] == 4
    md = (tmp_path / "runs" / "pairs" / "report.md").read_text()
    assert "second text `hypothesis`" in md and "longer than 12 tokens kept their head+tail" in md
    assert "repeated texts within train" in md


def test_pair_predictions_use_segment_ids(pretrained_encoder, tmp_path):
    """The fine-tuned model sees the second text as segment 1: Predictor's probabilities
    equal the adapter model's on transformers' own `tokenizer(first, second)` encoding."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.artifacts import load_adapter
    from peftlab.experiment import Predictor

    # A base whose segment-1 embedding differs strongly from segment 0's, so that leaving
    # token_type_ids out would change the predictions visibly.
    base = AutoModelForSequenceClassification.from_pretrained(pretrained_encoder)
    with torch.no_grad():
        base.bert.embeddings.token_type_embeddings.weight[1] += torch.randn(
            base.config.hidden_size, generator=torch.Generator().manual_seed(0)
        )
    base.save_pretrained(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(pretrained_encoder)
    tok.save_pretrained(tmp_path / "base")
    texts, labels = make_texts(48, seed=6)
    df = pd.DataFrame({"premise": texts, "hypothesis": [t.split()[-1] for t in texts], "label": labels})
    cfg = _cfg(tmp_path / "base", tmp_path, "dataset=pairs-frame", "text_pair_column=hypothesis", "name=segments")
    run_experiment(cfg, bundle=load_data(cfg.data, source=df), baseline=False, reload=False)
    adapter = tmp_path / "runs" / "segments" / "adapter"
    firsts, seconds = texts[:6], [t.split()[0] for t in texts[:6]]
    # fp32: compared with the fp32 model below (auto would pick bf16 on a CPU that has it).
    got = [p["probabilities"] for p in Predictor(adapter, precision="fp32")(firsts, pairs=seconds)]
    model, _, meta = load_adapter(adapter)
    enc = tok(firsts, seconds, padding=True, return_tensors="pt")
    assert (enc["token_type_ids"] == 1).any()
    with torch.no_grad():
        want = model.eval()(**enc).logits.softmax(-1)
        flat = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)
    got = torch.tensor([[p[n] for n in meta["label_names"]] for p in got])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (flat - want).abs().max() > 1e-3  # without segment ids the predictions differ

    # The CLI: 'first<TAB>second' lines with --pairs; single texts are refused for this adapter.
    lines = "".join(f"{a}\t{b}\n" for a, b in zip(firsts, seconds))
    out = peftlab("predict", adapter, "--pairs", "--json", "--precision", "fp32", cwd=tmp_path, stdin=lines)
    assert out.returncode == 0, out.stderr
    cli = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["pair"] for r in cli] == seconds
    np.testing.assert_allclose([[r["probabilities"][n] for n in meta["label_names"]] for r in cli], got, atol=1e-5)
    out = peftlab("predict", adapter, firsts[0], cwd=tmp_path)
    assert out.returncode == 2 and "trained on sentence pairs (second text 'hypothesis')" in out.stderr


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="../shared/data not beside the checkout")
def test_sst2_mirror_experiment_reports_no_overlap(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(SHARED_DATA))
    cfg = _cfg(tiny_encoder, tmp_path, "dataset=glue/sst2", "max_train_samples=64", "max_eval_samples=32", "name=sst2")
    report = run_experiment(cfg, baseline=False, reload=False)
    assert report["data"]["train_size"] == 64 and report["label_names"] == ["negative", "positive"]
    md = (tmp_path / "runs" / "sst2" / "report.md").read_text()
    assert "the test set does not overlap train" in md
