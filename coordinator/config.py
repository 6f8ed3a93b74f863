"""The run config: one TOML file, validated once into typed sections before any work starts.

Relative paths are resolved against the config file's folder. Two sentinel values point at what
ships in the repo: `model.path = "embedded"` (the bundled base) and a federation with no
`enterprises` (the bundled demo federation: finance, clinical, manufacturing).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedmoe.client.settings import LocalTrainSettings
from fedmoe.model.base import EMBEDDED, load_tokenizer, resolve_model_path
from fedmoe.model.corpus import DEMO_DATA_DIR, DEMO_ENTERPRISES
from fedmoe.model.data import find_split, load_records
from fedmoe.model.lora import LoraSettings
from fedmoe.privacy.plan import InfeasiblePlan, plan_enterprise_level, plan_run
from fedmoe.privacy.settings import NodeBudget, PrivacySettings


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names each field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    path: str = Field(EMBEDDED, description='"embedded" or a local Hugging Face checkpoint directory')


class Enterprise(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    data: str = Field(description="folder with train.{jsonl,csv,parquet} and heldout.{jsonl,csv,parquet}")
    # A simulated node's own settings (in deployment they live in each node's --node-config).
    budget: NodeBudget = NodeBudget()
    ledger: str | None = Field(None, description="the simulated node's privacy ledger; default <output.dir>/ledgers/<name>.sqlite")


class SecureAggregation(_Section):
    """Flower's SecAgg+: the coordinator sees only the average of a round's updates."""

    enabled: bool = False
    reconstruction_threshold: float = Field(0.67, gt=0.0, le=1.0, description="share of a round's clients that must finish for it to be unmasked")
    value_range: float | None = Field(
        None, gt=0.0, le=1e6, description="largest |value| of an update; default: clip + noise tails under enterprise-level DP, else 8"
    )
    quantization_bits: int = Field(22, ge=8, le=30, description="bits per value; clients x 2^bits must stay below 2^32")
    timeout_s: float = Field(600.0, gt=0.0, le=86_400.0, description="how long a stage waits for clients")

    def threshold_for(self, clients: int) -> int:
        """The fewest clients whose sum SecAgg+ will unmask (as flwr's SecAggPlusWorkflow computes it)."""
        return max(2, round(self.reconstruction_threshold * clients))

    def value_range_for(self, privacy: PrivacySettings, rounds: int) -> float:
        if self.value_range is not None:
            return self.value_range
        if privacy.enterprise is None:
            return 8.0
        plan = plan_enterprise_level(privacy.enterprise, rounds)
        # Beyond these tails (per value: ~1e-15 Gaussian, ~e^-40 Laplace) a value would be clipped.
        return plan.clip + (8.0 if plan.mechanism == "gaussian" else 40.0) * plan.noise_scale


class FederationSection(_Section):
    rounds: int = Field(3, ge=1, le=100_000)
    enterprises: tuple[Enterprise, ...] = ()
    fraction_fit: float = Field(1.0, gt=0.0, le=1.0, description="share of enterprises sampled per round")
    min_fit_clients: int = Field(1, ge=1, description="fewest successful clients a round needs")
    threads_per_client: int = Field(1, ge=1, le=512, description="torch threads of each simulated client")
    cpus_per_client: int = Field(1, ge=1, le=512, description="whole CPUs Flower's simulation engine reserves per client")
    secure_aggregation: SecureAggregation = SecureAggregation()

    @model_validator(mode="after")
    def _unique_names(self) -> "FederationSection":
        names = [e.name for e in self.enterprises]
        if len(set(names)) != len(names):
            raise ValueError(f"enterprise names must be unique, got {names}")
        if self.enterprises and self.min_fit_clients > len(self.enterprises):
            raise ValueError(f"min_fit_clients={self.min_fit_clients} exceeds the {len(self.enterprises)} enterprises")
        if self.secure_aggregation.enabled and self.enterprises and len(self.enterprises) << self.secure_aggregation.quantization_bits >= 1 << 32:
            raise ValueError("secure_aggregation.quantization_bits: enterprises x 2^bits must stay below 2^32; use fewer bits")
        return self


class EvaluationSection(_Section):
    server_data: str | None = Field("demo", description='held-out file the coordinator evaluates on; "demo" or a path; empty to skip')


class DatabaseSection(_Section):
    url: str = Field("sqlite:///runs/fedmoe.db", min_length=1, description="any SQLAlchemy URL")


class OutputSection(_Section):
    dir: str = Field("runs", min_length=1, description="where adapter checkpoints are written")


class RunConfig(_Section):
    model: ModelSection = ModelSection()
    lora: LoraSettings = LoraSettings()
    train: LocalTrainSettings = LocalTrainSettings()
    federation: FederationSection = FederationSection()
    privacy: PrivacySettings = PrivacySettings()
    evaluation: EvaluationSection = EvaluationSection()
    database: DatabaseSection = DatabaseSection()
    output: OutputSection = OutputSection()

    def to_toml_dict(self) -> dict:
        return json.loads(self.model_dump_json(exclude_none=True))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else ""
        msg = "unknown key; remove it or check its spelling" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_sqlite_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:" and not url.startswith("sqlite:////"):
        return prefix + _resolve(url[len(prefix) :], base)
    return url


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """Absolute paths everywhere, the demo federation filled in, and every data file checked."""
    model_path = config.model.path if config.model.path == EMBEDDED else _resolve(config.model.path, base)
    enterprises = config.federation.enterprises or tuple(
        Enterprise(name=d, data=str(DEMO_DATA_DIR / d)) for d in DEMO_ENTERPRISES
    )
    output_dir = _resolve(config.output.dir, base)
    enterprises = tuple(
        e.model_copy(update=dict(data=_resolve(e.data, base), ledger=_resolve(e.ledger or f"{output_dir}/ledgers/{e.name}.sqlite", base)))
        for e in enterprises
    )
    server_data = config.evaluation.server_data
    if server_data == "demo":
        server_data = str(DEMO_DATA_DIR / "public_eval.jsonl")
    elif server_data:
        server_data = _resolve(server_data, base)
    resolved = config.model_copy(
        update=dict(
            model=ModelSection(path=model_path),
            federation=config.federation.model_copy(update=dict(enterprises=enterprises)),
            evaluation=EvaluationSection(server_data=server_data or None),
            database=DatabaseSection(url=_resolve_sqlite_url(config.database.url, base)),
            output=OutputSection(dir=output_dir),
        )
    )
    check_files(resolved)
    check_privacy(resolved)
    return resolved


def check_files(config: RunConfig) -> None:
    problems = []
    model_dir = resolve_model_path(config.model.path)
    if not (model_dir / "config.json").is_file():
        problems.append(f"  model.path: no config.json in {model_dir}")
    else:
        max_pos = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
        if max_pos and config.train.seq_len > max_pos:
            problems.append(f"  train.seq_len: must be <= {max_pos}, the model's max_position_embeddings (got {config.train.seq_len})")
    for i, e in enumerate(config.federation.enterprises):
        for split in ("train", "heldout"):
            try:
                find_split(Path(e.data), split)
            except FileNotFoundError as err:
                problems.append(f"  federation.enterprises.{i}.data: {err}")
    if config.evaluation.server_data and not Path(config.evaluation.server_data).is_file():
        problems.append(f"  evaluation.server_data: file {config.evaluation.server_data} does not exist")
    if problems:
        raise ConfigError("invalid run config:\n" + "\n".join(problems))


def check_privacy(config: RunConfig) -> None:
    """Refuse, before anything starts, a privacy plan that cannot be met or a simulated node whose
    budget cannot pay for even one round, with the values that would work."""
    privacy, fed, train = config.privacy, config.federation, config.train
    problems = []
    if privacy.enterprise and privacy.enterprise.mechanism == "gaussian" and not privacy.enterprise.delta < 1 / len(fed.enterprises):
        problems.append(
            f"  privacy.enterprise.delta: must be < 1/enterprises = {1 / len(fed.enterprises):.3g} (got {privacy.enterprise.delta:g})"
        )
    if fed.secure_aggregation.enabled and len(fed.enterprises) < 2:
        problems.append("  federation.secure_aggregation.enabled: needs at least 2 enterprises")
    tokenizer = load_tokenizer(config.model.path) if privacy.record else None
    for i, e in enumerate(fed.enterprises):
        records = load_records(find_split(Path(e.data), "train"), tokenizer, train.seq_len).shape[0] if tokenizer else 1
        try:
            plan = plan_run(privacy, records, train.batch_size, train.local_steps, fed.rounds)
        except InfeasiblePlan as err:
            problems.append(f"  {err}" + (f" (enterprise {e.name})" if str(err).startswith("privacy.record") else ""))
            continue
        for level in ("record", "enterprise"):
            budget = getattr(e.budget, f"{level}_epsilon")
            one_round = plan.epsilon_after(level, 1)[0]
            if budget is not None and one_round > budget:
                what = f"one round spends {one_round:.3g}" if one_round < float("inf") else f"the run gives no {level}-level guarantee"
                problems.append(f"  federation.enterprises.{i}.budget.{level}_epsilon: {budget:g} is too small: {what} (enterprise {e.name})")
    if problems:
        raise ConfigError("invalid privacy settings:\n" + "\n".join(dict.fromkeys(problems)))


def parse_run_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_run_config(path: Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read, merge CLI overrides into, validate and resolve a run config (None: all defaults)."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML ({err})") from None
        base = path.resolve().parent
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        if not sections or not all(sections) or not key:
            raise ConfigError(f"override {dotted!r}: use section.key=value, e.g. federation.rounds=5 or privacy.record.epsilon=4")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {dotted!r}: {section} is not a section")
        target[key] = value
    return resolve_paths(parse_run_config(data, str(path or "defaults")), base)


def run_config_from_json(text: str) -> RunConfig:
    """The already-resolved config the launcher hands to the ServerApp."""
    return parse_run_config(json.loads(text), "launcher")
