"""Cluster errors keep their class across the wires they travel: pickling (Ray), gRPC status
(engram_store/rpc/status.py) and the `engram` CLI without the cluster extra. No Ray is started."""

from __future__ import annotations

import pathlib
import pickle
import subprocess
import sys

import grpc
import pytest

from cluster.api import ClusterExists, ClusterNotFound, RayUnreachable
from engram_store.engine.errors import EngramError, ShardUnavailable, code_class, error_classes

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLASSES = [ClusterExists, ClusterNotFound, RayUnreachable]


@pytest.mark.parametrize("cls", CLASSES)
def test_pickling_keeps_the_class(cls):
    """What Ray does to an error an actor raises."""
    back = pickle.loads(pickle.dumps(cls("no cluster named 'x'")))
    assert type(back) is cls and str(back) == "no cluster named 'x'"


@pytest.mark.parametrize("cls", CLASSES)
def test_registered_by_name_and_not_a_default(cls):
    assert error_classes()[cls.__name__] is cls
    assert code_class(cls.code) is not cls  # a bare status code means a store error
    assert cls.hint and issubclass(cls, EngramError)
    assert issubclass(RayUnreachable, ShardUnavailable)  # callers that retry it keep doing so


class _Aborted(Exception):
    pass


class _Context:
    """The part of grpc.ServicerContext that status.abort uses."""

    def __init__(self):
        self.trailing = ()
        self.code = self.details = None

    def set_trailing_metadata(self, md):
        self.trailing = tuple(md)

    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted


class _RpcError(grpc.RpcError):
    """A failed call as the client sees it."""

    def __init__(self, ctx: _Context):
        self._ctx = ctx

    def code(self):
        return self._ctx.code

    def details(self):
        return self._ctx.details

    def trailing_metadata(self):
        return self._ctx.trailing


@pytest.mark.parametrize("cls", CLASSES)
def test_grpc_status_keeps_the_class(cls):
    """ClusterNotFound travels as NOT_FOUND but comes back as itself, not TableNotFound."""
    status = pytest.importorskip("engram_store.rpc.status")
    ctx = _Context()
    with pytest.raises(_Aborted):
        status.abort(ctx, cls("no cluster named 'x'"))
    err = status.error_from_rpc(_RpcError(ctx), "registry")
    assert type(err) is cls and "no cluster named 'x'" in str(err)


def test_cli_without_the_cluster_extra_names_it(monkeypatch, capsys):
    """`engram cluster ...` where `import cluster` fails (no Ray): one line naming the extra."""
    from engram.cli import main

    monkeypatch.setitem(sys.modules, "cluster", None)  # import cluster -> ImportError
    for argv in (
        ["cluster", "status"],
        ["cluster", "down"],
        ["cluster", "scale", "--shards", "2"],
        ["cluster", "up", "--shards", "1"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "pip install 'engram[cluster]'" in err, (argv, err)


def test_building_the_parser_imports_no_ray():
    code = (
        "import sys; from engram.cli import build_parser; build_parser().format_help(); "
        "bad = [m for m in ('ray', 'cluster', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_errors_re_raised_by_ray_keep_their_class_every_time():
    """Ray re-raises a remote error as a class it makes per raise (RayTaskError(X), subclass of
    X); our registry must neither take those in nor refuse them (a refusal would make Ray fall
    back to a bare RayTaskError from the second raise on)."""
    import ray.exceptions

    from engram_store.engine.errors import DataDirLocked

    before = dict(error_classes())
    for _ in range(3):
        e = ray.exceptions.RayTaskError("f", "tb", DataDirLocked("held")).as_instanceof_cause()
        assert isinstance(e, DataDirLocked) and str(e.cause) == "held"
    assert dict(error_classes()) == before
