"""The deployment's parts without processes: configs of the coordinator and the agent, certificates
and node keys, the coordinator's Grid, the admin API's authentication, the run database's
migrations and read-only opening."""

from __future__ import annotations

import multiprocessing as mp
import ssl
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from db_worker import open_and_create_run
from flwr.app import ArrayRecord, Error, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from fedmoe.client.agent_config import load_agent_config
from fedmoe.client.keys import make_node_keys
from fedmoe.contract.keys import fingerprint, load_public_key, openssh_public
from fedmoe.coordinator.round.grid import FleetGrid, message_bytes
from fedmoe.coordinator.service.certs import make_dev_certificates
from fedmoe.coordinator.service.service_config import load_coordinator_config, new_admin_token
from fedmoe.coordinator.store.db import DatabaseMissing, RunStore
from fedmoe.model.corpus import DEMO_DATA_DIR
from fedmoe.support.files import ConfigError


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    make_dev_certificates(out, ["coordinator", "10.0.0.7"])
    return out


def test_dev_certificates_chain_to_the_ca_and_name_every_host(certs):
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coordinator", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
        "10.0.0.7",
        "127.0.0.1",
        "::1",
    }
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_verify_locations(cafile=str(certs / "ca.pem"))  # the CA parses as a trust anchor
    assert oct((certs / "server.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError, match="--force"):
        make_dev_certificates(certs, [])


def test_node_keys_are_openssh_p384_with_ssh_keygen_fingerprints(tmp_path):
    private, public, digest = make_node_keys(tmp_path)
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    key = load_public_key(public.read_text())
    assert fingerprint(key) == digest and isinstance(key.curve, ec.SECP384R1)
    listed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True)
    if listed.returncode == 0:
        assert digest in listed.stdout
    with pytest.raises(FileExistsError):
        make_node_keys(tmp_path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: "",
        lambda: "not a key",
        lambda: "x" * 5000,
        lambda: (
            ed25519.Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        ),
        lambda: (
            rsa.generate_private_key(65537, 2048)
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        ),
    ],
    ids=["empty", "garbage", "huge", "ed25519", "rsa"],
)
def test_only_nist_ec_public_keys_are_accepted(make):
    with pytest.raises(ValueError, match="public_key"):
        load_public_key(make())


def test_a_p256_key_is_accepted():
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert fingerprint(load_public_key(openssh_public(key))).startswith("SHA256:")


def _coordinator_toml(tmp_path, certs, **replace) -> Path:
    _, lines = new_admin_token("ops")
    text = (
        f'[agents]\naddress = "0.0.0.0:9092"\n[admin]\naddress = "127.0.0.1:9091"\n{lines}'
        f'[tls]\nca = "{certs}/ca.pem"\ncertificate = "{certs}/server.pem"\nkey = "{certs}/server.key"\n'
        '[database]\nurl = "sqlite:///state/fedmoe.db"\n[storage]\ndir = "state"\n'
    )
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def test_a_coordinator_config_resolves_paths_and_admits_only_its_tokens(tmp_path, certs):
    config = load_coordinator_config(_coordinator_toml(tmp_path, certs))
    assert (
        config.database.url == f"sqlite:///{tmp_path}/state/fedmoe.db"
        and config.storage.dir == str(tmp_path / "state")
    )
    token, lines = new_admin_token("alice")
    assert (
        token not in lines
        and config.admin.caller(token) is None
        and config.admin.caller("") is None
    )


