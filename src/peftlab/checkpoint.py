"""Training checkpoints: written atomically, read back without running code, and refused
when the run's settings changed since they were written.

A checkpoint is a folder: the trainable weights (safetensors), the optimizer, scheduler and
RNG states (a tensors-only torch file, loaded with weights_only=True) and the loop's
`TrainState` as JSON. `<run>/checkpoints/last` continues a killed run exactly;
`<run>/checkpoints/best` holds the best weights by the validation metric.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from peftlab.errors import PeftlabError
from peftlab.files import load_safetensors, replace_dir, write_json_atomic

log = logging.getLogger("peftlab")

WEIGHTS = "trainable.safetensors"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"

# Settings a resumed run may change: where results go, logging and checkpoint frequency,
# trackers and the token cache; none of them changes what is trained.
RESUME_SAFE_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "overwrite",
        "data.data_dir",
        "data.token_cache",
        "train.log_every",
        "train.save_every",
        "train.tensorboard",
        "train.mlflow",
    }
)


@dataclass
class TrainState:
    """Where a training run stands: what the native loop needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed: float = 0.0  # seconds trained before this process (resumed runs)
    losses: list[dict] = field(default_factory=list)  # {"step", "loss"} at each log
    validation: list[dict] = field(default_factory=list)  # {"step", "val_loss", ...} per round
    best: float | None = None  # best value of train.metric_for_best so far
    best_step: int | None = None
    bad_rounds: int = 0  # validation rounds since the best one
    early_stopped: bool = False
    config: dict | None = None  # the run's settings (RunConfig.to_dict()), to refuse a changed resume

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        """From state.json; keys this version does not know are ignored (newer files)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def trainable_state(model) -> dict:
    """The parameters being trained (LoRA weights and head; every weight for `full`)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(path: Path, model, state: dict, optimizer=None, scheduler=None, rng_states: list | None = None) -> None:
    """Write a checkpoint folder atomically: weights, optimizer/scheduler/RNG (when given)
    and `state` (a TrainState's dict, or a short note for the best checkpoint) as JSON."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(trainable_state(model), tmp / WEIGHTS)
        if optimizer is not None:
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": rng_states or [torch.get_rng_state()],
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                tmp / OPTIMIZER,
            )
        write_json_atomic(tmp / STATE, state)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights(path: Path, model) -> None:
    """Copy a checkpoint's weights into `model`. Raises PeftlabError for a broken file or
    weights that do not fit the model."""
    weights = load_safetensors(path / WEIGHTS, "start the run again with --overwrite")
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise PeftlabError(
            f"checkpoint {path} does not fit this model ({missing[0]} unknown): resume with the run's own config"
        )
    wrong = [n for n, v in weights.items() if v.shape != params[n].shape]
    if wrong:
        raise PeftlabError(
            f"checkpoint {path} does not fit this model ({wrong[0]} has shape "
            f"{tuple(weights[wrong[0]].shape)}, the model {tuple(params[wrong[0]].shape)}): "
            f"resume with the run's own config"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load(path: Path, model, optimizer, scheduler, rank: int = 0) -> TrainState:
    """Restore weights, optimizer, scheduler and this process's RNG from `path`."""
    try:
        state = TrainState.from_dict(json.loads((path / STATE).read_text()))
        extra = torch.load(path / OPTIMIZER, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run the file's code.
        raise PeftlabError(
            f"checkpoint {path / OPTIMIZER} holds objects other than tensors, which "
            f"peftlab never loads (they could run code): start the run again with --overwrite"
        ) from None
    except (OSError, json.JSONDecodeError, RuntimeError, EOFError, TypeError) as exc:
        raise PeftlabError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}): start the run again with --overwrite"
        ) from None
    load_weights(path, model)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra["torch_rng"]
    if rank >= len(rngs):
        raise PeftlabError(f"checkpoint {path} was written by {len(rngs)} processes: resume with the same number")
    torch.set_rng_state(rngs[rank])
    if extra["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    return state


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def check_resume_config(path: Path, config: dict) -> None:
    """Refuse to resume from checkpoint `path` with settings (`config`: RunConfig.to_dict())
    other than those it was trained with, except RESUME_SAFE_KEYS: the run would silently
    mix both. Raises PeftlabError naming the keys."""
    try:
        saved = json.loads((path / STATE).read_text()).get("config")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise PeftlabError(f"checkpoint {path / STATE} is unreadable: start the run again with --overwrite") from None
    if saved is None:  # written before checkpoints recorded their config
        return
    before, now = _flat(saved), _flat(config)
    changed = [
        k for k in sorted(before.keys() | now.keys()) if k not in RESUME_SAFE_KEYS and before.get(k) != now.get(k)
    ]
    if changed:
        what = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise PeftlabError(
            f"cannot resume: the run's settings changed since its last checkpoint ({what}): "
            f"put them back in its config.yaml, or start a new run"
        )
