"""Start servers in subprocesses for the benchmarks and always clean them up."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _engram() -> list[str]:
    script = pathlib.Path(sys.executable).parent / "engram"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engram"]


@contextlib.contextmanager
def server(cmd: list[str]) -> Iterator[str]:
    """Run `cmd` (which prints 'serving on HOST:PORT'); yield the address; stop it after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        if not line.startswith("serving on "):
            raise RuntimeError(f"{cmd[0]} did not start: {line!r}")
        yield line.split()[-1]
    finally:
        stop(proc, timeout_s=30)
        proc.stdout.close()


def stop(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited within timeout_s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def shard_server(*extra: str) -> Iterator[str]:
    """`engram serve` on 127.0.0.1, any free port, in a temporary data directory."""
    with (
        tempfile.TemporaryDirectory(prefix="engram-bench-") as data,
        server([*_engram(), "serve", "--data", data, "--port", "0", *extra]) as address,
    ):
        yield address


@contextlib.contextmanager
def raw_server() -> Iterator[str]:
    """benchmarks/raw_server.py: a generic bytes-in, bytes-out gRPC method."""
    with server([sys.executable, str(ROOT / "benchmarks" / "raw_server.py")]) as address:
        yield address
