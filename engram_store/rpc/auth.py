"""Shared-token authentication and TLS for shard servers and their clients.

Server: `TokenAuthInterceptor` checks the `authorization: Bearer <token>` header of every call
(health checks excepted, so load balancers and `grpc_health_probe` need no token) from the call's
headers alone: a refused call is answered without reading its request message, so a body sent
without a valid token is never received, inflated or parsed. No token and an unknown token ->
Unauthenticated (UNAUTHENTICATED, with different messages); a read token on a method that writes
-> ReadOnly (PERMISSION_DENIED).
`server_credentials(auth)` gives TLS credentials when a certificate is configured.

Client: `open_channel(address, config, options)` opens a plaintext or TLS channel that sends the
client's token on every call.
"""

from __future__ import annotations

import collections
import hmac
import os
import stat
from collections.abc import Callable, Sequence

import grpc

from engram_store.engine.errors import ConfigError, EngramError, ReadOnly, Unauthenticated
from engram_store.rpc.config import AuthConfig, ClientConfig
from engram_store.rpc.status import abort

#: methods anyone may call, token or not
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: methods that change rows, tables, shard state or files on the server: write tokens only
WRITE_METHODS = frozenset(
    {
        "/engram.v1.MemoryStore/CreateTable",
        "/engram.v1.MemoryStore/DropTable",
        "/engram.v1.MemoryStore/PushGradients",
        "/engram.v1.MemoryStore/SetShardState",
        "/engram.v1.MemoryStore/ImportRows",
        "/engram.v1.MemoryStore/DeleteRows",
        "/engram.v1.StoreAdmin/Snapshot",
    }
)


def load_tokens_file(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(read tokens, write tokens) from a file of lines `read TOKEN` / `write TOKEN` (# comments).

    Keeping tokens in a file keeps them out of `ps` output and shell history; a file that users
    other than its owner may read or write is refused (chmod 600 it).
    """
    read: list[str] = []
    write: list[str] = []
    try:
        with open(path) as f:
            mode = os.fstat(f.fileno()).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"tokens file {path} has mode {stat.S_IMODE(mode):o}: other users may read "
                    f"or change its tokens; run `chmod 600 {path}`"
                )
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read tokens file {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("read", "write"):
            raise ConfigError(f"{path}:{n}: expected `read TOKEN` or `write TOKEN`, got {line!r}")
        (read if parts[0] == "read" else write).append(parts[1])
    if not read and not write:
        raise ConfigError(f"{path} holds no tokens; add lines like `write s3cret`")
    return tuple(read), tuple(write)


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None


def server_credentials(auth: AuthConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the configured certificate and key, or None for plaintext."""
    if not auth.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(_read_file(auth.tls_key, "TLS key"), _read_file(auth.tls_cert, "TLS certificate"))]
    )


def refusal_handler(handler: grpc.RpcMethodHandler, err: EngramError) -> grpc.RpcMethodHandler:
    """A handler for `handler`'s method that ends the call with `err` without reading its
    request: it is request-streaming whatever the method is (grpc receives a unary request
    before calling the behaviour, a streaming one only when the behaviour iterates), so the
    body of a refused call is neither received in full, nor decompressed, nor parsed."""

    def refuse(_requests, context):
        abort(context, err)

    if handler.response_streaming:

        def refuse_stream(requests, context):
            abort(context, err)
            yield  # a generator, as grpc expects of a response-streaming behaviour

        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )


def wrap_handler(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]
) -> grpc.RpcMethodHandler:
    """A handler like `handler` whose behaviour is `wrap(behaviour)` (any of the four kinds)."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    )
    for attr, make in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Allow a call only with a known bearer token; writes need a write token."""

    def __init__(self, read_tokens: tuple[str, ...], write_tokens: tuple[str, ...]):
        self._read = tuple(t.encode() for t in read_tokens)
        self._write = tuple(t.encode() for t in write_tokens)

    def role(self, metadata) -> str:
        """'write', 'read', 'missing' (no bearer token sent) or 'wrong' (a token this server
        does not know) for a call's metadata; tokens are compared in constant time."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return "missing"
        token = header[len("Bearer ") :].strip().encode()
        if not token:
            return "missing"
        # compare against every token so timing does not reveal which list matched
        is_write = any([hmac.compare_digest(token, t) for t in self._write])
        is_read = any([hmac.compare_digest(token, t) for t in self._read])
        return "write" if is_write else "read" if is_read else "wrong"

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        role = self.role(handler_call_details.invocation_metadata)
        err: EngramError
        if role == "missing":
            err = Unauthenticated(
                "this shard requires a token and the call sent none: send metadata "
                "`authorization: Bearer <token>` (ClientConfig.token / --token)"
            )
        elif role == "wrong":
            err = Unauthenticated(
                "this shard requires a token and the one sent is not one of its tokens: check "
                "--token against the shard's --read-token / --write-token / --tokens-file"
            )
        elif role == "read" and method in WRITE_METHODS:
            err = ReadOnly(
                f"{method.rsplit('/', 1)[-1]} writes; this token may only read. Use a write token"
            )
        else:
            return handler
        return refusal_handler(handler, err)


def server_interceptors(auth: AuthConfig) -> list[grpc.ServerInterceptor]:
    """The interceptors that enforce `auth` (none when no tokens are configured)."""
    return [TokenAuthInterceptor(auth.read_tokens, auth.write_tokens)] if auth.enabled else []


class _ClientCall(
    collections.namedtuple(
        "_ClientCall",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _ClientCall(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def open_channel(
    address: str, config: ClientConfig, options: Sequence[tuple[str, object]] | None = None
) -> grpc.Channel:
    """A channel to `address` that speaks TLS when config.tls_root_cert is set and sends
    config.token (if any) on every call."""
    options = list(options or [])
    if config.tls_root_cert:
        creds = grpc.ssl_channel_credentials(_read_file(config.tls_root_cert, "TLS root cert"))
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if config.token:
        channel = grpc.intercept_channel(channel, _BearerToken(config.token))
    return channel
