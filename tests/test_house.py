"""The architecture as the imports show it: the trust boundary between coordinator and node,
generated code that regenerates to itself, and Flower's latency constants still where we tune them."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = {n for n in names if n.startswith("fedmoe.")}
    return found


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("coordinator", ("fedmoe.client", "fedmoe.cli")),
        ("client", ("fedmoe.coordinator", "fedmoe.cli")),
        ("contract", ("fedmoe.coordinator", "fedmoe.client", "fedmoe.cli")),
        (
            "support",
            ("fedmoe.coordinator", "fedmoe.client", "fedmoe.cli", "fedmoe.model", "fedmoe.privacy"),
        ),
        ("model", ("fedmoe.coordinator", "fedmoe.client", "fedmoe.cli")),
        ("privacy", ("fedmoe.coordinator", "fedmoe.client", "fedmoe.cli")),
        # Inside the coordinator: the store reads nothing above it, the round logic stands
        # without the deployment service, and the web layer reads the store only.
        (
            "coordinator/store",
            ("fedmoe.coordinator.round", "fedmoe.coordinator.service", "fedmoe.coordinator.web"),
        ),
        ("coordinator/round", ("fedmoe.coordinator.service", "fedmoe.coordinator.web")),
        (
            "coordinator/web",
            (
                "fedmoe.coordinator.round",
                "fedmoe.coordinator.service",
                "fedmoe.coordinator.launcher",
            ),
        ),
    ],
)
def test_each_side_imports_only_what_it_may(folder, forbidden):
    for module, names in _imports(folder).items():
        wrong = sorted(n for n in names if _within(n, forbidden))
        assert not wrong, f"{module} imports {wrong}"


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_cli_keeps_the_sides_apart():
    imports = _imports("cli")
    assert not any(_within(n, ("fedmoe.coordinator",)) for n in imports["cli/agent.py"])
    assert not any(_within(n, ("fedmoe.client",)) for n in imports["cli/coordinator.py"])


def test_regenerating_the_admin_api_stubs_changes_nothing(tmp_path):
    out = tmp_path / "gen"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(out)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    checked_in = ROOT / "proto" / "gen" / "fedmoe" / "proto"
    regenerated = out / "fedmoe" / "proto"
    names = sorted(p.name for p in checked_in.iterdir() if p.is_file())
    assert names == sorted(p.name for p in regenerated.iterdir() if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(checked_in, regenerated, names, shallow=False)
    assert mismatch == [] and errors == [], f"stale stubs: run scripts/gen_proto.sh ({mismatch})"


def test_flower_still_has_every_latency_constant_we_shorten():
    import inspect

    from flwr.supernode import start_client_internal

    from fedmoe.support import flower_tuning

    source = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    flower_tuning.shorten_supernode_polls(0.1)
    flower_tuning.shorten_object_pull_backoff(0.05, max_time=60.0)
    flower_tuning.shorten_node_heartbeat(10.0)
    from flwr.supercore.inflatable import inflatable_utils

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.05
    with pytest.raises(ValueError, match="refuses heartbeat intervals"):
        flower_tuning.shorten_node_heartbeat(1.0)
