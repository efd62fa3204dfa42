"""Fine-tuning methods: which weights train, and how PEFT wraps the model.

Every peft method (LoRA and its variants, AdaLoRA, IA3, LoHa, LoKr, VeRA, BOFT/OFT and the
prompt-learning methods) gets the classification head in `modules_to_save`, so the head is
trained and saved with the adapter (a reloaded adapter with a random head is the most
common way PEFT classifiers silently break). `full` trains every weight, `bitfit` the
biases and the head, `head` only the head: the linear-probe baseline.
"""

from __future__ import annotations

import logging

import torch

from peftlab.config import LORA_METHODS, METHODS, PEFT_METHODS, PROMPT_METHODS, MethodConfig
from peftlab.errors import PeftlabError
from peftlab.models import head_module_names

log = logging.getLogger("peftlab")

# Attention projections per architecture (the LoRA paper's choice, widened to q/k/v(/o)).
ATTENTION_TARGETS = {
    "bert": ["query", "key", "value"],
    "roberta": ["query", "key", "value"],
    "xlm-roberta": ["query", "key", "value"],
    "electra": ["query", "key", "value"],
    "distilbert": ["q_lin", "k_lin", "v_lin"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "gpt2": ["c_attn"],
}

# IA3 rescales keys, values and the feedforward output (the IA3 paper); peft's own table
# lacks DistilBERT. Each entry: (target modules, the feedforward ones among them).
IA3_TARGETS = {
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}

# What `peftlab methods` and the docs say about each method, in one line.
DESCRIPTIONS = {
    "lora": "low-rank update B·A of the attention projections",
    "dora": "LoRA with the weight split into magnitude and direction (use_dora)",
    "rslora": "LoRA scaled by alpha/sqrt(r) (use_rslora), stable at high ranks",
    "pissa": "LoRA initialised from the weights' principal singular vectors",
    "olora": "LoRA initialised from a QR decomposition of the weights",
    "loftq": "LoRA initialised to offset 4-bit quantization error (needs CUDA + bitsandbytes)",
    "lora_plus": "LoRA with the B matrices trained at lr x lora_plus_ratio",
    "qlora": "LoRA on 4-bit quantized base weights (needs CUDA + bitsandbytes)",
    "adalora": "LoRA whose rank budget is reallocated between modules while training",
    "ia3": "learned rescaling of keys, values and feedforward activations",
    "loha": "low-rank Hadamard product update",
    "lokr": "low-rank Kronecker product update",
    "vera": "shared frozen random projections with trained scaling vectors",
    "boft": "butterfly-factorised orthogonal rotation of the weights",
    "oft": "block-diagonal orthogonal rotation of the weights",
    "prompt_tuning": "learned virtual-token embeddings prepended to the input",
    "prefix_tuning": "learned key/value prefixes in every attention layer",
    "p_tuning": "virtual tokens produced by a small prompt-encoder MLP",
    "bitfit": "only the biases (and the head)",
    "head": "only the classification head (a linear probe)",
    "full": "every weight",
}
assert set(DESCRIPTIONS) == set(METHODS)


def target_modules(model, cfg: MethodConfig) -> list[str] | str:
    """The modules an adapter wraps: the user's list, `all-linear`, or the architecture's attention."""
    if cfg.target_modules:
        if cfg.target_modules == ["all-linear"]:
            return "all-linear"
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t.rsplit(".", 1)[-1] not in names]
        if missing:
            raise PeftlabError(
                f"target modules {missing} not found in {type(model).__name__}: "
                f"choose from e.g. {sorted(names)[:12]} or 'all-linear'"
            )
        return list(cfg.target_modules)
    model_type = model.config.model_type
    if model_type in ATTENTION_TARGETS:
        return ATTENTION_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

    if model_type in known:
        return list(known[model_type])
    log.warning("no default adapter targets for model type %r: using all-linear", model_type)
    return "all-linear"


