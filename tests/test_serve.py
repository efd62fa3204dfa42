"""`peftlab serve` against real uvicorn servers on ephemeral ports, with tiny trained adapters:
outputs equal to Predictor's, base weights held once, the table of hostile requests, admin
routes, metrics, batching, and SIGTERM draining a request in flight."""

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_texts, write_csv

from peftlab.errors import PeftlabError
from peftlab.experiment import Predictor, encode_texts
from peftlab.serve import ForwardCost, ServeSettings, adapter_names, app_from_env, create_app, plan_batches

# peftlab.serve imports its web stack only when an app is built; without the serve extra, skip.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

TOKEN = "s3cret-token"
LIMITS = {"max_texts": 16, "max_chars": 200, "max_body_bytes": 4096}
# fp32 on both sides: served answers equal Predictor's to 1e-5 (bf16 rounds by batch shape).
FP32 = {"precision": "fp32"}


def _train(root: Path, name: str, data: Path, *extra: str) -> Path:
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    cfg = load_config(
        None,
        [f"dataset={data}", f"output_dir={root}", "precision=fp32", "batch_size=16", "max_steps=4", f"name={name}"]
        + list(extra),
    )
    run_experiment(cfg, baseline=False, reload=False)
    return root / name


@pytest.fixture(scope="module")
def runs(tiny_encoder, sentiment_dir, tmp_path_factory) -> dict[str, Path]:
    """Three runs on one tiny base: LoRA on sentiment (2 labels), LoRA on a 3-label task,
    and IA3 on sentence pairs (another peft type: a module tree of its own over the base)."""
    root, data = tmp_path_factory.mktemp("serve-runs"), tmp_path_factory.mktemp("serve-data")
    texts, _ = make_texts(120, seed=3)
    topic = data / "topic"
    topic.mkdir()
    for split, part in (("train", texts[:96]), ("test", texts[96:])):
        write_csv(
            topic / f"{split}.csv", part, [("short", "medium", "long")[min(len(t.split()) // 8, 2)] for t in part]
        )
    pairs = data / "pairs"
    pairs.mkdir()
    rng = random.Random(4)
    for split, n in (("train", 96), ("test", 24)):
        firsts, labels = make_texts(n, seed=5 if split == "train" else 6)
        seconds = [" ".join(rng.choices(["w1", "w2", "good", "bad"], k=3)) for _ in firsts]
        pd.DataFrame({"text": firsts, "text2": seconds, "label": labels}).to_csv(pairs / f"{split}.csv", index=False)
    model = f"model={tiny_encoder}"
    return {
        "sent": _train(root, "sent", sentiment_dir, model),
        "topic": _train(root, "topic", topic, model),
        "pairs": _train(root, "pairs", pairs, model, "method=ia3", "text_pair_column=text2"),
    }


class Running:
    """A uvicorn server in a thread on an ephemeral loopback port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(runs):
    app = create_app(dict(runs), ServeSettings(admin_token=TOKEN, **LIMITS, **FP32))
    running = Running(app)
    yield running
    running.close()


def _predictor(run_dir):
    return Predictor(run_dir, precision="fp32")


def _classify(client, adapter, texts, pairs=None):
    body = {"adapter": adapter, "texts": texts} | ({"pairs": pairs} if pairs is not None else {})
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def _assert_same(served_results, predicted):
    assert [r["label"] for r in served_results] == [p["label"] for p in predicted]
    for got, want in zip(served_results, predicted):
        assert list(got["probabilities"]) == list(want["probabilities"])
        np.testing.assert_allclose(list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5)


def test_each_adapter_answers_as_predict_does(served, runs):
    texts, _ = make_texts(12, seed=9)
    texts[3] = " ".join(["w7"] * 60)  # a long one, batched with short ones
    for name in ("sent", "topic"):
        _assert_same(_classify(served.client, name, texts), _predictor(runs[name])(texts))
    seconds = [f"w{i} good" for i in range(len(texts))]
    _assert_same(_classify(served.client, "pairs", texts, seconds), _predictor(runs["pairs"])(texts, pairs=seconds))
    assert len(_classify(served.client, "topic", texts[:1])[0]["probabilities"]) == 3
    server = served.app.state.peftlab
    assert server.packers[server.registry.adapters["sent"].model] is not None  # batches were packed
    many, _ = make_texts(16, seed=10)
    many = [(t + " w1" * 60)[:190] for t in many]  # over 2,000 characters in all: tokenized in a thread
    _assert_same(_classify(served.client, "sent", many), _predictor(runs["sent"])(many))
    assert len(server.thread_tokenizers) == 1


def test_a_model_that_packing_refuses_is_served_padded(runs, monkeypatch):
    """A model layout the packed path refuses (a PeftlabError from the packed-vs-padded check)
    is served with padded batches, and answers as predict does, instead of failing requests."""
    import peftlab.serve as serve_module

    def refuse(*args, **kwargs):
        raise PeftlabError("this layout cannot run packed: use train.packing=never")

    monkeypatch.setattr(serve_module, "packing_gap", refuse)
    running = Running(create_app({"sent": runs["sent"]}, ServeSettings(**LIMITS, **FP32)))
    try:
        texts, _ = make_texts(6, seed=3)
        _assert_same(_classify(running.client, "sent", texts), _predictor(runs["sent"])(texts))
        server = running.app.state.peftlab
        assert server.packers[server.registry.adapters["sent"].model] is None
    finally:
        running.close()


def test_predict_speaks_tei_with_the_default_adapter(served, runs):
    texts = ["w1 good w2", "w3 bad"]
    want = _predictor(runs["sent"])(texts)
    single = served.client.post("/predict", json={"inputs": texts[0]}).json()
    assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
    assert {p["label"]: p["score"] for p in single} == pytest.approx(want[0]["probabilities"], abs=1e-5)
    batch = served.client.post("/predict", json={"inputs": [[t] for t in texts], "truncate": True}).json()
    for got, expected in zip(batch, want):
        assert {p["label"]: p["score"] for p in got} == pytest.approx(expected["probabilities"], abs=1e-5)
    raw = served.client.post("/predict", json={"inputs": texts[0], "raw_scores": True}).json()
    logits = np.array([p["score"] for p in sorted(raw, key=lambda p: p["label"])])
    probs = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(probs, [want[0]["probabilities"][n] for n in ("neg", "pos")], atol=1e-5)


def test_adapters_on_one_base_share_its_weights(served, runs):
    registry = served.app.state.peftlab.registry
    sent, topic, pairs = (registry.adapters[n] for n in ("sent", "topic", "pairs"))
    assert len(registry.bases) == 1
    assert sent.model is topic.model  # two named LoRA adapters of one model
    heads = sent.model.base_model.model.classifier.modules_to_save  # one head per named adapter
    assert {k: (m.out_features, m.in_features, m.bias.shape[0]) for k, m in heads.items()} == {
        "default": (2, 32, 2),
        "adapter1": (3, 32, 3),
    }
    assert pairs.model is not sent.model  # IA3: its own module tree ...
    # ... over the very same base tensors
    word = "base_model.model.bert.embeddings.word_embeddings.weight"
    assert dict(sent.model.named_parameters())[word].data_ptr() == dict(pairs.model.named_parameters())[word].data_ptr()
    base = registry.bases[next(iter(registry.bases))].template
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters()) + sum(
        b.numel() * b.element_size() for b in base.buffers()
    )
    adapter_bytes = sum((runs[n] / "adapter" / "adapter_model.safetensors").stat().st_size for n in runs)
    # One base plus each adapter's own weights (and one head copy each), not three models.
    assert registry.parameter_bytes() <= base_bytes + 2 * adapter_bytes
    page = served.client.get("/v1/adapters").json()
    assert page["base_models"] == 1 and page["parameter_bytes"] == registry.parameter_bytes()
    listed = {a["name"]: a for a in page["adapters"]}
    assert listed["topic"]["labels"] == ["long", "medium", "short"] and listed["pairs"]["pairs"] is True
    assert listed["sent"]["shares_base_with"] == ["pairs", "topic"] and listed["sent"]["method"] == "lora"
    report = json.loads((runs["sent"] / "report.json").read_text())
    assert listed["sent"]["metrics"]["accuracy"] == report["finetuned"]["accuracy"]


def _big_chunks():
    for _ in range(10):
        yield b" " * 1000
    yield b'{"texts": ["w1"]}'


HEADERS = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
# (what, method, path, request kwargs, status, words the error must contain)
HOSTILE = [
    ("bad JSON", "POST", "/v1/classify", {"content": b'{"texts": [', "headers": JSON}, 400, "not valid JSON"),
    ("not UTF-8", "POST", "/v1/classify", {"content": b'{"texts": ["\xff\xfe"]}', "headers": JSON}, 400, "JSON"),
    ("deep nesting", "POST", "/v1/classify", {"content": b"[" * 2000 + b"]" * 2000, "headers": JSON}, 400, "JSON"),
    ("body not JSON-typed", "POST", "/v1/classify", {"content": b'{"texts": ["w1"]}'}, 422, "Content-Type"),
    ("body is a list", "POST", "/v1/classify", {"json": ["w1"]}, 422, "invalid request"),
    ("body is null", "POST", "/v1/classify", {"content": b"null", "headers": JSON}, 422, "invalid request"),
    ("texts is a string", "POST", "/v1/classify", {"json": {"texts": "w1 good"}}, 422, "texts"),
    ("texts hold numbers", "POST", "/v1/classify", {"json": {"texts": [1, 2]}}, 422, "texts.0"),
    ("texts missing", "POST", "/v1/classify", {"json": {"adapter": "sent"}}, 422, "texts"),
    ("misspelled field", "POST", "/v1/classify", {"json": {"texts": ["w1"], "pair": ["x"]}}, 422, "pair"),
    ("empty list", "POST", "/v1/classify", {"json": {"texts": []}}, 422, "no texts"),
    ("blank text", "POST", "/v1/classify", {"json": {"texts": ["w1", "  "]}}, 422, "text #2 is empty"),
    ("huge text", "POST", "/v1/classify", {"json": {"texts": ["w1 " * 100]}}, 413, "over the limit of 200"),
    ("too many texts", "POST", "/v1/classify", {"json": {"texts": ["w1"] * 17}}, 413, "over the limit of 16"),
    ("body over the limit", "POST", "/v1/classify", {"json": {"texts": ["w" * 5000]}}, 413, "4096 bytes"),
    ("chunked body over", "POST", "/v1/classify", {"content": _big_chunks, "headers": JSON}, 413, "4096 bytes"),
    ("unknown adapter", "POST", "/v1/classify", {"json": {"adapter": "nope", "texts": ["w1"]}}, 404, "no adapter"),
    ("path in adapter", "POST", "/v1/classify", {"json": {"adapter": "../sent", "texts": ["w1"]}}, 404, "no adapter"),
    (
        "pairs to single",
        "POST",
        "/v1/classify",
        {"json": {"adapter": "sent", "texts": ["a"], "pairs": ["b"]}},
        422,
        "leave out 'pairs'",
    ),
    ("no pairs to pair", "POST", "/v1/classify", {"json": {"adapter": "pairs", "texts": ["a"]}}, 422, "give 'pairs'"),
    (
        "pair count",
        "POST",
        "/v1/classify",
        {"json": {"adapter": "pairs", "texts": ["a", "b"], "pairs": ["c"]}},
        422,
        "2 texts but 1",
    ),
    ("TEI three strings", "POST", "/predict", {"json": {"inputs": ["a", "b", "c"]}}, 422, "[[text1], [text2]"),
    ("TEI pair to single", "POST", "/predict", {"json": {"inputs": ["a", "b"]}}, 422, "one sentence pair"),
    ("TEI wrong type", "POST", "/predict", {"json": {"inputs": 5}}, 422, "inputs must be"),
    ("TEI empty", "POST", "/predict", {"json": {"inputs": []}}, 422, "inputs is empty"),
    ("TEI bad item", "POST", "/predict", {"json": {"inputs": [["a", "b", "c"]]}}, 422, "each item"),
    ("admin, no token", "POST", "/v1/adapters", {"json": {"name": "x", "path": "/tmp"}}, 401, "Bearer"),
    (
        "admin, wrong token",
        "DELETE",
        "/v1/adapters/topic",
        {"headers": {"Authorization": "Bearer nope"}},
        401,
        "wrong admin token",
    ),
    (
        "admin, not bearer",
        "DELETE",
        "/v1/adapters/topic",
        {"headers": {"Authorization": f"Basic {TOKEN}"}},
        401,
        "Bearer",
    ),
    (
        "admin, path name",
        "POST",
        "/v1/adapters",
        {"json": {"name": "../x", "path": "/tmp"}, "headers": HEADERS},
        422,
        "not allowed",
    ),
    ("admin, dotdot route", "DELETE", "/v1/adapters/..%2F..%2Fetc", {"headers": HEADERS}, 404, "no route"),
    (
        "admin, not a run",
        "POST",
        "/v1/adapters",
        {"json": {"name": "x", "path": "/etc"}, "headers": HEADERS},
        422,
        "not a peftlab adapter",
    ),
    (
        "admin, name taken",
        "POST",
        "/v1/adapters",
        {"json": {"name": "sent", "path": "/etc"}, "headers": HEADERS},
        409,
        "already served",
    ),
    ("admin, default", "DELETE", "/v1/adapters/sent", {"headers": HEADERS}, 409, "default adapter"),
    ("admin, unknown", "DELETE", "/v1/adapters/nope", {"headers": HEADERS}, 404, "no adapter"),
    ("unknown route", "GET", "/v2/everything", {}, 404, "no route"),
    ("wrong method", "GET", "/v1/classify", {}, 405, "not allowed"),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_requests_get_a_json_4xx_and_the_server_keeps_serving(served, method, path, kwargs, status, words):
    kwargs = {k: (v() if callable(v) else v) for k, v in kwargs.items()}
    response = served.client.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert words in error and "Traceback" not in error
    assert served.client.get("/health").json()["status"] == "ok"


def test_admin_routes_load_serve_and_remove_an_adapter(served, runs):
    client, registry = served.client, served.app.state.peftlab.registry
    before = registry.parameter_bytes()
    added = client.post("/v1/adapters", json={"name": "topic2", "path": str(runs["topic"])}, headers=HEADERS)
    assert added.status_code == 201, added.text
    assert added.json()["labels"] == ["long", "medium", "short"]
    assert registry.adapters["topic2"].model is registry.adapters["sent"].model  # a named adapter, no new base
    texts = ["w1 w2 good", "w3 " * 20]
    _assert_same(_classify(client, "topic2", texts), _predictor(runs["topic"])(texts))
    _assert_same(_classify(client, "sent", texts), _predictor(runs["sent"])(texts))  # others unchanged
    assert client.delete("/v1/adapters/topic2", headers=HEADERS).json() == {"removed": "topic2"}
    assert client.post("/v1/classify", json={"adapter": "topic2", "texts": ["w1"]}).status_code == 404
    assert registry.parameter_bytes() == before
    _assert_same(_classify(client, "topic", texts), _predictor(runs["topic"])(texts))


def test_admin_routes_are_off_without_a_token(runs, monkeypatch):
    monkeypatch.delenv("PEFTLAB_ADMIN_TOKEN", raising=False)
    running = Running(create_app({"sent": runs["sent"]}, ServeSettings(**FP32)))
    try:
        response = running.client.delete("/v1/adapters/sent", headers=HEADERS)
        assert response.status_code == 403 and "PEFTLAB_ADMIN_TOKEN" in response.json()["error"]
    finally:
        running.close()


def test_metrics_count_requests_errors_batches_and_queue(served):
    served.client.post("/v1/classify", json={"texts": ["w1 good"]})
    served.client.post("/v1/classify", json={"texts": []})
    text = served.client.get("/metrics").text
    assert 'peftlab_requests_total{route="/v1/classify",status="200"}' in text
    assert 'peftlab_request_errors_total{route="/v1/classify",status="422"}' in text
    for series in ("peftlab_request_seconds_bucket", "peftlab_batch_texts_bucket", "peftlab_batch_tokens_bucket"):
        assert series in text
    assert "peftlab_queue_texts 0.0" in text and "peftlab_adapters 3.0" in text


def test_docs_page_and_openapi_schema(served):
    assert "text/html" in served.client.get("/docs").headers["content-type"]
    paths = served.client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/v1/classify", "/v1/adapters", "/v1/adapters/{name}", "/health"} <= set(paths)


def _batch_count(running) -> float:
    line = next(
        x for x in running.client.get("/metrics").text.splitlines() if x.startswith("peftlab_batch_texts_count")
    )
    return float(line.split()[-1])


async def _concurrent(url: str, texts: list) -> list:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        replies = await asyncio.gather(*(client.post("/v1/classify", json={"texts": [t]}) for t in texts))
    return [r.json()["results"][0] for r in replies]


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_are_batched_and_answered_alike(runs, batching):
    settings = ServeSettings(max_wait_ms=300, batching=batching, **FP32)
    running = Running(create_app({"sent": runs["sent"]}, settings))
    try:
        texts, _ = make_texts(16, seed=11)
        before = _batch_count(running)
        results = asyncio.run(_concurrent(running.url, texts))
        forwards = _batch_count(running) - before
        _assert_same(results, _predictor(runs["sent"])(texts))
        # Batched, 16 requests arriving together share a few forward passes; unbatched, one each.
        assert forwards <= 4 if batching else forwards == 16
    finally:
        running.close()


def test_low_precision_copies_stay_close_to_autocast_and_put_the_masters_back(runs):
    server = create_app({"sent": runs["sent"], "topic": runs["topic"]}, ServeSettings(precision="bf16")).state.peftlab
    assert server.low_weights is not None
    texts, _ = make_texts(5, seed=13)
    for name in ("sent", "topic", "sent"):  # switching named adapters between forward passes
        served = server.registry.adapters[name]
        dataset = encode_texts(served.tokenizer, served.meta, texts)
        examples = [dataset[i] for i in range(len(dataset))]
        copied = server._forward(name, examples)
        low, server.low_weights = server.low_weights, None
        autocast_only = server._forward(name, examples)
        server.low_weights = low
        # Norms and embeddings in bf16 too (the residual stream stays bf16): close, not equal.
        np.testing.assert_allclose(copied, autocast_only, atol=0.02, rtol=0)
        assert (np.argmax(copied, -1) == np.argmax(autocast_only, -1)).all()
        plan = low.plans[served.model]
        assert len(plan) >= 6 and any(param.dim() == 1 for param, _, _ in plan)  # weights, biases and norms
    assert all(p.dtype == torch.float32 for p in served.model.parameters())  # the masters are back


def test_batches_are_cut_where_padding_would_cost_more_than_a_forward_pass():
    lengths = [200] + [12] * 40 + [5] * 3  # one long text among short ones, longest first
    plan = plan_batches(lengths, max_tokens=1024, overhead=64)
    assert [i for start, end in plan for i in range(start, end)] == list(range(len(lengths)))
    assert all((end - start) * -(-lengths[start] // 8) * 8 <= 1024 for start, end in plan)
    assert plan[0] == (0, 1)  # the long text alone: padding 40 short ones to 200 would waste 7,000 tokens
    assert plan_batches([12] * 40, max_tokens=8192) == [(0, 40)]  # one width: one batch
    assert plan_batches([300], max_tokens=64) == [(0, 1)]  # a text over the budget still runs


def test_forward_cost_is_fitted_from_timed_forward_passes():
    cost = ForwardCost()
    assert cost.overhead_tokens() == 128  # the guess, before any forward pass
    for tokens in range(16, 2000, 40):
        cost.add(tokens, 0.004 + 0.0001 * tokens)  # 4 ms + 0.1 ms per token
    assert cost.overhead_tokens() == pytest.approx(40, abs=1)


def test_settings_and_names_are_checked():
    with pytest.raises(PeftlabError, match=r"max_batch_tokens=0 must be.*max_wait_ms=-1 must be"):
        ServeSettings(max_batch_tokens=0, max_wait_ms=-1).validate()
    with pytest.raises(PeftlabError, match=r"unknown: \['max_batch'\]"):
        ServeSettings.from_json('{"max_batch": 5}')
    assert adapter_names(["runs/spam", "x/topic/adapter"], ["news=runs/n"]) == {
        "spam": "runs/spam",
        "topic": "x/topic/adapter",
        "news": "runs/n",
    }
    with pytest.raises(PeftlabError, match=r"two adapters would be named 'spam'"):
        adapter_names(["a/spam", "b/spam"])
    with pytest.raises(PeftlabError, match=r"not allowed"):
        adapter_names([], ["../etc=runs/x"])


def test_cli_help_gives_the_settings_defaults(capsys):
    from peftlab.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = ServeSettings()
    for flag, value in (
        ("--max-batch-tokens", defaults.max_batch_tokens),
        ("--max-wait-ms", int(defaults.max_wait_ms)),
        ("--max-texts", defaults.max_texts),
        ("--max-chars", defaults.max_chars),
        ("--max-body-bytes", defaults.max_body_bytes),
    ):
        assert f"(default: {value}" in text.rsplit(f"{flag} {flag.upper()[2:].replace('-', '_')}", 1)[1][:200], flag


def test_cli_serve_reports_a_bad_adapter_in_one_line(tmp_path, capsys, monkeypatch):
    from peftlab.cli import main

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # cmd_serve sets it; keep this process's as it was
    assert main(["serve", str(tmp_path / "missing"), "--port", "1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"peftlab: error: adapter folder {tmp_path / 'missing'} does not exist: check the path"
    )
    assert main(["serve", "--name", "bad", "--port", "1"]) == 2
    assert "is not NAME=PATH" in capsys.readouterr().err


def test_app_from_env_serves_in_the_order_given(runs, monkeypatch):
    monkeypatch.setenv("PEFTLAB_SERVE_ADAPTERS", f"t={runs['topic']}, {runs['sent']}")
    monkeypatch.setenv("PEFTLAB_SERVE_SETTINGS", '{"max_texts": 3}')
    server = app_from_env().state.peftlab
    assert server.default == "t" and list(server.registry.adapters) == ["t", "sent"]
    assert server.settings.max_texts == 3


def test_a_missing_serve_extra_is_named(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a)
    )
    with pytest.raises(PeftlabError, match=r'needs uvicorn: pip install "peftlab\[serve\]"'):
        create_app(["runs/x"])


def test_cli_serve_binds_loopback_and_sigterm_drains_a_request_in_flight(runs, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "serve.log", "w+")
    # A long max_wait keeps the request queued while SIGTERM arrives.
    proc = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "serve", str(runs["sent"]), "--port", str(port), "--max-wait-ms", "2000"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url, reply = f"http://127.0.0.1:{port}", {}
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        asker = threading.Thread(
            target=lambda: reply.update(r=httpx.post(f"{url}/v1/classify", json={"texts": ["w1 good"]}, timeout=30))
        )
        asker.start()
        while "peftlab_queue_texts 1.0" not in httpx.get(f"{url}/metrics").text:
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        asker.join(30)
        # uvicorn re-raises the signal once it has shut down, as process managers expect.
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert reply["r"].status_code == 200 and reply["r"].json()["adapter"] == "sent"
    log.seek(0)
    assert f"http://127.0.0.1:{port}" in log.read()
