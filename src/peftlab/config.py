"""Run configuration: one validated dataclass per concern, serialised as YAML.

A run is fully described by a `RunConfig`. The YAML file written into every run
directory (`config.yaml`) is its exact serialised copy, so `peftlab run --config
runs/x/config.yaml` repeats a run. Command-line overrides are `key=value` pairs where the
key is either dotted (`train.lr=1e-3`) or a field name that is unique across sections
(`lr=1e-3`); `model=`, `dataset=` and `method=` are shorthands for the names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from peftlab.errors import PeftlabError
from peftlab.methods.registry import METHODS


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (shown by `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


TRUNCATION_MODES = ("head", "tail", "head+tail")


@dataclass
class DataConfig:
    """What to train and evaluate on."""

    dataset: str = _f(
        "sms_spam",
        "Dataset: a known name (sms_spam, imdb, glue/sst2, ...), a Hub id, or a local "
        "CSV/TSV/JSON(L)/Parquet file or folder of split files.",
    )
    data_dir: str | None = _f(
        None,
        "Folder of offline dataset mirrors laid out as <name>/<split>.jsonl.gz; defaults to $PEFTLAB_DATA_DIR.",
    )
    text_column: str | None = _f(None, "Column holding the text (inferred when not given).")
    text_pair_column: str | None = _f(
        None,
        "Column holding the second text of sentence-pair tasks (e.g. sentence2 for GLUE MRPC, "
        "sentence for QNLI with text_column=question); the two are tokenized as a pair.",
    )
    label_column: str | None = _f(None, "Column holding the label (inferred when not given).")
    test_size: float = _f(0.2, "Fraction held out as the test set when the dataset has no test split.")
    split_seed: int = _f(42, "Seed of the stratified train/test split.")
    max_train_samples: int | None = _f(None, "Use a stratified subset of at most this many training examples.")
    max_eval_samples: int | None = _f(None, "Use a stratified subset of at most this many test examples.")
    train_fraction: float = _f(
        1.0, "Use a stratified subset of this fraction of the training examples (before max_train_samples)."
    )
    dedup: bool = _f(
        False,
        "Remove exact duplicate texts (compared after stripping surrounding whitespace) before "
        "splitting, keeping the first; with given splits, test texts also in train are removed.",
    )
    max_length: int = _f(256, "Truncate texts to this many tokens.")
    validation_size: float = _f(
        0.0,
        "Carve this fraction of the training set (stratified) as a validation split for "
        "model selection and early stopping; 0 for none.",
    )
    truncation: str = _f(
        "head",
        "Which tokens a text longer than max_length keeps: head (the first), tail (the last) or "
        "head+tail (the first quarter and the last three quarters, 128 + 382 of BERT's 510).",
    )
    token_cache: bool = _f(
        True,
        "Cache tokenized texts on disk in $PEFTLAB_CACHE_DIR (default ~/.cache/peftlab/tokens), "
        "so a rerun skips tokenization; token_cache=false (or PEFTLAB_TOKEN_CACHE=0) turns it off.",
    )

    def problems(self) -> list[str]:
        out = []
        if not self.dataset:
            out.append("data.dataset is empty: name a dataset, e.g. dataset=sms_spam")
        if not 0.0 < self.test_size < 1.0:
            out.append(f"data.test_size={self.test_size} must be between 0 and 1, e.g. 0.2")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                out.append(f"data.{name}={value} must be at least 2 (or unset for all rows)")
        if not 0.0 <= self.validation_size < 1.0:
            out.append(f"data.validation_size={self.validation_size} must be in [0, 1), e.g. 0.1")
        if not 0.0 < self.train_fraction <= 1.0:
            out.append(f"data.train_fraction={self.train_fraction} must be in (0, 1], e.g. 0.1")
        if self.max_length < 8:
            out.append(f"data.max_length={self.max_length} is too small: use at least 8")
        if self.truncation not in TRUNCATION_MODES:
            out.append(f"data.truncation={self.truncation!r} is not one of {', '.join(TRUNCATION_MODES)}")
        if self.text_pair_column is not None and self.text_pair_column == self.text_column:
            out.append("data.text_pair_column must differ from data.text_column")
        return out


@dataclass
class ModelConfig:
    """Which pretrained model to adapt."""

    name: str = _f(
        "minilm",
        "Model: a packaged alias (minilm, smollm2-135m), a Hub id, a local folder, or a .gguf file.",
    )
    dtype: str = _f("fp32", "Weight dtype when loading: fp32, bf16, fp16 or auto.")
    device: str = _f("auto", "Device to train and evaluate on: auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")
    quantization: str = _f(
        "none",
        "Load the base weights quantized with bitsandbytes (needs CUDA): none, 4bit or 8bit; "
        "method=qlora implies 4bit. The classification head stays unquantized.",
    )
    trust_remote_code: bool = _f(
        False, "Allow a Hub model to run its own Python code (off: only enable for code you trust)."
    )
    model_dropout: float | None = _f(
        None,
        "Override the base model's own dropout (hidden and attention) during training; 0 turns it "
        "off, which is faster on CPUs, where dropout's random numbers are costly. Default: keep.",
    )
    allow_pickle: bool = _f(
        False,
        "Allow loading weights from pickle files (pytorch_model.bin, adapter_model.bin), which "
        "can run code: only for files you trust. Off: safetensors only.",
    )

    def problems(self) -> list[str]:
        out = []
        if not self.name:
            out.append("model.name is empty: name a model, e.g. model=minilm")
        if self.model_dropout is not None and not 0.0 <= self.model_dropout < 1.0:
            out.append(f"model.model_dropout={self.model_dropout} must be in [0, 1)")
        if self.dtype not in ("fp32", "bf16", "fp16", "auto"):
            out.append(f"model.dtype={self.dtype!r} is not one of fp32, bf16, fp16, auto")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            out.append(f"model.device={self.device!r} is not one of auto, cpu, cuda, mps")
        if self.quantization not in ("none", "4bit", "8bit"):
            out.append(f"model.quantization={self.quantization!r} is not one of none, 4bit, 8bit")
        return out


@dataclass
class MethodConfig:
    """How the model is adapted."""

    name: str = _f(
        "lora",
        "Fine-tuning method: "
        + ", ".join(name for name, spec in METHODS.items() if spec.peft_config is not None)
        + " (peft adapters, head always trained); "
        + "; ".join(f"{name}: {spec.about}" for name, spec in METHODS.items() if spec.peft_config is None)
        + ". `peftlab methods` lists them with their parameter counts.",
    )
    r: int = _f(
        8,
        "Rank of lora-family, loha, lokr and boft/oft adapters; AdaLoRA's average target rank; "
        "VeRA uses vera_r instead.",
    )
    alpha: float = _f(
        16, "LoRA/LoHa/LoKr scaling numerator (the update is scaled by alpha / r, alpha / sqrt(r) for rslora)."
    )
    dropout: float = _f(0.1, "Dropout on the adapter input (lora family, loha, lokr, vera, boft, oft).")
    target_modules: list[str] | None = _f(
        None,
        "Module names to adapt; default: the attention projections of the architecture (for "
        "ia3 also the feedforward output); 'all-linear' for every linear layer.",
    )
    lora_plus_ratio: float = _f(
        16, "lora_plus: learning rate of the LoRA B matrices = lr x this ratio (LoRA+ paper: 16)."
    )
    adalora_init_r: int = _f(12, "adalora: starting rank of every module, pruned towards r on average.")
    vera_r: int = _f(256, "vera: rank of the shared random projections (VeRA needs a high rank).")
    num_virtual_tokens: int = _f(20, "prompt_tuning, prefix_tuning, p_tuning: number of learned virtual tokens.")
    encoder_hidden_size: int = _f(128, "p_tuning: hidden size of the prompt encoder.")
    prompt_encoder: str = _f(
        "lstm",
        "p_tuning: the network producing the virtual tokens: lstm (the P-tuning paper's) or mlp. "
        "The MLP can collapse after its first steps (the text then stops mattering).",
    )

    def problems(self) -> list[str]:
        out = []
        if self.name not in METHODS:
            hint = difflib.get_close_matches(self.name, list(METHODS), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else f"choose one of {', '.join(METHODS)}"
            out.append(f"method.name={self.name!r} is not a known method: {fix}")
        for name in ("r", "adalora_init_r", "vera_r", "num_virtual_tokens", "encoder_hidden_size"):
            if getattr(self, name) < 1:
                out.append(f"method.{name}={getattr(self, name)} must be a positive integer")
        if self.prompt_encoder not in ("lstm", "mlp"):
            out.append(f"method.prompt_encoder={self.prompt_encoder!r} must be lstm or mlp")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"method.dropout={self.dropout} must be in [0, 1)")
        if self.alpha <= 0:
            out.append(f"method.alpha={self.alpha} must be positive, e.g. 16")
        if self.lora_plus_ratio < 1:
            out.append(f"method.lora_plus_ratio={self.lora_plus_ratio} must be at least 1, e.g. 16")
        return out


@dataclass
class TrainConfig:
    """How training runs."""

    engine: str = _f(
        "native",
        "Training/evaluation engine: native (peftlab's own accelerate loop) or trainer (the Hugging Face Trainer).",
    )
    epochs: float | None = _f(
        None,
        "Passes over the training set; unset: 2, or more on a small training set, so that at "
        "least `min_steps` optimizer steps run. A number given here is followed exactly.",
    )
    min_steps: int = _f(
        200,
        "With epochs unset: train at least this many optimizer steps (more than 2 epochs on a "
        "small training set: 2 epochs of 500 examples are 63 steps, too few to learn sms_spam; "
        "bench/README.md); 0: always 2 epochs.",
    )
    batch_size: int = _f(16, "Training batch size.")
    eval_batch_size: int = _f(
        64, "Evaluation batch size (packed evaluation: rows of this many texts of the mean length, in tokens)."
    )
    lr: float | None = _f(
        None,
        "Peak learning rate; default per method (its `lr` in peftlab.methods.registry): 1e-3 for most of the lora "
        "family and bitfit, 5e-3 to 3e-2 for adalora/loha/lokr/vera/ia3/prompt methods, 5e-5 "
        "for full, 1e-1 for head.",
    )
    head_lr: float | None = _f(
        None,
        "Learning rate of the classification head, which starts from random weights; default: "
        "lr, except 1e-1 for bitfit, prompt_tuning and p_tuning (their registry `head_lr`), which "
        "change the features too little for a head trained at their own rate.",
    )
    batching: str = _f(
        "auto",
        "How training batches are formed (native engine): length (similar lengths per batch: "
        "least padding), stratified (similar lengths within each class: every batch keeps the "
        "class mix), random, or auto: length, unless length-grouped batches would mix the "
        "classes worse than random batches do (length predicts the label), then stratified; "
        "with packing on, stratified (packed batches carry no padding, whatever their lengths).",
    )
    packing: str = _f(
        "auto",
        "Pack each training batch's texts into as few rows as fit, so no compute goes to padding "
        "(native engine; attention stays inside each text, and each text is pooled on its own "
        "token): auto (where the model and method allow it and packed logits match padded "
        "ones on real examples; logged), always (an error where it cannot), or never.",
    )
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup_ratio: float = _f(0.06, "Fraction of steps spent warming the learning rate up.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _f(42, "Seed for initialisation, dropout and batch order.")
    precision: str = _f(
        "auto",
        "Compute precision: auto (bf16 where the hardware supports it, else fp32), fp32, bf16 or fp16.",
    )
    compile: bool = _f(
        False,
        "torch.compile the model for training (dynamic shapes; the compile time counts as "
        "training time). Off by default: see bench/README.md for what it bought here.",
    )
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (for smoke tests).")
    log_every: int = _f(50, "Log training loss every this many steps.")
    save_every: int = _f(200, "Checkpoint every this many steps (and at each epoch end); 0: epoch ends only.")
    eval_every: int = _f(0, "With a validation split: evaluate every this many steps; 0: at each epoch end.")
    metric_for_best: str = _f(
        "macro_f1", "Validation metric that picks the best checkpoint: macro_f1, accuracy or loss."
    )
    early_stopping_patience: int | None = _f(
        None, "Stop after this many validation rounds without improvement (needs validation_size)."
    )
    load_best: bool = _f(True, "With a validation split: end training with the best checkpoint's weights.")
    tensorboard: bool = _f(
        False, "Also write TensorBoard event files to <run dir>/tensorboard (needs peftlab[tracking])."
    )
    mlflow: bool = _f(
        False,
        "Also record an MLflow run in the local SQLite store <run dir>/mlruns/mlflow.db (needs peftlab[tracking]).",
    )

    def problems(self) -> list[str]:
        return self._loop_problems() + self._schedule_problems()

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps this config trains for, at `steps_per_epoch` batches per epoch."""
        if self.epochs is not None:
            total = math.ceil(self.epochs * steps_per_epoch)
        else:  # the default: 2 epochs, or enough epochs for min_steps on a small training set
            total = max(2 * steps_per_epoch, self.min_steps)
        return min(total, self.max_steps) if self.max_steps else total

    def _loop_problems(self) -> list[str]:
        """Problems with the engine, epochs, batch sizes, learning rates and named choices."""
        out = []
        if self.engine not in ("native", "trainer"):
            out.append(f"train.engine={self.engine!r} must be 'native' or 'trainer'")
        if self.epochs is not None and self.epochs <= 0:
            out.append(f"train.epochs={self.epochs} must be positive")
        if self.min_steps < 0:
            out.append(f"train.min_steps={self.min_steps} must be 0 or positive")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            out.append("train.batch_size and train.eval_batch_size must be at least 1")
        if self.lr is not None and self.lr <= 0:
            out.append(f"train.lr={self.lr} must be positive")
        if self.head_lr is not None and self.head_lr <= 0:
            out.append(f"train.head_lr={self.head_lr} must be positive (or unset: the method's default)")
        if self.batching not in ("auto", "length", "stratified", "random"):
            out.append(f"train.batching={self.batching!r} is not one of auto, length, stratified, random")
        if self.packing not in ("auto", "always", "never"):
            out.append(f"train.packing={self.packing!r} is not one of auto, always, never")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            out.append(f"train.precision={self.precision!r} is not one of auto, fp32, bf16, fp16")
        if self.metric_for_best not in ("macro_f1", "accuracy", "loss"):
            out.append(f"train.metric_for_best={self.metric_for_best!r} is not one of macro_f1, accuracy, loss")
        return out

    def _schedule_problems(self) -> list[str]:
        """Problems with stopping, checkpoint and evaluation cadence, warmup and regularizers."""
        out = []
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            out.append(f"train.early_stopping_patience={self.early_stopping_patience} must be at least 1")
        if self.save_every < 0 or self.eval_every < 0:
            out.append("train.save_every and train.eval_every must be 0 or positive")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"train.max_steps={self.max_steps} must be at least 1")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            out.append(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1] (a fraction of the steps), e.g. 0.06")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay={self.weight_decay} must be 0 or positive, e.g. 0.01")
        if self.max_grad_norm < 0:
            out.append(f"train.max_grad_norm={self.max_grad_norm} must be 0 (off) or positive, e.g. 1.0")
        return out


