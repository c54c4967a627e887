"""The layer order as a test, not a hope (engram/__init__.py lists the layers):

    engram_store.engine  <  engram_store.rpc  <  engram_store.ops  <  {cluster, trainer}  <  engram

Nothing imports upward. The checker walks the source with `ast`, so it sees what a runtime probe
of `sys.modules` misses: imports inside functions (the usual way to hide an upward dependency),
`importlib.import_module("...")` and `__import__("...")` strings, relative imports, and imports
under `if TYPE_CHECKING:` or `try:`. It also rejects third-party imports a layer's install does
not provide (the engine: stdlib, numpy, lmdb, mmh3, numba + its llvmlite; the rest of engram_store: the base install
only), and cycles between sibling packages (e.g. engram_store.engine <-> engram_store.rpc).

A self-test runs the checker on a small synthetic tree of violations, so a checker that sees
nothing cannot pass.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("engram_store", "cluster", "trainer", "engram")  # the top-level packages we ship

ENGINE, RPC, OPS = "engram_store.engine", "engram_store.rpc", "engram_store.ops"
CLUSTER, TRAINER, CLI = "cluster", "trainer", "engram"
LAYERS = (ENGINE, RPC, OPS, CLUSTER, TRAINER, CLI)

#: project layers each layer may import (its own included)
ALLOWED = {
    ENGINE: {ENGINE},
    RPC: {ENGINE, RPC},
    OPS: {ENGINE, RPC, OPS},
    CLUSTER: {ENGINE, RPC, OPS, CLUSTER},
    TRAINER: {ENGINE, RPC, OPS, TRAINER},
    CLI: set(LAYERS),
}
WHY = {
    ENGINE: "the shard engine imports nothing above it",
    RPC: "the gRPC layer imports only the engine",
    OPS: "the operations tools import only the engine and the gRPC layer",
    CLUSTER: "cluster may import engram_store.*, never trainer or engram",
    TRAINER: "trainer may import engram_store.*, never cluster or engram",
    CLI: "",
}

#: third-party modules the engine may import (beyond the standard library)
ENGINE_THIRD_PARTY = {"numpy", "lmdb", "mmh3", "numba", "llvmlite"}
#: import name -> distribution of the base install (pyproject `dependencies`): all that
#: engram_store may import, so that a plain `pip install engram` runs every store command
BASE_INSTALL = {
    "numpy": "numpy",
    "lmdb": "lmdb",
    "mmh3": "mmh3",
    "numba": "numba",
    "llvmlite": "llvmlite",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "google": "protobuf",
    "prometheus_client": "prometheus-client",
}
HEAVY = {"torch", "ray"}  # what the CLI imports only inside the command that needs it
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement or import call: `target` is None for a computed dynamic name."""

    path: str  # relative to the tree's root
    line: int
    source: str  # the importing module
    target: str | None  # the imported module (a submodule when `from P import sub` names one)
    local: bool  # inside a function body: runs when called, not on import
    how: str  # "import", "from" or "dynamic"

    def where(self) -> str:
        return f"{self.path}:{self.line}"


# ---- the walk ----


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Module name -> file of every .py under the shipped packages of `root`."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _package_of(module: str, path: pathlib.Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(package: str, name: str, level: int) -> str:
    if not level:
        return name
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


class _Walker(ast.NodeVisitor):
    def __init__(self, module: str, path: pathlib.Path, rel: str, known: set[str]):
        self.module, self.rel, self.known = module, rel, known
        self.package = _package_of(module, path)
        self.depth = 0  # function nesting
        self.found: list[Import] = []

    def _add(self, node: ast.AST, target: str | None, how: str) -> None:
        self.found.append(Import(self.rel, node.lineno, self.module, target, self.depth > 0, how))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._add(node, a.name, "import")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.package, node.module or "", node.level)
        for a in node.names:
            sub = f"{base}.{a.name}"
            self._add(node, sub if sub in self.known else base, "from")

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                self._add(node, _resolve(self.package, arg.value[level:], level), "dynamic")
            else:
                self._add(node, None, "dynamic")
        self.generic_visit(node)


def imports(root: pathlib.Path) -> list[Import]:
    """Every import of the shipped packages under `root`, module-level and function-local."""
    mods = modules(root)
    out: list[Import] = []
    for module, path in mods.items():
        rel = path.relative_to(root).as_posix()
        w = _Walker(module, path, rel, set(mods))
        w.visit(ast.parse(path.read_text(), filename=rel))
        out += w.found
    return out


# ---- the rules ----


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> str | None:
    """The layer of a project module (None: not ours). Bare engram_store is the engine's."""
    if module == "engram_store":
        return ENGINE
    return next((la for la in LAYERS if _within(module, la)), None)


