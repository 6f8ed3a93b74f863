"""A private run that still learns (issue 9): the planner's utility forecast against measured
noise, its refusals and their fixes, the generated demo federations, and a run's result (the
best round by public evaluation, never worse than the base model)."""

import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.coordinator.config import ConfigError, load_run_config
from fedmoe.coordinator.store.db import Round
from fedmoe.coordinator.store.outcome import outcome
from fedmoe.model.corpus import (
    MANY_ENTERPRISES,
    build_generated_federation,
    generated_enterprises,
    resolve_generated,
)
from fedmoe.model.data import read_texts
from fedmoe.privacy.dp_sgd import private_gradient
from fedmoe.privacy.forecast import (
    MAX_NOISE_TO_SIGNAL,
    enterprise_forecast,
    record_forecast,
)
from fedmoe.privacy.plan import plan_enterprise_level, plan_record_level, privatize_update
from fedmoe.privacy.settings import EnterpriseLevel, RecordLevel

REPO = Path(__file__).parents[1]


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
@pytest.mark.parametrize("secure_aggregation", [False, True])
def test_enterprise_forecast_matches_the_noise_of_a_measured_average(mechanism, secure_aggregation):
    d, n = 20_000, 12
    plan = plan_enterprise_level(EnterpriseLevel(epsilon=4.0, mechanism=mechanism), rounds=3)
    shares = 8 if secure_aggregation else 1
    rng = np.random.default_rng(0)
    direction = rng.normal(size=d)
    updates = [[5.0 * direction + rng.normal(size=d) * 0.1] for _ in range(n)]
    released = [privatize_update(u, plan, shares)[0][0] for u in updates]
    clip = (
        (lambda v: v * min(1.0, plan.clip / np.abs(v).sum()))
        if mechanism == "laplace"
        else (lambda v: v * min(1.0, plan.clip / np.linalg.norm(v)))
    )
    clipped = np.mean([clip(u[0]) for u in updates], axis=0)
    measured_noise = np.linalg.norm(np.mean(released, axis=0) - clipped)
    forecast = enterprise_forecast(plan, d, n, shares)
    assert measured_noise == pytest.approx(forecast.noise_norm, rel=0.05)
    # Aligned updates reach the signal bound: the L2 clip, or the dense L1 estimate (a
    # bell-shaped dense update has L2 norm sqrt(pi / 2) x clip / sqrt(d)).
    assert np.linalg.norm(clipped) / forecast.signal_bound == pytest.approx(
        math.sqrt(math.pi / 2) if mechanism == "laplace" else 1.0, rel=0.05
    )


def test_record_forecast_matches_the_noise_of_a_measured_dp_sgd_step():
    d, batch = 5_000, 200
    settings = RecordLevel(epsilon=4.0, sample_rate=0.01)
    plan = plan_record_level(settings, records=batch * 100, steps_per_round=10, rounds=3)
    assert plan.expected_batch_size == pytest.approx(batch)
    per_example = {"w": torch.zeros(batch, d, dtype=torch.float64)}
    noise = private_gradient(per_example, settings.clip, plan.noise_multiplier, batch)["w"]
    forecast = record_forecast(plan, settings.clip, d)
    assert float(noise.norm()) == pytest.approx(forecast.noise_norm, rel=0.05)
    # A batch of identical clipped gradients is the largest signal: norm clip.
    same = {"w": torch.full((batch, d), 1.0, dtype=torch.float64)}
    signal = private_gradient(same, settings.clip, 0.0, batch)["w"]
    assert float(signal.norm()) == pytest.approx(forecast.signal_bound)


def test_the_old_private_demo_plan_is_refused_with_fixes_and_a_named_fix_works():
    old = {
        "privacy.record.epsilon": 8.0,
        "privacy.enterprise.epsilon": 8.0,
        "federation.secure_aggregation.enabled": True,
    }
    with pytest.raises(ConfigError) as refused:
        load_run_config(None, old)
    text = str(refused.value)
    assert "privacy.record (enterprise finance): the noise would swamp the updates" in text
    assert "privacy.enterprise: the noise would swamp the updates" in text
    assert "train fewer adapter parameters" in text and "more enterprises" in text
    assert "accept_noisy_plan" in text
    # A fix the forecast names: enough records per enterprise (the large demo federation).
    needed = int(re.search(r"more records per enterprise: >= ([\d,]+)", text)[1].replace(",", ""))
    large = [
        {"name": n, "data": f"demo:large/{n}"} for n in ("finance", "clinical", "manufacturing")
    ]
    config = load_run_config(None, {"privacy.record.epsilon": 8.0, "federation.enterprises": large})
    assert len(read_texts(Path(config.federation.enterprises[0].data) / "train.jsonl")) >= needed
    # The override runs a refused plan anyway, on purpose.
    load_run_config(None, {**old, "privacy.accept_noisy_plan": True})