@pytest.mark.parametrize(
    "old, new, field",
    [
        ('address = "0.0.0.0:9092"', 'address = "0.0.0.0"', "agents.address"),
        ('address = "0.0.0.0:9092"', 'address = "host:99999"', "agents.address"),
        ('address = "127.0.0.1:9091"', "address = 9091", "admin.address"),
        ('name = "ops"', 'name = "o ps"', "admin.tokens.0.name"),
        ("sha256 = ", 'sha256 = "abc"\nx = ', "admin.tokens.0"),
        ("[[admin.tokens]]", "[[admin.tokenz]]", "admin.tokenz"),
        ("server.key", "missing.key", "tls.key"),
        ('dir = "state"', "dir = 1", "storage.dir"),
        ("[storage]", "[runs]\nmax_resumes = -1\n[storage]", "runs.max_resumes"),
    ],
)
def test_a_bad_coordinator_config_names_the_field(tmp_path, certs, old, new, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_coordinator_config(_coordinator_toml(tmp_path, certs, **{old: new}))


def _agent_toml(tmp_path, certs, extra="") -> Path:
    make_node_keys(tmp_path / "keys")
    path = tmp_path / "agent.toml"
    path.write_text(
        f'name = "acme"\ncoordinator = "coordinator.example:9092"\nca_certificate = "{certs}/ca.pem"\n'
        f'private_key = "keys/node.key"\ndata = "{DEMO_DATA_DIR / "finance"}"\n{extra}'
    )
    return path


def test_an_agent_config_resolves_against_its_folder(tmp_path, certs):
    config = load_agent_config(_agent_toml(tmp_path, certs, "[budget]\nrecord_epsilon = 4.0\n"))
    assert config.private_key == str(tmp_path / "keys" / "node.key") and config.state_dir == str(
        tmp_path / "state"
    )
    assert config.node_settings().budget.record_epsilon == 4.0


@pytest.mark.parametrize(
    "extra, field",
    [
        ('coordinator = "nohost"\n', "coordinator"),
        ("threads = 0\n", "threads"),
        ('device = "tpu"\n', "device"),
        ("poll_interval_s = 0\n", "poll_interval_s"),
        ("[budget]\nrecord_epsilon = -1\n", "budget.record_epsilon"),
        ("[budget]\nrecord_epsilon = inf\n", "budget.record_epsilon"),
        ('model = "/no/such/model"\n', "model"),
        ("typo = 1\n", "typo"),
    ],
)
def test_a_bad_agent_config_names_the_field(tmp_path, certs, extra, field):
    text = _agent_toml(tmp_path, certs).read_text()
    key = extra.split("=")[0].strip()
    lines = [line for line in text.splitlines() if not line.startswith(key + " ")]
    (tmp_path / "agent.toml").write_text("\n".join(lines) + "\n" + extra)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_agent_config(tmp_path / "agent.toml")


class _FakeGrid:
    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [1, 2, 3, 4]

    def push_messages(self, messages):
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, ids):
        out, self.replies = [r for r in self.replies if r.metadata.reply_to_message_id in ids], []
        return out


def _message(node: int, reply_to: str = "", content=None, error: str | None = None):
    """A train message to `node`, or (`reply_to` given) the node's reply to message `reply_to`."""
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=node if reply_to else 0,
        dst_node_id=0 if reply_to else node, reply_to_message_id=reply_to, group_id="",
        created_at=0.0, ttl=60.0, message_type="train",
    )  # fmt: skip
    if error is not None:
        return make_message(metadata, error=Error(code=0, reason=error))
    return make_message(metadata, content=content or RecordDict())


def test_the_grid_lists_only_registered_nodes_and_says_whose_reply_failed():
    replies = [_message(1, "m1"), _message(2, "m2", error="Node Unavailable")]  # 3 never answers
    grid = FleetGrid(
        _FakeGrid(replies), allowed=lambda: {1, 2, 3}, poll_interval=0.01, default_timeout=0.3
    )
    assert grid.get_node_ids() == [1, 2, 3]
    got = grid.send_and_receive(
        [_message(1), _message(2), _message(3)]
    )  # no timeout given: the default bounds it
    assert len(got) == 2 and grid.last_errors == {2: "Node Unavailable", 3: "no reply within 0.3s"}


def test_the_grid_counts_the_serialized_bytes_of_every_message_each_way():
    adapter = RecordDict({"fit": ArrayRecord([np.full(1000, 0.5, np.float32)])})  # 4,000 bytes
    update = RecordDict({"fit": ArrayRecord([np.ones(300_000, np.float32)])})  # 1.2 MB
    sent = [_message(1, content=adapter), _message(2, content=adapter)]
    replies = [_message(1, "m1", content=update), _message(2, "m2", error="Node Unavailable")]
    grid = FleetGrid(_FakeGrid(replies), poll_interval=0.01, default_timeout=0.3)
    assert grid.traffic() == (0, 0)
    grid.send_and_receive(iter(sent))
    down, up = grid.traffic()
    # Each node downloads its own copy: the array's bytes plus a few hundred bytes of headers,
    # metadata and record names per message.
    assert down == sum(message_bytes(m) for m in sent)
    assert 2 * 4_000 < down < 2 * 4_000 + 2 * 1_000
    assert 1_200_000 < up < 1_200_000 + 2 * 1_000  # the error reply is a few dozen bytes
    # What is counted is Flower's own serialized form: the objects rebuild the message.
    objects = get_all_nested_objects(replies[0])
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    assert message_bytes(replies[0]) == sum(map(len, contents.values()))
    rebuilt = inflate_object_from_contents(replies[0].object_id, contents)
    np.testing.assert_array_equal(rebuilt.content["fit"].to_numpy_ndarrays()[0], np.ones(300_000))
    another = _message(3, content=adapter)
    grid.push_messages([another])  # the totals run on across calls
    assert grid.traffic() == (down + message_bytes(another), up)


