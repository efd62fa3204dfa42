"""The method registry: every entry is complete and builds, and a new method is one entry
(config, training setup, save/load and model card follow from it). `peftlab methods`
listing every entry: tests/test_methods.py."""

import dataclasses

import pytest

from peftlab.config import MethodConfig, load_config
from peftlab.methods import METHODS, MethodSpec, apply_method, count_parameters
from peftlab.methods.build import peft_config
from peftlab.methods.registry import ARTIFACTS, FAMILIES
from peftlab.models import head_module_names, load_model

# peft config classes by family: an entry's builder must make its family's kind of adapter.
PEFT_TYPES = {
    "lora": "LORA",
    "adalora": "ADALORA",
    "scaling": "IA3",
    "hadamard/kronecker": ("LOHA", "LOKR"),
    "vera": "VERA",
    "orthogonal": ("BOFT", "OFT"),
    "prompt": ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"),
}


def _rank_two_lora(cfg, targets, common):
    import peft

    return peft.LoraConfig(r=2, lora_alpha=cfg.alpha, target_modules=targets, **common)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_entry_is_complete(name):
    spec = METHODS[name]
    assert spec.name == name and spec.family in FAMILIES and spec.artifact in ARTIFACTS
    assert spec.lr > 0 and (spec.head_lr is None or spec.head_lr > 0)
    assert spec.about and "\n" not in spec.description
    assert spec.quantization in ("none", "4bit", "8bit")
    if spec.b_lr_ratio_field is not None:
        assert spec.b_lr_ratio_field in {f.name for f in dataclasses.fields(MethodConfig)}
    assert (spec.peft_config is None) == (spec.family == "native")


@pytest.mark.parametrize("name", [name for name, spec in METHODS.items() if spec.peft_config is not None])
def test_every_peft_entry_builds_its_peft_config_on_the_tiny_encoder(tiny_encoder, name):
    model, _, _ = load_model(load_config(None, [f"model={tiny_encoder}"]).model, 2)
    config = peft_config(model, MethodConfig(name=name), head_module_names(model))
    assert config.peft_type.value in PEFT_TYPES[METHODS[name].family]
    assert config.modules_to_save == ["classifier"] and config.task_type.value == "SEQ_CLS"


def test_inconsistent_entries_are_refused():
    with pytest.raises(ValueError, match="a peft method has peft_config"):
        MethodSpec(name="x", family="lora", lr=1e-3, about="x", peft_config=_rank_two_lora, artifact="head")
    with pytest.raises(ValueError, match="must be one of"):
        MethodSpec(name="x", family="lycoris", lr=1e-3, about="x", peft_config=_rank_two_lora)


def test_a_new_method_is_one_registry_entry(tiny_encoder, sentiment_dir, monkeypatch, tmp_path):
    """An entry alone makes a method: validated, at its rates, applied, saved, loaded and carded."""
    from test_report import _fake_report

    from peftlab import artifacts
    from peftlab.report import model_card

    spec = MethodSpec(
        name="lora_r2",
        family="lora",
        lr=2e-3,
        head_lr=4e-2,
        about="LoRA fixed at rank 2",
        peft_config=_rank_two_lora,
        b_lr_ratio_field="lora_plus_ratio",
    )
    monkeypatch.setitem(METHODS, "lora_r2", spec)
    cfg = load_config(None, [f"model={tiny_encoder}", f"dataset={sentiment_dir}", "method=lora_r2"])
    assert (cfg.lr, cfg.head_lr, cfg.b_lr_ratio) == (2e-3, 4e-2, cfg.method.lora_plus_ratio)
    model, tok, _ = load_model(cfg.model, 2)
    heads = head_module_names(model)
    model = apply_method(model, cfg.method)
    assert model.peft_config["default"].r == 2 and count_parameters(model)[0] > 0
    meta = {
        "base_model": tiny_encoder,
        "label_names": ["neg", "pos"],
        "head_modules": heads,
        "method": {"name": "lora_r2"},
    }
    artifacts.save_adapter(model, tmp_path / "adapter", meta, tok)
    reloaded, _, _ = artifacts.load_adapter(tmp_path / "adapter")
    assert reloaded.peft_config["default"].r == 2
    card = model_card(_fake_report("lora_r2"))
    assert "library_name: peft" in card and "LoRA fixed at rank 2" in card
