"""Layering: no import cycle among kvscope's modules, and no strategy name outside its own module.

Imports are read from the source (AST): every import a module runs when it is imported, at module
level, ``if TYPE_CHECKING`` blocks included. Imports inside functions are deferred on purpose (a
layer reaching up lazily, e.g. ``adaptive:thresholds_from`` reading study results) and are not edges.
"""
from __future__ import annotations

import ast
from pathlib import Path

import kvscope

SRC = Path(kvscope.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    out: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.If, ast.Try)):  # module-level blocks run at import
            stack += node.body + node.orelse + getattr(node, "finalbody", [])
            for h in getattr(node, "handlers", []):
                stack += h.body
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvscope modules it imports at module level."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


#: Type-only cycles of the study layer (a module annotating with a type of the module that
#: drives it), left to the study's owners; nothing else may join them.
KNOWN_STUDY_CYCLES = [["kvscope.study.external", "kvscope.study.spec"],
                      ["kvscope.study.ray_runner", "kvscope.study.runner"]]


def test_no_import_cycle() -> None:
    # A package's __init__ importing its own submodules (re-exports) is not a layering cycle.
    graph = {m: {e for e in es if m != e.rpartition(".")[0]} for m, es in import_graph().items()}
    assert [c for c in _cycles(graph) if c not in KNOWN_STUDY_CYCLES] == []


def test_every_module_imports() -> None:
    import importlib

    for name in sorted(_modules()):
        if name.startswith(("kvscope.serve", "kvscope.study.ray_runner")):
            continue  # optional extras (fastapi, ray) need not be installed
        importlib.import_module(name)


def test_kv_does_not_import_upper_layers() -> None:
    # kv/ sits below engine/, study/ and advise/ (Request is kvscope.request, shared); it may reach
    # study only lazily (thresholds_from).
    upper = ("kvscope.engine", "kvscope.study", "kvscope.advise", "kvscope.bench", "kvscope.serve", "kvscope.llm", "kvscope.cli")
    graph = import_graph()
    bad = {m: sorted(e for e in es if e.startswith(upper)) for m, es in graph.items() if m.startswith("kvscope.kv")}
    assert {m: es for m, es in bad.items() if es} == {}


#: Where a strategy's name may be written besides its own module: the registry, the shared
#: defaults, the presets (the study's and the advisor's candidate set) and measurements keyed by
#: strategy.
NAME_ALLOWED = {"kv/registry.py", "constants.py", "study/presets.py", "advise/options.py", "advise/quality.py"}
#: The word, not the strategy: calibration and prompt text called "random".
WORD_ALLOWED = {("kv/skew.py", "random"), ("bench/http_bench.py", "random")}


def test_no_strategy_name_outside_its_module() -> None:
    import re

    from kvscope.kv.registry import available

    strategies = available()
    own = {n: Path(c.__module__.replace(".", "/") + ".py").relative_to("kvscope").as_posix()
           for n, c in strategies.items()}
    spec = re.compile(r"^(%s)(:\S|$)" % "|".join(map(re.escape, sorted(strategies))))
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in NAME_ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
                continue
            m = spec.match(node.value.strip())
            if m and own[m.group(1)] != rel and (rel, m.group(1)) not in WORD_ALLOWED:
                found.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert found == []


def _direct_imports(module: str) -> set[str]:
    """Every top-level name ``module`` imports (kvscope modules and third-party packages alike)."""
    tree = ast.parse(_modules()[module].read_text())
    out: set[str] = set()
    for node in _top_level_imports(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif node.module:
            out.add(node.module)
    return out


def test_scheduler_side_holds_no_tensors() -> None:
    # The scheduler and the contract it sees name no tensor and nothing of the worker side, so that
    # they can run where no KV lives.
    for module in ("kvscope.kv.manager", "kvscope.engine.scheduler"):
        imports = _direct_imports(module)
        assert not {i for i in imports if i == "torch" or i.startswith("torch.")}, module
        assert not imports & {"kvscope.kv.backend", "kvscope.kv.base", "kvscope.kv.graphs"}, module


def test_model_runner_sees_only_the_worker_side() -> None:
    imports = _direct_imports("kvscope.engine.model_runner")
    assert not imports & {"kvscope.kv.manager", "kvscope.kv.base"}
