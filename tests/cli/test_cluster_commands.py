"""`engram cluster` from other shells, as a user runs it: a local `cluster up` (its own Ray, on
127.0.0.1 only), a second cluster on that Ray, a training run with a Ray of its own. Commands act
on the cluster they name and nothing else; a missing or wrong Ray token, a dead address and a
`down` from elsewhere each end in one clear line. One `cluster up` serves the whole module."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.servers import ROOT, engram_command
from trainer.config import table_lr_mult_for

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

TOKEN = {"RAY_AUTH_MODE": "token"}  # what a user sets to reach a Ray that ray.init() started


def _env(extra: dict | None = None) -> dict:
    """This environment without Ray's auth settings (as a new shell has it), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    return {**env, **(extra or {})}


def engram(*args: str, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [*engram_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=_env(env),
    )


class Background:
    """A long-running `engram` command; its output lines are collected by a thread."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [*engram_command(), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=_env(env),
            start_new_session=True,  # our SIGINT reaches it alone
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match:
        """The first output line matching `pattern`; fails after timeout_s or if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return rc

    def stop(self) -> None:
        """SIGINT (Ctrl-C), then SIGKILL if it does not end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """`engram cluster up --name a` blocking in the background: (process, Ray address, root)."""
    root = tmp_path_factory.mktemp("clusters")
    up = Background(
        "cluster", "up", "--shards", "1", "--name", "a", "--data", str(root / "a"),
        "--cpus-per-shard", "0.25",
    )  # fmt: skip
    try:
        m = up.wait_for(r"serving until Ctrl-C.* --address (\S+)", 240)
        yield up, m.group(1), root
    finally:
        up.stop()


def _descendants(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_the_local_ray_listens_on_loopback_only(local_cluster):
    up, address, _ = local_cluster
    assert address.startswith("127.0.0.1:")
    listening = []
    for proc in [psutil.Process(up.proc.pid), *_descendants(up.proc.pid)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        listening += [(proc.name(), c.laddr) for c in conns if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, listening  # the GCS, the raylet, the shard (at least)
    for name, laddr in listening:
        ip = ipaddress.ip_address(laddr.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # [::ffff:127.0.0.1]
            ip = ip.ipv4_mapped
        assert ip.is_loopback, f"{name} listens on {laddr.ip}:{laddr.port}"


def test_a_missing_or_wrong_ray_token_fails_fast_naming_the_fix(local_cluster):
    _, address, _ = local_cluster
    missing = engram("cluster", "status", "--address", address, "--name", "a")
    assert missing.returncode == 1, missing.stderr
    assert "RAY_AUTH_MODE=token" in missing.stderr and "requires token" in missing.stderr
    wrong = engram(
        "cluster", "status", "--address", address, "--name", "a",
        env={**TOKEN, "RAY_AUTH_TOKEN": "not-the-token"},
    )  # fmt: skip
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr, wrong.stderr
    for r in (missing, wrong):  # one line from us, none of Ray's C++ retry logs, no traceback
        assert "InvalidAuthToken" not in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dead_addresses_fail_in_about_the_timeout_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    r = engram("cluster", "status", "--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert r.returncode == 1 and "no Ray answers" in r.stderr and "--timeout" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = engram("cluster", "status", "--address", "not-an-address")
    assert r.returncode == 2 and "HOST:PORT" in r.stderr, r.stderr  # a usage error: exit 2


def test_down_stops_only_the_cluster_it_names(local_cluster):
    _, address, root = local_cluster
    b = engram(
        "cluster", "up", "--address", address, "--shards", "1", "--name", "b",
        "--data", str(root / "b"), "--cpus-per-shard", "0.25", env=TOKEN,
    )  # fmt: skip
    assert b.returncode == 0, b.stderr
    down = engram("cluster", "down", "--address", address, "--name", "b", env=TOKEN)
    assert down.returncode == 0, down.stderr
    assert f"stopping cluster 'b' (1 shard(s), data {root / 'b'})" in down.stdout, down.stdout
    a = engram("cluster", "status", "--address", address, "--name", "a", "--json", env=TOKEN)
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["name"] == "a"
    gone = engram("cluster", "status", "--address", address, "--name", "b", env=TOKEN)
    assert gone.returncode == 1 and "no cluster named 'b'" in gone.stderr, gone.stderr
    assert "clusters up there: a (namespace engram)" in gone.stderr


def test_status_reads_the_shards_metrics(local_cluster):
    import numpy as np

    from engram_store.rpc.client import StoreClient
    from tests.servers import table_spec

    _, address, _ = local_cluster

    def status() -> dict:
        r = engram("cluster", "status", "--address", address, "--name", "a", "--json", env=TOKEN)
        assert r.returncode == 0, r.stderr
        (shard,) = json.loads(r.stdout)["shards"]
        return shard

    shard = status()
    assert re.fullmatch(r"127\.0\.0\.1:\d+", shard["metrics_address"]), shard
    # the registry's own calls (SetShardState, Stats) are counted on the shard's /metrics
    assert shard["metrics"]["requests"] > 0 and shard["metrics"]["errors"] == 0, shard
    assert shard["metrics"]["lookup_p99_ms"] is None  # no lookup yet
    with StoreClient(shard["address"]) as c:  # traffic of our own
        c.create_table(table_spec("m", num_rows=100))
        c.lookup("m", np.arange(10))
    after = status()["metrics"]
    assert after["lookup_p99_ms"] > 0 and after["requests"] > shard["metrics"]["requests"]


def test_a_training_run_survives_cluster_commands_not_addressed_to_it(local_cluster, tmp_path):
    """`engram train` names its own store cluster train-...; `down` without --address refuses
    to pick one of the two Rays, `down` of the default name on the run's Ray stops nothing, and
    the run finishes."""
    _, address, _ = local_cluster
    run = Background(
        "train", "--corpus", "synthetic", "--vocab-size", "256", "--layers", "2", "--width",
        "32", "--heads", "2", "--memory-width", "16", "--hash-heads", "2", "--table-size",
        "2000", "--seq-len", "16", "--batch-size", "4", "--steps", "100000", "--minutes",
        "0.75", "--shards", "1", "--eval-batches", "1", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    try:
        m = run.wait_for(r"store cluster (\S+): 1 shards .* at (127\.0\.0\.1:\d+)", 240)
        name, run_ray = m.group(1), m.group(2)
        assert name.startswith("train-") and name != "engram"
        several = engram("cluster", "down")
        assert several.returncode == 2, several.stderr
        assert address in several.stderr and run_ray in several.stderr, several.stderr
        other = engram("cluster", "down", "--address", run_ray, env=TOKEN)
        assert other.returncode == 1 and "no cluster named 'engram'" in other.stderr
        assert name in other.stderr, other.stderr  # it lists the run's cluster, and leaves it
        assert run.wait(240) == 0, run.output[-4000:]
    finally:
        run.stop()
    assert "Traceback" not in run.output and "throughput" in run.output, run.output[-4000:]
    # --table-lr-mult auto: the rule's lr for the tokens the run was set to read (not those it
    # read before --minutes stopped it)
    mult = table_lr_mult_for(100_000 * 4 * 16)
    want = f"Adam lr {1e-3 * mult:.3g} = {mult:.3g} x --lr (--table-lr-mult auto: 6,400,000 tokens"
    assert want in run.output, run.output[-4000:]


def test_a_blocked_up_notices_a_down_from_another_shell(local_cluster):
    up, address, root = local_cluster
    down = engram("cluster", "down", "--address", address, "--name", "a", env=TOKEN)
    assert down.returncode == 0, down.stderr
    assert f"stopping cluster 'a' (1 shard(s), data {root / 'a'})" in down.stdout
    assert up.wait(120) == 0, up.output[-4000:]
    assert "stopped from elsewhere" in up.output
    assert "Traceback" not in up.output and "ActorDiedError" not in up.output, up.output
