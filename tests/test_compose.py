"""The compose deployment (compose.yaml, deploy/, Dockerfile, .dockerignore), checked without a
Docker engine and without the network: every service, image, command, healthcheck, dependency,
port and volume; every file the configs name lands on a mount; the secrets deploy/setup.sh makes
are exactly the mounted files a clone lacks, and are git-ignored."""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
ENTERPRISES = ("finance", "clinical", "manufacturing")
AGENTS = {f"agent-{name}": name for name in ENTERPRISES}
FEDMOE_SERVICES = ("coordinator", *AGENTS)
MONITORING = ("prometheus", "grafana")  # the `monitoring` profile
COORDINATOR_CONFIG = "/etc/fedmoe/coordinator.toml"
AGENT_CONFIG = "/etc/fedmoe/agent.toml"
PLACEHOLDER = "0" * 64
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# What deploy/setup.sh creates (and nothing else): the files a fresh clone lacks.
GENERATED = {
    "deploy/certs/ca.pem",
    "deploy/certs/ca.key",
    "deploy/certs/server.pem",
    "deploy/certs/server.key",
    *(f"deploy/agents/{name}/keys/{f}" for name in ENTERPRISES for f in ("node.key", "node.pub")),
    "deploy/agents/federation.pub",
    "deploy/admin.token",
    ".env",
}
SECRETS = {"deploy/certs/ca.key", "deploy/certs/server.key", "deploy/admin.token"} | {
    f"deploy/agents/{name}/keys/node.key" for name in ENTERPRISES
}


# --- compose.yaml, read as Docker reads it ---------------------------------------------------------
def interpolate(value):
    """Compose's `${VAR:-default}` / `${VAR}` with the defaults (the environment is not consulted)."""
    if isinstance(value, str):
        return re.sub(
            r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value
        )
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))  # safe_load resolves `<<: *anchor`


COMPOSE_DATA = load_compose()
SERVICES = COMPOSE_DATA["services"]


@dataclass(frozen=True)
class Mount:
    type: str  # bind | volume
    raw_source: str  # as written: ./path (bind) or a volume name
    target: str
    read_only: bool

    @property
    def source(self) -> str:
        """A bind mount's repo-relative path, or the volume's name."""
        return posixpath.normpath(self.raw_source) if self.type == "bind" else self.raw_source


def mounts(service: str) -> list[Mount]:
    out = []
    for entry in SERVICES[service].get("volumes", []):
        if isinstance(entry, str):  # short syntax SRC:DST[:MODE]
            parts = entry.split(":")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append(Mount(kind, source, target, ro))
        else:
            out.append(
                Mount(
                    entry["type"],
                    entry["source"],
                    entry["target"],
                    bool(entry.get("read_only", False)),
                )
            )
    return out


def mount_of(service: str, path: str) -> tuple[Mount, str]:
    """The mount a container path lies on (the deepest one) and the path inside it."""
    path = posixpath.normpath(path)
    best = None
    for m in mounts(service):
        if path == m.target or path.startswith(m.target.rstrip("/") + "/"):
            if best is None or len(m.target) > len(best.target):
                best = m
    assert best is not None, (
        f"{service}: {path} is on no mount (it would be lost or missing in the container)"
    )
    return best, posixpath.relpath(path, best.target)


def container_path(value: str, config_target: str) -> str:
    """A config's path as the service sees it: relative paths resolve against the config's folder."""
    return (
        value
        if posixpath.isabs(value)
        else posixpath.normpath(posixpath.join(posixpath.dirname(config_target), value))
    )


