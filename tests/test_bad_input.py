"""The bad-input table: every case ends in one line naming the problem and the fix, exit
status 2, no traceback, and leaves everything else exactly as it was: a finished sibling
run, a folder outside output_dir (the canaries), and the list of folders around them (a
failed run leaves no folder behind, and nothing is written outside output_dir). Cases
where the right answer is to go on (with a warning) are in the second table."""

import errno
import gzip
import hashlib
import json
import os
import shutil
import traceback

import pandas as pd
import pytest
import torch
from conftest import make_texts, write_csv

from peftlab.cli import main
from peftlab.config import load_config
from peftlab.experiment import run_experiment


@pytest.fixture(scope="module")
def world(tiny_encoder, tiny_decoder, sentiment_dir, tmp_path_factory):
    """A finished run plus a gallery of broken files, folders and adapters."""
    root = tmp_path_factory.mktemp("bad")
    cfg = load_config(
        None,
        [
            f"model={tiny_encoder}",
            f"dataset={sentiment_dir}",
            f"output_dir={root / 'runs'}",
            "precision=fp32",
            "max_steps=3",
            "name=good",
        ],
    )
    run_experiment(cfg)
    paths = {
        "run": root / "runs" / "good",
        "tiny": tiny_encoder,
        "decoder": tiny_decoder,
        "csv": write_csv(root / "data.csv", *make_texts(40, seed=3)),
        "csvdir": sentiment_dir,
    }
    (root / "unseen").mkdir()
    write_csv(root / "unseen" / "train.csv", ["a b", "c d", "e f", "g h"], ["neg", "pos", "neg", "pos"])
    write_csv(root / "unseen" / "test.csv", ["a", "b"], ["neg", "meh"])
    paths["unseen"] = root / "unseen"
    paths["oneclass"] = write_csv(root / "one.csv", ["a", "b", "c"], ["x", "x", "x"])
    paths["latin1"] = root / "latin1.csv"
    paths["latin1"].write_bytes("text,label\ncaf\xe9 ok,pos\nbad,neg\n".encode("latin-1"))
    paths["fakeparquet"] = root / "fake.parquet"
    paths["fakeparquet"].write_text("text,label\nhi,pos\n")
    paths["numbers"] = write_csv(root / "numbers.csv", [1, 2, 3, 4], ["a", "b", "a", "b"], "n", "label")
    paths["emptycsv"] = root / "empty.csv"
    paths["emptycsv"].write_text("")
    paths["badyaml"] = root / "bad.yaml"
    paths["badyaml"].write_text("train: {epochs: [1\n")
    paths["emptydir"] = root / "emptydir"
    paths["emptydir"].mkdir()
    paths["afile"] = root / "a-file"
    paths["afile"].write_text("not a folder")
    # A model folder with pickle weights only.
    paths["pickle_model"] = root / "pickle-model"
    paths["pickle_model"].mkdir()
    shutil.copy(f"{tiny_encoder}/config.json", paths["pickle_model"] / "config.json")
    from safetensors.torch import load_file

    torch.save(load_file(f"{tiny_encoder}/model.safetensors"), paths["pickle_model"] / "pytorch_model.bin")
    # Adapters: a corrupted copy, and one carrying a pickle file.
    paths["corrupt"] = root / "corrupt"
    shutil.copytree(paths["run"] / "adapter", paths["corrupt"])
    weights = paths["corrupt"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55
    weights.write_bytes(bytes(data))
    paths["pickled"] = root / "pickled"
    shutil.copytree(paths["run"] / "adapter", paths["pickled"])
    (paths["pickled"] / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    _data_files(root, paths)
    _adapters_and_runs(root, paths, cfg)
    # Canary: a folder outside output_dir that no case may touch, and one a case may fill.
    paths["outside"] = root / "outside"
    paths["outside"].mkdir()
    (paths["outside"] / "thesis.txt").write_text("four years of work\n")
    paths["scratch"] = root / "scratch"
    paths["scratch"].mkdir()
    return root, paths


def _data_files(root, paths):
    """Data files that are broken in one way each."""
    texts, labels = make_texts(40, seed=4)
    # Split by ';' (texts hold commas, so pandas alone would fail far from the cause).
    paths["semicolon"] = root / "semi.csv"
    paths["semicolon"].write_text("text;label\n" + "".join(f"{t}, w1;{y}\n" for t, y in zip(texts, labels)))
    paths["headeronly"] = root / "header-only.csv"
    paths["headeronly"].write_text("text,label\n")
    # One field more than the header: unquoted commas in every text.
    paths["extrafield"] = root / "extra-field.csv"
    paths["extrafield"].write_text("text,label\n" + "".join(f"{t}, w2,{y}\n" for t, y in zip(texts, labels)))
    paths["parquetcsv"] = root / "parquet.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(paths["parquetcsv"])
    paths["gzipcsv"] = root / "gzipped.csv"
    paths["gzipcsv"].write_bytes(gzip.compress(paths["csv"].read_bytes()))
    paths["swapped"] = write_csv(root / "swapped.csv", labels, texts)  # the texts in the label column
    paths["intlabels"] = write_csv(root / "int-labels.csv", texts, [int(y == "pos") for y in labels])
    paths["sectiontypo"] = root / "typo.yaml"
    paths["sectiontypo"].write_text("trian:\n  epochs: 1\n")
    # A model folder whose config asks to run the model's own code.
    paths["remote"] = root / "remote-code-model"
    shutil.copytree(paths["tiny"], paths["remote"])
    config = json.loads((paths["remote"] / "config.json").read_text())
    config.update(
        model_type="custom-x",
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForSequenceClassification": "modeling_x.XModel"},
    )
    (paths["remote"] / "config.json").write_text(json.dumps(config))


def _adapters_and_runs(root, paths, cfg):
    """Broken adapters, killed runs with changed or broken checkpoints, links and folders."""

    def adapter_copy(key):
        paths[key] = root / key
        shutil.copytree(paths["run"] / "adapter", paths[key])
        return paths[key]

    # Truncated weights whose checksum was updated too: the checksum passes, the file is broken.
    weights = adapter_copy("truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    meta = json.loads((paths["truncated"] / "peftlab.json").read_text())
    meta["weights_sha256"]["adapter_model.safetensors"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (paths["truncated"] / "peftlab.json").write_text(json.dumps(meta))
    (adapter_copy("badconfig") / "adapter_config.json").write_text("{not json")
    # Run folders: one that never finished, one whose run is gone, a link to the good run.
    killed = root / "runs" / "killed"
    _killed_run(cfg, killed)
    for key, change in (("killed_batch", "batch_size: 8"), ("killed_rank", "r: 4")):
        paths[key] = root / "runs" / key
        shutil.copytree(killed, paths[key])
        text = (paths[key] / "config.yaml").read_text()
        old = {"killed_batch": "batch_size: 16", "killed_rank": "r: 8"}[key]
        assert old in text
        (paths[key] / "config.yaml").write_text(text.replace(old, change, 1))
    paths["killed_pickle"] = root / "runs" / "killed_pickle"
    shutil.copytree(killed, paths["killed_pickle"])
    torch.save({"optimizer": os.getcwd}, paths["killed_pickle"] / "checkpoints" / "last" / "optimizer.pt")
    paths["killed_trunc"] = root / "runs" / "killed_trunc"
    shutil.copytree(killed, paths["killed_trunc"])
    last = paths["killed_trunc"] / "checkpoints" / "last" / "trainable.safetensors"
    last.write_bytes(last.read_bytes()[:-64])
    paths["killed"] = killed
    (root / "runs" / "link").symlink_to(paths["run"], target_is_directory=True)
    paths["notarun"] = root / "runs" / "notarun"
    paths["notarun"].mkdir()
    (paths["notarun"] / "thesis.txt").write_text("not a run\n")
    paths["notexport"] = root / "notexport"
    paths["notexport"].mkdir()
    (paths["notexport"] / "notes.txt").write_text("keep me\n")
    (root / "exportlink").symlink_to(paths["notexport"], target_is_directory=True)
    from peftlab.artifacts import export_merged

    paths["exported"] = export_merged(paths["run"] / "adapter", root / "exported")


def _killed_run(cfg, run_dir):
    """A run folder as a killed run leaves it: config.yaml and a checkpoint, no adapter."""
    from peftlab import rundir
    from peftlab.data import PadCollator, load_data, tokenize
    from peftlab.engines.native import train as train_native
    from peftlab.methods import apply_method
    from peftlab.models import load_model

    cfg = load_config(
        None,
        [
            f"model={cfg.model.name}",
            f"dataset={cfg.data.dataset}",
            "precision=fp32",
            "max_steps=2",
            "save_every=1",
            "name=killed",
            f"output_dir={run_dir.parent}",
        ],
    )
    claim = rundir.claim(run_dir.parent, run_dir.name)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    bundle = load_data(cfg.data)
    model, tok, _ = load_model(cfg.model, 2, bundle.label_names)
    model = apply_method(model, cfg.method)
    train_native(
        model,
        tokenize(tok, bundle.train.texts, bundle.train.labels, 64),
        PadCollator(tok.pad_token_id),
        cfg,
        "fp32",
        run_dir / "metrics.jsonl",
        checkpoint_dir=run_dir / "checkpoints",
    )
    claim.release()


CASES = [
    # files and datasets
    (["run", "dataset=no_such_dataset_xyz"], "dataset 'no_such_dataset_xyz' not found"),
    (["run", "dataset=./missing.csv"], "dataset file ./missing.csv does not exist"),
    (["run", "dataset={latin1}"], "is not valid UTF-8"),
    (["run", "dataset={fakeparquet}"], "could not be read as PARQUET"),
    (["run", "dataset={emptycsv}"], "is empty (0 bytes)"),
    # columns and labels
    (["run", "dataset={csv}", "text_column=body"], "text column 'body' not in"),
    (["run", "dataset={csv}", "label_column=lab"], "label column 'lab' not in"),
    (["run", "dataset={numbers}", "text_column=n"], "are not strings"),
    (["run", "dataset={unseen}"], "labels the training data never had: ['meh']"),
    (["run", "dataset={oneclass}"], "single class"),
    # configs
    (["run", "epoch=2"], "did you mean 'epochs'"),
    (["run", "batch_size=big"], "batch_size='big' is not a valid int"),
    (["run", "method=lorra"], "did you mean 'lora'"),
    (["run", "test_size=1.5"], "test_size=1.5 must be between 0 and 1"),
    (["run", "early_stopping_patience=2"], "needs a validation split"),
    (["run", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["run", "--config", "{badyaml}"], "is not valid YAML"),
    # model paths
    (["run", "model=./no/such/model"], "model path ./no/such/model does not exist"),
    (["run", "model={emptydir}"], "has no config.json"),
    (["run", "model=./gone.gguf"], "GGUF file gone.gguf does not exist"),
    (["run", "model={pickle_model}"], "has no safetensors weights"),
    # adapters
    (["predict", "no-such-run", "hi"], "adapter folder no-such-run does not exist"),
    (["predict", "{csvdir}", "hi"], "not a peftlab adapter folder"),
    (["predict", "{corrupt}", "hi"], "do not match their checksum"),
    (["predict", "{pickled}", "hi"], "holds pickle weights"),
    (["predict", "{run}", "   "], "text #1 is empty"),
    (["evaluate", "--adapter", "{run}", "--model", "{decoder}", "--dataset", "{csvdir}"], "was trained on base model"),
    # output directories and resuming
    (["run", "--name", "good"], "already exists: pass --overwrite"),
    (["run", "output_dir={afile}"], "is a file, not a folder"),
    (["run", "--resume", "{csvdir}"], "is not a run directory"),
    (["run", "--resume", "{run}"], "already finished"),
    (["run", "--resume", "{run}", "epochs=3"], "--resume takes no other settings"),
    # --- issue "Nothing lost, nothing escapes" ---
    # run names that would write outside output_dir, or delete what is not a run
    (["run", "name=../../tmp/escape"], "name='../../tmp/escape' is not a plain folder name"),
    (["run", "name=../sibling"], "name='../sibling' is not a plain folder name"),
    (["run", "name={outside}/x"], "is not a plain folder name"),
    (["run", "name=.", "--overwrite"], "name='.' is not a plain folder name"),
    (["run", "name=..", "--overwrite"], "name='..' is not a plain folder name"),
    (["run", "name={outside}", "--overwrite"], "is not a plain folder name"),
    (["run", "name=" + "a" * 300], "name is 300 characters long: use at most 200"),
    (["run", "name=notarun", "--overwrite"], "is not a peftlab run directory: peftlab never replaces it"),
    (["run", "name=link", "--overwrite"], "is a symbolic link: peftlab neither writes nor deletes through links"),
    (["export", "{run}", "--merge", ".", "--overwrite"], "is the current folder or holds it"),
    (["export", "{run}", "--merge", "{notexport}", "--overwrite"], "holds no earlier export"),
    (["export", "{run}", "--merge", "{root}/exportlink", "--overwrite"], "is a symbolic link"),
    (["export", "{run}", "--merge", "{exported}"], "already holds an export: pass --overwrite"),
    # settings that would train an all-NaN adapter and report success
    (["run", "lr=inf"], "train.lr=inf must be a finite number"),
    (["run", "lr=nan"], "train.lr=nan must be a finite number"),
    (["run", "weight_decay=nan"], "train.weight_decay=nan must be a finite number"),
    (["run", "head_lr=nan"], "train.head_lr=nan must be a finite number"),
    (["run", "max_grad_norm=nan"], "train.max_grad_norm=nan must be a finite number"),
    (["run", "epochs=inf"], "train.epochs=inf must be a finite number"),
    (["run", "warmup_ratio=5"], "train.warmup_ratio=5.0 must be in [0, 1]"),
    (["run", "weight_decay=-1"], "train.weight_decay=-1.0 must be 0 or positive"),
    (["run", "alpha=0"], "method.alpha=0.0 must be positive"),
    (["run", "epochs=true"], "epochs=True is not a valid float"),
    (["run", "lr=true"], "lr=True is not a valid float"),
    (["run", "--config", "{sectiontypo}"], "did you mean section 'train'"),
    # data read wrongly or not at all
    (["run", "dataset={semicolon}"], "looks ';'-delimited (its header 'text;label' has no commas)"),
    (["run", "dataset={headeronly}"], "has a header but no data rows"),
    (["run", "dataset={extrafield}"], "its rows have one field more than its header 'text,label'"),
    (["run", "dataset={parquetcsv}"], "is a Parquet file named .csv: rename it to .parquet"),
    (["run", "dataset={gzipcsv}"], "is gzip-compressed: name it gzipped.csv.gz"),
    (["run", "dataset={swapped}"], "label column 'label' has 40 classes in 40 training rows"),
    (
        ["evaluate", "--adapter", "{run}", "--dataset", "{intlabels}"],
        "the data's labels are integers [0, 1] but the adapter's labels are names ['neg', 'pos']",
    ),
    # resuming with changed settings or broken checkpoints
    (["run", "--resume", "{killed_batch}"], "settings changed since its last checkpoint (train.batch_size: 16 -> 8)"),
    (["run", "--resume", "{killed_rank}"], "settings changed since its last checkpoint (method.r: 8 -> 4)"),
    (["run", "--resume", "{killed_pickle}"], "holds objects other than tensors, which peftlab never loads"),
    (["run", "--resume", "{killed_trunc}"], "trainable.safetensors is unreadable"),
    (["run", "--resume", "{root}/runs/link"], "cannot resume: run directory"),
    # models and adapters
    (
        ["run", "model={remote}"],
        "ships its own Python code, which peftlab runs only when asked: pass --trust-remote-code",
    ),
    (["predict", "{truncated}", "hi"], "are unreadable"),
    (["predict", "{badconfig}", "hi"], "adapter_config.json is corrupted (not valid JSON)"),
    (["predict", "{killed}", "hi"], "is unfinished (no adapter yet): continue it with `peftlab run --resume"),
    (["compare", "{killed}"], "has no report.json"),
    (["compare", "{killed}", "{killed_batch}"], "none of the 2 folders is a finished run"),
    (["predict", "{run}", "--file", "{root}/no-such.txt"], "text file"),
]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somefile")


def _disk_full_at_adapter(monkeypatch):
    import peftlab.artifacts

    monkeypatch.setattr(peftlab.artifacts, "sha256_file", _full)  # inside the adapter's save


def _disk_full_at_start(monkeypatch):
    import peftlab.files

    monkeypatch.setattr(peftlab.files, "write_text_atomic", _full)  # config.yaml, the first file


# Cases that need the world changed while they run: (argv, expected message, patch). The
# disk fills after training: the checkpoint stays, so the run folder stays (in scratch).
PATCHED = [
    (
        ["run", "output_dir={scratch}", "name=fulldisk", "max_steps=1"],
        "could not write the adapter to",
        _disk_full_at_adapter,
    ),
    (
        ["run", "output_dir={scratch}", "name=fulldisk2", "max_steps=1"],
        "No space left on device (somefile): free disk space",
        _disk_full_at_start,
    ),
]


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _canaries(root, paths):
    """What no bad input may change: the finished run, the folder outside output_dir, and
    which folders exist beside them (the scratch folder excepted)."""
    return (
        _digest(paths["run"]),
        _digest(paths["outside"]),
        sorted(os.listdir(root)),
        sorted(os.listdir(root / "runs")),
        sorted(os.listdir(paths["killed"])),
        sorted(os.listdir(root.parent)),
    )


CASES += [(argv, message) for argv, message, _ in PATCHED]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input(argv, message, world, capsys, monkeypatch):
    root, paths = world
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    for patched_argv, _, patch in PATCHED:
        if argv == patched_argv:
            patch(monkeypatch)
    argv = [a.format(root=root, **{k: str(v) for k, v in paths.items()}) for a in argv]
    if argv[0] == "run" and "--resume" not in argv and not any(a.startswith("model=") for a in argv):
        argv.append(f"model={paths['tiny']}")
    if argv[0] == "run" and "--resume" not in argv and not any(a.startswith("dataset=") for a in argv):
        argv.append(f"dataset={paths['csvdir']}")
    if argv[0] == "run" and "--name" not in argv and "--resume" not in argv:
        argv.append("max_steps=1")
        if not any(a.startswith("output_dir=") for a in argv):
            argv.append("output_dir=" + str(root / "runs"))
    before = _canaries(root, paths)
    try:
        code = main(argv)
    except BaseException:  # a traceback would reach the user
        pytest.fail("raised instead of a one-line error:\n" + traceback.format_exc())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("peftlab: error: ") and message in err[-1], err
    assert _canaries(root, paths) == before, "an earlier result changed, or something was written outside"


def _handled_files(root):
    """Inputs that are awkward but can be read right: each must run, with a word on stderr."""
    texts, labels = make_texts(120, seed=6)
    root.mkdir()
    paths = {"quotetsv": root / "quotes.tsv", "mergedcsv": root / "merged.csv", "missingclass": root / "missingclass"}
    # An unquoted TSV where some texts start with '"': pandas' quoting merged 62 of 120 rows.
    paths["quotetsv"].write_text(
        "text\tlabel\n"
        + "".join(f'"{t}\t{y}\n' if i % 3 == 0 else f"{t}\t{y}\n" for i, (t, y) in enumerate(zip(texts, labels)))
    )
    # A CSV whose unbalanced quotes merge lines: read as pandas reads it, and counted.
    paths["mergedcsv"].write_text(
        "text,label\n"
        + "".join(
            f'"{t},{y}\n' if i % 2 == 0 else f"{t},{y}\n" for i, (t, y) in enumerate(zip(texts[:40], labels[:40]))
        )
    )
    paths["nanlabels"] = write_csv(
        root / "nan-labels.csv", texts + ["w1 good", "w2 bad", "w3"], labels + ["NaN", "NaN", "None"]
    )
    paths["caselabels"] = write_csv(
        root / "case-labels.csv",
        texts,
        [y.capitalize() if i % 7 == 0 else f" {y} " if i % 5 == 0 else y for i, y in enumerate(labels)],
    )
    paths["missingclass"].mkdir()
    write_csv(paths["missingclass"] / "train.csv", texts + ["w5 w6", "w7 w8"], labels + ["meh", "meh"])
    write_csv(paths["missingclass"] / "test.csv", *make_texts(20, seed=5))
    return paths


HANDLED = [
    # (argv, what stderr must say (None: nothing in particular), what the report must hold)
    (["run", "dataset={quotetsv}"], None, lambda r: r["data"]["rows_read"] == 120),
    (
        ["run", "dataset={mergedcsv}"],
        "20 of its 41 lines did not become rows of their own",
        lambda r: r["data"]["rows_merged_or_dropped"] == 20,
    ),
    (
        ["run", "dataset={nanlabels}"],
        "dropped 2 train rows whose label is 'NaN', taken as a missing label",
        lambda r: r["label_names"] == ["neg", "pos"] and r["data"]["rows_read"] == 123,
    ),
    (
        ["run", "dataset={caselabels}"],
        "labels that differ only in case taken as one class",
        lambda r: r["label_names"] == ["neg", "pos"],
    ),
    (
        ["run", "dataset={missingclass}"],
        "1 of 3 classes have no test examples: ['meh']",
        lambda r: (
            r["data"]["classes_missing_from_test"] == ["meh"]
            and r["finetuned"]["macro_f1_over"] == "classes present in the evaluated labels (2 of 3)"
        ),
    ),
]


@pytest.fixture(scope="module")
def handled_files(world):
    return _handled_files(world[0] / "handled")


@pytest.mark.parametrize("argv,said,holds", HANDLED, ids=[" ".join(c[0])[:40] for c in HANDLED])
def test_awkward_input_that_can_be_read_right_runs_and_says_so(
    argv, said, holds, world, handled_files, capsys, monkeypatch
):
    root, paths = world
    monkeypatch.chdir(root)
    argv = [a.format(**{k: str(v) for k, v in handled_files.items()}) for a in argv]
    name = f"handled-{len(os.listdir(root / 'scratch'))}"
    before = _canaries(root, paths)
    code = main(
        [
            *argv,
            f"model={paths['tiny']}",
            "max_steps=2",
            "precision=fp32",
            f"name={name}",
            f"output_dir={root / 'scratch'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert said is None or said in err, err[-3000:]
    assert holds(json.loads((root / "scratch" / name / "report.json").read_text()))
    assert _canaries(root, paths)[:2] == before[:2]


def test_adapter_without_checksums_loads_with_a_warning(world, capsys, monkeypatch):
    """peftlab.json stripped of weights_sha256 (and the weights changed): predicting still
    works, but says that the weights were not verified."""
    root, paths = world
    adapter = root / "scratch" / "nochecksum"
    shutil.copytree(paths["run"] / "adapter", adapter)
    meta = json.loads((adapter / "peftlab.json").read_text())
    del meta["weights_sha256"]
    (adapter / "peftlab.json").write_text(json.dumps(meta))
    assert main(["predict", str(adapter), "w1 good"]) == 0
    assert (
        "records no weight checksums (weights_sha256): the adapter's weights are not verified"
        in capsys.readouterr().err
    )


def test_a_run_that_failed_on_bad_data_leaves_its_name_free(world, capsys):
    root, paths = world
    common = [f"model={paths['tiny']}", "max_steps=1", "precision=fp32", "name=retry", f"output_dir={root / 'scratch'}"]
    assert main(["run", f"dataset={paths['headeronly']}", *common]) == 2
    assert not (root / "scratch" / "retry").exists()
    assert main(["run", f"dataset={paths['csvdir']}", *common]) == 0, capsys.readouterr().err[-2000:]
    assert (root / "scratch" / "retry" / "report.json").is_file()


RACE = """
import sys, time
from pathlib import Path
from peftlab import rundir
from peftlab.errors import PeftlabError
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    claim = rundir.claim(Path(sys.argv[1]), "race")
except PeftlabError as exc:
    print("refused:", exc)
else:
    (claim.path / "config.yaml").write_text("mine")  # what a run writes first
    print("claimed")
"""


def test_two_runs_started_together_never_share_a_folder(tmp_path):
    """The same run name started by two processes at the same instant, 10 times: exactly one
    claims the folder each time (the exists-check and the creation are one atomic step)."""
    import subprocess
    import sys
    import time

    for trial in range(10):
        root = tmp_path / f"trial{trial}"
        start = time.time() + 1.0  # both processes are up and spinning by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACE, str(root), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=60) for p in procs]
        claimed = [out for out, _ in outs if out.startswith("claimed")]
        assert len(claimed) == 1, outs
        assert sorted(os.listdir(root)) == ["race"]


def test_two_cli_runs_with_one_name_one_wins(world, tmp_path):
    """The same through the real CLI: one run finishes, the other exits 2 without touching it."""
    import subprocess
    import sys

    root, paths = world
    argv = [
        sys.executable,
        "-m",
        "peftlab.cli",
        "run",
        f"model={paths['tiny']}",
        f"dataset={paths['csvdir']}",
        "max_steps=2",
        "precision=fp32",
        "name=race",
        f"output_dir={tmp_path}",
    ]
    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in outs) == [0, 2], outs
    loser = next(err for code, _, err in outs if code == 2)
    assert "run directory" in loser.strip().splitlines()[-1]
    assert json.loads((tmp_path / "race" / "report.json").read_text())["name"] == "race"
