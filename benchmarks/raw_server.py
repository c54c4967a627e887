"""A tiny gRPC server with one generic unary method, the raw-transport baseline of bench_lookup.

    python benchmarks/raw_server.py     # prints "serving on 127.0.0.1:PORT", runs until SIGTERM

Method `/bench.Raw/Fetch`: the request is 8 bytes (little-endian response size) followed by any
payload (the benchmark sends as many bytes as a Lookup's ids); the response is that many bytes,
prebuilt, with no protobuf message on either side. The prebuilt answer is random bytes in pages of
its own: zeros from calloc would all read one shared zero page, which copies faster than any real
answer could.
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import threading
from concurrent import futures

import grpc

METHOD = "/bench.Raw/Fetch"
_MAX = 1 << 30


def _handler() -> grpc.GenericRpcHandler:
    cache: dict[int, bytes] = {}

    def fetch(request: bytes, context) -> bytes:
        (size,) = struct.unpack_from("<q", request)
        if size not in cache:  # prebuilt, so the baseline times transport only
            cache[size] = os.urandom(size)
        return cache[size]

    return grpc.method_handlers_generic_handler(
        "bench.Raw", {"Fetch": grpc.unary_unary_rpc_method_handler(fetch)}
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    opts = [
        ("grpc.max_send_message_length", _MAX),
        ("grpc.max_receive_message_length", _MAX),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(args.workers), options=opts)
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    done = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: done.set())
    print(f"serving on 127.0.0.1:{port}", flush=True)
    done.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
