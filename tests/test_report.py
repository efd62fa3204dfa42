"""report.html and its parts: curves computed with numpy, confident mistakes, a real tiny run."""

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from peftlab.methods import METHODS
from peftlab.methods.registry import FAMILIES
from peftlab.metrics import read_metrics_log
from peftlab.report import binary_curves, confident_mistakes, model_card


def test_binary_curves_match_hand_computed_values():
    # Scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): AUC = 3 of 4 pairs ranked right.
    c = binary_curves(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert c["roc_auc"] == pytest.approx(0.75)
    # AP = 0.5 * 1 (first hit at precision 1) + 0.5 * 2/3 (second hit at precision 2/3).
    assert c["average_precision"] == pytest.approx(0.5 + 1 / 3)
    assert c["fpr"][0] == c["tpr"][0] == 0 and c["fpr"][-1] == c["tpr"][-1] == 1


def test_binary_curves_treat_tied_scores_as_one_threshold():
    c = binary_curves(np.array([0.5, 0.5, 0.5, 0.5]), np.array([1, 0, 1, 0]))
    assert c["roc_auc"] == pytest.approx(0.5) and len(c["fpr"]) == 2


def test_confident_mistakes_are_wrong_and_sorted_by_confidence():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    out = confident_mistakes(["a", "b", "c", "d"], [1, 0, 0, 0], probs, ["neg", "pos"], k=10)
    assert [m["text"] for m in out] == ["a", "b", "c"]
    assert out[0] == {"text": "a", "true": "pos", "predicted": "neg", "probability": pytest.approx(0.9)}


def test_read_metrics_log_splits_training_and_validation(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss": 0.7, "lr": 1e-3}) + "\n" + json.dumps({"step": 5, "val_loss": 0.6}) + "\n"
    )
    train_log, val_log = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [e["loss"] for e in train_log] == [0.7] and [e["val_loss"] for e in val_log] == [0.6]
    assert read_metrics_log(tmp_path / "absent.jsonl") == ([], [])


@pytest.fixture(scope="module")
def html_run(tiny_encoder, sentiment_dir, tmp_path_factory):
    """One real tiny run (binary task, with validation) whose report.html the tests read."""
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    cfg = load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            "precision=fp32",
            f"output_dir={tmp_path_factory.mktemp('runs')}",
            "name=html",
            "max_steps=6",
            "batch_size=16",
            "log_every=2",
            "validation_size=0.1",
            "eval_every=3",
        ],
    )
    report = run_experiment(cfg)
    return report, cfg


def test_run_writes_self_contained_html_and_png_plots(html_run):
    pytest.importorskip("matplotlib")
    report, _ = html_run
    from pathlib import Path

    run_dir = Path(report["run_dir"])
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert 'id="comparison"' in page and "Most confident mistakes" in page and "peak memory" in page
    # Nothing fetched from the network: no scripts, no external URLs.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "confusion_matrices.png",
        "per_class_f1.png",
        "pr_roc_curves.png",
        "training_curves.png",
    ]
    assert (run_dir / "plots" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["resources"]["peak_rss_mb"] > 0


def test_html_without_matplotlib_has_tables_and_says_why(html_run, monkeypatch, tmp_path):
    from peftlab.report import plots, write_html_report

    report, _ = html_run
    monkeypatch.setattr(plots, "matplotlib_available", lambda: False)
    path = write_html_report(report, tmp_path, {"baseline": None, "fine-tuned": None}, [], [])
    page = path.read_text()
    assert "matplotlib is not installed" in page and "data:image/png" not in page
    assert 'id="comparison"' in page and not (tmp_path / "plots").exists()


def _card_front_matter(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("---\n")[1])


def _plain_snippet_predicts_as_peftlab(card: str, adapter_dir) -> None:
    """Run the card's plain-peft snippet as written: it must give peftlab's predictions."""
    import re

    import torch

    from peftlab.experiment import Predictor

    snippet = re.search(r"With plain transformers and peft:\n\n```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(snippet.replace("path/to/adapter", str(adapter_dir)), scope)
    text = "w1 good w2"
    with torch.no_grad():
        logits = scope["model"].eval()(**scope["tokenizer"](text, return_tensors="pt")).logits
    expected = Predictor(adapter_dir, precision="fp32")([text])[0]["probabilities"]  # the snippet runs fp32
    assert torch.allclose(logits.softmax(-1)[0], torch.tensor(list(expected.values()), dtype=torch.float32), atol=1e-5)


def test_adapter_model_card_has_front_matter_and_loads_with_plain_peft(html_run):
    from pathlib import Path

    report, cfg = html_run
    adapter_dir = Path(report["adapter"]["dir"])
    card = (adapter_dir / "README.md").read_text()
    front = _card_front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == cfg.model.name
    assert front["datasets"] == [cfg.data.dataset] and "lora" in front["tags"]
    assert "## Metrics (test split)" in card and "from peftlab import Predictor" in card
    _plain_snippet_predicts_as_peftlab(card, adapter_dir)


def test_ia3_model_card_snippet_loads_with_plain_peft(tiny_encoder, sentiment_dir, tmp_path):
    """The card's snippet works for a peft method other than lora (it once called them head-only)."""
    from pathlib import Path

    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    cfg = load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            "method=ia3",
            "precision=fp32",
            f"output_dir={tmp_path}",
            "name=ia3",
            "max_steps=2",
            "batch_size=16",
        ],
    )
    adapter_dir = Path(run_experiment(cfg, baseline=False, reload=False)["adapter"]["dir"])
    card = (adapter_dir / "README.md").read_text()
    assert _card_front_matter(card)["library_name"] == "peft"
    _plain_snippet_predicts_as_peftlab(card, adapter_dir)


