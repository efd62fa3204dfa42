"""Adapter directories: save, load back and check, as one self-describing unit.

An adapter directory holds what PEFT writes (`adapter_config.json`,
`adapter_model.safetensors`, loadable with plain `PeftModel.from_pretrained`) plus
`peftlab.json`: base model, label names, method config, data fingerprint, metrics, package
versions and a SHA-256 of every weight file. What the folder holds follows the method's
registry entry (`MethodSpec.artifact`): peft adapter files, a complete model for `full`
(`model.safetensors` + config + tokenizer), or only `head.safetensors` for `head` and
`bitfit` (the weights they trained: the head, and for bitfit every bias).
Directories are written under a temporary name and renamed into place, so a crash never
leaves a half-written adapter where a good one was.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.files import dir_size, load_safetensors, replace_dir, sha256_file, write_json_atomic
from peftlab.methods.registry import METHODS, MethodSpec

log = logging.getLogger("peftlab")

META_FILE = "peftlab.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("peftlab", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def save_adapter(model, adapter_dir: Path, meta: dict, tokenizer=None) -> Path:
    """Save the trained parameters and `peftlab.json` to `adapter_dir` atomically.

    `meta` must hold at least `method` (a dict with `name`), `base_model`, `label_names`.
    """
    from safetensors import SafetensorError

    adapter_dir = Path(adapter_dir)
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=f".{adapter_dir.name}.tmp-"))
    method = meta["method"]["name"]
    try:
        _write_adapter(model, tmp, meta, tokenizer)
        replace_dir(tmp, adapter_dir)
    except (OSError, SafetensorError) as exc:
        # A full disk surfaces as safetensors' IoError text: name the cause, not the library.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0][:120]
        raise PeftlabError(
            f"could not write the adapter to {adapter_dir} ({reason}): free disk space (or fix "
            f"permissions) and run again; an earlier adapter there is unchanged"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved %s adapter to %s (%.2f MB)", method, adapter_dir, dir_size(adapter_dir) / 1e6)
    return adapter_dir


def _write_adapter(model, tmp: Path, meta: dict, tokenizer) -> None:
    """The adapter's files, written into the fresh folder `tmp` (see save_adapter)."""
    method = meta["method"]["name"]
    spec = METHODS.get(method)
    if spec is None:
        raise PeftlabError(f"cannot save method {method!r}: it is not a known method (`peftlab methods` lists them)")
    if spec.artifact == "peft":
        model.save_pretrained(tmp)
    elif spec.artifact == "full":
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        # Only what trained (the head, for bitfit also the biases) over the frozen base.
        from safetensors.torch import save_file

        heads = meta["head_modules"]
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if spec.trains(k, heads)}
        save_file(state, tmp / HEAD_FILE)
    weights = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "versions": package_versions(),
        "weights_sha256": {name: sha256_file(tmp / name) for name in weights},
    }
    write_json_atomic(tmp / META_FILE, meta)


