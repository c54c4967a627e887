"""One error base class, one subclass per failure; each message says what to change.

Every class declares the gRPC status code it travels as (`code`, a grpc.StatusCode member name)
and a `hint` (what to do about it; the class docstring's first line unless set), and registers
itself by class name when it is defined, wherever that is (here for the store's errors,
cluster.api for the cluster's). The server sends the class name with the status (engram_store/rpc/status.py)
and the client raises that class, so a caller catches the same class whether the store is local
or remote. A peer that sends only a status code gets the code's default class: the one class
per code defined with `default_for_code=True`, so the code -> class map is derived from the
classes and is one-to-one.

A subclass takes one argument, the message (the wire carries nothing else).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

#: the grpc.StatusCode member names (this module does not import grpc; tests/rpc/test_error_classes
#: checks that the two agree)
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

_BY_NAME: dict[str, type[EngramError]] = {}
_BY_CODE: dict[str, type[EngramError]] = {}


def _same(a: type, b: type) -> bool:
    """Whether two classes are one definition (a module reloaded defines its classes again)."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _register(cls: type[EngramError], default_for_code: bool) -> None:
    """Check the class (a clash fails where the class is defined), then add it to the maps."""
    if cls.code not in GRPC_CODES or cls.code == "OK":
        raise TypeError(
            f"{cls.__qualname__}.code = {cls.code!r} is not a gRPC status code "
            "name; use one of " + ", ".join(sorted(GRPC_CODES - {"OK"}))
        )
    name = cls.__name__
    old = _BY_NAME.get(name)
    if old is not None and not _same(old, cls):
        raise TypeError(
            f"two error classes are called {name} ({old.__module__} and "
            f"{cls.__module__}); the wire names a class by its name, so rename one"
        )
    old = _BY_CODE.get(cls.code) if default_for_code else None
    if old is not None and not _same(old, cls):
        raise TypeError(
            f"{old.__qualname__} is already the default class of {cls.code}; "
            f"define {cls.__qualname__} without default_for_code"
        )
    doc = cls.__dict__.get("__doc__")
    if "hint" not in cls.__dict__ and doc:
        cls.hint = doc.strip().splitlines()[0]
    _BY_NAME[name] = cls
    if default_for_code:
        _BY_CODE[cls.code] = cls


class EngramError(Exception):
    """Base class of every error this project raises on purpose."""

    #: name of the grpc.StatusCode member this error travels as
    code: ClassVar[str] = "INTERNAL"
    #: what to do about it, in one sentence
    hint: ClassVar[str] = "an unexpected failure; the message says where, the server log why"

    def __init_subclass__(cls, default_for_code: bool = False, **kwargs: Any) -> None:
        """Register the class by name; `default_for_code`: it is what a bare status code (no
        class name) of `cls.code` stands for."""
        super().__init_subclass__(**kwargs)
        if cls.__module__.split(".")[0] == "ray":
            # Ray re-raises a remote error as a class it makes on the fly (RayTaskError(X), a
            # subclass of X): not an error of ours to send by name, and made once per raise.
            return
        _register(cls, default_for_code)


_register(EngramError, default_for_code=True)


class InvalidArgument(EngramError, default_for_code=True):
    """The request itself is wrong: ids, shapes, dtypes, values or a spec."""

    code = "INVALID_ARGUMENT"
    hint = "fix the request as the message says; retrying it unchanged fails again"


class TableNotFound(EngramError, default_for_code=True):
    """No table of that name exists."""

    code = "NOT_FOUND"
    hint = "create the table first (`engram table create`), or check its name"


class TableExists(EngramError, default_for_code=True):
    """A table of that name exists with another spec."""

    code = "ALREADY_EXISTS"
    hint = "use the existing spec, drop the table first, or pick another name"


class BatchTooLarge(EngramError, default_for_code=True):
    """A request holds more rows than the shard accepts at once."""

    code = "RESOURCE_EXHAUSTED"
    hint = "split the batch (ClientConfig.max_batch_rows) or raise --max-batch-rows"


class StoreFull(EngramError):
    """The shard's memory budget or its LMDB map is full."""

    code = "RESOURCE_EXHAUSTED"
    hint = "add shards, or restart the shard with a larger --memory / --map-size, or drop tables"


class DataCorrupted(EngramError, default_for_code=True):
    """A data file is damaged, truncated or missing: the shard refuses to open it."""

    code = "DATA_LOSS"
    hint = "restore the data directory from a snapshot (engram restore), or start a fresh one"


class WrongShard(EngramError, default_for_code=True):
    """The rows are not owned by this shard under the caller's shard map: refresh the map."""

    code = "FAILED_PRECONDITION"
    hint = "refresh the shard map and resend (StoreClient does so by itself)"


class LayoutMismatch(EngramError):
    """A data directory belongs to another cluster layout or table spec."""

    code = "FAILED_PRECONDITION"
    hint = "use the layout and specs the data was written with, or another data directory"


class ReadOnly(EngramError, default_for_code=True):
    """The shard serves lookups only."""

    code = "PERMISSION_DENIED"
    hint = "send writes to a writable shard, or with a write token"


class ShardUnavailable(EngramError, default_for_code=True):
    """A shard cannot be reached, or its rows are being moved; retry later."""

    code = "UNAVAILABLE"
    hint = "retry later (StoreClient retries with backoff); check that the shard is up"


class DeadlineExceeded(ShardUnavailable, default_for_code=True):
    """A shard did not answer within the call's timeout."""

    code = "DEADLINE_EXCEEDED"
    hint = "retry, or raise the timeout (ClientConfig.timeout_s, --timeout)"


class Unauthenticated(EngramError, default_for_code=True):
    """The shard requires a token and the call sent none it knows."""

    code = "UNAUTHENTICATED"
    hint = "send the shard's token (ClientConfig.token, --token)"


class DataDirLocked(EngramError):
    """Another live process serves this data directory."""

    code = "FAILED_PRECONDITION"
    hint = "stop the other process, or use another --data directory"


class ConfigError(EngramError):
    """A configuration (CLI flags, dataclass fields) is inconsistent."""

    code = "INVALID_ARGUMENT"
    hint = "change the flags or fields the message names"


class SnapshotInProgress(ShardUnavailable):
    """Writes are refused while a snapshot is taken; the client retries them."""

    hint = "retry in a moment (StoreClient does, with backoff)"


class SnapshotConflict(EngramError):
    """A snapshot phase arrived out of turn: no snapshot is in progress, or another one is."""

    code = "FAILED_PRECONDITION"
    hint = "wait for the other snapshot to finish, or start again with FREEZE"


class SnapshotExists(EngramError):
    """The directory a shard is told to COPY into exists already."""

    code = "ALREADY_EXISTS"
    hint = "snapshot into a new directory"


def error_classes() -> Mapping[str, type[EngramError]]:
    """Every error class defined so far (EngramError included), by class name (read-only).
    Classes of a module appear once it is imported (cluster.api's when cluster is)."""
    return MappingProxyType(_BY_NAME)


def error_class(name: str) -> type[EngramError]:
    """The error class called `name`; EngramError for a name no class has."""
    return _BY_NAME.get(name, EngramError)


def code_class(code_name: str) -> type[EngramError]:
    """The default class of a gRPC status code name (e.g. 'NOT_FOUND'); EngramError when the
    code has none."""
    return _BY_CODE.get(code_name, EngramError)


def error_for_code(code_name: str, message: str) -> EngramError:
    """The project error that a gRPC status code name (e.g. 'NOT_FOUND') stands for, for a peer
    that sends no class name: the code's default class."""
    return code_class(code_name)(message)
