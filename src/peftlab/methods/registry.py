"""Every fine-tuning method, one `MethodSpec` each: what it is, the rates it trains at, how
its peft config is built, what its artifact holds. Adding a method is one entry in `METHODS`.

This module sits below `peftlab.config` (which reads names and default rates from it), so it
imports nothing from peftlab and nothing heavy: peft and torch are imported inside the
functions that need them. Functions here report a problem by returning its message;
`peftlab.methods.build` raises it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Any

# What a method changes: peft's adapter families, prompt learning, or the model's own weights.
FAMILIES = ("lora", "adalora", "scaling", "hadamard/kronecker", "vera", "orthogonal", "prompt", "native")
# What an adapter folder holds: peft's adapter files, a complete model, or head.safetensors
# (the weights a native method trained over the frozen base).
ARTIFACTS = ("peft", "full", "head")
# Which modules a peft adapter wraps: the attention projections (or the user's
# target_modules), IA3's (targets, feedforward) pair, or none (prompt methods).
WRAPS = ("attention", "ia3", None)

# (config, resolved targets, {task_type, modules_to_save}) -> a peft config object.
PeftConfigBuilder = Callable[[Any, Any, dict], Any]


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One fine-tuning method."""

    name: str  # what method.name= says
    family: str  # one of FAMILIES
    about: str  # what it trains, in one line (see `description`)
    # Peak learning rate that works for the method, chosen on MiniLM + sms_spam (1,500 training
    # messages, one epoch; bench/methods.py, bench/README.md): the rate at which it got off the
    # all-ham plateau and trained to its best accuracy. Fewer, scaling-style weights need larger steps.
    lr: float
    # The classification head's own rate; None: the method's. Methods that change the features
    # only a little rely on the head, which starts from random weights: at their own rate they
    # stayed at all-ham on the subset above.
    head_lr: float | None = None
    peft_config: PeftConfigBuilder | None = None  # None: a native method (no peft wrapper)
    wraps: str | None = "attention"  # one of WRAPS (None: prompt and native methods)
    # Native methods: whether parameter `name` trains, given the head's module names.
    trains: Callable[[str, Collection[str]], bool] | None = None
    mergeable: bool = True  # can fold into the base weights (export --merge)
    artifact: str = "peft"  # one of ARTIFACTS
    needs_cuda: bool = False  # trains only on a CUDA GPU (bitsandbytes)
    quantization: str = "none"  # the base loads so (qlora: 4bit) unless model.quantization says otherwise
    # Why the method cannot be built on (model, head names) here, as "problem: fix"; None: it can.
    check: Callable[[Any, Collection[str]], str | None] | None = None
    # Hands its learned prefixes to the model as past_key_values, which the base model must
    # accept (methods.prompt.accept_past_key_values), before training and before loading.
    past_key_values: bool = False
    # The MethodConfig field whose value multiplies the LoRA B matrices' rate (LoRA+); None: lr.
    b_lr_ratio_field: str | None = None

    def __post_init__(self):
        if self.family not in FAMILIES or self.artifact not in ARTIFACTS or self.wraps not in WRAPS:
            raise ValueError(
                f"method {self.name!r}: family, artifact and wraps must be one of {FAMILIES}, {ARTIFACTS}, {WRAPS}"
            )
        peft = self.artifact == "peft"
        wraps_ok = (self.wraps is not None or self.family == "prompt") if peft else self.wraps is None
        if (self.peft_config is not None) != peft or (self.trains is None) != peft or not wraps_ok:
            raise ValueError(
                f"method {self.name!r}: a peft method has peft_config, artifact='peft' and wraps "
                f"(None for prompt methods); a native method has trains, artifact 'full' or "
                f"'head', and wraps=None"
            )

    @property
    def description(self) -> str:
        """One line for `peftlab methods` and the model card: `about`, and what it needs to run."""
        return self.about + (" (needs CUDA + bitsandbytes)" if self.needs_cuda else "")


