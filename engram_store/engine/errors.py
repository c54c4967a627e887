"""One error base class, one subclass per failure; each message says what to change.

The service maps each class to a gRPC status code (see `grpc_code`); the client maps status codes
back, so a caller catches the same class whether the store is local or remote.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class of every error this project raises on purpose."""

    #: name of the grpc.StatusCode member this error travels as
    code = "INTERNAL"


class InvalidArgument(EngramError):
    """The request itself is wrong: ids, shapes, dtypes, values or a spec."""

    code = "INVALID_ARGUMENT"


class TableNotFound(EngramError):
    code = "NOT_FOUND"


class TableExists(EngramError):
    """A table of that name exists with another spec."""

    code = "ALREADY_EXISTS"


class BatchTooLarge(EngramError):
    code = "RESOURCE_EXHAUSTED"


class StoreFull(EngramError):
    """The LMDB map is full; raise --map-size."""

    code = "RESOURCE_EXHAUSTED"


class WrongShard(EngramError):
    """The rows are not owned by this shard under the caller's shard map: refresh the map."""

    code = "FAILED_PRECONDITION"


class LayoutMismatch(EngramError):
    """A data directory belongs to another cluster layout or table spec."""

    code = "FAILED_PRECONDITION"


class ReadOnly(EngramError):
    """The shard serves lookups only."""

    code = "PERMISSION_DENIED"


class ShardUnavailable(EngramError):
    """A shard cannot be reached, or its rows are being moved; retry later."""

    code = "UNAVAILABLE"


class DataDirLocked(EngramError):
    """Another live process serves this data directory."""

    code = "FAILED_PRECONDITION"


class ConfigError(EngramError):
    """A configuration (CLI flags, dataclass fields) is inconsistent."""

    code = "INVALID_ARGUMENT"


_BY_CODE = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": TableNotFound,
    "ALREADY_EXISTS": TableExists,
    "RESOURCE_EXHAUSTED": BatchTooLarge,
    "FAILED_PRECONDITION": WrongShard,
    "PERMISSION_DENIED": ReadOnly,
    "UNAVAILABLE": ShardUnavailable,
}


def error_for_code(code_name: str, message: str) -> EngramError:
    """The project error that a gRPC status code name (e.g. 'NOT_FOUND') stands for."""
    return _BY_CODE.get(code_name, EngramError)(message)
