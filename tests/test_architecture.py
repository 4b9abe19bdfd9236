"""The product's shape, checked statically (ast, nothing imported): no import cycles, backend names in one
registry, and no module outside runtime/ reading a private attribute of the runtime object.

Import graph: a node per module of runtime/, backends/, export/, hardware_profiles/; an edge per `import` /
`from ... import` naming another of them, wherever it stands: at module level AND inside functions (a lazy
import still ties the two modules together: `Runtime.load -> onnx backend -> export -> Runtime.load` was a
run-time loop through lazy imports). `if TYPE_CHECKING:` blocks are not edges (never run). A module importing
its own parent package is not an edge (Python initialises the parent first; `from . import x` reads the
submodule x). `from pkg import name` is an edge to the submodule `pkg.name` when there is one, else to `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "backends", "export", "hardware_profiles")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute)) and \
        getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, (path, is_pkg) in mods.items():
        deps: set[str] = set()
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]

        def add(name: str) -> None:
            target = known(name)
            if target and target != mod and not mod.startswith(target + "."):
                deps.add(target)

        def walk(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    continue
                if isinstance(child, ast.Import):
                    for a in child.names:
                        add(a.name)
                elif isinstance(child, ast.ImportFrom):
                    base = ".".join(here[:len(here) - child.level + 1] + ([child.module] if child.module else [])) \
                        if child.level else child.module
                    for a in child.names:
                        add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
                walk(child)
        walk(ast.parse(path.read_text(encoding="utf-8")))
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_the_checker_finds_a_planted_cycle():
    """The checker itself: a three-module loop and a self-contained pair are found, a chain is not."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}
    assert cycles(g) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    """Edges the old loops ran through, read from the code as it is (so a checker that saw none would fail)."""
    g = import_graph()
    assert "runtime.plan.sizes" in g["runtime.plan.memory"]                       # relative, module level
    assert "export.onnx" in g["backends.onnx"]                                     # lazy, inside a method
    assert "backends.onnx_runner" in g["backends.onnx"]
    assert "backends" in g["runtime.api"]


def test_the_product_has_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level and lazy imports): " + "; ".join(" <-> ".join(c) for c in found)


def _runtime_private_names() -> set[str]:
    """The `_names` the Runtime class defines (methods, and attributes its methods assign on self)."""
    tree = ast.parse((ROOT / "runtime" / "api.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runtime")
    names = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_outside_runtime_reads_a_private_attribute_of_the_runtime():
    """backends/ and export/ use the runtime's public interface only: no `x._name` for a private name of
    Runtime, and no `rt._anything` (the runtime object's usual name)."""
    private = _runtime_private_names()
    assert {"_prefill", "_check_ids"} <= private          # the scan below has something to look for
    bad = []
    for pkg in ("backends", "export", "hardware_profiles"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    base = node.value
                    named_rt = isinstance(base, ast.Name) and base.id in ("rt", "runtime") or \
                        isinstance(base, ast.Attribute) and base.attr in ("rt", "runtime")
                    if node.attr in private or named_rt:
                        bad.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, "private runtime attributes read outside runtime/: " + ", ".join(bad)


def test_backend_names_live_in_one_registry():
    """The registry is the one list of backend names: the CLI's choices and the profile schema read it, and
    no other product module spells the backend names out as a list, tuple, set or dict of them."""
    import backends

    names = set(backends.names())
    assert names == {"cpu", "cuda", "ascend", "onnx"}
    bad = []
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            if p == ROOT / "backends" / "__init__.py":
                continue
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                items = node.keys if isinstance(node, ast.Dict) else \
                    node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else []
                strings = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
                if len(strings & names) >= 2:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {sorted(strings & names)}")
    assert not bad, "backend names listed outside backends/__init__.py: " + ", ".join(bad)


def test_the_runtime_core_has_no_backend_name_branches():
    """Runtime.load and run.py ask the backend object, not its name: no `== "cpu"`-style comparison of a
    backend name, and no `hasattr(rt.model, ...)` probing in the CLI."""
    import backends

    names = set(backends.names())
    bad = []
    for rel in ("runtime/api.py", "runtime/run.py", "runtime/parallel/comm.py", "runtime/parallel/__init__.py"):
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
                if any(c in names for c in consts):
                    bad.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "hasattr":
                bad.append(f"{rel}:{node.lineno} hasattr")
    assert not bad, "backend-name branches in the runtime core: " + ", ".join(bad)
