"""Where and how computation runs: the device (one resolver), the precision and autocast,
what the CPU can do natively, and the helpers for several processes (torchrun / accelerate
launch). Below models, data and the engines; imports only errors."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from pathlib import Path

import torch

from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")


def resolve_device(name: str = "auto") -> torch.device:
    """The device for `name` (auto: CUDA, then MPS, then CPU); PeftlabError if it is absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if not available[name]:
        raise PeftlabError(f"device={name} was asked for but this machine has no {name} device: use device=auto")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether bf16 matrix work runs natively here: the CPU has AVX-512 BF16 or AMX, and
    PyTorch's and oneDNN's kernels are not held to an older instruction set
    (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2), under which bf16 is emulated and
    some 300x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not isa.startswith(("ALL", "DEFAULT", "AVX512", "AVX10", "AMX")):
        return False
    return torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX512", "AMX"))


def cpu_description() -> str:
    """The CPU's model name and what decides its speed here: bf16 instructions and the
    kernels PyTorch runs (e.g. 'Intel Xeon ... (avx512_bf16, amx_bf16; kernels AVX512)')."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"{platform.processor() or platform.machine()} (no /proc/cpuinfo)"
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU"
    )
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags] or ["no native bf16"]
    return (
        f"{model} x{os.cpu_count()} ({', '.join(bf16)}; kernels {torch.backends.cpu.get_cpu_capability()}, "
        f"bf16 {'native' if cpu_supports_bf16() else 'emulated'})"
    )


def distributed_state():
    """accelerate's process state (one process, or N under torchrun / accelerate launch).

    CPU-only processes must say so (`cpu=True`), or accelerate ignores the launcher's
    WORLD_SIZE and each process runs alone.
    """
    from accelerate import PartialState

    return PartialState(cpu=resolve_device("auto").type == "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn 'auto' into fp32/bf16/fp16 for `device`, and log what was picked and why."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        picked = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        why = "CUDA device " + ("supports bf16" if picked == "bf16" else "lacks bf16")
    elif device.type == "cpu" and cpu_supports_bf16():
        picked, why = "bf16", "CPU has native bf16 instructions"
    else:
        picked, why = "fp32", f"no fast bf16 on {device.type}"
    log.info("precision: %s (auto: %s)", picked, why)
    return picked


def autocast(device: torch.device, precision: str):
    """Autocast context for 'bf16'/'fp16'; a no-op for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class LowPrecisionWeights:
    """bf16/fp16 copies of every frozen floating-point parameter, made once and swapped in
    while a block runs on a CPU (`swapped(model)`).

    Autocast would cast every weight again on every forward pass: the very same values, at
    a cost that dominates small batches (MiniLM, one text: about half the time; a training
    step: about an eighth). The embeddings, biases and norms go too: autocast keeps a
    LayerNorm in its input's dtype, so with them in bf16 the residual stream stays bf16 from
    the embeddings to the head, as in a model loaded in bf16, instead of being fp32 between
    matmuls and cast down again before each one (a fifth of an evaluation, a tenth of a
    training step, besides halving the memory traffic of every elementwise op). Trainable
    parameters (adapters, heads) stay fp32 under autocast. The fp32 frozen values stay the
    masters, so adapters can come and go (`forget()` after they do); not under DoRA, whose
    weight norm reads the base weights outside the matmuls. A serving process keeps one
    for its lifetime; a training run uses one for the run (`frozen_weights_cast`)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.copies: dict[int, torch.Tensor] = {}  # master storage pointer -> copy (shared bases: once)
        self.plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [(module, master, copy)]

    def forget(self) -> None:
        """Drop every copy (after adapters changed); they are made again on the next forward pass."""
        self.copies.clear()
        self.plans.clear()

    @contextlib.contextmanager
    def swapped(self, model):
        plan = self.plans.get(model)
        if plan is None:
            plan = self.plans[model] = self._plan(model)
        for param, _, copy_ in plan:
            param.data = copy_
        try:
            yield
        finally:
            for param, master, _ in plan:
                param.data = master

    def _plan(self, model) -> list:
        if any(getattr(m, "lora_magnitude_vector", None) for m in model.modules()):
            return []
        plan = []
        for param in model.parameters():  # each shared (tied) parameter once
            if param.dtype == torch.float32 and not param.requires_grad:
                master = param.data
                copy_ = self.copies.setdefault(master.data_ptr(), master.to(self.dtype))
                plan.append((param, master, copy_))
        return plan


@contextlib.contextmanager
def frozen_weights_cast(model: torch.nn.Module, device: torch.device, precision: str):
    """Hold the frozen parameters in bf16/fp16 while the block runs (CPU autocast):
    `LowPrecisionWeights` for one block. Not on GPUs, where the casts are cheap and memory
    is not."""
    if precision == "fp32" or device.type != "cpu":
        yield
        return
    with LowPrecisionWeights(torch.bfloat16 if precision == "bf16" else torch.float16).swapped(model):
        yield


def bernoulli_keep(shape, p: float, like: torch.Tensor) -> torch.Tensor:
    """A mask of `like`'s dtype and device: 1 with probability 1 - p (to 1/65536), else 0,
    drawn from torch's own generator.

    On a CPU `bernoulli_` draws one 32-bit number per element through a serial loop: ~6 ns
    each, which made dropout a fifth of a MiniLM training step (more than its matmuls). Here
    one 64-bit draw gives four 16-bit uniforms, compared straight into a mask of the
    activations' dtype: ~4x less time for the same distribution; seeds, checkpoints and
    exact resume still hold, the draws coming from torch's generator."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    uniform = words.view(torch.int16)[:n].view(shape)
    return torch.ge(uniform, round(p * 65536) - 32768, out=torch.empty(shape, dtype=like.dtype, device=like.device))


