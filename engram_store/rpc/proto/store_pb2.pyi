from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT8_E4M3: _ClassVar[DType]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[OptimizerKind]
    SGD: _ClassVar[OptimizerKind]
    ADAGRAD: _ClassVar[OptimizerKind]
    ADAM: _ClassVar[OptimizerKind]
    ROWWISE_ADAGRAD: _ClassVar[OptimizerKind]
    ROWWISE_ADAM: _ClassVar[OptimizerKind]

class InitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INIT_UNSPECIFIED: _ClassVar[InitKind]
    NORMAL: _ClassVar[InitKind]
    ZEROS: _ClassVar[InitKind]

class SnapshotPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SNAPSHOT_PHASE_UNSPECIFIED: _ClassVar[SnapshotPhase]
    SNAPSHOT_FREEZE: _ClassVar[SnapshotPhase]
    SNAPSHOT_ALLOW: _ClassVar[SnapshotPhase]
    SNAPSHOT_STATUS: _ClassVar[SnapshotPhase]
    SNAPSHOT_COPY: _ClassVar[SnapshotPhase]
    SNAPSHOT_THAW: _ClassVar[SnapshotPhase]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType
FLOAT8_E4M3: DType
OPTIMIZER_UNSPECIFIED: OptimizerKind
SGD: OptimizerKind
ADAGRAD: OptimizerKind
ADAM: OptimizerKind
ROWWISE_ADAGRAD: OptimizerKind
ROWWISE_ADAM: OptimizerKind
INIT_UNSPECIFIED: InitKind
NORMAL: InitKind
ZEROS: InitKind
SNAPSHOT_PHASE_UNSPECIFIED: SnapshotPhase
SNAPSHOT_FREEZE: SnapshotPhase
SNAPSHOT_ALLOW: SnapshotPhase
SNAPSHOT_STATUS: SnapshotPhase
SNAPSHOT_COPY: SnapshotPhase
SNAPSHOT_THAW: SnapshotPhase

class OptimizerSpec(_message.Message):
    __slots__ = ("kind", "lr", "beta1", "beta2", "eps", "initial_accumulator_value", "lr_decay")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    LR_DECAY_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    lr: float
    beta1: float
    beta2: float
    eps: float
    initial_accumulator_value: float
    lr_decay: float
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., initial_accumulator_value: _Optional[float] = ..., lr_decay: _Optional[float] = ...) -> None: ...

