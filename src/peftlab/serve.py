"""`peftlab serve`: trained classifiers behind one HTTP server, with dynamic batching.

One process holds each base model once and answers for every adapter trained on it.
Adapters recorded with the same base model and base fingerprint share its weights: those
of one peft type (LoRA and its variants, IA3, LoHa, LoKr) are peft *named adapters* of one
model, each with its own classification head; the others (prompt methods, other peft
types) get their own module tree whose base weights are the very same tensors. Only full
fine-tunes and head/bitfit artifacts (whose weights are not an adapter over the base) load
a model of their own.

Requests are queued, then grouped by adapter into batches of at most `max_batch_tokens`
padded tokens, sorted by length so padding stays small; texts queued while a forward pass
runs form the next batch, and a batch may wait `max_wait_ms` (counted from its first
request, 0 by default) for more. Where the model allows, a batch's texts are packed into
shared rows without padding (peftlab.models.PackedForward). The model runs in one worker
thread (one forward at a time), tokenization in another, so the event loop only routes.

The app is FastAPI (pydantic request models, OpenAPI page at /docs) on uvicorn:
`create_app(...)` builds it for any ASGI server; `peftlab serve` runs it on 127.0.0.1
unless told otherwise. Every error is JSON `{"error": "..."}` saying what to change:
400 body not JSON · 401 admin token missing or wrong · 403 admin routes off · 404 unknown
adapter or route · 405 wrong method · 409 adapter name taken, or the default adapter ·
413 body, text or number of texts over the limits · 422 JSON that is not the request's
schema, or texts the adapter cannot take (empty, pairs for a single-text adapter, ...) ·
429 queue full. fastapi, uvicorn and prometheus_client are imported only here
(`pip install "peftlab[serve]"`).
"""

# No `from __future__ import annotations` here: FastAPI reads the request models from the
# route functions' annotations, and those models are built inside functions (pydantic is
# an optional extra), which only works with annotations evaluated when defined.

import asyncio
import contextlib
import copy
import hmac
import importlib.util
import itertools
import json
import logging
import os
import re
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

from peftlab import artifacts
from peftlab.config import ModelConfig
from peftlab.data import PackCollator, PadCollator
from peftlab.engines.native import packing_gap
from peftlab.errors import PeftlabError
from peftlab.experiment import check_texts, encode_texts
from peftlab.methods.registry import METHODS
from peftlab.metrics import softmax
from peftlab.models import PackedForward, load_model
from peftlab.report import load_run_report
from peftlab.runtime import LowPrecisionWeights, autocast, resolve_device, resolve_precision

log = logging.getLogger("peftlab")

# Names appear in URLs and metrics, never in paths: letters, digits, '.', '_', '-'.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# peft types whose adapters live side by side as named adapters of one model (one active
# at a time); other types get a module tree of their own over the same base tensors.
NAMED_PEFT_TYPES = frozenset({"LORA", "IA3", "LOHA", "LOKR"})
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")
# Requests with up to this many characters are tokenized on the event loop (a fraction of a
# millisecond); handing them to a thread would cost more than that in GIL hand-offs.
INLINE_TOKENIZE_CHARS = 2000
# What one more forward pass costs beyond its tokens, in tokens' worth of compute (module
# calls, kernel launches, thread wake-ups): the price at which splitting a batch by length
# stops paying. This is the guess until the server has timed its own forward passes.
FORWARD_OVERHEAD_TOKENS = 128


@dataclass
class ServeSettings:
    """How the server batches, bounds requests and computes (`peftlab serve --help`)."""

    max_batch_tokens: int = 8192  # padded tokens (texts x longest) per forward pass
    # How long a batch's first request may wait for company. 0: continuous batching, what
    # queued during the last forward pass is the next batch (waiting only idles the model).
    max_wait_ms: float = 0.0
    batching: bool = True  # False: every text is its own forward pass (batch of one)
    packing: bool = True  # a batch's texts share rows, unpadded, where the model allows; False: padded
    max_texts: int = 128  # texts per request
    max_chars: int = 20_000  # characters per text (and per second text)
    max_body_bytes: int = 1 << 20  # request body size
    max_queued_texts: int = 4096  # texts waiting for the model before requests get 429
    precision: str = "auto"  # as `peftlab predict`: bf16 where the CPU or GPU runs it natively, else fp32
    device: str = "auto"
    threads: Optional[int] = None  # torch's CPU threads for forward passes; None: torch's default
    allow_pickle: bool = False  # load pickle weight files (only if trusted)
    admin_token: Optional[str] = None  # None: $PEFTLAB_ADMIN_TOKEN; unset or empty: admin routes off

    def validate(self) -> None:
        """Raise PeftlabError naming every out-of-range setting."""
        problems = [
            f"{name}={getattr(self, name)} must be a whole number of at least 1"
            for name in ("max_batch_tokens", "max_texts", "max_chars", "max_body_bytes", "max_queued_texts")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 60_000:
            problems.append(f"max_wait_ms={self.max_wait_ms} must be between 0 and 60000")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision={self.precision!r} is not one of auto, fp32, bf16, fp16")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            problems.append(f"threads={self.threads} must be a whole number of at least 1")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            problems.append(f"device={self.device!r} is not one of auto, cpu, cuda, mps")
        if problems:
            raise PeftlabError("; ".join(problems))

    @classmethod
    def from_json(cls, text: str) -> "ServeSettings":
        """Settings from a JSON object of field names (PEFTLAB_SERVE_SETTINGS)."""
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PeftlabError(f"serve settings are not valid JSON ({exc.msg}): give a JSON object") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known) if isinstance(values, dict) else None
        if unknown is None or unknown:
            raise PeftlabError(f"serve settings must be a JSON object of {sorted(known)}; unknown: {unknown}")
        return cls(**values)


