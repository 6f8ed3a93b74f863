"""The run config: one TOML file, validated once into typed sections before any work starts.

Strict: a value of the wrong type is an error, never a coercion (`rounds = true` is not 1 round,
`alpha = "2"` is not 2.0), and infinities and NaN are refused. Relative paths are resolved
against the config file's folder. Two sentinel values point at what ships in the repo:
`model.path = "embedded"` (the bundled base) and, on the simulation engine, a federation with no
`enterprises` (the bundled demo federation: finance, clinical, manufacturing).

The same config serves both engines. On the simulation engine (`fedmoe run`) the coordinator
simulates each enterprise, so each names its `data` (and optionally a simulated node's budget and
ledger). On the deployment engine (`fedmoe admin start`) enterprises are registered nodes: the run
names them, and their data, budgets and ledgers stay on their own machines.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedmoe.contract.expert_weighting import update_share
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model.base import EMBEDDED, check_model_dir, load_tokenizer, resolve_model_path
from fedmoe.model.corpus import (
    DEMO_DATA_DIR,
    DEMO_ENTERPRISES,
    generated_data_home,
    resolve_generated,
)
from fedmoe.model.data import DATA_HINT, DataFiles, check_data
from fedmoe.model.lora import adapter_size
from fedmoe.model.settings import BaseLoading, LoraSettings
from fedmoe.privacy.forecast import (
    MAX_NOISE_TO_SIGNAL,
    Forecast,
    enterprise_fixes,
    enterprise_forecast,
    record_fixes,
    record_forecast,
)
from fedmoe.privacy.plan import InfeasiblePlan, plan_enterprise_level, plan_run
from fedmoe.privacy.settings import NodeBudget, PrivacySettings
from fedmoe.support.files import (
    ConfigError,
    describe_validation_error,
    parse_toml,
    read_toml_file,
    resolve_path,
)
from fedmoe.support.words import plural

ENTERPRISE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
MAX_OVERRIDE_CHARS = 10_000  # one `--set` value; a config file is the place for more


def _no_control_characters(value: object) -> object:
    """Paths and URLs: the OS refuses a NUL byte in a file name (with a ValueError deep inside
    pathlib), and a newline or an escape sequence in one is always a pasting mistake. Runs before
    the (strict) type check, which keeps its own messages for the rest."""
    if isinstance(value, str) and _CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters (NUL, newline, escape, ...)")
    return value


PathText = Annotated[str, BeforeValidator(_no_control_characters)]
OptionalPathText = Annotated[str | None, BeforeValidator(_no_control_characters)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelSection(BaseLoading):
    """The base: where it is, and how every party loads it (dtype, int8 experts, checkpointing)."""

    path: PathText = Field(
        EMBEDDED,
        min_length=1,
        max_length=4096,
        description='"embedded" or a local Hugging Face checkpoint directory',
    )

    @property
    def loading(self) -> BaseLoading:
        return BaseLoading(**self.model_dump(exclude={"path"}))


class Enterprise(_Section):
    name: str = Field(pattern=ENTERPRISE_NAME)
    data: OptionalPathText = Field(
        None,
        min_length=1,
        max_length=4096,
        description="simulation only: a file of training records (.jsonl, .csv, .parquet), a "
        "folder with train.<ext> and optionally heldout.<ext>, or a generated demo enterprise "
        "such as demo:large/finance",
    )
    heldout: OptionalPathText = Field(
        None,
        min_length=1,
        max_length=4096,
        description="simulation only: the held-out file; default the data folder's heldout.<ext>, "
        "else 10% of the training records (model/data.py, carve_heldout)",
    )
    # A simulated node's own settings (a deployed node keeps them in its agent config).
    budget: NodeBudget = NodeBudget()
    ledger: OptionalPathText = Field(
        None,
        min_length=1,
        max_length=4096,
        description="the simulated node's privacy ledger; default <output.dir>/ledgers/<name>.sqlite",
    )


class SecureAggregation(_Section):
    """Flower's SecAgg+: the coordinator sees only the average of a round's updates."""

    enabled: bool = False
    reconstruction_threshold: float = Field(
        0.67,
        gt=0.0,
        le=1.0,
        description="share of a round's clients that must finish for it to be unmasked",
    )
    value_range: float | None = Field(
        None,
        ge=1e-6,
        le=1e6,
        description="largest |value| of an update; default: clip + noise tails under enterprise-level DP, else 8",
    )
    quantization_bits: int = Field(
        22, ge=8, le=30, description="bits per value; clients x 2^bits must stay below 2^32"
    )
    timeout_s: float = Field(
        600.0, ge=1.0, le=86_400.0, description="how long a stage waits for clients"
    )

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
    enterprises: tuple[Enterprise, ...] = Field(
        (),
        max_length=10_000,
        strict=False,
        description="left out: the bundled demo federation (simulation)",
    )
    fraction_fit: float = Field(
        1.0, gt=0.0, le=1.0, description="share of enterprises sampled per round"
    )
    min_fit_clients: int = Field(
        1, ge=1, le=10_000, description="fewest successful clients a round needs"
    )
    threads_per_client: int = Field(
        1, ge=1, le=512, description="torch threads of each simulated client"
    )
    cpus_per_client: int = Field(
        1, ge=1, le=512, description="whole CPUs Flower's simulation engine reserves per client"
    )
    # Ray hides the GPUs from a simulated client that reserves none: it would train on the CPU.
    gpus_per_client: float = Field(
        0.0,
        ge=0.0,
        le=64.0,
        description="GPUs (or a share of one, e.g. 0.25) Flower's simulation engine reserves per "
        "client; 0: the clients train on the CPU",
    )
    # Below a second no message makes the round trip: the round would fail every time.
    connect_timeout_s: float = Field(
        600.0, ge=1.0, le=86_400.0, description="how long a round waits for enterprises to connect"
    )
    round_timeout_s: float = Field(
        3600.0,
        ge=1.0,
        le=604_800.0,
        description="how long a round waits for training and evaluation replies",
    )
    secure_aggregation: SecureAggregation = SecureAggregation()
    server_lr: float = Field(
        1.0,
        ge=1e-4,
        le=10.0,
        description="the coordinator applies server_lr x the average update: below 1 it trades "
        "speed for less of the enterprise-level noise in every step",
    )
    max_failed_rounds: int = Field(
        0,
        ge=0,
        le=100_000,
        description="rounds that may fail (too few updates, secure aggregation halted) before "
        "the run stops; a failed round is recorded and the next starts from the same adapter",
    )
    aggregation: Literal["fedavg", "expert-weighted"] = Field(
        "fedavg",
        description="expert-weighted: each routed expert's update is weighted by how many tokens "
        "each enterprise routed to it (contract/expert_weighting.py)",
    )

    @field_validator("enterprises")
    @classmethod
    def _named_if_given(cls, v: tuple[Enterprise, ...]) -> tuple[Enterprise, ...]:
        # Only a value written in the config gets here (a left-out key keeps the default): an
        # explicit `enterprises = []` is a mistake, not a request for the demo federation.
        if not v:
            raise ValueError(
                "an empty list names no enterprise; list at least one, or leave the key out for the demo federation"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FederationSection:
        # Messages start with the key they are about (`describe_validation_error` names it).
        names = [e.name for e in self.enterprises]
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"enterprises: names must be unique; repeated: {', '.join(duplicates)[:200]}"
            )
        if self.enterprises and self.min_fit_clients > len(self.enterprises):
            raise ValueError(
                f"min_fit_clients: {self.min_fit_clients} exceeds the {plural(len(self.enterprises), 'enterprise')}"
            )
        sampled = math.ceil(len(self.enterprises) * self.fraction_fit)
        if self.enterprises and sampled < self.min_fit_clients:
            raise ValueError(
                f"fraction_fit: {self.fraction_fit:g} of {plural(len(self.enterprises), 'enterprise')} "
                f"samples {sampled} a round, fewer than min_fit_clients = {self.min_fit_clients}; "
                f"raise fraction_fit to >= {self.min_fit_clients / len(self.enterprises):.3g} "
                "or lower min_fit_clients"
            )
        if self.max_failed_rounds >= self.rounds:
            # At least one round must train, or a run could "complete" having learned nothing.
            raise ValueError(
                f"max_failed_rounds: must be below rounds ({self.rounds}), got {self.max_failed_rounds}"
            )
        bits = self.secure_aggregation.quantization_bits
        if (
            self.secure_aggregation.enabled
            and self.enterprises
            and len(self.enterprises) << bits >= 1 << 32
        ):
            raise ValueError(
                "secure_aggregation.quantization_bits: enterprises x 2^bits must stay below 2^32; use fewer bits"
            )
        return self


class EvaluationSection(_Section):
    server_data: OptionalPathText = Field(
        None,
        max_length=4096,
        description='held-out file the coordinator evaluates on: a path, "demo" (the demo '
        "federation's public set), or empty to skip; left out: the demo set with the demo "
        "federation, none with the enterprises' own data",
    )


class DatabaseSection(_Section):
    url: PathText = Field(
        "sqlite:///runs/fedmoe.db", min_length=1, max_length=4096, description="any SQLAlchemy URL"
    )


class OutputSection(_Section):
    dir: PathText = Field(
        "runs", min_length=1, max_length=4096, description="where adapter checkpoints are written"
    )


_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _uri_scheme(uri: str) -> str:
    """`http`, `file`, ... in lower case; "" for a plain path."""
    match = _URI_SCHEME.match(uri)
    return match.group(1).lower() if match else ""


class TrackingSection(_Section):
    """Experiment trackers the coordinator streams a run to (coordinator/round/tracking.py): the
    coordinator's own, from its run database; nodes send nothing more for it and never see it."""

    mlflow_uri: OptionalPathText = Field(
        None,
        min_length=1,
        max_length=4096,
        description="MLflow tracking URI: a folder or file: URI (a file store), or http(s):// "
        "(an MLflow server)",
    )
    mlflow_experiment: str = Field(
        "fedmoe",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$",
        description="the MLflow experiment a run goes in (made if missing)",
    )
    tensorboard_dir: OptionalPathText = Field(
        None,
        min_length=1,
        max_length=4096,
        description="a folder; each run writes its event files in run-NNNN/ under it",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _supported_uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme, parts = _uri_scheme(v), urlsplit(v)
        if scheme in ("http", "https") and not parts.hostname:
            raise ValueError("an http(s) URI needs a host, e.g. http://mlflow.internal:5000")
        if scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
            raise ValueError("a file: URI names a folder on this host, e.g. file:mlruns")
        if scheme not in ("", "file", "http", "https"):
            raise ValueError(
                f"URIs of scheme {scheme[:40]!r} are not supported; use a folder or file: URI "
                "(an MLflow file store) or http(s):// (an MLflow server)"
            )
        return v

    @property
    def mlflow_folder(self) -> Path | None:
        """The file store's folder (None: no MLflow, or a server)."""
        uri = self.mlflow_uri
        if uri is None or _uri_scheme(uri) in ("http", "https"):
            return None
        return Path(url2pathname(urlsplit(uri).path) if _uri_scheme(uri) else uri)


class RunConfig(_Section):
    model: ModelSection = ModelSection()
    lora: LoraSettings = LoraSettings()
    train: LocalTrainSettings = LocalTrainSettings()
    federation: FederationSection = FederationSection()
    privacy: PrivacySettings = PrivacySettings()
    evaluation: EvaluationSection = EvaluationSection()
    database: DatabaseSection = DatabaseSection()
    output: OutputSection = OutputSection()
    # Left out of the config's dumps, so out of the Flower run's config, which reaches every
    # deployed node; the run row keeps it (to_toml_dict) and the ServerApp reads it there.
    tracking: TrackingSection = Field(TrackingSection(), exclude=True)

    def result_basis(self) -> str:
        """What a resolved run's result is chosen by (`fedmoe plan` and the run header say it)."""
        if self.evaluation.server_data:
            return (
                f"the best round by the coordinator's evaluation on {self.evaluation.server_data}"
            )
        if self.privacy.enabled:
            return (
                "the last committed round: a private run's enterprises send no held-out loss; "
                "set evaluation.server_data to a public file of your domain to choose the best"
            )
        return "the best round by the enterprises' own held-out loss (federated evaluation)"

    def to_toml_dict(self) -> dict:
        """The config as the run row keeps it: all of it, the coordinator's tracking too."""
        data = json.loads(self.model_dump_json(exclude_none=True))
        return {**data, "tracking": self.tracking.model_dump(exclude_none=True)}


def _resolve(path: str, base: Path, field: str) -> str:
    try:
        return str(resolve_path(path, base))
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as err:  # `~nobody/x`, a symlink loop, a name too long
        raise ConfigError(
            f"invalid run config:\n  {field}: cannot resolve {path[:200]!r} ({err})"
        ) from None


def _resolve_sqlite_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:" and not url.startswith("sqlite:////"):
        return prefix + _resolve(url[len(prefix) :], base, "database.url")
    return url


def _resolve_data(data: str, base: Path, field: str) -> str:
    """A data folder, or a generated demo federation's (`demo:large/finance`, built on first use)."""
    try:
        generated = resolve_generated(data)
    except ValueError as err:
        raise ConfigError(f"invalid run config:\n  {field}: {err}") from None
    return str(generated) if generated else _resolve(data, base, field)


def _resolve_server_data(config: RunConfig, base: Path, demo_federation: bool) -> str | None:
    """The public evaluation set: the demo's belongs to the demo's domains, so it is the
    default only for a federation of demo enterprises; other data is judged by its own."""
    server_data = config.evaluation.server_data
    if server_data is None:
        server_data = "demo" if demo_federation else ""
    if server_data == "demo":
        return str(DEMO_DATA_DIR / "public_eval.jsonl")
    return _resolve(server_data, base, "evaluation.server_data") if server_data else None


def _is_within(path: str, folders: tuple[Path, ...]) -> bool:
    try:
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(Path(f).resolve()) for f in folders)
    except (OSError, RuntimeError):  # a name too long, a symlink loop: reported by the data check
        return False


