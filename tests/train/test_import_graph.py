"""No import cycles among megarnn's modules, counting imports inside functions too (a function-local
import hides a cycle from Python's import machinery, not from the design).

    python tests/train/test_import_graph.py     # prints every cycle found
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megarnn"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The megarnn modules that `path` imports anywhere in its body ("from megarnn.x import y" counts as
    megarnn.x.y when that is a module, else megarnn.x; relative imports are resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # megarnn.x.y where y is not a module -> megarnn.x
                name = name.rpartition(".")[0]
            if name and name != me and name.split(".")[0] == PACKAGE:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_within_megarnn():
    found = cycles(import_graph())
    assert not found, "import cycles (including function-local imports): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_function_local_cycle():
    graph = {"megarnn.a": {"megarnn.b"}, "megarnn.b": {"megarnn.a"}, "megarnn.c": {"megarnn.a"}}
    assert cycles(graph) == [["megarnn.a", "megarnn.b"]]
    src = ROOT / "megarnn" / "train" / "checkpoint.py"
    assert "megarnn.errors" in imports_of(src, set(import_graph()))


if __name__ == "__main__":
    found = cycles(import_graph())
    print("\n".join(" <-> ".join(c) for c in found) or "no cycles")
    sys.exit(1 if found else 0)
