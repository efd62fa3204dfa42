"""Grid sweeps: one run per combination of the values under a config's `sweep:` key.

    sweep:
      method.name: [lora, head]
      train.lr: [1e-3, 5e-3]
      train.seed: [1, 2]

Runs are folders `<output_dir>/<sweep name>/<key=value,...>`, in the grid's order, so a restarted sweep
finds the runs it already finished (their report.json) and skips them, and continues a run
that was killed part-way from its last checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any

import yaml

from peftlab.config import (
    RunConfig,
    apply_overrides,
    field_index,
    from_dict,
    read_yaml,
    run_name_problems,
    safe_run_name,
    set_value,
)
from peftlab.errors import PeftlabError

log = logging.getLogger("peftlab")


def load_sweep(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RunConfig, dict[str, list]]:
    """The base config and the grid (key -> values) from a YAML file's `sweep:` key and from
    `sweep.KEY=[v1, v2]` overrides; other overrides apply to the base. Raises PeftlabError."""
    data = read_yaml(path) if path is not None else {}
    # The grid is not a RunConfig field: split it off before the config is validated.
    grid = dict(data.pop("sweep", None) or {})
    base = from_dict(data, source=str(path or "config"))
    plain = []
    for item in overrides or []:
        key, _, raw = item.partition("=")
        if key.startswith("sweep."):
            grid[key.removeprefix("sweep.")] = yaml.safe_load(raw)
        else:
            plain.append(item)
    apply_overrides(base, plain)
    if not grid:
        raise PeftlabError(
            "nothing to sweep: add a `sweep:` mapping of key -> list of values to the config, "
            "or sweep.KEY=[v1,v2] overrides"
        )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PeftlabError(f"sweep.{key} must be a non-empty list of values, e.g. [1e-3, 5e-3]")
    return base, grid


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def run_name(combo: dict[str, Any]) -> str:
    """The run folder's name within the sweep's folder: `key=value,...` (other characters,
    as in list values, become '_')."""
    return safe_run_name(",".join(f"{key}={value}" for key, value in combo.items()))


def _get(cfg: RunConfig, key: str) -> Any:
    target: Any = cfg
    for part in field_index()[key].split("."):
        target = getattr(target, part)
    return target


def plan(base: RunConfig, grid: dict[str, list], sweep_name: str) -> list[RunConfig]:
    """One validated RunConfig per combination; every invalid one is reported at once."""
    if run_name_problems(sweep_name):
        raise PeftlabError(f"sweep {run_name_problems(sweep_name)[0]}")
    configs, problems = [], []
    for combo in combinations(grid):
        cfg = copy.deepcopy(base)
        # Each run is a folder of the sweep's own folder: <output_dir>/<sweep>/<key=value,...>.
        cfg.output_dir = str(Path(base.output_dir) / sweep_name)
        cfg.name = run_name(combo)
        try:
            for key, value in combo.items():
                set_value(cfg, key, value)
            # Name by the values as set (e.g. lr "1e-3" from the command line becomes 0.001),
            # so the same grid gives the same names however it was written.
            cfg.name = run_name({key: _get(cfg, key) for key in combo})
            configs.append(cfg.validate())
        except PeftlabError as exc:
            problems.append(f"{sweep_name}/{cfg.name}: {exc}")
    if problems:
        raise PeftlabError("invalid sweep: " + "; ".join(problems))
    return configs


def run_sweep(base: RunConfig, grid: dict[str, list], sweep_name: str) -> list[dict]:
    """Run each combination not yet finished; returns every run's report (finished before or now)."""
    from peftlab.experiment import run_experiment
    from peftlab.report import load_run_report

    configs = plan(base, grid, sweep_name)
    reports = []
    for n, cfg in enumerate(configs, 1):
        run_dir = Path(cfg.output_dir) / cfg.name
        if (run_dir / "report.json").is_file():
            log.info("sweep %d/%d: %s already finished, skipped", n, len(configs), cfg.name)
            reports.append(load_run_report(run_dir))
            continue
        log.info("sweep %d/%d: %s", n, len(configs), cfg.name)
        if _resumable(cfg, run_dir):
            log.info(
                "sweep %d/%d: %s was killed part-way: resuming it from its last checkpoint", n, len(configs), cfg.name
            )
            reports.append(run_experiment(cfg, resume=True))
            continue
        # Anything else in the folder (no checkpoint yet, other settings) starts again.
        reports.append(run_experiment(dataclasses.replace(cfg, overwrite=True)))
    return reports


def _resumable(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether `run_dir` holds a killed run of exactly this config with a checkpoint to
    continue from (the native engine's; the Trainer engine keeps none)."""
    from peftlab import checkpoint
    from peftlab.config import load_config

    if cfg.train.engine != "native" or not (run_dir / "checkpoints" / "last" / checkpoint.STATE).is_file():
        return False
    try:
        saved = load_config(run_dir / "config.yaml")
    except PeftlabError:
        return False
    # The run itself records overwrite=True (the sweep set it); that is not a setting.
    saved.overwrite = cfg.overwrite
    return saved.to_dict() == cfg.to_dict()
