"""Run config validation: every bad value is refused before work starts, naming the field."""

from pathlib import Path

import pytest

from fedmoe.coordinator.config import ConfigError, load_run_config
from fedmoe.model.corpus import DEMO_DATA_DIR


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_resolve_to_the_embedded_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_run_config()
    assert [e.name for e in config.federation.enterprises] == [
        "finance",
        "clinical",
        "manufacturing",
    ]
    assert config.lora.r == 16 and config.lora.alpha == 32
    assert config.database.url == f"sqlite:///{tmp_path / 'runs' / 'fedmoe.db'}"


@pytest.mark.parametrize(
    "text, field",
    [
        ("[federation]\nrounds = -1\n", "federation.rounds"),
        ("[lora]\nr = 0\n", "lora.r"),
        ("[train]\nlr = 0\n", "train.lr"),
        ("[lora]\nrank = 8\n", "lora.rank: unknown key"),
        ("[federaton]\nrounds = 2\n", "federaton: unknown key"),
        ("[federation]\nfraction_fit = 1.5\n", "federation.fraction_fit"),
        ("[train]\nseq_len = 100000\n", "train.seq_len"),
        ("[train]\nseq_len = 1024\n", "train.seq_len: must be <= 512"),
        (
            '[[federation.enterprises]]\nname = "acme"\ndata = "nowhere"\n',
            "federation.enterprises.0.data",
        ),
        ('[model]\npath = "no/such/model"\n', "model.path"),
        (
            '[federation]\nmin_fit_clients = 4\n[[federation.enterprises]]\nname = "a"\ndata = "."\n',
            "min_fit_clients",
        ),
        ("rounds = [", "not valid TOML"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_run_config(_write(tmp_path, text))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    data = tmp_path / "acme"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "%s"}\n' % ("words " * 80))
    (data / "heldout.jsonl").write_text('{"text": "y"}\n')
    config = load_run_config(
        _write(
            tmp_path,
            '[[federation.enterprises]]\nname = "acme"\ndata = "acme"\n[evaluation]\nserver_data = ""\n',
        )
    )
    assert config.federation.enterprises[0].data == str(data)
    assert config.evaluation.server_data is None


def test_overrides_are_validated_too(tmp_path):
    assert load_run_config(None, {"federation.rounds": 5}).federation.rounds == 5
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_run_config(None, {"federation.rounds": 0})
    with pytest.raises(ConfigError, match="section.key"):
        load_run_config(None, {"rounds": 1})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"privacy.record.epsilon": 0},
            r"privacy\.record\.epsilon: Input should be greater than 0",
        ),
        (
            {"privacy.enterprise.epsilon": -1},
            r"privacy\.enterprise\.epsilon: Input should be greater than 0",
        ),
        (
            {"privacy.record.epsilon": 1, "privacy.record.delta": 0.01},
            r"privacy\.record\.delta: must be < 1/records = 0\.0025",
        ),
        (
            {"privacy.enterprise.epsilon": 1, "privacy.enterprise.delta": 0.5},
            r"privacy\.enterprise\.delta: must be < 1/enterprises = 0\.333",
        ),
        (
            {"privacy.record.epsilon": 1, "privacy.record.clip": 0},
            r"privacy\.record\.clip: Input should be greater than or equal to 0\.000001",
        ),
        (
            {"privacy.enterprise.epsilon": 1, "privacy.enterprise.clip": -2},
            r"privacy\.enterprise\.clip: Input should be greater than or equal to 0\.000001",
        ),
        (
            {"privacy.enterprise.epsilon": 1, "privacy.enterprise.mechanism": "exponential"},
            r"privacy\.enterprise\.mechanism: Input should be 'gaussian' or 'laplace'",
        ),
        (
            {"privacy.record.epsilon": 1, "privacy.record.accountant": "gdp"},
            r"privacy\.record\.accountant: Input should be 'rdp', 'prv' or 'pld'",
        ),
        ({"privacy.record.epsilon": 1e-3}, r"privacy\.record\.epsilon >= "),
        ({"privacy.enterprise.epsilon": 0.01}, r"privacy\.enterprise\.epsilon >= "),
        ({"privacy.record.eps": 1}, r"privacy\.record\.eps: unknown key"),
        (
            {
                "federation.secure_aggregation.enabled": True,
                "federation.secure_aggregation.reconstruction_threshold": 0,
            },
            "reconstruction_threshold",
        ),
    ],
)
def test_bad_privacy_settings_are_refused_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_a_node_budget_smaller_than_one_round_is_refused(tmp_path):
    text = (
        "[privacy.record]\nepsilon = 4.0\n"
        '[[federation.enterprises]]\nname = "acme"\ndata = "DATA/finance"\nbudget = { record_epsilon = 0.5 }\n'
        '[[federation.enterprises]]\nname = "beta"\ndata = "DATA/clinical"\nbudget = { enterprise_epsilon = 10.0 }\n'
    ).replace("DATA", str(DEMO_DATA_DIR))
    with pytest.raises(ConfigError) as err:
        load_run_config(_write(tmp_path, text))
    assert (
        "federation.enterprises.0.budget.record_epsilon: 0.5 is too small: one round spends"
        in str(err.value)
    )
    assert (
        "federation.enterprises.1.budget.enterprise_epsilon: 10 is too small: the run gives no enterprise-level guarantee"
        in str(err.value)
    )


def test_a_private_config_resolves_with_node_ledgers_under_the_output_dir(tmp_path):
    overrides = {"privacy.record.epsilon": 4.0, "privacy.accept_noisy_plan": True}
    config = load_run_config(None, {**overrides, "output.dir": str(tmp_path)})
    assert config.privacy.record.epsilon == 4.0 and config.privacy.enterprise is None
    assert config.federation.enterprises[0].ledger == str(tmp_path / "ledgers" / "finance.sqlite")


def test_the_shipped_private_demo_config_is_valid_and_keeps_its_ledgers_apart():
    config = load_run_config(Path(__file__).parents[1] / "configs" / "private-demo.toml")
    assert config.privacy.record and config.federation.secure_aggregation.enabled
    assert not config.privacy.accept_noisy_plan  # the recipe passes the planner as it is
    default = load_run_config(None)
    ledgers = {Path(e.ledger).parent for e in config.federation.enterprises}
    assert ledgers.isdisjoint(Path(e.ledger).parent for e in default.federation.enterprises)
    assert all(Path(e.data).parent.name == "large" for e in config.federation.enterprises)
