"""A corpus of malformed run configs: every one is refused before anything starts.

Each case must end in a ConfigError whose message names the field (or, for a file that is no
usable TOML document, the file), quickly (a 2 MB value or 5000 levels of nesting must not hang)
and without writing anything. Most cases go through `load_run_config` (fast); a small sweep runs
representative ones through `fedmoe run` itself: exit code 2, `error: ...` naming the field, no
traceback, and no `runs/` folder or database left behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import agent_toml

from fedmoe.contract.round import LocalTrainSettings
from fedmoe.coordinator.config import (
    ConfigError,
    FederationSection,
    SecureAggregation,
    load_run_config,
    parse_overrides,
)
from fedmoe.model.base import EMBEDDED_BASE_DIR
from fedmoe.model.settings import LoraSettings
from fedmoe.privacy.settings import AuditSettings, EnterpriseLevel, NodeBudget, RecordLevel

# Stands for the assets folder (data and model folders) in a case's text and overrides.
ASSETS = "@A@"
MAX_SECONDS = 20.0  # per case: a hang guard (the cases take milliseconds; a loaded CI box, seconds)
ENTERPRISE = "[[federation.enterprises]]\nname = 'acme'\n"


@dataclass(frozen=True)
class Case:
    id: str
    expect: tuple[str, ...]  # substrings of the error message, the field first
    text: str | bytes | None = None  # run.toml (None: no file, defaults)
    overrides: tuple[str, ...] = ()  # `--set` pairs, through parse_overrides as on the command line


def case(id: str, expect: str | tuple[str, ...], text=None, overrides=()) -> Case:
    return Case(id, (expect,) if isinstance(expect, str) else expect, text, tuple(overrides))


# --- the file itself: TOML syntax, encoding, size, nesting --------------------------------------

SYNTAX = [
    ("unclosed-array", "rounds = ["),
    ("unclosed-header", "[federation\nrounds = 1\n"),
    ("duplicate-key", "[federation]\nrounds = 1\nrounds = 2\n"),
    ("duplicate-table", "[lora]\nr = 4\n[lora]\nalpha = 2.0\n"),
    ("unterminated-string", "[model]\npath = 'embedded\n"),
    ("unterminated-multiline", '[model]\npath = """embedded\n'),
    ("two-values", "[federation]\nrounds = 1 2\n"),
    ("no-key", "= 1\n"),
    ("empty-key-part", "[federation.]\n"),
    ("bad-hex", "[federation]\nrounds = 0x\n"),
    ("bad-date", "[federation]\nrounds = 1979-13-45\n"),
    ("trailing-comma-inline", "[lora]\nx = {a = 1,}\n"),
    ("double-comma", "[lora]\ntargets = ['attention',, 'routed_experts']\n"),
    ("bad-escape", '[model]\npath = "a\\qb"\n'),
    ("control-char-in-string", '[model]\npath = "a\x01b"\n'),
    ("bare-word-value", "[model]\npath = embedded\n"),
    (
        "redefined-array-of-tables",
        "[[federation.enterprises]]\nname = 'a'\n[federation]\nenterprises = 1\n",
    ),
    ("key-without-value", "[federation]\nrounds =\n"),
    ("plus-nan-typo", "[lora]\nalpha = nan_\n"),
    ("header-inside-value", "[lora]\nr = [lora]\n"),
]
CASES = [case(f"toml-{name}", ("run.toml", "not valid TOML"), text) for name, text in SYNTAX]

CASES += [
    case("utf8-invalid-start-byte", ("run.toml", "not UTF-8"), b"\xff\xfe[federation]\n"),
    case("utf8-truncated-sequence", ("run.toml", "not UTF-8"), b"[model]\npath = '\xc3\x28'\n"),
    case("latin1-text", ("run.toml", "not UTF-8"), "[model]\npath = 'café'\n".encode("latin-1")),
    case("utf16-text", ("run.toml", "not UTF-8"), "[federation]\nrounds = 3\n".encode("utf-16")),
    case("lone-continuation-byte", ("run.toml", "not UTF-8"), b"# \x80\n"),
    case("utf8-encoded-surrogate", ("run.toml", "not UTF-8"), b"[model]\npath = '\xed\xa0\x80'\n"),
    case(
        "utf8-byte-order-mark",
        ("run.toml", "byte-order mark"),
        "\ufeff[federation]\nrounds = 3\n".encode(),
    ),
    case("nul-byte-in-file", ("run.toml", "not valid TOML"), b"[federation]\x00\nrounds = 3\n"),
]

DEEP = 5000
CASES += [
    case(
        "nested-arrays-5000",
        ("run.toml", "nest too deeply"),
        "x = " + "[" * DEEP + "]" * DEEP + "\n",
    ),
    case(
        "nested-inline-tables-5000",
        ("run.toml", "nest too deeply"),
        "x = " + "{a = " * DEEP + "1" + "}" * DEEP,
    ),
    case(
        "nested-arrays-5000-in-section",
        ("run.toml", "nest too deeply"),
        "[lora]\ntargets = " + "[" * DEEP + "]" * DEEP + "\n",
    ),
    case("nested-header-5000", "x: unknown key", "[" + ".".join(["x"] * DEEP) + "]\n"),
    case(
        "nested-header-5000-in-section",
        "federation.x: unknown key",
        "[federation." + ".".join(["x"] * DEEP) + "]\n",
    ),
    case(
        "nested-dotted-key-5000",
        "lora.x: unknown key",
        "[lora]\n" + ".".join(["x"] * DEEP) + " = 1\n",
    ),
    case(
        "nested-arrays-200-as-rounds",
        "federation.rounds: Input should be a valid integer",
        "[federation]\nrounds = " + "[" * 200 + "]" * 200 + "\n",
    ),
    case("string-2MB", ("run.toml", "too large"), "[model]\npath = '" + "a" * 2_000_000 + "'\n"),
    case("comments-1.1MB", ("run.toml", "too large"), "# padding\n" * 110_000),
    case(
        "integer-100000-digits",
        ("run.toml", "4300 digits"),
        "[federation]\nrounds = " + "9" * 100_000 + "\n",
    ),
    case("integer-5000-digits", ("run.toml", "4300 digits"), "[lora]\nr = " + "1" * 5000 + "\n"),
    case(
        "integer-4000-digits",
        "federation.rounds: Input should be less than or equal to 100000",
        "[federation]\nrounds = " + "9" * 4000 + "\n",
    ),
    case(
        "float-overflow-to-inf",
        "lora.alpha: Input should be a finite number",
        "[lora]\nalpha = 1e999999\n",
    ),
    case(
        "string-1MB-path",
        "model.path: String should have at most 4096 characters",
        "[model]\npath = '" + "a" * 1_000_000 + "'\n",
    ),
    case("key-500000-chars", ("lora.", "...: unknown key"), "[lora]\n" + "k" * 500_000 + " = 1\n"),
    case(
        "targets-20000-wrong",
        ("lora.targets.0:", "more problems"),
        "[lora]\ntargets = [" + "1," * 20_000 + "]\n",
    ),
    case(
        "model-dtype-float64",
        "model.dtype: Input should be 'float32', 'bfloat16' or 'auto'",
        "[model]\ndtype = 'float64'\n",
    ),
    case(
        "model-quantize-int4",
        "model.quantize: Input should be 'none', 'int8' or 'nf4'",
        "[model]\nquantize = 'int4'\n",
    ),
    case(
        "model-checkpointing-string",
        "model.gradient_checkpointing: Input should be a valid boolean",
        "[model]\ngradient_checkpointing = 'yes'\n",
    ),
    case(
        "enterprises-10001",
        "federation.enterprises: Tuple should have at most 10000 items",
        "[federation]\nenterprises = [" + "{name = 'a', data = 'd'}," * 10_001 + "]\n",
    ),
    case(
        "enterprises-3000-without-name",
        ("federation.enterprises.0.name: Field required", "more problems"),
        "[federation]\nenterprises = [" + "{}," * 3000 + "]\n",
    ),
]