def dropout_scale(p: float) -> float:
    """1 / (1 - p) for the rate `bernoulli_keep`'s mask really has."""
    return 1.0 / (1.0 - round(p * 65536) / 65536)


def fast_dropout(x: torch.Tensor, p: float, scale: bool = True) -> torch.Tensor:
    """Training-mode dropout of `x` with `bernoulli_keep`'s mask; kept values are scaled by
    1 / (1 - p) unless `scale` is False (the caller scales something smaller instead)."""
    if p <= 0:
        return x
    if p >= 1:
        return x * 0
    out = x * bernoulli_keep(x.shape, p, x)
    return out.mul_(dropout_scale(p)) if scale else out


def _dropout_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.training and x.device.type == "cpu":
        return fast_dropout(x, self.p)
    return torch.nn.functional.dropout(x, self.p, self.training, self.inplace)


# Below this many score cells a bf16 attention block runs in fp32 on a CPU: oneDNN's bf16
# batched matmul costs ~30 us a call whatever its size, MKL's fp32 one ~7 us, and the per-text
# groups of a packed batch are small (two SMS texts: 24 x 40 x 40 cells). Measured on a Xeon
# with AMX: a packed MiniLM step 1.12x faster; padded batches' blocks are larger and unchanged.
SMALL_ATTENTION_CELLS = 2**18


def _plain_attention(query, key, value, mask, dropout: float, scaling: float, fp32_softmax: bool):
    """Attention as two matmuls and a softmax (`mask`: True where a query may look), with
    `fast_dropout` on the probabilities; the 1 / (1 - p) goes on the output, W/head_dim
    times smaller than the probabilities."""
    cells = query.shape[:-1].numel() * key.shape[-2]
    if query.dtype != torch.float32 and query.device.type == "cpu" and cells < SMALL_ATTENTION_CELLS:
        with torch.autocast("cpu", enabled=False):
            out = _plain_attention(query.float(), key.float(), value.float(), mask, dropout, scaling, fp32_softmax)
        return out.to(query.dtype)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32 if fp32_softmax else None).to(value.dtype)
    if dropout == 0:
        return torch.matmul(probs, value)
    return torch.matmul(fast_dropout(probs, dropout, scale=False), value).mul_(dropout_scale(dropout))


class PackedGroups(list):
    """A packed row's groups, [(texts, width, mask)] (mask: True where a query may look), as
    `peftlab.models.PackedForward` hands them to every attention layer of one forward pass;
    each mask's additive form is made once per dtype and head count and shared by all layers."""

    def __init__(self, groups=()):
        super().__init__(groups)
        self.additive: dict = {}


# Up to this many score cells a group's mask is laid out in full, [texts * heads, width,
# width], for `baddbmm` to add it with the scaled scores in one op; larger blocks (long
# texts: 16 x 12 x 512^2 cells would be 100 MB) add it broadcast, [texts, 1, 1 or width, width].
FULL_MASK_CELLS = 2**20


