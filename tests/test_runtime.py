"""runtime: precision helpers that must not change what the model computes."""

import pytest
import torch

from peftlab.config import MethodConfig, ModelConfig
from peftlab.data import PadCollator
from peftlab.methods import apply_method
from peftlab.models import load_model
from peftlab.runtime import (
    CPU_TRAINING_ATTENTION,
    _cpu_training_attention,
    autocast,
    bernoulli_keep,
    cpu_dropout,
    dropout_scale,
    fast_dropout,
    frozen_weights_cast,
)


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


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_fast_dropout_keeps_each_value_with_probability_1_minus_p_and_scales_it(p):
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5
    keep = bernoulli_keep(x.shape, p, x)
    assert keep.dtype == x.dtype and set(keep.unique().tolist()) <= {0.0, 1.0}
    assert abs(keep.mean().item() - (1 - p)) < 0.002  # 1e6 draws: SE 3e-4
    # Neighbouring 16-bit lanes of one 64-bit draw are independent: pairs agree as often as chance says.
    pairs = keep.flatten()[: 2 * 400_000].view(-1, 2)
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - (1 - p) ** 2) < 0.003
    x.requires_grad_(True)
    torch.manual_seed(1)
    y = fast_dropout(x, p)
    torch.manual_seed(1)
    mask = bernoulli_keep(x.shape, p, x)
    assert torch.equal(y, x * mask * dropout_scale(p)), "the same generator draws: seeds and resume hold"
    y.sum().backward()
    assert torch.equal(x.grad, mask * dropout_scale(p))
    assert abs(dropout_scale(p) - 1 / (1 - p)) < 1e-4
    assert fast_dropout(x, 0.0) is x and not fast_dropout(x, 1.0).any()


def test_cpu_training_attention_is_attention_with_dropped_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # the first row's last two positions are padding

    class Layer(torch.nn.Module):
        is_causal = False

    layer = Layer().train()
    torch.manual_seed(3)
    out, _ = _cpu_training_attention(layer, q, k, v, mask, dropout=0.25)
    torch.manual_seed(3)
    keep = bernoulli_keep((2, 3, 6, 6), 0.25, q)
    probs = torch.softmax((q @ k.transpose(2, 3) / 2).masked_fill(~mask, torch.finfo(q.dtype).min), -1)
    expected = ((probs * keep) @ v * dropout_scale(0.25)).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # No dropout: SDPA itself, the same numbers as without peftlab's function.
    plain, _ = _cpu_training_attention(layer, q, k, v, mask, dropout=0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(plain, sdpa, rtol=1e-5, atol=1e-6)


def test_cpu_training_attention_is_sdpa_for_decoders_with_grouped_heads():
    # No dropout (decoders have none), causal, 4 query heads sharing 2 key/value heads: the
    # matmul path that replaces SDPA's slow flash backward must give SDPA's numbers (fp32).
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)

    class Layer(torch.nn.Module):
        is_causal = True

    out, _ = _cpu_training_attention(Layer().train(), q, k, v, None, dropout=0.0, use_cache=False)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), q)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # An explicit (packed) causal mask: the same.
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    masked, _ = _cpu_training_attention(Layer().train(), q, k, v, mask, dropout=0.0)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)


def test_cpu_dropout_swaps_in_for_training_only_and_puts_everything_back(pretrained_encoder):
    torch.manual_seed(0)
    model, tok, _ = load_model(ModelConfig(name=pretrained_encoder), 2)
    model = apply_method(model, MethodConfig(dropout=0.1))
    batch = PadCollator(tok.pad_token_id)([{"input_ids": [5, 9, 14, 3, 7]}, {"input_ids": [11, 4, 6]}])
    hf, cpu = model.get_base_model(), torch.device("cpu")
    dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    assert any("lora_dropout" in n for n, m in model.named_modules() if m in dropouts), "the adapter's too"
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        with cpu_dropout(model, cpu):
            assert hf.config._attn_implementation == CPU_TRAINING_ATTENTION
            assert all("forward" in vars(m) for m in dropouts)
            assert torch.equal(model(**batch).logits, expected), "evaluation is untouched"
            model.train()
            torch.manual_seed(5)
            first = model(**batch).logits
            torch.manual_seed(5)
            assert torch.equal(model(**batch).logits, first), "seeded: the same masks"
            assert not torch.allclose(model(**batch).logits, first), "new draws: new masks"
    assert hf.config._attn_implementation == "sdpa" and not any("forward" in vars(m) for m in dropouts)
    with cpu_dropout(model, torch.device("meta")):  # not a CPU: nothing changes
        assert hf.config._attn_implementation == "sdpa" and not any("forward" in vars(m) for m in dropouts)
