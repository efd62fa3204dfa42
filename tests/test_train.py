import logging

import numpy as np
import pytest
import torch

from peftlab.config import load_config
from peftlab.data import PadCollator, load_data, tokenize
from peftlab.engines.native import evaluate, training_sampler
from peftlab.engines.native import train as train_native
from peftlab.engines.trainer import predict_logits as predict_logits_trainer
from peftlab.engines.trainer import train as train_with_trainer
from peftlab.errors import PeftlabError
from peftlab.methods import apply_method, count_parameters
from peftlab.metrics import compute_metrics, read_metrics_log
from peftlab.models import load_model, set_model_dropout


def _setup(cfg):
    bundle = load_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model, tok, _ = load_model(cfg.model, len(bundle.label_names), bundle.label_names)
    collate = PadCollator(tok.pad_token_id, tok.padding_side)
    train = tokenize(tok, bundle.train.texts, bundle.train.labels, 64)
    test = tokenize(tok, bundle.test.texts, bundle.test.labels, 64)
    return bundle, model, collate, train, test


def _lora_b(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("engine", ["native", "trainer"])
def test_both_engines_train_lora_and_head(tiny_cfg, tmp_path, engine):
    """The Trainer must be able to train a PeftModel (label_names it cannot infer, pitfall 5), and
    LoRA B must move (LoRA silently frozen, pitfall 9)."""
    cfg = tiny_cfg
    cfg.train.engine = engine
    cfg.train.epochs, cfg.train.lr = 2, 1e-2
    bundle, model, collate, train, test = _setup(cfg)
    model = apply_method(model, cfg.method)
    before_b = _lora_b(model)
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    run = train_native if engine == "native" else train_with_trainer
    extra = () if engine == "native" else (tmp_path / "trainer",)
    summary = run(model, train, collate, cfg, "fp32", *extra, metrics_path=tmp_path / "metrics.jsonl")
    assert summary.steps == 40
    # Both engines log the same metrics.jsonl entries: the report's loss and LR curves.
    logged, _ = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [(e["step"], round(e["loss"], 4)) for e in logged] == [
        (h["step"], round(h["loss"], 4)) for h in summary.loss_history
    ]
    assert len(logged) >= 2 and logged[-1]["step"] == 40 and all(e["lr"] > 0 for e in logged[:-1])
    after_b = _lora_b(model)
    assert before_b and all(not torch.equal(before_b[n], after_b[n]) for n in before_b)
    assert not torch.equal(head_before, model.base_model.model.classifier.modules_to_save["default"].weight)
    assert summary.loss_history[-1]["loss"] < summary.loss_history[0]["loss"]


def test_full_fine_tuning_learns_the_task(tiny_cfg):
    cfg = tiny_cfg
    cfg.method.name = "full"
    cfg.train.lr, cfg.train.epochs = 3e-3, 3
    bundle, model, collate, train, test = _setup(cfg)
    before, _ = evaluate(model, test, collate, bundle.label_names, 32)
    model = apply_method(model, cfg.method)
    assert count_parameters(model)[0] == count_parameters(model)[1]
    train_native(model, train, collate, cfg, "fp32")
    after, _ = evaluate(model, test, collate, bundle.label_names, 32)
    assert after["accuracy"] >= 0.9 > before["accuracy"]


def test_head_method_trains_only_the_head(tiny_cfg):
    cfg = tiny_cfg
    cfg.method.name = "head"
    _, model, collate, train, _ = _setup(cfg)
    model = apply_method(model, cfg.method)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_native(model, train, collate, cfg, "fp32")
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_engines_evaluate_identically(tiny_cfg, tmp_path):
    """Same model, data and seed: metrics of the two engines agree to 1e-6."""
    bundle, model, collate, _, test = _setup(tiny_cfg)
    model = apply_method(model, tiny_cfg.method)
    native, native_logits = evaluate(model, test, collate, bundle.label_names, tiny_cfg.train.eval_batch_size)
    trainer_logits = predict_logits_trainer(model, test, collate, tiny_cfg, "fp32", tmp_path)
    trainer = compute_metrics(trainer_logits, test.labels, bundle.label_names)
    for key in ("loss", "accuracy", "macro_f1"):
        assert abs(native[key] - trainer[key]) <= 1e-6, key
    np.testing.assert_allclose(native_logits, trainer_logits, atol=1e-6)


def test_training_is_deterministic(tiny_cfg):
    results = []
    for _ in range(2):
        cfg = load_config(
            None,
            [
                f"{k}={v}"
                for k, v in (
                    ("model", tiny_cfg.model.name),
                    ("dataset", tiny_cfg.data.dataset),
                    ("precision", "fp32"),
                    ("max_steps", 8),
                )
            ],
        )
        bundle, model, collate, train, test = _setup(cfg)
        model = apply_method(model, cfg.method)
        train_native(model, train, collate, cfg, "fp32")
        results.append(evaluate(model, test, collate, bundle.label_names, 32)[1])
    np.testing.assert_array_equal(results[0], results[1])


def test_auto_batching_stratifies_only_where_length_predicts_the_label(caplog):
    from peftlab.data import TokenizedDataset

    rng = np.random.default_rng(0)
    labels = (rng.random(600) < 0.15).astype(int).tolist()
    predictive = [int(rng.integers(60, 120)) if y else int(rng.integers(5, 60)) for y in labels]
    unrelated = rng.integers(5, 120, 600).tolist()
    with caplog.at_level(logging.INFO, logger="peftlab"):
        assert training_sampler(TokenizedDataset([[1] * n for n in predictive], labels), 16, 0).labels is not None
        assert "batching: stratified" in caplog.text and "length predicts the label" in caplog.text
        caplog.clear()
        assert training_sampler(TokenizedDataset([[1] * n for n in unrelated], labels), 16, 0).labels is None
        assert "batching: length" in caplog.text
    assert training_sampler(TokenizedDataset([[1] * n for n in predictive], labels), 16, 0, "length").labels is None
    assert training_sampler(TokenizedDataset([[1] * n for n in unrelated], labels), 16, 0, "random").window == 1


@pytest.mark.parametrize(
    "cpu_flags,capability,onednn_isa,native",
    [
        ("avx2 avx512f avx512_bf16 amx_bf16", "AVX512", None, True),
        ("avx2 avx512f avx512_bf16 amx_bf16", "AVX512", "AVX512_CORE_AMX", True),
        # The same CPU with its kernels held to AVX2 (as .ci/run's second pass does): bf16 is
        # emulated there, some 300x slower than fp32, so auto must not pick it.
        ("avx2 avx512f avx512_bf16 amx_bf16", "AVX2", None, False),
        ("avx2 avx512f avx512_bf16 amx_bf16", "AVX512", "AVX2", False),
        ("avx2 fma", "AVX2", None, False),  # an AVX2-only CPU
    ],
)
def test_auto_precision_picks_bf16_only_where_it_is_native(monkeypatch, cpu_flags, capability, onednn_isa, native):
    from pathlib import Path

    from peftlab.runtime import cpu_supports_bf16, resolve_precision

    read_text = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: f"flags\t: {cpu_flags}\n" if str(self) == "/proc/cpuinfo" else read_text(self, *a, **k),
    )
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    if onednn_isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn_isa)
    assert cpu_supports_bf16() is native
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")


