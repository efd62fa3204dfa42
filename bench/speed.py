"""Training and evaluation throughput: the stock Hugging Face recipe vs peftlab.

    python bench/speed.py                                   # MiniLM + LoRA, sms_spam 80/20
    python bench/speed.py --variants stock,peftlab,peftlab_length --rounds 3   # medians of 3
    python bench/speed.py --dataset imdb --max-length 256 --max-train-samples 2000 --max-eval-samples 500
    python bench/speed.py --model smollm2-135m --max-train-samples 400 --max-eval-samples 300 --max-length 96

Variants, each in its own process (so peak memory is its own) on the same data, split,
model, LoRA config (r=8, alpha=16, dropout 0.1, targets query/value: peft's BERT default),
batch size, epochs, learning rate and seed:
  a  stock:   Trainer + peft LoRA + DataCollatorWithPadding (random batches), fp32
  b  grouped: the same with train_sampling_strategy="group_by_length"
  c  peftlab: peftlab's native loop at its defaults (packing=auto, batching=auto,
     precision=auto): packed batches (no padding) that keep the class mix (stratified)
  g  peftlab_nopack: c with packing=never (padded batches; the default before packing:
     length-grouped, or length-grouped within each class where length predicts the label)
  f  peftlab_length: c with packing=never batching=length (plain length grouping, least
     padding of the padded variants, but batches of one class where length predicts it)
  h  peftlab_fp32: c with precision=fp32
  d  peftlab_nodrop: c with the base model's own dropout off (model_dropout=0; LoRA's
     dropout stays), a speed option, not the default
  e  peftlab_compile: c with torch.compile (dynamic shapes; compile time included)
  i  peftlab_fp32_compile: h with torch.compile
It also measures this machine's fp32/bf16 matmul rate and prints peftlab's training time
as a multiple of the arithmetic floor: FLOPs for the real (non-padding) tokens divided by
the measured fp32 rate. FLOPs per token = 4 x (linear-layer weights) — a forward pass (2)
plus the backward pass to the activations (2); frozen weights get no weight gradients —
plus attention's 4 x context x hidden per layer (x2 with its backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def matmul_rate(dtype_name: str, n: int = 1024, repeats: int = 20) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    reps = repeats if dtype_name == "fp32" else 2  # bf16 may be emulated (slow) on CPUs without it
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def load_split(args):
    from peftlab.config import DataConfig
    from peftlab.data import load_data

    cfg = DataConfig(
        dataset=args.dataset,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        max_length=args.max_length,
    )
    return load_data(cfg, args.data_dir or os.environ.get("PEFTLAB_DATA_DIR"))


def run_stock(args, grouped: bool) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from peftlab.models import resolve

    bundle = load_split(args)
    source = resolve(args.model)
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(source.path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=len(bundle.label_names), **kw)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF: de-quantized on load, but Trainer
        model.hf_quantizer.remove_quantization_config(model)  # refuses a model still marked quantized
    targets = ["query", "value"] if model.config.model_type == "bert" else ["q_proj", "v_proj"]
    model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets)
    )

    def encode(texts, labels):
        ds = Dataset.from_dict({"text": texts, "label": labels})
        return ds.map(
            lambda b: tok(b["text"], truncation=True, max_length=args.max_length), batched=True, remove_columns=["text"]
        )

    train, test = encode(bundle.train.texts, bundle.train.labels), encode(bundle.test.texts, bundle.test.labels)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=args.batch_size,
                num_train_epochs=args.epochs,
                learning_rate=args.lr,
                weight_decay=0.01,
                warmup_steps=0.06,
                seed=args.seed,
                use_cpu=not torch.cuda.is_available(),
                report_to="none",
                save_strategy="no",
                logging_steps=50,
                label_names=["labels"],
                remove_unused_columns=False,
                disable_tqdm=True,
                train_sampling_strategy="group_by_length" if grouped else "random",
            ),
            train_dataset=train,
            data_collator=DataCollatorWithPadding(tok),
        )
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        pred = trainer.predict(test)
        eval_seconds = time.perf_counter() - start
    accuracy = float((np.asarray(pred.predictions).argmax(-1) == np.asarray(bundle.test.labels)).mean())
    return {
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "accuracy": accuracy,
        "train_n": len(bundle.train.texts),
        "eval_n": len(bundle.test.texts),
    }


def run_peftlab(args, extra: list[str] = ()) -> dict:
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"model={args.model}",
            f"dataset={args.dataset}",
            f"max_length={args.max_length}",
            f"epochs={args.epochs}",
            f"batch_size={args.batch_size}",
            f"lr={args.lr}",
            f"seed={args.seed}",
            "target_modules=[query,value]" if args.model == "minilm" else "target_modules=[q_proj,v_proj]",
            f"precision={args.precision}",
            f"eval_batch_size={args.eval_batch_size}",
            f"output_dir={out}",
            "save_every=0",
            "log_every=1000000",
        ]
        overrides += list(extra)
        if args.data_dir:
            overrides.append(f"data_dir={args.data_dir}")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(args, key):
                overrides.append(f"{key}={getattr(args, key)}")
        report = run_experiment(load_config(None, overrides), baseline=False, reload=False)
    return {
        "train_seconds": report["train"]["train_seconds"],
        "eval_seconds": report["finetuned"]["eval_seconds"],
        "accuracy": report["finetuned"]["accuracy"],
        "train_n": report["data"]["train_size"],
        "eval_n": report["data"]["test_size"],
        "precision": report["train"]["precision"],
    }


def model_facts(args) -> dict:
    """Real tokens, mean padded context and linear-layer weights, for the FLOPs floor."""
    import torch

    from peftlab.models import resolve

    bundle = load_split(args)
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    source = resolve(args.model)
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(source.path, **kw)
    lengths = [len(x) for x in tok(bundle.train.texts, truncation=True, max_length=args.max_length)["input_ids"]]
    config = AutoConfig.from_pretrained(source.path, **kw)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith(("classifier", "score"))
    )
    return {
        "tokens": sum(lengths),
        "mean_len": sum(lengths) / len(lengths),
        "linear_params": linear,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def child(args) -> None:
    result = {
        "stock": lambda: run_stock(args, False),
        "grouped": lambda: run_stock(args, True),
        "peftlab": lambda: run_peftlab(args),
        "facts": lambda: model_facts(args),
        "peftlab_nodrop": lambda: run_peftlab(args, ["model_dropout=0"]),
        "peftlab_compile": lambda: run_peftlab(args, ["compile=true"]),
        "peftlab_length": lambda: run_peftlab(args, ["batching=length", "packing=never"]),
        "peftlab_nopack": lambda: run_peftlab(args, ["packing=never"]),
        "peftlab_fp32": lambda: run_peftlab(args, ["precision=fp32"]),
        "peftlab_fp32_compile": lambda: run_peftlab(args, ["precision=fp32", "compile=true"]),
    }[args.variant]()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--dataset", default="sms_spam")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", default="auto")
    p.add_argument("--variants", default="stock,grouped,peftlab")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variants this many times, every other round in reverse order; the table gives each "
        "variant's median and the ratios of each round's own pair (whole runs on a shared 2-core machine move "
        "by 10-20%% from one to the next, and a run right after another can be slower)",
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.variant:
        return child(args)

    import torch

    print(
        f"# bench/speed.py  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}"
    )
    from peftlab.runtime import cpu_description

    print(f"# CPU: {cpu_description()}")
    print(
        f"# model {args.model}, dataset {args.dataset}, max_length {args.max_length}, batch {args.batch_size}, "
        f"epochs {args.epochs}, lr {args.lr}, seed {args.seed}, subsets train={args.max_train_samples} "
        f"eval={args.max_eval_samples}, rounds {args.rounds} (medians; every other round in reverse order)"
    )
    rates = {d: matmul_rate(d) for d in ("fp32", "bf16")}
    print(
        f"# matmul 1024^3: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s", flush=True
    )

    def spawn(variant):
        cmd = [sys.executable, __file__, "--variant", variant] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
        result = json.loads(line[7:])
        # Each variant's raw figures as soon as it ends: a run stopped later keeps them.
        print(f"# {time.strftime('%H:%M')} {variant}: {json.dumps(result)}", flush=True)
        return result

    facts = spawn("facts")
    variants = args.variants.split(",")
    rounds = []  # per round: variant -> result
    for r in range(args.rounds):
        rounds.append({v: spawn(v) for v in (variants if r % 2 == 0 else variants[::-1])})
    report(args, facts, rates, variants, rounds)


def report(args, facts: dict, rates: dict, variants: list[str], rounds: list[dict]) -> None:
    """The table (each variant's median run), peftlab's ratios and the arithmetic floor."""
    tokens = facts["tokens"] * args.epochs
    for runs in rounds:
        for res in runs.values():
            res["train_sps"] = res["train_n"] * args.epochs / res["train_seconds"]
            res["eval_sps"] = res["eval_n"] / res["eval_seconds"]
    results = {v: _median_run([runs[v] for runs in rounds]) for v in variants}
    print("\n| variant | train samples/s | real tokens/s | eval samples/s | peak RSS MB | accuracy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        label = {
            "stock": "a stock Trainer",
            "grouped": "b Trainer + group_by_length",
            "peftlab": "c peftlab",
            "peftlab_nodrop": "d peftlab, model_dropout=0",
            "peftlab_compile": "e peftlab, compile=true",
            "peftlab_length": "f peftlab, packing=never batching=length",
            "peftlab_nopack": "g peftlab, packing=never",
            "peftlab_fp32": "h peftlab, precision=fp32",
            "peftlab_fp32_compile": "i peftlab, precision=fp32 compile=true",
        }[name]
        if name.startswith("peftlab"):
            label += f" ({r['precision']})"
        print(
            f"| {label} | {r['train_sps']:.1f} | {tokens / r['train_seconds']:.0f} | {r['eval_sps']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |"
        )
    if "peftlab" in results:
        c = results["peftlab"]
        for base, letter in (("stock", "a"), ("grouped", "b"), ("peftlab_length", "f"), ("peftlab_nopack", "g")):
            if base in results:
                b = results[base]
                print(
                    f"\nc/{letter}: train {c['train_sps'] / b['train_sps']:.2f}x, eval {c['eval_sps'] / b['eval_sps']:.2f}x, "
                    f"accuracy {100 * (c['accuracy'] - b['accuracy']):+.2f} points"
                )
                if len(rounds) > 1:
                    each = [runs["peftlab"]["train_sps"] / runs[base]["train_sps"] for runs in rounds]
                    print(f"  train c/{letter} by round: " + ", ".join(f"{x:.2f}x" for x in each))
        flops = tokens * (4 * facts["linear_params"] + 2 * 4 * facts["layers"] * facts["mean_len"] * facts["hidden"])
        print(f"\narithmetic floor: {flops / 1e12:.2f} TFLOP for {tokens:,.0f} real tokens")
        for name in ("fp32", c["precision"]) if c["precision"] != "fp32" else ("fp32",):
            floor = flops / rates[name]
            print(
                f"  at the {name} matmul rate: {floor:.1f} s; peftlab ({c['precision']}) trained in "
                f"{c['train_seconds']:.1f} s = {c['train_seconds'] / floor:.2f}x this floor"
            )


def _median_run(runs: list[dict]) -> dict:
    """The run with the median train speed (the lower middle one of an even count), its
    eval speed the median of all."""
    ordered = sorted(runs, key=lambda r: r["train_sps"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["eval_sps"] = sorted(r["eval_sps"] for r in runs)[(len(runs) - 1) // 2]
    return out


if __name__ == "__main__":
    main()
