"""Every fine-tuning method on one model and dataset, as one table.

    PEFTLAB_DATA_DIR=../shared/data python bench/methods.py --methods lora,dora,ia3 --epochs 1
    python bench/methods.py --max-train-samples 1000                 # every method, on a subset
    python bench/methods.py --model smollm2-135m --methods lora,prompt_tuning \\
        --max-train-samples 400 --max-eval-samples 300

Each method trains with its default learning rate (its entry in methods/registry.py, or --lr) through
`run_experiment` (no baseline, no reload check, to save time) and is evaluated on the
test split. The table gives method, trainable parameters, adapter size on disk, train
time, accuracy and macro-F1, preceded by the conditions it was measured under. Methods
that cannot run here (qlora, loftq without CUDA) are listed with the reason.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import torch

from peftlab.config import METHODS, load_config
from peftlab.errors import PeftlabError
from peftlab.experiment import run_experiment
from peftlab.runtime import cpu_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="sms_spam")
    parser.add_argument("--methods", default=",".join(METHODS), help="Comma-separated (default: all).")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--lr", type=float, default=None, help="Default: each method's own.")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Any further config override for every method (e.g. head_lr=0.1).",
    )
    parser.add_argument("--output-dir", default=None, help="Where the runs go (default: a temporary folder).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="peftlab-bench-")

    conditions = (
        f"model {args.model}, dataset {args.dataset} (train subset: {args.max_train_samples or 'all'}, "
        f"test subset: {args.max_eval_samples or 'all'}), {args.epochs:g} epoch(s), batch "
        f"{args.batch_size}, lr {args.lr or 'per-method default'}, seed 42, "
        + (f"overrides {' '.join(args.set)}, " if args.set else "")
        + f"CPU {cpu_description()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    print(conditions, flush=True)
    header = (
        f"| {'method':<14} | {'trainable':>11} | {'adapter MB':>10} | {'train s':>8} | {'lr':>7} | {'head lr':>7} | "
        f"{'accuracy':>8} | {'macro-F1':>8} | {'test n':>6} |"
    )
    rows = []
    for method in args.methods.split(","):
        overrides = [
            f"model={args.model}",
            f"dataset={args.dataset}",
            f"method={method}",
            f"epochs={args.epochs}",
            f"batch_size={args.batch_size}",
            f"output_dir={output_dir}",
            f"name=bench-{method}",
            "overwrite=true",
            "save_every=0",
            "log_every=1000",
        ]
        overrides += args.set
        for key in ("max_train_samples", "max_eval_samples", "lr"):
            if getattr(args, key) is not None:
                overrides.append(f"{key}={getattr(args, key)}")
        try:
            cfg = load_config(None, overrides)
            report = run_experiment(cfg, baseline=False, reload=False)
        except PeftlabError as exc:
            rows.append(f"| {method:<14} | not run here: {exc}")
            print(rows[-1], flush=True)
            continue
        m = report["finetuned"]
        rows.append(
            f"| {method:<14} | {report['method']['trainable_params']:>11,} | "
            f"{report['adapter']['size_bytes'] / 1e6:>10.2f} | {report['train']['train_seconds']:>8.1f} | "
            f"{cfg.lr:>7.0e} | {cfg.head_lr:>7.0e} | {m['accuracy']:>8.4f} | {m['macro_f1']:>8.4f} | {m['n']:>6} |"
        )
        print(rows[-1], flush=True)
    separator = "|" + "|".join("-" * len(cell) for cell in header.strip("|").split("|")) + "|"
    print(f"\n{conditions}\n\n{header}\n{separator}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