def serve_stack_missing() -> list[str]:
    """The packages of the serve extra that are not installed."""
    return [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]


def _require_serve_stack() -> None:
    missing = serve_stack_missing()
    if missing:
        raise PeftlabError(f'peftlab serve needs {", ".join(missing)}: pip install "peftlab[serve]"')


# --- adapters and the models they live in ------------------------------------------------


@dataclass(eq=False)
class _Base:
    """One base model's weights, loaded once. `template` is never wrapped by peft: each
    group's module tree is a copy of it that shares its tensors."""

    key: tuple[str, str]  # (base model, fingerprint)
    template: Any
    tokenizer: Any
    groups: dict = field(default_factory=dict)  # group key -> _Group


@dataclass(eq=False)
class _Group:
    """A module tree over a base's weights, holding one or more named peft adapters."""

    base: _Base
    key: str
    model: Any
    members: dict = field(default_factory=dict)  # served name -> peft adapter name
    active: str = "default"
    added: int = 0


@dataclass(eq=False)
class ServedAdapter:
    """An adapter the server answers for: the model it runs in and how to select it."""

    name: str
    meta: dict  # its peftlab.json (read_meta)
    model: Any
    tokenizer: Any
    collator: PadCollator
    group: Optional[_Group]  # the shared tree it is a named adapter of; None: a model of its own
    metrics: Optional[dict]  # test metrics from the run's report.json (else peftlab.json)
    run_dir: Optional[str]

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]

    @property
    def takes_pairs(self) -> bool:
        return bool(self.meta.get("data", {}).get("text_pair_column"))


def _share_weights(model):
    """A copy of `model`'s modules whose parameters and buffers are the same tensors."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _peft_type(adapter_dir: Path) -> Optional[str]:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None  # attach_adapter names the problem


def _run_metrics(meta: dict) -> tuple[Optional[dict], Optional[str]]:
    """Test metrics of the adapter's run (report.json beside adapter/), else those in peftlab.json."""
    run_dir = Path(meta["_dir"]).parent
    if (run_dir / "report.json").is_file():
        try:
            tuned = load_run_report(run_dir).get("finetuned") or {}
            return {k: tuned[k] for k in ("accuracy", "macro_f1", "loss") if k in tuned}, str(run_dir)
        except PeftlabError as exc:
            log.warning("serve: %s; using the metrics in peftlab.json", exc)
    return meta.get("metrics"), None


class AdapterRegistry:
    """The adapters a server answers for and the models they live in (see the module doc).
    Not thread-safe: the server calls add, remove and activate from its model thread only."""

    def __init__(self, device: torch.device, allow_pickle: bool = False):
        self.device, self.allow_pickle = device, allow_pickle
        self.adapters: dict[str, ServedAdapter] = {}
        self.bases: dict[tuple[str, str], _Base] = {}

    def add(self, name: str, path) -> ServedAdapter:
        """Load (and verify, as `peftlab predict` does) the adapter or run folder `path` as `name`."""
        if not ADAPTER_NAME.fullmatch(name):
            raise PeftlabError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_', '-' (up to 64)")
        if name in self.adapters:
            raise PeftlabError(f"an adapter named {name!r} is already served: choose another name")
        meta = artifacts.read_meta(Path(path))
        method = meta["method"].get("name") if isinstance(meta["method"], dict) else None
        spec = METHODS.get(method)  # unknown: load_adapter names the problem
        if spec is not None and spec.artifact == "peft" and meta.get("quantization", "none") == "none":
            served = self._add_shared(name, Path(meta["_dir"]), meta, spec.family == "prompt")
        else:
            # Full fine-tunes and head/bitfit weights replace base tensors: a model of their own.
            model, tokenizer, meta = artifacts.load_adapter(Path(path), allow_pickle=self.allow_pickle)
            served = self._served(name, meta, model.to(self.device), tokenizer, None)
        self.adapters[name] = served
        return served

    def _served(self, name, meta, model, tokenizer, group) -> ServedAdapter:
        metrics, run_dir = _run_metrics(meta)
        collator = PadCollator(tokenizer.pad_token_id, tokenizer.padding_side)
        return ServedAdapter(name, meta, model, tokenizer, collator, group, metrics, run_dir)

    def _add_shared(self, name: str, adapter_dir: Path, meta: dict, prompt: bool) -> ServedAdapter:
        base = self._base(meta)
        peft_type = _peft_type(adapter_dir)
        key = peft_type if peft_type in NAMED_PEFT_TYPES and not prompt else f"{peft_type}:{name}"
        group = base.groups.get(key)
        try:
            if group is None:
                model, meta = artifacts.attach_adapter(
                    _share_weights(base.template), adapter_dir, allow_pickle=self.allow_pickle
                )
                group = base.groups[key] = _Group(base, key, model.to(self.device))
                peft_name = "default"
            else:
                group.added += 1
                peft_name = f"adapter{group.added}"
                self._attach_named(group, adapter_dir, peft_name)
        finally:
            if not base.groups:  # the first adapter of a new base failed to load
                del self.bases[base.key]
        group.members[name] = peft_name
        return self._served(name, meta, group.model, base.tokenizer, group)

    def _attach_named(self, group: _Group, adapter_dir: Path, peft_name: str) -> None:
        try:
            artifacts.attach_adapter(group.model, adapter_dir, name=peft_name, allow_pickle=self.allow_pickle)
        except BaseException:
            # Leave no half-loaded adapter (weights, head copy) behind in the shared model.
            if peft_name in group.model.peft_config:
                group.model.delete_adapter(peft_name)
                group.active = group.model.active_adapter
            for module in group.model.modules():
                heads = getattr(module, "modules_to_save", None)
                if isinstance(heads, torch.nn.ModuleDict) and peft_name in heads:
                    del heads[peft_name]
            raise
        group.model.to(self.device)  # the new adapter's weights; shared tensors are already there

    def _base(self, meta: dict) -> _Base:
        key = (meta["base_model"], meta.get("base_model_fingerprint") or "")
        if key not in self.bases:
            labels = meta["label_names"]
            model, tokenizer, _ = load_model(
                ModelConfig(name=meta["base_model"], dtype="fp32", allow_pickle=self.allow_pickle), len(labels), labels
            )
            self.bases[key] = _Base(key, model.to(self.device).eval(), tokenizer)
        return self.bases[key]

    def remove(self, name: str) -> None:
        """Stop serving `name` and free what only it used (its weights; a base no adapter uses)."""
        served = self.adapters.pop(name)
        group = served.group
        if group is None:
            return
        peft_name = group.members.pop(name)
        if group.members:
            group.model.delete_adapter(peft_name)
            group.active = group.model.active_adapter
            return
        del group.base.groups[group.key]
        if not group.base.groups:
            del self.bases[group.base.key]

    def activate(self, served: ServedAdapter) -> None:
        """Make `served` the active named adapter of its shared model (before its forward pass)."""
        group = served.group
        if group is not None and group.active != group.members[served.name]:
            group.model.set_adapter(group.members[served.name])
            group.active = group.members[served.name]

    def parameter_bytes(self) -> int:
        """Bytes of parameter and buffer storage across every model held, shared tensors once."""
        models = [base.template for base in self.bases.values()]
        models += [group.model for base in self.bases.values() for group in base.groups.values()]
        models += [served.model for served in self.adapters.values() if served.group is None]
        storages = {}
        for tensor in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in models):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def describe(self, served: ServedAdapter) -> dict:
        """What GET /v1/adapters says about an adapter."""
        meta = served.meta
        sharing = served.group.base.key if served.group else None
        return {
            "name": served.name,
            "base_model": meta["base_model"],
            "base_fingerprint": meta.get("base_model_fingerprint"),
            "method": meta["method"].get("name") if isinstance(meta["method"], dict) else None,
            "labels": served.label_names,
            "pairs": served.takes_pairs,
            "max_length": meta.get("max_length"),
            "dataset": meta.get("data", {}).get("dataset"),
            "metrics": served.metrics,
            "adapter_dir": meta["_dir"],
            "run_dir": served.run_dir,
            "shares_base_with": sorted(
                n
                for n, other in self.adapters.items()
                if n != served.name and other.group and sharing == other.group.base.key
            ),
        }