@dataclass
class RunConfig:
    """One experiment: data, model, method and training, plus where results go."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = _f(None, "Run name; default <model>-<dataset>-<method>, numbered if it exists.")
    output_dir: str = _f("runs", "Folder that holds run directories.")
    overwrite: bool = _f(False, "Replace an existing run directory of the same name.")

    def validate(self) -> RunConfig:
        """Collect every problem, then raise once (so the user fixes them in one go)."""
        problems = []
        spec = METHODS.get(self.method.name)  # None: reported by MethodConfig.problems
        for name, section in (
            ("data", self.data),
            ("model", self.model),
            ("method", self.method),
            ("train", self.train),
        ):
            # NaN passes every range check (each comparison is False), so finiteness comes first.
            infinite = [
                f.name
                for f in fields(section)
                if isinstance(getattr(section, f.name), float) and not math.isfinite(getattr(section, f.name))
            ]
            problems += [
                f"{name}.{key}={getattr(section, key)} must be a finite number: give a real value" for key in infinite
            ]
            if not infinite:
                problems += section.problems()
        if self.name is not None:
            problems += run_name_problems(self.name)
        if self.train.engine == "trainer" and self.data.validation_size:
            problems.append("validation_size (model selection) needs engine=native")
        if self.train.early_stopping_patience and not self.data.validation_size:
            problems.append("early_stopping_patience needs a validation split: set validation_size=0.1")
        if self.model.quantization != "none" and (spec is None or spec.family not in ("lora", "adalora")):
            problems.append(
                f"model.quantization={self.model.quantization} needs a LoRA-family method "
                f"(e.g. method=qlora), not {self.method.name}"
            )
        if problems:
            raise PeftlabError("invalid config: " + "; ".join(problems))
        return self

    @property
    def quantization(self) -> str:
        """How the base model loads: model.quantization, or the method's own (qlora: 4bit)."""
        spec = METHODS.get(self.method.name)
        if self.model.quantization == "none" and spec is not None:
            return spec.quantization
        return self.model.quantization

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else METHODS[self.method.name].lr

    @property
    def head_lr(self) -> float:
        if self.train.head_lr is not None:
            return self.train.head_lr
        default = METHODS[self.method.name].head_lr
        return default if default is not None else self.lr

    @property
    def b_lr_ratio(self) -> float | None:
        """LoRA+: the LoRA B matrices train at lr x this; None: at lr, as every other weight."""
        field_name = METHODS[self.method.name].b_lr_ratio_field
        return getattr(self.method, field_name) if field_name else None

    @property
    def data_dir(self) -> str | None:
        return self.data.data_dir or os.environ.get("PEFTLAB_DATA_DIR") or None

    def default_name(self) -> str:
        model = Path(self.model.name.rstrip("/")).name.removesuffix(".gguf")
        dataset = Path(self.data.dataset.rstrip("/")).name.split(".")[0].replace("/", "-")
        return safe_run_name(f"{model}-{dataset}-{self.method.name}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# A run name is one folder name under output_dir: never a path, never hidden (peftlab's own
# temporary folders start with a dot), short enough for the temporary names made from it.
RUN_NAME_CHARS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=,+@-]*")
MAX_RUN_NAME = 200