def _additive_mask(groups, i: int, dtype: torch.dtype, heads: int | None = None) -> torch.Tensor:
    """Group i's mask as 0 / dtype-min to add to its scores: laid out in full for `heads`
    heads, or (heads None) broadcastable."""
    cache = getattr(groups, "additive", None)
    if cache is not None and (i, dtype, heads) in cache:
        return cache[i, dtype, heads]
    texts, width, mask = groups[i]
    if heads is not None:
        mask = mask.expand(texts, heads, width, width).reshape(texts * heads, width, width)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    if cache is not None:
        cache[i, dtype, heads] = out
    return out


class _GroupedAttention(torch.autograd.Function):
    """Training attention over a packed row's groups (CPU), as one autograd node with its
    backward written out: per group, the scores as one `baddbmm` (scale and mask included),
    softmax, dropout, one `bmm`, and four matmuls back. Autograd over the same math recorded
    ~25 nodes per group and layer, with their views, transposes and copies: on 2 cores each op
    costs ~10-20 us in a real step whatever its size, and a MiniLM group's whole attention
    is ~1 MFLOP, so the op count was the cost (attention was ~30% of a packed SMS step).
    Same math and the same dropout draws as `_plain_attention` per group (tests); `dtype` is
    the dtype the group's matmuls run in (fp32 for small blocks, `SMALL_ATTENTION_CELLS`)."""

    @staticmethod
    def forward(ctx, query, key, value, groups, dropout: float, scaling: float, dtype, fp32_softmax: bool):
        with torch.autocast("cpu", enabled=False):
            heads, total, dim = query.shape[1:]
            rows = [t.squeeze(0).transpose(0, 1) for t in (query, key, value)]  # [tokens, heads, dim]
            out = torch.empty(total, heads, dim, dtype=query.dtype, device=query.device)
            # Dropout's 1 / (1 - p) rides on the copies between blocks and row (the output's here,
            # the incoming gradient's in the backward): no op of its own over the row.
            scale = dropout_scale(dropout) if dropout > 0 else None
            saved, at = [], 0
            for i, (texts, width, _) in enumerate(groups):
                span = slice(at, at + texts * width)
                q, k, v = (_group_block(r[span], texts, width, dtype) for r in rows)  # [texts*heads, width, dim]
                if texts * heads * width * width <= FULL_MASK_CELLS:
                    mask = _additive_mask(groups, i, dtype, heads)
                    scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scaling)
                else:
                    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling)
                    scores.view(texts, heads, width, width).add_(_additive_mask(groups, i, dtype))
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32 if fp32_softmax else None)
                keep = bernoulli_keep(probs.shape, dropout, probs) if dropout > 0 else None
                dropped = (probs if keep is None else probs * keep).to(dtype)
                _to_rows(out[span], torch.bmm(dropped, v), texts, width, scale)
                saved.append((q, k, v, probs, keep, dropped))
                at += texts * width
            if at < total:  # the row's tail padding: attended by nothing, read by nothing
                out[at:].zero_()
        # Six per group (keep None without dropout): saved the checked way, so an in-place change
        # to any of them before the backward raises instead of giving wrong gradients.
        ctx.save_for_backward(*(t for block in saved for t in block))
        ctx.groups, ctx.scaling, ctx.scale = groups, scaling, scale
        return out.unsqueeze(0)

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast("cpu", enabled=False):
            grad = grad.squeeze(0)  # [tokens, heads, dim]
            grads = [grad.new_empty(grad.shape) for _ in range(3)]
            at, saved = 0, ctx.saved_tensors
            blocks = [saved[i : i + 6] for i in range(0, len(saved), 6)]
            for (texts, width, _), (q, k, v, probs, keep, dropped) in zip(ctx.groups, blocks):
                span = slice(at, at + texts * width)
                g = _group_block(grad[span], texts, width, q.dtype, ctx.scale)  # the output's 1 / (1 - p)
                dv = torch.bmm(dropped.transpose(1, 2), g)
                dp = torch.bmm(g, v.transpose(1, 2)).to(probs.dtype)
                if keep is not None:
                    dp.mul_(keep)
                ds = torch._softmax_backward_data(dp, probs, -1, probs.dtype).to(q.dtype).mul_(ctx.scaling)
                for rows, block in zip(grads, (torch.bmm(ds, k), torch.bmm(ds.transpose(1, 2), q), dv)):
                    _to_rows(rows[span], block, texts, width)
                at += texts * width
            for rows in grads if at < len(grad) else ():
                rows[at:].zero_()
        return (*(g.transpose(0, 1).unsqueeze(0) for g in grads), None, None, None, None, None)