def adapter_names(paths: Sequence = (), named: Sequence[str] = ()) -> dict[str, str]:
    """Name each adapter to serve: `named` holds NAME=PATH entries; a plain path is named
    after its run folder (runs/spam or runs/spam/adapter: 'spam'). Raises PeftlabError for
    names that collide or are not allowed."""
    return _name_all([(None, str(p)) for p in paths] + [_split_named(e) for e in named])


def _split_named(entry: str) -> tuple[str, str]:
    name, sep, path = entry.partition("=")
    if not sep or not name or not path:
        raise PeftlabError(f"{entry!r} is not NAME=PATH: e.g. spam=runs/minilm-sms_spam-lora")
    return name, path


def _name_all(entries: list) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, path in entries:
        if name is None:
            folder = Path(os.path.abspath(path))
            folder = folder.parent if folder.name == "adapter" else folder
            name = re.sub(r"[^A-Za-z0-9._-]", "-", folder.name).lstrip("._-")[:64] or "adapter"
        if not ADAPTER_NAME.fullmatch(name):
            raise PeftlabError(f"adapter name {name!r} is not allowed: use letters, digits, '.', '_', '-' (up to 64)")
        if name in out:
            raise PeftlabError(f"two adapters would be named {name!r}: name them apart (NAME=PATH)")
        out[name] = path
    return out


# --- dynamic batching ----------------------------------------------------------------------


class AdapterGone(PeftlabError):
    """The adapter was removed while its request waited."""


@dataclass(eq=False)
class _Job:
    """One request's tokenized texts, waiting for their logits."""

    adapter: str
    examples: list
    future: asyncio.Future
    arrived: float  # loop time
    tokens: int
    logits: list = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self):
        self.logits = [None] * len(self.examples)
        self.remaining = len(self.examples)


