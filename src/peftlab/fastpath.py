"""Leaner forward passes for a frozen base model on a CPU (`lean_layers`), where a MiniLM +
LoRA step spends more time around its matmuls than in them: a step on 16 texts of 6
tokens costs 40 ms, a third of one on real SMS batches. Two changes, each with the same
math as the code it replaces:

- vanilla LoRA layers skip peft's per-call bookkeeping and its cast of the input to the
  adapter's fp32 and back (autocast casts it to bf16 for the matmul anyway), and put
  dropout's 1 / (1 - p) on the rank-r output's scaling rather than on the input;
- each self-attention's frozen q, k and v projections run as one matmul over the three
  weights side by side (one weight reorder and one kernel call instead of three, in the
  forward pass and in its gradient).

Measured on a Xeon with AMX (bf16), MiniLM + LoRA, packed SMS steps interleaved in one
process: the LoRA layers 1.06x, the fused projections 1.03x on top (bench/README.md, "Leaner
layers"). Below the engines; imports models and runtime."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from peftlab.models import QKV_NAMES
from peftlab.runtime import dropout_scale, fast_dropout


def _lora_linear_class():
    from peft.tuners.lora import Linear

    return Linear


def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's `lora.Linear.forward` for one active vanilla adapter, unmerged; anything else
    (mixed-adapter batches, DoRA and other variants, merged or disabled adapters) goes to
    peft's own forward."""
    adapters = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(adapters) != 1
        or adapters[0] not in self.lora_A
        or adapters[0] in self.lora_variant
    ):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    result = self.base_layer(x)
    lora_A, lora_B, dropout, scaling = self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.scaling[name]
    if not torch.is_autocast_enabled(x.device.type):
        x = self._cast_input_dtype(x, lora_A.weight.dtype)  # as peft; under autocast the matmul casts
    if self.training and type(dropout) is torch.nn.Dropout and 0 < dropout.p < 1:
        x = fast_dropout(x, dropout.p, scale=False)
        scaling = scaling * dropout_scale(dropout.p)  # r values a token to scale, not hidden-size ones
    elif self.training:
        x = dropout(x)
    return (result + lora_B(lora_A(x)) * scaling).to(result.dtype)


class FusedProjections:
    """One attention module's q, k and v projections (frozen nn.Linear layers reading the
    same input) as one matmul: a projection's call on an input with nothing kept for it
    computes itself and the projections after it (all three from q's call; k and v from
    k's) and keeps the later outputs for their calls on that same input tensor. A model that
    does not follow the pattern is only slower, never wrong. The weights side by side are
    made on first use and again whenever a projection's weight tensor changes
    (`frozen_weights_cast` swapping in bf16 copies)."""

    def __init__(self, linears: list[torch.nn.Linear], wrappers: list | None = None):
        self.linears = linears
        self.wrappers = wrappers or []  # LoRA layers around them: merging edits the weights in place
        self.sizes = [m.out_features for m in linears]
        self.joined = None  # (the weights' data pointers, joined weight, joined bias)
        self.pending = None  # (input, {index: output still to hand out}, (grad mode, input version))

    @staticmethod
    def fusable(linears) -> bool:
        """Plain frozen nn.Linear layers with one input width, dtype and device, all with a
        bias or none."""
        if not all(type(m) is torch.nn.Linear for m in linears):
            return False
        params = [p for m in linears for p in (m.weight, m.bias) if p is not None]
        first = linears[0].weight
        return (
            not any(p.requires_grad for p in params)
            and len({m.in_features for m in linears}) == 1
            and all(p.dtype == first.dtype and p.device == first.device for p in params)
            and len({m.bias is None for m in linears}) == 1
        )

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = tuple(m.weight.data_ptr() for m in self.linears)
        if self.joined is None or self.joined[0] != key:
            weight = torch.cat([m.weight.detach() for m in self.linears])
            bias = None if self.linears[0].bias is None else torch.cat([m.bias.detach() for m in self.linears])
            self.joined = (key, weight, bias)
        return self.joined[1], self.joined[2]

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        pending = self.pending
        if (
            pending is not None
            and pending[0] is x
            and index in pending[1]
            and pending[2] == _state(x)  # same grad mode, x not changed in place since
        ):
            out = pending[1].pop(index)
            if not pending[1]:
                self.pending = None
            return out
        merged = any(w.merged for w in self.wrappers)
        if merged:  # a weight changed in place under the joined copy: make it again after
            self.joined = None
        if index == len(self.linears) - 1 or merged:  # the last one (or weights in flux): alone
            m = self.linears[index]
            return F.linear(x, m.weight, m.bias)
        # This projection and the ones after it, on this input, as one matmul: q, k and v on
        # a layer's input, or k and v alone where the queries read other tokens (the pooled
        # last layer of `peftlab.models.PackedForward`: its keys and values read the whole row).
        weight, bias = self._weights()
        start = sum(self.sizes[:index])
        outs = F.linear(x, weight[start:], None if bias is None else bias[start:]).split(self.sizes[index:], dim=-1)
        self.pending = (x, dict(zip(range(index + 1, len(self.linears)), outs[1:])), _state(x))
        return outs[0]


def _state(x: torch.Tensor) -> tuple:
    """The grad mode and `x`'s version counter (bumped by in-place changes; inference tensors
    have none, and are not changed in place by the supported models)."""
    return torch.is_grad_enabled(), None if x.is_inference() else x._version


def _projection_base(module):
    """The nn.Linear a projection computes with: itself, or a LoRA layer's base layer."""
    lora = _lora_linear_class()
    return module.base_layer if type(module) is lora else module


def fuse_projections(model: torch.nn.Module) -> list[FusedProjections]:
    """Fuse every self-attention's frozen q/k/v projections in `model` (`FusedProjections`);
    `unfuse` puts them back. Projections wrapped by adapters other than LoRA (IA3, OFT...)
    or that train (full fine-tuning, BitFit) stay as they are."""
    fused = []
    for module in model.modules():
        for names in QKV_NAMES:
            members = [getattr(module, n, None) for n in names]
            if any(m is None for m in members):
                continue
            linears = [_projection_base(m) for m in members]
            # a nested block (validation inside training) leaves the outer block's fusion be
            if FusedProjections.fusable(linears) and not any("forward" in vars(m) for m in linears):
                group = FusedProjections(linears, [m for m in members if m not in linears])
                for i, m in enumerate(linears):
                    m.forward = functools.partial(group.forward, i)
                fused.append(group)
    return fused


def unfuse(fused: list[FusedProjections]) -> None:
    for group in fused:
        group.pending = group.joined = None
        for m in group.linears:
            del m.forward


@contextlib.contextmanager
def lean_layers(model: torch.nn.Module, device: torch.device):
    """While the block runs `model` on a CPU: vanilla LoRA layers through
    `_lean_lora_forward` and q/k/v projections fused (`fuse_projections`). Not on GPUs,
    where this was not measured, nor for compiled models (their graphs would capture the
    fused projections' Python state)."""
    if device.type != "cpu":
        yield
        return
    lora = _lora_linear_class()
    layers = [m for m in model.modules() if type(m) is lora and "forward" not in vars(m)]
    for m in layers:
        m.forward = _lean_lora_forward.__get__(m)
    fused = fuse_projections(model)
    try:
        yield
    finally:
        unfuse(fused)
        for m in layers:
            del m.forward