# --- unknown sections and keys, at every level ---------------------------------------------------

CASES += [
    case("unknown-top-level-key", "foo: unknown key", "foo = 1\n"),
    case("unknown-section", "federaton: unknown key", "[federaton]\nrounds = 2\n"),
    case("unknown-section-models", "models: unknown key", "[models]\npath = 'embedded'\n"),
    case("unknown-privacy-level", "privacy.node: unknown key", "[privacy.node]\nepsilon = 1.0\n"),
    case(
        "table-as-model-path", "model.path: Input should be a valid string", "[model.path]\nx = 1\n"
    ),
]
UNKNOWN = [
    ("model", "revision", ""),
    ("lora", "rank", ""),
    ("lora", "bogus", ""),
    ("train", "learning_rate", ""),
    ("train", "epochs", ""),
    ("federation", "round", ""),
    ("federation", "strategy", ""),
    ("federation.secure_aggregation", "enable", ""),
    ("privacy.record", "eps", "epsilon = 1.0\n"),
    ("privacy.record", "noise_multiplier", "epsilon = 1.0\n"),
    ("privacy.enterprise", "mechanisms", "epsilon = 1.0\n"),
    ("evaluation", "server", ""),
    ("database", "uri", ""),
    ("output", "directory", ""),
    ("tracking", "uri", ""),
]
CASES += [
    case(
        f"unknown-key-{section}.{key}",
        f"{section}.{key}: unknown key",
        f"[{section}]\n{extra}{key} = 1\n",
    )
    for section, key, extra in UNKNOWN
]
CASES += [
    case(
        "unknown-key-enterprise",
        "federation.enterprises.0.region: unknown key",
        ENTERPRISE + "data = 'd'\nregion = 'eu'\n",
    ),
    case(
        "unknown-key-enterprise-budget",
        "federation.enterprises.0.budget.epsilon: unknown key",
        ENTERPRISE + "data = 'd'\nbudget = { epsilon = 1.0 }\n",
    ),
    case("unknown-key-privacy", "privacy.level: unknown key", "[privacy]\nlevel = 'record'\n"),
]

# --- every numeric field: out of range, infinite, NaN, and of the wrong type ---------------------

# (section, key, int or float, a value just below the allowed range, one just above)
NUMBERS = [
    ("lora", "r", int, "0", "1025"),
    ("lora", "alpha", float, "1e-308", "1000000.5"),
    ("lora", "dropout", float, "-0.1", "1.0"),
    ("lora", "top_layers_fraction", float, "0.0", "1.01"),
    ("lora", "init_seed", int, "-1", "9223372036854775808"),
    ("train", "local_steps", int, "0", "100001"),
    ("train", "batch_size", int, "0", "4097"),
    ("train", "seq_len", int, "7", "32769"),
    ("train", "lr", float, "1e-308", "1.5"),
    ("train", "weight_decay", float, "-0.01", "1.01"),
    ("train", "max_grad_norm", float, "1e-308", "2e6"),
    ("train", "eval_batch_size", int, "0", "4097"),
    ("train", "seed", int, "-1", "9223372036854775808"),
    ("federation", "rounds", int, "0", "100001"),
    ("federation", "fraction_fit", float, "0.0", "1.01"),
    ("federation", "min_fit_clients", int, "0", "10001"),
    ("federation", "max_failed_rounds", int, "-1", "100001"),
    ("federation", "threads_per_client", int, "0", "513"),
    ("federation", "cpus_per_client", int, "0", "513"),
    ("federation", "gpus_per_client", float, "-0.5", "65"),
    ("federation", "connect_timeout_s", float, "0.0", "86400.5"),
    ("federation", "round_timeout_s", float, "1e-308", "604800.5"),
    ("federation", "server_lr", float, "1e-308", "10.5"),
    ("federation.secure_aggregation", "reconstruction_threshold", float, "0.0", "1.01"),
    ("federation.secure_aggregation", "value_range", float, "1e-308", "1000000.5"),
    ("federation.secure_aggregation", "quantization_bits", int, "7", "31"),
    ("federation.secure_aggregation", "timeout_s", float, "0.0", "86400.5"),
    ("privacy.record", "epsilon", float, "0.0", "1000.5"),
    ("privacy.record", "delta", float, "0.0", "1.0"),
    ("privacy.record", "clip", float, "1e-308", "1000000.5"),
    ("privacy.record", "max_physical_batch_size", int, "0", "65537"),
    ("privacy.record", "min_records", int, "0", "1000000000001"),
    ("privacy.record", "max_noise_multiplier", float, "0.0", "10000.5"),
    ("privacy.record", "sample_rate", float, "0.0", "1.5"),
    ("privacy.enterprise", "epsilon", float, "-1.0", "1000.5"),
    ("privacy.enterprise", "delta", float, "-1e-5", "1.0"),
    ("privacy.enterprise", "clip", float, "1e-308", "1000000.5"),
    ("privacy.enterprise", "max_noise_multiplier", float, "0.0", "10000.5"),
    ("federation.enterprises.0.budget", "record_epsilon", float, "0.0", "10000.5"),
    ("federation.enterprises.0.budget", "enterprise_epsilon", float, "-2.0", "10000.5"),
    ("federation.enterprises.0.budget", "delta", float, "0.0", "0.5"),
    ("privacy.audit", "canaries", int, "9", "100001"),
    ("privacy.audit", "guess_fraction", float, "0.0", "1.5"),
    ("privacy.audit", "confidence", float, "0.4", "1.0"),
]
MODELS = {
    "lora": LoraSettings,
    "train": LocalTrainSettings,
    "federation": FederationSection,
    "federation.secure_aggregation": SecureAggregation,
    "privacy.record": RecordLevel,
    "privacy.enterprise": EnterpriseLevel,
    "federation.enterprises.0.budget": NodeBudget,
    "privacy.audit": AuditSettings,
}


def _toml(section: str, key: str, literal: str) -> str:
    """A run.toml that sets one key of one section (and what that section needs besides)."""
    if section == "federation.enterprises.0.budget":
        return ENTERPRISE + f"data = 'd'\nbudget = {{ {key} = {literal} }}\n"
    if section == "federation.enterprises.0":
        return (
            "[[federation.enterprises]]\n"
            + ("" if key == "name" else "name = 'acme'\n")
            + f"{key} = {literal}\n"
        )
    needs = "epsilon = 1.0\n" if section.startswith("privacy.") and key != "epsilon" else ""
    return f"[{section}]\n{needs}{key} = {literal}\n"


for section, key, kind, low, high in NUMBERS:
    field = f"{section}.{key}:"
    # Out of range (the message gives the bound), not finite, of another type (strict: no coercion).
    values = [(low, "Input should be greater than"), (high, "Input should be less than")]
    if kind is float:
        values += [(v, "finite number") for v in ("inf", "-inf", "nan")]
        values += [(v, "valid number") for v in ('"2"', "true", "[1.0]", "1979-05-27")]
    else:
        values += [(v, "valid integer") for v in ("inf", "nan", "true", '"3"', "2.0", "[1]")]
    CASES += [
        case(f"{section}.{key}={v}", (field, msg), _toml(section, key, v)) for v, msg in values
    ]