def _padded(n: int) -> int:
    return -(-n // 8) * 8  # PadCollator pads to a multiple of 8


def plan_batches(lengths: Sequence[int], max_tokens: int, overhead: int = FORWARD_OVERHEAD_TOKENS) -> list:
    """Cut texts of `lengths` (tokens, longest first) into batches, as (start, end) ranges of
    at most `max_tokens` padded tokens each, choosing the cuts that minimise padded tokens
    plus `overhead` per forward pass: every position padded up to a batch's longest text is
    computed for nothing, and each forward pass costs about `overhead` tokens on top."""
    runs: list[list[int]] = []  # [start, end, padded width]: texts of one padded width
    for i, n in enumerate(lengths):
        if runs and runs[-1][2] == _padded(n):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, _padded(n)])
    # best[b]: cheapest cost of the first b runs; a batch is runs a..b-1, as wide as run a.
    best, cut = [0.0] + [float("inf")] * len(runs), [0] * (len(runs) + 1)
    for b in range(1, len(runs) + 1):
        for a in range(b):
            count, width = runs[b - 1][1] - runs[a][0], runs[a][2]
            forwards = -(-count // max(1, max_tokens // width))
            cost = best[a] + count * width + overhead * forwards
            if cost < best[b]:
                best[b], cut[b] = cost, a
    out, b = [], len(runs)
    while b > 0:
        start, end, width = runs[cut[b]][0], runs[b - 1][1], runs[cut[b]][2]
        per = max(1, max_tokens // width)
        out[:0] = [(i, min(i + per, end)) for i in range(start, end, per)]
        b = cut[b]
    return out


class ForwardCost:
    """Forward-pass time as overhead + seconds per padded token, fitted to the last forward
    passes (the figures differ by model, precision, hardware and load)."""

    def __init__(self, window: int = 64, least: int = 16):
        self.samples: deque = deque(maxlen=window)
        self.least = least

    def add(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def overhead_tokens(self) -> int:
        """A forward pass's fixed cost in tokens' worth (FORWARD_OVERHEAD_TOKENS until fitted)."""
        if len(self.samples) < self.least:
            return FORWARD_OVERHEAD_TOKENS
        tokens, seconds = np.array(self.samples, dtype=float).T
        if tokens.std() < 1:
            return FORWARD_OVERHEAD_TOKENS
        per_token, overhead = np.polyfit(tokens, seconds, 1)
        if per_token <= 0:
            return FORWARD_OVERHEAD_TOKENS
        return int(np.clip(overhead / per_token, 8, 4096))


class Batcher:
    """Groups queued texts by adapter into batches (see the module doc) and runs them one
    at a time through `forward(adapter name, examples) -> logits` in the model thread."""

    def __init__(self, forward: Callable, settings: ServeSettings, metrics, packs: Callable = lambda adapter: False):
        self.forward, self.settings, self.metrics = forward, settings, metrics
        self.packs = packs  # adapter name -> whether its batches are packed (cut by real tokens)
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self.executor: Optional[ThreadPoolExecutor] = None
        self.queued_texts = 0
        self.cost = ForwardCost()

    def start(self, executor: ThreadPoolExecutor) -> None:
        self.executor, self.queue = executor, asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(), name="peftlab-batcher")

    async def stop(self) -> None:
        """Finish every queued request, then stop (the queue is first in, first out)."""
        if self.task is not None and not self.task.done():
            self.queue.put_nowait(None)
            await self.task

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, adapter: str, examples: list) -> np.ndarray:
        """Logits for `examples` (tokenized texts) from `adapter`, in order."""
        loop = asyncio.get_running_loop()
        job = _Job(adapter, examples, loop.create_future(), loop.time(), sum(len(e["input_ids"]) for e in examples))
        self._count(len(examples))
        self.queue.put_nowait(job)
        return await job.future

    def _count(self, texts: int) -> None:
        self.queued_texts += texts
        self.metrics.queue.set(self.queued_texts)

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self.queue.get()
            if first is None:
                break
            jobs, stopping = await self._gather(first)
            self._count(-sum(len(job.examples) for job in jobs))
            try:
                await self._process([job for job in jobs if not job.future.done()])
            except Exception as exc:  # never let one bad batch stop the server
                log.exception("serve: batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _gather(self, first: _Job) -> tuple[list, bool]:
        """`first` and the jobs that join it within max_wait_ms of its arrival, up to
        max_batch_tokens; and whether the stop marker came."""
        jobs, tokens = [first], first.tokens
        if not self.settings.batching:
            return jobs, False
        loop = asyncio.get_running_loop()
        deadline = first.arrived + self.settings.max_wait_ms / 1000
        while tokens < self.settings.max_batch_tokens:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if deadline <= loop.time():
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            tokens += job.tokens
        return jobs, False

    async def _process(self, jobs: list) -> None:
        by_adapter = defaultdict(list)
        for job in jobs:
            by_adapter[job.adapter].extend((job, i) for i in range(len(job.examples)))
        for adapter, items in by_adapter.items():
            items.sort(key=lambda item: -len(item[0].examples[item[1]]["input_ids"]))  # longest first
            for batch in self._cut(adapter, items):
                await self._run_batch(adapter, batch)

    def _cut(self, adapter: str, items: list) -> list:
        """Batches of items sorted longest first: packed ones hold up to max_batch_tokens
        tokens; padded ones are cut where padding would cost more (plan_batches)."""
        if not self.settings.batching:
            return [[item] for item in items]
        lengths = [len(job.examples[i]["input_ids"]) for job, i in items]
        if not self.packs(adapter):
            plan = plan_batches(lengths, self.settings.max_batch_tokens, self.cost.overhead_tokens())
            return [items[start:end] for start, end in plan]
        batches, tokens = [[]], 0
        for item, n in zip(items, lengths):
            if batches[-1] and tokens + n > self.settings.max_batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(item)
            tokens += n
        return batches

    async def _run_batch(self, adapter: str, batch: list) -> None:
        live = [(job, i) for job, i in batch if not job.future.done()]  # a client may have gone
        if not live:
            return
        examples = [job.examples[i] for job, i in live]
        packed = self.packs(adapter) and len(examples) > 1
        lengths = [len(e["input_ids"]) for e in examples]
        tokens, started = sum(lengths) if packed else len(lengths) * _padded(lengths[0]), time.perf_counter()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, self.forward, adapter, examples)
        except Exception as exc:
            if not isinstance(exc, AdapterGone):
                log.exception("serve: forward pass of adapter %r failed", adapter)
            for job, _ in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if not packed:
            self.cost.add(tokens, time.perf_counter() - started)
        self.metrics.batch_texts.observe(len(examples))
        self.metrics.batch_tokens.observe(tokens)
        self.metrics.texts.labels(adapter).inc(len(examples))
        for (job, i), row in zip(live, logits):
            job.logits[i] = row
            job.remaining -= 1
            if job.remaining == 0 and not job.future.done():
                job.future.set_result(np.stack(job.logits))


# --- the HTTP server -------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses: its HTTP status and what to change."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _Metrics:
    """The server's Prometheus series, in a registry of its own (several apps per process in tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "peftlab_requests", "HTTP requests, by route and status", ["route", "status"], registry=r
        )
        self.errors = Counter(
            "peftlab_request_errors", "Requests answered with 4xx/5xx", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "peftlab_request_seconds",
            "Request latency, by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_texts = Histogram(
            "peftlab_batch_texts", "Texts per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r
        )
        self.batch_tokens = Histogram(
            "peftlab_batch_tokens",
            "Padded tokens per forward pass",
            buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
            registry=r,
        )
        self.texts = Counter("peftlab_texts", "Texts classified, by adapter", ["adapter"], registry=r)
        self.queue = Gauge("peftlab_queue_texts", "Texts waiting for a forward pass", registry=r)
        self.adapters = Gauge("peftlab_adapters", "Adapters served", registry=r)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)


class _Server:
    """What the routes share: adapters, batcher, limits, metrics, the worker threads."""

    def __init__(self, registry: AdapterRegistry, settings: ServeSettings, default: str, admin_token, precision):
        self.registry, self.settings, self.default = registry, settings, default
        self.admin_token, self.precision = admin_token, precision
        self.metrics = _Metrics()
        self.metrics.adapters.set(len(registry.adapters))
        self.batcher = Batcher(self._forward, settings, self.metrics, self._packs)
        self.packers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PackCollator or None
        self.thread_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> copy
        low = registry.device.type == "cpu" and precision in ("bf16", "fp16")
        self.low_weights = (
            LowPrecisionWeights(torch.bfloat16 if precision == "bf16" else torch.float16) if low else None
        )
        self.model_thread: Optional[ThreadPoolExecutor] = None
        self.tokenizer_thread: Optional[ThreadPoolExecutor] = None

    @asynccontextmanager
    async def lifespan(self, app):
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="peftlab-model")
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="peftlab-tokenize")
        self.batcher.start(self.model_thread)
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish (SIGTERM); the batcher drains what is queued.
            await self.batcher.stop()
            self.model_thread.shutdown()
            self.tokenizer_thread.shutdown()

    def _forward(self, adapter: str, examples: list) -> np.ndarray:
        """Logits of one batch (runs in the model thread, like every change to the models)."""
        served = self.registry.adapters.get(adapter)
        if served is None:
            raise AdapterGone(
                f"adapter {adapter!r} was removed while the request waited: GET /v1/adapters lists those served"
            )
        self.registry.activate(served)
        device = self.registry.device
        batch = self._batch(served, examples)
        low = self.low_weights.swapped(served.model) if self.low_weights else contextlib.nullcontext()
        with torch.inference_mode(), autocast(device, self.precision), low:
            logits = served.model(**{k: v.to(device) for k, v in batch.items()}).logits
        return logits.float().cpu().numpy()

    def _packs(self, adapter: str) -> bool:
        """Whether batches of `adapter` are packed: packing is on, and its model can (and
        did not fail the check on its first packed batch)."""
        served = self.registry.adapters.get(adapter)
        if not self.settings.packing or served is None or self.packers.get(served.model, True) is None:
            return False
        return PackedForward.supported(served.model) is None

    def _batch(self, served: ServedAdapter, examples: list) -> dict:
        """The model's inputs: texts packed into shared rows where it can take them, else padded."""
        if len(examples) == 1 or not self._packs(served.name):
            return served.collator(examples)
        if served.model not in self.packers:
            # Hooks that let the model take packed rows, checked against padding once.
            hooks = PackedForward(served.model)
            packer = PackCollator(served.tokenizer.pad_token_id, pool="last" if hooks.decoder else "first")
            try:
                with torch.inference_mode():
                    gap = packing_gap(served.model, examples, served.collator, packer)
                # fp32 sums in another order differ by ~1e-6; a wrong mask by far more
                why = None if gap <= 1e-4 else f"packed logits differ by {gap:.2g}"
            except PeftlabError as exc:  # a layout packing refuses (e.g. attention options it does not take)
                why = str(exc)
            if why is not None:
                log.warning("serve: packing off for adapter %r: %s", served.name, why)
                hooks.remove()
                packer = None
            self.packers[served.model] = packer
        packer = self.packers[served.model]
        return packer(examples) if packer is not None else served.collator(examples)

    def _change(self, change: Callable, *args):
        """Add or remove an adapter (in the model thread: forward passes read the models)."""
        result = change(*args)
        if self.low_weights:
            self.low_weights.forget()
        return result

    def adapter(self, name: Optional[str]) -> ServedAdapter:
        served = self.registry.adapters.get(self.default if name is None else name)
        if served is None:
            known = ", ".join(sorted(self.registry.adapters))
            raise RequestError(404, f"no adapter named {str(name)[:80]!r}: use one of {known} (GET /v1/adapters)")
        return served

    def _check(self, served: ServedAdapter, texts: list, pairs: Optional[list], tei: bool) -> None:
        """Limits first (413), then what the adapter takes (422)."""
        limits = self.settings
        if not texts:
            raise RequestError(422, "no texts given: send at least one text")
        if len(texts) > limits.max_texts:
            raise RequestError(
                413, f"{len(texts)} texts in one request, over the limit of {limits.max_texts}: split them"
            )
        longest = max(len(t) for t in itertools.chain(texts, pairs or ()))
        if longest > limits.max_chars:
            raise RequestError(
                413, f"a text of {longest} characters is over the limit of {limits.max_chars}: shorten it"
            )
        if served.takes_pairs != (pairs is not None):
            raise RequestError(422, _pair_mismatch(served, tei))
        try:
            check_texts(served.meta, texts, pairs)
        except PeftlabError as exc:
            raise RequestError(422, str(exc)) from None
        if self.batcher.queued_texts + len(texts) > limits.max_queued_texts:
            raise RequestError(429, f"the server is busy ({self.batcher.queued_texts} texts queued): retry shortly")

    async def logits(self, name: Optional[str], texts: list, pairs: Optional[list], tei: bool = False) -> tuple:
        """(adapter, logits) for `texts` (and second texts `pairs`); RequestError if refused."""
        served = self.adapter(name)
        self._check(served, texts, pairs, tei)
        chars = sum(map(len, texts)) + sum(map(len, pairs or ()))
        if chars <= INLINE_TOKENIZE_CHARS:
            dataset = encode_texts(served.tokenizer, served.meta, texts, pairs)
        else:
            # Long texts off the event loop, with a copy of the tokenizer: a fast tokenizer used
            # from two threads at once fails ("Already borrowed").
            copy_ = self.thread_tokenizers.get(served.tokenizer)
            if copy_ is None:
                copy_ = self.thread_tokenizers[served.tokenizer] = copy.deepcopy(served.tokenizer)
            dataset = await asyncio.get_running_loop().run_in_executor(
                self.tokenizer_thread, encode_texts, copy_, served.meta, texts, pairs
            )
        try:
            logits = await self.batcher.submit(served.name, [dataset[i] for i in range(len(dataset))])
        except AdapterGone as exc:
            raise RequestError(404, str(exc)) from None
        return served, logits

    async def classify(self, name: Optional[str], texts: list, pairs: Optional[list]) -> dict:
        served, logits = await self.logits(name, texts, pairs)
        labels = served.label_names
        results = [
            {"label": labels[int(p.argmax())], "probabilities": {n: float(v) for n, v in zip(labels, p)}}
            for p in softmax(logits)
        ]
        return {"adapter": served.name, "results": results}

    async def tei_predict(self, inputs, raw_scores: bool):
        """POST /predict as text-embeddings-inference answers it: per text, every label with
        its score (probability, or logit with raw_scores), highest first."""
        texts, pairs, single = _tei_inputs(inputs)
        served, logits = await self.logits(None, texts, pairs, tei=True)
        scores = logits if raw_scores else softmax(logits)
        rows = [
            sorted(
                ({"score": float(s), "label": n} for n, s in zip(served.label_names, row)), key=lambda p: -p["score"]
            )
            for row in scores
        ]
        return rows[0] if single else rows

    def check_admin(self, authorization: Optional[str]) -> None:
        if not self.admin_token:
            raise RequestError(403, "admin routes are off: start the server with PEFTLAB_ADMIN_TOKEN set to use them")
        scheme, _, given = (authorization or "").partition(" ")
        unauthorized = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not given.strip():
            raise RequestError(
                401, "admin routes need the header 'Authorization: Bearer <PEFTLAB_ADMIN_TOKEN>'", unauthorized
            )
        if not hmac.compare_digest(given.strip().encode(), self.admin_token.encode()):
            raise RequestError(
                401, "wrong admin token: send the server's PEFTLAB_ADMIN_TOKEN as a bearer token", unauthorized
            )

    async def add_adapter(self, name: str, path: str) -> dict:
        if not ADAPTER_NAME.fullmatch(name):
            raise RequestError(
                422, f"adapter name {name[:80]!r} is not allowed: use letters, digits, '.', '_', '-' (up to 64)"
            )
        if name in self.registry.adapters:
            raise RequestError(
                409, f"an adapter named {name!r} is already served: DELETE it first or choose another name"
            )
        loop = asyncio.get_running_loop()
        try:
            # In the model thread: loading changes shared models, which forward passes read.
            served = await loop.run_in_executor(self.model_thread, self._change, self.registry.add, name, path)
        except PeftlabError as exc:
            raise RequestError(422, str(exc)) from None
        self.metrics.adapters.set(len(self.registry.adapters))
        log.info("serve: loaded adapter %r from %s", name, served.meta["_dir"])
        return self.registry.describe(served)

    async def remove_adapter(self, name: str) -> dict:
        if not ADAPTER_NAME.fullmatch(name):
            raise RequestError(422, f"{name[:80]!r} is not an adapter name: use letters, digits, '.', '_', '-'")
        if name not in self.registry.adapters:
            raise RequestError(404, f"no adapter named {name!r}: GET /v1/adapters lists those served")
        if name == self.default:
            raise RequestError(409, f"adapter {name!r} is the default adapter (it answers /predict): it stays")
        await asyncio.get_running_loop().run_in_executor(self.model_thread, self._change, self.registry.remove, name)
        self.metrics.adapters.set(len(self.registry.adapters))
        log.info("serve: removed adapter %r", name)
        return {"removed": name}

    def adapters_page(self) -> dict:
        return {
            "default": self.default,
            "adapters": [self.registry.describe(a) for a in self.registry.adapters.values()],
            "base_models": len(self.registry.bases),
            "parameter_bytes": self.registry.parameter_bytes(),
        }

    def health(self) -> dict:
        if not self.batcher.alive:
            raise RequestError(503, "the batching worker is not running: restart the server")
        return {"status": "ok", "adapters": len(self.registry.adapters), "queued_texts": self.batcher.queued_texts}


def _pair_mismatch(served: ServedAdapter, tei: bool) -> str:
    """What to change when texts come without second texts for a pair adapter, or the reverse."""
    if served.takes_pairs:
        fix = "send [text, second text], or a batch of those" if tei else "give 'pairs': one second text per text"
        return f"adapter {served.name!r} classifies sentence pairs: {fix}"
    if tei:
        return (
            f"adapter {served.name!r} classifies single texts, and as in TEI a list of two strings is one "
            f"sentence pair: send a batch of texts as [[text1], [text2], ...]"
        )
    return f"adapter {served.name!r} classifies single texts: leave out 'pairs'"


def _tei_inputs(inputs) -> tuple[list, Optional[list], bool]:
    """(texts, second texts or None, single?) from TEI's `inputs`: a string, [text],
    [text, second text], or a batch of those as lists."""
    if isinstance(inputs, str):
        return [inputs], None, True
    if not inputs:
        raise RequestError(422, "inputs is empty: give a text, or a batch [[text1], [text2], ...]")
    if all(isinstance(x, str) for x in inputs):
        if len(inputs) > 2:
            raise RequestError(
                422,
                f"inputs is a list of {len(inputs)} strings, but as in TEI a list of strings is one text "
                f"[text] or one pair [text, second text]: send a batch as [[text1], [text2], ...]",
            )
        return inputs[:1], inputs[1:] or None, True
    sizes = {len(x) for x in inputs}
    if not sizes <= {1, 2}:
        raise RequestError(422, "each item of an inputs batch is [text] or [text, second text]")
    if sizes == {1, 2}:
        raise RequestError(422, "the inputs batch mixes single texts and pairs: an adapter takes one or the other")
    return [x[0] for x in inputs], [x[1] for x in inputs] if sizes == {2} else None, False


# --- the ASGI app ----------------------------------------------------------------------------


def _schemas() -> SimpleNamespace:
    """The request and response models (pydantic is part of the serve extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"adapter": "spam", "texts": ["WIN a prize now!"]}]}
        )
        adapter: Optional[str] = Field(None, description="Adapter name (GET /v1/adapters); default: the default one.")
        texts: list[str] = Field(description="Texts to classify; results come back in this order.")
        pairs: Optional[list[str]] = Field(None, description="Second texts, one per text, for pair adapters.")

    class ClassifyResult(BaseModel):
        label: str
        probabilities: dict[str, float]

    class ClassifyResponse(BaseModel):
        adapter: str
        results: list[ClassifyResult]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"inputs": "WIN a prize now!"}]})
        inputs: str | list[str] | list[list[str]] = Field(
            description="A text, [text, second text], or a batch [[text], [text, second text], ...] (TEI's format)."
        )
        raw_scores: bool = Field(False, description="Logits instead of probabilities.")
        truncate: Optional[bool] = Field(
            None, description="Accepted for TEI clients: texts are always cut to the adapter's max_length."
        )

    class Prediction(BaseModel):
        score: float
        label: str

    class AddAdapterRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"name": "topic", "path": "runs/topic"}]}
        )
        name: str = Field(description="Name to serve it under: letters, digits, '.', '_', '-'.")
        path: str = Field(description="Run folder or adapter folder on the server's disk.")

    class ErrorBody(BaseModel):
        error: str

    return SimpleNamespace(
        **{
            cls.__name__: cls
            for cls in (ClassifyRequest, ClassifyResponse, PredictRequest, Prediction, AddAdapterRequest, ErrorBody)
        }
    )


def _route_label(path: str) -> str:
    """The route a path belongs to, for metrics labels (bounded: no raw paths)."""
    if path in ("/predict", "/v1/classify", "/v1/adapters", "/health", "/metrics", "/docs", "/openapi.json"):
        return path
    return "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other"


async def _send_json(scope, send, status: int, payload: dict) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse(payload, status)(scope, None, send)


class _Guard:
    """ASGI middleware: reads request bodies up to the limit (by Content-Length, then by
    what actually arrives) and records every request in the metrics."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                body = await self._read_body(scope, receive, send_and_note)
                if body is None:
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_and_note)
        finally:
            self.server.metrics.request(_route_label(scope["path"]), status[0], time.perf_counter() - start)

    async def _read_body(self, scope, receive, send) -> Optional[bytes]:
        """The whole body, or None once a 4xx has been sent (or the client left)."""
        limit = self.server.settings.max_body_bytes
        too_big = f"over the limit of {limit} bytes: send fewer or shorter texts per request"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_json(
                scope, send, 400, {"error": "Content-Length is not a number: send the body's size in bytes"}
            )
            return None
        if declared is not None and int(declared) > limit:
            await _send_json(scope, send, 413, {"error": f"request body of {int(declared)} bytes is {too_big}"})
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _send_json(scope, send, 413, {"error": f"request body is {too_big}"})
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then listens for disconnects."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _validation_error(request, errors: list) -> tuple[int, str]:
    """(status, message) for a body FastAPI could not parse or validate."""
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        why = (bad_json.get("ctx") or {}).get("error", "JSON decode error")
        return 400, f'the request body is not valid JSON ({why}): send a JSON object, e.g. {{"texts": ["..."]}}'
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return 422, "the request body must be JSON: send it with the header 'Content-Type: application/json'"
    if any(tuple(e.get("loc", ()))[:2] == ("body", "inputs") for e in errors):
        return 422, "inputs must be a text, [text, second text], or a batch [[text], [text, second text], ...]"
    parts = [
        f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:3]
    ]
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return 422, f"invalid request: {'; '.join(parts)}{more}: see /docs for the request schema"