def _fake_report(method: str) -> dict:
    """A finished run's report, as model_card reads it, for `method` (no training)."""
    from peftlab.config import load_config

    cfg = load_config(None, [f"method={method}", "model=org/base-model", "dataset=sms_spam"])
    per_class = {
        "ham": {"precision": 0.9, "recall": 0.9, "f1": 0.9},
        "spam": {"precision": 0.8, "recall": 0.8, "f1": 0.8},
    }
    return {
        "name": f"card-{method}",
        "config": cfg.to_dict(),
        "label_names": ["ham", "spam"],
        "baseline": None,
        "data": {
            "dataset": "sms_spam",
            "source": "the mirror",
            "split": "given",
            "train_size": 100,
            "test_size": 20,
            "train_label_counts": {"ham": 80, "spam": 20},
            "fingerprint": "abc123",
        },
        "finetuned": {"loss": 0.3, "accuracy": 0.9, "macro_f1": 0.85, "per_class": per_class},
        "model": {"class": "BertForSequenceClassification", "total_params": 1000},
        "method": {"name": method, "trainable_params": 10, "total_params": 1000},
        "adapter": {"size_bytes": 4000},
        "train": {"train_seconds": 1.0, "train_samples_per_s": 100.0},
    }


# One method per family: (method, library_name, what the card says about it, how it loads without peftlab).
CARDS = [
    ("lora", "peft", "low-rank update B·A", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("adalora", "peft", "rank budget is reallocated", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("ia3", "peft", "learned rescaling of keys", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("loha", "peft", "Hadamard product", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("vera", "peft", "shared frozen random projections", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("boft", "peft", "butterfly-factorised", 'PeftModel.from_pretrained(base, "path/to/adapter")'),
    ("prompt_tuning", "peft", "virtual-token embeddings", "fix_prompt_pooling(model)"),
    ("prefix_tuning", "peft", "key/value prefixes", "accept_past_key_values(base)` before `PeftModel.from_pretrained"),
    ("full", "transformers", "every weight", 'AutoModelForSequenceClassification.from_pretrained("path/to/adapter")'),
    ("head", "peftlab", "only the classification head", "`head.safetensors` in this folder holds those weights"),
    ("bitfit", "peftlab", "only the biases (and the head)", "`head.safetensors` in this folder holds those weights"),
]


def test_model_card_cases_cover_every_method_family():
    assert {METHODS[method].family for method, *_ in CARDS} == set(FAMILIES)


@pytest.mark.parametrize("method,library,about,loads", CARDS)
def test_model_card_says_how_each_family_loads(method, library, about, loads):
    card = model_card(_fake_report(method))
    front = _card_front_matter(card)
    assert front["library_name"] == library and front["base_model"] == "org/base-model" and method in front["tags"]
    assert f"`{method}`: " in card and about in card
    assert loads in card and 'Predictor("path/to/adapter")' in card
    assert ("PeftModel" in card) == (library == "peft")
    assert ("AutoModelForSequenceClassification" in card) == (library != "peftlab")
    assert "head-only" not in card


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class _Elements(HTMLParser):
    """Collects <img> sources and table ids from the DOM Chromium dumps."""

    def __init__(self):
        super().__init__()
        self.images, self.tables = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "table":
            self.tables.append(attrs.get("id"))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(html_run, tmp_path):
    pytest.importorskip("matplotlib")
    report, _ = html_run
    page = f"{report['run_dir']}/report.html"
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            # Every host unresolvable, so it renders as offline (test above: the page names no URL).
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            f"file://{page}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    console = [
        line
        for line in out.stderr.splitlines()
        if "CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line
    ]
    assert console == []
    dom = _Elements()
    dom.feed(out.stdout)
    assert len(dom.images) == 4 and all(src.startswith("data:image/png;base64,") for src in dom.images)
    assert "comparison" in dom.tables
