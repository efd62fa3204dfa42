"""runtime: precision helpers that must not change what the model computes."""

import torch

from peftlab.config import MethodConfig, ModelConfig
from peftlab.data import PadCollator
from peftlab.methods import apply_method
from peftlab.models import load_model
from peftlab.runtime import autocast, frozen_weights_cast


def _lora_model(path, **method):
    torch.manual_seed(0)
    model, tok, _ = load_model(ModelConfig(name=path), 2)
    model = apply_method(model, MethodConfig(dropout=0.0, **method))
    model.eval()
    batch = PadCollator(tok.pad_token_id)([{"input_ids": [5, 9, 14, 3, 7]}, {"input_ids": [11, 4, 6]}])
    return model, batch


def test_frozen_weights_cast_once_give_exactly_what_autocast_computes(pretrained_encoder):
    model, batch = _lora_model(pretrained_encoder)
    cpu = torch.device("cpu")
    frozen = {n: p for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    before = {n: p.data_ptr() for n, p in frozen.items()}
    with torch.no_grad(), autocast(cpu, "bf16"):
        expected = model(**batch).logits
        with frozen_weights_cast(model, cpu, "bf16"):
            assert all(p.dtype == torch.bfloat16 for p in frozen.values()) and frozen
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            cast = model(**batch).logits
    assert torch.equal(cast, expected), "the same bf16 values, cast once instead of every forward"
    assert all(p.dtype == torch.float32 and p.data_ptr() == before[n] for n, p in frozen.items()), "put back"


def test_frozen_weights_stay_fp32_where_a_method_reads_them_outside_matmuls(pretrained_encoder):
    model, _ = _lora_model(pretrained_encoder, name="dora")
    with frozen_weights_cast(model, torch.device("cpu"), "bf16"):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    with frozen_weights_cast(model, torch.device("cpu"), "fp32"):
        assert all(p.dtype == torch.float32 for p in model.parameters())
