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
    epochs: float = _f(2, "Number of passes over the training set.")
    batch_size: int = _f(16, "Training batch size.")
    eval_batch_size: int = _f(64, "Evaluation batch size.")
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
        "classes worse than random batches do (length predicts the label), then stratified.",
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

    def _loop_problems(self) -> list[str]:
        """Problems with the engine, epochs, batch sizes, learning rates and named choices."""
        out = []
        if self.engine not in ("native", "trainer"):
            out.append(f"train.engine={self.engine!r} must be 'native' or 'trainer'")
        if self.epochs <= 0:
            out.append(f"train.epochs={self.epochs} must be positive")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            out.append("train.batch_size and train.eval_batch_size must be at least 1")
        if self.lr is not None and self.lr <= 0:
            out.append(f"train.lr={self.lr} must be positive")
        if self.head_lr is not None and self.head_lr <= 0:
            out.append(f"train.head_lr={self.head_lr} must be positive (or unset: the method's default)")
        if self.batching not in ("auto", "length", "stratified", "random"):
            out.append(f"train.batching={self.batching!r} is not one of auto, length, stratified, random")
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
