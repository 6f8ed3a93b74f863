"""The agent's task executor: Flower's messages run in the agent's own, warm process.

Flower's SuperNode started with `--isolation process` leaves running its ClientApp to "a
separate independent process". Flower's own choice, SuperExec, starts a fresh `flwr-clientapp`
process for every message (1-2 s of imports before any work, several times per round) and runs
whatever app the coordinator's FAB names, code the coordinator wrote. The agent is that
independent process instead. It acquires each task from the SuperNode's local Runtime API (signed
with the SuperExec secret the SuperNode was given, so no other local process can take a task),
pulls the message and the run's context, runs fedmoe's OWN, installed ClientApp on the warm node,
and pushes the reply and the context back, the way `flwr-clientapp` does (the same Flower
functions). Flower's SuperNode still does all of the transport: TLS, node authentication,
heartbeats, pulling and pushing messages to the coordinator.

Nothing here may signal the agent's process. Flower's own HTTP retry policy answers a 401 (a task
token the SuperNode no longer knows) with SIGINT to its own process, meant to end a one-message
`flwr-clientapp`; in the agent it ended the whole node whenever a task outlived its token: an agent
paused (SIGSTOP, a VM pause, a swap storm) for longer than the SuperNode's task expiry, or a
SuperNode restarted under a running task. Task calls here retry on their own policy instead, and a
task the SuperNode has forgotten raises `TaskLost`: that message is lost, the agent goes on with
the next one. A SIGINT or SIGTERM that reaches the agent therefore always comes from outside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    HEARTBEAT_PATIENCE,
    ErrorCode,
    SubStatus,
)
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedmoe.support.flower_tuning import shorten_object_pull_backoff

ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
TASK_HEARTBEAT_S = 10.0
LOCAL_PULL_MAX_S = 60.0
# A task call retries an unreachable SuperNode (restarting, or busy) for this long, then fails the
# task; Flower's policy retries forever.
TASK_CALL_MAX_S = 60.0
# The SuperNode forgets a claimed task after this long without a task heartbeat, or after
# HEARTBEAT_DEFAULT_INTERVAL if it had none yet (its store reads Flower's default interval, which
# support/flower_tuning.py shortens for the node's heartbeat only).
TASK_EXPIRY_S = HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
_RETRYABLE_STATUS = frozenset({502, 503, 504})
_FORGOTTEN_STATUS = frozenset({401, 403})  # the task's token is unknown, or its run has ended


class TaskLost(Exception):
    """The SuperNode no longer knows the task being run: its token expired or the SuperNode
    restarted. Its reply cannot be delivered; the next task can."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.kind = "task"


def _forgotten(err: httpx.HTTPStatusError) -> TaskLost:
    if err.response.status_code == 403:
        return TaskLost(
            f"the SuperNode refused this task's reply (HTTP 403 on {err.request.url.path}): its run "
            "is no longer running"
        )
    return TaskLost(
        f"the SuperNode no longer knows this task (HTTP {err.response.status_code} on "
        f"{err.request.url.path}): it expired while this agent was paused or stalled (a task "
        f"expires after {HEARTBEAT_DEFAULT_INTERVAL:.0f} to {TASK_EXPIRY_S:.0f} s without a "
        "heartbeat), or the SuperNode restarted; its reply is lost, the round goes on without it"
    )


def _task_retry_invoker(max_time: float = TASK_CALL_MAX_S) -> RetryInvoker:
    """Retry transport errors and 502/503/504 for `max_time` seconds; a forgotten task raises
    `TaskLost` at once, any other HTTP error fails the call. Never signals the process."""

    def should_giveup(err: Exception) -> bool:
        if isinstance(err, httpx.HTTPStatusError):
            if err.response.status_code in _FORGOTTEN_STATUS:
                raise _forgotten(err) from err
            return err.response.status_code not in _RETRYABLE_STATUS
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2.0),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=should_giveup,
    )


def _client(address: str, interceptors: list, retry: bool) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the SuperNode's Runtime API listens on this host's loopback only
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            *interceptors,
        ],
        retry_invoker=_task_retry_invoker() if retry else None,
    )


def _heartbeat(client: RuntimeHttpClient, done: threading.Event) -> None:
    """Keep the task alive while a long round trains (Flower's own sender would SIGINT us). One
    try per beat, on a client without retries; a task the SuperNode has forgotten gets no more."""
    while not done.wait(TASK_HEARTBEAT_S):
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                return
        except httpx.HTTPStatusError as err:
            if err.response.status_code in _FORGOTTEN_STATUS:
                return
        except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
            pass


def run_task(address: str, token: str, app: ClientApp) -> tuple[str, float]:
    """Run one acquired task; returns (message type, seconds). Raises `TaskLost` (its `kind`
    set) when the SuperNode forgot the task before its reply was delivered."""
    started = time.monotonic()
    client = _client(address, [RuntimeTokenHttpInterceptor(token)], retry=True)
    beats = _client(address, [RuntimeTokenHttpInterceptor(token)], retry=False)
    done = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(beats, done), name="task-heartbeat", daemon=True
    )
    beat.start()
    message = context = None
    status, details, kind = SubStatus.FAILED, "the task failed before its message arrived", "-"
    lost: TaskLost | None = None
    try:
        message, context, _run, _fab = pull_task_input(client)  # the FAB is never executed
        kind = message.metadata.message_type
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - the error goes back to the coordinator
            details = f"{type(err)}:<'{err}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
            )
        push_message(client, reply, context)
    except TaskLost as err:
        lost = err
    finally:
        done.set()
        try:
            if lost is None:
                push_task_output(client=client, context=context, sub_status=status, details=details)
        except TaskLost as err:
            lost = err
        finally:
            client.close()
            beats.close()
    if lost is not None:
        lost.kind = kind
        raise lost
    return kind, time.monotonic() - started


def run_tasks(
    address: Callable[[], str | None],
    secret: bytes,
    app: ClientApp,
    stop: threading.Event,
    poll_s: float,
    on_task: Callable[[str, float, str | None], None],
) -> None:
    """Acquire and run tasks one at a time until `stop`; `address()` is the current SuperNode's
    Runtime API (None while it restarts). `on_task(kind, seconds, error)` reports each task."""
    # A task is handed over as soon as its message arrives, often before the SuperNode holds all
    # of its objects: ask again after 0.05 s, not Flower's 1 s, and give up on a task whose message
    # never completes (support/flower_tuning.py).
    shorten_object_pull_backoff(max_time=LOCAL_PULL_MAX_S)
    current, client = None, None
    while not stop.is_set():
        if address() != current:
            if client is not None:
                client.close()
            current = address()
            # No retries inside a call: while the SuperNode restarts, this loop waits for it.
            auth = SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE})
            client = _client(current, [auth], retry=False) if current else None
        if client is None:
            stop.wait(poll_s)
            continue
        try:
            acquired = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
            )
        except Exception:  # noqa: BLE001 - the SuperNode is (re)starting
            stop.wait(max(poll_s, 0.5))
            continue
        if not (acquired.HasField("task") and acquired.token):
            stop.wait(poll_s)
            continue
        try:
            kind, seconds = run_task(current, acquired.token, app)
            on_task(kind, seconds, None)
        except TaskLost as err:
            on_task(err.kind, 0.0, str(err))
        except Exception as err:  # noqa: BLE001 - one broken task must not stop the node
            on_task("task", 0.0, f"{type(err).__name__}: {err}")