def is_quantized(model) -> bool:
    """Whether `model`'s base weights are bitsandbytes-quantized."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _lora(cfg, targets, common, **options):
    import peft

    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, **options, **common
    )


def _loftq(cfg, targets, common):
    import peft

    return _lora(cfg, targets, common, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4))


def _adalora(cfg, targets, common):
    import peft

    # total_step is a placeholder: the training loop sets the real count (prepare_step_hook).
    return peft.AdaLoraConfig(
        init_r=cfg.adalora_init_r,
        target_r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        total_step=100,
        tinit=10,
        tfinal=20,
        deltaT=1,
        **common,
    )


def _ia3(cfg, targets, common):
    import peft

    target_modules, feedforward = targets
    return peft.IA3Config(target_modules=target_modules, feedforward_modules=feedforward, **common)


def _loha(cfg, targets, common):
    import peft

    return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=targets, **common)


def _lokr(cfg, targets, common):
    import peft

    return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=targets, **common)


def _vera(cfg, targets, common):
    import peft

    return peft.VeraConfig(
        r=cfg.vera_r, vera_dropout=cfg.dropout, target_modules=targets, save_projection=True, **common
    )


def _boft(cfg, targets, common):
    import peft

    # r blocks per weight (their size follows from the layer width), as for OFT.
    return peft.BOFTConfig(
        boft_block_num=cfg.r, boft_block_size=0, boft_dropout=cfg.dropout, target_modules=targets, **common
    )


def _oft(cfg, targets, common):
    import peft

    return peft.OFTConfig(r=cfg.r, oft_block_size=0, module_dropout=cfg.dropout, target_modules=targets, **common)


def _prompt_tuning(cfg, targets, common):
    import peft

    return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)


def _prefix_tuning(cfg, targets, common):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)


def _p_tuning(cfg, targets, common):
    import peft

    # LSTM by default (MethodConfig.prompt_encoder): on the tests' task the MLP encoder
    # collapsed for some seeds (after its first Adam steps the virtual tokens swamped
    # attention and [CLS] stopped depending on the text); the LSTM did not.
    return peft.PromptEncoderConfig(
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_hidden_size=cfg.encoder_hidden_size,
        encoder_reparameterization_type=cfg.prompt_encoder.upper(),
        **common,
    )


def _quantized_base(name: str, model, heads) -> str | None:
    if is_quantized(model):
        return (
            f"{name} initialises from the base weights and cannot start from quantized ones here: "
            f"use model.quantization=none"
        )
    return None


def _no_cuda_bitsandbytes(model, heads) -> str | None:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        return (
            "loftq initialises LoRA against bitsandbytes' 4-bit quantization of the weights, which needs "
            "a CUDA GPU and the bitsandbytes package: run it there, or use method=pissa/olora on this machine"
        )
    return None


def _no_biases(model, heads) -> str | None:
    if not any(n.endswith(".bias") for n, _ in model.named_parameters() if n.split(".")[0] not in heads):
        return (
            f"{type(model).__name__} has no bias parameters, so bitfit would only train "
            f"the head: use method=head (or another method)"
        )
    return None


def _in_head(name: str, heads: Collection[str]) -> bool:
    return name.split(".")[0] in heads


def _every_weight(name: str, heads: Collection[str]) -> bool:
    return True


def _head_or_bias(name: str, heads: Collection[str]) -> bool:
    return _in_head(name, heads) or name.endswith(".bias")


_PROMPT = {"family": "prompt", "lr": 3e-2, "wraps": None, "mergeable": False}

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="lora",
            family="lora",
            lr=1e-3,
            peft_config=_lora,
            about="low-rank update B·A of the attention projections",
        ),
        MethodSpec(
            name="dora",
            family="lora",
            lr=1e-3,
            peft_config=partial(_lora, use_dora=True),
            about="LoRA with the weight split into magnitude and direction (use_dora)",
        ),
        MethodSpec(
            name="rslora",
            family="lora",
            lr=1e-3,
            peft_config=partial(_lora, use_rslora=True),
            about="LoRA scaled by alpha/sqrt(r) (use_rslora), stable at high ranks",
        ),
        MethodSpec(
            name="pissa",
            family="lora",
            lr=1e-3,
            peft_config=partial(_lora, init_lora_weights="pissa"),
            check=partial(_quantized_base, "pissa"),
            about="LoRA initialised from the weights' principal singular vectors",
        ),
        MethodSpec(
            name="olora",
            family="lora",
            lr=1e-3,
            peft_config=partial(_lora, init_lora_weights="olora"),
            check=partial(_quantized_base, "olora"),
            about="LoRA initialised from a QR decomposition of the weights",
        ),
        MethodSpec(
            name="loftq",
            family="lora",
            lr=1e-3,
            peft_config=_loftq,
            needs_cuda=True,
            check=_no_cuda_bitsandbytes,
            about="LoRA initialised to offset 4-bit quantization error",
        ),
        # The LoRA+ paper halves the LoRA rate: B trains at lora_plus_ratio (16) x this.
        MethodSpec(
            name="lora_plus",
            family="lora",
            lr=5e-4,
            peft_config=_lora,
            b_lr_ratio_field="lora_plus_ratio",
            about="LoRA with the B matrices trained at lr x lora_plus_ratio",
        ),
        MethodSpec(
            name="qlora",
            family="lora",
            lr=1e-3,
            peft_config=_lora,
            needs_cuda=True,
            quantization="4bit",
            about="LoRA on 4-bit quantized base weights",
        ),
        MethodSpec(
            name="adalora",
            family="adalora",
            lr=2e-2,
            peft_config=_adalora,
            about="LoRA whose rank budget is reallocated between modules while training",
        ),
        MethodSpec(
            name="ia3",
            family="scaling",
            lr=1e-2,
            peft_config=_ia3,
            wraps="ia3",
            about="learned rescaling of keys, values and feedforward activations",
        ),
        MethodSpec(
            name="loha",
            family="hadamard/kronecker",
            lr=5e-3,
            peft_config=_loha,
            about="low-rank Hadamard product update",
        ),
        MethodSpec(
            name="lokr",
            family="hadamard/kronecker",
            lr=1e-2,
            peft_config=_lokr,
            about="low-rank Kronecker product update",
        ),
        MethodSpec(
            name="vera",
            family="vera",
            lr=3e-2,
            peft_config=_vera,
            about="shared frozen random projections with trained scaling vectors",
        ),
        MethodSpec(
            name="boft",
            family="orthogonal",
            lr=1e-3,
            peft_config=_boft,
            about="butterfly-factorised orthogonal rotation of the weights",
        ),
        MethodSpec(
            name="oft",
            family="orthogonal",
            lr=1e-3,
            peft_config=_oft,
            about="block-diagonal orthogonal rotation of the weights",
        ),
        MethodSpec(
            name="prompt_tuning",
            **_PROMPT,
            head_lr=1e-1,
            peft_config=_prompt_tuning,
            about="learned virtual-token embeddings prepended to the input",
        ),
        MethodSpec(
            name="prefix_tuning",
            **_PROMPT,
            peft_config=_prefix_tuning,
            past_key_values=True,
            about="learned key/value prefixes in every attention layer",
        ),
        MethodSpec(
            name="p_tuning",
            **_PROMPT,
            head_lr=1e-1,
            peft_config=_p_tuning,
            about="virtual tokens produced by a small prompt-encoder MLP",
        ),
        MethodSpec(
            name="full",
            family="native",
            lr=5e-5,
            trains=_every_weight,
            artifact="full",
            wraps=None,
            about="every weight",
        ),
        # A linear probe: only 770 weights (MiniLM), all starting from random.
        MethodSpec(
            name="head",
            family="native",
            lr=1e-1,
            trains=_in_head,
            artifact="head",
            wraps=None,
            about="only the classification head (a linear probe)",
        ),
        MethodSpec(
            name="bitfit",
            family="native",
            lr=1e-3,
            head_lr=1e-1,
            trains=_head_or_bias,
            artifact="head",
            wraps=None,
            check=_no_biases,
            about="only the biases (and the head)",
        ),
    )
}
