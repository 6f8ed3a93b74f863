"""A run's folder of checkpoints, `output.dir/run-NNNN`, is its own and never another run's.

Run numbers restart with a new run database (a deleted SQLite file, another PostgreSQL
database), while the folders stay on disk: run 1 of the new database would write its checkpoints
among the old run 1's. So each folder carries the uid of the run that owns it (`.fedmoe-run`),
a new run refuses an output folder holding runs its database does not know, before the run is
created, and every round checks its own folder again before any node is asked.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmoe.support.files import ConfigError

RUN_MARK = ".fedmoe-run"
_RUN_FOLDER = re.compile(r"run-(\d{4,})")


def run_dir(output_dir: str | Path, run_id: int) -> Path:
    return Path(output_dir) / f"run-{run_id:04d}"


def folder_owner_problem(directory: Path, run_uid: str) -> str | None:
    """Why `directory` is not run `run_uid`'s own, or None."""
    mark = directory / RUN_MARK
    if mark.is_file():
        owner = mark.read_text().strip()
        if owner == run_uid:
            return None
        return (
            f"{directory} belongs to another run (uid {owner[:8]}), from another run database; "
            "set output.dir to this database's folder, or move that one away"
        )
    if directory.is_dir() and any(directory.iterdir()):
        return f"{directory} holds another run's files; set output.dir elsewhere, or move them"
    return None


def claim_run_dir(directory: Path, run_uid: str, resumed: bool) -> None:
    """Mark `directory` as this run's, before any node is asked; a resumed run from before the
    mark adopts its own folder."""
    adopting = resumed and not (directory / RUN_MARK).exists()
    if not adopting and (problem := folder_owner_problem(directory, run_uid)) is not None:
        raise ConfigError(f"output.dir: {problem}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_MARK).write_text(run_uid + "\n")


def unknown_run_dirs(output_dir: str | Path, runs: dict[int, str]) -> list[Path]:
    """The run folders in `output_dir` that are not of the database's runs (`runs`: id -> uid):
    marked by another uid, or unmarked where this database has no run of that number."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    unknown = []
    for folder in sorted(root.iterdir()):
        match = _RUN_FOLDER.fullmatch(folder.name)
        if match is None or not folder.is_dir():
            continue
        mark = folder / RUN_MARK
        owner = mark.read_text().strip() if mark.is_file() else None
        number = int(match.group(1))
        if (owner is not None and owner not in runs.values()) or (
            owner is None and number not in runs
        ):
            unknown.append(folder)
    return unknown


def check_output_dir(output_dir: str | Path, runs: dict[int, str]) -> None:
    """Before a run is created: its output folder holds only this database's runs."""
    if unknown := unknown_run_dirs(output_dir, runs):
        names = ", ".join(f.name for f in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ConfigError(
            f"output.dir: {output_dir} holds runs of another run database ({names}); a new run "
            "would be numbered like them. Move them away, or set output.dir to a folder of its "
            "own (or database.url back to their database)"
        )