def _creatable(path: Path, kind: str) -> str | None:
    """Why `path` cannot be (or become) a `kind` ("file" or "folder"), or None. Checked before a run
    starts: `fedmoe run` writes the run database first, and a run must not leave one behind and
    then stop on an output folder that is a file."""
    try:
        if path.exists():
            is_kind = path.is_dir() if kind == "folder" else path.is_file()
            return None if is_kind else f"{str(path)[:200]} exists and is not a {kind}"
        parent = path.parent
        while not parent.exists():
            parent = parent.parent
        return None if parent.is_dir() else f"{str(parent)[:200]} is not a folder"
    except OSError as err:  # e.g. a name too long for the file system
        return f"{str(path)[:200]}: {err.strerror or err}"


def _check_database_url(url: str) -> str | None:
    """Why `url` names no database the launcher could open, or None (parsing and the driver's
    import only: nothing is connected to or created)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises several kinds: parse, unknown dialect, no driver
        return f"not a usable SQLAlchemy URL ({type(err).__name__}: {str(err)[:200]})"
    if parsed.get_backend_name() == "sqlite":
        if parsed.database not in (None, "", ":memory:") and not parsed.database.startswith(
            "file:"
        ):
            return _creatable(Path(parsed.database), "file")
        return None
    return _reachable(url)


def _reachable(url: str) -> str | None:
    """Why a database server cannot be connected to now, or None: found before a run starts,
    not when the launcher first writes."""
    from sqlalchemy import create_engine

    args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    engine = create_engine(url, connect_args=args)
    try:
        with engine.connect():
            return None
    except Exception as err:  # noqa: BLE001 - drivers raise their own kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"cannot connect ({first[:300]}); is the server up and the URL right?"
    finally:
        engine.dispose()


# What a run's folders must never be: the kernel's and devices' pseudo file systems.
SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _system_path(path: Path) -> str | None:
    if any(path == f or f in path.parents for f in SYSTEM_FOLDERS):
        return f"{str(path)[:200]} is a system folder; use a folder of your own"
    return None


def _installed(module: str) -> bool:
    """Whether `module` can be imported: found, not imported (MLflow takes seconds to import)."""
    return importlib.util.find_spec(module) is not None


def _check_tracking(tracking: TrackingSection) -> list[str]:
    """A tracker whose package is missing or whose folder cannot be made is refused before the
    run starts, not found out by a warning at its first round."""
    problems = []
    for key, module, name, folder in (
        ("mlflow_uri", "mlflow", "MLflow", tracking.mlflow_folder),
        ("tensorboard_dir", "tensorboard", "TensorBoard", tracking.tensorboard_dir),
    ):
        if getattr(tracking, key) is None:
            continue
        if not _installed(module):
            problems.append(
                f"  tracking.{key}: {name} is not installed; pip install 'fedmoe[tracking]'"
            )
        elif folder is not None and (
            problem := _system_path(Path(folder)) or _creatable(Path(folder), "folder")
        ):
            problems.append(f"  tracking.{key}: {problem}")
    return problems


def _resolve_tracking(tracking: TrackingSection, base: Path | None) -> TrackingSection:
    """Absolute folders, a file store as a file: URI. `base` None (a deployment run): a relative
    folder means nothing on the coordinator's host and is refused."""

    def absolute(path: str, key: str) -> str:
        if base is not None:
            return _resolve(path, base, f"tracking.{key}")
        if not Path(path).is_absolute():
            raise ConfigError(
                f"invalid run config:\n  tracking.{key}: use an absolute path on the coordinator's host"
            )
        return path

    changes = {}
    if (folder := tracking.mlflow_folder) is not None:
        changes["mlflow_uri"] = Path(absolute(str(folder), "mlflow_uri")).as_uri()
    if tracking.tensorboard_dir is not None:
        changes["tensorboard_dir"] = absolute(tracking.tensorboard_dir, "tensorboard_dir")
    return tracking.model_copy(update=changes)


