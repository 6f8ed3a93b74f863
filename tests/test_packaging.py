"""The wheel: built without a setuptools warning, and shipping every data file fedmoe reads at run
time (the embedded base and demo federation, the database migrations, the Flower app it submits)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import PurePosixPath

from checkout import ROOT, copy_checkout

DATA_FOLDERS = ("model/assets", "coordinator/store/migrations", "coordinator/flower_app")


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", folder],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [name for name in out if (ROOT / name).is_file()]


def test_every_data_folder_is_a_listed_package():
    # setuptools treats every folder as a package and warns about each one not listed.
    with open(ROOT / "pyproject.toml", "rb") as f:
        packages = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    folders = {PurePosixPath(name).parent for folder in DATA_FOLDERS for name in _tracked(folder)}
    for folder in folders:
        assert "fedmoe." + ".".join(folder.parts) in packages, (
            f"{folder} is not in [tool.setuptools] packages"
        )


def test_the_wheel_builds_quietly_and_ships_the_data(tmp_path):
    source = copy_checkout(tmp_path / "src")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    assert "would be ignored" not in log and "absent from the `packages`" not in log, log
    assert "BuildBackendWarning" not in log, log
    (wheel,) = (tmp_path / "dist").glob("fedmoe-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for folder in DATA_FOLDERS:
        files = _tracked(folder)
        assert files, folder
        for name in files:
            if name.endswith(".pyc"):
                continue
            assert f"fedmoe/{name}" in shipped, f"the wheel lacks {name}"
    assert "fedmoe/proto/admin_pb2.pyi" in shipped
    # Only a checkout's `flwr run .` reads it; an installed fedmoe never imports it.
    assert not any("flwr_run_refusal" in name for name in shipped)
