"""The bad-input table: every case ends in one line naming the problem and the fix, exit
status 2, no traceback, and leaves an earlier finished run exactly as it was."""

import hashlib
import shutil
import traceback

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
    cfg = load_config(None, [f"model={tiny_encoder}", f"dataset={sentiment_dir}", f"output_dir={root / 'runs'}",
                             "precision=fp32", "max_steps=3", "name=good"])
    run_experiment(cfg)
    paths = {"run": root / "runs" / "good", "tiny": tiny_encoder, "decoder": tiny_decoder,
             "csv": write_csv(root / "data.csv", *make_texts(40, seed=3)), "csvdir": sentiment_dir}
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
    return root, paths


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
]


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_bad_input(argv, message, world, capsys, monkeypatch):
    root, paths = world
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in argv]
    if argv[0] == "run" and "--resume" not in argv and not any(a.startswith("model=") for a in argv):
        argv.append(f"model={paths['tiny']}")
    if argv[0] == "run" and "--resume" not in argv and not any(a.startswith("dataset=") for a in argv):
        argv.append(f"dataset={paths['csvdir']}")
    if argv[0] == "run" and "--name" not in argv and "--resume" not in argv:
        argv.append("max_steps=1")
        if not any(a.startswith("output_dir=") for a in argv):
            argv.append("output_dir=" + str(root / "runs"))
    before = _digest(paths["run"])
    try:
        code = main(argv)
    except BaseException:  # a traceback would reach the user
        pytest.fail("raised instead of a one-line error:\n" + traceback.format_exc())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("peftlab: error: ") and message in err[-1], err
    assert _digest(paths["run"]) == before, "an earlier result changed"


def test_table_is_large_enough():
    assert len(CASES) >= 20
