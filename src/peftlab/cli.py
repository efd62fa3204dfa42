"""`peftlab` command line: parse, build a config, call the library. Nothing else lives here.

Heavy libraries (torch, transformers) are imported inside the commands, so `--help` is
instant and a bad flag is reported before anything loads.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from dataclasses import MISSING, fields

from peftlab.config import SECTIONS, RunConfig
from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")

FLAG_NAMES = {
    ("model", "name"): "model",
    ("method", "name"): "method",
    ("data", "dataset"): "dataset",
    (None, "name"): "name",
}

EPILOG_RUN = """examples:
  peftlab run                                   # MiniLM + LoRA on sms_spam, offline
  peftlab run model=smollm2-135m max_train_samples=600 max_eval_samples=300 epochs=1
  peftlab run --resume runs/minilm-sms_spam-lora   # continue a killed run
  peftlab run --config configs/minilm-sms-lora.yaml lr=5e-4
  peftlab run method=full name=full-ft          # full fine-tuning, for comparison

Any setting can be given as --flag value or as key=value (dotted keys like train.lr=1e-3
work too); flags win over key=value, which wins over --config."""


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, with the field's help text (litgpt-style)."""
    for section, cls in [(None, RunConfig)] + list(SECTIONS.items()):
        group = parser.add_argument_group(f"{section or 'run'} settings")
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            flag = FLAG_NAMES.get((section, f.name), f.name).replace("_", "-")
            dest = f"cfg:{section}.{f.name}" if section else f"cfg:{f.name}"
            default = (
                f.default
                if f.default is not MISSING
                else (f.default_factory() if f.default_factory is not MISSING else None)
            )
            help_text = f.metadata.get("help", "")
            if str(f.type).startswith("bool"):
                group.add_argument(
                    f"--{flag}", dest=dest, action="store_const", const="true", default=None, help=help_text
                )
            else:
                group.add_argument(
                    f"--{flag}", dest=dest, default=None, metavar="X", help=f"{help_text} (default: {default})"
                )


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(getattr(args, "overrides", []) or [])
    for dest, value in vars(args).items():
        if dest.startswith("cfg:") and value is not None:
            out.append(f"{dest[4:]}={value}")
    return out


