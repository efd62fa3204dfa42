"""Fine-tuning methods: which weights train, and how peft wraps the model.

`registry` holds one `MethodSpec` per method (LoRA and its variants, AdaLoRA, IA3, LoHa,
LoKr, VeRA, BOFT/OFT, the prompt-learning methods, and the native `full`, `bitfit` and
`head`); `build` applies one to a model; `prompt` makes prompt-learning adapters pool the
right token.
"""

from peftlab.methods.registry import METHODS, MethodSpec

# config.py imports the registry, and importing it runs this file: the builders (which
# import config, torch and peft) load on first use only, so config stays light and acyclic.
_BUILD = ("apply_method", "count_parameters", "method_table", "prepare_step_hook")
_PROMPT = ("accept_past_key_values", "fix_prompt_pooling")


def __getattr__(name):
    if name in _BUILD:
        from peftlab.methods import build

        return getattr(build, name)
    if name in _PROMPT:
        from peftlab.methods import prompt

        return getattr(prompt, name)
    raise AttributeError(f"module 'peftlab.methods' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "MethodSpec",
    "accept_past_key_values",
    "apply_method",
    "count_parameters",
    "fix_prompt_pooling",
    "method_table",
    "prepare_step_hook",
]