def _ia3_targets(model, cfg: MethodConfig) -> tuple[list[str] | str | None, list[str] | str | None]:
    """IA3 targets and feedforward modules (feedforward ones scale their input, not output)."""
    if cfg.target_modules:
        targets = target_modules(model, cfg)
        if targets == "all-linear":
            return "all-linear", []
        # Without a feedforward list IA3 would treat every target as attention, which works.
        return targets, []
    model_type = model.config.model_type
    if model_type in IA3_TARGETS:
        return IA3_TARGETS[model_type]
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as known

    if model_type not in known:
        raise PeftlabError(f"ia3 has no default target modules for model type {model_type!r}: "
                           f"give them, e.g. target_modules=[k_proj,v_proj]")
    return None, None  # peft's own table for this architecture


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def peft_config(model, cfg: MethodConfig, heads: list[str]):
    """The peft config object for a peft method on `model` (not yet applied)."""
    import peft

    common = {"task_type": peft.TaskType.SEQ_CLS, "modules_to_save": list(heads)}
    name = cfg.name
    if name in LORA_METHODS:
        init = {"pissa": "pissa", "olora": "olora", "loftq": "loftq"}.get(name, True)
        extra = {}
        if name == "loftq":
            _check_loftq()
            extra["loftq_config"] = peft.LoftQConfig(loftq_bits=4)
        if name in ("pissa", "olora") and is_quantized(model):
            raise PeftlabError(f"{name} initialises from the base weights and cannot start from quantized "
                               f"ones here: use model.quantization=none")
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=target_modules(model, cfg), use_dora=name == "dora",
                               use_rslora=name == "rslora", init_lora_weights=init, **extra, **common)
    if name == "adalora":
        # total_step is a placeholder: the training loop sets the real count (prepare_step_hook).
        return peft.AdaLoraConfig(init_r=cfg.adalora_init_r, target_r=cfg.r, lora_alpha=cfg.alpha,
                                  lora_dropout=cfg.dropout, target_modules=target_modules(model, cfg),
                                  total_step=100, tinit=10, tfinal=20, deltaT=1, **common)
    if name == "ia3":
        targets, feedforward = _ia3_targets(model, cfg)
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    if name == "loha":
        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout,
                               target_modules=target_modules(model, cfg), **common)
    if name == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, module_dropout=cfg.dropout,
                               target_modules=target_modules(model, cfg), **common)
    if name == "vera":
        return peft.VeraConfig(r=cfg.vera_r, vera_dropout=cfg.dropout, target_modules=target_modules(model, cfg),
                               save_projection=True, **common)
    if name == "boft":
        # r blocks per weight (their size follows from the layer width), as for OFT.
        return peft.BOFTConfig(boft_block_num=cfg.r, boft_block_size=0, boft_dropout=cfg.dropout,
                               target_modules=target_modules(model, cfg), **common)
    if name == "oft":
        return peft.OFTConfig(r=cfg.r, oft_block_size=0, module_dropout=cfg.dropout, target_modules=target_modules(model, cfg),
                              **common)
    prompt = {"num_virtual_tokens": cfg.num_virtual_tokens, **common}
    if name == "prompt_tuning":
        return peft.PromptTuningConfig(**prompt)
    if name == "prefix_tuning":
        accept_past_key_values(model)
        return peft.PrefixTuningConfig(**prompt)
    if name == "p_tuning":
        # LSTM by default: on the tests' task the MLP encoder collapsed for some seeds (after
        # its first Adam steps the virtual tokens swamped attention and [CLS] stopped
        # depending on the text); the LSTM did not.
        return peft.PromptEncoderConfig(encoder_hidden_size=cfg.encoder_hidden_size,
                                        encoder_reparameterization_type=cfg.prompt_encoder.upper(), **prompt)
    raise PeftlabError(f"{name!r} is not a peft method: choose one of {', '.join(PEFT_METHODS)}")


def accept_past_key_values(model) -> None:
    """Let peft's prefix tuning hand its key/value prefixes to a transformers 5 model.

    peft passes the prefixes as `past_key_values` and only does so when the model's forward
    names that argument; transformers 5 renamed it `cache` (and sequence-classification
    heads take it through **kwargs). This gives `model` an instance-level forward that
    takes `past_key_values` and passes it on as `cache`. A bound method (not a closure), so
    deepcopy rebinds it to the copy. Call it on the base model before get_peft_model and
    before PeftModel.from_pretrained.
    """
    import inspect
    import types

    if "past_key_values" in inspect.signature(model.forward).parameters:
        return  # transformers 4.x: peft's own path works
    backbone = getattr(model, "base_model", model)
    if "cache" not in inspect.signature(backbone.forward).parameters:
        raise PeftlabError(f"prefix_tuning feeds learned keys/values through the attention cache, which "
                           f"{type(model).__name__} (transformers {_transformers_version()}) does not "
                           f"accept: use prompt_tuning or p_tuning")
    model.forward = types.MethodType(_forward_with_prefix, model)


def _forward_with_prefix(self, *args, past_key_values=None, **kwargs):
    return type(self).forward(self, *args, cache=past_key_values, **kwargs)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_loftq() -> None:
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise PeftlabError(
            "loftq initialises LoRA against bitsandbytes' 4-bit quantization of the weights, which needs "
            "a CUDA GPU and the bitsandbytes package: run it there, or use method=pissa/olora on this machine"
        )