def _check_outputs(config: RunConfig) -> None:
    """The database, output folder and ledgers of a resolved simulation run can be created."""
    problems = []
    if problem := _check_database_url(config.database.url):
        problems.append(f"  database.url: {problem}")
    output = Path(config.output.dir)
    if problem := _system_path(output) or _creatable(output, "folder"):
        problems.append(f"  output.dir: {problem}")
    # Each enterprise's ledger and data are its own: shared, one node's spend or records would
    # count for another's.
    seen: dict[tuple[str, str], str] = {}
    for i, e in enumerate(config.federation.enterprises):
        if e.ledger is not None and (problem := _creatable(Path(e.ledger), "file")):
            problems.append(f"  federation.enterprises.{i}.ledger: {problem}")
        for key in ("ledger", "data"):
            value = getattr(e, key)
            if value is None:
                continue
            if (key, value) in seen:
                problems.append(
                    f"  federation.enterprises.{i}.{key}: {value[:200]} is enterprise "
                    f"{seen[key, value]}'s too; each enterprise's {key} is its own"
                )
            seen.setdefault((key, value), e.name)
    problems += _check_tracking(config.tracking)
    if problems:
        raise ConfigError("invalid run config:\n" + "\n".join(problems))


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    """A simulation run: absolute paths everywhere, the demo federation filled in, and every data
    file and privacy plan checked."""
    model_path = config.model.path
    if model_path != EMBEDDED:
        model_path = _resolve(model_path, base, "model.path")
    enterprises = config.federation.enterprises or tuple(
        Enterprise(name=d, data=str(DEMO_DATA_DIR / d)) for d in DEMO_ENTERPRISES
    )
    missing = [
        f"  federation.enterprises.{i}.data: required on the simulation engine"
        for i, e in enumerate(enterprises)
        if not e.data
    ]
    if missing:
        raise ConfigError("invalid run config:\n" + "\n".join(missing))
    output_dir = _resolve(config.output.dir, base, "output.dir")
    enterprises = tuple(
        e.model_copy(
            update=dict(
                data=_resolve_data(e.data, base, f"federation.enterprises.{i}.data"),
                heldout=e.heldout
                and _resolve(e.heldout, base, f"federation.enterprises.{i}.heldout"),
                ledger=_resolve(
                    e.ledger or f"{output_dir}/ledgers/{e.name}.sqlite",
                    base,
                    f"federation.enterprises.{i}.ledger",
                ),
            )
        )
        for i, e in enumerate(enterprises)
    )
    # The demo's domains: the bundled folders, or a generated demo federation's.
    demo_federation = all(
        not e.heldout and _is_within(e.data, (DEMO_DATA_DIR, generated_data_home()))
        for e in enterprises
    )
    federation = config.federation.model_copy(update=dict(enterprises=enterprises))
    if not config.federation.enterprises:
        _recheck_federation(federation)  # e.g. min_fit_clients against the 3 demo enterprises
    resolved = config.model_copy(
        update=dict(
            model=config.model.model_copy(update=dict(path=model_path)),
            federation=federation,
            evaluation=EvaluationSection(
                server_data=_resolve_server_data(config, base, demo_federation)
            ),
            database=DatabaseSection(url=_resolve_sqlite_url(config.database.url, base)),
            output=OutputSection(dir=output_dir),
            tracking=_resolve_tracking(config.tracking, base),
        )
    )
    _check_outputs(resolved)
    check_files(resolved)
    check_privacy(resolved)
    return resolved


