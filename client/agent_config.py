"""agent.toml: an enterprise node's own settings, validated once before the agent starts.

Everything here is the enterprise's, never the coordinator's: where its data and base model
are, its lifetime privacy budget and ledger, its key, and how much of its machine it lends.
Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmoe.client.settings import NodeSettings
from fedmoe.contract.keys import load_public_key
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model.base import EMBEDDED, check_model_dir, load_tokenizer, resolve_model_path
from fedmoe.model.data import DATA_HINT, DataFiles, check_data
from fedmoe.privacy.settings import NodeBudget
from fedmoe.support.files import (
    ConfigError,
    check_host_port,
    describe_validation_error,
    read_toml_file,
    resolve_path,
)


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="this node's name in its own logs and ledger; the coordinator names it by its key",
    )
    coordinator: str = Field(description="host:port where the coordinator accepts agents")
    ca_certificate: str = Field(
        min_length=1, description="PEM file of the CA that signed the coordinator's certificate"
    )
    private_key: str = Field(
        min_length=1, description="the node's key, made by `fedmoe agent init`"
    )
    data: str = Field(
        min_length=1,
        description="a file of training records (.jsonl, .csv, .parquet), or a folder with "
        "train.<ext> and optionally heldout.<ext>",
    )
    heldout: str | None = Field(
        None,
        min_length=1,
        description="the held-out file; default the data folder's heldout.<ext>, else 10% of "
        "the training records",
    )
    model: str = Field(
        EMBEDDED, min_length=1, description='"embedded" or a local checkpoint directory'
    )
    ledger: str = Field(
        "state/ledger.sqlite", min_length=1, description="the node's privacy ledger (SQLite)"
    )
    ledger_witness: str | None = Field(
        None,
        min_length=1,
        description="the ledger's witness (client/ledger_witness.py); default beside "
        "private_key; keep it off the ledger's volume",
    )
    state_dir: str = Field("state", min_length=1, description="Flower's files, logs, health")
    budget: NodeBudget = NodeBudget()
    federation_keys: str | None = Field(
        None,
        min_length=1,
        description="file of the federation members' OpenSSH public keys, one per line, pinned "
        "for secure aggregation (omit: nothing pinned, full noise under SecAgg+)",
    )
    unverified_secagg: Literal["full-noise", "refuse"] = Field(
        "full-noise", description="in a SecAgg+ session it cannot verify: full noise, or refuse"
    )
    fit_reply_s: float | None = Field(
        None,
        gt=0.0,
        le=86_400.0,
        description="under record-level DP, send every fit reply this long after the fit began",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(1, ge=1, le=512, description="torch CPU threads for training")
    poll_interval_s: float = Field(
        0.2,
        ge=0.02,
        le=10.0,
        description="how often the idle SuperNode asks the coordinator for work",
    )

    metrics_address: str | None = Field(
        None,
        description="host:port of this agent's Prometheus /metrics (plain HTTP: bind it to a "
        "network only the enterprise's monitoring reaches); off if unset",
    )

    @field_validator("coordinator")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_host_port(value, "coordinator.example.com:9092")

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        return None if value is None else check_host_port(value, "127.0.0.1:9465")

    def node_settings(self) -> NodeSettings:
        return NodeSettings(
            enterprise=self.name,
            data=Path(self.data),
            heldout=Path(self.heldout) if self.heldout else None,
            model_path=self.model,
            threads=self.threads,
            device=self.device,
            budget=self.budget,
            ledger=Path(self.ledger),
            identity_key=Path(self.private_key),
            witnessed_ledger=True,
            ledger_witness=Path(self.ledger_witness) if self.ledger_witness else None,
            federation_keys=read_federation_keys(Path(self.federation_keys))
            if self.federation_keys
            else None,
            unverified_secagg=self.unverified_secagg,
            fit_reply_s=self.fit_reply_s,
        )


def load_agent_config(path: Path) -> AgentConfig:
    """Read, validate and resolve agent.toml; every file it names is checked before anything starts."""
    data = read_toml_file(path)
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, f"agent config ({path})")) from None
    except RecursionError:
        raise ConfigError(f"invalid agent config ({path}): nested too deeply") from None
    base = Path(path).resolve().parent
    resolved = config.model_copy(
        update={
            key: str(resolve_path(getattr(config, key), base))
            for key in ("ca_certificate", "private_key", "data", "ledger", "state_dir")
        }
        | {
            key: str(resolve_path(getattr(config, key), base))
            for key in ("federation_keys", "heldout", "ledger_witness")
            if getattr(config, key)
        }
        | {
            "model": config.model
            if config.model == EMBEDDED
            else str(resolve_path(config.model, base))
        }
    )
    check_agent_files(resolved)
    return resolved


def check_agent_files(config: AgentConfig) -> None:
    problems = []
    for key in ("ca_certificate", "private_key"):
        if not Path(getattr(config, key)).is_file():
            problems.append(f"  {key}: file {getattr(config, key)} does not exist")
    if config.federation_keys:
        try:
            read_federation_keys(Path(config.federation_keys))
        except (OSError, ValueError) as err:
            problems.append(f"  federation_keys: {err}")
    try:
        check_model_dir(resolve_model_path(config.model))
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"  model: {err}")
    else:
        problems += _check_data(config)
    if problems:
        raise ConfigError("invalid agent config:\n" + "\n".join(problems))


def _check_data(config: AgentConfig) -> list[str]:
    """The node's own data, read whole before the agent connects: a node with broken data
    never joins a round (it says why here, to its own operator, and nowhere else)."""
    try:
        tokenizer = load_tokenizer(config.model)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a broken tokenizer
        return [f"  model: cannot load its tokenizer ({type(err).__name__}: {str(err)[:300]})"]
    try:
        files = DataFiles.locate(
            Path(config.data), Path(config.heldout) if config.heldout else None
        )
        # The run's seq_len is not known yet: the default's; a larger one is checked per run.
        check_data(files, tokenizer, LocalTrainSettings().seq_len)
    except (OSError, ValueError) as err:
        field = "heldout" if config.heldout and str(err).startswith("held-out") else "data"
        text = (
            f"cannot read {config.data[:200]} ({err.strerror})"
            if getattr(err, "strerror", None)
            else str(err)[:1000]
        )
        return [f"  {field}: {text}", DATA_HINT]
    return []


def read_federation_keys(path: Path) -> tuple[str, ...]:
    """The pinned members' OpenSSH public keys: one per line; blank lines and # comments skipped."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    keys = tuple(line for line in lines if line and not line.startswith("#"))
    for number, key in enumerate(keys, 1):
        try:
            load_public_key(key)
        except ValueError as err:
            raise ValueError(f"{path}, key {number}: {err}") from None
    if not keys:
        raise ValueError(f"{path} lists no keys")
    return keys
