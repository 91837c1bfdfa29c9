"""The package's layout is its architecture: layers import one way, and no module imports
another that (directly or not) imports it back, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import atlas

PACKAGE = Path(atlas.__file__).parent

# Lower layers never import higher ones. Each entry: module or subpackage prefix -> layer.
LAYERS = {
    "atlas": 0, "atlas.config": 0, "atlas.logs": 0, "atlas.protocol": 0, "atlas.asgi": 0, "atlas.backoff": 0, "atlas.openapi": 0, "atlas.deadlines": 0, "atlas.http_server": 0.5, "atlas.lifecycle": 0.5,
    "atlas.store": 1, "atlas.llm": 1,
    "atlas.agent": 2, "atlas.rooms": 2,
    "atlas.agent_api": 3,
    "atlas.gateway": 4,
    "atlas.cli": 5,
    "atlas.__main__": 6,
}
# Parts of one layer that must stay independent of each other.
INDEPENDENT = [("atlas.store", "atlas.llm"), ("atlas.agent", "atlas.rooms")]
# The clients speak the protocol only: they never reach into the server's parts.
CLIENT_MODULES = ("atlas.cli.client", "atlas.cli.chat", "atlas.cli.ask", "atlas.cli.lineedit")
CLIENT_MAY_IMPORT = ("atlas", "atlas.protocol", "atlas.backoff", "atlas.cli.client", "atlas.cli.lineedit")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every atlas module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "atlas" or m.startswith("atlas.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> tuple[str, int]:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return best, LAYERS[best]


def test_layers_import_one_way() -> None:
    wrong = []
    for module, imported in graph().items():
        part, layer = layer_of(module)
        for target in imported:
            target_part, target_layer = layer_of(target)
            if target == "atlas" or target_part == part:
                continue
            if target_layer >= layer or any({part, target_part} == set(pair) for pair in INDEPENDENT):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = []

    def visit(module: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(edges[module]):
            if target == "atlas":
                continue
            if target in on_path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                on_path.add(target)
                visit(target, path + [target], on_path, done)
                on_path.discard(target)
                done.add(target)

    done: set[str] = set()
    for module in sorted(edges):
        if module not in done:
            visit(module, [module], {module}, done)
            done.add(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_clients_use_the_protocol_only() -> None:
    edges = graph()
    for module in CLIENT_MODULES:
        assert edges[module] <= set(CLIENT_MAY_IMPORT), (module, edges[module] - set(CLIENT_MAY_IMPORT))


def test_the_three_seams_stay_on_top() -> None:
    for seam in ("rooms.py", "agent.py", "protocol.py"):
        assert (PACKAGE / seam).is_file(), seam
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == sorted(["__init__.py", "__main__.py", "agent.py", "asgi.py", "backoff.py", "config.py", "deadlines.py", "http_server.py", "lifecycle.py",
                           "logs.py", "openapi.py", "protocol.py", "rooms.py"]), flat