# Strings, booleans, lists and sections given as something else.
STRINGS = [
    ("model", "path"),
    ("federation.enterprises.0", "name"),
    ("federation.enterprises.0", "data"),
    ("federation.enterprises.0", "ledger"),
    ("evaluation", "server_data"),
    ("database", "url"),
    ("output", "dir"),
    ("privacy.record", "accountant"),
    ("privacy.enterprise", "mechanism"),
    ("tracking", "mlflow_uri"),
    ("tracking", "mlflow_experiment"),
    ("tracking", "tensorboard_dir"),
]
for section, key in STRINGS:
    for literal in ("3", "true", "['x']"):
        CASES.append(
            case(
                f"{section}.{key}={literal}",
                f"{section}.{key}: Input should be",
                _toml(section, key, literal),
            )
        )
CASES += [
    case(
        "model.path=empty",
        "model.path: String should have at least 1 character",
        "[model]\npath = ''\n",
    ),
    case(
        "output.dir=empty",
        "output.dir: String should have at least 1 character",
        "[output]\ndir = ''\n",
    ),
    case(
        "database.url=empty",
        "database.url: String should have at least 1 character",
        "[database]\nurl = ''\n",
    ),
    case(
        "enterprise.data=empty",
        "federation.enterprises.0.data: String should have at least 1",
        ENTERPRISE + "data = ''\n",
    ),
    case(
        "enterprise.data=5000-chars",
        "federation.enterprises.0.data: String should have at most 4096",
        ENTERPRISE + f"data = '{'d' * 5000}'\n",
    ),
    case(
        "privacy.record.accountant=gdp",
        "privacy.record.accountant: Input should be 'rdp', 'prv' or 'pld'",
        "[privacy.record]\nepsilon = 1.0\naccountant = 'gdp'\n",
    ),
    case(
        "privacy.enterprise.mechanism=exponential",
        "privacy.enterprise.mechanism: Input should be 'gaussian' or 'laplace'",
        "[privacy.enterprise]\nepsilon = 1.0\nmechanism = 'exponential'\n",
    ),
    case(
        "privacy.record-without-epsilon",
        "privacy.record.epsilon: Field required",
        "[privacy.record]\nclip = 1.0\n",
    ),
    case(
        "privacy.enterprise-without-epsilon",
        "privacy.enterprise.epsilon: Field required",
        "[privacy.enterprise]\n",
    ),
    case(
        "secure_aggregation.enabled=1",
        "federation.secure_aggregation.enabled: Input should be a valid boolean",
        "[federation.secure_aggregation]\nenabled = 1\n",
    ),
    case(
        "secure_aggregation.enabled=str",
        "federation.secure_aggregation.enabled: Input should be a valid boolean",
        "[federation.secure_aggregation]\nenabled = 'true'\n",
    ),
    case(
        "secure_aggregation.enabled=list",
        "federation.secure_aggregation.enabled: Input should be a valid boolean",
        "[federation.secure_aggregation]\nenabled = [true]\n",
    ),
    case(
        "lora.targets=str",
        "lora.targets: Input should be a valid tuple",
        "[lora]\ntargets = 'attention'\n",
    ),
    case(
        "lora.targets=int", "lora.targets: Input should be a valid tuple", "[lora]\ntargets = 1\n"
    ),
    case(
        "lora.targets=empty",
        "lora.targets: Tuple should have at least 1 item",
        "[lora]\ntargets = []\n",
    ),
    case(
        "lora.targets=duplicate",
        "lora.targets: duplicate target groups",
        "[lora]\ntargets = ['attention', 'attention']\n",
    ),
    case(
        "lora.targets=unknown-group",
        "lora.targets.0: Input should be 'attention'",
        "[lora]\ntargets = ['experts']\n",
    ),
    case(
        "lora.targets=nested",
        "lora.targets.0: Input should be 'attention'",
        "[lora]\ntargets = [['attention']]\n",
    ),
    case(
        "lora.targets=table",
        "lora.targets: Input should be a valid tuple",
        "[lora]\ntargets = { attention = true }\n",
    ),
]
SECTIONS_AS_VALUES = [
    ("model", "'embedded'", "model: Input should be a valid dictionary"),
    ("lora", "[1]", "lora: Input should be a valid dictionary"),
    ("train", "3", "train: Input should be a valid dictionary"),
    ("federation", "true", "federation: Input should be a valid dictionary"),
    ("privacy", "1", "privacy: Input should be a valid dictionary"),
    ("evaluation", "[]", "evaluation: Input should be a valid dictionary"),
    ("database", "'sqlite://'", "database: Input should be a valid dictionary"),
    ("output", "'runs'", "output: Input should be a valid dictionary"),
    ("tracking", "'mlruns'", "tracking: Input should be a valid dictionary"),
]
CASES += [
    case(f"section-{name}={literal}", msg, f"{name} = {literal}\n")
    for name, literal, msg in SECTIONS_AS_VALUES
]
CASES += [
    case(
        "privacy.record=1",
        "privacy.record: Input should be a valid dictionary",
        "[privacy]\nrecord = 1\n",
    ),
    case(
        "privacy.enterprise=on",
        "privacy.enterprise: Input should be a valid dictionary",
        "[privacy]\nenterprise = 'on'\n",
    ),
    case(
        "secure_aggregation=true",
        "federation.secure_aggregation: Input should be a valid dictionary",
        "[federation]\nsecure_aggregation = true\n",
    ),
    case(
        "enterprises=table",
        "federation.enterprises: Input should be a valid tuple",
        "[federation.enterprises]\nname = 'a'\n",
    ),
    case(
        "enterprises=str",
        "federation.enterprises: Input should be a valid tuple",
        "[federation]\nenterprises = 'acme'\n",
    ),
    case(
        "enterprises=list-of-str",
        "federation.enterprises.0: Input should be a valid dictionary",
        "[federation]\nenterprises = ['acme']\n",
    ),
    case(
        "enterprise.budget=1",
        "federation.enterprises.0.budget: Input should be a valid dictionary",
        ENTERPRISE + "data = 'd'\nbudget = 1\n",
    ),
]

# --- paths: control characters, home folders that do not exist, what is in the way --------------

NO_HOME = "~fedmoe-no-such-user/x"
CONTROL = [("nul", "\\u0000"), ("newline", "\\n"), ("escape", "\\u001b[31m"), ("del", "\\u007f")]
PATH_FIELDS = [
    ("model.path", "[model]\npath = {}\n"),
    ("federation.enterprises.0.data", ENTERPRISE + "data = {}\n"),
    ("federation.enterprises.0.ledger", ENTERPRISE + "data = 'd'\nledger = {}\n"),
    ("evaluation.server_data", "[evaluation]\nserver_data = {}\n"),
    ("database.url", "[database]\nurl = {}\n"),
    ("output.dir", "[output]\ndir = {}\n"),
    ("tracking.mlflow_uri", "[tracking]\nmlflow_uri = {}\n"),
    ("tracking.tensorboard_dir", "[tracking]\ntensorboard_dir = {}\n"),
]
for field, template in PATH_FIELDS:
    CASES += [
        case(
            f"{field}-{name}", (f"{field}:", "control characters"), template.format(f'"a{escape}b"')
        )
        for name, escape in CONTROL
    ]
