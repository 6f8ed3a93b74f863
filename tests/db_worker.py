"""Work for processes the tests start (kept light: a spawned process imports only this)."""

from fedmoe.coordinator.store.db import RunStore


def open_and_create_run(url: str) -> int:
    store = RunStore(url)
    run_id = store.create_run({}, 1)
    store.close()
    return run_id
