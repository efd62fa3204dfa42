"""How prompt-learning adapters meet the model: prefix tuning's keys/values reach a
transformers 5 model, and pooling reads a real token rather than a virtual one. Applied
when a method is applied and again when its adapter is loaded."""

from __future__ import annotations

import logging

import torch

from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")


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
        raise PeftlabError(
            f"prefix_tuning feeds learned keys/values through the attention cache, which "
            f"{type(model).__name__} (transformers {_transformers_version()}) does not "
            f"accept: use prompt_tuning or p_tuning"
        )
    model.forward = types.MethodType(_forward_with_prefix, model)


def _forward_with_prefix(self, *args, past_key_values=None, **kwargs):
    return type(self).forward(self, *args, cache=past_key_values, **kwargs)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def fix_prompt_pooling(model) -> None:
    """Make last-token pooling read the last real token under prompt_tuning / p_tuning, which pass
    `inputs_embeds` (the pooling pitfall, 4).

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
        log.warning(
            "%s: cannot find the encoder stack, so pooling reads the first virtual token instead of [CLS]",
            type(model).__name__,
        )
        return

    def drop_virtual_positions(module, args, output):
        if isinstance(output, tuple) and not hasattr(output, "last_hidden_state"):
            return (output[0][:, num_virtual:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, num_virtual:]
        return output

    stack.register_forward_hook(drop_virtual_positions)
