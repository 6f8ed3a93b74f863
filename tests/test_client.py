"""The enterprise client: only adapter deltas leave, the base never drifts, mismatches stop it."""

import numpy as np
import pytest
import torch
from conftest import round_config

from fedmoe.client.enterprise import EnterpriseNode, _adapted_model, workspace
from fedmoe.client.settings import NodeSettings
from fedmoe.contract.round import LocalTrainSettings
from fedmoe.model.base import fingerprint, load_base, parameter_bytes
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.model.lora import adapter_layout, adapter_parameters, get_adapter_vector
from fedmoe.model.settings import BaseLoading, LoraSettings

LORA = LoraSettings(r=4, alpha=8)
TRAIN = LocalTrainSettings(local_steps=3, batch_size=4, seq_len=32)


@pytest.fixture
def client_and_round(tmp_path):
    node = NodeSettings(
        enterprise="finance", data=DEMO_DATA_DIR / "finance", ledger=tmp_path / "ledger.sqlite"
    )
    ws = workspace(node, LORA, TRAIN.seq_len)
    return EnterpriseNode(node), round_config(ws, lora=LORA, train=TRAIN), ws


def test_only_adapter_deltas_travel_and_the_base_does_not_drift(client_and_round):
    client, config, ws = client_and_round
    base_state = {
        n: p.detach().clone() for n, p in ws.model.named_parameters() if not p.requires_grad
    }
    global_adapter = [get_adapter_vector(ws.model)]
    delta, num_examples, metrics = client.fit(global_adapter, config, secure_sum=None)
    adapter = adapter_parameters(ws.model)
    # One flat float32 vector travels: every adapter tensor, in the canonical order, nothing else.
    (vector,) = delta
    assert vector.dtype == np.float32 and vector.shape == (
        sum(p.numel() for p in adapter.values()),
    )
    assert vector.nbytes < 0.25 * parameter_bytes(load_base("embedded"))
    assert num_examples == ws.train_blocks.shape[0]
    assert (
        metrics["update_norm"] > 0
        and np.isfinite(metrics["train_loss"])
        and "heldout_loss_before" in metrics
    )
    # The model now holds global + delta; the frozen base weights are bit-identical.
    np.testing.assert_allclose(
        get_adapter_vector(ws.model), global_adapter[0] + vector, atol=1e-6, rtol=0
    )
    for n, p in ws.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_state[n]), n


def test_base_fingerprint_mismatch_stops_the_client(client_and_round):
    client, config, ws = client_and_round
    global_adapter = [get_adapter_vector(ws.model)]
    with pytest.raises(RuntimeError, match="base model mismatch"):
        client.fit(global_adapter, {**config, "base_fingerprint": "0" * 64}, secure_sum=None)
    with pytest.raises(RuntimeError, match="layout mismatch"):
        client.evaluate(global_adapter, {**config, "adapter_layout": "f" * 16})


def test_evaluate_reports_heldout_loss(client_and_round):
    client, config, ws = client_and_round
    loss, n, metrics = client.evaluate([get_adapter_vector(ws.model)], config)
    assert n == ws.heldout_records.shape[0] and 0 < loss < 20 and metrics["enterprise"] == "finance"


def test_cached_workspace_matches_a_fresh_build():
    model, fp, layout = _adapted_model(
        "embedded", BaseLoading().model_dump_json(), LORA.model_dump_json(), "cpu"
    )
    assert fp == fingerprint(load_base("embedded")) and layout == adapter_layout(model)