def _setup_logging(quiet: bool) -> None:
    import warnings

    # peft calls a transformers method that transformers 5 deprecated; not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[peftlab] %(message)s"))
    log.handlers[:] = [handler]
    # Under torchrun / accelerate launch, only the main process (rank 0) talks.
    log.setLevel(logging.WARNING if quiet or not _is_main() else logging.INFO)
    log.propagate = False


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning of foundation models for text classification.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("-q", "--quiet", action="store_true", help="Only print warnings, errors and results.")

    for name, summary in (
        ("run", "Run the whole experiment: baseline, fine-tune, save, reload, compare, report."),
        ("train", "Fine-tune and save the adapter (no baseline, no reload check)."),
    ):
        p = sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=EPILOG_RUN,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", metavar="FILE.yaml", help="YAML config (e.g. a run's config.yaml).")
        p.add_argument(
            "--resume",
            metavar="RUN_DIR",
            help="Continue a killed run from its last checkpoint, with the run's own config.",
        )
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. epochs=2 lr=5e-4.")
        common(p)
        _config_flags(p)

    p = sub.add_parser(
        "evaluate",
        help="Evaluate a base model, or base + adapter, on a dataset's test split.",
        description="Evaluate a base model (with an untrained head) or a trained adapter on the "
        "test split of a dataset, and print its metrics.",
        epilog="examples:\n  peftlab evaluate --adapter runs/minilm-sms_spam-lora/adapter\n"
        "  peftlab evaluate --model minilm --dataset sms_spam",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="Base model (default for --adapter: the one it was trained on).")
    p.add_argument("--adapter", metavar="DIR", help="Adapter folder (or run folder) to apply.")
    p.add_argument("--dataset", default=None, help="Dataset (default: the adapter's, else sms_spam).")
    p.add_argument("--data-dir", default=None, help="Offline mirror folder (default $PEFTLAB_DATA_DIR).")
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--output", metavar="FILE.json", help="Also write the metrics here.")
    p.add_argument("--allow-pickle", action="store_true", help="Allow pickle weight files (only if trusted).")
    common(p)

    p = sub.add_parser(
        "predict",
        help="Classify texts with a trained adapter.",
        description="Classify texts with a trained adapter: texts from arguments, --file (one "
        "per line) or standard input; prints label and probabilities.",
        epilog='examples:\n  peftlab predict runs/minilm-sms_spam-lora "WIN a FREE prize now"\n'
        "  cat messages.txt | peftlab predict runs/minilm-sms_spam-lora --json\n"
        "  printf 'A man sleeps.\\tA person rests.\\n' | peftlab predict runs/my-nli-run --pairs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="Adapter folder or run folder.")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--file", help="File with one text per line.")
    p.add_argument("--model", help="Base model (default: the one recorded with the adapter).")
    p.add_argument("--json", action="store_true", help="Print one JSON object per text.")
    p.add_argument(
        "--pairs",
        action="store_true",
        help="Sentence pairs, for an adapter trained with text_pair_column: each text is 'first<TAB>second'.",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="Compute precision (default auto: bf16 where the CPU or GPU runs it natively, as runs evaluate).",
    )
    p.add_argument("--allow-pickle", action="store_true", help="Allow pickle weight files (only if trusted).")
    common(p)

    p = sub.add_parser(
        "methods",
        help="List every fine-tuning method with its trainable parameters on a model.",
        description="List every fine-tuning method with the number of parameters it would train on "
        "a model (each built on a copy of the loaded model).",
        epilog="examples:\n  peftlab methods\n  peftlab methods --model smollm2-135m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="minilm", help="Model to count on (default: minilm).")
    common(p)

    p = sub.add_parser(
        "export",
        help="Write a standalone model with the adapter merged into its weights.",
        description="Merge a trained adapter into its base model and write a standalone model "
        "folder (safetensors, tokenizer, label names) that plain "
        "AutoModelForSequenceClassification.from_pretrained loads.",
        epilog="examples:\n  peftlab export runs/minilm-sms_spam-lora --merge exported/spam-minilm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="RUN_OR_ADAPTER_DIR", help="Adapter folder or run folder.")
    p.add_argument("--merge", metavar="OUT_DIR", required=True, help="Folder to write the merged model to.")
    p.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR if it exists.")
    p.add_argument("--allow-pickle", action="store_true", help="Allow pickle weight files (only if trusted).")
    common(p)

    p = sub.add_parser(
        "sweep",
        help="Run a grid of experiments (the config's `sweep:` key) and print a leaderboard.",
        description="Run one experiment per combination of the values under the config's `sweep:` "
        "key, named <sweep>/<key=value,...>; a restarted sweep skips finished runs.",
        epilog="examples:\n  peftlab sweep --config configs/sweep.yaml\n"
        "  peftlab sweep model=minilm sweep.method.name=[lora,head] sweep.lr=[1e-3,5e-3] name=methods\n\n"
        "The sweep is named by name=..., else the config file's name; the leaderboard is written\n"
        "to <output_dir>/<sweep>/leaderboard.md and .html.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config with a `sweep:` mapping of key -> values.")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Overrides of the base config, and sweep.KEY=[v1,v2] to add a grid axis.",
    )
    common(p)

    p = sub.add_parser(
        "tune",
        help="Search run settings with Optuna (the config's `tune:` key); report the best trial.",
        description="Search run settings (method, rank, learning rate, epochs, ...: the config's `tune:` "
        "key, or a default space) with Optuna's TPE sampler, pruning trials whose validation score "
        "falls behind. Trials are runs in <output_dir>/<tune>/trial-NNNN, selected on the validation "
        "split; the best is evaluated once on the test split. The study is kept in "
        "<output_dir>/<tune>/study.db: the same command resumes it, and several workers can share it.",
        epilog="examples:\n  peftlab tune --config configs/tune/minilm-sst2.yaml --time-budget 45m\n"
        "  peftlab tune dataset=sms_spam max_train_samples=1000 --trials 10 --name spam\n"
        "  peftlab tune --config base.yaml tune.space.method.name=[lora,ia3] tune.space.lr=[1e-3,3e-3]\n"
        "  peftlab tune --config base.yaml --storage postgresql://user:pw@host/db   # on every machine\n\n"
        "The tune is named by --name, else name=..., else the config file's name; its report is\n"
        "<output_dir>/<tune>/report.html and leaderboard.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config; its `tune:` key holds the search.")
    p.add_argument("--trials", type=int, metavar="N", help="Stop once the study holds N complete or pruned trials.")
    p.add_argument("--time-budget", metavar="DURATION", help="This worker's time budget, e.g. 30m, 2h, 1h30m.")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Database shared by the workers (e.g. postgresql://...); default: sqlite in the tune folder.",
    )
    p.add_argument("--name", help="The tune's (and study's) name; default: name=..., else the config file's name.")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Overrides of the base config, and tune.KEY=value (tune.space.KEY=[...] for one axis).",
    )
    common(p)

    p = sub.add_parser(
        "compare",
        help="Leaderboard of finished runs, from their report.json files.",
        description="Print a leaderboard of finished runs (sorted by macro-F1) and write it as Markdown and HTML.",
        epilog="examples:\n  peftlab compare runs/*\n  peftlab compare runs/lora runs/full --output results/board",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run folders holding report.json.")
    p.add_argument(
        "--output",
        metavar="PREFIX",
        default="leaderboard",
        help="Write PREFIX.md and PREFIX.html (default: leaderboard.md/.html here).",
    )
    common(p)

    p = sub.add_parser(
        "serve",
        help="Serve trained adapters over HTTP, sharing base models, with dynamic batching.",
        description='Serve trained adapters over HTTP (FastAPI + uvicorn; pip install "peftlab[serve]").\n'
        "Adapters on the same base model share its weights; concurrent requests are batched.\n"
        "Endpoints: POST /predict (TEI's), POST /v1/classify, GET /v1/adapters, GET /health,\n"
        "GET /metrics, /docs; POST and DELETE /v1/adapters when PEFTLAB_ADMIN_TOKEN is set.",
        epilog="examples:\n  peftlab serve runs/minilm-sms_spam-lora\n"
        "  peftlab serve --name spam=runs/spam --name topic=runs/topic --port 9000\n"
        "  PEFTLAB_ADMIN_TOKEN=$(openssl rand -hex 16) peftlab serve runs/spam   # hot reload on\n\n"
        "The first adapter is the default one (it answers /predict); a run folder is named after\n"
        "itself. SIGTERM or Ctrl-C lets requests in flight finish before the server exits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapters", nargs="*", metavar="RUN_OR_ADAPTER", help="Run or adapter folders to serve.")
    p.add_argument("--name", action="append", default=[], metavar="NAME=RUN", help="Serve RUN under NAME (repeatable).")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: 127.0.0.1, this machine only).")
    p.add_argument("--port", type=int, default=8080, help="Port (default: 8080).")
    p.add_argument("--max-batch-tokens", type=int, help="Padded tokens per forward pass (default: 8192).")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        help="How long a batch may wait for more requests (default: 0, batch what queued meanwhile).",
    )
    p.add_argument("--no-batching", action="store_true", help="One text per forward pass (for comparison).")
    p.add_argument("--max-texts", type=int, help="Texts per request (default: 128).")
    p.add_argument("--max-chars", type=int, help="Characters per text (default: 20000).")
    p.add_argument("--max-body-bytes", type=int, help="Request body size (default: 1048576).")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="Compute precision (default auto: bf16 where the CPU or GPU runs it natively, as predict).",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="Device (default: auto).")
    p.add_argument("--threads", type=int, help="CPU threads per forward pass (default: torch's, one per core).")
    p.add_argument("--access-log", action="store_true", help="Log every request (uvicorn's access log).")
    p.add_argument("--allow-pickle", action="store_true", help="Allow pickle weight files (only if trusted).")
    common(p)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"peftlab {version('peftlab')}"
    except PackageNotFoundError:
        return "peftlab (not installed)"