CASES += [
    case(
        "model.path-no-such-home",
        "model.path: cannot resolve",
        "[model]\npath = '~fedmoe-no-such-user/m'\n",
    ),
    case(
        "data-no-such-home",
        "federation.enterprises.0.data: cannot resolve",
        ENTERPRISE + f"data = '{NO_HOME}'\n",
    ),
    case(
        "ledger-no-such-home",
        "federation.enterprises.0.ledger: cannot resolve",
        ENTERPRISE + f"data = '@A@/good'\nledger = '{NO_HOME}'\n",
    ),
    case(
        "server_data-no-such-home",
        "evaluation.server_data: cannot resolve",
        f"[evaluation]\nserver_data = '{NO_HOME}'\n",
    ),
    case("output.dir-no-such-home", "output.dir: cannot resolve", f"[output]\ndir = '{NO_HOME}'\n"),
    case(
        "database.url-no-such-home",
        "database.url: cannot resolve",
        f"[database]\nurl = 'sqlite:///{NO_HOME}.db'\n",
    ),
    case(
        "output.dir-is-a-file",
        ("output.dir:", "is not a folder"),
        "[output]\ndir = '@A@/file.txt'\n",
    ),
    case(
        "output.dir-under-a-file",
        ("output.dir:", "is not a folder"),
        "[output]\ndir = '@A@/file.txt/runs'\n",
    ),
    case(
        "output.dir-name-too-long", ("output.dir:", "too long"), f"[output]\ndir = '{'o' * 300}'\n"
    ),
    case(
        "ledger-is-a-folder",
        ("federation.enterprises.0.ledger:", "is not a file"),
        ENTERPRISE + "data = '@A@/good'\nledger = '@A@'\n",
    ),
    case(
        "ledger-under-a-file",
        ("federation.enterprises.0.ledger:", "is not a folder"),
        ENTERPRISE + "data = '@A@/good'\nledger = '@A@/file.txt/acme.sqlite'\n",
    ),
    case(
        "database.url-not-a-url",
        "database.url: not a usable SQLAlchemy URL",
        "[database]\nurl = 'runs.db'\n",
    ),
    case(
        "database.url-unknown-dialect",
        "database.url: not a usable SQLAlchemy URL",
        "[database]\nurl = 'foo://x/y'\n",
    ),
    case(
        "database.url-unknown-driver",
        "database.url: not a usable SQLAlchemy URL",
        "[database]\nurl = 'postgresql+nosuchdriver://u@h/db'\n",
    ),
    case(
        "database.url-sqlite-folder",
        ("database.url:", "is not a file"),
        "[database]\nurl = 'sqlite:///@A@'\n",
    ),
    case(
        "database.url-sqlite-under-a-file",
        ("database.url:", "is not a folder"),
        "[database]\nurl = 'sqlite:///@A@/file.txt/fedmoe.db'\n",
    ),
    case(
        "server_data-missing",
        "evaluation.server_data: file",
        "[evaluation]\nserver_data = 'nowhere.jsonl'\n",
    ),
    case(
        "server_data-is-a-folder",
        "evaluation.server_data: file",
        "[evaluation]\nserver_data = '@A@'\n",
    ),
    case(
        "server_data-name-too-long",
        "evaluation.server_data: file",
        f"[evaluation]\nserver_data = '{'s' * 300}'\n",
    ),
]

# --- the trackers: URIs, names, folders -----------------------------------------------------------

CASES += [
    case(
        "tracking.mlflow_uri=empty",
        "tracking.mlflow_uri: String should have at least 1 character",
        "[tracking]\nmlflow_uri = ''\n",
    ),
    case(
        "tracking.mlflow_uri-sqlite",
        ("tracking.mlflow_uri:", "scheme 'sqlite' are not supported"),
        "[tracking]\nmlflow_uri = 'sqlite:///mlflow.db'\n",
    ),
    case(
        "tracking.mlflow_uri-no-host",
        ("tracking.mlflow_uri:", "needs a host"),
        "[tracking]\nmlflow_uri = 'https://'\n",
    ),
    case(
        "tracking.mlflow_uri-file-on-another-host",
        ("tracking.mlflow_uri:", "a file: URI names a folder on this host"),
        "[tracking]\nmlflow_uri = 'file://nas/mlruns'\n",
    ),
    case(
        "tracking.mlflow_uri-no-such-home",
        "tracking.mlflow_uri: cannot resolve",
        f"[tracking]\nmlflow_uri = '{NO_HOME}'\n",
    ),
    case(
        "tracking.mlflow_uri-under-a-file",
        ("tracking.mlflow_uri:", "is not a folder"),
        "[tracking]\nmlflow_uri = 'file:@A@/file.txt/mlruns'\n",
    ),
    case(
        "tracking.mlflow_experiment-space",
        "tracking.mlflow_experiment: String should match pattern",
        "[tracking]\nmlflow_experiment = ' fedmoe'\n",
    ),
    case(
        "tracking.mlflow_experiment-too-long",
        "tracking.mlflow_experiment: String should match pattern",
        f"[tracking]\nmlflow_experiment = '{'e' * 129}'\n",
    ),
    case(
        "tracking.tensorboard_dir=empty",
        "tracking.tensorboard_dir: String should have at least 1 character",
        "[tracking]\ntensorboard_dir = ''\n",
    ),
    case(
        "tracking.tensorboard_dir-no-such-home",
        "tracking.tensorboard_dir: cannot resolve",
        f"[tracking]\ntensorboard_dir = '{NO_HOME}'\n",
    ),
    case(
        "tracking.tensorboard_dir-is-a-file",
        ("tracking.tensorboard_dir:", "is not a folder"),
        "[tracking]\ntensorboard_dir = '@A@/file.txt'\n",
    ),
    case(
        "tracking.tensorboard_dir-system-folder",
        ("tracking.tensorboard_dir:", "is a system folder"),
        "[tracking]\ntensorboard_dir = '/sys/tb'\n",
    ),
]

# --- the federation: enterprises, names, consistency ---------------------------------------------

CASES += [
    case(
        "enterprises=[]",
        ("federation.enterprises:", "empty list"),
        "[federation]\nenterprises = []\n",
    ),
    case(
        "enterprises=[]-by-override",
        ("federation.enterprises:", "empty list"),
        overrides=["federation.enterprises=[]"],
    ),
    case(
        "min_fit_clients-above-enterprises",
        "federation.min_fit_clients: 2 exceeds the 1 enterprise",
        "[federation]\nmin_fit_clients = 2\n" + ENTERPRISE + "data = '@A@/good'\n",
    ),
    case(
        "max_failed_rounds-not-below-rounds",
        "federation.max_failed_rounds: must be below rounds (2), got 2",
        "[federation]\nrounds = 2\nmax_failed_rounds = 2\n",
    ),
    case(
        "min_fit_clients-above-demo",
        "federation.min_fit_clients: 4 exceeds the 3 enterprises",
        "[federation]\nmin_fit_clients = 4\n",
    ),
    case(
        "duplicate-enterprise-names",
        ("federation.enterprises: names must be unique", "acme"),
        (ENTERPRISE + "data = '@A@/good'\n") * 2,
    ),
    case(
        "duplicate-names-among-three",
        ("federation.enterprises: names must be unique", "b"),
        "[federation]\nenterprises = ["
        "{name = 'a', data = 'd'}, {name = 'b', data = 'd'}, {name = 'b', data = 'd'}]\n",
    ),
    case(
        "enterprise-without-name",
        "federation.enterprises.0.name: Field required",
        "[[federation.enterprises]]\ndata = 'd'\n",
    ),
    case(
        "enterprise-without-data",
        "federation.enterprises.0.data: required on the simulation engine",
        ENTERPRISE,
    ),
    case(
        "second-enterprise-without-data",
        "federation.enterprises.1.data: required on the simulation engine",
        ENTERPRISE + "data = '@A@/good'\n[[federation.enterprises]]\nname = 'beta'\n",
    ),
    case(
        "secure-aggregation-one-enterprise",
        "federation.secure_aggregation.enabled: needs at least 2 enterprises",
        "[federation.secure_aggregation]\nenabled = true\n" + ENTERPRISE + "data = '@A@/good'\n",
    ),
    case(
        "secure-aggregation-bits-overflow",
        "federation.secure_aggregation.quantization_bits: enterprises x 2^bits",
        "[federation.secure_aggregation]\nenabled = true\nquantization_bits = 30\n[federation]\nenterprises = ["
        + ", ".join(f"{{name = 'e{i}', data = 'd'}}" for i in range(5))
        + "]\n",
    ),
]
BAD_NAMES = [
    ("empty", "''"),
    ("leading-space", "' acme'"),
    ("trailing-space", "'acme '"),
    ("slash", "'a/b'"),
    ("parent-dir", "'../x'"),
    ("dot-first", "'.hidden'"),
    ("dash-first", "'-x'"),
    ("underscore-first", "'_x'"),
    ("space-inside", "'a b'"),
    ("non-ascii", "'café'"),
    ("trailing-newline", '"acme\\n"'),
    ("nul", '"a\\u0000b"'),
    ("semicolon", "'a;rm'"),
    ("65-chars", f"'{'a' * 65}'"),
    ("backslash", "'a\\b'"),
]
CASES += [
    case(
        f"enterprise-name-{name}",
        "federation.enterprises.0.name: String should match pattern",
        f"[[federation.enterprises]]\nname = {literal}\ndata = 'd'\n",
    )
    for name, literal in BAD_NAMES
]