def resolve_for_deployment(
    config: RunConfig, registered: list[str], database_url: str, output_dir: str
) -> RunConfig:
    """A deployment run: enterprises are registered nodes (all of them when the run names none),
    the coordinator's database and storage, and the plans the coordinator can check without any
    enterprise's data (each node checks its own record-level plan in the budget handshake)."""
    problems = []
    if not config.federation.enterprises and not registered:
        problems.append(
            "  federation.enterprises: no enterprise is registered; `fedmoe admin nodes register` first"
        )
    for i, e in enumerate(config.federation.enterprises):
        where = f"  federation.enterprises.{i}"
        if e.name not in registered:
            problems.append(
                f"{where}.name: {e.name!r} is not a registered enterprise (registered: {', '.join(registered) or 'none'})"
            )
        for key in ("data", "heldout", "ledger"):
            if getattr(e, key) is not None:
                problems.append(
                    f"{where}.{key}: set on the enterprise's agent, not in a deployment run"
                )
        if e.budget.limited:
            problems.append(
                f"{where}.budget: set on the enterprise's agent, not in a deployment run"
            )
    if problems:
        raise ConfigError("invalid run config:\n" + "\n".join(problems))
    enterprises = config.federation.enterprises or tuple(
        Enterprise(name=name) for name in registered
    )
    federation = config.federation.model_copy(update=dict(enterprises=enterprises))
    _recheck_federation(federation)
    if config.model.path != EMBEDDED and not Path(config.model.path).is_absolute():
        raise ConfigError(
            "invalid run config:\n  model.path: use an absolute path on the coordinator's host"
        )
    resolved = config.model_copy(
        update=dict(
            federation=federation,
            # A deployed federation's data is the agents' own: no demo set by default.
            evaluation=EvaluationSection(
                server_data=_resolve_server_data(config, Path("/"), demo_federation=False)
            ),
            database=DatabaseSection(url=database_url),
            output=OutputSection(dir=output_dir),
            tracking=_resolve_tracking(config.tracking, None),
        )
    )
    if problems := _check_tracking(resolved.tracking):
        raise ConfigError("invalid run config:\n" + "\n".join(problems))
    check_files(resolved)
    check_privacy(resolved)
    return resolved


