import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from peftlab import artifacts
from peftlab.data import PadCollator, load_data, tokenize
from peftlab.engines.native import predict_logits
from peftlab.engines.native import train as train_native
from peftlab.errors import PeftlabError
from peftlab.methods import apply_method
from peftlab.models import base_fingerprint, head_module_names, load_model

RELOAD_SCRIPT = """
import json, sys
from peftlab.artifacts import load_adapter
from peftlab.data import PadCollator, tokenize
from peftlab.engines.native import predict_logits
model, tok, meta = load_adapter(sys.argv[1])
texts = json.loads(sys.argv[2])
ds = tokenize(tok, texts, None, 64)
print(json.dumps(predict_logits(model, ds, PadCollator(tok.pad_token_id, tok.padding_side), 8).tolist()))
"""


def _trained(cfg, method, tmp_path, model_name=None):
    cfg.method.name = method
    if model_name:
        cfg.model.name = model_name
    cfg.train.max_steps = 6
    bundle = load_data(cfg.data)
    torch.manual_seed(0)
    model, tok, _ = load_model(cfg.model, 2, bundle.label_names)
    heads = head_module_names(model)
    fingerprint = base_fingerprint(model)
    collate = PadCollator(tok.pad_token_id, tok.padding_side)
    model = apply_method(model, cfg.method)
    train_native(model, tokenize(tok, bundle.train.texts, bundle.train.labels, 64), collate, cfg, "fp32")
    test = tokenize(tok, bundle.test.texts, bundle.test.labels, 64)
    logits = predict_logits(model, test, collate, 8)
    meta = {
        "base_model": cfg.model.name,
        "label_names": bundle.label_names,
        "head_modules": heads,
        "method": {"name": method},
        "max_length": 64,
        "data": {"dataset": cfg.data.dataset},
        "base_model_fingerprint": fingerprint,
    }
    adapter_dir = artifacts.save_adapter(model, tmp_path / "adapter", meta, tok)
    return adapter_dir, bundle, logits


@pytest.mark.parametrize(
    "method,kind", [("lora", "encoder"), ("lora", "decoder"), ("head", "encoder"), ("full", "encoder")]
)
def test_reload_in_fresh_process_gives_identical_logits(tiny_cfg, tiny_encoder, tiny_decoder, tmp_path, method, kind):
    """The head must travel with the adapter and dropout must be off once reloaded (pitfalls 1 and 2)."""
    adapter_dir, bundle, logits = _trained(tiny_cfg, method, tmp_path, tiny_decoder if kind == "decoder" else None)
    out = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(adapter_dir), json.dumps(bundle.test.texts)],
        capture_output=True,
        text=True,
        check=True,
    )
    np.testing.assert_array_equal(np.array(json.loads(out.stdout), dtype=np.float32), logits)


def test_adapter_loads_with_plain_peft(tiny_cfg, tiny_encoder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, bundle, logits = _trained(tiny_cfg, "lora", tmp_path)
    meta = json.loads((adapter_dir / "peftlab.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=len(meta["label_names"]))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_encoder)
    ds = tokenize(tok, bundle.test.texts, None, 64)
    np.testing.assert_array_equal(predict_logits(model, ds, PadCollator(tok.pad_token_id), 8), logits)


def test_adapter_records_what_made_it(tiny_cfg, tmp_path):
    adapter_dir, _, _ = _trained(tiny_cfg, "lora", tmp_path)
    meta = json.loads((adapter_dir / "peftlab.json").read_text())
    assert meta["label_names"] == ["neg", "pos"]
    assert set(meta["versions"]) >= {"torch", "transformers", "peft"}
    assert "adapter_model.safetensors" in meta["weights_sha256"]
    assert not list(tmp_path.glob(".adapter.tmp-*")), "no temporary folder left behind"


def test_flipped_byte_in_weights_is_detected(tiny_cfg, tmp_path):
    adapter_dir, _, _ = _trained(tiny_cfg, "lora", tmp_path)
    weights = adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PeftlabError, match="do not match their checksum"):
        artifacts.load_adapter(adapter_dir)


def test_adapter_on_wrong_base_model_fails_clearly(tiny_cfg, tiny_decoder, tmp_path):
    adapter_dir, _, _ = _trained(tiny_cfg, "lora", tmp_path)
    with pytest.raises(PeftlabError, match="was trained on base model"):
        artifacts.load_adapter(adapter_dir, model_name=tiny_decoder)


def test_broken_adapter_folders(tmp_path):
    with pytest.raises(PeftlabError, match="does not exist"):
        artifacts.load_adapter(tmp_path / "nope")
    with pytest.raises(PeftlabError, match="not a peftlab adapter folder"):
        artifacts.load_adapter(tmp_path)
    (tmp_path / "peftlab.json").write_text("{not json")
    with pytest.raises(PeftlabError, match="corrupted"):
        artifacts.load_adapter(tmp_path)


def test_adapter_from_a_newer_peftlab_is_refused(tiny_cfg, tmp_path):
    adapter_dir, _, _ = _trained(tiny_cfg, "lora", tmp_path)
    meta = json.loads((adapter_dir / "peftlab.json").read_text())
    assert meta["format_version"] == artifacts.FORMAT_VERSION
    meta["format_version"] = artifacts.FORMAT_VERSION + 1
    (adapter_dir / "peftlab.json").write_text(json.dumps(meta))
    with pytest.raises(PeftlabError, match=r"written by a newer peftlab \(adapter format 2, this one reads up to 1\)"):
        artifacts.load_adapter(adapter_dir)