def _group_block(rows: torch.Tensor, texts: int, width: int, dtype: torch.dtype, scale=None) -> torch.Tensor:
    """[texts * width, heads, dim] token rows as a contiguous [texts * heads, width, dim]
    block of `dtype` (one copy: layout, cast and `scale` together)."""
    heads, dim = rows.shape[1:]
    source = rows.reshape(texts, width, heads, dim).transpose(1, 2)
    block = torch.empty(texts, heads, width, dim, dtype=dtype, device=rows.device)
    _copy_scaled(block, source, scale)
    return block.view(texts * heads, width, dim)


def _to_rows(rows: torch.Tensor, block: torch.Tensor, texts: int, width: int, scale=None) -> None:
    """Write a [texts * heads, width, dim] block back into [texts * width, heads, dim] rows
    (times `scale`)."""
    heads, dim = rows.shape[1:]
    _copy_scaled(rows.view(texts, width, heads, dim), block.view(texts, heads, width, dim).transpose(1, 2), scale)


def _copy_scaled(dest: torch.Tensor, source: torch.Tensor, scale=None) -> None:
    """dest = source (times `scale`), as one pass that also casts and lays out."""
    if scale is None:
        dest.copy_(source)
    else:
        torch.mul(source, scale, out=dest)


def _grouped_attention(module, query, key, value, groups, dropout: float, scaling):
    """Attention over a `PackCollator` row: each group of texts is a [texts, width] block of
    the row, attended as its own batch under its own mask (key padding, causal for
    decoders), so no token sees another text and none pays for a longer text's width. On a
    CPU in training, `_GroupedAttention` (fast dropout, one autograd node); else SDPA per
    group. A CPU training row whose blocks are all small runs them in fp32
    (`SMALL_ATTENTION_CELLS`); decoders take the softmax in fp32, as their own attention does.

    The row is split along its tokens in the projections' own [tokens, heads, dim] layout,
    so the gradients going back come out contiguous where the projections read them."""

    heads, dim = query.shape[1], query.shape[-1]
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves several
        key, value = (t.repeat_interleave(heads // key.shape[1], dim=1) for t in (key, value))
    scaling = dim**-0.5 if scaling is None else scaling
    causal = getattr(module, "is_causal", False)
    if module.training and query.device.type == "cpu":
        small = all(texts * heads * width * width < SMALL_ATTENTION_CELLS for texts, width, _ in groups)
        dtype = torch.float32 if small else query.dtype
        return _GroupedAttention.apply(query, key, value, groups, dropout, scaling, dtype, causal), None
    sizes = [texts * width for texts, width, _ in groups]
    tail = query.shape[2] - sum(sizes)
    # [tokens, heads, dim] per group; squeeze, not [0], whose backward zero-fills a copy
    rows = [t.squeeze(0).transpose(0, 1).split([*sizes, tail] if tail else sizes) for t in (query, key, value)]
    outs = []
    for i, (texts, width, mask) in enumerate(groups):
        qg, kg, vg = (r[i].unflatten(0, (texts, width)).transpose(1, 2) for r in rows)
        p = dropout if module.training else 0.0
        out = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=p, scale=scaling)
        outs.append(out.transpose(1, 2).reshape(texts * width, heads, dim))
    if tail:  # the row's tail padding: attended by nothing, read by nothing
        outs.append(rows[0][-1].new_zeros(tail, heads, dim))
    return torch.cat(outs).to(query.dtype).unsqueeze(0), None


def pooled_attention(query, key, value, mask, dropout: float, scaling: float, training: bool):
    """Attention of a few queries, one per text (its pooled token: `[texts, heads, 1, dim]`
    as `[1, heads, texts, dim]`), over a whole packed row's keys and values; `mask`
    [texts, row] is True on each text's own tokens. Training on a CPU: `_plain_attention`
    (fast dropout); else SDPA. Returns [1, texts, heads, dim]."""
    if training and query.device.type == "cpu":
        out = _plain_attention(query, key, value, mask, dropout, scaling, fp32_softmax=False)
    else:
        p = dropout if training else 0.0
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=p, scale=scaling
        )
    return out.transpose(1, 2)


# Arguments that do not change plain bidirectional self-attention (BERT passes these).
_PLAIN_ATTENTION_KWARGS = {
    "encoder_hidden_states",
    "output_attentions",
    "output_hidden_states",
    "position_ids",
    "use_cache",
}