def apply_method(model, cfg: MethodConfig):
    """Make `model` trainable as `cfg` says; returns the (possibly wrapped) model."""
    heads = head_module_names(model)
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.name == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
    elif cfg.name == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads or name.endswith(".bias"))
        if not any(p.requires_grad for n, p in model.named_parameters() if n.split(".")[0] not in heads):
            raise PeftlabError(f"{type(model).__name__} has no bias parameters, so bitfit would only train "
                               f"the head: use method=head (or another method)")
    elif cfg.name in PEFT_METHODS:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if is_quantized(model):
            # Casts norms to fp32 and enables input gradients, as QLoRA training needs.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, peft_config(model, cfg, heads))
        fix_prompt_pooling(model)
    else:  # validated earlier; kept for API callers that skip validation
        raise PeftlabError(f"unknown method {cfg.name!r}")
    trainable, total = count_parameters(model)
    log.info("method: %s (%s trainable of %s parameters, %.3f%%)", cfg.name, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    return model


def fix_prompt_pooling(model) -> None:
    """Make last-token pooling read the last real token under prompt_tuning / p_tuning (pitfall 4).

    These methods hand the base model `inputs_embeds` (virtual tokens + text). Decoder heads
    find the last non-padding token from `input_ids`; given embeddings they take the last
    position, which under right padding is a pad. This hook remembers the (extended)
    attention mask and copies each row's last-real-token logits into the last position, so
    a text scores the same alone and inside a padded batch.

    Encoders pool the first position, which is now the first virtual token, not [CLS]: the
    pretrained pooler and head would read a token they never saw. A hook on the encoder
    stack drops the virtual positions from its output, so pooling reads [CLS] again (the
    virtual tokens still act through attention in every layer). Call this again after
    loading such an adapter.
    """
    config = getattr(model, "peft_config", {}).get("default")
    if config is None or not config.is_prompt_learning or config.peft_type.value == "PREFIX_TUNING":
        return  # prefix tuning passes input_ids through, so pooling already sees the padding
    base = model.base_model
    if "score" not in dict(base.named_children()):
        _pool_cls_after_prompt(base, config.num_virtual_tokens)
        return
    masks = {}

    def remember_mask(module, args, kwargs):
        masks["attention_mask"] = kwargs.get("attention_mask")

    def pool_last_real_token(module, args, logits):
        mask = masks.get("attention_mask")
        if mask is None or logits.dim() != 3 or mask.shape[1] != logits.shape[1]:
            return logits
        positions = torch.arange(mask.shape[1], device=logits.device)
        last = (positions * mask.to(logits.device, torch.long)).argmax(-1)
        logits = logits.clone()
        logits[:, -1] = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return logits

    base.register_forward_pre_hook(remember_mask, with_kwargs=True)
    base.score.register_forward_hook(pool_last_real_token)


def _pool_cls_after_prompt(model, num_virtual: int) -> None:
    """Encoders: drop the `num_virtual` leading positions from the encoder stack's output."""
    backbone = model.base_model  # transformers' backbone property (e.g. .bert, .distilbert)
    stack = getattr(backbone, "encoder", None) or getattr(backbone, "transformer", None)
    if stack is None or backbone is model:
        log.warning("%s: cannot find the encoder stack, so pooling reads the first virtual token "
                    "instead of [CLS]", type(model).__name__)
        return

    def drop_virtual_positions(module, args, output):
        if isinstance(output, tuple) and not hasattr(output, "last_hidden_state"):
            return (output[0][:, num_virtual:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, num_virtual:]
        return output

    stack.register_forward_hook(drop_virtual_positions)


def prepare_step_hook(model, total_steps: int):
    """A function the training loop calls after each optimizer step, or None.

    AdaLoRA reallocates its rank budget from the current gradients every step (pitfall 10:
    without `update_and_allocate` it is plain LoRA). Its schedule (warm-up, pruning, final
    phase) is set here from the real number of steps.
    """
    peft_configs = getattr(model, "peft_config", {})
    config = peft_configs.get("default") if isinstance(peft_configs, dict) else None
    if config is None or config.peft_type.value != "ADALORA":
        return None
    config.total_step = total_steps
    config.tinit = int(0.1 * total_steps)
    config.tfinal = int(0.2 * total_steps)
    if config.tinit >= total_steps - config.tfinal:
        raise PeftlabError(f"adalora needs more training steps to reallocate ranks (got {total_steps}): "
                           f"train for at least 5 steps")
    adalora = model.base_model

    def update_and_allocate(step: int) -> None:
        adalora.update_and_allocate(step)

    return update_and_allocate


def mergeable(method: str) -> bool:
    """Whether `method`'s adapter can be folded into the base weights (prompt methods cannot)."""
    return method not in PROMPT_METHODS


def method_table(model_name: str) -> list[dict]:
    """Every method with the trainable-parameter count it would have on `model_name`.

    The model loads once (two labels); each method is applied to a fresh copy of it. A
    method that cannot be built here gets the reason instead of a count.
    """
    import copy

    from peftlab.config import ModelConfig
    from peftlab.models import load_model

    base, _, _ = load_model(ModelConfig(name=model_name), 2)
    total = sum(p.numel() for p in base.parameters())
    rows = []
    for name in METHODS:
        model = copy.deepcopy(base)
        try:
            trainable = count_parameters(apply_method(model, MethodConfig(name=name)))[0]
            rows.append({"method": name, "trainable": trainable, "total": total, "about": DESCRIPTIONS[name]})
        except PeftlabError as exc:
            rows.append({"method": name, "trainable": None, "total": total, "about": str(exc)})
    return rows
