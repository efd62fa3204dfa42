"""Serving throughput and latency: `peftlab serve` batched, unbatched, and the naive server.

    python bench/serve.py                          # trains a MiniLM LoRA adapter on sms_spam first
    python bench/serve.py --run runs/minilm-sms_spam-lora      # or serve an existing run
    python bench/serve.py --seconds 10 --levels 1,8,32,64      # the defaults

Each variant runs as its own server process on a loopback port, and the load comes from
separate client processes (httpx.AsyncClient, N concurrent clients, each sending one text
per request and the next as soon as the answer is back; 16 clients to a process, since one
httpx pool with 64 connections slows down by itself), for `--seconds` per level after a
warm-up; same texts (the sms_spam test split, 1,115 messages, in a fixed order) and same
client load for every variant. All three servers run with OMP_WAIT_POLICY=PASSIVE (what
`peftlab serve` sets unless told otherwise):
  a  peftlab serve, dynamic batching (default settings: precision auto, bf16 where native)
  b  peftlab serve --no-batching (a batch of one per forward pass)
  c  naive: a minimal FastAPI app whose (sync) endpoint calls
     transformers.pipeline("text-classification") on the merged export (peftlab export --merge)
All three answer POST /v1/classify {"texts": [...]}. Without --run, the adapter is trained
here once: MiniLM + LoRA on a stratified 1,500-message subset of the training split, one
epoch (94 steps), the test split untouched. Then, on the batched server, the same adapter
is loaded 4 more times under other names (admin route) to measure memory per extra adapter,
and its answers on all 1,115 texts (64 per request) are compared with `peftlab predict`'s.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ADMIN_TOKEN = "bench-token"
CLIENTS_PER_PROCESS = 16


# --- the naive server (variant c) --------------------------------------------------------


def naive_app(model_dir: str):
    """What a user would write first: FastAPI + transformers.pipeline, one call per request."""
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    classifier = pipeline("text-classification", model=model_dir, top_k=None, device="cpu")
    app = FastAPI()

    class Request(BaseModel):
        texts: list[str]

    @app.post("/v1/classify")
    def classify(request: Request):  # a plain def: FastAPI runs it in its thread pool
        out = classifier(request.texts)
        return {
            "results": [
                {
                    "label": max(o, key=lambda d: d["score"])["label"],
                    "probabilities": {d["label"]: d["score"] for d in o},
                }
                for o in out
            ]
        }

    @app.get("/health")
    def health():
        return {"status": "ok"}

    return app


# --- the client -----------------------------------------------------------------------------


async def drive(url: str, texts: list[str], clients: int, offset: int, step: int, start_at: float, args) -> dict:
    """`clients` concurrent loops of one-text requests from this process (loop k sends texts
    offset+k, offset+k+step, ...); raw figures for requests sent after the warm-up."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies, errors, ends = [], [0], []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))  # every client process starts together
        measure_from, stop_at = start_at + args.warmup, start_at + args.warmup + args.seconds

        async def loop(k: int) -> None:
            i = offset + k
            while time.time() < stop_at:
                sent = time.time()
                try:
                    reply = await client.post("/v1/classify", json={"texts": [texts[i % len(texts)]]})
                    ok = reply.status_code == 200 and len(reply.json()["results"]) == 1
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                done = time.time()
                i += step
                if sent >= measure_from:
                    latencies.append(done - sent) if ok else None
                    errors[0] += not ok
                    ends.append(done)

        await asyncio.gather(*(loop(k) for k in range(clients)))
    return {"latencies": latencies, "errors": errors[0], "last_end": max(ends, default=None)}


def client_main(args) -> None:
    texts = json.loads(Path(args.texts_file).read_text())
    out = asyncio.run(drive(args.url, texts, args.clients, args.offset, args.step, args.start_at, args))
    print(json.dumps(out))


def merge(parts: list[dict], clients: int, measure_from: float) -> dict:
    """Throughput and latency percentiles over every client process's requests."""
    ordered = sorted(x for part in parts for x in part["latencies"])
    ends = [part["last_end"] for part in parts if part["last_end"] is not None]
    window = (max(ends) - measure_from) if ends else float("nan")

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")

    return {
        "clients": clients,
        "texts": len(ordered),
        "errors": sum(part["errors"] for part in parts),
        "seconds": window,
        "texts_per_s": len(ordered) / window,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
    }


# --- orchestration --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server did not come up:\n{log.read_text()[-3000:]}")


