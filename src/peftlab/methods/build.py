"""Applying a method to a model: which weights train, and how peft wraps the model.

Every peft method gets the classification head in `modules_to_save`, so the head is trained
and saved with the adapter (a reloaded adapter with a random head is the most common way
peft classifiers silently break). Native methods set `requires_grad` as their registry
entry's `trains` says.
"""

from __future__ import annotations

import logging

from peftlab.config import MethodConfig, ModelConfig
from peftlab.errors import PeftlabError
from peftlab.methods.prompt import accept_past_key_values, fix_prompt_pooling
from peftlab.methods.registry import METHODS, MethodSpec, is_quantized
from peftlab.models import head_module_names, load_model

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


def target_modules(model, cfg: MethodConfig) -> list[str] | str:
    """The modules an adapter wraps: the user's list, `all-linear`, or the architecture's attention."""
    if cfg.target_modules:
        # One name set from Python (target_modules="all-linear") is a list of one.
        wanted = [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
        if wanted == ["all-linear"]:
            return "all-linear"
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in wanted if t.rsplit(".", 1)[-1] not in names]
        if missing:
            raise PeftlabError(
                f"target modules {missing} not found in {type(model).__name__}: "
                f"choose from e.g. {sorted(names)[:12]} or 'all-linear'"
            )
        return wanted
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
        raise PeftlabError(
            f"ia3 has no default target modules for model type {model_type!r}: "
            f"give them, e.g. target_modules=[k_proj,v_proj]"
        )
    return None, None  # peft's own table for this architecture


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def method_spec(name: str) -> MethodSpec:
    """The registry entry of method `name`; raises PeftlabError for an unknown one."""
    if name not in METHODS:
        raise PeftlabError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def peft_config(model, cfg: MethodConfig, heads: list[str]):
    """The peft config object for a peft method on `model` (not yet applied)."""
    import peft

    spec = method_spec(cfg.name)
    if spec.peft_config is None:
        peft_methods = [name for name, s in METHODS.items() if s.peft_config is not None]
        raise PeftlabError(f"{cfg.name!r} is not a peft method: choose one of {', '.join(peft_methods)}")
    if spec.past_key_values:
        accept_past_key_values(model)
    if spec.wraps == "attention":
        targets = target_modules(model, cfg)
    elif spec.wraps == "ia3":
        targets = _ia3_targets(model, cfg)
    else:
        targets = None
    common = {"task_type": peft.TaskType.SEQ_CLS, "modules_to_save": list(heads)}
    return spec.peft_config(cfg, targets, common)


def apply_method(model, cfg: MethodConfig):
    """Make `model` trainable as `cfg` says; returns the (possibly wrapped) model.

    Raises PeftlabError when the method cannot run on this model or machine (its registry
    entry's `check`) or its target modules are not in the model.
    """
    spec = method_spec(cfg.name)  # validated earlier; checked again for API callers that skip validation
    heads = head_module_names(model)
    problem = spec.check(model, heads) if spec.check is not None else None
    if problem:
        raise PeftlabError(problem)
    if spec.trains is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(spec.trains(name, heads))
    else:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if is_quantized(model):
            # Casts norms to fp32 and enables input gradients, as QLoRA training needs.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, peft_config(model, cfg, heads))
        fix_prompt_pooling(model)
    trainable, total = count_parameters(model)
    log.info(
        "method: %s (%s trainable of %s parameters, %.3f%%)",
        cfg.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model


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
        raise PeftlabError(
            f"adalora needs more training steps to reallocate ranks (got {total_steps}): train for at least 5 steps"
        )
    adalora = model.base_model

    def update_and_allocate(step: int) -> None:
        adalora.update_and_allocate(step)

    return update_and_allocate


def method_table(model_name: str) -> list[dict]:
    """Every method with the trainable-parameter count it would have on `model_name`.

    The model loads once (two labels); each method is applied to a fresh copy of it. A
    method that cannot be built here gets the reason instead of a count.
    """
    import copy

    base, _, _ = load_model(ModelConfig(name=model_name), 2)
    total = sum(p.numel() for p in base.parameters())
    rows = []
    for name, spec in METHODS.items():
        model = copy.deepcopy(base)
        try:
            trainable = count_parameters(apply_method(model, MethodConfig(name=name)))[0]
            rows.append({"method": name, "trainable": trainable, "total": total, "about": spec.description})
        except PeftlabError as exc:
            rows.append({"method": name, "trainable": None, "total": total, "about": str(exc)})
    return rows
