"""Project errors on the wire, both ways: the server ends a call with the error's status code and
message and names its class in trailing metadata (`engram-error: <ClassName>`); the client
raises that class again. A peer that sends no class name (another gRPC client's server, a
failure of the transport itself) is mapped by status code (errors.error_for_code).

    except EngramError as e:              # server side (servicer, admin, auth)
        status.abort(context, e)
    except grpc.RpcError as e:            # client side (StoreClient, snapshot, export, cluster)
        raise status.error_from_rpc(e, f"shard {address}") from None
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from engram_store.engine.errors import EngramError, error_classes, error_for_code

log = logging.getLogger(__name__)

#: trailing metadata key that carries the error's class name (gRPC keys are lowercase ascii)
ERROR_KEY = "engram-error"


def status_code(err: EngramError) -> grpc.StatusCode:
    """The gRPC status code `err` travels as."""
    return grpc.StatusCode[err.code]


def abort(context: grpc.ServicerContext, err: BaseException) -> NoReturn:
    """End the call with the status an error stands for: a project error with its class's code,
    its message and its class name in trailing metadata; anything else as INTERNAL (logged with
    its traceback, as it is a bug)."""
    if isinstance(err, EngramError):
        context.set_trailing_metadata(((ERROR_KEY, type(err).__name__),))
        context.abort(status_code(err), str(err))
    else:
        log.error("unexpected error in a request", exc_info=err)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}: {err}")
    raise AssertionError("grpc's context.abort returned")  # it raises, by contract


def _class_name(e: grpc.RpcError) -> str | None:
    """The class name the server sent in trailing metadata, if any."""
    trailing = getattr(e, "trailing_metadata", None)
    metadata: Any = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == ERROR_KEY and isinstance(value, str):
            return value
    return None


def _code_name(e: grpc.RpcError) -> str:
    code = getattr(e, "code", None)
    status = code() if callable(code) else None
    return status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"


def error_from_rpc(e: grpc.RpcError, where: str = "") -> EngramError:
    """The project error a failed call stands for: the class the server named, else the status
    code's default class. The message is the status details, prefixed with `where` (e.g.
    "shard host:port") when given.

    A class name is trusted only when its class travels as the status code received: a name
    this process has no class for (its module is not imported here) or one that disagrees
    with the code falls back to the code."""
    details = getattr(e, "details", None)
    message = (details() if callable(details) else None) or ""
    if where:
        message = f"{where}: {message}"
    code = _code_name(e)
    name = _class_name(e)
    cls = error_classes().get(name) if name else None
    if cls is not None and cls.code == code:
        return cls(message)
    if name is not None:
        log.debug("error class %r with status %s: mapped by code", name, code)
    return error_for_code(code, message)
