"""README.md for an adapter folder: the Hugging Face model card, saying what was trained on
what, how well, and how to load it with peftlab and, where the artifact allows, without."""

from __future__ import annotations

from peftlab.report.tables import markdown_table
from peftlab.report.text import COMPARISON_HEADER, comparison_rows

# What loads a method's artifact (MethodSpec.artifact), for the card's library_name: peft
# adapter files, a complete transformers model, or head.safetensors, which only peftlab reads.
CARD_LIBRARY = {"peft": "peft", "full": "transformers", "head": "peftlab"}


def model_card(report: dict) -> str:
    """README.md for the adapter folder, in the Hugging Face model-card convention: YAML front
    matter (library_name, base_model, tags, datasets, metrics), then what was trained on
    what, how well, and how to load it with peftlab and, where the artifact allows, with
    plain transformers/peft."""
    import yaml

    from peftlab.methods.registry import METHODS

    cfg, data = report["config"], report["data"]
    spec, base, names = METHODS[cfg["method"]["name"]], cfg["model"]["name"], report["label_names"]
    # The card keeps the headline measures and per-class F1; report.md has the rest.
    rows = [row for row in comparison_rows(report) if row[0] in ("loss", "accuracy", "macro-F1") or ": f1" in row[0]]
    out = [
        "---",
        yaml.safe_dump(_card_front_matter(report, spec), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {report['name']}",
        "",
        f"A **{spec.name}** adapter for text classification into {len(names)} classes "
        f"({', '.join(f'`{n}`' for n in names)}), trained with peftlab on top of the base model below.",
        "",
        "## Base model",
        "",
        f"`{base}` ({report['model']['class']}, {report['model']['total_params']:,} parameters; "
        f"{report['method']['trainable_params']:,} trained).",
        "",
        "## Data",
        "",
        f"- dataset: `{data['dataset']}` from {data['source']}",
        f"- split: {data['split']} ({data['train_size']:,} train / {data['test_size']:,} test)",
        f"- train labels: {data['train_label_counts']}",
        f"- max length: {data.get('max_length', cfg['data']['max_length'])} tokens",
        f"- fingerprint: `{data['fingerprint']}`",
        "",
        "## Method",
        "",
        f"`{spec.name}`: {spec.description}.",
        "",
        "```yaml",
        yaml.safe_dump({"method": cfg["method"], "train": cfg["train"]}, sort_keys=False).rstrip(),
        "```",
        "",
        "## Metrics (test split)",
        "",
        *markdown_table(COMPARISON_HEADER, rows),
        "",
        *_card_usage(spec, base, len(names)),
        f"Labels by class index: {dict(enumerate(names))}. Training details: `peftlab.json` in this folder.",
        "",
    ]
    return "\n".join(out)


def _card_front_matter(report: dict, spec) -> dict:
    """The model card's YAML header: what loads it, base model, tags, data and test metrics."""
    dataset, tuned = str(report["data"]["dataset"]), report["finetuned"]
    return {
        "library_name": CARD_LIBRARY[spec.artifact],
        "base_model": report["config"]["model"]["name"],
        "pipeline_tag": "text-classification",
        "tags": ["peftlab", "text-classification", spec.name],
        "datasets": [dataset],
        "metrics": ["accuracy", "f1"],
        "model-index": [
            {
                "name": report["name"],
                "results": [
                    {
                        "task": {"type": "text-classification"},
                        "dataset": {"name": dataset, "type": dataset, "split": "test"},
                        "metrics": [
                            {"type": "accuracy", "value": round(tuned["accuracy"], 4)},
                            {"type": "f1", "name": "macro-F1", "value": round(tuned["macro_f1"], 4)},
                        ],
                    }
                ],
            }
        ],
    }


# The card's "How to use" with peftlab: the same for every method.
_PEFTLAB_USAGE = [
    "## How to use",
    "",
    "With peftlab:",
    "",
    "```python",
    "from peftlab import Predictor",
    "",
    'predict = Predictor("path/to/adapter")  # this folder',
    'predict(["some text"])',
    "```",
    "",
    "```bash",
    'peftlab predict path/to/adapter "some text"',
    "```",
    "",
]


def _card_usage(spec, base: str, num_labels: int) -> list[str]:
    """The card's "How to use" section: with peftlab, then as the artifact allows without it."""
    out = list(_PEFTLAB_USAGE)
    if spec.artifact == "head":
        return [
            *out,
            f"{spec.name} trains {spec.about}. `head.safetensors` in this folder holds those weights, not "
            f"a complete model: load it with peftlab, which puts them on a fresh copy of `{base}`.",
            "",
        ]
    if spec.artifact == "full":
        return [
            *out,
            "With plain transformers:",
            "",
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            'model = AutoModelForSequenceClassification.from_pretrained("path/to/adapter")  # this folder',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")',
            "```",
            "",
        ]
    out += [
        "With plain transformers and peft:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        f'base = AutoModelForSequenceClassification.from_pretrained("{base}", num_labels={num_labels})',
        'model = PeftModel.from_pretrained(base, "path/to/adapter")  # this folder',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
        "",
    ]
    if spec.past_key_values:
        out += [
            "On transformers 5 the base model must first take the learned prefixes as `past_key_values`: "
            "call `peftlab.methods.accept_past_key_values(base)` before `PeftModel.from_pretrained`, as "
            "peftlab's `Predictor` does.",
            "",
        ]
    elif spec.family == "prompt":
        out += [
            "peftlab's `Predictor` also applies its pooling fix, `peftlab.methods.fix_prompt_pooling(model)`: "
            "without it, pooling reads a virtual token instead of [CLS] (encoders) or of the last real "
            "token (decoders), and predictions differ.",
            "",
        ]
    return out