def run_name_problems(name: str) -> list[str]:
    """Why `name` cannot name a run folder (an empty list when it can)."""
    if not RUN_NAME_CHARS.fullmatch(name):
        return [
            f"name={name!r} is not a plain folder name: use letters, digits and . _ - = , + @ "
            f"(starting with a letter or digit), e.g. name=my-run; use output_dir=... for the parent folder"
        ]
    if len(name) > MAX_RUN_NAME:
        return [f"name is {len(name)} characters long: use at most {MAX_RUN_NAME}"]
    return []


def safe_run_name(text: str) -> str:
    """`text` made into a valid run name: other characters become '_', cut to the limit."""
    name = re.sub(r"[^A-Za-z0-9._=,+@-]", "_", text).lstrip("._-=,+@") or "run"
    return name[:MAX_RUN_NAME]


SECTIONS = {"data": DataConfig, "model": ModelConfig, "method": MethodConfig, "train": TrainConfig}
# Shorthands for the names that would otherwise be ambiguous.
ALIASES = {"model": "model.name", "method": "method.name", "dataset": "data.dataset"}


def field_index() -> dict[str, str]:
    """Map every accepted override key (plain or dotted) to its dotted path."""
    index: dict[str, str] = {}
    counts: dict[str, int] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            index[f"{section}.{f.name}"] = f"{section}.{f.name}"
            counts[f.name] = counts.get(f.name, 0) + 1
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if counts[f.name] == 1 and f.name not in SECTIONS:
                index[f.name] = f"{section}.{f.name}"
    for f in fields(RunConfig):
        if f.name not in SECTIONS:
            index[f.name] = f.name
    index.update(ALIASES)
    return index


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    """Convert a YAML-parsed override to the field's type, with a clear error."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise PeftlabError(f"{key} cannot be empty: give a value, e.g. {key}={f.default}")
    try:
        return _convert(value, kind)
    except (TypeError, ValueError):
        raise PeftlabError(f"{key}={value!r} is not a valid {kind.split(' |')[0]}: fix the value") from None


def _convert(value: Any, kind: str) -> Any:
    """`value` as the type `kind` names; raises ValueError or TypeError when it is not one."""
    # YAML has already read `true`/`false` as bools, so anything else for a bool field is a typo.
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
        raise ValueError
    if kind.startswith(("int", "float")) and isinstance(value, bool):
        raise ValueError  # `epochs=true` is a typo, not 1
    if kind.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("str"):
        return str(value)
    if kind.startswith("list"):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return list(value)
    return value


def set_value(config: RunConfig, key: str, value: Any) -> None:
    """Set one (plain, dotted or aliased) key on `config`."""
    index = field_index()
    if key not in index:
        hint = difflib.get_close_matches(key, list(index), n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "run `peftlab run --help` for the keys"
        raise PeftlabError(f"unknown config key {key!r}: {fix}")
    path = index[key].split(".")
    target: Any = config
    for part in path[:-1]:
        target = getattr(target, part)
    f = {f.name: f for f in fields(target)}[path[-1]]
    setattr(target, path[-1], _coerce(value, f, key))


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` strings; values are parsed as YAML (`1e-3`, `true`, `[a, b]`)."""
    for item in overrides:
        if "=" not in item:
            raise PeftlabError(f"override {item!r} is not key=value: write e.g. epochs=2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        set_value(config, key.strip(), value)
    return config


def from_dict(data: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from nested or flat dict (as read from YAML)."""
    config = RunConfig()
    if not isinstance(data, dict):
        raise PeftlabError(f"{source} must be a mapping of keys to values, got {type(data).__name__}")
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, subvalue in value.items():
                set_value(config, f"{key}.{sub}", subvalue)
        elif isinstance(value, dict) and key not in field_index():
            hint = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            fix = f"did you mean section {hint[0]!r}?" if hint else f"the sections are {', '.join(SECTIONS)}"
            raise PeftlabError(f"unknown config section {key!r} in {source}: {fix}")
        else:
            set_value(config, key, value)
    return config


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file's contents (a mapping). Raises PeftlabError naming the problem."""
    p = Path(path)
    if not p.is_file():
        raise PeftlabError(f"config file {p} does not exist: check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise PeftlabError(f"config file {p} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(data, dict):
        raise PeftlabError(f"config file {p} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (optional), apply overrides, validate. Raises PeftlabError."""
    config = RunConfig()
    if path is not None:
        config = from_dict(read_yaml(path), source=str(path))
    apply_overrides(config, overrides or [])
    return config.validate()


# --- searches (peftlab tune) ------------------------------------------------------------------

# The pseudo-key of a search space that scales the learning rate a trial would otherwise use
# (train.lr, or its method's default): the defaults differ 30-fold between methods, so one
# relative range suits every method where one absolute range would not.
LR_FACTOR = "lr_factor"
# The search when the config's `tune:` key gives no space: methods that train few weights,
# their capacity where they have one, and the rate and schedule, which matter most.
DEFAULT_TUNE_SPACE: dict[str, Any] = {
    "method.name": ["lora", "ia3", "lokr", "vera"],
    "method.r": {"choices": [4, 8, 16, 32], "when": {"method.name": ["lora", "lokr"]}},
    "method.alpha": {"choices": [8, 16, 32, 64], "when": {"method.name": ["lora", "lokr"]}},
    "method.target_modules": {"choices": [None, "all-linear"], "when": {"method.name": ["lora", "lokr"]}},
    "method.dropout": {"low": 0.0, "high": 0.2, "when": {"method.name": ["lora", "lokr", "vera"]}},
    LR_FACTOR: {"low": 0.25, "high": 4.0, "log": True},
    # null: the default schedule (2 epochs, or train.min_steps on a small training set).
    "train.epochs": [1, None, 3],
    "train.batching": ["auto", "random"],
}
_SPEC_KEYS = ("choices", "low", "high", "log", "step", "when")
_NOT_SEARCHABLE = ("name", "output_dir", "overwrite")


@dataclass(frozen=True)
class SearchParam:
    """One axis of a search space: a config key and the values a trial may give it."""

    key: str  # dotted config path (train.lr), or LR_FACTOR
    choices: tuple | None = None  # a categorical axis; None: the range low..high
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False  # an int field: sampled as an integer
    when: tuple[str, tuple] | None = None  # sampled only when this key took one of these values


def _param_path(key: str, where: str) -> tuple[str | None, str, list[str]]:
    """The dotted path and the field's type name for a space key, or a problem."""
    if key == LR_FACTOR:
        return LR_FACTOR, "float", []
    index = field_index()
    if key not in index or index[key] in _NOT_SEARCHABLE:
        hint = difflib.get_close_matches(key, [*index, LR_FACTOR], n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else "use a config key such as train.lr, or lr_factor"
        return None, "", [f"{where}: {key!r} is not a config key to search: {fix}"]
    section, _, name = index[key].rpartition(".")
    cls = SECTIONS[section] if section else RunConfig
    return index[key], str({f.name: f for f in fields(cls)}[name].type), []


def _range_problems(spec: dict, kind: str, where: str) -> list[str]:
    """What is wrong with a {low, high, log, step} range of a field of type `kind`."""
    low, high = spec.get("low"), spec.get("high")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not kind.startswith(("int", "float")):
        return [f"{where} is a {kind.split(' |')[0]} setting: give a list of values, not a range"]
    if not numbers or not math.isfinite(low) or not math.isfinite(high) or low >= high:
        return [f"{where} needs numbers low < high, e.g. {{low: 1e-4, high: 1e-2, log: true}}"]
    if kind.startswith("int") and not (float(low).is_integer() and float(high).is_integer()):
        return [f"{where} is an integer setting: give whole numbers for low and high"]
    if spec.get("log") and low <= 0:
        return [f"{where} has log: true, so low must be positive"]
    if spec.get("step") is not None and spec.get("log"):
        return [f"{where}: give either step or log, not both"]
    return []


def _when(spec: dict, where: str) -> tuple[tuple[str, tuple] | None, list[str]]:
    when = spec.get("when")
    if when is None:
        return None, []
    if not (isinstance(when, dict) and len(when) == 1 and isinstance(next(iter(when.values())), list)):
        return None, [f"{where}.when must be one key and its values, e.g. when: {{method.name: [lora, lokr]}}"]
    key, values = next(iter(when.items()))
    return (field_index().get(key, key), tuple(values)), []


def parse_search_param(key: str, spec: Any) -> tuple[SearchParam | None, list[str]]:
    """One space entry as a SearchParam: a list of values, {choices: [...]}, or a range
    {low, high, log, step}; each may add `when: {key: [values]}`. Returns it or its problems."""
    where = f"tune.space.{key}"
    path, kind, problems = _param_path(key, where)
    spec = {"choices": spec} if isinstance(spec, list) else spec
    if problems or not isinstance(spec, dict):
        return None, problems or [f"{where} must be a list of values or a mapping such as {{low: 1, high: 3}}"]
    problems += [f"{where}: unknown setting {k!r} (use {', '.join(_SPEC_KEYS)})" for k in spec if k not in _SPEC_KEYS]
    when, when_problems = _when(spec, where)
    problems += when_problems
    if "choices" in spec:
        choices = spec["choices"]
        plain = isinstance(choices, list) and all(v is None or isinstance(v, (bool, int, float, str)) for v in choices)
        if not plain or not choices or any(k in spec for k in ("low", "high", "log", "step")):
            problems.append(f"{where} needs a non-empty list of plain values (numbers, words, true/false, null)")
        return (None if problems else SearchParam(path, choices=tuple(choices), when=when)), problems
    problems += _range_problems(spec, kind, where)
    if problems:
        return None, problems
    return SearchParam(
        path,
        low=spec["low"],
        high=spec["high"],
        log=bool(spec.get("log", False)),
        step=spec.get("step"),
        integer=kind.startswith("int"),
        when=when,
    ), []


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `45m`, `2h`, `1h30m`, `90s` or `600` (seconds).
    Raises ValueError when it is not one."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(text)
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass
class TuneConfig:
    """A search over run settings (`peftlab tune`): the config's `tune:` key."""

    space: dict = _f(
        {},
        "Search space: config key -> a list of values, or a range {low, high, log, step}, either "
        "optionally with when: {method.name: [...]} (sampled only for those values); lr_factor "
        "scales the learning rate the trial would otherwise use. Empty: DEFAULT_TUNE_SPACE.",
    )
    trials: int | None = _f(
        None, "Stop once the study holds this many complete or pruned trials (20 when no time budget is given)."
    )
    time_budget: str | None = _f(
        None,
        "This worker's wall-clock budget, e.g. 45m, 2h, 1h30m, 600 (seconds); no trial starts that would overrun it.",
    )
    pruner: str = _f(
        "percentile",
        "percentile: stop a trial whose validation score is in the worst prune_percentile percent of "
        "earlier trials' at the same validation round; median: the same at 50 (harsher: on a small "
        "validation split, noise alone puts half the good trials below the median); none: never "
        "stop a trial early.",
    )
    prune_percentile: float = _f(
        25.0, "pruner=percentile: the share (percent) of earlier trials' scores a trial must fall into to stop."
    )
    startup_trials: int = _f(5, "Trials sampled at random before TPE models the space.")
    prune_after_trials: int = _f(
        4,
        "Complete trials the pruner needs before it stops others (it compares a trial with their "
        "scores at the same round): with fewer, one lucky or unlucky trial sets the bar.",
    )
    prune_after_rounds: int = _f(
        4,
        "Validation rounds every trial gets before it may be pruned: by default one epoch, since "
        "trials with other lengths and warm-ups are not comparable earlier.",
    )
    prune_patience: int = _f(
        2,
        "The pruner stops only a trial that also has not improved for this many rounds: a longer "
        "trial, still warming up or decaying its rate, is not cut for lagging shorter ones (0: off).",
    )
    evals_per_epoch: int = _f(4, "Validation rounds per epoch (the pruner's checkpoints) when train.eval_every is 0.")
    refit: bool = _f(
        True,
        "After the search, train the best trial's settings once more on the training and validation "
        "data together (what the trials held out to select), and evaluate that model on the test "
        "split; false: evaluate the best trial's own adapter.",
    )
    include_base: bool = _f(True, "Make the first trial the base config's own settings, where they lie in the space.")
    seed: int | None = _f(None, "Seed of the TPE sampler: for one worker (workers sharing a seed would sample alike).")
    heartbeat_seconds: int = _f(
        60,
        "How often a worker records that its trial is alive; a trial silent for twice as long (its "
        "worker was killed) is marked failed and its settings are tried again once.",
    )

    def search_params(self) -> list[SearchParam]:
        """The space as SearchParams (DEFAULT_TUNE_SPACE when empty). Raises PeftlabError."""
        params, problems = self._space()
        if problems:
            raise PeftlabError("invalid tune config: " + "; ".join(problems))
        return params

    def _space(self) -> tuple[list[SearchParam], list[str]]:
        if not isinstance(self.space, dict):
            return [], ["tune.space must be a mapping of config key -> values or range"]
        params, problems = [], []
        for key, spec in (self.space or DEFAULT_TUNE_SPACE).items():
            param, found = parse_search_param(str(key), spec)
            problems += found
            if param is not None:
                params.append(param)
        keys = [p.key for p in params]
        for i, p in enumerate(params):
            if keys.count(p.key) > 1 and keys.index(p.key) == i:
                problems.append(f"tune.space names {p.key} twice (e.g. as lr and train.lr): keep one")
            if p.when is not None and p.when[0] not in {q.key for q in params[:i] if q.choices is not None}:
                problems.append(
                    f"tune.space.{p.key}.when names {p.when[0]}, which must come earlier in the space as a list of values"
                )
        return params, problems

    def problems(self) -> list[str]:
        out = self._space()[1]
        if self.trials is not None and self.trials < 1:
            out.append(f"tune.trials={self.trials} must be at least 1")
        if self.time_budget is not None:
            try:
                if parse_duration(self.time_budget) <= 0:
                    raise ValueError
            except ValueError:
                out.append(f"tune.time_budget={self.time_budget!r} is not a duration: write e.g. 45m, 2h or 1h30m")
        if self.pruner not in ("percentile", "median", "none"):
            out.append(f"tune.pruner={self.pruner!r} is not one of percentile, median, none")
        if not 0 < self.prune_percentile < 100:
            out.append(f"tune.prune_percentile={self.prune_percentile:g} must lie between 0 and 100")
        for name in ("startup_trials", "prune_after_trials", "prune_after_rounds", "prune_patience"):
            if getattr(self, name) < 0:
                out.append(f"tune.{name}={getattr(self, name)} must be 0 or more")
        for name in ("evals_per_epoch", "heartbeat_seconds"):
            if getattr(self, name) < 1:
                out.append(f"tune.{name}={getattr(self, name)} must be at least 1")
        return out

    def validate(self) -> TuneConfig:
        """Collect every problem, then raise once."""
        problems = self.problems()
        if problems:
            raise PeftlabError("invalid tune config: " + "; ".join(problems))
        return self


def set_tune_value(config: TuneConfig, key: str, value: Any) -> None:
    """Set `tune.KEY` (`tune.space.X` adds or replaces one axis of the space)."""
    if key.startswith("space."):
        config.space = {**(config.space or {}), key.removeprefix("space."): value}
        return
    known = {f.name: f for f in fields(TuneConfig)}
    if key not in known:
        hint = difflib.get_close_matches(key, list(known), n=1)
        fix = f"did you mean 'tune.{hint[0]}'?" if hint else f"the keys are {', '.join(known)}"
        raise PeftlabError(f"unknown tune key 'tune.{key}': {fix}")
    if key == "time_budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # seconds, as a bare number
    setattr(config, key, _coerce(value, known[key], f"tune.{key}"))


def tune_from_dict(data: Any, source: str = "config") -> TuneConfig:
    """A TuneConfig from the `tune:` mapping of a YAML file (not yet validated)."""
    if not isinstance(data, dict):
        raise PeftlabError(f"the tune: key in {source} must be a mapping (e.g. tune: {{trials: 20}})")
    config = TuneConfig()
    for key, value in data.items():
        set_tune_value(config, str(key), value)
    return config