def _recheck_federation(federation: FederationSection) -> None:
    """Re-check what depends on the number of enterprises once they are filled in (the demo
    federation, or the registered nodes), naming fields as in the config (`federation.x`)."""
    try:
        RunConfig.model_validate({"federation": federation.model_dump()})
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, "run config")) from None


def check_files(config: RunConfig) -> None:
    problems = []
    try:
        max_pos = check_model_dir(resolve_model_path(config.model.path)).get(
            "max_position_embeddings"
        )
    except (
        OSError,
        ValueError,
        RuntimeError,
    ) as err:  # RuntimeError: a symlink loop (pathlib's resolve)
        problems.append(f"  model.path: {err}")
    else:
        if isinstance(max_pos, int) and config.train.seq_len > max_pos:
            problems.append(
                f"  train.seq_len: must be <= {max_pos}, the model's max_position_embeddings (got {config.train.seq_len})"
            )
    problems += _check_enterprise_data(config, tokenizer_ok=not problems)
    server_data = config.evaluation.server_data
    if server_data and not _is_file(server_data):
        problems.append(f"  evaluation.server_data: file {server_data} does not exist")
    if problems:
        raise ConfigError("invalid run config:\n" + "\n".join(dict.fromkeys(problems)))


def _check_enterprise_data(config: RunConfig, tokenizer_ok: bool) -> list[str]:
    """Every simulated enterprise's data, read whole before any process starts: each file
    exists and parses, every record has its fields, and the training records fill a block."""
    enterprises = [(i, e) for i, e in enumerate(config.federation.enterprises) if e.data]
    if not enterprises:
        return []
    tokenizer = None
    if tokenizer_ok:
        try:
            tokenizer = load_tokenizer(config.model.path)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds for a broken tokenizer
            return [
                f"  model.path: cannot load its tokenizer ({type(err).__name__}: {str(err)[:300]})"
            ]
    problems = []
    for i, e in enterprises:
        try:
            files = locate_data(e)
            if tokenizer is not None:
                check_data(files, tokenizer, config.train.seq_len)
            else:
                files.texts("heldout")
        except (OSError, ValueError) as err:
            field = "heldout" if e.heldout and str(err).startswith("held-out") else "data"
            problems.append(
                f"  federation.enterprises.{i}.{field}: enterprise {e.name}: {_data_error(err, e)}"
            )
    return problems + [DATA_HINT] if problems else []