# --- enterprise data folders ---------------------------------------------------------------------

RECORD_DP = (
    "[privacy.record]\nepsilon = 8.0\n"  # records are read (and counted) only for record-level DP
)


def _data_case(
    id: str, folder: str, expect: str | tuple[str, ...] = (), record_dp: bool = False
) -> Case:
    expect = (expect,) if isinstance(expect, str) else expect
    text = (RECORD_DP if record_dp else "") + ENTERPRISE + f"data = '@A@/{folder}'\n"
    return case(f"data-{id}", ("federation.enterprises.0.data:", *expect), text)


CASES += [
    _data_case("missing-folder", "nowhere", ("enterprise acme", "does not exist")),
    _data_case("empty-folder", "empty", ("no train", "or point data at one file")),
    _data_case("a-text-file", "file.txt", "unsupported data file type '.txt'"),
    _data_case("only-heldout", "only_heldout", "no train"),
    _data_case("splits-are-folders", "split_folders", "no train"),
    _data_case("unsupported-suffix", "txt_splits", "no train"),
    _data_case("symlink-loop", "loop", "does not exist"),
    _data_case("binary-file", "binary.jsonl", ("binary.jsonl", "not UTF-8")),
    _data_case(
        "binary-ascii-file", "binary_ascii.jsonl", ("binary_ascii.jsonl:1", "not valid JSON")
    ),
    _data_case("one-record-no-heldout", "one.jsonl", ("one.jsonl", "at least 2")),
    _data_case("too-few-tokens", "tiny", ("tiny/train.jsonl", "fewer than one block")),
    _data_case("copies-of-one-text", "copies.jsonl", "every record is a copy of one text"),
    _data_case("empty-heldout", "empty_heldout", ("heldout.jsonl", "no records")),
    _data_case("heldout-without-text", "heldout_no_text", ("heldout.jsonl record 1", "'text'")),
    case(
        "data-heldout-file-missing",
        ("federation.enterprises.0.heldout: enterprise acme", "held-out file", "does not exist"),
        ENTERPRISE + "data = '@A@/good/train.jsonl'\nheldout = '@A@/nowhere.jsonl'\n",
    ),
    case(
        "data-heldout-in-a-deployment-key",
        "federation.enterprises.0.heldout: String should have at least 1 character",
        ENTERPRISE + "data = '@A@/good'\nheldout = ''\n",
    ),
    case(
        "data-fewer-records-than-min_records",
        ("privacy.record.min_records: enterprise acme holds 10", "declared 11"),
        "[privacy]\naccept_noisy_plan = true\n[privacy.record]\nepsilon = 8.0\nmin_records = 11\n"
        + ENTERPRISE
        + "data = '@A@/good'\n",
    ),
    _data_case("name-too-long", "d" * 300, "too long"),
    _data_case("bad-json", "bad_json", "train.jsonl:2: not valid JSON"),
    _data_case(
        "json-list-line",
        "json_list",
        "train.jsonl:1: a record must be a JSON object, got list",
    ),
    _data_case(
        "json-number-line",
        "json_number",
        "train.jsonl:1: a record must be a JSON object, got int",
    ),
    _data_case(
        "json-string-line",
        "json_string",
        "train.jsonl:1: a record must be a JSON object, got str",
    ),
    _data_case(
        "json-null-line",
        "json_null",
        "a record must be a JSON object, got NoneType",
    ),
    _data_case(
        "json-too-deep",
        "json_deep",
        "train.jsonl:1: not valid JSON (nested too deeply)",
    ),
    _data_case(
        "json-integer-5000-digits",
        "json_bigint",
        ("train.jsonl:1: not valid JSON", "4300 digits"),
    ),
    _data_case("record-without-text", "no_text", ("record 2", "needs a 'text' field")),
    _data_case("text-not-a-string", "text_number", ("record 1", "needs a 'text' field")),
    _data_case(
        "instruction-without-response",
        "no_response",
        ("record 1", "needs a 'text' field"),
    ),
    _data_case("non-utf8-jsonl", "non_utf8", ("train.jsonl", "not UTF-8")),
    _data_case("non-utf8-csv", "non_utf8_csv", ("train.csv", "not UTF-8")),
    _data_case("record-2M-chars", "huge_record", ("record 2", "2,000,000 characters")),
    _data_case(
        "instruction-2M-chars",
        "huge_instruction",
        ("record 1", "at most 1,000,000"),
    ),
    _data_case("csv-field-over-limit", "csv_huge_field", ("train.csv:2", "not valid CSV")),
    _data_case(
        "csv-row-longer-than-header",
        "csv_extra_column",
        ("record 1", "got keys ['None', 'foo']"),
    ),
    _data_case("csv-header-only", "csv_header_only", ("train.csv", "no records")),
    _data_case("empty-train", "empty_train", ("train.jsonl", "no records")),
    _data_case("blank-lines-only", "blank_train", ("train.jsonl", "no records")),
    _data_case("parquet-garbage", "parquet_garbage", "train.parquet"),  # with or without pyarrow
    # (the data is checked first, whole: a broken file is named before any plan is calibrated)
    case(
        "data-second-enterprise-bad-json",
        ("federation.enterprises.1.data: enterprise beta", "not valid JSON"),
        "[privacy.record]\nepsilon = 0.001\n"
        + ENTERPRISE
        + "data = '@A@/good'\n[[federation.enterprises]]\nname = 'beta'\ndata = '@A@/bad_json'\n",
    ),
]

# --- faults found in the field (issue 18) ---------------------------------------------------------