def command(service: str) -> list[str]:
    cmd = SERVICES[service]["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def healthcheck(service: str) -> list[str]:
    test = SERVICES[service]["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return list(test)


def depends_on(service: str) -> dict[str, str]:
    deps = SERVICES[service].get("depends_on", {})
    return (
        {d: "service_started" for d in deps}
        if isinstance(deps, list)
        else {k: v.get("condition", "service_started") for k, v in deps.items()}
    )


def published(service: str) -> dict[int, str]:
    """container port -> host side ("[IP:]PORT")."""
    out = {}
    for p in SERVICES[service].get("ports", []):
        if isinstance(p, dict):
            host = f"{p['host_ip']}:{p['published']}" if p.get("host_ip") else str(p["published"])
            out[int(p["target"])] = host
        else:
            host, _, container = str(p).rpartition(":")
            out[int(container.split("/")[0])] = host
    return out


def bind_source(service: str, target: str) -> str:
    return next(m.source for m in mounts(service) if m.target == target)


def read_toml(repo_path: str, root: Path = ROOT) -> dict:
    return tomllib.loads((root / repo_path).read_text())


def coordinator_toml(root: Path = ROOT) -> dict:
    return read_toml(bind_source("coordinator", COORDINATOR_CONFIG), root)


def agent_toml(service: str, root: Path = ROOT) -> dict:
    return read_toml(bind_source(service, AGENT_CONFIG), root)


# --- deploy/setup.sh, run once in a copy of what a fresh clone has ---------------------------------
def _fedmoe_cli() -> str | None:
    beside = Path(sys.executable).with_name("fedmoe")
    return str(beside) if beside.is_file() else shutil.which("fedmoe")


def _files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".venv" not in p.parts
    }


@dataclass
class Setup:
    root: Path
    before: set[str]
    after: set[str]
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    cli = _fedmoe_cli()
    if cli is None:
        reason = "no fedmoe command beside this Python or on PATH to run deploy/setup.sh with"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("clone")
    shutil.copy2(COMPOSE, root / "compose.yaml")
    # Only the files a clone has: nothing git-ignored (a local deploy/ may hold generated secrets).
    shutil.copytree(
        DEPLOY, root / "deploy", ignore=shutil.ignore_patterns("certs", "keys", "admin.token")
    )
    # and the checked-in coordinator.toml, with the placeholder (setup.sh may have replaced it here).
    config = root / "deploy/coordinator.toml"
    config.write_text(
        re.sub(
            r'^sha256 = "[0-9a-f]{64}".*$',
            f'sha256 = "{PLACEHOLDER}"',
            config.read_text(),
            flags=re.M,
        )
    )
    before = _files(root)
    # A clone after `make setup`: setup.sh finds .venv/bin/fedmoe by itself.
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "fedmoe").symlink_to(cli)
    env = {k: v for k, v in os.environ.items() if k != "FEDMOE_CLI"}

    def run() -> subprocess.CompletedProcess:
        cmd = ["bash", "deploy/setup.sh"]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    after = _files(root)
    second = run()
    assert second.returncode == 0, second.stdout + second.stderr
    return Setup(root, before, after, first, second)


