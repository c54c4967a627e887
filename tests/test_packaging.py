"""Installs that match the roles: a store node runs on the base install, without torch or Ray.

Two proofs. In this venv (which has torch and Ray) each store command runs in a fresh
interpreter that reports afterwards which torch / Ray modules it imported: none, `engram serve`
included (it reports after it served the other commands' calls and stopped). And a venv of its own
gets `pip install <a copy of this tree>` with no extras; there `engram serve`, `engram table
create` and a lookup work, torch and Ray are absent, and the layers that need them say which
extra to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys

import pytest

from engram import __version__

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs `engram.cli.main(argv)` in this interpreter, then writes the exit code and the torch / Ray
# modules it imported to the file named by argv[1] (stdout belongs to the command).
PROBE = """\
import json, sys
import engram.cli

rc = None
try:
    rc = engram.cli.main(sys.argv[2:])
except SystemExit as e:  # --help, --version and parse errors exit
    rc = e.code
finally:
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray"))
    with open(sys.argv[1], "w") as f:
        json.dump({"rc": rc, "heavy": heavy}, f)
sys.exit(rc)
"""


def _env() -> dict[str, str]:
    """This environment minus what would leak the checkout or a token into a child."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ENGRAM_TOKEN")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Server:
    """A server command in a subprocess; the address comes from its 'serving on' line."""

    def __init__(self, cmd: list[str], cwd: pathlib.Path, log: pathlib.Path):
        self.log = log
        self._err = log.open("w")
        self.proc = subprocess.Popen(
            [str(c) for c in cmd],
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            cwd=cwd,
            env=_env(),
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("serving on "):
            self.close()
            raise AssertionError(f"server did not start: {line!r}\n{log.read_text()}")
        self.address = line.split()[-1]

    def stop(self) -> int:
        """SIGTERM (a graceful stop) and the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self._err.close()


def _probe(
    tmp_path: pathlib.Path, name: str, argv: list[str]
) -> tuple[subprocess.CompletedProcess, dict | None]:
    """`engram ARGV` in a fresh interpreter of this venv: the process, and its report (exit code,
    the torch / Ray modules it imported), None if it died before writing one."""
    probe = tmp_path / "probe.py"
    if not probe.exists():
        probe.write_text(PROBE)
    out = tmp_path / f"{name}.json"
    r = subprocess.run(
        [sys.executable, str(probe), str(out), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=120,
    )
    return r, json.loads(out.read_text()) if out.exists() else None


def test_store_commands_import_neither_torch_nor_ray(tmp_path):
    if not any(importlib.util.find_spec(m) for m in ("torch", "ray")):
        pytest.skip("neither torch nor Ray is installed here: nothing they could import")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    server = Server(
        [
            sys.executable,
            probe,
            tmp_path / "serve.json",
            "serve",
            "--data",
            tmp_path / "data",
            "--port",
            "0",
        ],
        tmp_path,
        tmp_path / "serve.log",
    )
    try:
        a = ["--address", server.address]
        commands = {
            "version": ["--version"],
            "help": ["--help"],
            "table-create": ["table", "create", *a, "--name", "t", "--rows", "1000", "--dim", "8"],
            "table-list": ["table", "list", *a],
            "table-info": ["table", "info", *a, "--name", "t"],
            "query-rows": ["query", *a, "--rows", "0,5,7", "--table", "t", "--json"],
            "stats": ["stats", *a],
            # operations on a shard address reach the shard directly, never through Ray
            "snapshot": ["snapshot", *a, "--to", str(tmp_path / "snap")],
            "export": ["export", *a, "--out", str(tmp_path / "export")],
        }
        out = {}
        for name, argv in commands.items():
            r, report = _probe(tmp_path, name, argv)
            what = f"`engram {' '.join(argv)}`:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
            assert report is not None and report["rc"] == 0, what
            assert report["heavy"] == [], f"{what}\nimported {report['heavy'][:20]}"
            out[name] = r.stdout
        rows = json.loads(out["query-rows"])["rows"]  # the lookup really ran
        assert len(rows) == 3 and all(len(row) == 8 for row in rows)
        assert server.stop() == 0, (tmp_path / "serve.log").read_text()
    finally:
        server.close()
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report == {"rc": 0, "heavy": []}, (tmp_path / "serve.log").read_text()


# ---- a base install in a venv of its own ----

_NOT_SOURCE = {
    ".git",
    ".venv",
    "data",
    "runs",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
    ".engram",
}


def _copy_tree(dst: pathlib.Path) -> None:
    """This checkout's working tree (uncommitted edits included) minus ignored files, so the
    build sees exactly the source: git's list where there is git, else a filtered copy."""
    try:
        names = (
            subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=ROOT,
                capture_output=True,
                check=True,
                timeout=60,
            )
            .stdout.decode()
            .split("\0")
        )
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(
            ROOT,
            dst,
            ignore=lambda d, names: [
                n for n in names if n in _NOT_SOURCE or n.endswith((".egg-info", ".pyc"))
            ],
        )
        return
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is not copied
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> pathlib.Path:
    """A venv (no system site-packages) with `pip install <copy of this tree>`: no extras."""
    tmp = tmp_path_factory.mktemp("base-install")
    src, venv = tmp / "src", tmp / "venv"
    _copy_tree(src)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=_env())
    # the build needs setuptools from the index (or pip's cache); the log says why it failed
    r = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=800,
        env=_env(),
        cwd=tmp,
    )
    assert r.returncode == 0, f"pip install of the base package failed:\n{r.stdout}\n{r.stderr}"
    return venv


