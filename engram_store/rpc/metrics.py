"""Prometheus metrics of shard servers and trainers, and a reader for `engram cluster status`.

Shard server (`engram serve --metrics-port P`): `ServerMetrics` is a gRPC server interceptor plus a
per-server registry, served at http://HOST:P/metrics (https:// when the server has a TLS
certificate: the same one; when the server has tokens, /metrics asks for any of them as
`Authorization: Bearer <token>` and answers 401 without):

    engram_requests_total{method,code}        calls by final status (OK, INVALID_ARGUMENT, ...)
    engram_request_seconds{method}            latency histogram (p50/p99 via histogram_quantile)
    engram_rows_total{method}                 row ids in requests (Lookup, PushGradients, ...)
    engram_bytes_total{method,direction}      request ("in") and response ("out") bytes
    engram_push_staleness{table}              server table step - request step, per push
    engram_stored_rows / _stored_bytes / _used_bytes / _map_size_bytes / _cache_rows /
    _memory_bytes / _memory_budget_bytes / _log_bytes   (gauges: RAM arrays, their budget, kept log)
    engram_table_step{table}                  highest optimizer step applied

Trainer: `trainer.metrics.TrainerMetrics` (stall time, rows per token, cache hit rate).
Readers: `scrape(url)` -> parsed families; `summarize(families)` -> the numbers a status table
shows (requests, errors by code, p50/p99 per method, staleness p50/p99).
"""

from __future__ import annotations

import hmac
import math
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.parser import text_string_to_metric_families

from engram_store.rpc.auth import wrap_handler

LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)
STALENESS_BUCKETS = (-1, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
STALL_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def _size(msg: object) -> int:
    """Serialized size of a request/response (message, raw bytes, or 0 if neither)."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return len(msg)
    size = getattr(msg, "ByteSize", None)
    return size() if size is not None else 0


def _rows(msg: object) -> int:
    ids = getattr(msg, "ids", None)
    return len(ids) // 8 if isinstance(ids, (bytes, memoryview)) else 0


class _ShardGauges:
    """Collector reading the shard's size counters at scrape time (no bookkeeping per call)."""

    def __init__(self, shard) -> None:
        self._shard = shard

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            s = self._shard.stats()
            steps = [(t.name, self._shard.table_stats(t.name).step) for t in self._shard.tables()]
        except Exception:  # a closing shard: report nothing rather than fail the scrape
            return
        for key in (
            "stored_rows",
            "stored_bytes",
            "used_bytes",
            "map_size_bytes",
            "cache_rows",
            "memory_bytes",
            "memory_budget_bytes",
            "log_bytes",
        ):
            yield GaugeMetricFamily(f"engram_{key}", f"shard {key.replace('_', ' ')}", s[key])
        g = GaugeMetricFamily(
            "engram_table_step", "highest optimizer step applied", labels=["table"]
        )
        for name, step in steps:
            g.add_metric([name], step)
        yield g


class ServerMetrics(grpc.ServerInterceptor):
    """Counts every call of a shard server into its own registry (one per server, so several
    servers in one process keep apart). `step_of(table)` gives the table step for staleness."""

    def __init__(self, step_of: Callable[[str], int] | None = None, shard=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "engram_requests",
            "calls by method and final status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "engram_request_seconds",
            "call latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter("engram_rows", "row ids in requests", ["method"], registry=r)
        self.bytes = Counter("engram_bytes", "message bytes", ["method", "direction"], registry=r)
        self.staleness = Histogram(
            "engram_push_staleness",
            "server table step minus the push's step",
            ["table"],
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self._step_of = step_of
        if shard is not None:
            r.register(_ShardGauges(shard))
        self._http: WSGIServer | None = None
        self.port: int | None = None

    def serve(
        self,
        port: int,
        host: str = "127.0.0.1",
        tokens: tuple[str, ...] = (),
        tls_cert: str = "",
        tls_key: str = "",
    ) -> int:
        """Serve /metrics on host:port (0: any free port); returns the port. With `tokens`, a
        scrape must send one of them (`Authorization: Bearer <token>`); with a certificate and
        key, /metrics speaks HTTPS only."""
        app = _token_app(make_wsgi_app(self.registry), tokens)
        httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert, tls_key)
            # the handshake runs in the request's own thread (and under its timeout), so a
            # client that connects and sends nothing cannot stop the accept loop
            httpd.socket = context.wrap_socket(
                httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        threading.Thread(target=httpd.serve_forever, name="engram-metrics", daemon=True).start()
        self._http = httpd
        self.port = httpd.server_port
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def _observe(self, method: str, code: str, t0: float, rows: int, nin: int, nout: int) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(time.perf_counter() - t0)
        if rows:
            self.rows.labels(method).inc(rows)
        if nin:
            self.bytes.labels(method, "in").inc(nin)
        if nout:
            self.bytes.labels(method, "out").inc(nout)

    def _staleness(self, request: object) -> None:
        step = getattr(request, "step", 0)
        table = getattr(request, "table", "")
        if self._step_of is None or not isinstance(step, int) or step <= 0 or not table:
            return
        try:
            current = self._step_of(table)
        except Exception:  # unknown table: the call itself will say so
            return
        self.staleness.labels(table).observe(current - step)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler_call_details.method.startswith("/grpc."):
            return handler  # health and reflection are not the store's traffic

        def code_of(context, failed: bool) -> str:
            code = context.code()
            if code is None:
                return "UNKNOWN" if failed else "OK"
            return code.name

        def wrap(behaviour):
            if handler.response_streaming:

                def stream_out(request, context):
                    t0, rows, nout, failed = time.perf_counter(), 0, 0, True
                    try:
                        for resp in behaviour(request, context):
                            rows += _rows(resp)
                            nout += _size(resp)
                            yield resp
                        failed = False
                    finally:
                        self._observe(
                            method, code_of(context, failed), t0, rows, _size(request), nout
                        )

                return stream_out

            def unary_out(request, context):
                t0, failed, resp, counted = time.perf_counter(), True, None, [0, 0]
                if handler.request_streaming:
                    request = _counting(request, counted)
                else:
                    counted[:] = [_rows(request), _size(request)]
                    if method == "PushGradients":
                        self._staleness(request)
                try:
                    resp = behaviour(request, context)
                    failed = False
                    return resp
                finally:
                    self._observe(
                        method, code_of(context, failed), t0, counted[0], counted[1], _size(resp)
                    )

            return unary_out

        return wrap_handler(handler, wrap)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr; a connection that sends nothing is dropped after 10 s."""

    timeout = 10

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


def _token_app(app: Callable, tokens: tuple[str, ...]) -> Callable:
    """`app` behind a bearer-token check (no check without tokens). A missing and a wrong token
    get different 401 messages."""
    if not tokens:
        return app
    known = tuple(t.encode() for t in tokens)

    def checked(environ, start_response):
        header = environ.get("HTTP_AUTHORIZATION", "")
        token = header[len("Bearer ") :].strip().encode() if header.startswith("Bearer ") else b""
        if token and any([hmac.compare_digest(token, t) for t in known]):
            return app(environ, start_response)
        body = (
            b"this shard's /metrics needs one of its tokens: send `Authorization: Bearer <token>`\n"
            if not token
            else b"the token sent is not one of this shard's tokens\n"
        )
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
        )
        return [body]

    return checked


def _counting(requests: Iterator, counted: list[int]) -> Iterator:
    for r in requests:
        counted[0] += _rows(r)
        counted[1] += _size(r)
        yield r


# ---- reading ----


def scrape(
    url: str, timeout_s: float = 3.0, token: str = "", tls_root_cert: str = ""
) -> dict[str, list]:
    """Metric families of a /metrics endpoint ("host:port" or a URL): {name: [(labels, value)]}.

    Sample names keep their suffixes (_total, _bucket, _sum, _count). `token` is sent as a
    bearer token; with `tls_root_cert` (the CA, or the shard's self-signed certificate) a
    "host:port" is fetched over https and the certificate checked against it."""
    if "://" not in url:
        url = f"{'https' if tls_root_cert else 'http'}://{url}/metrics"
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=tls_root_cert) if tls_root_cert else None
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:  # noqa: S310
        text = resp.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """PromQL's histogram_quantile over cumulative (upper bound, count) buckets: linear
    interpolation inside the bucket holding the q-th observation. NaN without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, prev = 0.0, 0.0
    for i, (upper, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(upper):
                return buckets[i - 1][0] if i else math.nan
            if i == 0 and upper <= 0:
                return upper
            lo = lower if i else min(0.0, upper)
            return lo + (upper - lo) * ((rank - prev) / (count - prev) if count > prev else 1.0)
        lower, prev = upper, count
    return buckets[-1][0]


def _quantiles(families: dict, name: str, key: str) -> dict[str, dict[str, float]]:
    by: dict[str, list] = {}
    for labels, value in families.get(f"{name}_bucket", []):
        by.setdefault(labels[key], []).append((float(labels["le"]), value))
    return {
        k: {"p50": histogram_quantile(0.5, b), "p99": histogram_quantile(0.99, b)}
        for k, b in by.items()
    }


def summarize(families: dict) -> dict:
    """Requests and errors (by code) per method, p50/p99 latency (ms), rows, push staleness."""
    methods: dict[str, dict] = {}
    for labels, value in families.get("engram_requests_total", []):
        m = methods.setdefault(labels["method"], {"requests": 0, "errors": {}, "rows": 0})
        m["requests"] += int(value)
        if labels["code"] != "OK":
            m["errors"][labels["code"]] = m["errors"].get(labels["code"], 0) + int(value)
    for labels, value in families.get("engram_rows_total", []):
        methods.setdefault(labels["method"], {"requests": 0, "errors": {}, "rows": 0})
        methods[labels["method"]]["rows"] = int(value)
    for method, q in _quantiles(families, "engram_request_seconds", "method").items():
        if method in methods:
            methods[method]["p50_ms"] = q["p50"] * 1e3
            methods[method]["p99_ms"] = q["p99"] * 1e3
    gauges = {
        k: v[0][1]
        for k, v in families.items()
        if k.startswith("engram_") and len(v) == 1 and not v[0][0]
    }
    return {
        "methods": methods,
        "staleness": _quantiles(families, "engram_push_staleness", "table"),
        "gauges": gauges,
    }
