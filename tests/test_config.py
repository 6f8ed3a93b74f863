"""Run config validation: every bad value is refused before work starts, naming the field."""

import pytest

from fedmoe.coordinator.config import ConfigError, load_run_config


def _write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_resolve_to_the_embedded_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_run_config()
    assert [e.name for e in config.federation.enterprises] == ["finance", "clinical", "manufacturing"]
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
        ('[[federation.enterprises]]\nname = "acme"\ndata = "nowhere"\n', "federation.enterprises.0.data"),
        ('[model]\npath = "no/such/model"\n', "model.path"),
        ('[federation]\nmin_fit_clients = 4\n[[federation.enterprises]]\nname = "a"\ndata = "."\n', "min_fit_clients"),
        ("rounds = [", "not valid TOML"),
    ],
)
def test_bad_values_are_refused_with_the_field_name(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        load_run_config(_write(tmp_path, text))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    data = tmp_path / "acme"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "x"}\n')
    (data / "heldout.jsonl").write_text('{"text": "y"}\n')
    config = load_run_config(_write(tmp_path, '[[federation.enterprises]]\nname = "acme"\ndata = "acme"\n[evaluation]\nserver_data = ""\n'))
    assert config.federation.enterprises[0].data == str(data)
    assert config.evaluation.server_data is None


def test_overrides_are_validated_too(tmp_path):
    assert load_run_config(None, {"federation.rounds": 5}).federation.rounds == 5
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_run_config(None, {"federation.rounds": 0})
    with pytest.raises(ConfigError, match="section.key"):
        load_run_config(None, {"rounds": 1})