def test_trainer_engine_keeps_a_cpu_model_on_the_cpu_where_cuda_is_present(tiny_cfg, tmp_path, monkeypatch):
    """engine=trainer device=cpu: the Trainer follows the model's device, not whatever GPU the
    machine has. CUDA is mocked present; any attempt to use it would fail here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = tiny_cfg
    cfg.train.engine, cfg.model.device, cfg.train.max_steps = "trainer", "cpu", 3
    bundle, model, collate, train, test = _setup(cfg)
    model = apply_method(model, cfg.method)
    summary = train_with_trainer(model, train, collate, cfg, "fp32", tmp_path / "trainer")
    assert summary.steps == 3
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _packing_cfg(tiny_cfg, *overrides):
    return load_config(
        None,
        [
            f"model={tiny_cfg.model.name}",
            f"dataset={tiny_cfg.data.dataset}",
            "precision=fp32",
            "batching=stratified",
            *overrides,
        ],
    )


def test_packed_training_matches_padded_training_step_for_step(pretrained_encoder, tiny_cfg, caplog):
    """Without dropout, packed and padded batches train to the same weights: packing changes
    where texts sit in a batch, never what the model computes."""
    logits = {}
    for packing in ("always", "never"):
        cfg = _packing_cfg(tiny_cfg, f"model={pretrained_encoder}", f"packing={packing}", "dropout=0", "max_steps=6")
        bundle, model, collate, train, test = _setup(cfg)
        set_model_dropout(model, 0.0)
        model = apply_method(model, cfg.method)
        with caplog.at_level(logging.INFO, logger="peftlab"):
            train_native(model, train, collate, cfg, "fp32")
        logits[packing] = evaluate(model, test, collate, bundle.label_names, 32)[1]
        assert model._forward_pre_hooks == {}, "the packing hooks come off after training"
    assert "packing: on" in caplog.text
    np.testing.assert_allclose(logits["always"], logits["never"], atol=1e-4)
    assert np.abs(logits["never"]).max() > 0.05, "the head moved: the comparison means something"


def test_a_packed_epoch_shows_every_example_exactly_once(tiny_cfg):
    from peftlab.engines.native import _set_up

    cfg = _packing_cfg(tiny_cfg, "packing=always", "batch_size=16")
    bundle, model, collate, train, test = _setup(cfg)
    model = apply_method(model, cfg.method)
    run = _set_up(model, train, collate, cfg, "fp32")
    seen, rows = [], 0
    for batch in run.loader:
        rows += batch["input_ids"].shape[0]
        ids, seq = batch["input_ids"], batch["sequence_ids"]
        assert len(batch["labels"]) in (16, len(train) % 16) and ids.shape[0] <= len(batch["labels"])
        for row in range(ids.shape[0]):
            seen += [tuple(ids[row][seq[row] == s].tolist()) for s in seq[row].unique().tolist() if s > 0]
    run.packing.remove()
    assert rows <= len(train)
    assert sorted(seen) == sorted(tuple(train[i]["input_ids"]) for i in range(len(train)))


@pytest.mark.parametrize("packing", ["auto", "always"])
def test_methods_that_cannot_pack_train_padded_or_say_why(tiny_cfg, packing, caplog):
    cfg = _packing_cfg(tiny_cfg, "method=prompt_tuning", f"packing={packing}", "max_steps=2")
    bundle, model, collate, train, test = _setup(cfg)
    model = apply_method(model, cfg.method)
    if packing == "always":
        with pytest.raises(PeftlabError, match="packing=always, but prompt-learning methods .*packing=never"):
            train_native(model, train, collate, cfg, "fp32")
        return
    with caplog.at_level(logging.INFO, logger="peftlab"):
        summary = train_native(model, train, collate, cfg, "fp32")
    assert "packing: off (prompt-learning methods prepend virtual tokens" in caplog.text
    assert summary.steps == 2


def test_evaluation_packs_where_it_can_and_gives_the_padded_logits(tiny_cfg):
    from peftlab.engines.native import predict_logits
    from peftlab.models import PackedForward

    bundle, model, collate, train, test = _setup(tiny_cfg)
    model = apply_method(model, tiny_cfg.method)
    for name, p in model.named_parameters():  # LoRA's B starts at zero: give the adapter a say
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    with torch.no_grad():
        padded = np.concatenate(
            [
                model(
                    **{
                        k: v
                        for k, v in collate([test[i] for i in range(s, min(s + 16, len(test)))]).items()
                        if k != "labels"
                    }
                ).logits.numpy()
                for s in range(0, len(test), 16)
            ]
        )
    seen, rows = [], []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append("sequence_ids" in kw) or rows.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    packed = predict_logits(model, test, collate, 16, "fp32")
    hook.remove()
    assert seen[2:] and all(seen[2:]), "after the packed-vs-padded check, every batch was packed"
    assert len(rows[2:]) > 2 and len(set(rows[2:-1])) == 1, "packed rows of one length (the last aside)"
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=0)
    assert PackedForward.active(model) is None, "its own hooks are off again"
    assert model.get_base_model().config._attn_implementation == "sdpa"
    # Under a training run's hooks, evaluation uses them instead of adding a second set.
    with PackedForward(model) as outer:
        np.testing.assert_allclose(predict_logits(model, test, collate, 16, "fp32"), padded, atol=1e-5, rtol=0)
        assert PackedForward.active(model) is outer and len(outer.handles) > 0


def test_a_model_is_checked_for_packing_once_per_structure(tiny_cfg, monkeypatch):
    """The packed-vs-padded check (two fp32 passes) runs once for a model, not for every
    evaluation; adding modules (another adapter) makes it run again."""
    from peft import LoraConfig

    import peftlab.engines.native as native

    bundle, model, collate, train, test = _setup(tiny_cfg)
    model = apply_method(model, tiny_cfg.method)
    calls, real = [], native.packing_gap
    monkeypatch.setattr(native, "packing_gap", lambda *a: calls.append(1) or real(*a))
    first = native.predict_logits(model, test, collate, 16, "fp32")
    again = native.predict_logits(model, test, collate, 16, "fp32")
    assert len(calls) == 1
    np.testing.assert_allclose(again, first, atol=1e-6, rtol=0)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    native.predict_logits(model, test, collate, 16, "fp32")
    assert len(calls) == 2, "another structure: checked again"