def locate_data(enterprise: Enterprise) -> DataFiles:
    return DataFiles.locate(
        Path(enterprise.data), Path(enterprise.heldout) if enterprise.heldout else None
    )


def _data_error(err: Exception, enterprise: Enterprise) -> str:
    if isinstance(err, OSError) and err.strerror:  # e.g. a name too long: its text would repeat it
        return f"cannot read {enterprise.data[:200]} ({err.strerror})"
    return str(err)[:1000]


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def check_privacy(config: RunConfig) -> list[Forecast]:
    """Refuse, before anything starts, a privacy plan that cannot be met, one whose noise would
    swamp the updates (unless privacy.accept_noisy_plan), or a simulated node whose budget cannot
    pay for even one round, with the values that would work. Returns the utility forecasts."""
    privacy, fed, train = config.privacy, config.federation, config.train
    n = len(fed.enterprises)
    problems = []
    forecasts: list[Forecast] = []
    if (
        privacy.enterprise
        and privacy.enterprise.mechanism == "gaussian"
        and not privacy.enterprise.delta < 1 / n
    ):
        problems.append(
            f"  privacy.enterprise.delta: must be < 1/enterprises = {1 / n:.3g} (got {privacy.enterprise.delta:g})"
        )
    if fed.secure_aggregation.enabled and n < 2:
        problems.append("  federation.secure_aggregation.enabled: needs at least 2 enterprises")
    if fed.aggregation == "expert-weighted":
        if "routed_experts" not in config.lora.targets:
            problems.append(
                '  federation.aggregation: "expert-weighted" weighs routed-expert LoRA; add '
                '"routed_experts" to lora.targets'
            )
        if privacy.record:  # the token counts are clipped and noised at enterprise level only
            problems.append(
                '  federation.aggregation: "expert-weighted" releases routing counts that '
                'record-level DP-SGD does not cover; use "fedavg" with privacy.record, or '
                "enterprise-level privacy alone"
            )
    params = adapter_size(config.model.path, config.lora) if privacy.enabled else 0
    for i, e in enumerate(fed.enterprises):
        # DP-SGD's examples are records, one per row (model/data.py). A deployed node's count
        # is its own: the run's public bound on it stands in (or 1 when there is none).
        records = (privacy.record.min_records or 1) if privacy.record else 1
        if e.data is not None and privacy.record:
            records = len(locate_data(e).texts("train"))  # read (and checked) by check_files
            bound = privacy.record.min_records
            if bound is not None and records < bound:
                problems.append(
                    f"  privacy.record.min_records: enterprise {e.name} holds {records} training "
                    f"records, fewer than the declared {bound}"
                )
                continue
        if privacy.record and (e.data is not None or privacy.record.min_records):
            if not privacy.record.delta < 1 / records:
                what = "records" if e.data is not None else "privacy.record.min_records"
                problems.append(
                    f"  privacy.record.delta: must be < 1/{what} = {1 / records:.3g} for enterprise "
                    f"{e.name} ({records} records; got {privacy.record.delta:g})"
                )
                continue
        try:
            plan = plan_run(privacy, records, train.local_steps, fed.rounds)
        except InfeasiblePlan as err:
            problems.append(
                f"  {err}"
                + (f" (enterprise {e.name})" if str(err).startswith("privacy.record") else "")
            )
            continue
        if plan.record and e.data is None and privacy.record.min_records is None:
            if not privacy.accept_noisy_plan:
                problems.append(
                    "  privacy.record.min_records: a deployed run's utility forecast needs a "
                    "public lower bound on every enterprise's training records (the coordinator "
                    "sees no node's data; a node holding fewer refuses the run); declare one, "
                    "e.g. privacy.record.min_records = 20000, or set privacy.accept_noisy_plan = true"
                )
        elif plan.record:
            # Deployed enterprises share one forecast: the declared bound stands in for each.
            whose = e.name if e.data else f"every enterprise at min_records {records}"
            who = f"enterprise {e.name}" if e.data else whose
            forecast = replace(
                record_forecast(plan.record, privacy.record.clip, params), enterprise=whose
            )
            if forecast not in forecasts:
                forecasts.append(forecast)
            if forecast.hopeless and not privacy.accept_noisy_plan:
                fixes = record_fixes(forecast, plan.record, params, records, e.data is None)
                problems.append(_swamped(f"privacy.record ({who})", forecast, fixes))
        for level in ("record", "enterprise"):
            run_delta = plan.epsilon_after(level, 1)[1]
            if e.data is not None and run_delta > e.budget.delta:  # a deployed node checks its own
                problems.append(
                    f"  privacy.{level}.delta: {run_delta:g} is above the delta of enterprise {e.name} "
                    f"(federation.enterprises.{i}.budget.delta = {e.budget.delta:g}), which would refuse every round"
                )
            budget = getattr(e.budget, f"{level}_epsilon")
            one_round = plan.epsilon_after(level, 1, e.budget.delta)[0]
            if budget is not None and one_round > budget:
                what = (
                    f"one round spends {one_round:.3g}"
                    if one_round < math.inf
                    else f"the run gives no {level}-level guarantee"
                )
                problems.append(
                    f"  federation.enterprises.{i}.budget.{level}_epsilon: {budget:g} is too small: {what} (enterprise {e.name})"
                )
    if privacy.enterprise:
        try:
            plan = plan_enterprise_level(privacy.enterprise, fed.rounds)
        except InfeasiblePlan:
            pass  # already a problem above
        else:
            secagg = fed.secure_aggregation.enabled
            shares = fed.secure_aggregation.threshold_for(n) if secagg else 1
            weighted = fed.aggregation == "expert-weighted"
            share = update_share(plan.mechanism) if weighted else 1.0
            forecast = enterprise_forecast(plan, params, n, shares, share)
            forecasts.append(forecast)
            if forecast.hopeless and not privacy.accept_noisy_plan:
                secagg_shares = fed.secure_aggregation.threshold_for(n)
                fixes = enterprise_fixes(forecast, plan, params, n, secagg, secagg_shares)
                problems.append(_swamped("privacy.enterprise", forecast, fixes))
    if problems:
        raise ConfigError("invalid privacy settings:\n" + "\n".join(dict.fromkeys(problems)))
    return forecasts


