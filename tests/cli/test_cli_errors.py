"""How the `engram` command fails: one line on stderr, no traceback, exit status 2 for a usage
error and 1 for a runtime one, and a store's refusal worded by whether a token was sent at all."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.servers import ROOT, engram_command


def engram(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "ENGRAM_TOKEN"}
    return subprocess.run(
        [*engram_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**base, **(env or {})},
    )


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram: error: "), r.stderr
    return lines[0]


def test_serve_on_a_busy_port_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = engram("serve", "--data", str(tmp_path / "d"), "--port", str(port))
    assert r.returncode == 1, r.stderr  # a runtime error, not a usage error
    line = _one_line(r)
    assert f"127.0.0.1:{port}" in line and "--port" in line, line


def test_serve_metrics_port_0_prints_the_port_it_bound(server_process, tmp_path):
    import urllib.request

    server = server_process(tmp_path / "d", "--metrics-port", "0")
    line = server.proc.stdout.readline()
    assert line.startswith("metrics on http://127.0.0.1:"), line
    with urllib.request.urlopen(line.split()[-1], timeout=10) as resp:  # noqa: S310 (loopback)
        assert b"engram_stored_rows" in resp.read()


def test_a_missing_token_and_a_wrong_one_are_told_apart(server_process, tmp_path):
    server = server_process(tmp_path / "d", "--write-token", "w-secret")
    missing = engram("stats", "--address", server.address)
    wrong = engram("stats", "--address", server.address, "--token", "not-it")
    wrong_env = engram("stats", "--address", server.address, env={"ENGRAM_TOKEN": "not-it"})
    assert missing.returncode == wrong.returncode == wrong_env.returncode == 1
    assert "none was sent" in _one_line(missing) and "--token" in missing.stderr
    for r in (wrong, wrong_env):
        assert "refused the token this command sent" in _one_line(r), r.stderr
    ok = engram("stats", "--address", server.address, env={"ENGRAM_TOKEN": "w-secret"})
    assert ok.returncode == 0, ok.stderr


def test_usage_errors_exit_2_and_runtime_errors_exit_1(tmp_path):
    usage = engram("cluster", "scale", "--shards", "0")  # a flag that cannot work
    assert usage.returncode == 2, usage.stderr
    assert "cannot scale to 0 shards" in _one_line(usage)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    dead = engram("stats", "--address", f"127.0.0.1:{port}", "--timeout", "1")
    assert dead.returncode == 1 and f"127.0.0.1:{port}" in _one_line(dead), dead.stderr