def read_meta(adapter_dir: Path) -> dict:
    """Read and check `peftlab.json`; raises PeftlabError naming what is wrong."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise PeftlabError(f"adapter folder {adapter_dir} does not exist: check the path")
    if (adapter_dir / "adapter" / META_FILE).is_file():  # a run directory was given
        adapter_dir = adapter_dir / "adapter"
    meta_path = adapter_dir / META_FILE
    if not meta_path.is_file() and (adapter_dir / "config.yaml").is_file():
        raise _unfinished_run(adapter_dir)
    if not meta_path.is_file():
        raise PeftlabError(
            f"{adapter_dir} is not a peftlab adapter folder (no {META_FILE}): give the adapter "
            f"folder of a run, e.g. runs/<name>/adapter"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftlabError(f"{meta_path} is corrupted (not valid JSON): retrain or restore it") from None
    if not isinstance(meta, dict):
        raise PeftlabError(f"{meta_path} is corrupted (not a JSON object): retrain or restore it")
    missing = [k for k in ("base_model", "label_names", "method") if k not in meta]
    if missing:
        raise PeftlabError(f"{meta_path} lacks {missing}: it was not written by peftlab")
    _check_format_version(meta, meta_path)
    meta["_dir"] = str(adapter_dir)
    if not isinstance(meta.get("weights_sha256"), dict) or not meta["weights_sha256"]:
        log.warning(
            "%s records no weight checksums (weights_sha256): the adapter's weights are not verified", meta_path
        )
    for name, digest in (meta.get("weights_sha256") or {}).items():
        path = adapter_dir / name
        if not path.is_file():
            raise PeftlabError(f"adapter weights {path} are missing: the adapter folder is incomplete")
        if sha256_file(path) != digest:
            raise PeftlabError(
                f"adapter weights {path} do not match their checksum in {META_FILE}: "
                f"the file is corrupted; retrain or restore it"
            )
    return meta


def _check_format_version(meta: dict, meta_path: Path) -> None:
    version = meta.get("format_version", 1)  # the first adapters wrote none
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PeftlabError(
            f"{meta_path} was written by a newer peftlab (adapter format {version}, this one reads up "
            f"to {FORMAT_VERSION}): upgrade peftlab"
        )


def _unfinished_run(run_dir: Path) -> PeftlabError:
    """The error for a run folder that holds no adapter yet: what happened and what to do."""
    failed = run_dir / "FAILED.txt"
    if failed.is_file():
        why = failed.read_text(errors="replace").strip().splitlines()[0][:160]
        return PeftlabError(f"run {run_dir} failed ({why}), so it has no adapter: fix that and run it again")
    if (run_dir / "checkpoints" / "last").is_dir():
        return PeftlabError(
            f"run {run_dir} is unfinished (no adapter yet): continue it with `peftlab run --resume {run_dir}`"
        )
    return PeftlabError(
        f"run {run_dir} has no adapter yet: it is still running, or was stopped before its first "
        f"checkpoint (then run it again)"
    )


def _check_adapter_config(adapter_dir: Path) -> None:
    """peft reads adapter_config.json first; a broken one would surface as a base-model mismatch."""
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise PeftlabError(
            f"adapter {adapter_dir} has no adapter_config.json: the adapter folder is incomplete; retrain or restore it"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftlabError(f"{path} is corrupted (not valid JSON): retrain or restore the adapter") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise PeftlabError(f"{path} is not a peft adapter config (no peft_type): retrain or restore the adapter")


def load_adapter(
    adapter_dir: Path,
    model_name: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a fresh base model with the saved adapter and head applied.

    Returns (model in eval mode, tokenizer, meta). `model_name` overrides the base model
    recorded in `peftlab.json` (e.g. when the base lives elsewhere on this machine).
    """
    from peftlab.config import ModelConfig
    from peftlab.models import base_fingerprint, load_model, load_tokenizer, resolve

    meta = read_meta(adapter_dir)
    adapter_dir = Path(meta["_dir"])
    _refuse_pickles(adapter_dir, allow_pickle)
    spec = _method_spec(meta)
    labels = meta["label_names"]
    base = model_name or meta["base_model"]
    if spec.artifact == "full":
        model, tokenizer, _ = load_model(
            ModelConfig(
                name=str(adapter_dir), dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
            ),
            len(labels),
            labels,
            tokenizer=load_tokenizer(resolve(base), trust_remote_code)
            if not (adapter_dir / "tokenizer_config.json").is_file()
            else None,
        )
    else:
        model, tokenizer, _ = load_model(
            ModelConfig(
                name=base,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                quantization=meta.get("quantization", "none"),
            ),
            len(labels),
            labels,
        )
        _check_base(meta, base, base_fingerprint(model))
        if spec.artifact == "peft":
            model = _load_peft(model, adapter_dir, spec, base, meta["base_model"])
        else:
            _load_head(model, adapter_dir, base)
    model.eval()
    return model, tokenizer, meta


def attach_adapter(model, adapter_dir: Path, *, name: str | None = None, allow_pickle: bool = False):
    """Apply the peft adapter in `adapter_dir` to `model` in place of loading a fresh base,
    after the checks load_adapter makes (checksums, no pickle unless allowed, known method,
    base fingerprint); the base weights stay where they are.

    `model` is a base model from `models.load_model` (the result is a PeftModel holding the
    adapter as 'default'), or a PeftModel from an earlier call, to which the adapter is added
    as the named adapter `name` (then `set_adapter(name)` selects it). Each adapter gets its
    own classification head, shaped for its own labels. Returns (model in eval mode, meta).
    Raises PeftlabError as load_adapter does, and for adapters that are not peft adapters.
    """
    from peftlab.models import base_fingerprint

    meta = read_meta(adapter_dir)
    adapter_dir = Path(meta["_dir"])
    _refuse_pickles(adapter_dir, allow_pickle)
    spec = _method_spec(meta)
    if spec.artifact != "peft" or (name is not None and spec.family == "prompt"):
        raise PeftlabError(
            f"{spec.name} adapters cannot be added to a shared base model as named adapters: "
            f"load {adapter_dir} on its own model (load_adapter)"
        )
    _check_base(meta, meta["base_model"], base_fingerprint(model))
    _check_adapter_config(adapter_dir)
    _fit_heads(model, adapter_dir, name)
    model = _load_peft(model, adapter_dir, spec, meta["base_model"], meta["base_model"], name)
    model.eval()
    return model, meta