# --- services ---------------------------------------------------------------------------------------
def test_the_services_and_their_images():
    assert set(SERVICES) == {"postgres", *FEDMOE_SERVICES, *MONITORING}
    assert SERVICES["postgres"]["image"] == "postgres:15" and "build" not in SERVICES["postgres"]
    images = {SERVICES[s]["image"] for s in FEDMOE_SERVICES}
    assert len(images) == 1, f"coordinator and agents must run one image, got {images}"
    build = SERVICES["coordinator"]["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context).resolve() == ROOT and (ROOT / context / dockerfile).is_file()
    for service in FEDMOE_SERVICES:
        assert SERVICES[service].get("build") in (None, build), (
            f"{service}: builds something else than the coordinator"
        )
        assert SERVICES[service].get("user") in (None, "fedmoe"), (
            f"{service}: runs as {SERVICES[service]['user']}"
        )
        assert (
            "privileged" not in SERVICES[service] and SERVICES[service].get("network_mode") is None
        )


def test_commands_and_healthchecks():
    assert command("coordinator") == ["fedmoe", "coordinator", "--config", COORDINATOR_CONFIG]
    assert healthcheck("coordinator") == [
        "CMD",
        "fedmoe",
        "coordinator",
        "health",
        "--config",
        COORDINATOR_CONFIG,
    ]
    for service in AGENTS:
        # Starting an agent never makes its ledger: a lost volume is refused, not reset.
        assert command(service) == ["fedmoe", "agent", "--config", AGENT_CONFIG]
        assert healthcheck(service) == [
            "CMD",
            "fedmoe",
            "agent",
            "health",
            "--config",
            AGENT_CONFIG,
        ]
    kind, line = healthcheck("postgres")
    assert kind == "CMD-SHELL" and line.split()[0] == "pg_isready"
    user, db = (
        SERVICES["postgres"]["environment"]["POSTGRES_USER"],
        SERVICES["postgres"]["environment"]["POSTGRES_DB"],
    )
    assert f"-U {user}" in line and f"-d {db}" in line
    for service in SERVICES:
        check = SERVICES[service]["healthcheck"]
        assert {"interval", "timeout", "retries"} <= set(check), (
            f"{service}: healthcheck without interval/timeout/retries"
        )


def test_the_cli_accepts_the_commands_compose_runs():
    from fedmoe.cli.main import build_parser

    for service in FEDMOE_SERVICES:
        for argv in (command(service), healthcheck(service)[1:]):
            args = build_parser().parse_args(argv[1:])
            assert str(args.config) in (COORDINATOR_CONFIG, AGENT_CONFIG)
            subcommand = argv[2] if not argv[2].startswith("-") else None
            assert getattr(args, f"{argv[1]}_command") == subcommand


def test_startup_order_waits_for_health():
    assert depends_on("postgres") == {}
    assert depends_on("coordinator") == {"postgres": "service_healthy"}
    for service in AGENTS:
        assert depends_on(service) == {"coordinator": "service_healthy"}
    for service in SERVICES:
        for dep in depends_on(service):
            assert "healthcheck" in SERVICES[dep]


def test_ports_published_match_the_coordinator_config():
    config = coordinator_toml()
    ports = published("coordinator")
    agents_port = int(config["agents"]["address"].rsplit(":", 1)[1])
    admin_port = int(config["admin"]["address"].rsplit(":", 1)[1])
    assert agents_port == 9092 and admin_port == 9091 and set(ports) == {9092, 9091}
    assert ports[9092].rsplit(":", 1)[-1] == "9092" and ports[9091].rsplit(":", 1)[-1] == "9091"
    for section in (
        "agents",
        "admin",
    ):  # bound on every container interface, or publishing reaches nothing
        assert config[section]["address"].startswith("0.0.0.0:")
    for service in ("postgres", *AGENTS):
        assert not published(service), f"{service} publishes ports"
    for service in MONITORING:  # their UIs: the host's loopback only
        assert all(host.startswith("127.0.0.1:") for host in published(service).values())
    for service in AGENTS:
        assert agent_toml(service)["coordinator"] == f"coordinator:{agents_port}"


def test_postgres_is_reached_by_the_coordinator_only():
    from sqlalchemy.engine import make_url

    url = make_url(coordinator_toml()["database"]["url"])
    env = SERVICES["postgres"]["environment"]
    assert (
        url.drivername == "postgresql+psycopg"
        and url.host == "postgres"
        and (url.port or 5432) == 5432
    )
    assert (url.username, url.password, url.database) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    networks = {s: set(SERVICES[s].get("networks", ["default"])) for s in SERVICES}
    assert networks["postgres"] & networks["coordinator"]
    for service in AGENTS:
        assert not networks["postgres"] & networks[service], f"{service} can reach PostgreSQL"
        assert networks[service] & networks["coordinator"], (
            f"{service} cannot reach the coordinator"
        )


# --- the monitoring profile -------------------------------------------------------------------------
def prometheus_config() -> dict:
    flags = dict(arg.split("=", 1) for arg in command("prometheus"))
    m, inner = mount_of("prometheus", flags["--config.file"])
    assert m.type == "bind" and m.read_only and inner == "."
    return yaml.safe_load((ROOT / m.source).read_text())


def documented_metrics(module) -> set[str]:
    """The metric names a collector's docstring table lists."""
    return set(re.findall(r"^\| `(fedmoe_[a-z_]+)` \|", module.__doc__, flags=re.M))


def test_only_the_monitoring_profile_runs_prometheus_and_grafana():
    for service in SERVICES:
        expected = ["monitoring"] if service in MONITORING else None
        assert SERVICES[service].get("profiles") == expected, service
    assert depends_on("prometheus") == {}  # it scrapes whatever is up
    assert depends_on("grafana") == {"prometheus": "service_healthy"}


def test_prometheus_scrapes_the_metrics_the_services_expose():
    from fedmoe.client.agent_config import AgentConfig
    from fedmoe.coordinator.service.service_config import CoordinatorConfig

    jobs = {job["job_name"]: job for job in prometheus_config()["scrape_configs"]}
    assert set(jobs) == {"fedmoe-coordinator", "fedmoe-agents"}
    networks = {s: set(SERVICES[s].get("networks", ["default"])) for s in SERVICES}

    def targets(job: str) -> set[str]:
        found = {t for group in jobs[job]["static_configs"] for t in group["targets"]}
        for target in found:
            service = target.rsplit(":", 1)[0]
            assert networks[service] & networks["prometheus"], f"Prometheus cannot reach {target}"
        return found

    coordinator = CoordinatorConfig.model_validate(coordinator_toml()).metrics.address
    assert coordinator is not None and coordinator.startswith("0.0.0.0:")
    assert targets("fedmoe-coordinator") == {f"coordinator:{coordinator.rsplit(':', 1)[1]}"}
    # HTTPS against the deployment's CA, for a name setup.sh's certificate holds.
    job = jobs["fedmoe-coordinator"]
    assert job["scheme"] == "https" and job["tls_config"]["server_name"] == "coordinator"
    ca, _ = mount_of("prometheus", job["tls_config"]["ca_file"])
    assert ca.type == "bind" and ca.source == "deploy/certs/ca.pem"
    agents = {
        f"{service}:{AgentConfig.model_validate(agent_toml(service)).metrics_address.rsplit(':', 1)[1]}"
        for service in AGENTS
    }
    assert targets("fedmoe-agents") == agents
    for service in AGENTS:
        assert agent_toml(service)["metrics_address"].startswith("0.0.0.0:")


def test_grafana_shows_metrics_the_collectors_serve():
    import json

    from fedmoe.client import metrics as agent_metrics
    from fedmoe.coordinator.service import metrics as coordinator_metrics

    provisioning = ROOT / bind_source("grafana", "/etc/grafana/provisioning")
    source = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and 9090 in published("prometheus")
    (provider,) = yaml.safe_load((provisioning / "dashboards/fedmoe.yml").read_text())["providers"]
    m, _ = mount_of("grafana", provider["options"]["path"])
    dashboards = list((ROOT / m.source).glob("*.json"))
    assert [p.name for p in dashboards] == ["fedmoe.json"]
    panels = json.loads(dashboards[0].read_text())["panels"]
    served = documented_metrics(coordinator_metrics) | documented_metrics(agent_metrics)
    assert len(served) == 19
    for panel in panels:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            for name in re.findall(r"fedmoe_[a-z_]+", target["expr"]):
                assert re.sub(r"_(bucket|sum|count)$", "", name) in served, (
                    f"panel {panel['title']!r} reads {name}, which no collector serves"
                )


# --- volumes ----------------------------------------------------------------------------------------
def test_named_volumes_are_declared_used_and_never_shared():
    declared = set(COMPOSE_DATA.get("volumes") or {})
    users: dict[str, list[str]] = {}
    for service in SERVICES:
        for m in mounts(service):
            if m.type == "volume":
                assert m.source in declared, f"{service}: volume {m.source} is not declared"
                assert not m.read_only, f"{service}: state volume {m.source} is read-only"
                users.setdefault(m.source, []).append(service)
            else:
                assert m.type == "bind", f"{service}: mount type {m.type}"
    assert set(users) == declared, f"declared but unused: {declared - set(users)}"
    for volume, services in users.items():
        assert len(services) == 1, f"volume {volume} shared by {services}"
    assert mount_of("postgres", "/var/lib/postgresql/data")[0].type == "volume"


def test_bind_mounts_are_read_only_and_exist_in_a_clone_or_are_made_by_setup():
    for service in SERVICES:
        for m in mounts(service):
            if m.type != "bind":
                continue
            assert m.read_only, f"{service}: {m.source} is mounted writable"
            assert m.raw_source.startswith("./"), (
                f"{service}: {m.raw_source} is not a path in the repository"
            )
            rel = m.source
            assert (ROOT / rel).resolve().is_relative_to(ROOT), (
                f"{service}: {m.source} leaves the repository"
            )
            made = rel in GENERATED or any(g.startswith(rel + "/") for g in GENERATED)
            if not made:
                assert (ROOT / rel).exists(), (
                    f"{service}: {m.source} is neither in the repository nor made by deploy/setup.sh"
                )
                assert not _git_ignored(rel), (
                    f"{service}: {m.source} is git-ignored: a fresh clone lacks it"
                )


def test_each_agent_has_its_own_data_keys_and_ledger():
    seen_volumes, seen_keys = set(), set()
    for service, name in AGENTS.items():
        config = agent_toml(service)
        assert config["name"] == name
        data, _ = mount_of(service, container_path(config["data"], AGENT_CONFIG))
        assert data.type == "bind" and data.read_only and data.source == f"model/assets/demo/{name}"
        key, _ = mount_of(service, container_path(config["private_key"], AGENT_CONFIG))
        assert (
            key.type == "bind"
            and key.source == f"deploy/agents/{name}/keys"
            and key.source not in seen_keys
        )
        seen_keys.add(key.source)
        ledger, _ = mount_of(service, container_path(config["ledger"], AGENT_CONFIG))
        state, _ = mount_of(service, container_path(config["state_dir"], AGENT_CONFIG))
        assert (
            ledger.type == state.type == "volume"
            and ledger.source == state.source == f"agent-{name}-state"
        )
        assert ledger.source not in seen_volumes
        seen_volumes.add(ledger.source)


# --- the configs ------------------------------------------------------------------------------------
def test_the_configs_validate():
    from fedmoe.client.agent_config import AgentConfig
    from fedmoe.coordinator.service.service_config import CoordinatorConfig

    coordinator = CoordinatorConfig.model_validate(coordinator_toml())
    assert coordinator.database.url.startswith("postgresql+psycopg://")
    for service in AGENTS:
        agent = AgentConfig.model_validate(agent_toml(service))
        assert (
            agent.model == "embedded"
            or mount_of(service, container_path(agent.model, AGENT_CONFIG))[0].read_only
        )


def test_every_path_in_the_coordinator_config_is_on_a_mount():
    config = coordinator_toml()
    for key in ("ca", "certificate", "key"):
        m, _ = mount_of("coordinator", container_path(config["tls"][key], COORDINATOR_CONFIG))
        assert m.type == "bind" and m.read_only and m.source.startswith("deploy/certs/")
    storage, _ = mount_of(
        "coordinator", container_path(config["storage"]["dir"], COORDINATOR_CONFIG)
    )
    assert storage.type == "volume" and storage.source == "coordinator-storage"
    certs = [m.source for m in mounts("coordinator") if m.source.startswith("deploy/certs")]
    assert "deploy/certs/ca.key" not in certs and "deploy/certs" not in certs, (
        "the CA's private key is no service's business"
    )


def test_tls_is_always_on():
    texts = [COMPOSE, ROOT / "Dockerfile", *DEPLOY.rglob("*.toml"), DEPLOY / "setup.sh"]
    for path in texts:
        assert "insecure" not in path.read_text().lower(), (
            f"{path.relative_to(ROOT)} mentions insecure"
        )
    assert coordinator_toml()["tls"]
    for service in AGENTS:
        assert agent_toml(service)["ca_certificate"]
        ca = container_path(agent_toml(service)["ca_certificate"], AGENT_CONFIG)
        assert mount_of(service, ca)[0].source == "deploy/certs/ca.pem"


def test_the_checked_in_token_hash_is_a_placeholder_or_a_hash():
    text = (ROOT / bind_source("coordinator", COORDINATOR_CONFIG)).read_text()
    for token in coordinator_toml()["admin"]["tokens"]:
        assert re.fullmatch(r"[0-9a-f]{64}", token["sha256"])
        if token["sha256"] == PLACEHOLDER:  # a fresh clone: marked, and no token hashes to it
            assert "PLACEHOLDER" in text and "deploy/setup.sh" in text


def test_the_deployment_run_config_fits_the_agents():
    from fedmoe.coordinator.config import parse_run_config, resolve_for_deployment

    config = resolve_for_deployment(
        parse_run_config(read_toml("deploy/run.toml"), "deploy/run.toml"),
        list(ENTERPRISES),
        coordinator_toml()["database"]["url"],
        "/var/lib/fedmoe/runs",
    )
    for service in AGENTS:
        budget = agent_toml(service).get("budget", {})
        if "record_epsilon" in budget:
            assert (
                config.privacy.record and config.privacy.record.epsilon <= budget["record_epsilon"]
            )
        if "enterprise_epsilon" in budget:
            assert (
                config.privacy.enterprise
                and config.privacy.enterprise.epsilon <= budget["enterprise_epsilon"]
            )


# --- deploy/setup.sh --------------------------------------------------------------------------------
def test_setup_makes_exactly_the_generated_files_once(setup):
    made = setup.after - setup.before
    assert made == GENERATED, f"setup.sh made {sorted(made)}, the test expects {sorted(GENERATED)}"
    assert _files(setup.root) == setup.after, "a second run of setup.sh made more files"
    for rel in SECRETS:
        assert stat.S_IMODE((setup.root / rel).stat().st_mode) == 0o600, (
            f"{rel} is readable by others"
        )


def test_setup_uses_the_clones_venv_and_refuses_incomplete_certificates(setup, tmp_path):
    assert ".venv/bin/fedmoe admin --ca deploy/certs/ca.pem" in setup.first.stdout
    shutil.copytree(
        setup.root / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("server.*")
    )
    env = dict(os.environ, FEDMOE_CLI="/nonexistent/fedmoe")  # nothing may run before the refusal
    out = subprocess.run(
        ["bash", "deploy/setup.sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "deploy/certs is incomplete" in out.stderr, (
        out.stdout + out.stderr
    )


def test_setup_sets_the_token_once(setup):
    token = (setup.root / "deploy/admin.token").read_text().strip()
    config = tomllib.loads((setup.root / "deploy/coordinator.toml").read_text())
    assert [t["sha256"] for t in config["admin"]["tokens"]] == [
        hashlib.sha256(token.encode()).hexdigest()
    ]
    assert setup.first.stdout.count(token) == 1 and token not in setup.second.stdout
    from fedmoe.coordinator.service.service_config import CoordinatorConfig

    assert CoordinatorConfig.model_validate(config).admin.caller(token) == "ops"


def test_every_mounted_file_exists_after_setup_and_the_configs_load(setup):
    from fedmoe.client.agent_config import AgentConfig, check_agent_files

    def host(service: str, path: str) -> Path:
        m, inner = mount_of(service, path)
        base = setup.root if m.source.startswith("deploy/") or m.source == "compose.yaml" else ROOT
        return (base / m.source / inner) if inner != "." else base / m.source

    for service in FEDMOE_SERVICES:
        for m in mounts(service):
            if m.type == "bind":
                assert host(service, m.target).exists(), (
                    f"{service}: {m.source} missing after setup.sh"
                )
    config = tomllib.loads((setup.root / "deploy/coordinator.toml").read_text())
    tls = {
        k: host("coordinator", container_path(v, COORDINATOR_CONFIG))
        for k, v in config["tls"].items()
    }
    assert all(p.is_file() for p in tls.values())
    _check_server_certificate(tls["ca"], tls["certificate"], tls["key"])
    for service in AGENTS:
        agent = AgentConfig.model_validate(agent_toml(service, setup.root))
        on_host = {
            k: str(host(service, container_path(getattr(agent, k), AGENT_CONFIG)))
            for k in ("ca_certificate", "private_key", "data", "federation_keys")
        }
        check_agent_files(
            agent.model_copy(update=on_host)
        )  # the files an agent checks before it starts
        assert Path(on_host["ca_certificate"]).read_bytes() == tls["ca"].read_bytes()
        # It pins every agent's key, its own among them.
        own = (Path(on_host["private_key"]).parent / "node.pub").read_text()
        pinned = Path(on_host["federation_keys"]).read_text()
        assert own in pinned and pinned.count("ecdsa-sha2-nistp384") == len(AGENTS)


def _check_server_certificate(ca_path: Path, cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    assert {"coordinator", "localhost"} <= set(names), f"the server certificate names {names}"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def _git_ignored(rel: str) -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    out = subprocess.run(
        ["git", "check-ignore", "-q", "--no-index", rel], cwd=ROOT, capture_output=True, timeout=30
    )
    return out.returncode == 0


def test_generated_files_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for rel in sorted(GENERATED):
        assert _git_ignored(rel), f"{rel} is not git-ignored"
    for rel in (
        "deploy/coordinator.toml",
        "deploy/setup.sh",
        "deploy/run.toml",
        *(f"deploy/agents/{n}/agent.toml" for n in ENTERPRISES),
    ):
        assert not _git_ignored(rel), f"{rel} is git-ignored"


# --- docker-compose's own check ---------------------------------------------------------------------
def test_docker_compose_accepts_the_file():
    compose = shutil.which("docker-compose")
    if compose is None:
        reason = (
            "docker-compose is not installed: cannot run `docker-compose -f compose.yaml config -q`"
        )
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI installs it)")
        print(reason)
        pytest.skip(reason)
    out = subprocess.run(
        [compose, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --- the image --------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_dockerfile_installs_cpu_torch_then_the_project_and_runs_unprivileged():
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [(i, args) for i, (op, args) in enumerate(steps) if op == "RUN"]
    torch_at = next(
        i
        for i, args in runs
        if f"pip install --no-cache-dir {TORCH} --index-url {CPU_INDEX}" in " ".join(args.split())
    )
    project = [
        (i, args)
        for i, args in runs
        if re.search(r"pip install --no-cache-dir (-e )?\.(\s|$)", args)
    ]
    assert len(project) == 1 and project[0][0] > torch_at, (
        "the CPU torch must be installed before the project"
    )
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert TORCH in tomllib.load(f)["project"]["dependencies"], (
            "the Dockerfile's torch pin differs from pyproject.toml's"
        )
    if (
        " -e ." in project[0][1]
    ):  # editable: the Flower app (pyproject.toml) stays at the checkout, /app
        assert ("WORKDIR", "/app") in steps and any(
            op == "COPY" and args.split()[-1].rstrip("/") in ("/app", ".") for op, args in steps
        )
    env = " ".join(args for op, args in steps if op == "ENV")
    assert re.search(r"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\b", env)
    users = [(i, args.split(":")[0]) for i, (op, args) in enumerate(steps) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0") and users[-1][0] > project[0][0], (
        "the image must end as a non-root user"
    )


def test_the_flower_app_ships_inside_fedmoe():
    # `flwr run` is pointed at APP_DIR, a folder of the installed fedmoe (not the checkout, whose
    # `flwr run .` is refused: tests/test_flwr_run.py), so the image finds it however installed.
    from fedmoe.coordinator.service import superlink

    assert superlink.APP_DIR == Path(superlink.__file__).resolve().parents[1] / "flower_app"
    assert (superlink.APP_DIR / "pyproject.toml").is_file()


def _dockerignore_excludes(rel: str) -> bool:
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        # Docker's matcher: `**/` is any number of folders (zero too), `**` anything, `*` and `?` within a name.
        tokens = re.split(r"(\*\*/|\*\*|\*|\?)", pattern)
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(wild.get(tok, re.escape(tok)) for tok in tokens)
        parts = rel.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_the_build_context_is_small_and_holds_no_secrets():
    for rel in (".venv", ".venv/bin/python", ".git", ".git/config", "runs/fedmoe.db", "deploy/certs/server.key",
                "deploy/agents/finance/keys/node.key", "deploy/admin.token", ".env", ".pytest_cache/v",
                "coordinator/__pycache__/db.cpython-311.pyc", "fedmoe.egg-info/PKG-INFO"):  # fmt: skip
        assert _dockerignore_excludes(rel), f".dockerignore lets {rel} into the build context"
    for rel in ("pyproject.toml", "README.md", "coordinator/round/server_app.py", "client/client_app.py",
                "coordinator/flower_app/pyproject.toml",
                "coordinator/store/migrations/env.py", "proto/gen/fedmoe/proto/admin_pb2.py",
                "model/assets/base/model.safetensors", "model/assets/demo/public_eval.jsonl"):  # fmt: skip
        assert (ROOT / rel).exists() and not _dockerignore_excludes(rel), (
            f".dockerignore drops {rel}, which the image needs"
        )