TWO = ENTERPRISE + "data = '@A@/good'\n[[federation.enterprises]]\nname = 'beta'\n"
CASES += [
    case(
        "duplicate-key-named-with-its-line",
        ("not valid TOML", "line 3 reads 'rounds = 2'", "'rounds' is defined twice"),
        "[federation]\nrounds = 1\nrounds = 2\n",
    ),
    case(
        "two-enterprises-one-data-folder",
        ("federation.enterprises.1.data:", "is enterprise acme's too"),
        TWO + "data = '@A@/good'\n",
    ),
    case(
        "two-enterprises-one-ledger",
        ("federation.enterprises.1.ledger:", "is enterprise acme's too"),
        ENTERPRISE
        + "data = '@A@/good'\nledger = 'l.sqlite'\n[[federation.enterprises]]\nname = 'beta'\n"
        + "data = '@A@/only_heldout_and_train'\nledger = 'l.sqlite'\n",
    ),
    case(
        "output-dir-under-proc",
        ("output.dir:", "is a system folder"),
        "[output]\ndir = '/proc/x'\n",
    ),
    case("output-dir-is-dev", ("output.dir:", "is a system folder"), "[output]\ndir = '/dev'\n"),
    case(
        "database-unreachable",
        ("database.url:", "cannot connect"),
        "[database]\nurl = 'postgresql+psycopg://nobody@127.0.0.1:1/none'\n",
    ),
    case(
        "fraction-fit-below-min-fit-clients",
        ("federation.fraction_fit: 0.1 of 3 enterprises samples 1", "min_fit_clients = 3"),
        "[federation]\nfraction_fit = 0.1\nmin_fit_clients = 3\n",
    ),
    case(
        "fraction-fit-below-min-fit-clients-listed",
        ("federation.fraction_fit: 0.5 of 2 enterprises samples 1", "min_fit_clients = 2"),
        "[federation]\nfraction_fit = 0.5\nmin_fit_clients = 2\n" + TWO + "data = '@A@/good2'\n",
    ),
]

# --- the model folder ------------------------------------------------------------------------------


def _model_case(id: str, folder: str, expect: str | tuple[str, ...], extra: str = "") -> Case:
    expect = (expect,) if isinstance(expect, str) else expect
    return case(f"model-{id}", ("model.path:", *expect), f"{extra}[model]\npath = '@A@/{folder}'\n")


CASES += [
    _model_case("missing-folder", "no_model", "no config.json"),
    _model_case("empty-folder", "empty", "no config.json"),
    _model_case("a-file", "file.txt", "no config.json"),
    _model_case("weights-without-config", "m_no_config", "no config.json"),
    _model_case("config-is-a-folder", "m_config_folder", "no config.json"),
    _model_case("llama", "m_llama", "holds a 'llama' model"),
    _model_case("no-model-type", "m_no_type", "holds a None model"),
    _model_case("model-type-list", "m_type_list", "holds a ['deepseek_v3'] model"),
    _model_case("invalid-json", "m_bad_json", "cannot read the checkpoint"),
    _model_case("json-list", "m_json_list", "is not a model config"),
    _model_case("non-utf8-config", "m_non_utf8", "cannot read the checkpoint"),
    _model_case("config-too-deep", "m_deep", "nests too deeply"),
    _model_case(
        "config-integer-5000-digits", "m_bigint", ("cannot read the checkpoint", "4300 digits")
    ),
    _model_case("no-weights", "m_no_weights", "no weights"),
    _model_case("weights-are-a-folder", "m_weights_folder", "no weights"),
    _model_case("symlink-loop", "loop", "Symlink loop"),
    _model_case("name-too-long", "m" * 300, "too long"),
    _model_case(
        "no-tokenizer-under-record-dp",
        "m_no_tokenizer",
        "cannot load its tokenizer",
        extra=RECORD_DP + ENTERPRISE + "data = '@A@/good'\n",
    ),
    case(
        "model-path-5000-chars",
        "model.path: String should have at most 4096",
        f"[model]\npath = '{'m' * 5000}'\n",
    ),
    case(
        "train.seq_len-above-the-model", "train.seq_len: must be <= 512", "[train]\nseq_len = 513\n"
    ),
]

# --- privacy plans that cannot be met --------------------------------------------------------------

TINY = ENTERPRISE + "data = '@A@/good'\n"  # 10 records: record-level plans are quick to refuse
CASES += [
    case(
        "record-epsilon-too-small",
        "privacy.record.epsilon >= ",
        "[privacy.record]\nepsilon = 0.001\n" + TINY,
    ),
    case(
        "record-delta-above-1/records",
        "privacy.record.delta: must be < 1/records = 0.1",
        "[privacy.record]\nepsilon = 8.0\ndelta = 0.2\n" + TINY,
    ),
    case(
        "record-noise-cap-too-low",
        "above max_noise_multiplier=0.3",
        "[privacy.record]\nepsilon = 1.0\nmax_noise_multiplier = 0.3\n" + TINY,
    ),
    case(
        "enterprise-epsilon-too-small",
        "privacy.enterprise.epsilon >= ",
        "[privacy.enterprise]\nepsilon = 0.01\n",
    ),
    case(
        "enterprise-laplace-too-many-rounds",
        ("privacy.enterprise.epsilon >= ", "federation.rounds <= "),
        "[federation]\nrounds = 1000\n[privacy.enterprise]\nepsilon = 1.0\nmechanism = 'laplace'\n",
    ),
    case(
        "enterprise-delta-above-1/enterprises",
        "privacy.enterprise.delta: must be < 1/enterprises",
        "[privacy.enterprise]\nepsilon = 8.0\ndelta = 0.5\n",
    ),
    case(
        "enterprise-noise-cap-too-low",
        "above max_noise_multiplier=0.01",
        "[privacy.enterprise]\nepsilon = 1.0\nmax_noise_multiplier = 0.01\n",
    ),
    case(
        "budget-below-one-round",
        "federation.enterprises.0.budget.enterprise_epsilon: 0.001 is too small",
        "[privacy.enterprise]\nepsilon = 8.0\n"
        + TINY
        + "budget = { enterprise_epsilon = 0.001 }\n",
    ),
    case(
        "budget-without-a-guarantee",
        "federation.enterprises.0.budget.record_epsilon: 1 is too small",
        TINY + "budget = { record_epsilon = 1.0 }\n",
    ),
    # Huge plans are refused quickly: rounds are found by bisection and the PRV/PLD accountants
    # refuse step counts they cannot account in seconds.
    case(
        "record-infeasible-100000-rounds",
        "privacy.record.epsilon",
        overrides=["privacy.record.epsilon=0.5", "federation.rounds=100000", "train.local_steps=1"],
    ),
    case(
        "record-prv-10^7-steps",
        "privacy.record",
        overrides=[
            "privacy.record.epsilon=8.0",
            "privacy.record.accountant='prv'",
            "federation.rounds=1000",
            "train.local_steps=10000",
        ],
    ),
]

# --- `--set` overrides -----------------------------------------------------------------------------