def test_read_only_commands_never_create_a_database(tmp_path):
    with pytest.raises(DatabaseMissing):
        RunStore(f"sqlite:///{tmp_path / 'none.db'}", migrate=False)
    assert list(tmp_path.iterdir()) == []


def test_processes_opening_a_fresh_database_at_once_do_not_race_on_the_migration(database_url):
    with mp.get_context("spawn").Pool(3) as pool:
        ids = pool.map(open_and_create_run, [database_url] * 3)
    assert sorted(ids) == [1, 2, 3]


def test_the_agent_sees_a_supernode_that_gave_up_reconnecting(tmp_path):
    from fedmoe.client.agent import GAVE_UP, _new_lines

    def gave_up(offset: int) -> tuple[bool, int]:
        lines, read_to = _new_lines(log, offset)
        return any(GAVE_UP in line for line in lines), read_to

    log = tmp_path / "supernode.log"
    log.write_text("an earlier session: " + GAVE_UP + "\n")
    start = log.stat().st_size
    with log.open("a") as f:
        f.write("WARNING Connection attempt failed, retrying in 0.3 seconds\n")
    found, read_to = gave_up(start)
    assert not found and start <= read_to <= log.stat().st_size
    with log.open("a") as f:  # the line lands in two writes: it is still found
        f.write("WARNING " + GAVE_UP[:7])
    found, read_to = gave_up(read_to)
    assert not found
    with log.open("a") as f:
        f.write(GAVE_UP[7:] + " after 10.01 seconds and 7 tries.\n")
    assert gave_up(read_to)[0]


def test_a_simulation_config_sent_to_a_deployment_gets_every_problem_and_the_way_out(tmp_path):
    """`admin start --config configs/private-demo.toml` used to be refused one section at a time."""
    from types import SimpleNamespace

    from fedmoe.coordinator.service.service import CoordinatorService

    nodes = [SimpleNamespace(enterprise=name) for name in ("finance", "clinical", "manufacturing")]
    service = SimpleNamespace(
        store=SimpleNamespace(nodes=lambda: nodes),
        config=SimpleNamespace(
            database=SimpleNamespace(url=f"sqlite:///{tmp_path / 'db.sqlite'}"),
            runs_dir=str(tmp_path / "runs"),
        ),
    )
    text = (Path(__file__).parents[1] / "configs" / "private-demo.toml").read_text()
    with pytest.raises(ConfigError) as refused:
        CoordinatorService.start_run(service, text, [], "ops")
    message = str(refused.value)
    for problem in (
        "database: set by the coordinator",
        "output: set by the coordinator",
        "federation.enterprises.0.data: set on the enterprise's agent",
        "federation.enterprises.0.budget: set on the enterprise's agent",
        "see deploy/run.toml",
    ):
        assert problem in message, message
    assert not (tmp_path / "db.sqlite").exists()  # nothing recorded


def test_coordinator_health_fails_while_its_storage_cannot_take_a_checkpoint(tmp_path, certs):
    import json
    import time

    from fedmoe.coordinator.service.service import HEALTH_FILE, coordinator_health

    config = load_coordinator_config(_coordinator_toml(tmp_path, certs))
    storage = Path(config.storage.dir)
    storage.mkdir(parents=True)
    (storage / HEALTH_FILE).write_text(
        json.dumps({"at": time.time(), "superlink": True, "gateway": True})
    )
    assert coordinator_health(config) == (
        True,
        "ok: SuperLink and agents' gateway up, storage writable",
    )
    config.runs_dir.rmdir()  # the check made it
    config.runs_dir.write_text("a file where the runs' folder should be\n")
    ok, message = coordinator_health(config)
    assert not ok and message.startswith("storage.dir: cannot write to") and "runs" in message
