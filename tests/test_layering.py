"""The package's rooms import one way (docs/ARCHITECTURE.md, "Room graph") and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sparse_lavida_vllm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# room -> the rooms it may import (the arrows of docs/ARCHITECTURE.md's room graph). Top-level modules
# (cli.py, __init__.py) are the front door and may import any room.
ALLOWED = {
    "diffusion": set(),
    "model_executor": {"diffusion"},
    "drivers": {"diffusion", "model_executor"},
    "multimodal": {"model_executor"},
    "scheduler": {"diffusion", "model_executor", "multimodal"},
    "worker": {"diffusion", "model_executor", "multimodal", "scheduler"},
    "entrypoints": {"model_executor", "multimodal", "scheduler", "worker"},
    "training": {"diffusion", "model_executor", "drivers", "multimodal", "scheduler", "entrypoints"},
}
NO_VLLM_AT_MODULE_LEVEL = ("diffusion", "model_executor", "drivers")  # the core runs wherever torch runs


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def room(module: str) -> str | None:
    """The room (first sub-package) of a module; None for the package's top-level modules."""
    parts = module.split(".")
    if len(parts) < 2 or not (ROOT / parts[1]).is_dir():
        return None
    return parts[1]


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in the file, function-level and TYPE_CHECKING ones too."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import module` names a module
                full = f"{source}.{alias.name}"
                found.append((full if full in MODULES else source, id(node) in top))
    return found


def internal_graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target in MODULES and target != m} for m in MODULES}


def test_rooms_import_only_the_rooms_below_them() -> None:
    wrong = []
    for module, targets in internal_graph().items():
        source = room(module)
        if source is None:
            continue
        assert source in ALLOWED, f"{module}: room {source!r} is not in the room graph (ALLOWED)"
        for target in targets:
            other = room(target)
            if other is not None and other != source and other not in ALLOWED[source]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the room graph:\n" + "\n".join(sorted(wrong))


def test_the_room_graph_has_no_circle() -> None:
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"room circle: {' -> '.join(path + (node,))}"
        if node not in done:
            for below in ALLOWED[node]:
                visit(below, path + (node,))
            done.add(node)

    for start in ALLOWED:
        visit(start, ())


def test_no_module_imports_itself_in_a_circle() -> None:
    graph = internal_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_core_rooms_never_import_vllm_at_module_level() -> None:
    wrong = [f"{module} imports {target}" for module in MODULES if room(module) in NO_VLLM_AT_MODULE_LEVEL
             for target, at_top in imports(module) if at_top and target.split(".")[0] == "vllm"]
    assert not wrong, "\n".join(wrong)


def test_the_documented_room_graph_is_the_allowed_one_and_every_arrow_is_used() -> None:
    # docs/ARCHITECTURE.md's mermaid graph ("a --> b & c" lines) must say what ALLOWED says, and every allowed
    # arrow must be an import some module makes: the picture a reader trusts is the real graph
    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    block = doc.split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = {name: set() for name in ALLOWED}
    for line in block.splitlines():
        if "-->" in line:
            source, targets = (part.strip() for part in line.split("-->"))
            drawn[source] |= {t.strip() for t in targets.split("&")}
    assert drawn == ALLOWED
    used = {(room(m), room(t)) for m, targets in internal_graph().items() for t in targets}
    unused = [f"{a} -> {b}" for a, below in ALLOWED.items() for b in below if (a, b) not in used]
    assert not unused, "allowed but never imported: " + ", ".join(unused)