MATH_ATTENTION_MAX_WIDTH = 1024  # rows wider than this keep SDPA's kernels without dropout (memory)


def peftlab_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, packed_groups=None, **kwargs
):
    """The attention function (transformers' AttentionInterface) peftlab runs its models with
    while it trains or packs them (`cpu_dropout`, `peftlab.models.PackedForward`).

    Packed rows (`packed_groups` from PackedForward): `_grouped_attention`. Otherwise, for
    training on a CPU: attention as matmuls and a softmax, with `fast_dropout` on the
    probabilities. SDPA would take its math path with the slow dropout (encoders), or,
    without dropout, its flash kernel, whose backward under a causal mask cost 21 ms a layer
    on smollm2's short rows: a quarter of the step. SDPA itself when evaluating, off a CPU,
    or for anything unusual."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unknown = any(v is not None and k not in _PLAIN_ATTENTION_KWARGS for k, v in kwargs.items())
    if packed_groups is not None:
        if unknown:
            raise PeftlabError(
                f"{type(module).__name__} passes attention options packing does not handle "
                f"({', '.join(sorted(k for k, v in kwargs.items() if v is not None and k not in _PLAIN_ATTENTION_KWARGS))}):"
                " use train.packing=never"
            )
        return _grouped_attention(module, query, key, value, packed_groups, dropout, scaling)
    if (
        unknown  # sliding windows, soft-capping, sinks...: SDPA's own handling
        or not module.training
        or query.device.type != "cpu"
        or (dropout == 0 and key.shape[-2] > MATH_ATTENTION_MAX_WIDTH)
        or query.shape[1] % key.shape[1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.shape[1] != query.shape[1]:  # grouped-query attention: each key/value head serves several
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    causal = getattr(module, "is_causal", False)
    if attention_mask is None and causal and query.shape[2] > 1:
        width = key.shape[2]
        attention_mask = torch.ones(query.shape[2], width, dtype=torch.bool, device=query.device).tril(
            width - query.shape[2]
        )
    # As each family's own eager attention does: decoders (Llama...) take the softmax in fp32,
    # BERT-style encoders in the scores' dtype.
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = _plain_attention(query, key, value, attention_mask, dropout, scaling, fp32_softmax=causal)
    return out.transpose(1, 2).contiguous(), None


PEFTLAB_ATTENTION = "peftlab"


def use_peftlab_attention(hf_model) -> str | None:
    """Run `hf_model` (a transformers model) with `peftlab_attention`; returns the
    implementation to put back afterwards, or None where the model cannot switch (it does
    not dispatch through transformers' attention interface, or runs something other than
    SDPA/eager, e.g. flash attention, which peftlab leaves alone)."""
    config = getattr(hf_model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == PEFTLAB_ATTENTION:
        return PEFTLAB_ATTENTION
    if current not in ("sdpa", "eager") or not getattr(hf_model, "_can_set_attn_implementation", lambda: False)():
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PEFTLAB_ATTENTION, peftlab_attention)
    AttentionMaskInterface.register(PEFTLAB_ATTENTION, sdpa_mask)  # the very masks SDPA gets
    hf_model.set_attn_implementation(PEFTLAB_ATTENTION)
    return current


def restore_attention(hf_model, previous: str | None) -> None:
    """Undo `use_peftlab_attention` (previous: what it returned)."""
    if previous not in (None, PEFTLAB_ATTENTION) and hf_model.config._attn_implementation == PEFTLAB_ATTENTION:
        hf_model.set_attn_implementation(previous)


@contextlib.contextmanager
def cpu_dropout(model: torch.nn.Module, device: torch.device):
    """Dropout through `fast_dropout` while the block trains `model` on a CPU: every
    nn.Dropout (the model's and the adapters', e.g. LoRA's) and, where the model runs SDPA,
    the attention probabilities' (`peftlab_attention`). The same rates and distribution; a
    MiniLM + LoRA step spends a fifth of its time in dropout's random numbers otherwise. Not
    on GPUs, whose dropout is fused and cheap."""
    if device.type != "cpu":
        yield
        return
    dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    for m in dropouts:
        m.forward = _dropout_forward.__get__(m)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = use_peftlab_attention(hf) if getattr(hf.config, "_attn_implementation", None) == "sdpa" else None
    try:
        yield
    finally:
        for m in dropouts:
            del m.forward
        restore_attention(hf, previous)


def gather_objects(obj) -> list:
    """`obj` from every process, in rank order ([obj] when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
