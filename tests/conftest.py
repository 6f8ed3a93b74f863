"""Shared fixtures: a tiny random DeepSeek-V3, the embedded base, and database URLs."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

# The suite writes only under temporary folders: the generated demo federations too (one
# folder for every worker and run of this user; each is built once, by an atomic rename).
os.environ.setdefault(
    "FEDMOE_DEMO_DATA", str(Path(tempfile.gettempdir()) / f"fedmoe-test-demo-data-{os.getuid()}")
)

POSTGRES_ADMIN_URL = os.environ.get(
    "FEDMOE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

TINY_ARCH = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=64,
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def tiny_model(seed: int = 0, dtype=torch.float32):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY_ARCH)).to(dtype)
    # Random router bias so that DeepSeek's biased expert choice is exercised.
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def server_identity(monkeypatch):
    """Who a ServerApp run in-process is, as Flower's runtime would have set it."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def many_expert_model(family: str, seed: int = 0):
    """A tiny DeepSeek-V2-style (softmax router, greedy top-6) or V3-style (sigmoid router with
    bias, group-limited top-4) model with 16 routed experts in 2 MoE layers."""
    import transformers

    arch = {**TINY_ARCH, "n_routed_experts": 16, "n_group": 4, "topk_group": 2}
    if family == "v2":
        arch.update(num_experts_per_tok=6, topk_method="greedy", q_lora_rank=None)
        config_class, model_class = "DeepseekV2Config", "DeepseekV2ForCausalLM"
    else:
        arch.update(num_experts_per_tok=4)
        config_class, model_class = "DeepseekV3Config", "DeepseekV3ForCausalLM"
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**arch)
    model = getattr(transformers, model_class)(config)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):  # V2's router starts at zero: every expert would tie
            torch.nn.init.normal_(p, 0, 0.5)
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def embedded_base_path():
    from fedmoe.model.base import EMBEDDED_BASE_DIR

    return str(EMBEDDED_BASE_DIR)


def _postgres_reachable() -> str | None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards.

    Skips (with the reason) only when no server is reachable and not under CI; in CI a missing
    server is a failure."""
    yield from _fresh_postgres_database()


def _fresh_postgres_database():
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    problem = _postgres_reachable()
    if problem:
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable ({problem})"
        if os.environ.get("CI"):
            pytest.fail(message)
        print(f"SKIP: {message}")
        pytest.skip(message)
    name = f"fedmoe_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("postgres_url")


RUN_UID = "0123456789abcdef0123456789abcdef"


def round_config(
    ws, privacy: dict | None = None, server_round: int = 1, lora=None, train=None, **changes
) -> dict:
    """A round config as the coordinator sends it, for a node's workspace `ws`."""
    from fedmoe.contract.round import LocalTrainSettings, RoundSpec
    from fedmoe.model.settings import BaseLoading, LoraSettings
    from fedmoe.privacy.settings import PrivacySettings

    spec = RoundSpec(
        server_round=server_round,
        rounds=changes.pop("rounds", 3),
        run_uid=changes.pop("run_uid", RUN_UID),
        lora=lora or LoraSettings(r=4, alpha=8),
        base=changes.pop("base", BaseLoading()),
        train=train or LocalTrainSettings(local_steps=3, batch_size=4, seq_len=32),
        privacy=PrivacySettings.model_validate(privacy or {}),
        base_fingerprint=ws.base_fingerprint,
        adapter_layout=ws.layout,
        measure_baseline=server_round == 1,
        **changes,
    )
    return spec.to_config()


@pytest.fixture(scope="module")
def module_postgres_url():
    """A fresh PostgreSQL database shared by one test module (same skip/fail rule as `postgres_url`)."""
    yield from _fresh_postgres_database()


def agent_toml(folder: Path, data: str | Path) -> Path:
    """A minimal agent.toml in `folder` for enterprise acme, with a node key beside it; its CA
    file is a stand-in, read only after the data and ledger checks these tests are about."""
    from fedmoe.contract.keys import write_key_pair

    (folder / "keys").mkdir(parents=True, exist_ok=True)
    write_key_pair(folder / "keys" / "node.key", folder / "keys" / "node.pub")
    (folder / "ca.pem").write_text("checked after the data and the ledger\n")
    path = folder / "agent.toml"
    path.write_text(
        'name = "acme"\ncoordinator = "127.0.0.1:9"\nca_certificate = "ca.pem"\n'
        f'private_key = "keys/node.key"\ndata = "{data}"\n'
    )
    return path