OVERRIDES = [
    ("no-equals", ["federation.rounds"], "override 'federation.rounds': use section.key=value"),
    ("no-key", ["=3"], "override '=3': use section.key=value"),
    ("blank-key", ["  =3"], "use section.key=value"),
    ("no-section", ["rounds=3"], "override 'rounds': use section.key=value"),
    ("six-levels", ["a.b.c.d.e.f=1"], "override 'a.b.c.d.e.f': use section.key=value"),
    ("empty-section", ["federation..rounds=3"], "override 'federation..rounds'"),
    ("leading-dot", [".rounds=3"], "override '.rounds'"),
    ("trailing-dot", ["federation.=3"], "override 'federation.'"),
    (
        "nul-byte",
        ["federation.rounds=3\x00"],
        ("override 'federation.rounds'", "control characters"),
    ),
    ("nul-in-path", ["model.path=/tmp/a\x00b"], ("override 'model.path'", "control characters")),
    (
        "newline-adds-a-key",
        ["federation.rounds=3\nlora.r = 0"],
        ("override 'federation.rounds'", "control characters"),
    ),
    (
        "20000-chars",
        ["federation.rounds=" + "1" * 20_000],
        ("override 'federation.rounds'", "at most 10,000"),
    ),
    ("20000-char-key", ["k" * 20_000 + "=1"], "at most 10,000"),
    (
        "rounds=true",
        ["federation.rounds=true"],
        "federation.rounds: Input should be a valid integer",
    ),
    (
        "rounds=quoted",
        ['federation.rounds="3"'],
        "federation.rounds: Input should be a valid integer",
    ),
    ("rounds=2.0", ["federation.rounds=2.0"], "federation.rounds: Input should be a valid integer"),
    ("rounds=inf", ["federation.rounds=inf"], "federation.rounds: Input should be a valid integer"),
    (
        "rounds=bare-word",
        ["federation.rounds=three"],
        "federation.rounds: Input should be a valid integer",
    ),
    ("alpha=quoted", ['lora.alpha="2"'], "lora.alpha: Input should be a valid number"),
    ("alpha=true", ["lora.alpha=true"], "lora.alpha: Input should be a valid number"),
    ("alpha=nan", ["lora.alpha=nan"], "lora.alpha: Input should be a finite number"),
    ("r=list", ["lora.r=[4]"], "lora.r: Input should be a valid integer"),
    (
        "targets=bare-word",
        ["lora.targets=attention"],
        "lora.targets: Input should be a valid tuple",
    ),
    ("model.path=empty", ["model.path="], "model.path: String should have at least 1 character"),
    (
        "below-a-scalar",
        ["federation.rounds.x=1"],
        "federation.rounds: Input should be a valid integer",
    ),
    ("unknown-section", ["nosuch.key=1"], "nosuch: unknown key"),
    ("unknown-key", ["lora.rank=8"], "lora.rank: unknown key"),
    (
        "privacy.record.epsilon=0",
        ["privacy.record.epsilon=0"],
        "privacy.record.epsilon: Input should be greater than 0",
    ),
    (
        "quantization_bits=31",
        ["federation.secure_aggregation.quantization_bits=31"],
        "federation.secure_aggregation.quantization_bits: Input should be less than or equal to 30",
    ),
    (
        "deep-value",
        ["lora.r=" + "[" * 3000 + "]" * 3000],
        "lora.r: Input should be a valid integer",
    ),
]
CASES += [case(f"set-{name}", expect, overrides=pairs) for name, pairs, expect in OVERRIDES]
CASES += [
    case(
        "set-below-a-scalar-from-the-file",
        "override 'federation.rounds.x': rounds is not a section",
        "[federation]\nrounds = 3\n",
        ["federation.rounds.x=1"],
    ),
    case(
        "set-below-a-list-from-the-file",
        "override 'federation.enterprises.name': enterprises is not a section",
        TINY,
        ["federation.enterprises.name=x"],
    ),
    case(
        "set-section-replaced-by-file-scalar",
        "override 'model.path': model is not a section",
        "model = 1\n",
        ["model.path=embedded"],
    ),
]


# --- the assets the cases point at -----------------------------------------------------------------


def _split(
    folder: Path, train: bytes, heldout: bytes = b'{"text": "held out"}\n', suffix: str = ".jsonl"
) -> None:
    folder.mkdir(parents=True)
    (folder / f"train{suffix}").write_bytes(train)
    (folder / f"heldout{suffix}").write_bytes(heldout)


