"""Start a run: on Flower's simulation engine (our own SuperLink on a free loopback port) or on
a deployment-engine SuperLink, then `flwr run` against it, streaming the ServerApp's progress.

We start the SuperLink ourselves (instead of `flwr run`'s managed local one) because the managed
one outlives the CLI, is shared by everything on its fixed port, and only honours
"no runtime dependency installation" if it happened to be started with it; without that, Flower
builds a fresh environment per run and pulls gigabytes of CUDA wheels. `flwr run` exits 0 even
when the ServerApp fails, so the outcome is read back with `flwr ls`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

from fedmoe.coordinator.config import RunConfig

APP_DIR = Path(__file__).resolve().parents[1]
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONUNBUFFERED": "1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    # Prefer the scripts next to this interpreter, so a venv works without being activated.
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; install fedmoe (pip install -e .) in this environment")
    return found


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(home), **FLOWER_ENV)
    # SuperLink spawns `flwr-simulation` by name: put this interpreter's scripts first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(home: Path, address: str) -> None:
    """$FLWR_HOME/config.toml naming the SuperLink that `flwr` talks to (plain HTTP on loopback)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedmoe"\n\n[superlink.fedmoe]\naddress = "{address}"\ninsecure = true\n')


def stop_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def local_superlink(home: Path, simulation: bool) -> Iterator[str]:
    """A SuperLink on a free loopback port, with the simulation runtime or waiting for SuperNodes
    (deployment engine); yields its address and stops it, with everything it spawned, on exit."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    write_connection(home, address)
    log = (home / "superlink.log").open("w")
    cmd = [_executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(port), "--database", str(home / "state.db")]
    cmd += ["--simulation"] if simulation else []
    proc = subprocess.Popen(cmd, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Flower SuperLink did not start; see {home / 'superlink.log'}") from None
                time.sleep(0.2)
        yield address
    finally:
        stop_process_group(proc)
        log.close()


def write_flower_overrides(config: RunConfig, config_path: Path, path: Path) -> Path:
    """The `[tool.flwr.app.config]` values of this run, as a TOML file for `flwr run --run-config`."""
    enterprises = json.dumps(
        [{"name": e.name, "data": e.data, "budget": e.budget.model_dump(exclude_none=True), "ledger": e.ledger} for e in config.federation.enterprises]
    )
    values = {
        "config-path": str(config_path),
        "model-path": config.model.path,
        "sim-enterprises": enterprises,
        "threads-per-client": config.federation.threads_per_client,
    }
    return write_toml_values(path, values)


def write_toml_values(path: Path, values: dict) -> Path:
    """A flat TOML file of string/number values, the form `flwr run --run-config FILE` takes."""
    # JSON string and number literals are valid TOML.
    path.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in values.items()))
    return path


def _flwr_json(args: list[str], env: dict) -> dict:
    out = subprocess.run([_executable("flwr"), *args, "--format", "json"], env=env, capture_output=True, text=True, cwd=APP_DIR)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"flwr {' '.join(args)} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}") from None


def run_flower_app(
    app_dir: Path, home: Path, federation: str | None, overrides: Path, on_line: Callable[[str], None], superlink: str | None = None
) -> tuple[str, str]:
    """Submit the Flower app in `app_dir` and stream its log to `on_line` (and home/run.log) until
    it ends; returns Flower's final (status, details). Without `superlink`, a fresh simulation
    SuperLink runs the app; with it, the app goes to that (deployment engine) SuperLink."""
    with contextlib.ExitStack() as stack:
        if superlink is None:
            stack.enter_context(local_superlink(home, simulation=True))
        else:
            write_connection(home, superlink)
        env = flower_env(home)
        args = ["run", str(app_dir), "--run-config", str(overrides)] + (["--federation-config", federation] if federation else [])
        submitted = _flwr_json(args, env)
        if "run-id" not in submitted:
            return "refused", str(submitted.get("error-message", submitted))
        flower_run_id = str(submitted["run-id"])
        with (home / "run.log").open("w") as log, subprocess.Popen(
            [_executable("flwr"), "log", flower_run_id, "--stream"], env=env, cwd=APP_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as stream:
            for line in stream.stdout:
                log.write(line)
                on_line(line)
        runs = _flwr_json(["ls", "--run-id", flower_run_id], env).get("runs") or [{}]
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def federation_config(config: RunConfig) -> str:
    n = len(config.federation.enterprises)
    return f"num-supernodes={n} client-resources-num-cpus={config.federation.cpus_per_client}"


def launch(config: RunConfig, verbose: bool = False, superlink: str | None = None) -> int:
    """Run `config` on Flower's simulation engine, or on the deployment engine behind `superlink`
    (SuperNodes connected to it); returns a process exit code (0 on success)."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(f"the Flower app (pyproject.toml) is not in {APP_DIR}: install fedmoe from a checkout with `pip install -e .`")
    (Path(config.output.dir) / "flower").mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=Path(config.output.dir) / "flower"))
    config_path = home / "run_config.json"
    config_path.write_text(config.model_dump_json(indent=2))
    overrides = write_flower_overrides(config, config_path, home / "flower_overrides.toml")
    engine = f"the deployment engine at {superlink}" if superlink else "Flower's simulation engine"
    print(f"[fedmoe] starting {engine}: {len(config.federation.enterprises)} enterprises, {config.federation.rounds} rounds (logs in {home})", flush=True)
    tail: deque[str] = deque(maxlen=60)

    def on_line(line: str) -> None:
        tail.append(line)
        if verbose:
            print(line, end="", flush=True)
        elif "[fedmoe]" in line:
            print(line[line.find("[fedmoe]"):], end="", flush=True)

    federation = None if superlink else federation_config(config)
    state, details = run_flower_app(APP_DIR, home, federation, overrides, on_line, superlink)
    if state != "finished:completed":
        if not verbose:
            sys.stderr.write("".join(tail))
        print(f"[fedmoe] run failed ({state}: {details}); full log: {home / 'run.log'}", file=sys.stderr)
        return 1
    db = config.database.url
    print(f"[fedmoe] next: `fedmoe rounds RUN_ID --clients --database {db}`, `fedmoe generate --run RUN_ID --database {db} --prompt TEXT`", flush=True)
    return 0
