"""The admin API (proto/fedmoe/proto/admin.proto) over gRPC: authentication and the mapping of
requests and errors onto the coordinator service.

Authentication is a bearer token per admin, checked before any handler runs: the coordinator keeps
only SHA-256 hashes of the tokens (coordinator.toml), compares in constant time, and records the
token's name with what the caller did (`started_by`, `registered_by`). We chose bearer tokens
over mutual TLS because operators rotate a token with one config line and no PKI of their own,
the admin CLI and any gRPC client send one header, and the channel is TLS already, so the token
never travels in the clear. A call without a valid token gets UNAUTHENTICATED and changes
nothing. Requests over `admin.max_request_bytes` are refused by gRPC (RESOURCE_EXHAUSTED).

ExportRun and Generate load the base model in the coordinator's process, one call at a time.
An export is built in storage/exports/, measured against `admin.max_export_bytes` before its
first byte is sent (RESOURCE_EXHAUSTED above it), streamed as a manifest then 1 MiB chunks, and
removed when the call ends, however it ends.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Iterator
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from fedmoe.coordinator.service.service_config import AdminSection
from fedmoe.coordinator.store.db import FINAL_STATUSES
from fedmoe.coordinator.store.views import (
    privacy_ledger_message,
    round_message,
    rounds_response,
    run_message,
    runs_response,
)
from fedmoe.proto import admin_pb2 as pb
from fedmoe.proto import admin_pb2_grpc as pb_grpc
from fedmoe.support.files import ConfigError

WATCH_POLL_S = 0.5
EXPORT_CHUNK_BYTES = 1 << 20


class AdminError(Exception):
    """A request the coordinator refuses; `code` is the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _caller(context: grpc.ServicerContext, admin: AdminSection) -> str:
    token = dict(context.invocation_metadata()).get("authorization", "")
    return admin.caller(token.removeprefix("Bearer ")) or "?"


def _run_id(value: int) -> int:
    if value < 1:
        raise AdminError(grpc.StatusCode.INVALID_ARGUMENT, f"run_id: must be >= 1 (got {value})")
    return value


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, service):
        self.service = service
        self.store = service.store

    def _handle(self, context: grpc.ServicerContext, action):
        try:
            return action()
        except AdminError as err:
            context.abort(err.code, str(err))
        except ConfigError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except LookupError as err:
            context.abort(grpc.StatusCode.NOT_FOUND, str(err.args[0] if err.args else err))
        except Exception as err:  # noqa: BLE001 - a bug or an outage, never a traceback to the caller
            traceback.print_exc()
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(err).__name__}); see the coordinator's log",
            )

    def _run(self, run_id: int) -> pb.Run:
        run = self.store.run(_run_id(run_id))
        if run is None:
            raise AdminError(
                grpc.StatusCode.NOT_FOUND, f"run {run_id} not found; ListRuns lists the runs"
            )
        return run_message(run, self.store.rounds(run.id))

    def StartRun(self, request, context):
        caller = _caller(context, self.service.config.admin)
        return self._handle(
            context,
            lambda: self._run(
                self.service.start_run(request.config_toml, list(request.overrides), caller)
            ),
        )

    def StopRun(self, request, context):
        caller = _caller(context, self.service.config.admin)

        def stop():
            run = self._run(request.run_id)
            if run.status in FINAL_STATUSES:
                raise AdminError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"run {run.id} already ended ({run.status})",
                )
            self.service.stop_run(run.id, caller)
            return self._run(run.id)

        return self._handle(context, stop)

    def GetRun(self, request, context):
        return self._handle(context, lambda: self._run(request.run_id))

    def ListRuns(self, request, context):
        return runs_response(self.store)

    def ListRounds(self, request, context):
        return self._handle(
            context, lambda: rounds_response(self.store, self._run(request.run_id).id)
        )

    def WatchRun(self, request, context) -> Iterator[pb.RunEvent]:
        run = self._handle(context, lambda: self._run(request.run_id))
        after, status = request.after_round, None
        while context.is_active():
            for r in self.store.rounds(run.id, after=after):
                after = r.number
                yield pb.RunEvent(run=self._run(run.id), round=round_message(r))
            run = self._run(run.id)
            if run.status != status:
                status = run.status
                yield pb.RunEvent(run=run)
            if run.status in FINAL_STATUSES:
                return
            time.sleep(WATCH_POLL_S)

    def GetPrivacyLedger(self, request, context):
        def ledger():
            run_id = None if request.run_id == 0 else self._run(request.run_id).id
            return privacy_ledger_message(self.store, run_id)

        return self._handle(context, ledger)

    def RegisterNode(self, request, context):
        caller = _caller(context, self.service.config.admin)
        return self._handle(
            context,
            lambda: self.service.register_node(request.enterprise, request.public_key, caller),
        )

    def RevokeNode(self, request, context):
        caller = _caller(context, self.service.config.admin)
        return self._handle(context, lambda: self.service.revoke_node(request.enterprise, caller))

    def ListNodes(self, request, context):
        return pb.ListNodesResponse(nodes=self.service.nodes(request.include_revoked))

    def ExportRun(self, request, context) -> Iterator[pb.ExportChunk]:
        def build():
            run = self._run(request.run_id)
            return self.service.export_run(run.id, request.round, request.format)

        out, manifest = self._handle(context, build)
        folder = out.parent
        context.add_callback(lambda: shutil.rmtree(folder, ignore_errors=True))
        try:
            yield pb.ExportChunk(manifest=manifest)
            for f in manifest.files:
                with open(out / f.path, "rb") as data:
                    while block := data.read(EXPORT_CHUNK_BYTES):
                        if not context.is_active():
                            return
                        yield pb.ExportChunk(chunk=pb.FileChunk(path=f.path, data=block))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def Generate(self, request, context):
        def generate():
            run = self._run(request.run_id)
            return self.service.generate(
                run.id,
                request.round,
                request.prompt,
                request.max_new_tokens if request.HasField("max_new_tokens") else None,
                request.temperature,
                request.seed,
            )

        return self._handle(context, generate)


