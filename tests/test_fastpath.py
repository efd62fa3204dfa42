"""fastpath: leaner forward passes that must compute what peft and the model compute."""

import pytest
import torch

from peftlab.config import MethodConfig, ModelConfig
from peftlab.data import PadCollator
from peftlab.fastpath import FusedProjections, fuse_projections, lean_layers, unfuse
from peftlab.methods import apply_method
from peftlab.models import load_model
from peftlab.runtime import cpu_dropout, frozen_weights_cast

CPU = torch.device("cpu")


def _model(path, **method):
    torch.manual_seed(0)
    model, tok, _ = load_model(ModelConfig(name=path), 2)
    model = apply_method(model, MethodConfig(**method))
    batch = PadCollator(tok.pad_token_id, tok.padding_side)(
        [{"input_ids": [5, 9, 14, 3, 7], "labels": 1}, {"input_ids": [11, 4, 6], "labels": 0}]
    )
    return model, batch


def _step(model, batch, seed=3):
    """Logits and the trainable parameters' gradients of one training forward/backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def _patched(model) -> list:
    return [n for n, m in model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_lean_layers_train_as_peft_and_the_model_do(kind, pretrained_encoder, pretrained_decoder):
    """Same dropout masks (same draws, same order), same logits and gradients (fp32)."""
    model, batch = _model(pretrained_encoder if kind == "encoder" else pretrained_decoder, dropout=0.2)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, and the adapters' dropout would change nothing
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    with cpu_dropout(model, CPU):
        expected = _step(model, batch)
        with lean_layers(model, CPU):
            patched = _patched(model)
            assert any(n.endswith(("query", "q_proj")) for n in patched), "LoRA layers take the lean forward"
            assert any(n.endswith(("key.base_layer", "k_proj")) or n.endswith("key") for n in patched)
            got = _step(model, batch)
            again = _step(model, batch, seed=4)
        dropouts = [n for n, m in model.named_modules() if type(m) is torch.nn.Dropout and m.p > 0]
        assert _patched(model) == dropouts, "only cpu_dropout's patches are left"
    assert not _patched(model)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(again[0], got[0]), "another seed, other masks: dropout is still on"


def test_fused_projections_serve_q_k_and_v_from_one_matmul(pretrained_decoder):
    model, batch = _model(pretrained_decoder, dropout=0.0)
    model.eval()
    with torch.inference_mode():  # as evaluation runs it: inference tensors keep no versions
        expected = model(**batch).logits
        fused = fuse_projections(model)
        assert len(fused) == model.config.num_hidden_layers
        assert fused[0].sizes == [32, 16, 16], "grouped-query attention: narrower k and v"
        got = model(**batch).logits
        assert all(g.joined is not None and g.pending is None for g in fused), "all three handed out"
        unfuse(fused)
    assert not _patched(model)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_projection_called_first_on_an_input_computes_itself_and_the_later_ones():
    # The pooled last layer (PackedForward) asks for q on the pooled tokens and k, v on the
    # whole row: k's call computes k and v as one matmul, and v's call on that row takes it.
    torch.manual_seed(0)
    linears = [torch.nn.Linear(8, n).requires_grad_(False) for n in (8, 4, 4)]
    group = FusedProjections(linears)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(group.forward(1, y), linears[1](y))
    assert set(group.pending[1]) == {2}, "v kept for its call on the same input, q not computed"
    torch.testing.assert_close(group.forward(2, y), linears[2](y))
    assert group.pending is None
    outs = [group.forward(i, x) for i in range(3)]
    for out, m in zip(outs, linears):
        torch.testing.assert_close(out, m(x))
    assert group.pending is None
    torch.testing.assert_close(group.forward(2, y), linears[2](y))  # the last one alone
    assert group.pending is None
    group.forward(0, x)
    torch.testing.assert_close(group.forward(2, y), linears[2](y))  # another input: not the kept output
    x.mul_(2)  # changed in place after the first projection read it
    torch.testing.assert_close(group.forward(1, x), linears[1](x))


def test_projections_that_train_or_carry_other_adapters_are_not_fused(pretrained_encoder):
    for method in ("full", "ia3"):
        model, _ = _model(pretrained_encoder, name=method)
        fused = fuse_projections(model)
        assert not fused, method
    trainable = [torch.nn.Linear(4, 4) for _ in range(3)]
    assert not FusedProjections.fusable(trainable)
    mixed = [torch.nn.Linear(4, 4, bias=b).requires_grad_(False) for b in (True, True, False)]
    assert not FusedProjections.fusable(mixed)


def test_fused_weights_follow_the_bf16_copies_and_nested_blocks_keep_the_outer_one(pretrained_encoder):
    model, batch = _model(pretrained_encoder, dropout=0.0)
    model.eval()
    batch.pop("labels")
    with torch.no_grad(), lean_layers(model, CPU):
        outer = _patched(model)
        key = model.get_base_model().bert.encoder.layer[0].attention.self.key
        group = getattr(key, "base_layer", key).forward.func.__self__
        model(**batch)
        assert group.joined[1].dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16), frozen_weights_cast(model, CPU, "bf16"):
            model(**batch)
            assert group.joined[1].dtype == torch.bfloat16, "made again from the swapped-in copies"
        with lean_layers(model, CPU):  # validation inside a training run
            assert _patched(model) == outer
        assert _patched(model) == outer, "the inner block left the outer one's patches in place"
    assert not _patched(model)
    with lean_layers(model, torch.device("meta")):  # not a CPU: nothing changes
        assert not _patched(model)


def test_lean_lora_leaves_merged_and_dora_adapters_to_peft(pretrained_encoder):
    model, batch = _model(pretrained_encoder, name="dora", dropout=0.0)
    model.eval()
    batch.pop("labels")
    with torch.no_grad():
        expected = model(**batch).logits
        with lean_layers(model, CPU):
            torch.testing.assert_close(model(**batch).logits, expected, atol=1e-5, rtol=1e-5)
            model.merge_adapter()
            torch.testing.assert_close(model(**batch).logits, expected, atol=1e-4, rtol=1e-4)
            model.unmerge_adapter()


def test_lean_layers_on_packed_rows_take_the_pooled_last_layers_keys_and_values_in_one_matmul(
    pretrained_encoder, monkeypatch
):
    # PackedForward's pooled last layer computes q on the pooled tokens and k, v on the whole
    # row: under lean_layers k's call computes k and v together, and the step must still
    # be the one without lean layers (fp32, same dropout draws).
    from peftlab.data import PackCollator
    from peftlab.models import PackedForward

    model, _ = _model(pretrained_encoder, dropout=0.2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    examples = [{"input_ids": ids, "labels": i % 2} for i, ids in enumerate([[5, 9, 14, 3, 7], [11, 4, 6], [8, 2]])]
    model.train()
    with PackedForward(model) as packing, cpu_dropout(model, CPU):
        assert packing.last is not None
        batch = PackCollator(0)(examples)
        expected = _step(model, batch)
        joined = []  # one entry per matmul over the weights side by side
        weights = FusedProjections._weights
        monkeypatch.setattr(FusedProjections, "_weights", lambda self: joined.append(self) or weights(self))
        with lean_layers(model, CPU):
            got = _step(model, batch)
    # one q/k/v matmul per layer, and one more for the last layer's k and v on the whole row
    layers = model.config.num_hidden_layers
    assert len(joined) == layers + 1 and joined[-1] is joined[-2], len(joined)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
