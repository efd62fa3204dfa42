"""Run directories: one folder per run, claimed by one process at a time, replaced only
when it is a run.

A run directory is `<output_dir>/<name>` (the name is one folder name: config checks it).
It is a run's when it holds the marker file `.peftlab-run`. The marker is created
exclusively, so two runs started together with the same name never share a folder, and it
is locked (flock) while its run is alive, so `--overwrite` and `--resume` refuse a run in
progress; the lock goes with the process, SIGKILL included. `--overwrite` replaces only a
run directory directly under output_dir, never a symbolic link or a folder that is not a run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from pathlib import Path

from peftlab.errors import PeftlabError

MARKER = ".peftlab-run"
# Run folders written before the marker existed: config.yaml plus something only a run writes.
_RUN_FILES = ("report.json", "FAILED.txt", "checkpoints", "adapter/peftlab.json")


class RunDirTaken(PeftlabError):
    """The run name is taken: by another run (finished, failed or in progress), or by a
    file, link or folder that is not a run."""


class RunDir:
    """A claimed run directory: `path`, locked until `release()` (or the process ends)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a real folder (not a link) that a peftlab run made."""
    if path.is_symlink() or not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return True
    return (path / "config.yaml").is_file() and any((path / f).exists() for f in _RUN_FILES)


def _lock(path: Path, create: bool) -> int:
    """Lock `path`'s marker (created exclusively when `create`); raises PeftlabError if the
    marker exists when it should not, or if a live run holds it."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if create else 0)
    try:
        fd = os.open(path / MARKER, flags, 0o644)
    except FileExistsError:
        raise RunDirTaken(f"run directory {path} was just claimed by another run: choose another name=...") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirTaken(
            f"run directory {path} belongs to a run that is still in progress: wait for it to "
            f"finish, or choose another name=..."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _check_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise PeftlabError(f"output_dir {root} is a file, not a folder: choose another output_dir")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeftlabError(f"cannot create output_dir {root} ({exc.strerror}): choose another output_dir") from None


def claim(root: Path, name: str, overwrite: bool = False) -> RunDir:
    """Create and lock `root/name` for a new run. An existing run directory is replaced
    only with `overwrite` (and not while its run is alive); anything else there is refused.
    Raises RunDirTaken when the name is taken, PeftlabError for other problems."""
    _check_root(root)
    path = root / name
    if path.is_symlink():
        raise RunDirTaken(
            f"run directory {path} is a symbolic link: peftlab neither writes nor deletes "
            f"through links; remove the link or choose another name=..."
        )
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise RunDirTaken(f"{path} exists and is a file: choose another name=...") from None
        if any(path.iterdir()):
            return _replace(path, overwrite)
    except OSError as exc:
        raise PeftlabError(
            f"cannot create run directory {path} ({exc.strerror}): choose another name= or output_dir="
        ) from None
    return RunDir(path, _lock(path, create=True))


def _replace(path: Path, overwrite: bool) -> RunDir:
    """Replace the existing, non-empty `path` with a new run directory (see claim)."""
    if not is_run_dir(path):
        raise RunDirTaken(
            f"{path} exists and is not a peftlab run directory: peftlab never replaces it, "
            f"--overwrite or not; choose another name=... or output_dir=..."
        )
    if not overwrite:
        raise RunDirTaken(
            f"run directory {path} already exists: pass --overwrite to replace it or choose another name=..."
        )
    old = RunDir(path, _lock(path, create=False))  # refuses a run still in progress
    aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)  # atomic: the name is free, the old run out of sight
    old.release()
    try:
        new = claim(path.parent, path.name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return new


def claim_default(root: Path, base: str) -> RunDir:
    """A new run directory named `base`, or `base-2`, `base-3`, ... (the first free one)."""
    n = 1
    while True:
        try:
            return claim(root, base if n == 1 else f"{base}-{n}")
        except RunDirTaken:
            n += 1


def reopen(path: Path) -> RunDir:
    """Lock an existing, unfinished run directory to resume it. Raises PeftlabError."""
    if path.is_symlink():
        raise PeftlabError(
            f"cannot resume: run directory {path} is a symbolic link: resume the run by its own path, {path.resolve()}"
        )
    if not path.is_dir():
        raise PeftlabError(f"cannot resume: run directory {path} does not exist")
    if not is_run_dir(path):
        raise PeftlabError(f"cannot resume: {path} is not a peftlab run directory")
    if (path / "report.json").is_file():
        raise PeftlabError(f"cannot resume: {path} already finished (report.json exists)")
    return RunDir(path, _lock(path, create=False))