def _fit_heads(model, adapter_dir: Path, name: str | None) -> None:
    """Shape the head modules the adapter saves (its modules_to_save) for its own labels:
    heads of adapters sharing one base differ in their number of labels. For a named
    adapter the head is a fresh copy that peft then fills (it keeps one per adapter)."""
    import copy

    import torch
    from safetensors import safe_open

    heads = json.loads((adapter_dir / "adapter_config.json").read_text()).get("modules_to_save") or []
    weights = adapter_dir / "adapter_model.safetensors"
    if not heads or not weights.is_file():
        return
    with safe_open(str(weights), "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not iterable)
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {n for n, _ in hf.named_modules()}
    # peft lists every head name a task type may have (classifier, score), present or not.
    for head in dict.fromkeys(h for h in heads if h in present):
        module = hf.get_submodule(head)
        if name is not None and not hasattr(module, "modules_to_save"):
            raise PeftlabError(
                f"adapter {adapter_dir} saves head {head!r}, which the shared model does not keep per "
                f"adapter: load it on its own model (load_adapter)"
            )
        target = copy.deepcopy(module.original_module) if name is not None else module
        # Saved as base_model.model.<head>.* (tuners) or base_model.<head>.* (prompt methods).
        prefixes = (f"base_model.model.{head}.", f"base_model.{head}.")
        for key, shape in shapes.items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                continue
            owner_name, _, param_name = key[len(prefix) :].rpartition(".")
            owner = target.get_submodule(owner_name)
            param = getattr(owner, param_name)
            if tuple(param.shape) != shape:
                setattr(owner, param_name, torch.nn.Parameter(param.new_empty(shape), requires_grad=False))
                if isinstance(owner, torch.nn.Linear) and param_name == "weight":
                    owner.out_features, owner.in_features = shape
        if name is not None:
            module.modules_to_save[name] = target


def _refuse_pickles(adapter_dir: Path, allow_pickle: bool) -> None:
    pickles = sorted(p.name for p in adapter_dir.glob("*.bin"))
    if pickles and not allow_pickle:
        raise PeftlabError(
            f"adapter {adapter_dir} holds pickle weights ({pickles[0]}), which can run code when "
            f"loaded: pass --allow-pickle only if you trust the file"
        )


def _method_spec(meta: dict) -> MethodSpec:
    """The registry entry of the method recorded in `meta` (read_meta's), or a PeftlabError."""
    method = meta["method"].get("name") if isinstance(meta["method"], dict) else None
    if method not in METHODS:
        raise PeftlabError(
            f"{meta['_dir']}: unknown method {method!r} in {META_FILE}: it was written by another "
            f"peftlab version or edited; retrain or restore it"
        )
    return METHODS[method]


def _load_peft(model, adapter_dir: Path, spec: MethodSpec, base: str, trained_on: str, name: str | None = None):
    """`model` with the peft adapter in `adapter_dir` applied (and prompt pooling fixed), or,
    with `name`, added to the PeftModel `model` as that named adapter."""
    from peft import PeftModel
    from safetensors import SafetensorError

    from peftlab.methods.prompt import accept_past_key_values, fix_prompt_pooling

    _check_adapter_config(adapter_dir)
    if spec.past_key_values and name is None:
        accept_past_key_values(model)
    try:
        if name is None:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        else:
            model.load_adapter(str(adapter_dir), adapter_name=name)
    except (SafetensorError, OSError) as exc:
        raise PeftlabError(
            f"adapter weights in {adapter_dir} are unreadable ({str(exc)[:100]}): the file is "
            f"truncated or corrupted; retrain or restore it"
        ) from None
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise PeftlabError(
            f"adapter {adapter_dir} does not fit base model {base!r} ({first}): load it on "
            f"the base model it was trained on ({trained_on})"
        ) from None
    if name is None:
        fix_prompt_pooling(model)
    return model


def _load_head(model, adapter_dir: Path, base: str) -> None:
    """Put the weights in `adapter_dir`'s head.safetensors (head, biases) into `model`."""
    state = load_safetensors(adapter_dir / HEAD_FILE, "retrain or restore the adapter")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise PeftlabError(f"head weights in {adapter_dir} do not fit {base!r}")


def _check_base(meta: dict, base: str, fingerprint: str) -> None:
    """Refuse a base model whose architecture differs from the adapter's (pitfall 8: head and
    adapter shapes), saying which of the two changed."""
    expected = meta.get("base_model_fingerprint")
    if not expected or fingerprint == expected:
        return
    if base == meta["base_model"]:
        raise PeftlabError(
            f"base model {base!r} is not the one adapter {meta['_dir']} was trained on: its architecture "
            f"fingerprint is {fingerprint}, the adapter's {expected}; restore that base model or retrain"
        )
    raise PeftlabError(
        f"adapter {meta['_dir']} was trained on base model {meta['base_model']!r} (fingerprint {expected}), "
        f"but {base!r} has fingerprint {fingerprint}: load it on its own base model (--model {meta['base_model']})"
    )


def export_merged(adapter_dir: Path, out_dir: Path, *, overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Write a standalone model: the adapter merged into its base weights (safetensors), the
    tokenizer and the label names, loadable with plain `AutoModelForSequenceClassification`.

    Raises PeftlabError for methods that cannot merge (prompt methods add virtual tokens
    at every call), quantized bases, or an existing `out_dir` without `overwrite`.
    """
    meta = read_meta(adapter_dir)
    spec = _method_spec(meta)
    method = spec.name
    if not spec.mergeable:
        raise PeftlabError(
            f"{method} adapters cannot be merged into the base weights (their virtual tokens are added at "
            f"every call): use the adapter as it is (peftlab predict, or PeftModel.from_pretrained)"
        )
    if meta.get("quantization", "none") != "none":
        raise PeftlabError(
            f"this adapter was trained on a {meta['quantization']} quantized base, and merging into quantized "
            f"weights would round the update away: merge it on a GPU machine into a bf16 base with peft"
        )
    out_dir = Path(os.path.abspath(out_dir))  # "." has no name to build temporary names from
    _check_export_dir(out_dir, overwrite)
    model, tokenizer, meta = load_adapter(Path(meta["_dir"]), allow_pickle=allow_pickle)
    if hasattr(model, "merge_and_unload"):
        # Folds the update into the base weights and swaps the head wrapper for the trained head.
        model = model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.iterdir() if p.suffix == ".safetensors")
        write_json_atomic(
            tmp / "peftlab-export.json",
            {
                "exported_from": meta["_dir"],
                "base_model": meta["base_model"],
                "method": meta["method"],
                "label_names": meta["label_names"],
                "metrics": meta.get("metrics"),
                "versions": package_versions(),
                "weights_sha256": {name: sha256_file(tmp / name) for name in weights},
            },
        )
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "exported %s (merged %s adapter) to %s (%.1f MB)", meta["base_model"], method, out_dir, dir_size(out_dir) / 1e6
    )
    return out_dir


def _check_export_dir(out_dir: Path, overwrite: bool) -> None:
    """An export goes to a new or empty folder, or replaces an earlier export with `overwrite`:
    never a link, nor a folder that holds anything else."""
    if out_dir.is_symlink():
        raise PeftlabError(
            f"export folder {out_dir} is a symbolic link: peftlab neither writes nor deletes "
            f"through links; choose another folder"
        )
    if out_dir == Path.cwd() or out_dir in Path.cwd().parents:
        raise PeftlabError(f"export folder {out_dir} is the current folder or holds it: choose a new folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise PeftlabError(f"export folder {out_dir} is a file: choose another folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / "peftlab-export.json").is_file():
        raise PeftlabError(
            f"export folder {out_dir} is not empty and holds no earlier export: peftlab replaces only "
            f"an earlier export, --overwrite or not; choose a new folder"
        )
    if not overwrite:
        raise PeftlabError(
            f"export folder {out_dir} already holds an export: pass --overwrite to replace it or choose another folder"
        )