class TokenAuth(grpc.ServerInterceptor):
    """Every admin call needs `authorization: Bearer <token>` of a configured token."""

    def __init__(self, admin: AdminSection, on_refused=lambda method: None):
        self.admin = admin
        self.on_refused = on_refused

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        metadata = dict(handler_call_details.invocation_metadata or ())
        token = str(metadata.get("authorization", ""))
        if token.startswith("Bearer ") and self.admin.caller(token[len("Bearer ") :]) is not None:
            return handler
        self.on_refused(handler_call_details.method)

        def refuse(request, context):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or unknown admin token (send `authorization: Bearer <token>`)",
            )

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                refuse,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class MalformedRequest:
    """A request whose bytes are no protobuf of the method's request type."""

    def __init__(self, type_name: str):
        self.type_name = type_name


def _tolerant(request_type):
    """Parse a request, or stand in for it: gRPC would answer a parse failure INTERNAL."""

    def parse(data: bytes):
        try:
            return request_type.FromString(data)
        except DecodeError:
            return MalformedRequest(request_type.__name__)

    return parse


def _refusing_malformed(method):
    def handle(request, context):
        if isinstance(request, MalformedRequest):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {request.type_name} message (protobuf); "
                "use `fedmoe admin` or stubs generated from proto/fedmoe/proto/admin.proto",
            )
        return method(request, context)

    return handle


def _add_servicer(servicer: AdminServicer, server: grpc.Server) -> None:
    """The generated `add_AdminServicer_to_server`, with requests that fail to parse refused
    as INVALID_ARGUMENT instead of INTERNAL."""
    service = pb.DESCRIPTOR.services_by_name["Admin"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            _refusing_malformed(getattr(servicer, method.name)),
            request_deserializer=_tolerant(request_type),
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def serve(service, address: str, cert: bytes, key: bytes) -> grpc.Server:
    """Start the admin API on `address` (TLS with the coordinator's certificate)."""
    admin = service.config.admin
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="admin"),
        interceptors=[TokenAuth(admin, on_refused=service.refused_admin_call)],
        options=[
            ("grpc.max_receive_message_length", admin.max_request_bytes),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    _add_servicer(AdminServicer(service), server)
    if server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)])) == 0:
        raise RuntimeError(f"admin.address: cannot listen on {address}")
    server.start()
    return server
