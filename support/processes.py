"""Starting and stopping the Flower processes we supervise (SuperLink, SuperNode): each in its own
process group, logging to a file, and dying with its supervisor even when that is SIGKILLed.

The child gets SIGTERM when we die (PR_SET_PDEATHSIG), but what IT started (Flower's SuperExec and
ServerApp, Ray's raylet and agents under the simulation engine) would outlive it: a watchdog
(support/watchdog.py) stops those."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from fedmoe.support.watchdog import descendants

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    # Prefer the scripts next to this interpreter, so a venv works without being activated.
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found; install fedmoe (pip install -e .) in this environment"
        )
    return found


def flower_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a Flower process: its own home, no runtime dependency installation, no
    telemetry, and this interpreter's scripts first on PATH (Flower starts its helpers by name)."""
    env = dict(os.environ, FLWR_HOME=str(home), **FLOWER_ENV, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_process(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """A child in its own process group, logging to `log_path`, that dies with us, and whose
    descendants die with it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    subprocess.Popen(
        [sys.executable, "-m", "fedmoe.support.watchdog", str(os.getpid()), str(proc.pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return proc


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM `proc`'s group and every descendant at once, SIGKILL after `grace` seconds.

    Flower's children live in process groups of their own, and a SuperLink told to stop waits for
    its SuperExec, which would first sit out a reconnection backoff (up to ~20 s)."""
    tree = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class Stopped(Exception):
    """SIGINT or SIGTERM arrived while `stop_on_signals()` was active; the message names it."""


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT and SIGTERM into `Stopped` in the main thread, so a supervisor can end what it
    started (and record why) before it exits."""

    def raise_stopped(signum, frame) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, handler)