def cmd_run(args: argparse.Namespace, train_only: bool = False) -> int:
    from pathlib import Path

    from peftlab.config import load_config

    if args.resume:
        # Absolute without following links ("." names its folder; a link is refused later).
        run_dir = Path(os.path.abspath(args.resume))
        if args.config or _overrides(args):
            raise PeftlabError("--resume takes no other settings: the run continues with its own config.yaml")
        if not (run_dir / "config.yaml").is_file():
            raise PeftlabError(f"cannot resume: {args.resume} is not a run directory (no config.yaml)")
        from peftlab.config import from_dict, read_yaml

        # The folder's own name and place win over what config.yaml says (it may have moved).
        cfg = from_dict(read_yaml(run_dir / "config.yaml"), source=str(run_dir / "config.yaml"))
        cfg.name, cfg.output_dir = run_dir.name, str(run_dir.parent)
        cfg.validate()
    else:
        cfg = load_config(args.config, _overrides(args))
    from peftlab.experiment import run_experiment
    from peftlab.report import console_table

    report = run_experiment(cfg, baseline=not train_only, reload=not train_only, resume=bool(args.resume))
    if _is_main():
        print(console_table(report))
        print(f"\nrun directory: {report['run_dir']}  (report.md, report.json, adapter/)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from peftlab.config import DataConfig
    from peftlab.experiment import evaluate_model

    data = DataConfig()
    if args.adapter and args.dataset is None:
        from peftlab.artifacts import read_meta

        data.dataset = read_meta(args.adapter)["data"]["dataset"]
    elif args.dataset:
        data.dataset = args.dataset
    data.text_column, data.label_column = args.text_column, args.label_column
    data.max_eval_samples = args.max_eval_samples
    problems = data.problems()
    if problems:
        raise PeftlabError("; ".join(problems))
    result = evaluate_model(
        args.model,
        data,
        adapter_dir=args.adapter,
        data_dir=args.data_dir or os.environ.get("PEFTLAB_DATA_DIR"),
        batch_size=args.batch_size,
        precision=args.precision,
        allow_pickle=args.allow_pickle,
    )
    m = result["metrics"]
    print(f"{'loss':<22}{m['loss']:.4f}\n{'accuracy':<22}{m['accuracy']:.4f}\n{'macro-F1':<22}{m['macro_f1']:.4f}")
    for name, stats in m["per_class"].items():
        print(
            f"{name + ': P/R/F1':<22}{stats['precision']:.4f} / {stats['recall']:.4f} / {stats['f1']:.4f}"
            f"  (n={stats['support']})"
        )
    if args.output:
        from pathlib import Path

        from peftlab.files import write_json_atomic

        write_json_atomic(Path(args.output), result)
    return 0


def _predict_lines(args: argparse.Namespace):
    """The texts to classify, lazily: arguments first, then --file or standard input, one
    per line, blank lines included (each input line gets one output line). Opens the file
    now, so a wrong path fails before the model loads."""
    streams = []
    if args.file:
        try:
            streams.append(open(args.file, encoding="utf-8"))  # closed once read, in lines()
        except FileNotFoundError:
            raise PeftlabError(f"text file {args.file} does not exist: check the path") from None
    elif not args.texts:
        if sys.stdin is None or sys.stdin.isatty():
            raise PeftlabError("no texts to classify: give them as arguments, with --file, or on stdin")
        streams.append(sys.stdin)

    def lines():
        yield from args.texts
        for stream in streams:
            try:
                for line in stream:
                    yield line.rstrip("\r\n")
            except UnicodeDecodeError:
                raise PeftlabError(f"{args.file or 'standard input'} is not UTF-8: re-save it as UTF-8") from None
            finally:
                if stream is not sys.stdin:
                    stream.close()

    return lines()


def _predict_chunk(predictor, chunk: list[str], first: int, pairs: bool, from_args: int) -> list[dict | None]:
    """Results for one chunk of input lines (None for a blank line read from a stream)."""
    keep = [i for i, t in enumerate(chunk) if t.strip() or first + i < from_args]
    texts, seconds = [chunk[i] for i in keep], None
    if pairs:
        split = [t.split("\t", 1) for t in texts]
        bad = next((keep[i] for i, parts in enumerate(split) if len(parts) != 2), None)
        if bad is not None:
            raise PeftlabError(f"text #{first + bad + 1} has no TAB: with --pairs each text is 'first<TAB>second'")
        texts, seconds = [a for a, _ in split], [b for _, b in split]
    results: list[dict | None] = [None] * len(chunk)
    for i, result in zip(keep, predictor(texts, pairs=seconds) if texts else []):
        results[i] = result
    return results


def cmd_predict(args: argparse.Namespace) -> int:
    import itertools

    from tqdm.auto import tqdm

    from peftlab.experiment import Predictor

    lines = _predict_lines(args)
    chunk = list(itertools.islice(lines, 512))
    if not chunk:
        raise PeftlabError("no texts to classify: the input was empty")
    predictor = Predictor(args.adapter, args.model, precision=args.precision, allow_pickle=args.allow_pickle)
    # Results stream out in input order, a chunk at a time, with progress on stderr: a file of
    # 100k lines shows its first answers at once, not after the last one.
    done = 0
    with tqdm(desc="predict", unit=" texts", disable=None, file=sys.stderr, leave=False) as bar:
        while chunk:
            for result in _predict_chunk(predictor, chunk, done, args.pairs, len(args.texts)):
                print(_predict_line(result, args.json))
            sys.stdout.flush()
            done += len(chunk)
            bar.update(len(chunk))
            chunk = list(itertools.islice(lines, 512))
    return 0


def _predict_line(result: dict | None, as_json: bool) -> str:
    """One output line: JSON, or label<TAB>probabilities<TAB>text; a blank input line stays blank."""
    if result is None:
        return json.dumps({"text": "", "label": None, "error": "empty line"}) if as_json else ""
    if as_json:
        return json.dumps(result, ensure_ascii=False)
    probs = "  ".join(f"{n}={p:.3f}" for n, p in result["probabilities"].items())
    snippet = result["text"] if len(result["text"]) <= 60 else result["text"][:57] + "..."
    return f"{result['label']}\t{probs}\t{snippet}"


def cmd_methods(args: argparse.Namespace) -> int:
    from peftlab.methods import method_table

    # One "method: ..." log line per method would repeat the table.
    log.setLevel(logging.WARNING)
    rows = method_table(args.model)
    print(f"methods on {args.model} ({rows[0]['total']:,} parameters):\n")
    print(f"{'method':<15}{'trainable':>12}{'%':>9}  what it trains")
    for row in rows:
        if row["trainable"] is None:
            print(f"{row['method']:<15}{'-':>12}{'-':>9}  not here: {row['about']}")
        else:
            share = 100 * row["trainable"] / row["total"]
            print(f"{row['method']:<15}{row['trainable']:>12,}{share:>8.3f}%  {row['about']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from peftlab.artifacts import export_merged

    out = export_merged(args.adapter, args.merge, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    print(
        f"exported a standalone model to {out}: load it with "
        f"AutoModelForSequenceClassification.from_pretrained({str(out)!r})"
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftlab.report import leaderboard_text, write_leaderboard
    from peftlab.sweep import load_sweep, run_sweep

    base, grid = load_sweep(args.config, args.overrides)
    sweep_name = base.name or (Path(args.config).stem if args.config else "sweep")
    reports = run_sweep(base, grid, sweep_name)
    if _is_main():
        print(leaderboard_text(reports))
        md, page = write_leaderboard(reports, Path(base.output_dir) / sweep_name / "leaderboard")
        print(f"\nwrote {md} and {page}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from peftlab.report.tune import tune_text
    from peftlab.tune import load_tune, run_tune

    budget = [f"tune.trials={args.trials}"] if args.trials is not None else []
    budget += [f"tune.time_budget={args.time_budget}"] if args.time_budget is not None else []
    base, tune = load_tune(args.config, [*args.overrides, *budget])
    name = args.name or base.name or (Path(args.config).stem if args.config else "tune")
    summary = run_tune(base, tune, name, storage=args.storage)
    print(tune_text(summary))
    print(f"\nwrote {Path(summary.tune_dir) / 'report.html'} and leaderboard.md")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # Before torch loads OpenMP: threads that spin while they wait stall whenever anything else
    # wants the CPU (the server's HTTP threads, other processes); a server's threads sleep.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from peftlab.serve import ServeSettings, adapter_names, run_server

    adapters = adapter_names(args.adapters, args.name)
    if not adapters:
        raise PeftlabError("no adapters to serve: give run or adapter folders, e.g. peftlab serve runs/<name>")
    options = {
        "max_batch_tokens": args.max_batch_tokens,
        "max_wait_ms": args.max_wait_ms,
        "max_texts": args.max_texts,
        "max_chars": args.max_chars,
        "max_body_bytes": args.max_body_bytes,
        "precision": args.precision,
        "device": args.device,
        "threads": args.threads,
    }
    settings = ServeSettings(
        **{k: v for k, v in options.items() if v is not None},
        batching=not args.no_batching,
        allow_pickle=args.allow_pickle,
    )
    run_server(adapters, settings, host=args.host, port=args.port, access_log=args.access_log)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from peftlab.report import leaderboard_text, load_run_report, write_leaderboard

    if len(args.run_dirs) == 1:
        reports = [load_run_report(args.run_dirs[0])]
    else:
        # `compare runs/*` meets unfinished, failed and stray folders: note them, compare the rest.
        reports = []
        for run_dir in args.run_dirs:
            try:
                reports.append(load_run_report(run_dir))
            except PeftlabError as exc:
                log.warning("skipped %s", str(exc).split(":")[0])
        if not reports:
            raise PeftlabError(
                f"none of the {len(args.run_dirs)} folders is a finished run (no report.json): "
                f"give folders of finished runs, e.g. runs/<name>"
            )
    print(leaderboard_text(reports))
    md, page = write_leaderboard(reports, args.output)
    print(f"\nwrote {md} and {page}")
    return 0


_USER_OS_ERRORS = {
    errno.ENOSPC: "free disk space and run again (a killed run resumes with --resume)",
    errno.EDQUOT: "free space within your quota and run again",
    errno.EROFS: "choose a writable output_dir",
    errno.EACCES: "choose a folder you may write to, or fix its permissions",
    errno.ENAMETOOLONG: "choose a shorter name or output_dir",
}


def cmd_train(args: argparse.Namespace) -> int:
    return cmd_run(args, train_only=True)


# Subcommand name -> the function that carries it out.
COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "methods": cmd_methods,
    "export": cmd_export,
    "sweep": cmd_sweep,
    "tune": cmd_tune,
    "compare": cmd_compare,
    "serve": cmd_serve,
}


def _place_extra(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Hand the arguments argparse left over to the positionals they belong to; exit 2 on any other."""
    # argparse takes positionals only before the first option; `predict` texts and `run`
    # overrides after an option (`predict RUN --json "text"`, `run --overwrite lr=1e-3`) come
    # back here and belong with the others.
    if extra and args.command == "predict" and not any(e.startswith("-") for e in extra):
        args.texts += extra
    elif extra and args.command == "serve" and not any(e.startswith("-") for e in extra):
        args.adapters += extra
    elif extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")


def _run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; a problem the user can fix becomes one line on stderr and its exit status."""
    try:
        return COMMANDS[args.command](args)
    except PeftlabError as exc:
        print(f"peftlab: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRORS:
            raise
        # A full disk, a read-only or forbidden folder, a name too long: the user's to fix.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"peftlab: error: {exc.strerror}{where}: {_USER_OS_ERRORS[exc.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the command line), run the subcommand and return its exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _place_extra(parser, args, extra)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    return _run_command(args)


if __name__ == "__main__":
    sys.exit(main())
