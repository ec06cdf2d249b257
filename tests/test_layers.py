"""The layering docs/architecture.md draws, checked on the source: dependencies point down only, and no
module imports one that imports it back (imports under ``TYPE_CHECKING`` and inside
functions count: a cycle hidden there is still a cycle in the design)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kvgate/gateway", "kvgate/cachestore", "kvgate/kernels", "kvgate/migrations")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module of ours an import names (``a.b.c`` may be a function of ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> Iterator[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                target = _resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES \
                    else _resolve(base)
                if target:
                    yield target


GRAPH = {m: {t for t in _imports(m) if t != m} for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


# What each layer may import of ours, besides itself (dependencies point down). Every
# package of kvgate is a layer here (``test_every_package_has_a_layer``).
ALLOWED = {
    "kvgate.kernels": set(),
    "kvgate.cachestore": {"kvgate.kernels"},
    "kvgate.gateway.usage": set(),
    "kvgate.gateway.loop": set(),  # the event loop a process runs (--event-loop)
    "kvgate.gateway.engine": {"kvgate.cachestore", "kvgate.kernels", "kvgate.gateway.usage",
                              "kvgate.gateway.loop"},
    "kvgate.gateway.ledger": {"kvgate.gateway.usage", "kvgate.gateway.config"},  # config: the CLI reads KVGATE_DB
    "kvgate.gateway.config": {"kvgate.gateway.loop"},  # its choices of --event-loop
    "kvgate.migrations": {"kvgate.gateway.ledger"},
    # the capacity planner: model shapes (engine), replays (cachestore), the CLI's byte
    # sizes (config) and table printer (ledger); never HTTP
    "kvgate.gateway.plan": {"kvgate.cachestore", "kvgate.kernels", "kvgate.gateway.engine",
                            "kvgate.gateway.config", "kvgate.gateway.ledger"},
    # what clients send and replicas and routers exchange: the engine's value types
    # (sampling, structured outputs, tokenizer), principals and billing rules, cache events
    "kvgate.gateway.protocol": {"kvgate.cachestore", "kvgate.gateway.engine",
                                "kvgate.gateway.ledger", "kvgate.gateway.usage"},
    # what every aiohttp front end shares: the protocol's errors, the ledger's keys, the
    # http section of the settings
    "kvgate.gateway.edge": {"kvgate.gateway.protocol", "kvgate.gateway.ledger",
                            "kvgate.gateway.usage", "kvgate.gateway.config"},
    # the replica and the router stand side by side on the edge; neither imports the other
    "kvgate.gateway.http": {"kvgate.gateway.edge", "kvgate.gateway.protocol",
                            "kvgate.gateway.engine", "kvgate.gateway.ledger",
                            "kvgate.gateway.config", "kvgate.gateway.usage",
                            "kvgate.gateway.loop", "kvgate.cachestore", "kvgate.kernels"},
    "kvgate.gateway.route": {"kvgate.gateway.edge", "kvgate.gateway.protocol",
                             "kvgate.gateway.engine", "kvgate.gateway.ledger",
                             "kvgate.gateway.config", "kvgate.gateway.loop",
                             "kvgate.cachestore"},
    # the command line: the top, it may reach every layer
    "kvgate.gateway.cli": {"kvgate.gateway", "kvgate.cachestore", "kvgate.kernels"},
    "kvgate.gateway": set(),  # the package's own __init__
}


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_dependencies_point_down(layer: str) -> None:
    wrong = sorted(
        f"{m} imports {t}" for m, targets in GRAPH.items() if _layer(m) == layer
        for t in targets
        if _layer(t) != layer and not any(t == a or t.startswith(a + ".")
                                          for a in ALLOWED[layer]))
    assert wrong == []


def test_every_package_has_a_layer() -> None:
    """A new package (or a top-level module) is given its place in ``ALLOWED``, not left
    to the catch-all where nothing checks it."""
    unplaced = sorted(m for m in MODULES
                      if _layer(m) not in ALLOWED or (_layer(m) == "kvgate.gateway"
                                                      and m != "kvgate.gateway"))
    assert unplaced == []


# Third-party imports a layer must not make: the protocol parses and checks, it serves
# nothing, so a router or a test can use it without a web framework or a Redis client.
FORBIDDEN_THIRD_PARTY = {"kvgate.gateway.protocol": ("aiohttp", "redis")}


def _third_party(module: str) -> Iterator[str]:
    path = MODULES[module]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


@pytest.mark.parametrize("layer", sorted(FORBIDDEN_THIRD_PARTY))
def test_no_forbidden_libraries(layer: str) -> None:
    wrong = sorted(f"{m} imports {name}" for m in MODULES if _layer(m) == layer
                   for name in _third_party(m)
                   if name.split(".")[0] in FORBIDDEN_THIRD_PARTY[layer])
    assert wrong == []


def test_no_private_names_across_packages() -> None:
    """``from kvgate.a.b import _name`` only within package ``kvgate.a``: a private name is
    a module's business and its package's, no one else's."""
    wrong = []
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                target = _resolve(node.module)
                if target is None:
                    continue
                target_pkg = target if MODULES[target].name == "__init__.py" \
                    else target.rpartition(".")[0]
                wrong += [f"{module} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and target_pkg != package]
    assert wrong == []


def test_no_casts_to_any() -> None:
    """``cast(Any, x)`` hides a type the design should name (a Protocol, a union)."""
    wrong = [m for m, path in MODULES.items() if "cast(Any" in path.read_text()]
    assert wrong == []


def test_the_checker_sees_a_cycle() -> None:
    """The cycle finder itself: a two-module loop is reported (so the test above can fail)."""
    saved = dict(GRAPH)
    try:
        # two modules with no path between them today (neither imports the other)
        GRAPH["kvgate.kernels.dispatch"] = GRAPH["kvgate.kernels.dispatch"] | {"kvgate.kernels.copy"}
        GRAPH["kvgate.kernels.copy"] = GRAPH["kvgate.kernels.copy"] | {"kvgate.kernels.dispatch"}
        assert ["kvgate.kernels.copy", "kvgate.kernels.dispatch"] in _cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
