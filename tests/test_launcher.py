"""What `fedmoe run` asks of Flower's simulation engine, from the run config."""

from fedmoe.coordinator.config import load_run_config
from fedmoe.coordinator.launcher import federation_config


def test_simulated_clients_reserve_a_gpu_share_only_when_asked(tmp_path):
    database = {"database.url": f"sqlite:///{tmp_path}/runs.db"}
    plain = federation_config(load_run_config(None, database))
    assert plain == "num-supernodes=3 client-resources-num-cpus=1"
    shared = federation_config(
        load_run_config(None, {**database, "federation.gpus_per_client": 0.25})
    )
    # Ray hides the GPU from a client that reserves none: a share makes it visible.
    assert shared == plain + " client-resources-num-gpus=0.25"
