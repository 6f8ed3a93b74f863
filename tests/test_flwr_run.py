"""`flwr run .`, the first thing a Flower user types in a fresh clone, is refused before Flower
starts or installs anything, with the fedmoe commands to use instead (support/flwr_run_refusal).

Run as a user would: Flower's own `flwr` from the project's environment, in a copy of the
checkout, with a fresh Flower home and no way to download anything (no package index, proxies
that refuse every connection). A regression would show as a local SuperLink left running, or a
runtime environment or installed app under the Flower home.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkout import copy_checkout
from loopback import processes_mentioning

BIN = Path(sys.executable).parent
NO_NETWORK = "http://127.0.0.1:9"  # the discard port: every proxied connection is refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def checkout(tmp_path):
    home = tmp_path / "flwr-home"
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # as with .venv activated
        "FLWR_HOME": str(home),
        # Where Flower's managed local SuperLink would listen, so a leaked one is found here and
        # not mistaken for one of another project's on Flower's default port.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_DISABLE_UPDATE_CHECK": "1",  # Flower's update check would call flower.ai
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        "UV_NO_INDEX": "1",
        "no_proxy": "",
        "NO_PROXY": "",
        **{name: NO_NETWORK for name in ("http_proxy", "https_proxy", "all_proxy")},
        **{name: NO_NETWORK for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    }
    app = copy_checkout(tmp_path / "fedmoe")
    yield app, home, port, env
    for pid in processes_mentioning(str(tmp_path)):  # only what a regression left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _flwr_run(app: Path, env: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run(
        [str(BIN / "flwr"), "run", ".", *args],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return out, time.monotonic() - started


def _assert_nothing_started_or_installed(tmp_path: Path, home: Path, port: int) -> None:
    time.sleep(0.5)  # a detached SuperLink would be up by now, or still starting
    assert not _listening(port), "a local SuperLink is listening"
    assert processes_mentioning(str(tmp_path)) == [], "a Flower process was left running"
    made = sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []
    assert set(made) <= {"config.toml"}, f"Flower wrote {made} under its home"


@pytest.mark.e2e
def test_flwr_run_in_a_fresh_clone_is_refused_with_the_fedmoe_commands(checkout, tmp_path):
    app, home, port, env = checkout
    out, took = _flwr_run(app, env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "`flwr run` does not run fedmoe, and nothing was started or installed" in out.stderr
    assert "fedmoe run [--config run.toml]" in out.stderr
    assert "fedmoe admin start [--config run.toml]" in out.stderr
    assert "Successfully started run" not in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert took < 60
    _assert_nothing_started_or_installed(tmp_path, home, port)

    # A named SuperLink connection, run config overrides or JSON output change nothing: the app
    # is checked before Flower reads any of them.
    out, _ = _flwr_run(app, env, "local", "--run-config", "fedmoe-run-id=1", "--format", "json")
    assert out.returncode == 2, out.stdout + out.stderr
    answer = json.loads(out.stdout)
    assert answer["success"] is False
    assert "fedmoe admin start" in answer["error-message"]
    _assert_nothing_started_or_installed(tmp_path, home, port)


def test_the_app_fedmoe_submits_is_not_the_checkout():
    """fedmoe's own runs go through `flwr run` too, of the app shipped inside fedmoe, which names
    the real ServerApp and ClientApp and no dependency for Flower to install."""
    import tomllib

    from fedmoe.coordinator.service import superlink

    with open(superlink.APP_DIR / "pyproject.toml", "rb") as f:
        app = tomllib.load(f)
    assert app["project"]["dependencies"] == []
    assert app["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedmoe.coordinator.round.server_app:app",
        "clientapp": "fedmoe.client.client_app:app",
    }
    assert superlink.APP_DIR != Path(superlink.__file__).resolve().parents[1]
