"""`peftlab compare`: the leaderboard over finished runs, from their report.json files."""

import json

import pytest
from test_cli import peftlab

from peftlab.errors import PeftlabError
from peftlab.report import REPORT_FORMAT_VERSION, leaderboard_rows, load_run_report, seed_summary_rows


def fake_report(name: str, macro_f1: float, seed: int = 1, lr: float = 1e-3) -> dict:
    """The report.json fields the leaderboard reads."""
    return {
        "name": name,
        "config": {"name": name, "output_dir": "runs", "train": {"seed": seed, "lr": lr}},
        "finetuned": {"accuracy": macro_f1 + 0.01, "macro_f1": macro_f1},
        "method": {"trainable_params": 1234},
        "adapter": {"size_bytes": 2_500_000},
        "train": {"train_seconds": 3.0, "train_samples_per_s": 100.0},
    }


def write_run(root, report):
    run_dir = root / report["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


def test_leaderboard_sorts_by_macro_f1():
    rows = leaderboard_rows([fake_report("a", 0.5), fake_report("b", 0.9), fake_report("c", 0.7)])
    assert [r[0] for r in rows] == ["b", "c", "a"]
    assert rows[0][1:] == ["0.9100", "0.9000", "1,234", "2.50", "3.0", "100.0"]


def test_seed_summary_groups_only_otherwise_equal_settings():
    reports = [
        fake_report("s1", 0.6, seed=1),
        fake_report("s2", 0.8, seed=2),
        fake_report("other", 0.9, seed=1, lr=5e-3),
    ]
    (row,) = seed_summary_rows(reports)  # the lone lr=5e-3 run has no spread to report
    assert row[1] == "2" and row[3] == "0.7000 ± 0.1414"


def test_folder_without_report_is_a_clear_error(tmp_path):
    with pytest.raises(PeftlabError, match=r"has no report.json: give finished run folders"):
        load_run_report(tmp_path)


def test_report_from_a_newer_peftlab_is_a_clear_error(tmp_path):
    run_dir = write_run(tmp_path, dict(fake_report("a", 0.5), format_version=REPORT_FORMAT_VERSION + 1))
    with pytest.raises(
        PeftlabError,
        match=rf"report.json was written by a newer peftlab \(report format "
        rf"{REPORT_FORMAT_VERSION + 1}, this one reads up to "
        rf"{REPORT_FORMAT_VERSION}\): upgrade peftlab",
    ):
        load_run_report(run_dir)


@pytest.mark.parametrize("version", [None, REPORT_FORMAT_VERSION])
def test_report_of_this_format_or_older_without_version_loads(tmp_path, version):
    report = fake_report("a", 0.5) if version is None else dict(fake_report("a", 0.5), format_version=version)
    assert load_run_report(write_run(tmp_path, report)) == report


def test_compare_cli_prints_and_writes_leaderboard(tmp_path):
    a = write_run(tmp_path / "runs", fake_report("a", 0.5))
    b = write_run(tmp_path / "runs", fake_report("b", 0.9))
    out = peftlab("compare", a, b, "--output", tmp_path / "out" / "board", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "accuracy", "macro-F1"] and lines[2].startswith("b ")
    assert "| b | 0.9100 | 0.9000 |" in (tmp_path / "out" / "board.md").read_text()
    assert 'id="leaderboard"' in (tmp_path / "out" / "board.html").read_text()
    default = peftlab("compare", a, cwd=tmp_path)
    assert default.returncode == 0 and (tmp_path / "leaderboard.md").is_file()


def test_compare_cli_rejects_unfinished_folder(tmp_path):
    out = peftlab("compare", tmp_path, cwd=tmp_path)
    assert out.returncode != 0
    assert (
        out.stderr.strip()
        == f"peftlab: error: {tmp_path} has no report.json: give finished run folders (e.g. runs/<name>)"
    )


def test_compare_skips_unfinished_folders_among_several(tmp_path):
    a = write_run(tmp_path, fake_report("a", 0.8))
    (tmp_path / "killed").mkdir()
    out = peftlab("compare", a, tmp_path / "killed", "--output", tmp_path / "board", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "skipped " in out.stderr and "killed has no report.json" in out.stderr
    assert "| a " in (tmp_path / "board.md").read_text()
