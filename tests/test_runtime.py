"""runtime: precision helpers that must not change what the model computes."""

import pytest
import torch

from peftlab.config import MethodConfig, ModelConfig
from peftlab.data import PadCollator
from peftlab.methods import apply_method
from peftlab.models import load_model
from peftlab.runtime import (
    PEFTLAB_ATTENTION,
    PackedGroups,
    autocast,
    bernoulli_keep,
    cpu_dropout,
    dropout_scale,
    fast_dropout,
    frozen_weights_cast,
    peftlab_attention,
)


def _lora_model(path, **method):
    torch.manual_seed(0)
    model, tok, _ = load_model(ModelConfig(name=path), 2)
    model = apply_method(model, MethodConfig(dropout=0.0, **method))
    model.eval()
    batch = PadCollator(tok.pad_token_id)([{"input_ids": [5, 9, 14, 3, 7]}, {"input_ids": [11, 4, 6]}])
    return model, batch


def test_frozen_weights_cast_once_keep_the_whole_forward_in_bf16(pretrained_encoder):
    model, batch = _lora_model(pretrained_encoder)
    cpu = torch.device("cpu")
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert any("LayerNorm" in n for n in frozen) and any("embeddings" in n for n in frozen)
    before = {n: p.data_ptr() for n, p in frozen.items()}
    streams = []
    hook = (
        model.get_base_model()
        .bert.encoder.layer[0]
        .register_forward_hook(
            lambda module, args, out: streams.append((out[0] if isinstance(out, tuple) else out).dtype)
        )
    )
    with torch.no_grad(), autocast(cpu, "bf16"):
        expected = model(**batch).logits
        with frozen_weights_cast(model, cpu, "bf16"):
            assert all(p.dtype == torch.bfloat16 for p in frozen.values()), "norms and embeddings too"
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
            cast = model(**batch).logits
    hook.remove()
    assert streams == [torch.float32, torch.bfloat16], "the residual stream stays bf16: no casts between matmuls"
    assert not torch.equal(cast, expected), "norms and embeddings in bf16 round differently"
    torch.testing.assert_close(cast.float(), expected.float(), atol=0.03, rtol=0)
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


def test_peftlab_attention_is_attention_with_dropped_probabilities():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # the first row's last two positions are padding

    class Layer(torch.nn.Module):
        is_causal = False

    layer = Layer().train()
    torch.manual_seed(3)
    out, _ = peftlab_attention(layer, q, k, v, mask, dropout=0.25)
    torch.manual_seed(3)
    keep = bernoulli_keep((2, 3, 6, 6), 0.25, q)
    probs = torch.softmax((q @ k.transpose(2, 3) / 2).masked_fill(~mask, torch.finfo(q.dtype).min), -1)
    expected = ((probs * keep) @ v * dropout_scale(0.25)).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # No dropout: SDPA itself, the same numbers as without peftlab's function.
    plain, _ = peftlab_attention(layer, q, k, v, mask, dropout=0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(plain, sdpa, rtol=1e-5, atol=1e-6)


def test_peftlab_attention_is_sdpa_for_decoders_with_grouped_heads():
    # No dropout (decoders have none), causal, 4 query heads sharing 2 key/value heads: the
    # matmul path that replaces SDPA's slow flash backward must give SDPA's numbers (fp32).
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)

    class Layer(torch.nn.Module):
        is_causal = True

    out, _ = peftlab_attention(Layer().train(), q, k, v, None, dropout=0.0, use_cache=False)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), q)
    (expected_grad,) = torch.autograd.grad(expected.sum(), q)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # An explicit (packed) causal mask: the same.
    mask = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    masked, _ = peftlab_attention(Layer().train(), q, k, v, mask, dropout=0.0)
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
            assert hf.config._attn_implementation == PEFTLAB_ATTENTION
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