def violations(root: pathlib.Path) -> list[str]:
    """'file:line: rule' for every import of the tree under `root` against the layer order."""
    known = set(modules(root))
    out = []
    for imp in imports(root):
        src = layer_of(imp.source)
        assert src is not None, imp  # every scanned module is in a layer

        def bad(rule: str, imp: Import = imp) -> None:
            out.append(
                f"{imp.where()}: {imp.source} imports {imp.target} ({imp.how}"
                f"{', in a function' if imp.local else ''}): {rule}"
            )

        if imp.target is None:
            if src != CLI:
                bad(
                    "a dynamic import of a computed name; use a string literal so this check "
                    "can see it"
                )
            continue
        tgt = layer_of(imp.target)
        top = imp.target.split(".")[0]
        if tgt is not None:
            if imp.target not in known:
                bad("no such module in the project")
            elif tgt not in ALLOWED[src]:
                bad(f"upward import ({tgt}); {WHY[src]}")
            elif src == CLI and tgt in (CLUSTER, TRAINER) and not imp.local:
                bad(
                    "the CLI imports cluster and trainer only inside the command that runs "
                    "(building the parser must not need the extras)"
                )
        elif top in STDLIB:
            continue
        elif src == ENGINE and top not in ENGINE_THIRD_PARTY:
            bad(f"the engine imports only the standard library and {sorted(ENGINE_THIRD_PARTY)}")
        elif src in (RPC, OPS) and top not in BASE_INSTALL:
            bad(
                f"engram_store imports only the base install {sorted(BASE_INSTALL)}"
                + (" (torch and Ray belong to the extras)" if top in HEAVY else "")
            )
        elif src == CLUSTER and top == "torch":
            bad("the cluster extra installs Ray, not torch")
        elif src == CLI and top in HEAVY and not imp.local:
            bad("the CLI imports torch and Ray only inside the command that needs them")
    return out


def sibling_edges(root: pathlib.Path) -> dict[tuple[str, str], Import]:
    """(package A, package B) -> one import behind it, for sibling packages A != B (children
    of the same package, or both top-level) where a module inside A imports one inside B."""
    mods = modules(root)
    packages = {m for m, p in mods.items() if p.name == "__init__.py"}
    edges: dict[tuple[str, str], Import] = {}
    for imp in imports(root):
        if imp.target is None or layer_of(imp.target) is None:
            continue
        s, t = imp.source.split("."), imp.target.split(".")
        i = 0
        while i < min(len(s), len(t)) and s[i] == t[i]:
            i += 1
        if i >= min(len(s), len(t)):
            continue  # one contains the other: a package composing its own children
        a, b = ".".join(s[: i + 1]), ".".join(t[: i + 1])
        if a in packages and b in packages:
            edges.setdefault((a, b), imp)
    return edges


def cycles(edges: dict[tuple[str, str], Import]) -> list[list[str]]:
    """Every strongly connected group of more than one package, as a cycle A -> B -> ... -> A."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph has a handful of nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, set(g), min(g)) for g in groups]


def _cycle_through(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest cycle start -> ... -> start inside one strongly connected group."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(members)} is not strongly connected")


def cycle_report(root: pathlib.Path) -> list[str]:
    """One line per package cycle, naming an import behind each of its edges."""
    edges = sibling_edges(root)
    return [
        " -> ".join(c)
        + "  ("
        + "; ".join(
            f"{edges[a, b].where()} {a} -> {b}"
            for a, b in zip(c, c[1:], strict=False)
            if (a, b) in edges
        )
        + ")"
        for c in cycles(edges)
    ]


def module_edges(root: pathlib.Path) -> dict[tuple[str, str], Import]:
    """(module A, module B) -> the import: A imports B when A is imported (module level)."""
    known = set(modules(root))
    return {
        (i.source, i.target): i
        for i in imports(root)
        if not i.local and i.target in known and i.target != i.source
    }


# ---- the tests ----


def test_the_tree_keeps_the_layer_order():
    found = imports(ROOT)
    # not vacuous: the walk sees function-local imports, also of the layers above the store
    assert len(found) > 200
    assert any(
        i.local and i.source == "engram.cli.serve" and i.target == "engram_store.rpc.server"
        for i in found
    )
    assert any(
        i.local and i.source == "engram.cli.options" and i.target == "cluster.api" for i in found
    )
    bad = violations(ROOT)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_cycle_between_packages():
    edges = sibling_edges(ROOT)
    assert (RPC, ENGINE) in edges  # not vacuous: the gRPC layer's edge to the engine is seen
    bad = cycle_report(ROOT)
    assert not bad, "import cycles between packages:\n" + "\n".join(bad)


def test_no_module_level_import_cycle():
    # a cycle of module-level imports breaks as soon as the import order changes (a module sees
    # its partner half-initialised); a function-local import is the deliberate way out
    edges = module_edges(ROOT)
    bad = [
        " -> ".join(c)
        + "  ("
        + "; ".join(edges[a, b].where() for a, b in zip(c, c[1:], strict=False))
        + ")"
        for c in cycles(edges)
    ]
    assert not bad, "module-level import cycles:\n" + "\n".join(bad)


def test_engram_store_imports_only_the_base_install():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert base == set(BASE_INSTALL.values()), (
        "BASE_INSTALL of this test and pyproject's dependencies disagree"
    )
    assert not base & {"torch", "ray", "tokenizers", "tqdm", "safetensors"}


SYNTHETIC = {
    "engram_store/__init__.py": "",
    "engram_store/engine/__init__.py": "",
    "engram_store/engine/shard.py": """\