def _run(venv: pathlib.Path, cwd: pathlib.Path, *cmd: str) -> subprocess.CompletedProcess:
    """A command of the base venv (`engram` or `python`), from a folder without source."""
    return subprocess.run(
        [str(venv / "bin" / cmd[0]), *cmd[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=120,
    )


@pytest.mark.timeout(900)  # a cold pip cache downloads grpcio, numpy and protobuf first
def test_base_install_is_a_store_node(base_venv, tmp_path):
    where = _run(
        base_venv,
        tmp_path,
        "python",
        "-c",
        "import engram_store, engram; print(engram_store.__file__, engram.__file__)",
    )
    assert where.returncode == 0, where.stderr
    assert all(pathlib.Path(p).is_relative_to(base_venv) for p in where.stdout.split()), (
        f"the package should come from the venv, not the checkout: {where.stdout}"
    )
    for module in ("torch", "ray", "tokenizers", "tests"):
        r = _run(base_venv, tmp_path, "python", "-c", f"import {module}")
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (
            f"{module} should be absent from a base install:\n{r.stderr}"
        )

    v = _run(base_venv, tmp_path, "engram", "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"engram {__version__}", v.stderr

    server = Server(
        [base_venv / "bin" / "engram", "serve", "--data", tmp_path / "data", "--port", "0"],
        tmp_path,
        tmp_path / "serve.log",
    )
    try:
        a = ["--address", server.address]
        c = _run(
            base_venv,
            tmp_path,
            "engram",
            "table",
            "create",
            *a,
            "--name",
            "t",
            "--rows",
            "100",
            "--dim",
            "4",
            "--init",
            "normal",
            "--seed",
            "3",
        )
        assert c.returncode == 0, c.stderr
        assert json.loads(c.stdout)["spec"]["num_rows"] == 100
        q = _run(
            base_venv, tmp_path, "engram", "query", *a, "--rows", "0,5,99", "--table", "t", "--json"
        )
        assert q.returncode == 0, q.stderr
        rows = json.loads(q.stdout)["rows"]
        assert len(rows) == 3 and all(len(r) == 4 for r in rows) and any(any(r) for r in rows)
        s = _run(base_venv, tmp_path, "engram", "stats", *a)
        assert s.returncode == 0, s.stderr
        # the operations tools are store-node commands too
        snap = _run(base_venv, tmp_path, "engram", "snapshot", *a, "--to", str(tmp_path / "snap"))
        assert snap.returncode == 0, snap.stderr
        ex = _run(
            base_venv,
            tmp_path,
            "engram",
            "export",
            "--from",
            str(tmp_path / "snap"),
            "--out",
            str(tmp_path / "export"),
        )
        assert ex.returncode == 0, ex.stderr
        assert [pathlib.Path(f).name for f in json.loads(ex.stdout)["files"]] == ["t.safetensors"]
        # the layers a store node lacks name their extra: one line, no traceback
        for cmd, extra in (
            (["train", "--steps", "1"], "engram[train]"),
            (["query", *a, "--text", "hello"], "engram[train]"),
            (["cluster", "status", "--address", "127.0.0.1:1"], "engram[cluster]"),
        ):
            r = _run(base_venv, tmp_path, "engram", *cmd)
            what = f"`engram {' '.join(cmd)}`: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
            assert r.returncode != 0 and extra in r.stderr, what
            assert "Traceback" not in r.stderr, what
        assert server.stop() == 0, (tmp_path / "serve.log").read_text()
    finally:
        server.close()
    for package, extra in (("trainer", "engram[train]"), ("cluster", "engram[cluster]")):
        r = _run(base_venv, tmp_path, "python", "-c", f"import {package}")
        assert r.returncode != 0 and extra in r.stderr, r.stderr
