from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StartRunRequest(_message.Message):
    __slots__ = ("config_toml", "overrides")
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    config_toml: str
    overrides: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, config_toml: _Optional[str] = ..., overrides: _Optional[_Iterable[str]] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    after_round: int
    def __init__(self, run_id: _Optional[int] = ..., after_round: _Optional[int] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run", "round")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run: Run
    round: Round
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., round: _Optional[_Union[Round, _Mapping]] = ...) -> None: ...

class GetPrivacyLedgerRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    def __init__(self, run_id: _Optional[int] = ...) -> None: ...

class PrivacyLedger(_message.Message):
    __slots__ = ("runs", "entries")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunPrivacy]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunPrivacy, _Mapping]]] = ..., entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("enterprise", "public_key")
    ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    enterprise: str
    public_key: str
    def __init__(self, enterprise: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...

class RevokeNodeRequest(_message.Message):
    __slots__ = ("enterprise",)
    ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    enterprise: str
    def __init__(self, enterprise: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("include_revoked",)
    INCLUDE_REVOKED_FIELD_NUMBER: _ClassVar[int]
    include_revoked: bool
    def __init__(self, include_revoked: _Optional[bool] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ...) -> None: ...

class ExportRunRequest(_message.Message):
    __slots__ = ("run_id", "round", "format")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    round: int
    format: str
    def __init__(self, run_id: _Optional[int] = ..., round: _Optional[int] = ..., format: _Optional[str] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: ExportManifest
    chunk: FileChunk
    def __init__(self, manifest: _Optional[_Union[ExportManifest, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class ExportManifest(_message.Message):
    __slots__ = ("run_id", "round", "format", "base_model", "files", "total_bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    round: int
    format: str
    base_model: str
    files: _containers.RepeatedCompositeFieldContainer[ExportFile]
    total_bytes: int
    def __init__(self, run_id: _Optional[int] = ..., round: _Optional[int] = ..., format: _Optional[str] = ..., base_model: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ExportFile, _Mapping]]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ExportFile(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "data")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("run_id", "round", "prompt", "max_new_tokens", "temperature", "seed")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    round: int
    prompt: str
    max_new_tokens: int
    temperature: float
    seed: int
    def __init__(self, run_id: _Optional[int] = ..., round: _Optional[int] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "round", "note")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    text: str
    round: int
    note: str
    def __init__(self, text: _Optional[str] = ..., round: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("id", "status", "planned_rounds", "completed_rounds", "started_at", "ended_at", "error", "base_fingerprint", "engine", "enterprises", "resumes", "started_by", "privacy", "config_json", "base_eval_loss", "best_eval_loss", "best_round", "result_basis", "result_base_loss", "record_epsilon_spent", "enterprise_epsilon_spent", "record_epsilon_target", "enterprise_epsilon_target")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PLANNED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISES_FIELD_NUMBER: _ClassVar[int]
    RESUMES_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    BASE_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    RESULT_BASIS_FIELD_NUMBER: _ClassVar[int]
    RESULT_BASE_LOSS_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_TARGET_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_EPSILON_TARGET_FIELD_NUMBER: _ClassVar[int]
    id: int
    status: str
    planned_rounds: int
    completed_rounds: int
    started_at: str
    ended_at: str
    error: str
    base_fingerprint: str
    engine: str
    enterprises: _containers.RepeatedScalarFieldContainer[str]
    resumes: int
    started_by: str
    privacy: str
    config_json: str
    base_eval_loss: float
    best_eval_loss: float
    best_round: int
    result_basis: str
    result_base_loss: float
    record_epsilon_spent: float
    enterprise_epsilon_spent: float
    record_epsilon_target: float
    enterprise_epsilon_target: float
    def __init__(self, id: _Optional[int] = ..., status: _Optional[str] = ..., planned_rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., started_at: _Optional[str] = ..., ended_at: _Optional[str] = ..., error: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., engine: _Optional[str] = ..., enterprises: _Optional[_Iterable[str]] = ..., resumes: _Optional[int] = ..., started_by: _Optional[str] = ..., privacy: _Optional[str] = ..., config_json: _Optional[str] = ..., base_eval_loss: _Optional[float] = ..., best_eval_loss: _Optional[float] = ..., best_round: _Optional[int] = ..., result_basis: _Optional[str] = ..., result_base_loss: _Optional[float] = ..., record_epsilon_spent: _Optional[float] = ..., enterprise_epsilon_spent: _Optional[float] = ..., record_epsilon_target: _Optional[float] = ..., enterprise_epsilon_target: _Optional[float] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("number", "status", "started_at", "ended_at", "participants", "failures", "train_loss", "eval_loss", "server_eval_loss", "update_norm", "bytes_up", "bytes_down", "updates_seen", "checkpoint_path", "checkpoint_sha256", "expert_load_json", "participations")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SERVER_EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    UPDATES_SEEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATIONS_FIELD_NUMBER: _ClassVar[int]
    number: int
    status: str
    started_at: str
    ended_at: str
    participants: int
    failures: int
    train_loss: float
    eval_loss: float
    server_eval_loss: float
    update_norm: float
    bytes_up: int
    bytes_down: int
    updates_seen: int
    checkpoint_path: str
    checkpoint_sha256: str
    expert_load_json: str
    participations: _containers.RepeatedCompositeFieldContainer[Participation]
    def __init__(self, number: _Optional[int] = ..., status: _Optional[str] = ..., started_at: _Optional[str] = ..., ended_at: _Optional[str] = ..., participants: _Optional[int] = ..., failures: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., server_eval_loss: _Optional[float] = ..., update_norm: _Optional[float] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., updates_seen: _Optional[int] = ..., checkpoint_path: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., expert_load_json: _Optional[str] = ..., participations: _Optional[_Iterable[_Union[Participation, _Mapping]]] = ...) -> None: ...

class Participation(_message.Message):
    __slots__ = ("enterprise", "node_id", "status", "epsilon_record", "epsilon_enterprise", "num_examples", "train_loss", "heldout_loss_before", "eval_loss", "update_norm", "duration_s", "error")
    ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RECORD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    enterprise: str
    node_id: str
    status: str
    epsilon_record: float
    epsilon_enterprise: float
    num_examples: int
    train_loss: float
    heldout_loss_before: float
    eval_loss: float
    update_norm: float
    duration_s: float
    error: str
    def __init__(self, enterprise: _Optional[str] = ..., node_id: _Optional[str] = ..., status: _Optional[str] = ..., epsilon_record: _Optional[float] = ..., epsilon_enterprise: _Optional[float] = ..., num_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., heldout_loss_before: _Optional[float] = ..., eval_loss: _Optional[float] = ..., update_norm: _Optional[float] = ..., duration_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class RunPrivacy(_message.Message):
    __slots__ = ("run_id", "status", "secure_aggregation", "record_epsilon", "record_delta", "enterprise_epsilon", "enterprise_delta", "enterprise_mechanism", "enterprise_adjacency", "audit_epsilon_lower_bound", "audit_confidence", "audit_canaries", "audit_guesses", "audit_correct")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_FIELD_NUMBER: _ClassVar[int]
    RECORD_DELTA_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_DELTA_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_MECHANISM_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_ADJACENCY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_EPSILON_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CANARIES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_GUESSES_FIELD_NUMBER: _ClassVar[int]
    AUDIT_CORRECT_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    status: str
    secure_aggregation: bool
    record_epsilon: float
    record_delta: float
    enterprise_epsilon: float
    enterprise_delta: float
    enterprise_mechanism: str
    enterprise_adjacency: str
    audit_epsilon_lower_bound: float
    audit_confidence: float
    audit_canaries: int
    audit_guesses: int
    audit_correct: int
    def __init__(self, run_id: _Optional[int] = ..., status: _Optional[str] = ..., secure_aggregation: _Optional[bool] = ..., record_epsilon: _Optional[float] = ..., record_delta: _Optional[float] = ..., enterprise_epsilon: _Optional[float] = ..., enterprise_delta: _Optional[float] = ..., enterprise_mechanism: _Optional[str] = ..., enterprise_adjacency: _Optional[str] = ..., audit_epsilon_lower_bound: _Optional[float] = ..., audit_confidence: _Optional[float] = ..., audit_canaries: _Optional[int] = ..., audit_guesses: _Optional[int] = ..., audit_correct: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("run_id", "round", "enterprise", "status", "epsilon_record", "epsilon_enterprise", "note")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RECORD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    run_id: int
    round: int
    enterprise: str
    status: str
    epsilon_record: float
    epsilon_enterprise: float
    note: str
    def __init__(self, run_id: _Optional[int] = ..., round: _Optional[int] = ..., enterprise: _Optional[str] = ..., status: _Optional[str] = ..., epsilon_record: _Optional[float] = ..., epsilon_enterprise: _Optional[float] = ..., note: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("enterprise", "public_key", "fingerprint", "flower_node_id", "status", "online", "registered_at", "revoked_at", "registered_by")
    ENTERPRISE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FLOWER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_BY_FIELD_NUMBER: _ClassVar[int]
    enterprise: str
    public_key: str
    fingerprint: str
    flower_node_id: str
    status: str
    online: bool
    registered_at: str
    revoked_at: str
    registered_by: str
    def __init__(self, enterprise: _Optional[str] = ..., public_key: _Optional[str] = ..., fingerprint: _Optional[str] = ..., flower_node_id: _Optional[str] = ..., status: _Optional[str] = ..., online: _Optional[bool] = ..., registered_at: _Optional[str] = ..., revoked_at: _Optional[str] = ..., registered_by: _Optional[str] = ...) -> None: ...
