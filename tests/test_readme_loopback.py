"""The README's loopback deployment, run verbatim: its bash blocks, in order, in an empty folder.

A coordinator service, three agents with their own budgets, a private run through the admin API
under SecAgg+ (refused first by the forecast, then run on purpose), the ledgers, export and
generation through the admin API, and `kill $(cat pids)`, after which nothing is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback import processes_mentioning

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### On one machine (loopback), start to finish"


def loopback_script() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n### ", start + len(SECTION))]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, re.S))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: it waits only for its parent (the test's bash) to reap it.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


def test_the_readme_loopback_recipe_runs_verbatim_and_stops_everything(tmp_path):
    script = loopback_script()
    assert "kill $(cat pids)" in script and "--config private.toml" in script
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("FEDMOE_ADMIN_TOKEN", None)
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        pids = (
            [int(p) for p in (tmp_path / "pids").read_text().split()]
            if (tmp_path / "pids").exists()
            else []
        )
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [p for p in pids if _alive(p)]
        # Their children too: SuperLink, SuperNodes, ServerApp and ClientApp processes.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(map(_alive, processes_mentioning(str(tmp_path)))):
            time.sleep(0.5)
        left += [p for p in processes_mentioning(str(tmp_path)) if _alive(p) and p not in left]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert not left, f"still running after `kill $(cat pids)`: {left}"
    assert len(pids) == 4  # the coordinator and three agents
    flat = " ".join(output.split())
    assert "refused, as forecast" in flat and "the noise would swamp the updates" in flat
    assert "privacy.record (every enterprise at min_records 400)" in flat
    assert re.search(r"run 1 completed", flat), output[-6000:]
    for name in ("finance", "clinical", "manufacturing"):
        log = (tmp_path / "agents" / name / "agent.log").read_text()
        assert "data ready: 400 training records" in log, log[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    print(f"README loopback recipe: {time.monotonic() - started:.0f}s")