def _add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def refused(request, exc: RequestError):
        return JSONResponse({"error": exc.message}, exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        status, message = _validation_error(request, list(exc.errors()))
        return JSONResponse({"error": message}, status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path[:100]}: see /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:100]}: see /docs for the API"
        elif exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON (not UTF-8, or nested too deeply): send a JSON object"
        return JSONResponse({"error": message}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        # A bug, not the client's doing: say so without a traceback (the server log has it).
        return JSONResponse({"error": f"internal error ({type(exc).__name__}): see the server log"}, 500)


def _add_routes(app, server: _Server, schemas: SimpleNamespace) -> None:
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse, Response

    s = schemas
    errors = {code: {"model": s.ErrorBody} for code in (400, 404, 413, 422, 429)}
    admin_errors = {code: {"model": s.ErrorBody} for code in (401, 403, 404, 409, 422)}

    async def admin(request: Request):
        server.check_admin(request.headers.get("authorization"))

    @app.post("/predict", tags=["classify"], responses={200: {"model": list[s.Prediction]}, **errors})
    async def predict(body: s.PredictRequest):
        """Text-embeddings-inference's /predict, answered by the default adapter."""
        return JSONResponse(await server.tei_predict(body.inputs, body.raw_scores))

    @app.post("/v1/classify", tags=["classify"], responses={200: {"model": s.ClassifyResponse}, **errors})
    async def classify(body: s.ClassifyRequest):
        """Label and per-class probabilities for each text, in order, from the named adapter."""
        return JSONResponse(await server.classify(body.adapter, body.texts, body.pairs))

    @app.get("/v1/adapters", tags=["adapters"])
    async def list_adapters():
        """Every adapter served: base model, method, labels, test metrics from its run's report."""
        return JSONResponse(server.adapters_page())

    @app.post("/v1/adapters", tags=["adapters"], status_code=201, dependencies=[Depends(admin)], responses=admin_errors)
    async def add_adapter(body: s.AddAdapterRequest):
        """Load a run (or adapter) folder under a name; needs the admin token."""
        return JSONResponse(await server.add_adapter(body.name, body.path), 201)

    @app.delete("/v1/adapters/{name}", tags=["adapters"], dependencies=[Depends(admin)], responses=admin_errors)
    async def remove_adapter(name: str):
        """Stop serving an adapter (not the default one); needs the admin token."""
        return JSONResponse(await server.remove_adapter(name))

    @app.get("/health", tags=["server"])
    async def health():
        return JSONResponse(server.health())

    @app.get("/metrics", tags=["server"])
    async def metrics():
        """Prometheus metrics: requests, errors, latency, batch sizes, queue depth."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    adapters: Mapping | Sequence, settings: Optional[ServeSettings] = None, *, default: Optional[str] = None
):
    """The ASGI app serving `adapters`: {name: run or adapter folder} (or a list of folders,
    named by adapter_names). Loads and verifies every adapter now; the first (or `default`)
    answers /predict. Raises PeftlabError for bad adapters or settings, or a missing extra."""
    _require_serve_stack()
    from fastapi import FastAPI

    settings = settings or ServeSettings()
    settings.validate()
    named = dict(adapters) if isinstance(adapters, Mapping) else adapter_names(adapters)
    if not named:
        raise PeftlabError("no adapters to serve: give run or adapter folders, e.g. runs/minilm-sms_spam-lora")
    default = default or next(iter(named))
    if default not in named:
        raise PeftlabError(f"default adapter {default!r} is not among those served ({', '.join(named)})")
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    registry = AdapterRegistry(device, settings.allow_pickle)
    for name, path in named.items():
        served = registry.add(name, path)
        log.info(
            "serve: %s <- %s (%s, %d labels)",
            name,
            served.meta["_dir"],
            served.meta["method"]["name"],
            len(served.label_names),
        )
    token = settings.admin_token if settings.admin_token is not None else os.environ.get("PEFTLAB_ADMIN_TOKEN")
    server = _Server(registry, settings, default, token or None, resolve_precision(settings.precision, device))
    app = FastAPI(
        title="peftlab serve",
        description="Fine-tuned text classifiers (peftlab adapters) on shared base models, with dynamic batching.",
        lifespan=server.lifespan,
    )
    app.state.peftlab = server
    _add_error_handlers(app)
    _add_routes(app, server, _schemas())
    app.add_middleware(_Guard, server=server)
    return app


def app_from_env():
    """create_app from the environment, for process managers (`uvicorn --factory
    peftlab.serve:app_from_env --workers N`): PEFTLAB_SERVE_ADAPTERS holds
    'NAME=PATH,PATH,...' and PEFTLAB_SERVE_SETTINGS an optional JSON object of ServeSettings."""
    entries = [e.strip() for e in os.environ.get("PEFTLAB_SERVE_ADAPTERS", "").split(",") if e.strip()]
    if not entries:
        raise PeftlabError("PEFTLAB_SERVE_ADAPTERS is empty: set it to 'NAME=PATH,...' (run or adapter folders)")
    settings_json = os.environ.get("PEFTLAB_SERVE_SETTINGS")
    settings = ServeSettings.from_json(settings_json) if settings_json else None
    # In the order given: the first is the default adapter.
    return create_app(_name_all([_split_named(e) if "=" in e else (None, e) for e in entries]), settings)


def run_server(
    adapters: Mapping, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8080, access_log: bool = False
) -> None:
    """Build the app and serve it with uvicorn until SIGINT/SIGTERM, which first let
    in-flight requests finish."""
    app = create_app(adapters, settings)
    import uvicorn

    log.info("serve: %d adapters on http://%s:%d (API docs: /docs)", len(adapters), host, port)
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info")
