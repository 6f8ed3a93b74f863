"""coordinator.toml: the coordinator service's settings, validated once before anything starts.

```toml
[agents]        # where enterprise agents connect (TLS; registered node keys only)
address = "0.0.0.0:9092"

[admin]         # the admin API (gRPC over TLS, bearer tokens)
address = "127.0.0.1:9091"
# max_export_bytes = 4294967296  # `fedmoe admin export` refuses larger exports (default 4 GiB)
[[admin.tokens]]
name = "ops"
sha256 = "..."  # `fedmoe coordinator token --name ops` prints a token and this line

[tls]           # PEM files; `fedmoe certs` makes development ones
ca = "certs/ca.pem"
certificate = "certs/server.pem"
key = "certs/server.key"

[database]
url = "sqlite:///state/fedmoe.db"   # postgresql+psycopg://... in production

[storage]
dir = "state"   # checkpoints (runs/), Flower's state database and logs

[dashboard]     # read-only web pages over HTTPS, sign-in with an admin token (off by default)
address = "127.0.0.1:9443"

[metrics]       # Prometheus /metrics over HTTPS with the [tls] certificate (off by default)
address = "127.0.0.1:9464"
```
Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmoe.support.files import (
    ConfigError,
    check_host_port,
    describe_validation_error,
    read_toml_file,
    resolve_path,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class AdminToken(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="who holds it (recorded with each run it starts)",
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the token, hex")


class AgentsSection(_Section):
    address: str = Field("0.0.0.0:9092", description="host:port where enterprise agents connect")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host_port(value, "0.0.0.0:9092")


class AdminSection(_Section):
    address: str = Field("127.0.0.1:9091", description="host:port of the admin API")
    tokens: tuple[AdminToken, ...] = Field(
        min_length=1, strict=False, description="who may call the admin API"
    )
    max_request_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="larger admin requests are refused"
    )
    max_export_bytes: int = Field(
        4 << 30,
        ge=1024,
        le=1 << 40,
        description="larger exports (`fedmoe admin export`) are refused before anything is sent",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host_port(value, "0.0.0.0:9092")

    @model_validator(mode="after")
    def _unique(self) -> AdminSection:
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError(f"token names must be unique, got {names}")
        return self

    def caller(self, token: str) -> str | None:
        """The name of the token holder, or None for an unknown token (constant-time compare)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        for t in self.tokens:
            if hmac.compare_digest(t.sha256, digest):
                return t.name
        return None


class TLSSection(_Section):
    ca: str = Field(min_length=1, description="PEM file of the CA agents and admins trust")
    certificate: str = Field(
        min_length=1, description="the coordinator's certificate (PEM), naming its hosts"
    )
    key: str = Field(min_length=1, description="its private key (PEM)")


class DatabaseSection(_Section):
    url: str = Field(
        "sqlite:///state/fedmoe.db", min_length=1, max_length=4096, description="any SQLAlchemy URL"
    )


class StorageSection(_Section):
    dir: str = Field(
        "state", min_length=1, description="checkpoints, Flower's state database and logs"
    )


class RunsSection(_Section):
    max_resumes: int = Field(
        3, ge=0, le=100, description="how often a run is resumed before it is failed"
    )
    poll_interval_s: float = Field(1.0, gt=0.0, le=60.0, description="how often runs are checked")


class DashboardSection(_Section):
    address: str | None = Field(
        None,
        description="host:port of the web dashboard (HTTPS, admin-token sign-in); off if unset",
    )
    session_hours: float = Field(12.0, gt=0.0, le=24.0 * 30, description="how long a sign-in lasts")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value, "127.0.0.1:9443")


class MetricsSection(_Section):
    address: str | None = Field(
        None, description="host:port of Prometheus' /metrics (HTTPS); off if unset"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value, "127.0.0.1:9464")


class CoordinatorConfig(_Section):
    agents: AgentsSection = AgentsSection()
    admin: AdminSection
    tls: TLSSection
    database: DatabaseSection = DatabaseSection()
    storage: StorageSection = StorageSection()
    runs: RunsSection = RunsSection()
    dashboard: DashboardSection = DashboardSection()
    metrics: MetricsSection = MetricsSection()

    @model_validator(mode="after")
    def _distinct_ports(self) -> CoordinatorConfig:
        addresses = [self.agents.address, self.admin.address]
        addresses += [a for a in (self.dashboard.address, self.metrics.address) if a]
        ports = [a.rsplit(":", 1)[1] for a in addresses]
        if len(set(ports)) != len(ports):
            raise ValueError(
                f"agents, admin, dashboard and metrics need distinct ports, got {addresses}"
            )
        return self

    @property
    def runs_dir(self) -> Path:
        return Path(self.storage.dir) / "runs"

    @property
    def flower_home(self) -> Path:
        return Path(self.storage.dir) / "flower"


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    data = read_toml_file(path)
    try:
        config = CoordinatorConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, f"coordinator config ({path})")) from None
    except RecursionError:
        raise ConfigError(f"invalid coordinator config ({path}): nested too deeply") from None
    base = Path(path).resolve().parent
    tls = config.tls.model_copy(
        update={
            k: str(resolve_path(getattr(config.tls, k), base)) for k in ("ca", "certificate", "key")
        }
    )
    url = config.database.url
    if (
        url.startswith("sqlite:///")
        and not url.startswith("sqlite:////")
        and url != "sqlite:///:memory:"
    ):
        url = "sqlite:///" + str(resolve_path(url[len("sqlite:///") :], base))
    resolved = config.model_copy(
        update=dict(
            tls=tls,
            database=DatabaseSection(url=url),
            storage=StorageSection(dir=str(resolve_path(config.storage.dir, base))),
        )
    )
    missing = [
        f"  tls.{k}: file {getattr(tls, k)} does not exist"
        for k in ("ca", "certificate", "key")
        if not Path(getattr(tls, k)).is_file()
    ]
    if missing:
        raise ConfigError(
            "invalid coordinator config:\n"
            + "\n".join(missing)
            + "\n  (`fedmoe certs --out certs` makes development ones)"
        )
    return resolved


def new_admin_token(name: str) -> tuple[str, str]:
    """A fresh random token and the coordinator.toml lines that admit it (only its hash)."""
    AdminToken(name=name, sha256="0" * 64)  # validates the name
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    return token, f'[[admin.tokens]]\nname = "{name}"\nsha256 = "{digest}"\n'