def start_server(variant: str, run_dir: Path, merged: Path, work: Path, extra: list[str]) -> tuple:
    port = free_port()
    if variant == "c":
        cmd = [sys.executable, __file__, "--naive-server", str(merged), "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "peftlab.cli", "serve", str(run_dir), "--port", str(port), "--quiet", *extra]
        cmd += ["--no-batching"] if variant == "b" else []
    log = work / f"server-{variant}.log"
    # OMP_WAIT_POLICY=PASSIVE (what `peftlab serve` sets by default) for all three: spinning
    # OpenMP threads stall on a shared machine, and the comparison is about batching.
    env = {**os.environ, "PEFTLAB_ADMIN_TOKEN": ADMIN_TOKEN, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url


def run_level(url: str, texts_file: Path, clients: int, args, server_pid: int) -> dict:
    """One load level: `clients` concurrent clients, CLIENTS_PER_PROCESS to a process (httpx
    slows down with many connections in one pool, and would measure itself)."""
    procs = -(-clients // CLIENTS_PER_PROCESS)
    start_at = time.time() + 1.0 + 0.2 * procs  # time for the processes to start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, started = cpu_seconds(server_pid), time.perf_counter()
    running = []
    for k in range(procs):
        share = clients // procs + (k < clients % procs)
        cmd = [sys.executable, __file__, "--client", url, "--texts-file", str(texts_file), "--clients", str(share)]
        cmd += ["--offset", str(k), "--step", str(clients), "--start-at", str(start_at)]
        cmd += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
        running.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    parts = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in running]
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = merge(parts, clients, start_at + args.warmup)
    # CPU shares over the whole level, warm-up included: the clients compete for the same cores.
    result["server_cpu_pct"] = 100 * (cpu_seconds(server_pid) - before) / wall
    client = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    result["client_cpu_pct"] = 100 * client / wall
    result["client_processes"] = procs
    return result


def adapter_memory(url: str, run_dir: Path, pid: int, extra: int = 4) -> dict:
    """RSS and parameter bytes as the same adapter is loaded `extra` more times by name."""
    import httpx

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    page = httpx.get(f"{url}/v1/adapters").json()
    first = {"rss_mb": rss_mb(pid), "parameter_bytes": page["parameter_bytes"]}
    for k in range(extra):
        reply = httpx.post(
            f"{url}/v1/adapters", json={"name": f"extra{k}", "path": str(run_dir)}, headers=headers, timeout=300
        )
        reply.raise_for_status()
        httpx.post(f"{url}/v1/classify", json={"adapter": f"extra{k}", "texts": ["warm up"]}).raise_for_status()
    page = httpx.get(f"{url}/v1/adapters").json()
    last = {"rss_mb": rss_mb(pid), "parameter_bytes": page["parameter_bytes"]}
    return {
        "extra_adapters": extra,
        "rss_mb_one": first["rss_mb"],
        "rss_mb_per_extra": (last["rss_mb"] - first["rss_mb"]) / extra,
        "parameter_bytes_one": first["parameter_bytes"],
        "parameter_bytes_per_extra": (last["parameter_bytes"] - first["parameter_bytes"]) / extra,
        "base_models": page["base_models"],
    }


def agreement(url: str, run_dir: Path, texts: list[str], precision: str) -> dict:
    """How far the server's probabilities are from peftlab predict's (Predictor) on every
    text, sent 64 at a time (other batch shapes than predict's)."""
    import httpx
    import numpy as np

    from peftlab.experiment import Predictor

    served = []
    for start in range(0, len(texts), 64):
        reply = httpx.post(f"{url}/v1/classify", json={"texts": texts[start : start + 64]}, timeout=300)
        reply.raise_for_status()
        served += reply.json()["results"]
    predicted = Predictor(run_dir, precision=precision)(texts)
    gap = max(
        abs(s["probabilities"][n] - p["probabilities"][n])
        for s, p in zip(served, predicted)
        for n in s["probabilities"]
    )
    same = sum(s["label"] == p["label"] for s, p in zip(served, predicted))
    return {"precision": precision, "max_probability_gap": float(np.float64(gap)), "same_label": f"{same}/{len(texts)}"}


def prepare(args, work: Path) -> tuple[Path, Path, list[str]]:
    """The run folder (trained here unless --run), its merged export, and the test texts."""
    from peftlab.artifacts import export_merged
    from peftlab.config import DataConfig, load_config
    from peftlab.data import load_data
    from peftlab.experiment import run_experiment

    run_dir = Path(args.run) if args.run else work / "runs" / "spam"
    if not args.run and not (run_dir / "report.json").is_file():
        cfg = load_config(
            None,
            [
                "model=minilm",
                "dataset=sms_spam",
                "max_train_samples=1500",
                "epochs=1",
                f"output_dir={work / 'runs'}",
                "name=spam",
                "overwrite=true",
            ],
        )
        report = run_experiment(cfg, baseline=False, reload=False)
        print(f"trained the adapter: test accuracy {report['finetuned']['accuracy']:.4f}", flush=True)
    merged = export_merged(run_dir, work / "merged", overwrite=True)
    data_dir = args.data_dir or os.environ.get("PEFTLAB_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    texts = load_data(DataConfig(dataset="sms_spam"), data_dir).test.texts
    return run_dir, merged, texts


VARIANTS = {"a": "peftlab serve (batched)", "b": "peftlab serve --no-batching", "c": "naive FastAPI + pipeline"}


def print_table(results: dict) -> None:
    head = f"{'variant':<30}{'clients':>8}{'texts/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
    print(f"\n{head}{'server CPU':>12}{'client CPU':>12}")
    for variant, rows in results.items():
        for r in rows:
            print(
                f"{variant + ' ' + VARIANTS[variant]:<30}{r['clients']:>8}{r['texts_per_s']:>10.1f}{r['p50_ms']:>9.1f}"
                f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8}{r['server_cpu_pct']:>11.0f}%"
                f"{r['client_cpu_pct']:>11.0f}%"
            )
    by = {v: {r["clients"]: r for r in rows} for v, rows in results.items()}
    for n in sorted(set(by.get("a", {})) & set(by.get("b", {})) & set(by.get("c", {}))):
        a, b, c = (by[v][n]["texts_per_s"] for v in "abc")
        print(f"{n} clients: a/b = {a / max(b, 1e-9):.2f}x, a/c = {a / max(c, 1e-9):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="Existing run folder to serve (default: train one here).")
    p.add_argument("--work", default="/tmp/peftlab-bench-serve", help="Scratch folder (runs, export, logs).")
    p.add_argument("--data-dir", help="Offline mirror (default $PEFTLAB_DATA_DIR, else ../shared/data).")
    p.add_argument("--levels", default="1,8,32,64", help="Concurrent clients per level.")
    p.add_argument("--seconds", type=float, default=10.0, help="Measured seconds per level.")
    p.add_argument("--warmup", type=float, default=2.0, help="Unmeasured seconds before each level.")
    p.add_argument("--variants", default="abc")
    p.add_argument("--serve-args", default="", help="Extra `peftlab serve` options for a and b (--precision=X form).")
    # internal: the naive server and the client run as their own processes
    p.add_argument("--naive-server", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client", dest="url", help=argparse.SUPPRESS)
    p.add_argument("--texts-file", help=argparse.SUPPRESS)
    p.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--step", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.naive_server:
        import uvicorn

        uvicorn.run(
            naive_app(args.naive_server), host="127.0.0.1", port=args.port, access_log=False, log_level="warning"
        )
        return
    if args.url:
        client_main(args)
        return
    run_benchmark(args)


def run_benchmark(args) -> None:
    import torch

    from peftlab.runtime import cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PEFTLAB_CACHE_DIR", str(work / "cache"))
    run_dir, merged, texts = prepare(args, work)
    texts_file = work / "texts.json"
    texts_file.write_text(json.dumps(texts))
    print(f"cpu: {cpu_description()}; torch threads {torch.get_num_threads()}")
    print(f"load before: {os.getloadavg()}; {len(texts)} sms_spam test texts; {args.seconds:g} s per level")
    results, memory = {}, None
    for variant in args.variants:
        proc, url = start_server(variant, run_dir, merged, work, args.serve_args.split())
        try:
            results[variant] = []
            for clients in (int(n) for n in args.levels.split(",")):
                row = run_level(url, texts_file, clients, args, proc.pid)
                results[variant].append(row)
                print(f"{variant} {clients:>3} clients: {json.dumps(row)}", flush=True)
            if variant == "a":
                memory = adapter_memory(url, run_dir, proc.pid)
                precision = next(
                    (x.split("=")[1] for x in args.serve_args.split() if x.startswith("--precision=")), "auto"
                )
                memory["agreement"] = agreement(url, run_dir, texts, precision)
            elif variant == "c":
                memory = {**(memory or {}), "naive_rss_mb": rss_mb(proc.pid)}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    print(f"load after: {os.getloadavg()}")
    print_table(results)
    if memory:
        print("\nmemory per extra adapter, and agreement with peftlab predict:", json.dumps(memory))
    (work / "results.json").write_text(
        json.dumps({"results": results, "memory": memory, "cpu": cpu_description()}, indent=1)
    )


if __name__ == "__main__":
    main()