def _swamped(field: str, forecast: Forecast, fixes: list[str]) -> str:
    return (
        f"  {field}: the noise would swamp the updates: {forecast.describe()}, above "
        f"{MAX_NOISE_TO_SIGNAL:g}, where the demo federations stop learning. Any one of these "
        "fixes it: " + "; ".join(fixes) + ". Or set privacy.accept_noisy_plan = true to run anyway"
    )


def parse_run_config(data: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, f"run config ({source})")) from None
    except RecursionError:
        raise ConfigError(f"invalid run config ({source}): nested too deeply") from None


def parse_overrides(pairs: list[str]) -> dict:
    """`section.key=value` pairs (`fedmoe run --set`, StartRun's overrides); values are TOML
    literals, bare words are strings."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {pair[:80]!r}: use section.key=value, e.g. federation.rounds=5"
            )
        if len(pair) > MAX_OVERRIDE_CHARS:
            raise ConfigError(
                f"override {key.strip()[:80]!r}: {len(pair):,} characters; at most {MAX_OVERRIDE_CHARS:,}"
            )
        # A NUL cannot reach a file name, and a newline would add TOML lines (`3\nother = 1`) to
        # the value's document; TOML escapes (`"a\\nb"`) write them in a value.
        if _CONTROL_CHARACTERS.search(pair.replace("\t", " ")):
            raise ConfigError(
                f"override {key.strip()[:80]!r}: control characters (NUL, newline, ...) are not allowed; "
                "write them as TOML escapes in a quoted string"
            )
        try:
            out[key.strip()] = parse_toml(f"v = {raw}", "override")["v"]
        except ConfigError:
            out[key.strip()] = raw
    return out


def apply_overrides(data: dict, overrides: dict) -> dict:
    """`section.key` = value pairs merged into the parsed config."""
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        if not sections or not all(sections) or not key or len(sections) > 4:
            raise ConfigError(
                f"override {dotted[:80]!r}: use section.key=value, e.g. federation.rounds=5 or privacy.record.epsilon=4"
            )
        target = data
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"override {dotted[:80]!r}: {section[:80]} is not a section")
        target[key] = value
    return data


def load_run_config(path: Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read, merge CLI overrides into, validate and resolve a simulation run config (None: all defaults)."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        data = read_toml_file(path)
        base = Path(path).resolve().parent
    apply_overrides(data, overrides or {})
    return resolve_paths(parse_run_config(data, str(path or "defaults")), base)