def _texts_in_groups(lengths, groups, heads=4, kv_heads=4, dim=8, tail=3):
    """q/k/v for texts of `lengths` laid out as PackCollator lays them out (groups of
    (texts, width), each text left in its slot, `tail` padding tokens at the end), the
    groups' masks as PackedForward makes them, and each text's own q/k/v."""
    torch.manual_seed(0)
    texts = [
        (torch.randn(heads, n, dim), torch.randn(kv_heads, n, dim), torch.randn(kv_heads, n, dim)) for n in lengths
    ]
    total = sum(t * w for t, w in groups) + tail
    q, k, v = (
        torch.zeros(1, heads, total, dim),
        torch.zeros(1, kv_heads, total, dim),
        torch.zeros(1, kv_heads, total, dim),
    )
    masks, at, i = [], 0, 0
    for count, width in groups:
        mask = torch.zeros(count, 1, 1, width, dtype=torch.bool)
        for slot in range(count):
            n = lengths[i]
            for full, part in zip((q, k, v), texts[i]):
                full[0, :, at : at + n] = part
            mask[slot, ..., :n] = True
            at, i = at + width, i + 1
        masks.append(mask)
    return texts, (q, k, v), masks


@pytest.mark.parametrize("causal", [False, True])
def test_packed_groups_attend_each_text_alone(causal):
    class Layer(torch.nn.Module):
        is_causal = causal

    lengths, groups = [7, 6, 3, 3, 1], [(2, 7), (3, 3)]
    texts, (q, k, v), masks = _texts_in_groups(lengths, groups, heads=4, kv_heads=2 if causal else 4)
    if causal:
        masks = [m & torch.ones(w, w, dtype=torch.bool).tril() for m, (_, w) in zip(masks, groups)]
    packed = [(t, w, m) for (t, w), m in zip(groups, masks)]
    q.requires_grad_(True)
    for training in (False, True):  # SDPA per group, then the matmul form the CPU trains with
        layer = Layer().train(training)
        out, _ = peftlab_attention(layer, q, k, v, None, dropout=0.0, packed_groups=packed)
        assert out.shape == (1, q.shape[2], 4, 8)
        at, i = 0, 0
        for count, width in groups:
            for _ in range(count):
                tq, tk, tv = texts[i]
                alone = torch.nn.functional.scaled_dot_product_attention(
                    tq[None],
                    tk.repeat_interleave(4 // tk.shape[0], 0)[None],
                    tv.repeat_interleave(4 // tv.shape[0], 0)[None],
                    is_causal=causal,
                )
                torch.testing.assert_close(out[0, at : at + lengths[i]], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
                at, i = at + width, i + 1
        assert not out[0, at:].any(), "the row's tail padding reads nothing"
        # Gradients reach only each text's own tokens: nothing leaks across texts or from padding.
        (grad,) = torch.autograd.grad(out[0, :7].sum(), q)
        assert grad[0, :, :7].abs().sum() > 0 and not grad[0, :, 7:].any()


def test_packed_groups_share_masks_across_layers_and_small_bf16_rows_run_in_fp32():
    # Every layer of one forward pass gets the same PackedGroups: the additive masks are made
    # once, and a bf16 row whose blocks are all small goes through fp32 once, coming back bf16.
    class Layer(torch.nn.Module):
        is_causal = False

    lengths, groups = [7, 6, 3, 3, 1], [(2, 7), (3, 3)]
    texts, (q, k, v), masks = _texts_in_groups(lengths, groups)
    packed = PackedGroups((t, w, m) for (t, w), m in zip(groups, masks))
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    layer = Layer().train()
    reference, _ = peftlab_attention(
        layer, q16.float(), k16.float(), v16.float(), None, dropout=0.0, packed_groups=list(packed)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, _ = peftlab_attention(layer, q16, k16, v16, None, dropout=0.0, packed_groups=packed)
        made = dict(packed.additive)
        second, _ = peftlab_attention(layer, q16, k16, v16, None, dropout=0.0, packed_groups=packed)
    assert first.dtype == torch.bfloat16
    torch.testing.assert_close(first.float(), reference, atol=1e-2, rtol=0)
    assert torch.equal(first, second)
    assert set(made) == {(0, torch.float32, 4), (1, torch.float32, 4)}, "one fp32 mask per group"
    assert all(packed.additive[key] is mask for key, mask in made.items()), "the second layer reuses them"


@pytest.mark.parametrize("causal", [False, True])
def test_packed_training_attention_is_each_groups_plain_attention_with_the_same_dropout(causal):
    # The packed row's training attention is one autograd node with its backward written out
    # (`_GroupedAttention`): its output and gradients must be those of autograd over the plain
    # attention of each group, dropout masks included (the same draws, in the same order).
    from peftlab.runtime import _plain_attention

    class Layer(torch.nn.Module):
        is_causal = causal

    lengths, groups = [7, 6, 3, 3, 1], [(2, 7), (3, 3)]
    _, (q, k, v), masks = _texts_in_groups(lengths, groups, kv_heads=2 if causal else 4)
    if causal:
        masks = [m & torch.ones(w, w, dtype=torch.bool).tril() for m, (_, w) in zip(masks, groups)]
    packed = [(t, w, m) for (t, w), m in zip(groups, masks)]
    grad_out = torch.randn(1, q.shape[2], 4, 8)

    def reference(q, k, v):
        k, v = (t.repeat_interleave(4 // t.shape[1], dim=1) for t in (k, v))
        outs, at = [], 0
        for texts, width, mask in packed:
            qg, kg, vg = (
                t[0, :, at : at + texts * width].unflatten(1, (texts, width)).transpose(0, 1) for t in (q, k, v)
            )
            out = _plain_attention(qg, kg, vg, mask, 0.3, 8**-0.5, fp32_softmax=causal)
            outs.append(out.transpose(1, 2).reshape(texts * width, 4, 8))
            at += texts * width
        return torch.cat([*outs, q.new_zeros(q.shape[2] - at, 4, 8)]).unsqueeze(0)

    results = []
    for run in (
        reference,
        lambda q, k, v: peftlab_attention(Layer().train(), q, k, v, None, 0.3, packed_groups=packed)[0],
    ):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(7)
        out = run(*inputs)
        out.backward(grad_out)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    undropped, _ = peftlab_attention(Layer().train(), q, k, v, None, 0.0, packed_groups=packed)
    assert (results[1][0] - undropped).abs().max() > 1e-2, "dropout really dropped something"


@pytest.mark.parametrize("causal", [False, True])
def test_packed_training_attention_on_large_bf16_blocks_stays_close_to_fp32(causal, monkeypatch):
    # Blocks too large for the fp32 detour run their matmuls in bf16 (a decoder's softmax in
    # fp32): output and gradients come back bf16, within bf16 rounding of the fp32 result.
    import peftlab.runtime as runtime

    class Layer(torch.nn.Module):
        is_causal = causal

    lengths, groups = [7, 6, 3, 3, 1], [(2, 7), (3, 3)]
    _, (q, k, v), masks = _texts_in_groups(lengths, groups)
    if causal:
        masks = [m & torch.ones(w, w, dtype=torch.bool).tril() for m, (_, w) in zip(masks, groups)]
    packed = [(t, w, m) for (t, w), m in zip(groups, masks)]
    results = []
    for dtype in (torch.float32, torch.bfloat16):  # fp32: small blocks, masks laid out in full
        if dtype == torch.bfloat16:
            monkeypatch.setattr(runtime, "SMALL_ATTENTION_CELLS", 0)  # every block "large"
            monkeypatch.setattr(runtime, "FULL_MASK_CELLS", 0)  # and its mask added broadcast
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, _ = peftlab_attention(Layer().train(), *inputs, None, 0.0, packed_groups=packed)
        out.float().sum().backward()
        assert out.dtype == dtype and all(t.grad.dtype == dtype for t in inputs)
        results.append([out.float(), *(t.grad.float() for t in inputs)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=5e-2, rtol=5e-2)


def test_small_bf16_attention_blocks_run_in_fp32_and_come_back_bf16():
    # Tiny blocks (a packed group of two short texts) are cheaper through fp32's kernels on a
    # CPU; the result must still be the block's attention, in the activations' dtype.
    class Layer(torch.nn.Module):
        is_causal = False

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = peftlab_attention(Layer().train(), q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, dropout=0.0)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), attn_mask=mask
    ).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=0)