import numpy as np
from engram_store.engine import mirror


def lookup():
    from engram_store.rpc import client  # upward, function-local
    return client


def tensors():
    import importlib
    return importlib.import_module("torch")  # the engine never imports torch


def hidden(name):
    return __import__(name)  # a computed name the checker cannot follow
""",
    "engram_store/engine/mirror.py": "from ..ops import snapshot  # upward, relative\n",
    "engram_store/rpc/__init__.py": "",
    "engram_store/rpc/client.py": "import grpc\nfrom engram_store.engine import shard\n",
    "engram_store/ops/__init__.py": "",
    "engram_store/ops/snapshot.py": "import ray\nfrom engram_store.rpc.client import x\n",
    "cluster/__init__.py": "",
    "cluster/api.py": "def fit():\n    return __import__('trainer.model')\n",
    "trainer/__init__.py": "",
    "trainer/model.py": "import torch\nimport cluster.api\n",
    "engram/__init__.py": "",
    "engram/__main__.py": "from engram.cli import main\n",
    "engram/cli/__init__.py": "import engram\nfrom engram.util import fmt\nimport trainer.model\n",
    "engram/cli/run.py": "import torch\nimport engram.cli.gone\n",
    "engram/util/__init__.py": "",
    "engram/util/fmt.py": "from engram.cli import run\n",
}


def test_the_checker_sees_violations(tmp_path):
    for rel, text in SYNTHETIC.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    bad = "\n".join(violations(tmp_path))
    expect = [
        r"engram_store/engine/shard\.py:6: .* imports engram_store\.rpc\.client \(from, in a "
        r"function\): upward import \(engram_store\.rpc\)",
        r"engram_store/engine/shard\.py:12: .* imports torch \(dynamic, in a function\): the "
        r"engine imports only",
        r"engram_store/engine/shard\.py:16: .* \(dynamic, in a function\): a dynamic import of a "
        r"computed name",
        r"engram_store/engine/mirror\.py:1: .* imports engram_store\.ops\.snapshot \(from\): upward",
        r"engram_store/ops/snapshot\.py:1: .* imports ray .*torch and Ray belong to the extras",
        r"cluster/api\.py:2: .* imports trainer\.model \(dynamic, in a function\): upward import "
        r"\(trainer\); cluster may import engram_store",
        r"trainer/model\.py:2: .* imports cluster\.api \(import\): upward import \(cluster\)",
        r"engram/cli/__init__\.py:3: .* imports trainer\.model .*only inside the command",
        r"engram/cli/run\.py:1: .* imports torch .*only inside the command",
        r"engram/cli/run\.py:2: .* imports engram\.cli\.gone .*no such module",
    ]
    for pattern in expect:
        assert re.search(pattern, bad), f"{pattern!r} not flagged in:\n{bad}"
    assert len(bad.splitlines()) == len(expect), bad  # and nothing legitimate is flagged
    found = {tuple(c) for c in cycles(sibling_edges(tmp_path))}
    # engine <-> rpc and cluster <-> trainer are upward imports too; engram.cli <-> engram.util
    # breaks no layer rule: only the cycle check catches it
    assert found == {
        (ENGINE, RPC, ENGINE),
        (CLUSTER, TRAINER, CLUSTER),
        ("engram.cli", "engram.util", "engram.cli"),
    }, found
    assert cycles(module_edges(tmp_path)) == [
        [
            f"{ENGINE}.mirror",
            f"{OPS}.snapshot",
            f"{RPC}.client",
            f"{ENGINE}.shard",
            f"{ENGINE}.mirror",
        ]
    ]
    report = "\n".join(cycle_report(tmp_path))
    assert "engram/util/fmt.py:1 engram.util -> engram.cli" in report, report
