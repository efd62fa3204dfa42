"""Fine-tuning methods: which weights train, and how PEFT wraps the model.

`lora` wraps the model with a PEFT LoRA adapter whose `modules_to_save` holds the
classification head, so the head is trained and saved with the adapter (a reloaded adapter
with a random head is the most common way PEFT classifiers silently break). `full` trains
every weight; `head` trains only the head: the linear-probe baseline.
"""

from __future__ import annotations

import logging

from peftlab.config import MethodConfig
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


def target_modules(model, cfg: MethodConfig) -> list[str] | str:
    """The modules LoRA adapts: the user's list, `all-linear`, or the architecture's attention."""
    if cfg.target_modules:
        if cfg.target_modules == ["all-linear"]:
            return "all-linear"
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.target_modules if t not in names]
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
    log.warning("no default LoRA targets for model type %r: using all-linear", model_type)
    return "all-linear"


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def apply_method(model, cfg: MethodConfig):
    """Make `model` trainable as `cfg` says; returns the (possibly wrapped) model."""
    heads = head_module_names(model)
    if cfg.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif cfg.name == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
    elif cfg.name == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        peft_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=target_modules(model, cfg),
            modules_to_save=heads,
        )
        model = get_peft_model(model, peft_config)
    else:  # validated earlier; kept for API callers that skip validation
        raise PeftlabError(f"unknown method {cfg.name!r}")
    trainable, total = count_parameters(model)
    log.info("method: %s (%s trainable of %s parameters, %.3f%%)", cfg.name, f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    return model