def _model(folder: Path, files: dict[str, bytes | None]) -> None:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).mkdir() if content is None else (folder / name).write_bytes(content)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    good = b"".join(
        json.dumps({"text": f"record {i}: the quick brown fox"}).encode() + b"\n" for i in range(10)
    )
    _split(root / "good", good)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder\n")
    (root / "loop").symlink_to(root / "loop")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (root / "binary_ascii.jsonl").write_bytes(bytes(range(1, 128)) * 4)
    (root / "one.jsonl").write_bytes(good.split(b"\n")[0] + b"\n")
    (root / "copies.jsonl").write_bytes((good.split(b"\n")[0] + b"\n") * 3)
    _split(root / "tiny", b'{"text": "too short"}\n')
    _split(root / "good2", good)
    _split(root / "only_heldout_and_train", good)
    _split(root / "empty_heldout", good, b"")
    _split(root / "heldout_no_text", good, b'{"body": "x"}\n')
    (root / "only_heldout").mkdir()
    (root / "only_heldout" / "heldout.jsonl").write_bytes(good)
    (root / "split_folders" / "train.jsonl").mkdir(parents=True)
    (root / "split_folders" / "heldout.jsonl").mkdir()
    _split(root / "txt_splits", b"text\n", b"text\n", ".txt")
    _split(root / "bad_json", b'{"text": "ok"}\n{"text": \n')
    _split(root / "json_list", b'["text", "x"]\n')
    _split(root / "json_number", b"3\n")
    _split(root / "json_string", b'"a record"\n')
    _split(root / "json_null", b"null\n")
    _split(root / "json_deep", b'{"text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    _split(root / "json_bigint", b'{"text": "x", "n": ' + b"7" * 5000 + b"}\n")
    _split(root / "no_text", b'{"text": "ok"}\n{"body": "no text"}\n')
    _split(root / "text_number", b'{"text": 42}\n')
    _split(root / "no_response", b'{"instruction": "do"}\n')
    _split(root / "non_utf8", b'{"text": "caf\xe9"}\n')
    _split(root / "non_utf8_csv", b"text\ncaf\xe9\n", b"text\nheld out\n", ".csv")
    _split(
        root / "huge_record",
        good.split(b"\n")[0] + b"\n" + json.dumps({"text": "a" * 2_000_000}).encode() + b"\n",
    )
    _split(
        root / "huge_instruction",
        json.dumps({"instruction": "b" * 2_000_000, "response": "c"}).encode() + b"\n",
    )
    _split(root / "csv_huge_field", b"text\n" + b"a" * 200_000 + b"\n", b"text\nheld out\n", ".csv")
    _split(root / "csv_extra_column", b"foo\na,b\n", b"text\nheld out\n", ".csv")
    _split(root / "csv_header_only", b"text\n", b"text\nheld out\n", ".csv")
    _split(root / "empty_train", b"")
    _split(root / "blank_train", b"\n  \n\n")
    _split(root / "parquet_garbage", b"not parquet", b"not parquet", ".parquet")
    deepseek = json.dumps({"model_type": "deepseek_v3"}).encode()
    _model(root / "m_no_config", {"model.safetensors": b""})
    _model(root / "m_config_folder", {"config.json": None, "model.safetensors": b""})
    _model(root / "m_llama", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b""})
    _model(root / "m_no_type", {"config.json": b'{"hidden_size": 8}', "model.safetensors": b""})
    _model(
        root / "m_type_list",
        {"config.json": b'{"model_type": ["deepseek_v3"]}', "model.safetensors": b""},
    )
    _model(root / "m_bad_json", {"config.json": b'{"model_type": ', "model.safetensors": b""})
    _model(root / "m_json_list", {"config.json": b'["deepseek_v3"]', "model.safetensors": b""})
    _model(
        root / "m_non_utf8", {"config.json": b'{"model_type": "\xff"}', "model.safetensors": b""}
    )
    _model(
        root / "m_deep", {"config.json": b"[" * 100_000 + b"]" * 100_000, "model.safetensors": b""}
    )
    _model(
        root / "m_bigint",
        {"config.json": b'{"model_type": "deepseek_v3", "n": ' + b"1" * 5000 + b"}"},
    )
    _model(root / "m_no_weights", {"config.json": deepseek})
    _model(root / "m_weights_folder", {"config.json": deepseek, "model.safetensors": None})
    _model(root / "m_no_tokenizer", {"config.json": deepseek, "model.safetensors": b""})
    # Warm the imports that the first case of a kind would otherwise pay for (transformers, SQLAlchemy).
    from fedmoe.model.base import load_tokenizer

    load_tokenizer(EMBEDDED_BASE_DIR)
    load_run_config(None, {"federation.rounds": 1})
    return root


def _with_assets(value, assets: Path):
    if isinstance(value, bytes):
        return value.replace(ASSETS.encode(), str(assets).encode())
    return value.replace(ASSETS, str(assets))


def _message(case: Case, assets: Path, folder: Path) -> str:
    path = None
    if case.text is not None:
        path = folder / "run.toml"
        text = _with_assets(case.text, assets)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_run_config(path, parse_overrides([_with_assets(o, assets) for o in case.overrides]))
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"{case.id}: refused after {elapsed:.1f}s"
    return str(err.value)


# --- the tests -------------------------------------------------------------------------------------


def test_the_corpus_is_large_and_every_case_is_named_once():
    ids = [c.id for c in CASES]
    assert len(CASES) >= 220, len(CASES)
    assert len(set(ids)) == len(ids), sorted(i for i in set(ids) if ids.count(i) > 1)


def _numeric_fields(model) -> set[str]:
    def numeric(annotation) -> bool:
        if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            return any(numeric(a) for a in typing.get_args(annotation))
        return annotation in (int, float)

    return {name for name, field in model.model_fields.items() if numeric(field.annotation)}


def test_every_numeric_field_of_every_section_is_in_the_corpus():
    covered = {(section, key) for section, key, *_ in NUMBERS}
    for section, model in MODELS.items():
        missing = {key for key in _numeric_fields(model) if (section, key) not in covered}
        assert not missing, f"add {section}.{sorted(missing)} to NUMBERS"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_malformed_config_is_refused_naming_the_field(case, assets, tmp_path, monkeypatch):
    # Relative defaults (runs/, runs/fedmoe.db) land here if anything is written.
    monkeypatch.chdir(tmp_path)
    message = _message(case, assets, tmp_path)
    for part in case.expect:
        assert _with_assets(part, assets) in message, f"{part!r} not in:\n{message[:2000]}"
    assert "Traceback" not in message
    assert [p.name for p in tmp_path.iterdir()] == (["run.toml"] if case.text is not None else [])
    assert len(message) < 20_000  # a report, not a dump of the input


def _config_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "run.toml").write_text("[federation]\nrounds = 3\n")
    (tmp_path / "loop.toml").symlink_to(tmp_path / "loop.toml")
    os.mkfifo(tmp_path / "fifo.toml")
    return {
        "name-too-long": (tmp_path / ("x" * 300 + ".toml"), "File name too long"),
        "a-folder": (tmp_path, "is a folder, not a TOML file"),
        "missing": (tmp_path / "nowhere.toml", "nowhere.toml does not exist"),
        "under-a-file": (tmp_path / "run.toml" / "x.toml", "does not exist"),
        "symlink-loop": (tmp_path / "loop.toml", "loop.toml does not exist"),
        "a-fifo": (tmp_path / "fifo.toml", "fifo.toml does not exist"),
        "path-4000-chars": (tmp_path / "/".join(["p" * 200] * 25), "File name too long"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "name-too-long",
        "a-folder",
        "missing",
        "under-a-file",
        "symlink-loop",
        "a-fifo",
        "path-4000-chars",
    ],
)
def test_a_config_path_that_is_no_config_file_is_refused(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, expected = _config_paths(tmp_path)[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match=expected):
        load_run_config(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- the same through `fedmoe run` -----------------------------------------------------------------

# (name, run.toml or None, arguments after `run`, what the error names)
CLI_CASES = [
    ("set-rounds-0", None, ["--set", "federation.rounds=0"], "federation.rounds"),
    ("non-utf8-file", b"[model]\npath = '\xff'\n", ["--config", "run.toml"], "not UTF-8"),
    ("file-name-too-long", None, ["--config", "x" * 300 + ".toml"], "File name too long"),
    ("nested-5000", "x = " + "[" * DEEP + "]" * DEEP, ["--config", "run.toml"], "nest too deeply"),
    (
        "empty-enterprises",
        "[federation]\nenterprises = []\n",
        ["--config", "run.toml"],
        "federation.enterprises",
    ),
    ("markup-in-key", '"[/x]" = 1\n', ["--config", "run.toml"], "[/x]: unknown key"),
    ("bad-database-url", None, ["--set", "database.url=foo"], "database.url"),
    (
        "output-dir-is-a-file",
        "[output]\ndir = 'run.toml'\n",
        ["--config", "run.toml"],
        "output.dir",
    ),
    (
        "bad-data",
        ENTERPRISE + "data = '@A@/bad_json'\n",
        ["--config", "run.toml"],
        "federation.enterprises.0.data: enterprise acme",
    ),
    (
        "no-text-field",
        ENTERPRISE + "data = '@A@/no_text'\n",
        ["--config", "run.toml"],
        "record 2: a record needs a 'text' field",
    ),
    # A NUL cannot be passed in argv (execve refuses it): the same main() with the argument built inside.
    ("nul-in-set", None, None, "federation.rounds"),
]
NUL_MAIN = (
    "import sys; from fedmoe.cli.main import main; "
    "sys.exit(main(['run', '--set', 'federation.rounds=3' + chr(0)]))"
)


def _run_cli(item, assets: Path, folder: Path) -> tuple[int, str, list[str], list[str]]:
    name, text, args, _ = item
    folder.mkdir()
    if text is not None:
        text = _with_assets(text, assets)
        (folder / "run.toml").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = sorted(p.name for p in folder.iterdir())
    if args is None:
        command = [sys.executable, "-c", NUL_MAIN]
    else:
        command = [
            sys.executable,
            "-m",
            "fedmoe.cli",
            "run",
            *[_with_assets(a, assets) for a in args],
        ]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
    return (
        done.returncode,
        done.stdout + done.stderr,
        before,
        sorted(p.name for p in folder.iterdir()),
    )


@pytest.fixture(scope="module")
def cli_results(assets, tmp_path_factory) -> dict:
    """Every CLI case, one process per core at a time: each pays seconds of imports (torch)."""
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {
            item[0]: pool.submit(_run_cli, item, assets, root / item[0]) for item in CLI_CASES
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("item", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_fedmoe_run_refuses_a_malformed_config_with_exit_code_2(item, cli_results):
    name, _, _, field = item
    code, output, before, after = cli_results[name]
    assert "Traceback" not in output, output[-3000:]
    assert code == 2, output[-3000:]
    flat = " ".join(output.split())  # the console wraps long lines
    assert "error:" in flat and field in flat, output[-3000:]
    assert after == before, f"{name} left {sorted(set(after) - set(before))} behind"


# --- the same data, on an agent: what `fedmoe agent` checks before it starts ---------------------
AGENT_DATA_CASES = [
    c
    for c in CASES
    if c.id.startswith("data-")
    and isinstance(c.text, str)
    and c.text.startswith(ENTERPRISE)
    and re.fullmatch(r"data = '@A@/[^']*'\n", c.text[len(ENTERPRISE) :])
]


@pytest.mark.parametrize("case", AGENT_DATA_CASES, ids=[c.id for c in AGENT_DATA_CASES])
def test_an_agent_refuses_the_same_bad_data_naming_its_file(case, assets, tmp_path):
    from fedmoe.client.agent_config import load_agent_config

    folder = re.fullmatch(r"data = '(@A@/[^']*)'\n", case.text[len(ENTERPRISE) :]).group(1)
    with pytest.raises(ConfigError) as refused:
        load_agent_config(agent_toml(tmp_path, _with_assets(folder, assets)))
    message = str(refused.value)
    assert "data:" in message and "Traceback" not in message
    for part in case.expect[1:]:  # the run config's field name aside, the same words
        if part != "enterprise acme":
            assert _with_assets(part, assets) in message, f"{part!r} not in:\n{message[:2000]}"
    assert not (tmp_path / "state").exists()  # nothing started, no ledger made