class InitSpec(_message.Message):
    __slots__ = ("kind", "std", "seed")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    kind: InitKind
    std: float
    seed: int
    def __init__(self, kind: _Optional[_Union[InitKind, str]] = ..., std: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "head_rows", "num_rows", "dim", "storage_dtype", "init", "optimizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    STORAGE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    head_rows: _containers.RepeatedScalarFieldContainer[int]
    num_rows: int
    dim: int
    storage_dtype: DType
    init: InitSpec
    optimizer: OptimizerSpec
    def __init__(self, name: _Optional[str] = ..., head_rows: _Optional[_Iterable[int]] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., storage_dtype: _Optional[_Union[DType, str]] = ..., init: _Optional[_Union[InitSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ...) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("spec", "stored_rows", "stored_bytes", "step", "pushes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STORED_ROWS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    stored_rows: int
    stored_bytes: int
    step: int
    pushes: int
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ..., stored_rows: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., step: _Optional[int] = ..., pushes: _Optional[int] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: TableSpec
    def __init__(self, spec: _Optional[_Union[TableSpec, _Mapping]] = ...) -> None: ...

class CreateTableResponse(_message.Message):
    __slots__ = ("table", "created")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    table: TableInfo
    created: bool
    def __init__(self, table: _Optional[_Union[TableInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class DropTableRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DropTableResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "ids", "dtype", "map_version")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    dtype: DType
    map_version: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., map_version: _Optional[int] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rows", "num_rows", "dim", "dtype")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    rows: bytes
    num_rows: int
    dim: int
    dtype: DType
    def __init__(self, rows: _Optional[bytes] = ..., num_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class PushGradientsRequest(_message.Message):
    __slots__ = ("table", "ids", "grads", "grad_dtype", "request_id", "step", "map_version")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    GRAD_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: bytes
    grad_dtype: DType
    request_id: str
    step: int
    map_version: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[bytes] = ..., grad_dtype: _Optional[_Union[DType, str]] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ..., map_version: _Optional[int] = ...) -> None: ...

class PushGradientsResponse(_message.Message):
    __slots__ = ("rows_updated", "duplicate", "step")
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    rows_updated: int
    duplicate: bool
    step: int
    def __init__(self, rows_updated: _Optional[int] = ..., duplicate: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MethodStats(_message.Message):
    __slots__ = ("method", "requests", "errors", "rows", "bytes", "p50_ms", "p99_ms")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    method: str
    requests: int
    errors: int
    rows: int
    bytes: int
    p50_ms: float
    p99_ms: float
    def __init__(self, method: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., rows: _Optional[int] = ..., bytes: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("stored_rows", "stored_bytes", "map_size_bytes", "used_bytes", "methods", "cache_rows", "uptime_s", "shard", "tables")
    STORED_ROWS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAP_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ROWS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    stored_rows: int
    stored_bytes: int
    map_size_bytes: int
    used_bytes: int
    methods: _containers.RepeatedCompositeFieldContainer[MethodStats]
    cache_rows: int
    uptime_s: float
    shard: ShardState
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    def __init__(self, stored_rows: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., map_size_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., methods: _Optional[_Iterable[_Union[MethodStats, _Mapping]]] = ..., cache_rows: _Optional[int] = ..., uptime_s: _Optional[float] = ..., shard: _Optional[_Union[ShardState, _Mapping]] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ...) -> None: ...

class ShardState(_message.Message):
    __slots__ = ("shard_index", "map_version", "num_slots", "owned", "frozen", "layout", "shard_map_json")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAP_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_MAP_JSON_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    map_version: int
    num_slots: int
    owned: bytes
    frozen: bytes
    layout: str
    shard_map_json: str
    def __init__(self, shard_index: _Optional[int] = ..., map_version: _Optional[int] = ..., num_slots: _Optional[int] = ..., owned: _Optional[bytes] = ..., frozen: _Optional[bytes] = ..., layout: _Optional[str] = ..., shard_map_json: _Optional[str] = ...) -> None: ...

class SetShardStateRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ShardState
    def __init__(self, state: _Optional[_Union[ShardState, _Mapping]] = ...) -> None: ...

class SetShardStateResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ShardState
    def __init__(self, state: _Optional[_Union[ShardState, _Mapping]] = ...) -> None: ...

class ExportRowsRequest(_message.Message):
    __slots__ = ("table", "slots", "batch_rows")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    table: str
    slots: bytes
    batch_rows: int
    def __init__(self, table: _Optional[str] = ..., slots: _Optional[bytes] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class RowBatch(_message.Message):
    __slots__ = ("table", "ids", "records", "record_bytes", "step")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    records: bytes
    record_bytes: int
    step: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., records: _Optional[bytes] = ..., record_bytes: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class ImportRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class DeleteRowsRequest(_message.Message):
    __slots__ = ("table", "slots")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    table: str
    slots: bytes
    def __init__(self, table: _Optional[str] = ..., slots: _Optional[bytes] = ...) -> None: ...

class DeleteRowsResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    def __init__(self, rows: _Optional[int] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("phase", "snapshot_id", "lease_s", "allow", "path", "window_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    phase: SnapshotPhase
    snapshot_id: str
    lease_s: float
    allow: _containers.RepeatedScalarFieldContainer[str]
    path: str
    window_s: float
    def __init__(self, phase: _Optional[_Union[SnapshotPhase, str]] = ..., snapshot_id: _Optional[str] = ..., lease_s: _Optional[float] = ..., allow: _Optional[_Iterable[str]] = ..., path: _Optional[str] = ..., window_s: _Optional[float] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("applied", "rejected", "tables", "shard", "bytes", "frozen")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedScalarFieldContainer[str]
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    shard: ShardState
    bytes: int
    frozen: bool
    def __init__(self, applied: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[str]] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., shard: _Optional[_Union[ShardState, _Mapping]] = ..., bytes: _Optional[int] = ..., frozen: _Optional[bool] = ...) -> None: ...
