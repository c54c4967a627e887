"""Shard servers for the rpc, ops and cli tests (a pytest plugin of tests/conftest.py):
in-process on port 0 (a fresh data dir each) and `engram serve` in a subprocess."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from engram_store.engine.config import OptimizerConfig, ShardConfig, TableConfig
from engram_store.rpc.client import StoreClient
from engram_store.rpc.config import ClientConfig, ServerConfig
from engram_store.rpc.server import create_server, stop_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL_BATCH = 4096  # max_batch_rows of the test servers, so the limit is cheap to exceed


def table_spec(name: str = "t", num_rows: int = 1000, dim: int = 8, **kw) -> TableConfig:
    """A small Adam table."""
    opt = kw.pop("optimizer", OptimizerConfig(kind="adam", lr=0.01))
    return TableConfig(name=name, num_rows=num_rows, dim=dim, optimizer=opt, **kw)


class LocalShard:
    """A shard server running in this process; restartable on the same data dir."""

    def __init__(self, data_dir: pathlib.Path | str, **config):
        """`config`: fields of ShardConfig (read_only, ...) or ServerConfig (auth, ...)."""
        shard_fields = {f.name for f in dataclasses.fields(ShardConfig)}
        shard = ShardConfig(
            **{
                "data_dir": str(data_dir),
                "max_batch_rows": SMALL_BATCH,
                **{k: v for k, v in config.items() if k in shard_fields},
            }
        )
        server = {k: v for k, v in config.items() if k not in shard_fields}
        self.config = ServerConfig(shard=shard, **{"workers": 4, **server})
        self.running = False
        self.start()

    def start(self) -> None:
        self.server, self.port, self.shard = create_server(self.config)
        self.address = f"127.0.0.1:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.running = False
            stop_server(self.server, self.shard, grace_s=1.0)

    @property
    def servicer(self):
        return self.server.servicer


@pytest.fixture
def make_shard(tmp_path):
    """Factory of in-process shard servers, each on its own data dir; all stopped at the end."""
    shards: list[LocalShard] = []

    def make(name: str = "shard", data_dir: str | None = None, **config) -> LocalShard:
        s = LocalShard(data_dir or tmp_path / f"{name}{len(shards)}", **config)
        shards.append(s)
        return s

    yield make
    for s in shards:
        s.stop()


@pytest.fixture
def shard(make_shard) -> LocalShard:
    return make_shard()


@pytest.fixture
def client(shard):
    with StoreClient(shard.address, ClientConfig(retries=2, backoff_s=0.01)) as c:
        yield c


def engram_command() -> list[str]:
    """The `engram` console script of this venv (or the module behind it)."""
    script = pathlib.Path(sys.executable).parent / "engram"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engram"]


class ServerProcess:
    """`engram serve` in a subprocess; the address is parsed from its 'serving on' line."""

    def __init__(self, data_dir: pathlib.Path, *extra: str):
        self.proc = subprocess.Popen(
            [*engram_command(), "serve", "--data", str(data_dir), "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("serving on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[-1]

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def server_process():
    """Factory of subprocess servers; every one is killed at the end."""
    procs: list[ServerProcess] = []

    def start(data_dir: pathlib.Path, *extra: str) -> ServerProcess:
        p = ServerProcess(data_dir, *extra)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()