def test_the_many_enterprise_recipe_passes_the_planner_and_laplace_is_refused():
    many = REPO / "configs" / "private-many.toml"
    config = load_run_config(many)
    assert len(config.federation.enterprises) == MANY_ENTERPRISES
    with pytest.raises(ConfigError, match="privacy.enterprise: the noise would swamp"):
        load_run_config(many, {"privacy.enterprise.mechanism": "laplace"})


def test_generated_federations_are_deterministic_and_built_once(tmp_path, monkeypatch):
    first = build_generated_federation("many", tmp_path / "a")
    second = build_generated_federation("many", tmp_path / "b")
    names = generated_enterprises("many")
    assert sorted(p.name for p in first.iterdir()) == names
    for name in names[:5]:
        for split in ("train.jsonl", "heldout.jsonl"):
            assert (first / name / split).read_bytes() == (second / name / split).read_bytes()
    top_shares = []  # non-IID: the share of each enterprise's records from its main domain
    for name in names:
        domains = Counter(
            json.loads(line)["domain"] for line in (first / name / "train.jsonl").open()
        )
        top_shares.append(max(domains.values()) / sum(domains.values()))
    assert statistics.median(top_shares) > 0.6 and max(top_shares) > 0.9
    monkeypatch.setenv("FEDMOE_DEMO_DATA", str(tmp_path / "home"))
    finance = resolve_generated("demo:large/finance")
    assert len(read_texts(finance / "train.jsonl")) > 20_000
    assert resolve_generated("/some/path") is None
    with pytest.raises(ValueError, match="one of"):
        resolve_generated("demo:huge/finance")
    with pytest.raises(ValueError, match="e00..e35"):
        resolve_generated("demo:many/finance")


def test_an_unknown_demo_federation_in_a_run_config_names_the_field():
    with pytest.raises(ConfigError, match=r"federation\.enterprises\.0\.data: unknown demo"):
        load_run_config(
            None,
            {"federation.enterprises": [{"name": "a", "data": "demo:huge/a"}]},
        )


def _round(number, loss, status="completed"):
    return Round(number=number, status=status, server_eval_loss=loss, checkpoint_path=f"r{number}")


def test_the_result_is_the_best_round_by_public_evaluation():
    rounds = [_round(1, 0.80), _round(2, 0.70), _round(3, 0.75), _round(4, 0.60, "failed")]
    result = outcome(rounds, base_loss=0.90)
    assert result.best_round == 2 and result.best_loss == 0.70 and result.last_loss == 0.75
    assert result.gain == pytest.approx((0.90 - 0.70) / 0.90)
    assert "round 2" in result.describe()


def test_a_run_that_never_beat_the_base_hands_out_the_base_model():
    result = outcome([_round(1, 0.95), _round(2, 7.9)], base_loss=0.90)
    assert result.best_round is None and result.last_loss == 7.9
    assert "the run's result is the base model" in result.describe()
    assert outcome([_round(1, 0.8)], base_loss=None) is None
    assert outcome([], base_loss=0.9) is None


def test_the_forecast_limit_sits_between_the_measured_recipes_and_the_old_demo():
    # The recipes of configs/ (measured to learn) stay under the limit; the old demo's was ~40x.
    d = 16_640
    record = plan_record_level(RecordLevel(epsilon=0.5, sample_rate=0.01), 28_500, 12, 3)
    assert record_forecast(record, 1.0, d).noise_to_signal < MAX_NOISE_TO_SIGNAL
    old = plan_record_level(RecordLevel(epsilon=8.0), 400, 12, 3)
    assert record_forecast(old, 1.0, 349_184).noise_to_signal > 10 * MAX_NOISE_TO_SIGNAL
    assert math.isfinite(MAX_NOISE_TO_SIGNAL)
